"""
A run is bounded and clean in the environments operators have: servers and paths that stop
answering, session settings that end sessions, any server encoding, outputs that fail, an
--atomic transaction that must not hold ACCESS EXCLUSIVE while it scans, and refusals that
are named for what they are.

No timing assertions: a bound shows as the run ending (with a subprocess timeout far above it)
with the documented line and exit code.
"""

import os
import shutil
import socket
import subprocess
import sys
import threading
from contextlib import contextmanager

import psycopg2
import pytest

import migrate
from conftest import (
    HERE,
    LocalServer,
    assert_clean_failure,
    check_server_tools,
    error_line,
    pgbouncer,
    poll_until,
    quoted,
    record_ddl,
    run_migrate,
    scoped_name,
    server_binary_folders,
    skip_for,
    wait_for_lock_wait,
)
from test_migrate import assert_contract_catalog
from test_online import accepts_connections, add_users_and_logs, session, transaction_pooler  # noqa: F401

# --- Servers and paths that stop answering -------------------------------------------------


@contextmanager
def silent_listener():
    """A TCP port that accepts connections and never answers: a stopped postmaster, a dead
    load balancer. Yields the port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    accepted = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        server.close()


class FreezingProxy:
    """A TCP proxy to the database server that forwards until freeze(), then holds every
    connection open and forwards nothing, new connections included: a half-open path."""

    def __init__(self, host, port):
        self.target = (host, int(port))
        self.frozen = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.frozen.is_set():
                continue
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self.forward, args=(source, sink), daemon=True).start()

    def forward(self, source, sink):
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if self.frozen.is_set():
                self.frozen.wait()  # hold it forever: the bytes never arrive
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def freeze(self):
        self.frozen.set()

    def close(self):
        self.listener.close()
        for connection in self.sockets:
            connection.close()


def test_a_server_that_accepts_and_never_answers_ends_the_run_with_one_line(empty_db):
    with silent_listener() as port:
        result = run_migrate(
            f"host=127.0.0.1 port={port} user=postgres dbname=x",
            "--wait",
            "3",
            "--lock-timeout",
            "2",
        )
    assert_clean_failure(result, "the server did not answer a connection attempt within 5 s")
    assert f"at host=127.0.0.1 port={port}" in error_line(result)


def test_connect_timeout_in_database_url_bounds_each_attempt(empty_db):
    with silent_listener() as port:
        result = run_migrate(f"host=127.0.0.1 port={port} user=postgres dbname=x connect_timeout=2")
    assert_clean_failure(result, "did not answer a connection attempt within 2 s")


def test_a_path_that_freezes_mid_statement_ends_the_run_with_one_line(migrated_db, start_migrate):
    add_users_and_logs(migrated_db, logs=1000)
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = session(
        migrated_db,
        "INSERT INTO request_logs (user_id, api_key_id, api_config_id,"
        " model, method, path, status_code, response_time) SELECT user_id, id, 1,"
        " 'm', 'GET', '/', 200, 5 FROM api_keys",
    )  # the online build waits for it
    params = migrated_db.params
    proxy = FreezingProxy(params.get("host", "localhost"), params.get("port", 5432))
    url = migrated_db.url_with(host="127.0.0.1", port=str(proxy.port))
    run = start_migrate(url, "--lock-timeout", "600")
    try:
        wait_for_online_build_behind_writer(migrated_db, run)
        proxy.freeze()
        _, stderr = run.communicate(timeout=120)
    finally:
        run.kill()
        writer.rollback()
        writer.close()
        migrated_db.rows(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'migrate.py' AND datname = current_database()"
        )
        proxy.close()
    assert run.returncode == migrate.EXIT_ERROR, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("migrate: error: the server did not answer"), stderr
    assert "Traceback" not in stderr


# --- Session settings that end sessions ------------------------------------------------------


def wait_for_online_build_behind_writer(db, run):
    """Until migrate.py's CREATE INDEX CONCURRENTLY waits for a writer's transaction to end."""
    wait_for_lock_wait(
        db,
        "migrate.py's online build waits for the writer",
        run=run,
        query="CREATE INDEX CONCURRENTLY%",
        locktype="virtualxid",
    )


def with_setting(db, how, name, value, database_setting=None):
    """(DATABASE_URL, environment) for migrate.py with a session setting given by the
    connection's options, PGOPTIONS or the database."""
    if how == "options":
        return db.url_with(options=f"-c {name}={value}"), {}
    if how == "PGOPTIONS":
        return db.url, {"PGOPTIONS": f"-c {name}={value}"}
    database_setting(name, f"'{value}'")
    return db.url, {}


def run_with_setting(db, how, name, value, *args, database_setting=None):
    """migrate.py with a session setting given by the connection's options, PGOPTIONS or the database."""
    url, environment = with_setting(db, how, name, value, database_setting)
    return run_migrate(url, *args, **environment)


def migrate_session_idle_for(db, state, seconds):
    """Whether a migrate.py session of this database has been in `state` for `seconds`."""
    return db.value(
        "SELECT count(*) > 0 FROM pg_stat_activity WHERE datname = current_database()"
        " AND application_name = 'migrate.py' AND state = %s"
        " AND now() - state_change > make_interval(secs => %s)",
        state,
        seconds,
    )


SOURCES = ["options", "PGOPTIONS", "database"]


@pytest.mark.parametrize("how", SOURCES)
def test_transaction_timeout_of_the_session_does_not_kill_an_online_build(
    migrated_db, pg_server, database_setting, how
):
    if pg_server.major < 17:
        pytest.skip("transaction_timeout exists from PostgreSQL 17")
    add_users_and_logs(migrated_db, logs=300_000)
    migrated_db.rows("DROP INDEX idx_request_logs_model, idx_request_logs_model_created")

    result = run_with_setting(
        migrated_db, how, "transaction_timeout", "100ms", database_setting=database_setting
    )

    assert result.returncode == 0, result.stderr
    assert migrated_db.value(
        "SELECT bool_and(indisvalid) FROM pg_index WHERE indexrelid::regclass::text LIKE 'idx_request_logs_model%'"
    )


@pytest.mark.parametrize("how", SOURCES)
def test_idle_session_timeout_does_not_end_the_run_while_it_backs_off(
    migrated_db, database_setting, start_migrate, how
):
    migrated_db.rows("ALTER TABLE api_keys DROP COLUMN last_used_at")
    holder = session(migrated_db, "LOCK TABLE api_keys IN ACCESS SHARE MODE")
    url, environment = with_setting(
        migrated_db, how, "idle_session_timeout", "300ms", database_setting
    )
    run = start_migrate(url, "--lock-timeout", "60", **environment)
    try:
        # Backing off between lock attempts, the run's session idles past the timeout.
        poll_until(
            "migrate.py's session idles 0.6 s (twice idle_session_timeout) between attempts",
            lambda: run.poll() is None and migrate_session_idle_for(migrated_db, "idle", 0.6),
        )
    finally:
        holder.rollback()
        holder.close()
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "migrate: added column api_keys.last_used_at" in stderr


@pytest.mark.parametrize("how", SOURCES)
def test_idle_in_transaction_timeout_does_not_end_the_migration_locks_session(
    migrated_db, database_setting, start_migrate, how
):
    add_users_and_logs(migrated_db, logs=10)
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = session(migrated_db, "UPDATE request_logs SET tokens_used = 1 WHERE id = 1")
    url, environment = with_setting(
        migrated_db, how, "idle_in_transaction_session_timeout", "200ms", database_setting
    )
    run = start_migrate(url, **environment)
    try:
        # While the online build waits for the writer, the lock's session idles in its transaction.
        wait_for_online_build_behind_writer(migrated_db, run)
        poll_until(
            "the migration lock's session idles in transaction 0.6 s (three times the timeout)",
            lambda: migrate_session_idle_for(migrated_db, "idle in transaction", 0.6),
        )
    finally:
        writer.rollback()
        writer.close()
    _, stderr = run.communicate(timeout=120)
    assert run.returncode == 0, stderr
    assert "migrate: created index idx_request_logs_model" in stderr


# --- Any encoding ------------------------------------------------------------------------------


@contextmanager
def database_in_encoding(db, encoding, name_bytes, client_encoding):
    """A database of the server in `encoding` (named after the test database) holding a table
    of another application whose name is `name_bytes`, written by a client in client_encoding."""
    name = scoped_name(db.name, encoding.lower())
    db.rows(f"DROP DATABASE IF EXISTS {quoted(name)}")
    db.rows(
        f"CREATE DATABASE {quoted(name)} ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C'"
        " TEMPLATE template0"
    )
    url = db.url_with(dbname=name)
    try:
        with (
            psycopg2.connect(url, client_encoding=client_encoding) as connection,
            connection.cursor() as cursor,
        ):
            # Quoted here: psycopg2's sql.Identifier escapes the name as UTF-8 whatever the encoding.
            name_text = name_bytes.decode(client_encoding.replace("SQL_ASCII", "latin-1"))
            cursor.execute('CREATE TABLE "' + name_text + '" (id int)')
        connection.close()
        yield url
    finally:
        db.rows("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", name)
        db.rows(f"DROP DATABASE IF EXISTS {quoted(name)}")


@pytest.mark.parametrize(
    ("encoding", "name_bytes", "client", "shown"),
    [
        ("SQL_ASCII", b"caf\xe9", "LATIN1", 'table "caf\\xe9"'),  # not valid UTF-8
        ("LATIN1", "café".encode("latin-1"), "LATIN1", 'table "café"'),
        ("EUC_JP", "日本".encode("euc_jp"), "EUC_JP", 'table "日本"'),
    ],
)
def test_every_mode_works_on_a_server_encoding_with_names_of_other_applications(
    empty_db, encoding, name_bytes, client, shown
):
    with database_in_encoding(empty_db, encoding, name_bytes, client) as url:
        run = run_migrate(url)
        check = run_migrate(url, "--check")
        dry_run = run_migrate(url, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert check.returncode == migrate.EXIT_OK, check.stderr
    assert dry_run.returncode == 0, dry_run.stderr
    assert f"--   {shown}" in check.stdout.splitlines()
    assert f"migrate: not in the models, left alone: {shown}" in run.stderr.splitlines()


# --- Output failures -------------------------------------------------------------------------


def run_with_stdout(stdout, *args, url=None):
    return subprocess.run(
        [sys.executable, str(HERE / "migrate.py"), *args],
        env={**os.environ, **({"DATABASE_URL": url} if url else {})},
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


def assert_one_error_line(result, text):
    assert result.returncode == migrate.EXIT_ERROR, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"migrate: error: {text}"), result.stderr


def test_sql_into_a_full_disk_is_one_error_line():
    with open("/dev/full", "w") as full:
        result = run_with_stdout(full, "--sql")
    assert_one_error_line(result, "cannot write the output (stdout: No space left on device)")


def test_sql_into_a_closed_pipe_is_one_error_line():
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        result = run_with_stdout(write_end, "--sql")
    finally:
        os.close(write_end)
    assert_one_error_line(result, "cannot write the output (stdout: Broken pipe)")


def run_with_closed_stdout(db, *args):
    command = " ".join([sys.executable, str(HERE / "migrate.py"), *args])
    return subprocess.run(
        ["bash", "-c", f"exec {command} >&-"],
        env={**os.environ, "DATABASE_URL": db.url},
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_with_a_closed_stdout_and_nothing_to_print_succeeds(migrated_db):
    result = run_with_closed_stdout(migrated_db, "--check")
    assert result.returncode == migrate.EXIT_OK, result.stderr
    assert result.stderr.splitlines()[-1].startswith("migrate: the database matches the models")


@pytest.mark.parametrize("args", [["--sql"], ["--help"]])
def test_a_closed_stdout_is_one_error_line(migrated_db, args):
    result = run_with_closed_stdout(migrated_db, *args)
    assert result.returncode == migrate.EXIT_ERROR, result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "migrate: error: cannot write the output (stdout is closed)"
    )
    assert "Traceback" not in result.stderr


def test_a_closed_stdout_with_something_to_print_is_one_error_line(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    result = subprocess.run(
        ["bash", "-c", f"exec {sys.executable} {HERE / 'migrate.py'} --check >&-"],
        env={**os.environ, "DATABASE_URL": migrated_db.url},
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == migrate.EXIT_ERROR, result.stderr
    assert (
        result.stderr.strip().splitlines()[-1]
        == "migrate: error: cannot write the output (stdout is closed)"
    )


@pytest.mark.parametrize("reltuples", ["Infinity", "-1", "NaN"])
def test_odd_row_estimates_are_shown_as_unknown(migrated_db, reltuples):
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    migrated_db.rows(
        "UPDATE pg_class SET reltuples = %s::real WHERE oid = 'request_logs'::regclass", reltuples
    )
    for args in (["--dry-run"], ["--check", "--format", "json"]):
        result = run_migrate(migrated_db.url, *args)
        assert result.returncode in (0, 1), result.stderr
        assert "Traceback" not in result.stderr
    assert (
        "request_logs ~? rows (not analyzed yet)"
        in run_migrate(migrated_db.url, "--dry-run").stdout
    )


# --- --atomic holds ACCESS EXCLUSIVE last --------------------------------------------------


def test_atomic_runs_scans_before_the_statements_that_take_access_exclusive(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    migrated_db.rows("DROP INDEX idx_request_logs_model, idx_request_logs_status_code")
    record_ddl(migrated_db)

    dry_run = run_migrate(migrated_db.url, "--atomic", "--dry-run")
    result = run_migrate(migrated_db.url, "--atomic")

    assert result.returncode == 0, result.stderr
    executed = [query for (query,) in migrated_db.rows("SELECT query FROM audit.ddl_log")]
    assert [query.split(" ")[0:3] for query in executed] == [
        ["CREATE", "INDEX", '"idx_request_logs_model"'],
        ["CREATE", "INDEX", '"idx_request_logs_status_code"'],
        ["ALTER", "TABLE", '"users"'],
    ]
    printed = [line for line in dry_run.stdout.splitlines() if line.startswith(("CREATE", "ALTER"))]
    assert printed == [query + ";" for query in executed]
    assert (
        "-- locks users ACCESS EXCLUSIVE (blocks reads and writes until COMMIT);" in dry_run.stdout
    )


# --- Right words ------------------------------------------------------------------------------


def test_a_role_read_only_default_is_named_not_called_a_standby(empty_db):
    result = run_migrate(empty_db.url_with(options="-c default_transaction_read_only=on"))
    assert_clean_failure(
        result, "default_transaction_read_only is on, set by the connection's options"
    )
    assert "standby" not in result.stderr


@pytest.fixture(scope="module")
def standby_server():
    """A primary of our own and a hot standby streaming from it; yields the standby's URL."""
    folders = server_binary_folders()
    folder = next((f for f in folders.values() if (f / "pg_basebackup").exists()), None)
    problem = check_server_tools(folder)
    if problem:
        skip_for(problem)
    primary = LocalServer(folder)
    primary.start()
    standby = LocalServer(folder)
    shutil.rmtree(standby.data)
    standby._as_server_user(
        "pg_basebackup",
        "-D",
        standby.data,
        "-R",
        "-h",
        "127.0.0.1",
        "-p",
        str(primary.port),
        "-U",
        "postgres",
        "-X",
        "stream",
    )
    standby.start()
    yield standby.url(dbname="postgres")
    standby.stop()
    primary.stop()
    standby.remove()
    primary.remove()


def test_a_standby_is_told_apart_from_a_read_only_default(standby_server):
    result = run_migrate(standby_server)
    assert_clean_failure(
        result, "the server is a standby (in recovery): point DATABASE_URL at the primary"
    )


def test_an_event_trigger_that_rejects_a_build_promises_no_repair(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    migrated_db.rows(
        "CREATE FUNCTION no_indexes() RETURNS event_trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'indexes are built by the DBA'; END $$"
    )
    migrated_db.rows(
        "CREATE EVENT TRIGGER no_indexes ON ddl_command_start WHEN TAG IN ('CREATE INDEX')"
        " EXECUTE FUNCTION no_indexes()"
    )

    result = run_migrate(migrated_db.url)

    assert_clean_failure(result, "building index idx_users_status was rejected: an event trigger")
    assert "indexes are built by the DBA" in error_line(result)
    assert "the next run meets the same refusal until that changes" in error_line(result)
    assert "INVALID" not in error_line(result).replace("was not left behind", "")


def test_an_event_trigger_that_rejects_the_transaction_says_nothing_was_changed(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    migrated_db.rows(
        "CREATE FUNCTION no_alters() RETURNS event_trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'no ALTER today'; END $$"
    )
    migrated_db.rows(
        "CREATE EVENT TRIGGER no_alters ON ddl_command_start WHEN TAG IN ('ALTER TABLE')"
        " EXECUTE FUNCTION no_alters()"
    )
    result = run_migrate(migrated_db.url)
    assert_clean_failure(
        result, "rejected: an event trigger or function raised an error (no ALTER today)"
    )
    assert "nothing was changed; the next run meets the same refusal" in error_line(result)


def test_statement_pooling_is_named_like_transaction_pooling(migrated_db):
    with pgbouncer(migrated_db, "statement") as url:
        result = run_migrate(url)
    assert_clean_failure(result, "DATABASE_URL goes through a statement pooler")


def test_an_unknown_service_names_the_service_and_the_files_libpq_read(tmp_path):
    service_file = tmp_path / "services.conf"
    service_file.write_text("[other]\nhost=localhost\n")
    result = run_migrate("service=nosuch", PGSERVICEFILE=str(service_file))
    assert_clean_failure(result, 'definition of service "nosuch" not found')
    assert f"libpq reads {service_file} (PGSERVICEFILE)" in error_line(result)
    assert "host=localhost" not in error_line(result)


# --- Found by trying to break it -------------------------------------------------------------


def test_a_pipe_closed_part_way_with_unbuffered_output_is_one_error_line(migrated_db):
    # Far more output than a pipe holds (64 KiB), with long names.
    migrated_db.rows(
        "DO $$ BEGIN FOR n IN 1..1000 LOOP EXECUTE format('CREATE TABLE %I (id int)',"
        " 'another_application_table_with_a_long_name_' || n); END LOOP; END $$"
    )
    result = subprocess.run(
        [
            "bash",
            "-c",
            f"{sys.executable} {HERE / 'migrate.py'} --check --format json | head -c 10 >/dev/null; exit ${{PIPESTATUS[0]}}",
        ],
        env={**os.environ, "DATABASE_URL": migrated_db.url, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == migrate.EXIT_ERROR, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "migrate: error: cannot write the output (stdout: Broken pipe)"
    )


def test_a_closed_stderr_is_exit_2_and_changes_nothing(empty_db):
    result = subprocess.run(
        ["bash", "-c", f"exec {sys.executable} {HERE / 'migrate.py'} 2>&-"],
        env={**os.environ, "DATABASE_URL": empty_db.url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == migrate.EXIT_ERROR
    assert empty_db.tables() == []


@pytest.mark.parametrize("milliseconds", ["1", "5"])
def test_a_role_statement_timeout_of_a_few_milliseconds_does_not_stop_the_run(
    empty_db, milliseconds
):
    result = run_migrate(empty_db.url, PGOPTIONS=f"-c statement_timeout={milliseconds}")
    assert result.returncode == 0, result.stderr
    assert_contract_catalog(empty_db)


def test_a_fix_naming_bytes_of_a_sql_ascii_database_is_commented_out(empty_db):
    with database_in_encoding(empty_db, "SQL_ASCII", b"caf\xe9", "LATIN1") as url:
        assert run_migrate(url).returncode == 0
        with (
            psycopg2.connect(url, client_encoding="LATIN1") as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute('ALTER TABLE users ADD COLUMN "caf\xe9" int NOT NULL')
        connection.close()
        check = run_migrate(url, "--check")
    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert (
        '-- ALTER TABLE "users" ALTER COLUMN U&"caf\\00E9" DROP NOT NULL;'
        in check.stdout.splitlines()
    )


def test_retention_days_beyond_a_century_are_a_usage_error():
    result = run_migrate(None, "--retain-request-logs", "1000000")
    assert result.returncode == migrate.EXIT_ERROR
    assert "from 1 to 36,500" in result.stderr


def test_retention_with_nothing_old_says_so(migrated_db):
    result = run_migrate(migrated_db.url, "--retain-request-logs", "30")
    assert result.returncode == 0
    assert result.stderr.strip().splitlines()[-1].startswith("migrate: nothing older than 30 days")
