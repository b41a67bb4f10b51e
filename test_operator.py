"""
What an operator schedules runs as announced: a deploy in two stages (--pre-deploy before the
rollout, --post-deploy as a job after it), the cron line (retention and upkeep in one run,
-q), the first line's target, the --wait error, and --format json on a signal.
"""

import json
import signal
from datetime import UTC, datetime

import psycopg2
import pytest

import migrate
import partition
from conftest import error_line, poll_until, run_migrate, wait_for_lock_wait
from test_partitions import INSERT_LOG, month, seed_keys


def index_state(db, name):
    """None when missing, else whether it is valid."""
    rows = db.rows(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", f"public.{name}"
    )
    return rows[0][0] if rows else None


def fk_validated(db, name):
    rows = db.rows("SELECT convalidated FROM pg_constraint WHERE conname = %s", name)
    return rows[0][0] if rows else None


def break_for_a_deploy(db):
    db.rows("DROP INDEX idx_users_email, idx_request_logs_model")
    db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    db.rows("ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user")


# --- A deploy in two stages ----------------------------------------------------------------


def test_pre_deploy_makes_what_the_application_needs_and_leaves_long_builds(migrated_db):
    break_for_a_deploy(migrated_db)

    pre = run_migrate(migrated_db.url, "--pre-deploy")
    gate = run_migrate(migrated_db.url, "--check", "--pre-deploy")

    assert pre.returncode == 0, pre.stderr
    assert migrated_db.value(
        "SELECT count(*) FROM pg_attribute WHERE attrelid = 'users'::regclass"
        " AND attname = 'last_sign_in'"
    )
    assert fk_validated(migrated_db, "fk_api_keys_user") is False  # made NOT VALID, not checked
    assert index_state(migrated_db, "idx_users_email") is True  # a constraint of the contract
    assert index_state(migrated_db, "idx_request_logs_model") is None  # a speed-up: later
    assert "left for python migrate.py --post-deploy: 2 statements" in pre.stderr
    assert gate.returncode == migrate.EXIT_OK, gate.stderr
    assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_PENDING

    post = run_migrate(migrated_db.url, "--post-deploy")

    assert post.returncode == 0, post.stderr
    assert fk_validated(migrated_db, "fk_api_keys_user") is True
    assert index_state(migrated_db, "idx_request_logs_model") is True
    assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_OK


def test_pre_deploy_fails_while_a_unique_index_cannot_be_built(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_email")
    migrated_db.rows(
        "INSERT INTO users (username, email, password_hash)"
        " VALUES ('a', 'same@example.com', 'h'), ('b', 'same@example.com', 'h')"
    )

    pre = run_migrate(migrated_db.url, "--pre-deploy")

    assert pre.returncode == migrate.EXIT_ERROR
    assert "idx_users_email" in error_line(pre)
    assert index_state(migrated_db, "idx_users_email") is not True
    assert run_migrate(migrated_db.url, "--check", "--pre-deploy").returncode == (
        migrate.EXIT_PENDING
    )


def test_pre_deploy_makes_the_default_partition_but_leaves_the_month_to_post_deploy(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    this_month = partition.month_name(month(datetime.now(UTC)))
    empty_db.rows(f"DROP TABLE request_logs_default, {this_month}")
    seed_keys(empty_db)

    pre = run_migrate(empty_db.url, "--pre-deploy")
    empty_db.rows(INSERT_LOG.format(created_at="now()"))  # the gateway's insert succeeds

    assert pre.returncode == 0, pre.stderr
    assert "request_logs_default" in empty_db.tables()
    assert this_month not in empty_db.tables()
    post = run_migrate(empty_db.url, "--post-deploy")
    assert post.returncode == 0, post.stderr
    assert empty_db.value(f"SELECT count(*) FROM {this_month}") == 1


def test_pre_deploy_and_retention_are_refused_together_in_one_line():
    result = run_migrate("dbname=x", "--pre-deploy", "--retain-request-logs", "30")
    assert result.returncode == migrate.EXIT_ERROR
    assert len(result.stderr.strip().splitlines()) == 1


# --- Cron ----------------------------------------------------------------------------------


def test_a_retention_run_also_keeps_the_partitions(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    this_month = partition.month_name(month(datetime.now(UTC)))
    empty_db.rows(f"DROP TABLE {this_month}")
    seed_keys(empty_db)
    empty_db.rows(INSERT_LOG.format(created_at="now() - interval '400 days'"))

    result = run_migrate(empty_db.url, "--progress", "0", "--retain-request-logs", "90")

    assert result.returncode == 0, result.stderr
    assert this_month in empty_db.tables()
    assert empty_db.value("SELECT count(*) FROM request_logs") == 0
    assert run_migrate(empty_db.url, "--check").returncode == migrate.EXIT_OK


def test_quiet_prints_nothing_with_nothing_to_do_and_one_line_with_work(migrated_db):
    idle = run_migrate(migrated_db.url, "-q", "--retain-request-logs", "90")
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    busy = run_migrate(migrated_db.url, "--quiet")

    assert idle.returncode == 0 and idle.stderr == "" and idle.stdout == ""
    assert busy.returncode == 0, busy.stderr
    assert busy.stderr.startswith("migrate: done: 1 statement in ")
    assert len(busy.stderr.splitlines()) == 1
    assert index_state(migrated_db, "idx_request_logs_model") is True


def test_quiet_keeps_an_error_to_one_line():
    result = run_migrate("host=127.0.0.1 port=1 dbname=x connect_timeout=2", "-q")
    assert result.returncode == migrate.EXIT_ERROR
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("migrate: error: cannot reach the server")


# --- Words ---------------------------------------------------------------------------------


def test_a_spent_wait_says_to_raise_it_not_to_pass_it():
    result = run_migrate("host=127.0.0.1 port=1 dbname=x connect_timeout=2", "--wait", "1")
    assert result.returncode == migrate.EXIT_ERROR
    assert "or raise --wait (it waited 1 s)" in error_line(result)
    assert "pass --wait" not in result.stderr


def test_the_first_line_names_the_target_libpq_resolved_from_pg_variables(migrated_db):
    params = migrated_db.params
    result = run_migrate(
        f"dbname={params['dbname']}",
        "--check",
        PGHOST=params["host"],
        PGPORT=str(params["port"]),
        PGUSER=params["user"],
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines()[0] == (
        f"migrate: database dbname={params['dbname']} (connected to host={params['host']}"
        f" port={params['port']} dbname={params['dbname']} user={params['user']})"
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_json_leaves_one_document_on_a_signal(migrated_db, start_migrate, signum):
    holder = psycopg2.connect(migrated_db.url)
    try:
        with holder.cursor() as cursor:
            cursor.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
        run = start_migrate(migrated_db.url, "--check", "--format", "json", "--lock-timeout", "60")
        wait_for_lock_wait(migrated_db, "the catalog read to wait for users", run=run)
        run.send_signal(signum)
        stdout, stderr = run.communicate(timeout=30)
    finally:
        holder.rollback()
        holder.close()

    document = json.loads(stdout)
    assert run.returncode == migrate.EXIT_SIGNAL[signum]
    assert document["exit"] == migrate.EXIT_SIGNAL[signum]
    assert document["error"].startswith(f"interrupted by {signum.name}")
    assert stderr.strip().splitlines()[-1].startswith("migrate: error: interrupted")
    poll_until(
        "migrate.py's sessions to end",
        lambda: (
            not migrated_db.rows(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'migrate.py'"
                " AND datname = current_database()"
            )
        ),
    )


def test_the_retention_dry_run_counts_the_rows_the_run_deletes(migrated_db):
    seed_keys(migrated_db)
    migrated_db.rows(
        # Half an hour off every whole hour: no row sits within the run's seconds of the cutoff.
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method,"
        " path, status_code, response_time) SELECT now() - interval '1 hour' * g"
        " - interval '30 minutes', user_id, id, 1, 'm', 'GET', '/', 200, 5"
        " FROM api_keys, generate_series(1, 24 * 200) g"
    )
    old = migrated_db.value(
        "SELECT count(*) FROM request_logs WHERE created_at < now() - interval '90 days'"
    )

    dry = run_migrate(migrated_db.url, "--dry-run", "--retain-request-logs", "90")
    run = run_migrate(migrated_db.url, "--retain-request-logs", "90")

    assert dry.returncode == 0 and run.returncode == 0, run.stderr
    assert f"UTC ({old:,} rows)" in dry.stdout  # exact, not the planner's guess
    assert "deleted" not in dry.stdout + dry.stderr
    assert f": {old:,} rows" in run.stderr
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 24 * 200 - old


def test_pre_deploy_fails_while_a_unique_index_name_is_held_by_another_table(migrated_db):
    migrated_db.rows("DROP INDEX idx_api_keys_key")
    migrated_db.rows("CREATE TABLE idx_api_keys_key (id int)")

    pre = run_migrate(migrated_db.url, "--pre-deploy")
    plain = run_migrate(migrated_db.url)

    assert pre.returncode == migrate.EXIT_ERROR
    assert "unique index idx_api_keys_key is missing" in error_line(pre)
    assert plain.returncode == 0, plain.stderr  # a plain run reports it as drift, as before
