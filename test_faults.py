"""
Every way a run can end is an exit code from the documented table, with one line.

0 ok, 1 only for --check finding work or drift, 2 for every error (bad
flags, lost connections, unexpected exceptions), 130/143 for SIGINT/SIGTERM,
which cancel the running statement on the server and roll back.
"""

import os
import signal
import subprocess
import sys

import pytest

import catalog
import migrate
from conftest import (
    HERE,
    assert_clean_failure,
    assert_no_advisory_lock_left,
    has_column,
    open_write_transaction,
    run_migrate,
    wait_for_lock_wait,
)


def wait_for_build_waiting_for_the_writer(db, run):
    """The pid of the run's CREATE INDEX CONCURRENTLY once it waits for the open writer.

    Its first phase has then committed the index, INVALID, to the catalog; a
    statement merely seen active may still be in that phase and leave nothing.
    """
    return wait_for_lock_wait(
        db,
        "migrate.py's CREATE INDEX CONCURRENTLY waits for the open write transaction",
        run=run,
        query="CREATE INDEX CONCURRENTLY%",
        locktype="virtualxid",
    )


# --- Flags ----------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--lock-timeout", "--wait", "--statement-timeout"])
@pytest.mark.parametrize("value", ["nan", "inf", "1e309", "-1", "2147484", "soon"])
def test_bad_seconds_are_refused_at_parsing_with_a_usage_line(flag, value):
    result = run_migrate(None, flag, value)
    assert result.returncode == migrate.EXIT_ERROR
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith(f"migrate: error: argument {flag}:")
    assert "Traceback" not in result.stderr


def test_a_positive_timeout_never_rounds_to_zero_which_means_no_limit():
    assert catalog.milliseconds(0.0001) == 1
    assert catalog.milliseconds(0) == 0


def test_a_tiny_lock_timeout_is_sent_as_one_millisecond(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    result = run_migrate(migrated_db.url, "--dry-run", "--lock-timeout", "0.0001")
    assert "SET lock_timeout = '1ms';" in result.stdout.splitlines()


# --- Output -------------------------------------------------------------------------------


def test_dry_run_into_a_full_device_fails_with_one_line(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [sys.executable, str(HERE / "migrate.py"), "--dry-run"],
            env={**os.environ, "DATABASE_URL": migrated_db.url},
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == migrate.EXIT_ERROR
    assert result.stderr.strip().splitlines()[-1].startswith("migrate: error: cannot write")
    assert "Traceback" not in result.stderr


def test_dry_run_with_nothing_to_do_says_so(migrated_db):
    result = run_migrate(migrated_db.url, "--dry-run")
    assert result.returncode == 0
    assert result.stdout == ""
    assert "nothing to do" in result.stderr


def test_a_run_with_drift_ends_up_to_date_except_the_drift(migrated_db):
    migrated_db.rows("ALTER TABLE users ALTER COLUMN quota SET DEFAULT 5")
    result = run_migrate(migrated_db.url)
    assert result.returncode == 0
    assert (
        result.stderr.strip().splitlines()[-1].endswith("; up to date except 1 drift listed above")
    )


def test_missing_peewee_is_one_line_saying_how_to_install(tmp_path):
    # -S: no site-packages, so neither peewee nor psycopg2 can be imported.
    result = subprocess.run(
        [sys.executable, "-S", str(HERE / "migrate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == migrate.EXIT_ERROR
    assert result.stderr.strip() == (
        "migrate: error: peewee is not installed: pip install -r requirements.txt"
    )


# --- Faults -----------------------------------------------------------------------------------


def test_a_session_terminated_mid_run_is_one_line_naming_it_and_exit_2(migrated_db, start_migrate):
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = open_write_transaction(migrated_db)  # the online build waits for it
    run = start_migrate(migrated_db.url, "--lock-timeout", "60")
    try:
        pid = wait_for_build_waiting_for_the_writer(migrated_db, run)
        migrated_db.rows("SELECT pg_terminate_backend(%s)", pid)
        _, stderr = run.communicate(timeout=60)
    finally:
        writer.rollback()
        writer.close()
    assert run.returncode == migrate.EXIT_ERROR, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("migrate: error: the server ended a session of this run")
    assert "pg_terminate_backend" in last and "server is back" not in last
    assert (
        "index idx_request_logs_model was left INVALID: the next run drops and rebuilds it" in last
    )


@pytest.mark.parametrize("signum, status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_cancels_the_waiting_statement_on_the_server(
    migrated_db, start_migrate, signum, status
):
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = open_write_transaction(migrated_db)
    run = start_migrate(migrated_db.url, "--lock-timeout", "60")
    try:
        pid = wait_for_build_waiting_for_the_writer(migrated_db, run)
        run.send_signal(signum)
        _, stderr = run.communicate(timeout=30)
        still_running = migrated_db.rows(
            "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'", pid
        )
    finally:
        writer.rollback()
        writer.close()
    assert run.returncode == status, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"migrate: error: interrupted by {signal.Signals(signum).name} during the online stage:"
        " index idx_request_logs_model was left INVALID: the next run drops and rebuilds it"
    )
    assert still_running == []
    assert_no_advisory_lock_left(migrated_db)


def test_a_signal_during_the_transaction_rolls_it_back(migrated_db, start_migrate):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    reader = open_write_transaction(migrated_db)  # holds users: the ALTER keeps retrying
    run = start_migrate(migrated_db.url, "--lock-timeout", "60")
    try:
        wait_for_lock_wait(
            migrated_db,
            "migrate.py's transaction waits for its lock on users",
            run=run,
            table="users",
        )
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=30)
    finally:
        reader.rollback()
        reader.close()
    assert run.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == (
        "migrate: error: interrupted by SIGTERM during the transaction stage: nothing was changed"
    )
    assert not has_column(migrated_db, "users", "last_sign_in")


def test_a_byte_that_is_not_utf8_in_database_url_is_one_line_and_exit_2(migrated_db):
    result = run_migrate(migrated_db.url + " application_name=\udcff")
    assert_clean_failure(result, "")
    assert len(result.stderr.strip().splitlines()) <= 2


def test_a_signal_that_arrives_before_the_wait_starts_still_cancels_the_statement(empty_db):
    # The window the handler used to race with: psycopg2 has sent the statement and its
    # wait callback has not started. The handler only records; the wait cancels.
    import psycopg2.extensions

    import connection

    migrate.connect(empty_db.params)
    psycopg2.extensions.set_wait_callback(connection.wait)
    connection.signals_received.append(signal.SIGTERM)
    try:
        with pytest.raises(KeyboardInterrupt):
            migrate.database.execute_sql("SELECT pg_sleep(30)")
    finally:
        psycopg2.extensions.set_wait_callback(None)
        connection.acting_on_signals()
        connection.signals_received.clear()
        connection.watch.signals_handled = 0
        migrate.database.close()
    assert not empty_db.rows(
        "SELECT 1 FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)' AND state = 'active'"
        " AND datname = current_database()"
    )


def test_a_thread_awaits_its_statements_while_the_main_thread_turns_the_wait_callback_off(empty_db):
    # archive's checksum runs on a thread of its own while the main thread's COPY turns the
    # process-wide wait callback off and on: a statement started with the callback on must
    # still await its end ("wait callback not available" failed a retention run).
    import threading

    import psycopg2.extensions

    import connection

    migrate.connect(empty_db.params)
    psycopg2.extensions.set_wait_callback(connection.wait)
    side = connection.open_side_connection(own_thread=True)
    failures, done = [], threading.Event()

    def run_statements():
        try:
            with side.cursor() as cursor:
                for number in range(500):
                    connection.execute_awaited(cursor, "SELECT %s", (number,))
                    assert cursor.fetchone() == (number,)
        except Exception as exc:  # noqa: BLE001 -- checked below, in the test's thread
            failures.append(exc)
        finally:
            done.set()

    runner = threading.Thread(target=run_statements)
    runner.start()
    try:
        while not done.is_set():
            psycopg2.extensions.set_wait_callback(None)
            psycopg2.extensions.set_wait_callback(connection.wait)
    finally:
        runner.join()
        psycopg2.extensions.set_wait_callback(None)
        side.close()
        migrate.database.close()
    assert failures == []


def test_a_statement_awaited_on_another_thread_is_probed_from_the_main_thread(empty_db):
    # The probe's connection is the main thread's: archive's checksum thread used it beside
    # the main thread. Its statement is probed by the main thread while it joins.
    import threading

    import psycopg2.extensions

    import connection

    migrate.connect(empty_db.params)
    psycopg2.extensions.set_wait_callback(connection.wait)
    side = connection.open_side_connection(own_thread=True)
    probes, every = [], connection.watch.probe_every
    connection.watch.probe = lambda probed, elapsed: probes.append(
        (threading.current_thread() is threading.main_thread(), probed)
    )
    connection.watch.probe_every = 0.2

    def sleep_a_second():
        with side.cursor() as cursor:
            connection.execute_awaited(cursor, "SELECT pg_sleep(1)")

    sleeper = threading.Thread(target=sleep_a_second)
    try:
        sleeper.start()
        connection.join_watched(sleeper, side)
    finally:
        connection.watch.probe, connection.watch.probe_every = None, every
        psycopg2.extensions.set_wait_callback(None)
        side.close()
        migrate.database.close()
    assert probes
    assert set(probes) == {(True, side)}


def test_a_probe_refused_for_too_many_connections_names_the_limit_not_a_silent_server(empty_db):
    # The probe watching a long statement (archive's checksum among them) is one connection
    # more: a CONNECTION LIMIT refusing it came from a server that answered, yet the run
    # ended saying the server did not answer (a stopped server, a dead load balancer?).
    import apply
    from conftest import quoted

    role = empty_db.no_create_role  # dropped by the fixture's reset
    empty_db.rows(f"CREATE ROLE {quoted(role)} LOGIN CONNECTION LIMIT 1")
    migrate.connect({**empty_db.params, "user": role})
    apply.watch_queries(0)
    try:
        with pytest.raises(migrate.MigrationError) as refused:
            apply.probe(migrate.database.connection(), 6.0)
    finally:
        apply.stop_watching()
        migrate.database.close()
    assert "too many connections" in str(refused.value)
    assert "did not answer" not in str(refused.value)
