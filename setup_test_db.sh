#!/usr/bin/env bash
# Create a fresh test database and run the test suite against it.
#
#   ./setup_test_db.sh                 # all tests, against api_aggregator_test
#   DB_PORT=5433 ./setup_test_db.sh -k soft_delete   # extra arguments go to pytest
#   ./setup_test_db.sh --pg all        # on PostgreSQL 15, 16, 17 and 18, as CI
#
# DB_HOST, DB_PORT, DB_USER, DB_PASSWORD and DB_NAME override the defaults.
# DB_NAME must end in _test: the script drops and recreates it.
# Exit status: pytest's, or 2 when the server is down or the database cannot
# be recreated.
set -u

DB_HOST="${DB_HOST:-localhost}"
DB_PORT="${DB_PORT:-5432}"
DB_USER="${DB_USER:-postgres}"
DB_PASSWORD="${DB_PASSWORD:-postgres}"
DB_NAME="${DB_NAME:-api_aggregator_test}"
PYTHON="${PYTHON:-$(command -v python || command -v python3)}"

fail() {
  echo "setup_test_db: $*" >&2
  exit 2
}

case "$DB_NAME" in
  *_test) ;;
  *) fail "refusing to drop database '$DB_NAME': set DB_NAME to a name ending in _test" ;;
esac

pg_isready -h "$DB_HOST" -p "$DB_PORT" -U "$DB_USER" >/dev/null ||
  fail "PostgreSQL is not accepting connections at $DB_HOST:$DB_PORT; start it (or set DB_HOST/DB_PORT) and retry"

export PGPASSWORD="$DB_PASSWORD"
echo "setup_test_db: recreating database $DB_NAME on $DB_HOST:$DB_PORT"
psql -h "$DB_HOST" -p "$DB_PORT" -U "$DB_USER" -d postgres -v ON_ERROR_STOP=1 -q \
  -c "DROP DATABASE IF EXISTS \"$DB_NAME\"" -c "CREATE DATABASE \"$DB_NAME\"" ||
  fail "could not recreate database $DB_NAME; check DB_USER/DB_PASSWORD and that no session is using it"

export TEST_DATABASE_URL="host=$DB_HOST user=$DB_USER password=$DB_PASSWORD dbname=$DB_NAME port=$DB_PORT sslmode=disable"
cd "$(dirname "$0")" || fail "cannot enter the project folder"
"$PYTHON" -m pytest -v "$@"
exit $?
