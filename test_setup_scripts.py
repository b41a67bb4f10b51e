"""
setup_test_db.sh, run for real, and setup_test_db.bat, run under Wine's cmd.

The .bat runs with stand-in pg_isready, psql and python (.cmd files on its
PATH that record their arguments and exit with a chosen code), which proves
its control flow without a Windows PostgreSQL.
"""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn

from conftest import (
    HERE,
    TEST_DATABASE_URL,
    ensure_database_exists,
    quoted,
    scoped_name,
    skip_missing_tool,
)

# Databases are cluster-wide: these are named from the suite's own test database, so
# that two runs on one server (different DB_NAME) never drop each other's.
TEST_DB = psycopg2.extensions.parse_dsn(TEST_DATABASE_URL)["dbname"]
SCRIPTS_DB = scoped_name(TEST_DB, "scripts_test")  # the scripts recreate only names ending in _test
KEEP_DB = scoped_name(TEST_DB, "keep")  # one the scripts must refuse to drop


def server_environment():
    """DB_* variables that point the .sh at the server the suite itself uses."""
    params = psycopg2.extensions.parse_dsn(TEST_DATABASE_URL)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DB_")}
    environment.update(
        DB_HOST=params.get("host", "localhost"),
        DB_PORT=str(params.get("port", 5432)),
        DB_USER=params.get("user", "postgres"),
        DB_PASSWORD=params.get("password", ""),
    )
    return environment


def run_sh(*pytest_args, **env):
    return subprocess.run(
        ["bash", str(HERE / "setup_test_db.sh"), *pytest_args],
        env={**server_environment(), **env},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def maintenance_connection():
    params = psycopg2.extensions.parse_dsn(TEST_DATABASE_URL)
    connection = psycopg2.connect(make_dsn(**{**params, "dbname": "postgres"}))
    connection.autocommit = True
    return connection


def database_exists(name):
    with maintenance_connection() as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        return cursor.fetchone() is not None


def drop_database(name):
    connection = maintenance_connection()
    with connection.cursor() as cursor:
        cursor.execute(f"DROP DATABASE IF EXISTS {quoted(name)}")
    connection.close()


@pytest.fixture
def scripts_db():
    """A test database holding a marker schema, to see whether the script recreated it."""
    url = make_dsn(**{**psycopg2.extensions.parse_dsn(TEST_DATABASE_URL), "dbname": SCRIPTS_DB})
    ensure_database_exists(url)
    connection = psycopg2.connect(url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute("CREATE SCHEMA IF NOT EXISTS marker")
    connection.close()
    yield url
    drop_database(SCRIPTS_DB)


def marker_survived(url):
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_namespace WHERE nspname = 'marker'")
        return cursor.fetchone() is not None


# --- setup_test_db.sh, for real ----------------------------------------------


def test_sh_recreates_the_database_and_runs_pytest_against_it(scripts_db):
    result = run_sh("test_models.py::test_all_six_tables_exist", DB_NAME=SCRIPTS_DB)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 passed" in result.stdout
    assert not marker_survived(scripts_db)


def test_sh_exits_with_the_status_of_pytest(scripts_db):
    result = run_sh("-k", "no_test_has_this_name", DB_NAME=SCRIPTS_DB)
    assert result.returncode == 5  # pytest: no tests collected


def test_sh_stops_with_a_message_when_the_server_is_down():
    result = run_sh(DB_HOST="127.0.0.1", DB_PORT="1", DB_NAME=SCRIPTS_DB)
    assert result.returncode == 2
    assert "PostgreSQL is not accepting connections at 127.0.0.1:1" in result.stderr
    assert "pytest" not in result.stdout


def test_sh_refuses_to_drop_a_database_not_named_test():
    ensure_database_exists(
        make_dsn(**{**psycopg2.extensions.parse_dsn(TEST_DATABASE_URL), "dbname": KEEP_DB})
    )
    try:
        result = run_sh(DB_NAME=KEEP_DB)
        assert result.returncode == 2
        assert f"refusing to drop database '{KEEP_DB}'" in result.stderr
        assert database_exists(KEEP_DB)
    finally:
        drop_database(KEEP_DB)


# --- setup_test_db.bat, under Wine ------------------------------------------

STAND_IN = """@echo off
>> "%STUB_LOG%" echo {name} %*
exit /b %STUB_{NAME}_EXIT%
"""
PYTHON_STAND_IN = """@echo off
>> "%STUB_LOG%" echo python %* ^| TEST_DATABASE_URL=%TEST_DATABASE_URL% ^| PGPASSWORD=%PGPASSWORD%
exit /b %STUB_PYTHON_EXIT%
"""


def windows_path(path):
    return "Z:" + str(path).replace("/", "\\")


@pytest.fixture(scope="module")
def stand_ins():
    if shutil.which("wine") is None:
        skip_missing_tool("wine", "Debian package wine: apt-get install wine")
    folder = Path(tempfile.mkdtemp(prefix="bat-stand-ins-"))
    for name in ("pg_isready", "psql"):
        text = STAND_IN.format(name=name, NAME=name.upper())
        (folder / f"{name}.cmd").write_text(text.replace("\n", "\r\n"))
    (folder / "python.cmd").write_text(PYTHON_STAND_IN.replace("\n", "\r\n"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def run_bat(stand_ins, *args, pg_isready=0, psql=0, python=0, **db_env):
    """Run the .bat under Wine; returns (exit code, output, the stand-ins' calls)."""
    log = stand_ins / "calls.log"
    log.unlink(missing_ok=True)
    environment = {key: value for key, value in os.environ.items() if not key.startswith("DB_")}
    environment.update(
        db_env,
        WINEDEBUG="-all",
        WINEPATH=windows_path(stand_ins),
        STUB_LOG=windows_path(log),
        STUB_PG_ISREADY_EXIT=str(pg_isready),
        STUB_PSQL_EXIT=str(psql),
        STUB_PYTHON_EXIT=str(python),
    )
    result = subprocess.run(
        ["wine", "cmd", "/c", "setup_test_db.bat", *args],
        cwd=HERE,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return (
        result.returncode,
        result.stdout + result.stderr,
        [" ".join(call.split()) for call in calls],
    )


def test_bat_with_defaults_checks_server_recreates_database_and_runs_pytest(stand_ins):
    status, output, calls = run_bat(stand_ins)
    assert status == 0, output
    assert calls == [
        "pg_isready -h localhost -p 5432 -U postgres",
        (
            "psql -h localhost -p 5432 -U postgres -d postgres -v ON_ERROR_STOP=1 -q"
            ' -c "DROP DATABASE IF EXISTS api_aggregator_test" -c "CREATE DATABASE api_aggregator_test"'
        ),
        (
            "python -m pytest -v | TEST_DATABASE_URL=host=localhost user=postgres password=postgres"
            " dbname=api_aggregator_test port=5432 sslmode=disable | PGPASSWORD=postgres"
        ),
    ]


def test_bat_uses_the_overridden_settings_and_passes_arguments_to_pytest(stand_ins):
    status, output, calls = run_bat(
        stand_ins,
        "-k",
        "soft",
        DB_HOST="db.internal",
        DB_PORT="6543",
        DB_USER="ci",
        DB_PASSWORD="pw",
        DB_NAME="ci_test",
    )
    assert status == 0, output
    assert calls[0] == "pg_isready -h db.internal -p 6543 -U ci"
    assert calls[1].startswith("psql -h db.internal -p 6543 -U ci -d postgres")
    assert '-c "CREATE DATABASE ci_test"' in calls[1]
    assert calls[2] == (
        "python -m pytest -v -k soft | TEST_DATABASE_URL=host=db.internal user=ci password=pw"
        " dbname=ci_test port=6543 sslmode=disable | PGPASSWORD=pw"
    )


def test_bat_exits_with_the_status_of_pytest(stand_ins):
    status, output, calls = run_bat(stand_ins, python=3)
    assert status == 3, output
    assert len(calls) == 3


def test_bat_stops_with_a_message_when_pg_isready_fails(stand_ins):
    status, output, calls = run_bat(stand_ins, pg_isready=2)
    assert status == 2
    assert "PostgreSQL is not accepting connections at localhost:5432" in output
    assert calls == ["pg_isready -h localhost -p 5432 -U postgres"]


def test_bat_stops_when_the_database_cannot_be_recreated(stand_ins):
    status, output, calls = run_bat(stand_ins, psql=1)
    assert status == 2
    assert "could not recreate database api_aggregator_test" in output
    assert [call.split()[0] for call in calls] == ["pg_isready", "psql"]


def test_bat_refuses_to_drop_a_database_not_named_test(stand_ins):
    status, output, calls = run_bat(stand_ins, DB_NAME="api_aggregator")
    assert status == 2
    assert "refusing to drop database 'api_aggregator'" in output
    assert calls == []
