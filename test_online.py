"""
A run never stalls the gateway and never hangs, whatever the application holds.

Lock waits come in short attempts within the --lock-timeout budget and end
by naming the blocking session; foreign keys are added NOT VALID and
validated online; a no-op run waits for no table; an index another session
is building is left to it; a transaction pooler is refused for the online
stage; statement_timeout is explicit; --dry-run names each statement's lock
and is clean under squawk. The figures (how long writers wait) are in
bench.py, section 8, not here.
"""

import os
import shutil
import socket
import subprocess
import threading

import psycopg2
import pytest

import apply
from conftest import (
    BUDGET_BOUND,
    HERE,
    assert_clean_failure,
    assert_no_advisory_lock_left,
    error_line,
    has_column,
    open_write_transaction,
    pgbouncer,
    poll_until,
    record_ddl,
    run_in_parallel,
    run_migrate,
    run_migrate_timed,
    skip_missing_tool,
    wait_for_lock_wait,
)
from test_migrate import assert_contract_catalog


def session(db, *statements):
    """Another client: a connection with an open transaction that ran `statements`."""
    connection = psycopg2.connect(db.url)
    with connection.cursor() as cursor:
        for statement in statements:
            cursor.execute(statement)
    return connection


def run_until_it_waits_then_end(start_migrate, db, holder, table, *args):
    """Run migrate.py with `args`; once it waits for its lock on `table`, end the holder's
    transaction. Returns (exit code, stdout, stderr): the run must have waited, then gone on."""
    run = start_migrate(db.url, *args)
    try:
        wait_for_lock_wait(db, f"migrate.py waits for a lock on {table}", run=run, table=table)
    finally:
        holder.rollback()
        holder.close()
    stdout, stderr = run.communicate(timeout=120)
    return run.returncode, stdout, stderr


def add_users_and_logs(db, logs=1000):
    db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'u@x', 'h')")
    db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k-logs', 'n' FROM users")
    db.rows(
        "INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path,"
        " status_code, response_time) SELECT k.user_id, k.id, 1, 'm' || g % 10, 'POST', '/', 200, 5"
        f" FROM generate_series(1, {logs}) g, api_keys k"
    )


def foreign_key_validated(db, name):
    return db.value("SELECT convalidated FROM pg_constraint WHERE conname = %s", name)


# --- Foreign keys: NOT VALID, then VALIDATE online ------------------------------------


def test_missing_foreign_key_is_added_not_valid_then_validated_after_the_commit(migrated_db):
    add_users_and_logs(migrated_db)
    migrated_db.rows("ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user")
    record_ddl(migrated_db)

    result = run_migrate(migrated_db.url)

    assert result.returncode == 0, result.stderr
    executed = [query for (query,) in migrated_db.rows("SELECT query FROM audit.ddl_log")]
    assert executed == [
        (
            'ALTER TABLE "request_logs" ADD CONSTRAINT "fk_request_logs_user" FOREIGN KEY ("user_id")'
            ' REFERENCES "users" ("id") NOT VALID'
        ),
        'ALTER TABLE "request_logs" VALIDATE CONSTRAINT "fk_request_logs_user"',
    ]
    assert foreign_key_validated(migrated_db, "fk_request_logs_user")
    assert_contract_catalog(migrated_db)


def test_not_valid_foreign_key_left_by_an_interrupted_run_is_pending_for_check(migrated_db):
    migrated_db.rows("ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user")
    migrated_db.rows(
        "ALTER TABLE api_keys ADD CONSTRAINT fk_api_keys_user FOREIGN KEY (user_id)"
        " REFERENCES users (id) NOT VALID"
    )
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == 1, result.stderr
    assert 'ALTER TABLE "api_keys" VALIDATE CONSTRAINT "fk_api_keys_user";' in result.stdout
    assert "-- drift" not in result.stdout


def test_not_valid_foreign_key_left_by_an_interrupted_run_is_validated_by_the_next(migrated_db):
    migrated_db.rows("ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user")
    migrated_db.rows(
        "ALTER TABLE api_keys ADD CONSTRAINT fk_api_keys_user FOREIGN KEY (user_id)"
        " REFERENCES users (id) NOT VALID"
    )
    result = run_migrate(migrated_db.url)
    assert result.returncode == 0, result.stderr
    assert "migrate: validated foreign key fk_api_keys_user" in result.stderr
    assert foreign_key_validated(migrated_db, "fk_api_keys_user")


def test_atomic_adds_a_missing_foreign_key_checked_inside_the_transaction(migrated_db):
    migrated_db.rows("ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user")
    record_ddl(migrated_db)
    assert run_migrate(migrated_db.url, "--atomic").returncode == 0
    executed = [query for (query,) in migrated_db.rows("SELECT query FROM audit.ddl_log")]
    assert executed == [
        (
            'ALTER TABLE "request_logs" ADD CONSTRAINT "fk_request_logs_user" FOREIGN KEY ("user_id")'
            ' REFERENCES "users" ("id")'
        )
    ]


def test_foreign_key_whose_rows_do_not_match_fails_online_and_stays_not_valid(migrated_db):
    add_users_and_logs(migrated_db, logs=3)
    migrated_db.rows("ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user")
    migrated_db.rows("UPDATE request_logs SET user_id = 999 WHERE id = 1")

    result = run_migrate(migrated_db.url)

    assert_clean_failure(result, "validating foreign key fk_request_logs_user failed")
    assert "the transaction was committed" in result.stderr
    assert foreign_key_validated(migrated_db, "fk_request_logs_user") is False


# --- Lock waits: short attempts within a budget, then the blocker named ----------------


@pytest.mark.parametrize("budget", ["60", "0"])  # 0: no limit
def test_a_waiting_alter_retries_until_a_long_reader_ends_and_then_succeeds(
    migrated_db, start_migrate, budget
):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    reader = session(migrated_db, "SELECT count(*) FROM users")

    status, _, stderr = run_until_it_waits_then_end(
        start_migrate, migrated_db, reader, "users", "--lock-timeout", budget
    )

    assert status == 0, stderr
    assert "migrate: added column users.last_sign_in" in stderr


def test_a_reader_holding_the_table_past_the_budget_is_named_and_nothing_changes(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    reader = session(migrated_db, "SELECT count(*) FROM users")
    try:
        result, seconds = run_migrate_timed(migrated_db.url, "--lock-timeout", "0.5")
        assert seconds < BUDGET_BOUND, seconds
        assert_clean_failure(result, "users stayed locked for the whole --lock-timeout of 0.5 s")
        assert f"pid {reader.get_backend_pid()} (" in result.stderr
        assert "idle in transaction" in result.stderr
        assert "holds ACCESS SHARE on users" in result.stderr
        assert "nothing was changed" in result.stderr
    finally:
        reader.rollback()
        reader.close()
    assert not has_column(migrated_db, "users", "last_sign_in")


def test_no_op_run_beside_an_access_exclusive_holder_finishes_once_it_lets_go(
    migrated_db, start_migrate
):
    holder = session(migrated_db, "LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
    status, _, stderr = run_until_it_waits_then_end(
        start_migrate, migrated_db, holder, "api_keys", "--lock-timeout", "60"
    )
    assert status == 0, stderr
    assert "schema is up to date" in stderr


def test_no_op_run_beside_an_access_exclusive_holder_fails_within_the_budget_naming_it(migrated_db):
    holder = session(migrated_db, "LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
    try:
        result, seconds = run_migrate_timed(migrated_db.url, "--lock-timeout", "0.5")
        assert seconds < BUDGET_BOUND, seconds
        assert_clean_failure(result, "stayed locked for the whole --lock-timeout of 0.5 s")
        assert f"pid {holder.get_backend_pid()} (" in result.stderr
        assert "holds ACCESS EXCLUSIVE on api_keys" in result.stderr
    finally:
        holder.rollback()
        holder.close()


def test_a_role_lock_timeout_does_not_apply_to_the_runs_own_waits(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    url = migrated_db.url_with(options="-c lock_timeout=1ms")
    statuses, outputs = run_in_parallel(migrated_db, 8, url=url)
    assert statuses == [0] * 8, outputs
    assert sum(output.count("added column users.last_sign_in") for output in outputs) == 1


# --- The migration lock --------------------------------------------------------------------


def test_waiting_for_another_runs_migration_lock_ends_within_the_budget_naming_it(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    other_run = session(migrated_db, f"SELECT pg_advisory_xact_lock({apply.MIGRATION_LOCK_KEY})")
    try:
        result, seconds = run_migrate_timed(migrated_db.url, "--lock-timeout", "0.5")
        assert seconds < BUDGET_BOUND, seconds
        assert_clean_failure(result, "another migrate.py run held the migration lock")
        assert f"pid {other_run.get_backend_pid()} (" in result.stderr
        assert "waiting for the migration lock, held by pid" in result.stderr
    finally:
        other_run.rollback()
        other_run.close()


def test_with_no_lock_budget_a_run_waits_for_another_runs_migration_lock(
    migrated_db, start_migrate
):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    other_run = session(migrated_db, f"SELECT pg_advisory_xact_lock({apply.MIGRATION_LOCK_KEY})")
    try:
        run = start_migrate(migrated_db.url, "--lock-timeout", "0")
        poll_until(
            "migrate.py has waited a second for the migration lock, or ended",
            lambda: (
                run.poll() is not None
                or migrated_db.value(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'migrate.py'"
                    " AND datname = current_database() AND now() - backend_start > interval '1 s'"
                )
            ),
        )
    finally:
        other_run.rollback()
        other_run.close()
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    assert has_column(migrated_db, "users", "last_sign_in")


def test_a_run_leaves_no_advisory_lock_behind(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    assert run_migrate(migrated_db.url).returncode == 0
    assert index_is_valid(migrated_db, "idx_users_status")
    assert_no_advisory_lock_left(migrated_db)


# --- Indexes another session is building -----------------------------------------------------


def test_an_index_another_session_is_still_building_is_left_to_it(migrated_db):
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    # An open write makes the other session's build wait, INVALID, in its first phase.
    writer = open_write_transaction(migrated_db)
    builder = psycopg2.connect(migrated_db.url_with(application_name="other-builder"))
    builder.autocommit = True
    build = threading.Thread(
        target=builder.cursor().execute,
        args=('CREATE INDEX CONCURRENTLY "idx_request_logs_model" ON "request_logs" ("model")',),
    )
    build.start()
    try:
        # Waiting for the writer, the build has committed its INVALID index to the catalog.
        wait_for_lock_wait(
            migrated_db,
            "the other session's CREATE INDEX CONCURRENTLY waits for the open writer",
            application="other-builder",
            query="CREATE INDEX CONCURRENTLY%",
            locktype="virtualxid",
        )

        check = run_migrate(migrated_db.url, "--check")
        result = run_migrate(migrated_db.url)

        assert check.returncode == 1
        assert "idx_request_logs_model is being built by another session" in check.stdout
        assert result.returncode == 0, result.stderr
        assert "left to another session: index idx_request_logs_model" in result.stderr
        assert "dropped invalid index" not in result.stderr
    finally:
        writer.rollback()
        writer.close()
        build.join(timeout=60)
        builder.close()
    assert migrated_db.value(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_request_logs_model'::regclass"
    )


# --- statement_timeout ----------------------------------------------------------------------------


def test_a_role_statement_timeout_does_not_cancel_an_online_build(migrated_db):
    add_users_and_logs(migrated_db, logs=200_000)
    migrated_db.rows("DROP INDEX idx_request_logs_model_created")
    result = run_migrate(migrated_db.url_with(options="-c statement_timeout=20ms"))
    assert result.returncode == 0, result.stderr
    assert_contract_catalog(migrated_db)


def test_statement_timeout_option_stops_a_build_and_names_itself(migrated_db):
    add_users_and_logs(migrated_db, logs=200_000)
    migrated_db.rows("DROP INDEX idx_request_logs_model_created")
    result = run_migrate(migrated_db.url, "--statement-timeout", "0.001")
    assert_clean_failure(result, "ran longer than the --statement-timeout of 0.001 s")
    assert "raise --statement-timeout, or 0 for no limit" in result.stderr


def index_is_valid(db, name):
    return db.value(
        "SELECT bool_or(indisvalid) FROM pg_index WHERE indexrelid::regclass::text = %s", name
    )


def test_an_online_build_waiting_for_an_open_writer_gives_up_within_the_lock_timeout(migrated_db):
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = open_write_transaction(migrated_db)
    try:
        result, seconds = run_migrate_timed(migrated_db.url, "--lock-timeout", "0.5")
    finally:
        writer.rollback()
        writer.close()
    assert seconds < BUDGET_BOUND, seconds
    assert_clean_failure(result, "waited more than the --lock-timeout of 0.5 s")
    assert not index_is_valid(migrated_db, "idx_request_logs_model")


def test_a_build_that_waits_two_seconds_finishes_within_budgets_of_ten(migrated_db, start_migrate):
    # Both budgets are what the statement gets on the server: one ten times too short fails.
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = open_write_transaction(migrated_db)
    run = start_migrate(
        migrated_db.url, "--lock-timeout", "10", "--statement-timeout", "10", "--progress", "0"
    )
    try:
        pid = wait_for_lock_wait(
            migrated_db, "the build waits for the writer", run=run, locktype="virtualxid"
        )
        poll_until(
            "the build has waited two seconds",
            lambda: migrated_db.value(
                "SELECT now() - state_change > interval '2 s' AND wait_event_type = 'Lock'"
                " FROM pg_stat_activity WHERE pid = %s",
                pid,
            ),
        )
    finally:
        writer.rollback()
        writer.close()
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 0, stderr
    assert index_is_valid(migrated_db, "idx_request_logs_model")


def test_statement_timeout_option_ends_a_waiting_build_within_its_time(migrated_db):
    # With no lock budget the build waits for the open writer until statement_timeout ends it.
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    writer = open_write_transaction(migrated_db)
    try:
        result, seconds = run_migrate_timed(
            migrated_db.url, "--lock-timeout", "0", "--statement-timeout", "0.5"
        )
    finally:
        writer.rollback()
        writer.close()
    assert seconds < BUDGET_BOUND, seconds
    assert_clean_failure(result, "ran longer than the --statement-timeout of 0.5 s")
    assert not index_is_valid(migrated_db, "idx_request_logs_model")


# --- Hazards in --dry-run and --check, and squawk -----------------------------------------------


def break_three_ways(db):
    db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    db.rows("ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user")
    db.rows("DROP INDEX idx_request_logs_model_created")


def test_dry_run_names_the_lock_of_each_statement_what_it_blocks_and_the_rows(migrated_db):
    add_users_and_logs(migrated_db, logs=5000)
    migrated_db.rows("ANALYZE")
    break_three_ways(migrated_db)
    lines = run_migrate(migrated_db.url, "--dry-run").stdout.splitlines()

    def hazard_of(statement_start):
        index = next(i for i, line in enumerate(lines) if line.startswith(statement_start))
        return lines[index - 1]

    assert hazard_of('ALTER TABLE "users" ADD COLUMN') == (
        "-- locks users ACCESS EXCLUSIVE (blocks reads and writes until COMMIT); instant, no rewrite; users ~1 rows"
    )
    assert hazard_of('ALTER TABLE "request_logs" ADD CONSTRAINT').startswith(
        "-- locks request_logs, users SHARE ROW EXCLUSIVE (blocks writes until COMMIT); instant, no scan;"
    )
    assert hazard_of('ALTER TABLE "request_logs" VALIDATE').startswith(
        "-- locks request_logs SHARE UPDATE EXCLUSIVE (blocks nothing); also locks users ROW SHARE;"
        " scans the table;"
    )
    assert hazard_of("CREATE INDEX CONCURRENTLY").endswith("request_logs ~5,000 rows")


def test_dry_run_locks_a_referenced_table_only_when_it_exists_before_the_run(empty_db):
    def hazard_of(lines, statement_start):
        index = next(i for i, line in enumerate(lines) if line.startswith(statement_start))
        return lines[index - 1]

    fresh = run_migrate(empty_db.url, "--dry-run").stdout.splitlines()
    empty_db.rows(
        "CREATE TABLE users (id bigserial PRIMARY KEY, created_at timestamptz,"
        " updated_at timestamptz, deleted_at timestamptz, username varchar(255) NOT NULL,"
        " email varchar(255) NOT NULL, password_hash varchar(255) NOT NULL,"
        " quota bigint NOT NULL DEFAULT 10000, used_quota bigint NOT NULL DEFAULT 0,"
        " is_admin boolean NOT NULL DEFAULT false, status varchar(50) NOT NULL DEFAULT 'active',"
        " last_sign_in timestamptz)"
    )
    with_users = run_migrate(empty_db.url, "--dry-run").stdout.splitlines()

    assert hazard_of(fresh, 'CREATE TABLE "api_keys"') == (
        "-- a table made in this transaction: blocks nothing"
    )  # users is made earlier in the same transaction
    assert hazard_of(with_users, 'CREATE TABLE "api_keys"').startswith(
        "-- locks users SHARE ROW EXCLUSIVE (blocks writes until COMMIT)"
    )
    assert hazard_of(with_users, 'CREATE TABLE "request_logs"').startswith(
        "-- locks users SHARE ROW EXCLUSIVE"
    )  # not api_keys, made in the same transaction


def test_check_prints_the_hazard_of_each_pending_statement(migrated_db):
    break_three_ways(migrated_db)
    report = run_migrate(migrated_db.url, "--check").stdout
    assert "-- locks users ACCESS EXCLUSIVE (blocks reads and writes until COMMIT)" in report
    assert "-- pending, online after the transaction (one statement at a time):" in report


def test_dry_run_output_on_a_live_database_is_squawk_clean(migrated_db, tmp_path):
    squawk = shutil.which("squawk") or shutil.which(
        "squawk", path=os.path.dirname(os.sys.executable)
    )
    if squawk is None:
        skip_missing_tool("squawk", "pip install squawk-cli")
    break_three_ways(migrated_db)
    migrated_db.rows("DROP TABLE sign_in_records")
    script = tmp_path / "dry_run.sql"
    script.write_text(run_migrate(migrated_db.url, "--dry-run").stdout)

    result = subprocess.run(
        [squawk, "--config", str(HERE / ".squawk.toml"), str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert "VALIDATE CONSTRAINT" in script.read_text()


# --- Transaction pooling (pgbouncer) ---------------------------------------------------------


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accepts_connections(url):
    try:
        psycopg2.connect(url).close()
    except psycopg2.OperationalError:
        return False
    return True


@pytest.fixture
def transaction_pooler(migrated_db):
    """pgbouncer in pool_mode=transaction in front of the test database; yields its DATABASE_URL."""
    with pgbouncer(migrated_db, "transaction") as url:
        yield url


def test_parallel_runs_through_a_transaction_pooler_leave_no_lock_and_any_refused_says_why(
    migrated_db, transaction_pooler
):
    add_users_and_logs(migrated_db, logs=20_000)
    migrated_db.rows("DROP INDEX idx_request_logs_model, idx_request_logs_model_created")

    statuses, outputs = run_in_parallel(migrated_db, 8, url=transaction_pooler)

    assert set(statuses) <= {0, 2}, outputs
    for status, output in zip(statuses, outputs):
        assert "Traceback" not in output
        if status == 2:
            assert "transaction pooler" in output.strip().splitlines()[-1], output
    assert_no_advisory_lock_left(migrated_db)
    direct = run_migrate(migrated_db.url, "--lock-timeout", "5")
    assert direct.returncode == 0, direct.stderr
    assert_contract_catalog(migrated_db)


def test_a_run_whose_statements_reach_different_backends_stops_saying_why(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    with pgbouncer(migrated_db, "transaction", round_robin=True) as url:
        # Three server connections in the pool: the migration lock pins one, and the run's
        # transactions go round the other two.
        clients = [psycopg2.connect(url) for _ in range(3)]
        for client in clients:
            client.cursor().execute("SELECT 1")
        for client in clients:
            client.commit()
        result = run_migrate(url)
        for client in clients:
            client.close()
    assert_clean_failure(result, "consecutive statements ran on different server backends")
    assert "transaction pooler" in error_line(result) and "--atomic" in error_line(result)
    assert not index_is_valid(migrated_db, "idx_users_status")
    assert_no_advisory_lock_left(migrated_db)


def test_atomic_runs_through_a_transaction_pooler_succeed(migrated_db, transaction_pooler):
    migrated_db.rows("DROP INDEX idx_users_status")
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    result = run_migrate(transaction_pooler, "--atomic")
    assert result.returncode == 0, result.stderr
    assert index_is_valid(migrated_db, "idx_users_status")
    assert has_column(migrated_db, "users", "last_sign_in")
    assert run_migrate(migrated_db.url, "--check").returncode == 0


# --- Found by trying to break it -------------------------------------------------------------


def test_a_repeatable_read_default_does_not_make_the_run_wait_for_itself(migrated_db):
    # The migration lock's open transaction would keep a snapshot that the run's
    # own CREATE INDEX CONCURRENTLY waits for.
    migrated_db.rows("DROP INDEX idx_users_status")
    url = migrated_db.url_with(options="-c default_transaction_isolation=repeatable\\ read")
    result = run_migrate(url, "--lock-timeout", "3")
    assert result.returncode == 0, result.stderr
    assert "migrate: created index idx_users_status" in result.stderr


def test_another_applications_locked_table_holds_up_neither_a_run_nor_check(migrated_db):
    migrated_db.rows("CREATE TABLE audit_trail (id int PRIMARY KEY, note text)")
    migrated_db.rows("DROP INDEX idx_users_status")
    holder = session(migrated_db, "LOCK TABLE audit_trail IN ACCESS EXCLUSIVE MODE")
    try:
        pending = run_migrate(migrated_db.url, "--check", "--lock-timeout", "0.5")
        result = run_migrate(migrated_db.url, "--lock-timeout", "0.5")
        check = run_migrate(migrated_db.url, "--check", "--lock-timeout", "0.5")
    finally:
        holder.rollback()
        holder.close()
    assert pending.returncode == 1, pending.stderr
    assert "idx_users_status" in pending.stdout
    assert result.returncode == 0, result.stderr
    assert index_is_valid(migrated_db, "idx_users_status")
    assert check.returncode == 0, check.stderr


def test_check_retries_a_locked_catalog_read_within_the_budget(migrated_db, start_migrate):
    holder = session(migrated_db, "LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")
    status, _, stderr = run_until_it_waits_then_end(
        start_migrate, migrated_db, holder, "api_keys", "--check", "--lock-timeout", "60"
    )
    assert status == 0, stderr
    assert "the database matches the models" in stderr


def test_a_database_named_by_a_url_in_dbname_works_for_both_connections(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    params = migrated_db.params
    secret = "Pa55-in-a-nested-url"
    nested = (
        f"postgresql://{params['user']}:{secret}@{params.get('host', 'localhost')}"
        f":{params.get('port', 5432)}/{migrated_db.name}"
    )
    result = run_migrate(f"dbname='{nested}'")
    assert result.returncode == 0, result.stderr
    assert "migrate: created index idx_users_status" in result.stderr
    assert secret not in result.stdout + result.stderr
