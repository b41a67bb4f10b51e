"""
Fixtures and helpers: a real PostgreSQL test database, reset before every test.

The database comes from TEST_DATABASE_URL (default: the Go suite's
api_aggregator_test on localhost); it is created when missing. Each test gets
its public schema empty (`empty_db`) or freshly migrated (`migrated_db`), so
tests do not depend on each other or on their order. The helpers run
migrate.py as an operator would, read the catalog, record DDL and hold write
transactions open, for every test module.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

import migrate
import models

HERE = Path(__file__).resolve().parent
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL",
    "host=localhost user=postgres password=postgres dbname=api_aggregator_test port=5432 sslmode=disable",
)
NO_CREATE_ROLE = "migrate_test_no_create"
PASSWORD = "Pa55-never-shown"  # given wherever a password goes, looked for in every output


class TestDatabase:
    """The test database: its URL, and a raw autocommit connection to query it."""

    __test__ = False

    def __init__(self, url):
        self.params = parse_dsn(url)
        self.url = url
        self.name = self.params["dbname"]
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True

    def url_with(self, **changes):
        """DATABASE_URL for the same database with some libpq parameters changed."""
        return make_dsn(**{**self.params, **changes})

    def rows(self, query, *args):
        return self.execute(query, args or None)

    def execute(self, query, params=None):
        with self.connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def value(self, query, *args):
        return self.rows(query, *args)[0][0]

    def reset(self):
        for (trigger,) in self.rows("SELECT evtname FROM pg_event_trigger"):
            self.rows(f'DROP EVENT TRIGGER "{trigger}"')
        self.rows("DROP SCHEMA IF EXISTS audit CASCADE")
        self.rows("DROP SCHEMA public CASCADE")
        # As PostgreSQL 15 makes it: owned by the database owner, usable by all.
        self.rows("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
        self.rows("GRANT USAGE ON SCHEMA public TO PUBLIC")
        self.rows(f"DROP ROLE IF EXISTS {NO_CREATE_ROLE}")

    def tables(self):
        query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        return [name for (name,) in self.rows(query)]


def ensure_database_exists(url):
    params = parse_dsn(url)
    maintenance = psycopg2.connect(make_dsn(**{**params, "dbname": "postgres"}))
    maintenance.autocommit = True
    with maintenance.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (params["dbname"],))
        if cursor.fetchone() is None:
            cursor.execute(f'CREATE DATABASE "{params["dbname"]}"')
    maintenance.close()


@pytest.fixture(scope="session")
def test_database():
    ensure_database_exists(TEST_DATABASE_URL)
    db = TestDatabase(TEST_DATABASE_URL)
    yield db
    db.reset()
    db.connection.close()


@pytest.fixture
def empty_db(test_database):
    test_database.reset()
    yield test_database
    if not models.database.is_closed():
        models.database.close()
    test_database.reset()


@pytest.fixture
def migrated_db(empty_db):
    """The schema made by migrate.py, with the models bound to it as the application binds them."""
    migrate.connect(empty_db.params)
    migrate.migrate()
    bind_models(empty_db.params)
    return empty_db


def bind_models(params):
    """models.database bound as the gateway binds it: database.init, sessions in UTC."""
    models.database.close()
    models.database.utc_sessions = True
    params = dict(params)
    models.database.init(params.pop("dbname"), **params)


def run_migrate(database_url, *args, timeout=60, **env):
    """Run `python migrate.py` as an operator would; returns the CompletedProcess."""
    environment = {**os.environ, **env}
    if database_url is None:
        environment.pop("DATABASE_URL", None)
    else:
        environment["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, str(HERE / "migrate.py"), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE,
        check=False,
    )


def catalog(db):
    """Everything migrate.py is responsible for, read from pg_catalog."""
    columns = db.rows(
        """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2
        """
    )
    constraints = db.rows(
        """
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'public' ORDER BY 1, 2
        """
    )
    indexes = db.rows(
        """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' ORDER BY 1, 2
        """
    )
    comments = db.rows(
        """
        SELECT c.relname, obj_description(c.oid, 'pg_class')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1
        """
    )
    sequences = db.rows(
        """
        SELECT s.seqrelid::regclass::text, format_type(s.seqtypid, NULL),
               pg_get_serial_sequence(c.relname, 'id')
        FROM pg_sequence s
        JOIN pg_depend d ON d.objid = s.seqrelid AND d.deptype = 'a'
        JOIN pg_class c ON c.oid = d.refobjid
        ORDER BY 1
        """
    )
    return {
        "columns": columns,
        "constraints": constraints,
        "indexes": indexes,
        "comments": comments,
        "sequences": sequences,
    }


def find_postgres_binary(name):
    found = shutil.which(name) or sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not found:
        raise RuntimeError(f"{name} not found: install the PostgreSQL server package")
    return str(found if isinstance(found, str) else found[-1])


class ThrowawayServer:
    """A private PostgreSQL instance with password (scram) authentication, on a Unix socket.

    The shared server trusts every login, so only a server of our own can
    reject a wrong password. It runs as the `postgres` user when we are root.
    """

    PORT = 54329
    PASSWORD = "throwaway-Pa55"

    def __init__(self):
        self.directory = tempfile.mkdtemp(prefix="migrate-test-pg-")
        self.data = os.path.join(self.directory, "data")
        password_file = os.path.join(self.directory, "password")
        Path(password_file).write_text(self.PASSWORD + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            shutil.chown(password_file, "postgres")
        self._as_server_user(
            find_postgres_binary("initdb"),
            "-D",
            self.data,
            "-U",
            "postgres",
            "--auth=scram-sha-256",
            f"--pwfile={password_file}",
        )

    def _as_server_user(self, *command):
        prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def url(self, **changes):
        params = {"host": self.directory, "port": str(self.PORT), "user": "postgres"}
        return make_dsn(**{**params, "dbname": "postgres", **changes})

    def start(self):
        options = f"-p {self.PORT} -k {self.directory} -c listen_addresses=''"
        self._as_server_user(
            find_postgres_binary("pg_ctl"),
            *("-D", self.data, "-o", options, "-l", os.path.join(self.directory, "log")),
            *("-w", "start"),
        )

    def stop(self):
        self._as_server_user(
            find_postgres_binary("pg_ctl"), "-D", self.data, "-m", "fast", "-w", "stop"
        )

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def throwaway_server():
    server = ThrowawayServer()
    server.start()
    yield server
    server.stop()
    server.remove()


def record_ddl(db):
    """Log every DDL command the server starts into audit.ddl_log, via an event trigger."""
    db.rows("CREATE SCHEMA audit")
    db.rows("CREATE TABLE audit.ddl_log (command text, query text)")
    db.rows(
        """
        CREATE FUNCTION audit.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO audit.ddl_log VALUES (tg_tag, current_query()); END $$
        """
    )
    db.rows("CREATE EVENT TRIGGER record_ddl ON ddl_command_start EXECUTE FUNCTION audit.log_ddl()")


def error_line(result):
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def assert_clean_failure(result, expected_text):
    """Exit 2, one error line that says what to do, no traceback, no password."""
    assert result.returncode == migrate.EXIT_ERROR, result.stderr
    assert error_line(result).startswith("migrate: error: ")
    assert expected_text in error_line(result)
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def open_write_transaction(db):
    """A session with an uncommitted insert into request_logs, as a busy gateway has."""
    writer = psycopg2.connect(db.url)
    with writer.cursor() as cursor:
        cursor.execute(
            "INSERT INTO users (username, email, password_hash) VALUES ('w', 'w@x', 'h')"
        )
        cursor.execute("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
        cursor.execute(
            "INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path,"
            " status_code, response_time) SELECT user_id, id, 1, 'm', 'GET', '/', 200, 5 FROM api_keys"
        )
    return writer


def run_in_parallel(db, count, *args, url=None):
    """Start `count` copies of migrate.py at once; returns their exit codes and stderr."""
    environment = {**os.environ, "DATABASE_URL": url or db.url}
    command = [sys.executable, str(HERE / "migrate.py"), *args]
    runs = [
        subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    outputs = [run.communicate(timeout=300)[1] for run in runs]
    return [run.returncode for run in runs], outputs
