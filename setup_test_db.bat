@echo off
rem Create a fresh test database and run the test suite against it.
rem
rem   setup_test_db.bat                  all tests, against api_aggregator_test
rem   setup_test_db.bat -k soft_delete   extra arguments go to pytest
rem   --pg all (15, 16, 17 and 18, as CI) starts servers on Linux and macOS only
rem
rem DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME override the defaults.
rem DB_NAME must end in _test: the script drops and recreates it.
rem Exit status: pytest's, or 2 when the server is down or the database cannot
rem be recreated.
setlocal

if "%DB_HOST%"=="" set "DB_HOST=localhost"
if "%DB_PORT%"=="" set "DB_PORT=5432"
if "%DB_USER%"=="" set "DB_USER=postgres"
if "%DB_PASSWORD%"=="" set "DB_PASSWORD=postgres"
if "%DB_NAME%"=="" set "DB_NAME=api_aggregator_test"

if not "%DB_NAME:~-5%"=="_test" goto refuse_name

call pg_isready -h %DB_HOST% -p %DB_PORT% -U %DB_USER% >nul
if errorlevel 1 goto server_down

set "PGPASSWORD=%DB_PASSWORD%"
echo setup_test_db: recreating database %DB_NAME% on %DB_HOST%:%DB_PORT%
call psql -h %DB_HOST% -p %DB_PORT% -U %DB_USER% -d postgres -v ON_ERROR_STOP=1 -q -c "DROP DATABASE IF EXISTS %DB_NAME%" -c "CREATE DATABASE %DB_NAME%"
if errorlevel 1 goto recreate_failed

set "TEST_DATABASE_URL=host=%DB_HOST% user=%DB_USER% password=%DB_PASSWORD% dbname=%DB_NAME% port=%DB_PORT% sslmode=disable"
cd /d "%~dp0"
rem Last command, so no "call": a python.bat shim (pyenv-win) exits the script with its status too.
python -m pytest -v %*
exit /b %ERRORLEVEL%

:refuse_name
echo setup_test_db: refusing to drop database '%DB_NAME%': set DB_NAME to a name ending in _test 1>&2
exit /b 2

:server_down
echo setup_test_db: PostgreSQL is not accepting connections at %DB_HOST%:%DB_PORT%; start it, or set DB_HOST/DB_PORT, and retry 1>&2
exit /b 2

:recreate_failed
echo setup_test_db: could not recreate database %DB_NAME%; check DB_USER/DB_PASSWORD and that no session is using it 1>&2
exit /b 2
