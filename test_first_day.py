"""
What an operator and a developer need on their first day: a JSON plan for deploy tooling,
exit codes a CI gate can use, the models bound from the same DATABASE_URL without leaking its
password, and progress lines while long online work runs.
"""

import json
import threading
import time
from itertools import pairwise

import pytest

import migrate
import models
from conftest import PASSWORD, poll_until, run_migrate, wait_for_lock_wait
from test_online import add_users_and_logs, session


def check(db, *args):
    return run_migrate(db.url, "--check", *args)


# --- --format json -------------------------------------------------------------------------


def test_json_check_is_one_document_with_the_plan_and_the_same_exit_code(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    migrated_db.rows("DROP INDEX idx_request_logs_model_created")
    migrated_db.rows("ALTER TABLE api_keys ALTER COLUMN rate_limit SET DEFAULT 5")
    migrated_db.rows("CREATE TABLE audit_trail (id int)")

    text, result = check(migrated_db), check(migrated_db, "--format", "json")

    assert result.returncode == text.returncode == migrate.EXIT_PENDING
    document = json.loads(result.stdout)
    assert document["format"] == "migrate.py plan" and document["version"] == 2
    assert document["schema"]["name"] == "public"
    assert [(p["stage"], p["sql"]) for p in document["pending"]] == [
        ("transaction", 'ALTER TABLE "users" ADD COLUMN IF NOT EXISTS "last_sign_in" TIMESTAMPTZ'),
        (
            "online",
            (
                'CREATE INDEX CONCURRENTLY IF NOT EXISTS "idx_request_logs_model_created"'
                ' ON "request_logs" ("model", "created_at" DESC)'
            ),
        ),
    ]
    assert document["pending"][0]["lock"] == "ACCESS EXCLUSIVE"
    assert document["pending"][1]["blocks"] == "nothing"
    assert document["drift"] == [
        {
            "kind": "column",
            "table": "api_keys",
            "object": "rate_limit",
            "problem": "api_keys.rate_limit default is 5; the models say 60",
            "fix": ['ALTER TABLE "api_keys" ALTER COLUMN "rate_limit" SET DEFAULT 60'],
            "safe": True,
            "cost": "instant; ACCESS EXCLUSIVE on api_keys (blocks reads and writes) until COMMIT",
        }
    ]
    assert document["unknown"][0]["name"] == "audit_trail"
    assert document["exit"] == migrate.EXIT_PENDING


def test_json_dry_run_lists_the_statements_in_the_order_a_run_sends_them(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in")
    migrated_db.rows("DROP INDEX idx_request_logs_model, idx_request_logs_status_code")
    result = run_migrate(migrated_db.url, "--dry-run", "--atomic", "--format", "json")
    assert result.returncode == 0, result.stderr
    statements = [p["sql"].split(" ")[:3] for p in json.loads(result.stdout)["pending"]]
    assert statements == [
        ["CREATE", "INDEX", '"idx_request_logs_model"'],
        ["CREATE", "INDEX", '"idx_request_logs_status_code"'],
        ["ALTER", "TABLE", '"users"'],
    ]


def test_json_holds_hostile_catalog_text_as_data(migrated_db):
    migrated_db.rows('CREATE TABLE "x\ny" (id int)')
    document = json.loads(check(migrated_db, "--format", "json").stdout)
    assert document["unknown"] == [
        {"kind": "table", "table": None, "name": "x\ny", "shown": 'table "x\\ny"'}
    ]


def test_format_json_goes_only_with_check_or_dry_run():
    result = run_migrate(None, "--format", "json")
    assert result.returncode == migrate.EXIT_ERROR
    assert "--format json goes with --check or --dry-run" in result.stderr


# --- Exit codes a gate can use ---------------------------------------------------------------


def test_check_exits_0_1_3_and_2_for_match_pending_drift_and_blocked(migrated_db):
    assert check(migrated_db).returncode == migrate.EXIT_OK
    migrated_db.rows("ALTER TABLE api_keys ALTER COLUMN rate_limit SET DEFAULT 5")
    drift_only = check(migrated_db)
    assert drift_only.returncode == migrate.EXIT_DRIFT
    assert (
        drift_only.stderr.strip()
        .splitlines()[-1]
        .startswith("migrate: nothing for a run to add; 1 drift left alone")
    )
    migrated_db.rows("DROP INDEX idx_users_status")
    pending = check(migrated_db)
    assert pending.returncode == migrate.EXIT_PENDING
    assert pending.stderr.strip().splitlines()[-1].endswith(": run python migrate.py to make them")
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('a', 'a@x', 'h')")
    migrated_db.rows("ALTER TABLE users DROP COLUMN password_hash")
    assert check(migrated_db).returncode == migrate.EXIT_ERROR


# --- Binding the models ----------------------------------------------------------------------


@pytest.fixture
def unbound():
    yield
    models.database.close()
    models.database.masked = None


def test_bind_from_url_reads_database_url_as_migrate_py_does_and_sessions_run_in_utc(
    migrated_db, monkeypatch, unbound
):
    params = migrated_db.params
    monkeypatch.setenv("DATABASE_URL", f"dbname={migrated_db.name}")
    monkeypatch.setenv("PGHOST", params["host"])
    monkeypatch.setenv("PGPORT", str(params.get("port", 5432)))
    monkeypatch.setenv("PGUSER", params["user"])
    models.database.close()

    models.bind_from_url()

    assert models.User.select().count() == 0
    assert models.database.execute_sql("SHOW TimeZone").fetchone()[0] == "UTC"


def test_bind_from_url_takes_the_url_form(migrated_db, unbound):
    params = migrated_db.params
    models.database.close()
    models.bind_from_url(
        f"postgresql://{params['user']}@{params['host']}:{params.get('port', 5432)}/{migrated_db.name}"
    )
    assert models.User.select().count() == 0


def test_a_failed_connection_of_bound_models_never_shows_the_password(throwaway_server, unbound):
    models.database.close()
    models.bind_from_url(throwaway_server.url(password=PASSWORD, dbname=f"{PASSWORD}_db"))
    with pytest.raises(Exception) as failure:
        models.User.select().count()
    assert PASSWORD not in str(failure.value)
    assert "password authentication failed" in str(failure.value)


def test_a_bad_url_is_one_masked_error_naming_what_to_fix(unbound):
    with pytest.raises(models.DatabaseUrlError) as failure:
        models.bind_from_url(f"postgresql://u:{PASSWORD}@x@h/d")
    assert PASSWORD not in str(failure.value)
    assert "percent-encode '@' as %40" in str(failure.value)


# --- Progress ------------------------------------------------------------------------------


def build_waiting_for_a_writer(db, start_migrate, *args, until):
    """A run whose online build waits for a writer until `until(lines of stderr so far)`
    holds, then gets on. Returns (exit code, stderr)."""
    add_users_and_logs(db, logs=10)
    db.rows("DROP INDEX idx_request_logs_model")
    writer = session(db, "UPDATE request_logs SET tokens_used = 1 WHERE id = 1")
    run = start_migrate(db.url, *args)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(run.stderr.readline, "")))
    reader.start()
    try:
        wait_for_lock_wait(db, "the build to wait for the writer", run=run, locktype="virtualxid")
        until(lines)
    finally:
        writer.rollback()
        writer.close()
        run.wait(timeout=60)
        reader.join(timeout=60)
    return run.returncode, "".join(lines)


def progress_lines(lines):
    return [
        line.rstrip("\n")
        for line in list(lines)
        if line.startswith("migrate: building index idx_request_logs_model: ")
        and "started" not in line
    ]


def test_a_long_online_build_logs_progress_every_progress_seconds(migrated_db, start_migrate):
    status, stderr = build_waiting_for_a_writer(
        migrated_db,
        start_migrate,
        "--progress",
        "1",
        # Three periods and start-up take about 4 s; ten times the period would take 30.
        until=lambda lines: poll_until(
            "three progress lines", lambda: len(progress_lines(lines)) >= 3, seconds=15
        ),
    )
    assert status == 0, stderr
    lines = progress_lines(stderr.splitlines(keepends=True))
    assert len(lines) >= 3, stderr
    assert all(line.endswith(" s") and "waiting" in line for line in lines), stderr
    # At most one line a period: the seconds each line gives apart by about one, never less.
    seconds = [int(line.rsplit(", ", 1)[1].removesuffix(" s")) for line in lines]
    assert all(later - earlier >= 1 for earlier, later in pairwise(seconds)), lines
    assert len(lines) <= seconds[-1] + 1, lines


def hold_for(seconds):
    """Hold the writer `seconds`: the time --progress 1 would fill with lines."""

    def until(_lines):
        started = time.monotonic()
        poll_until(f"{seconds} s of waiting", lambda: time.monotonic() - started > seconds)

    return until


def test_progress_0_logs_no_progress_line(migrated_db, start_migrate):
    status, stderr = build_waiting_for_a_writer(
        migrated_db, start_migrate, "--progress", "0", until=hold_for(2.5)
    )
    assert status == 0, stderr
    assert [line for line in stderr.splitlines() if "building index" in line] == [
        (
            "migrate: building index idx_request_logs_model: started (scans the table twice,"
            " waits for older transactions)"
        )
    ]


def test_batched_deletes_log_the_rows_so_far(migrated_db):
    add_users_and_logs(migrated_db, logs=30_000)
    migrated_db.rows("UPDATE request_logs SET created_at = now() - interval '100 days'")
    result = run_migrate(migrated_db.url, "--retain-request-logs", "30", "--progress", "0.001")
    assert result.returncode == 0, result.stderr
    assert "rows so far" in result.stderr
    assert result.stderr.strip().splitlines()[-2].endswith(": 30,000 rows")
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 0


def test_a_connection_of_the_probe_never_keeps_the_run_waiting_for_itself(migrated_db):
    # The probe reads pg_stat_activity on its own connection while CREATE INDEX CONCURRENTLY
    # waits for older transactions: it must not be one of them, nor outlive the run.
    add_users_and_logs(migrated_db, logs=10)
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    result = run_migrate(migrated_db.url, "--progress", "0.2", "--lock-timeout", "10")
    assert result.returncode == 0, result.stderr
    assert migrated_db.value(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_request_logs_model'::regclass"
    )
    poll_until(
        "migrate.py's sessions of this database to end",
        lambda: (
            not migrated_db.rows(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'migrate.py'"
                " AND datname = current_database()"
            )
        ),
        seconds=10,
    )


@pytest.mark.parametrize(
    ("flags", "command"),
    [
        (["--partition-request-logs"], "python migrate.py --partition-request-logs"),
        (["--retain-request-logs", "30"], "python migrate.py --retain-request-logs 30"),
    ],
)
def test_the_pending_summary_names_the_command_that_makes_the_changes(migrated_db, flags, command):
    add_users_and_logs(migrated_db, logs=10)
    migrated_db.rows("UPDATE request_logs SET created_at = now() - interval '100 days'")
    mode = "--dry-run" if "--retain-request-logs" in flags else "--check"
    result = run_migrate(migrated_db.url, mode, *flags)
    assert result.stderr.strip().splitlines()[-1].endswith(f": run {command} to make them")
