"""
request_logs by month: --partition-request-logs makes the layout on a fresh database and
converts a live table online; every plain run keeps this month's and the next month's
partitions there; --retain-request-logs drops whole partitions and deletes the rest in
batches; --check reports the layout's health; the Go backend's AutoMigrate sees what it sees
on a plain table.
"""

import re
import signal
import threading
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

import apply
import migrate
import partition
from catalog import target_schema
from conftest import (
    HERE,
    catalog,
    error_line,
    migrate_here,
    poll_until,
    quoted,
    record_ddl,
    run_migrate,
    scoped_name,
    wait_for_lock_wait,
)
from models import RequestLog
from test_online import add_users_and_logs, session

CONTRACT_LOG_INDEXES = sorted(
    [
        "idx_request_logs_api_config_id",
        "idx_request_logs_api_key_id",
        "idx_request_logs_created_at",
        "idx_request_logs_deleted_at",
        "idx_request_logs_model",
        "idx_request_logs_model_created",
        "idx_request_logs_status_code",
        "idx_request_logs_user_created",
        "idx_request_logs_user_id",
    ]
)
INSERT_LOG = (
    "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path,"
    " status_code, response_time) SELECT {created_at}, user_id, id, 1, 'm', 'GET', '/', 200, 5"
    " FROM api_keys LIMIT 1"
)


def layout(db):
    """{partition: bound} of request_logs, the bounds deparsed in UTC."""
    db.rows("SET TimeZone = 'UTC'")
    rows = db.rows(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits h"
        " JOIN pg_class c ON c.oid = h.inhrelid WHERE h.inhparent = 'request_logs'::regclass"
    )
    db.rows("RESET TimeZone")
    return dict(rows)


def is_partitioned(db):
    return db.value("SELECT relkind FROM pg_class WHERE oid = 'request_logs'::regclass") == "p"


def log_indexes(db):
    return [
        name
        for (name,) in db.rows(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'request_logs' ORDER BY 1"
        )
    ]


def add_dated_logs(db, logs):
    """Users, keys and `logs` request logs a second apart up to now, as the gateway writes them."""
    add_users_and_logs(db, logs=logs)
    db.rows("UPDATE request_logs SET created_at = now() - id * interval '1 second'")


def month(moment, offset=0):
    return partition.add_months(partition.month_start(moment), offset)


# --- A fresh database ---------------------------------------------------------------------


@pytest.mark.parametrize("zone", ["Pacific/Kiritimati", "America/Los_Angeles"])
def test_a_fresh_layout_has_utc_month_partitions_whatever_the_session_zone(empty_db, zone):
    result = run_migrate(empty_db.url, "--partition-request-logs", PGOPTIONS=f"-c TimeZone={zone}")

    assert result.returncode == 0, result.stderr
    now = datetime.now(UTC)
    assert layout(empty_db) == {
        "request_logs_default": "DEFAULT",
        **{
            partition.month_name(month(now, n)): f"FOR VALUES FROM ('{month(now, n):%Y-%m-%d}"
            f" 00:00:00+00') TO ('{month(now, n + 1):%Y-%m-%d} 00:00:00+00')"
            for n in range(partition.MONTHS_AHEAD + 1)
        },
    }
    assert log_indexes(empty_db) == sorted([*CONTRACT_LOG_INDEXES, "idx_request_logs_id"])


def test_a_fresh_layout_matches_and_a_plain_run_then_sends_no_ddl(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    record_ddl(empty_db)
    check = run_migrate(empty_db.url, "--check")
    rerun = run_migrate(empty_db.url)
    again = run_migrate(empty_db.url, "--partition-request-logs")
    assert check.returncode == migrate.EXIT_OK, check.stdout
    assert "schema is up to date" in rerun.stderr and "schema is up to date" in again.stderr
    assert empty_db.rows("SELECT command FROM audit.ddl_log") == []


def test_no_insert_fails_for_want_of_a_partition(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    empty_db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
    for created_at in ("NULL", "now()", "'2999-01-01 00:00+00'", "'1999-01-01 00:00+00'"):
        empty_db.rows(INSERT_LOG.format(created_at=created_at))
    assert empty_db.value("SELECT count(*) FROM request_logs") == 4
    assert empty_db.value("SELECT count(*) FROM ONLY request_logs_default") == 3


# --- Converting a live table ----------------------------------------------------------------


def insert_while(db, stop, outcomes, created_at="now()"):
    """Single-row inserts into request_logs, one per transaction, until `stop` is set."""
    connection = psycopg2.connect(db.url)
    connection.autocommit = True
    with connection.cursor() as cursor:
        while not stop.is_set():
            try:
                cursor.execute(INSERT_LOG.format(created_at=created_at) + " RETURNING id")
                outcomes.append(cursor.fetchone()[0])
            except psycopg2.Error as exc:
                outcomes.append(exc)
    connection.close()


def test_conversion_under_inserts_keeps_every_row_id_and_foreign_key(migrated_db):
    add_dated_logs(migrated_db, 200_000)
    migrated_db.rows("UPDATE request_logs SET deleted_at = now() WHERE id % 10 = 0")
    before = migrated_db.value("SELECT count(*) FROM request_logs")
    stop, outcomes = threading.Event(), []
    inserter = threading.Thread(target=insert_while, args=(migrated_db, stop, outcomes))
    inserter.start()
    try:
        poll_until("inserts to start", lambda: len(outcomes) > 10)
        result = run_migrate(migrated_db.url, "--partition-request-logs", timeout=300)
        assert result.returncode == 0, result.stderr
        during = len(outcomes)
        poll_until("inserts after the swap", lambda: len(outcomes) > during + 10)
    finally:
        stop.set()
        inserter.join()

    assert result.returncode == 0, result.stderr
    failures = [o for o in outcomes if isinstance(o, Exception)]
    assert failures == []
    assert is_partitioned(migrated_db)
    assert migrated_db.value("SELECT count(*) FROM request_logs") == before + len(outcomes)
    assert (
        migrated_db.value("SELECT count(*) FROM request_logs WHERE deleted_at IS NOT NULL")
        == 20_000
    )
    assert outcomes == sorted(outcomes)  # one sequence, before, during and after
    assert migrated_db.value("SELECT nextval('request_logs_id_seq')") > max(outcomes)
    assert migrated_db.value("SELECT pg_get_serial_sequence('request_logs', 'id')") == (
        "public.request_logs_id_seq"
    )
    assert log_indexes(migrated_db) == sorted([*CONTRACT_LOG_INDEXES, "idx_request_logs_id"])
    check = run_migrate(migrated_db.url, "--check")
    assert check.returncode == migrate.EXIT_OK, check.stdout


@pytest.mark.parametrize(
    "created_at", ["'2000-01-01 00:00+00'", "now()", "NULL", "'2999-01-01 00:00+00'"]
)
def test_foreign_keys_stay_enforced_on_every_partition_after_conversion(migrated_db, created_at):
    add_dated_logs(migrated_db, 10)
    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0
    assert is_partitioned(migrated_db)
    with pytest.raises(psycopg2.errors.ForeignKeyViolation):
        migrated_db.rows(
            "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model,"
            f" method, path, status_code, response_time) VALUES ({created_at}, 999, 999, 1, 'm',"
            " 'GET', '/', 200, 5)"
        )


def test_conversion_refuses_rows_without_a_created_at_and_changes_nothing(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("UPDATE request_logs SET created_at = NULL WHERE id = 1")
    before = catalog(migrated_db)

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert result.returncode == migrate.EXIT_ERROR
    assert "request_logs has rows whose created_at is NULL" in error_line(result)
    assert catalog(migrated_db) == before


def test_conversion_refuses_rows_dated_past_its_bound_and_changes_nothing(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("UPDATE request_logs SET created_at = '2999-01-01 00:00+00' WHERE id = 1")
    before = catalog(migrated_db)

    check = run_migrate(migrated_db.url, "--partition-request-logs", "--check")
    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert check.returncode == result.returncode == migrate.EXIT_ERROR
    assert "request_logs has rows dated at or after" in check.stdout
    assert "request_logs has rows dated at or after" in error_line(result)
    assert catalog(migrated_db) == before


def test_a_bound_that_cannot_be_validated_names_its_rows_and_how_to_undo_it(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("UPDATE request_logs SET created_at = NULL WHERE id = 1")
    conversion_state(migrated_db, "validate")  # as if the row had come before the bound

    result = run_migrate(migrated_db.url, "--partition-request-logs")
    check = run_migrate(migrated_db.url, "--partition-request-logs", "--check")

    assert result.returncode == migrate.EXIT_ERROR
    assert "request_logs has rows whose created_at is NULL" in error_line(result)
    assert "refuses such inserts" in error_line(result)
    assert "validated" not in result.stderr
    assert '-- ALTER TABLE "request_logs" DROP CONSTRAINT "request_logs_before_' in check.stdout


@pytest.mark.parametrize("name", ["request_logs_before_2027_13", "request_logs_before_0000_01"])
def test_a_check_named_like_a_bound_of_no_real_month_is_not_taken_for_one(migrated_db, name):
    migrated_db.rows(f"ALTER TABLE request_logs ADD CONSTRAINT {name} CHECK (true)")
    for args in ([], ["--check"], ["--dry-run", "--partition-request-logs"]):
        result = run_migrate(migrated_db.url, *args)
        assert "unexpected" not in result.stderr
        assert result.returncode in (migrate.EXIT_OK, migrate.EXIT_DRIFT), result.stderr
    # Not a bound of a conversion under way: the dry run plans the conversion from its start.
    assert "PARTITION BY RANGE" in result.stdout


def test_a_plain_run_keeps_the_catalog_gorms_without_the_flag(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("DROP INDEX idx_request_logs_model")  # work for the run beside the table
    assert run_migrate(migrated_db.url).returncode == 0
    assert not is_partitioned(migrated_db)
    assert "idx_request_logs_model" in log_indexes(migrated_db)


def conversion_state(db, step):
    """The catalog as a conversion leaves it before `step`: its CHECK NOT VALID (validate),
    valid (index), and the index on id built (swap)."""
    name = partition.CHECK_PREFIX + f"{partition.boundary_after(datetime.now(UTC)):%Y_%m}"
    boundary = partition.boundary_after(datetime.now(UTC)).isoformat()
    db.rows(
        f"ALTER TABLE request_logs ADD CONSTRAINT {name}"
        f" CHECK (created_at IS NOT NULL AND created_at < '{boundary}') NOT VALID"
    )
    if step in ("index", "swap"):
        db.rows(f"ALTER TABLE request_logs VALIDATE CONSTRAINT {name}")
    if step == "swap":
        db.rows(f"CREATE INDEX {partition.LEGACY_ID_INDEX} ON request_logs (id)")


# Where a conversion can be stopped: what the test holds so that it waits there, and the
# query it is seen running (waiting for a lock, or retrying its short lock attempts).
STOPS = {
    "validate": ("LOCK TABLE request_logs IN SHARE UPDATE EXCLUSIVE MODE", "%VALIDATE CONSTRAINT%"),
    "index": (
        "UPDATE request_logs SET tokens_used = 1 WHERE id = 1",
        "CREATE INDEX CONCURRENTLY%request_logs_legacy_id%",
    ),
    "swap": ("LOCK TABLE users IN SHARE MODE", "%request_logs_partitioned%"),
}


def migrate_seen_running(db, pattern):
    return db.rows(
        "SELECT 1 FROM pg_stat_activity WHERE application_name = 'migrate.py'"
        " AND datname = current_database() AND state = 'active' AND query LIKE %s",
        pattern,
    )


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["kill-9", "SIGTERM"])
@pytest.mark.parametrize("step", list(STOPS))
def test_a_conversion_stopped_at_any_step_leaves_one_layout_and_the_next_run_finishes(
    migrated_db, start_migrate, step, how
):
    add_dated_logs(migrated_db, 5_000)
    before = migrated_db.value("SELECT count(*) FROM request_logs")
    conversion_state(migrated_db, step)
    hold, seen = STOPS[step]
    holder = session(migrated_db, hold)
    run = start_migrate(migrated_db.url, "--partition-request-logs", "--lock-timeout", "120")
    try:
        poll_until(
            f"the conversion to run its {step} step",
            lambda: migrate_seen_running(migrated_db, seen),
        )
        run.send_signal(how)
        run.communicate(timeout=60)
    finally:
        run.kill()
        holder.rollback()
        holder.close()

    assert run.returncode == (-9 if how == signal.SIGKILL else 143)
    assert not is_partitioned(migrated_db)  # a step is all or nothing: the old layout
    assert migrated_db.value("SELECT count(*) FROM request_logs") == before
    finish = run_migrate(migrated_db.url, "--partition-request-logs")
    assert finish.returncode == 0, finish.stderr
    assert is_partitioned(migrated_db)
    assert migrated_db.value("SELECT count(*) FROM request_logs") == before
    assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_OK


def test_a_plain_run_reports_a_conversion_left_unfinished(migrated_db):
    add_dated_logs(migrated_db, 10)
    conversion_state(migrated_db, "validate")

    check = run_migrate(migrated_db.url, "--check")

    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert "a conversion of request_logs to monthly partitions is not finished" in check.stdout


# --- Upkeep ------------------------------------------------------------------------------


def test_each_plain_run_makes_the_next_months_partition_and_moves_its_rows_from_default(empty_db):
    now = datetime.now(UTC)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    empty_db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
    ahead = partition.MONTHS_AHEAD + 1
    in_months = month(now, ahead) + timedelta(days=3)
    empty_db.rows(INSERT_LOG.format(created_at=f"'{in_months.isoformat()}'"))
    assert empty_db.value("SELECT count(*) FROM ONLY request_logs_default") == 1

    plan, done = migrate_here(empty_db.params, now=now + timedelta(days=32))

    name = partition.month_name(month(now, ahead))
    assert f"attached partition {name}" in [s.description for s in done]
    assert empty_db.value(f"SELECT count(*) FROM ONLY {name}") == 1
    assert empty_db.value("SELECT count(*) FROM ONLY request_logs_default") == 0
    assert not plan.pending


def months_covered_ahead(db, now):
    """How many months from this one on a partition of request_logs covers, one after another."""
    ranges = partition_ranges(db).values()
    count = 0
    while any(
        (lower is None or lower <= month(now, count))
        and (upper is None or month(now, count + 1) <= upper)
        for lower, upper in ranges
    ):
        count += 1
    return count


def test_the_months_kept_ahead_are_the_number_the_operating_guide_states():
    stated = re.search(r"`partition\.MONTHS_AHEAD` = (\d+)", (HERE / "OPERATING.md").read_text())
    assert stated, "OPERATING.md states how many months upkeep keeps ready"
    assert partition.MONTHS_AHEAD == int(stated[1]) >= 1


def test_a_fresh_layout_and_a_conversion_cover_this_month_and_the_months_kept_ahead(empty_db):
    now = datetime.now(UTC)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    assert months_covered_ahead(empty_db, now) == partition.MONTHS_AHEAD + 1

    empty_db.reset()
    assert run_migrate(empty_db.url).returncode == 0
    add_dated_logs(empty_db, 10)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    assert is_partitioned(empty_db)
    assert months_covered_ahead(empty_db, now) == partition.MONTHS_AHEAD + 1


def test_a_plain_run_makes_every_month_kept_ahead_that_is_missing(empty_db):
    now = datetime.now(UTC)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    for offset in range(1, partition.MONTHS_AHEAD + 1):
        name = partition.month_name(month(now, offset))
        empty_db.rows(f"ALTER TABLE request_logs DETACH PARTITION {name}")
        empty_db.rows(f"DROP TABLE {name}")
    assert months_covered_ahead(empty_db, now) == 1

    assert run_migrate(empty_db.url).returncode == 0

    assert months_covered_ahead(empty_db, now) == partition.MONTHS_AHEAD + 1


def test_check_reports_a_missing_partition_as_pending_and_dated_default_rows_as_drift(empty_db):
    now = datetime.now(UTC)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    following = partition.month_name(month(now, 1))
    empty_db.rows(f"ALTER TABLE request_logs DETACH PARTITION {following}")
    empty_db.rows(f"DROP TABLE {following}")

    missing = run_migrate(empty_db.url, "--check")
    assert missing.returncode == migrate.EXIT_PENDING, missing.stdout
    assert "-- pending, then: attach the months ahead (in one short transaction):" in missing.stdout

    empty_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    empty_db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
    empty_db.rows(INSERT_LOG.format(created_at="'2999-01-01 00:00+00'"))
    assert run_migrate(empty_db.url).returncode == 0
    dated = run_migrate(empty_db.url, "--check")
    assert dated.returncode == migrate.EXIT_DRIFT, dated.stdout
    assert "-- request_logs_default holds 1 row with a created_at that no partition covers" in (
        dated.stdout
    )


def test_a_partition_without_an_index_is_pending_and_a_run_builds_it_online(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows("DROP INDEX idx_request_logs_model")
    empty_db.rows("CREATE INDEX idx_request_logs_model ON ONLY request_logs (model)")  # INVALID

    check = run_migrate(empty_db.url, "--check")
    run = run_migrate(empty_db.url)

    assert check.returncode == migrate.EXIT_PENDING, check.stdout
    assert 'CREATE INDEX CONCURRENTLY IF NOT EXISTS "request_logs_default_model"' in check.stdout
    assert run.returncode == 0, run.stderr
    assert empty_db.value(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_request_logs_model'::regclass"
    )
    assert run_migrate(empty_db.url, "--check").returncode == migrate.EXIT_OK


# --- Retention --------------------------------------------------------------------------------


def logs_by_age(db, days):
    """One request log `days` ago, for each of `days`."""
    for age in days:
        db.rows(INSERT_LOG.format(created_at=f"now() - interval '{age} days'"))


def test_retention_on_a_plain_table_deletes_in_batches_only_the_older_rows(migrated_db):
    add_users_and_logs(migrated_db, logs=0)
    logs_by_age(migrated_db, [1, 5, 40, 100, 400])
    migrated_db.rows(
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path, status_code, response_time) SELECT NULL, user_id, id, 1, 'm', 'GET', '/', 200, 5 FROM api_keys"
    )

    dry = run_migrate(migrated_db.url, "--retain-request-logs", "30", "--dry-run")
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 6
    result = run_migrate(migrated_db.url, "--retain-request-logs", "30")

    assert dry.returncode == 0, dry.stderr
    assert "-- then: delete from request_logs (repeated until it changes no row" in dry.stdout
    assert "-- deletes the rows of request_logs older than" in dry.stdout  # not yet "deleted"
    assert result.returncode == 0, result.stderr
    assert "rows of request_logs older than" in result.stderr and ": 3 rows" in result.stderr
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 3  # 1, 5 days and the NULL


CUTOFF_PRINTED = re.compile(r"older than (\d{4}-\d\d-\d\d \d\d:\d\d) UTC")


@pytest.mark.parametrize("days", [1, 30])
def test_retention_deletes_a_row_a_minute_past_the_cutoff_and_keeps_one_a_minute_short(
    migrated_db, days
):
    add_users_and_logs(migrated_db, logs=0)
    # The cutoff is the clock at the run minus DAYS; the run takes well under a minute.
    before = datetime.now(UTC)
    for seconds in (60 + 1, -60):
        migrated_db.rows(
            INSERT_LOG.format(created_at="%s"), before - timedelta(days=days, seconds=seconds)
        )
    result = run_migrate(migrated_db.url, "--retain-request-logs", str(days))
    after = datetime.now(UTC)

    assert result.returncode == 0, result.stderr
    kept = migrated_db.rows("SELECT created_at FROM request_logs")
    assert kept == [(before - timedelta(days=days, seconds=-60),)]
    printed = CUTOFF_PRINTED.search(result.stderr)
    assert printed, result.stderr
    cutoff = datetime.strptime(printed[1], "%Y-%m-%d %H:%M").replace(tzinfo=UTC)
    # Printed to the minute: within the minute of the clock at the run, minus DAYS.
    assert before - timedelta(days=days, minutes=1) < cutoff <= after - timedelta(days=days)


def test_retention_on_partitions_drops_whole_months_and_deletes_the_rest(empty_db):
    now = datetime.now(UTC)
    migrate_here(empty_db.params, partition=True, now=now - timedelta(days=93))
    migrate_here(empty_db.params, now=now - timedelta(days=62))
    migrate_here(empty_db.params, now=now - timedelta(days=31))
    migrate_here(empty_db.params, now=now)
    empty_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    empty_db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
    logs_by_age(empty_db, [0, 20, 45, 70, 85])
    days = 50
    cutoff = now - timedelta(days=days)
    droppable = sorted(
        name
        for name, (lower, upper) in partition_ranges(empty_db).items()
        if upper is not None and upper <= cutoff
    )
    assert droppable  # the months of 70 and 85 days ago, at least one of them whole

    dry = run_migrate(empty_db.url, "--retain-request-logs", str(days), "--dry-run")
    result = run_migrate(empty_db.url, "--retain-request-logs", str(days))

    assert dry.returncode == 0 and result.returncode == 0, result.stderr
    for name in droppable:
        # Beside the DEFAULT partition PostgreSQL refuses DETACH ... CONCURRENTLY.
        assert f'ALTER TABLE "request_logs" DETACH PARTITION "{name}";' in dry.stdout
        assert f"migrate: dropped partition {name}" in result.stderr
        assert not empty_db.rows("SELECT 1 FROM pg_class WHERE relname = %s", name)
    ages = empty_db.rows(
        "SELECT extract(day FROM now() - created_at)::int FROM request_logs ORDER BY 1"
    )
    assert [age for (age,) in ages] == [0, 20, 45]


def test_retention_drops_a_month_only_once_its_end_is_past_the_cutoff(empty_db):
    now = datetime.now(UTC)
    migrate_here(empty_db.params, partition=True, now=now - timedelta(days=62))
    migrate_here(empty_db.params, now=now - timedelta(days=31))
    empty_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    empty_db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
    end = month(now, -1)  # the end of the month before last, a partition of its own
    older = partition.month_name(month(now, -2))
    for moment in (end - timedelta(minutes=2), end - timedelta(seconds=30)):
        empty_db.rows(INSERT_LOG.format(created_at="%s"), moment)

    # The cutoff a minute before the month's end: its rows before the cutoff go, the month stays.
    migrate_here(empty_db.params, retain_days=1, now=end + timedelta(days=1, minutes=-1))
    assert older in partition_ranges(empty_db)
    assert empty_db.rows("SELECT created_at FROM request_logs") == [(end - timedelta(seconds=30),)]

    # The cutoff a minute after it: the whole month goes.
    migrate_here(empty_db.params, retain_days=1, now=end + timedelta(days=1, minutes=1))
    assert older not in partition_ranges(empty_db)
    assert empty_db.value("SELECT count(*) FROM request_logs") == 0


def partition_ranges(db):
    ranges = {}
    for name, bound in layout(db).items():
        match = partition.BOUND.fullmatch(bound)
        if match:
            ranges[name] = tuple(partition.bound_value(v) for v in match.groups())
    return ranges


def test_retention_after_conversion_keeps_the_converted_tables_newer_rows_and_drops_it(migrated_db):
    add_users_and_logs(migrated_db, logs=0)
    logs_by_age(migrated_db, [1, 40, 400])
    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0

    result = run_migrate(migrated_db.url, "--retain-request-logs", "30")

    assert result.returncode == 0, result.stderr
    assert "dropped request_logs_legacy, removing its rows before" in result.stderr
    assert migrated_db.value("SELECT to_regclass('request_logs_legacy')") is None
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 1


def test_a_concurrent_detach_stopped_part_way_is_named_and_finished_by_the_next_run(
    empty_db, start_migrate
):
    now = datetime.now(UTC)
    migrate_here(empty_db.params, partition=True, now=now - timedelta(days=93))
    migrate_here(empty_db.params, now=now)
    empty_db.rows("DROP TABLE request_logs_default")  # beside it, no DETACH ... CONCURRENTLY
    old = partition.month_name(month(now - timedelta(days=93)))
    reader = session(empty_db, "SELECT count(*) FROM request_logs")  # a snapshot that sees it
    run = start_migrate(empty_db.url, "--retain-request-logs", "45", "--lock-timeout", "60")
    try:
        wait_for_lock_wait(
            empty_db,
            "the detach to wait for the reader",
            run=run,
            query="%DETACH PARTITION%CONCURRENTLY%",
        )
        run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate(timeout=60)
    finally:
        reader.rollback()
        reader.close()
    pending = empty_db.rows(
        "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = %s::regclass", old
    )
    again = run_migrate(empty_db.url, "--retain-request-logs", "45")

    assert run.returncode == 128 + signal.SIGTERM
    assert pending == [(True,)]
    assert f"partition {old} was left DETACH PENDING" in stderr
    assert again.returncode == 0, again.stderr
    assert f"migrate: dropped partition {old}" in again.stderr
    assert old not in empty_db.tables()


def test_check_ignores_retention_and_refuses_the_flag(migrated_db):
    result = run_migrate(migrated_db.url, "--check", "--retain-request-logs", "30")
    assert result.returncode == migrate.EXIT_ERROR
    assert "--check reports no retention: run --dry-run with it" in result.stderr


# --- The Go backend --------------------------------------------------------------------------

# What GORM's AutoMigrate reads before it decides what to send, as its postgres migrator
# queries it (go-gorm/gorm migrator/migrator.go, go-gorm/postgres migrator.go, v1.31 / v1.6):
# HasTable, ColumnTypes, the unique constraints of ColumnTypes, HasIndex, HasConstraint.
GORM_READS = {
    "HasTable": "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema()"
    " AND table_name = 'request_logs' AND table_type = 'BASE TABLE'",
    "ColumnTypes": "SELECT c.column_name, c.is_nullable = 'YES', c.udt_name, c.character_maximum_length,"
    " c.numeric_precision, c.numeric_precision_radix, c.numeric_scale, c.datetime_precision,"
    " 8 * typlen, c.column_default, c.identity_increment FROM information_schema.columns AS c"
    " JOIN pg_type AS pgt ON c.udt_name = pgt.typname WHERE table_catalog = current_database()"
    " AND table_schema = current_schema() AND table_name = 'request_logs' ORDER BY c.ordinal_position",
    "unique": "SELECT constraint_name FROM information_schema.table_constraints WHERE table_schema ="
    " current_schema() AND table_name = 'request_logs' AND constraint_type = 'UNIQUE'",
    "HasIndex": "SELECT indexname FROM pg_indexes WHERE tablename = 'request_logs'"
    " AND schemaname = current_schema() AND indexname = ANY(%s) ORDER BY 1",
    "HasConstraint": "SELECT constraint_name FROM information_schema.table_constraints WHERE"
    " table_schema = current_schema() AND table_name = 'request_logs'"
    " AND constraint_name IN ('fk_request_logs_user', 'fk_request_logs_api_key') ORDER BY 1",
}


def gorm_reads(db):
    return {
        name: db.rows(query, CONTRACT_LOG_INDEXES) if "%s" in query else db.rows(query)
        for name, query in GORM_READS.items()
    }


def test_gorm_reads_the_same_request_logs_before_and_after_conversion(migrated_db):
    add_dated_logs(migrated_db, 100)
    plain = gorm_reads(migrated_db)

    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0

    assert is_partitioned(migrated_db)
    assert gorm_reads(migrated_db) == plain
    assert plain["HasIndex"] == [(name,) for name in CONTRACT_LOG_INDEXES]
    assert not [row for row in plain["ColumnTypes"] if row[0] == "created_at" and not row[1]]


def test_gorm_reads_the_same_request_logs_on_a_fresh_partitioned_layout(empty_db):
    assert run_migrate(empty_db.url).returncode == 0
    plain = gorm_reads(empty_db)
    empty_db.reset()
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    assert is_partitioned(empty_db)
    assert gorm_reads(empty_db) == plain
    assert plain["HasTable"] == [(1,)]
    assert len(plain["ColumnTypes"]) == len(RequestLog._meta.sorted_fields)


def test_a_plain_run_beside_a_converted_layout_changes_nothing(migrated_db):
    add_dated_logs(migrated_db, 100)
    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0
    record_ddl(migrated_db)
    assert "schema is up to date" in run_migrate(migrated_db.url).stderr
    assert migrated_db.rows("SELECT command FROM audit.ddl_log") == []


def test_retention_detaches_concurrently_where_there_is_no_default_partition(empty_db):
    now = datetime.now(UTC)
    migrate_here(empty_db.params, partition=True, now=now - timedelta(days=70))
    migrate_here(empty_db.params, now=now)
    empty_db.rows("ALTER TABLE request_logs DETACH PARTITION request_logs_default")
    empty_db.rows("DROP TABLE request_logs_default")
    oldest = partition.month_name(month(now - timedelta(days=70)))

    result = run_migrate(empty_db.url, "--retain-request-logs", "40")

    assert result.returncode == 0, result.stderr
    assert (
        f"migrate: detaching partition {oldest}: started (instant, waits for older transactions)"
        in (result.stderr.splitlines())
    )
    assert not empty_db.rows("SELECT 1 FROM pg_class WHERE relname = %s", oldest)


# --- Found by trying to break it -------------------------------------------------------------


def seed_keys(db):
    db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")


def test_upkeep_keeps_a_row_committed_while_it_waits_for_the_default_partition(
    empty_db, start_migrate
):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    this_month = partition.month_name(month(datetime.now(UTC)))
    empty_db.rows(f"ALTER TABLE request_logs DETACH PARTITION {this_month}")
    empty_db.rows(f"DROP TABLE {this_month}")
    seed_keys(empty_db)
    for _ in range(100):  # this month's rows now land in the default partition
        empty_db.rows(INSERT_LOG.format(created_at="now()"))
    writer = session(empty_db, INSERT_LOG.format(created_at="now()"))

    run = start_migrate(empty_db.url, "--lock-timeout", "60")
    try:
        wait_for_lock_wait(
            empty_db,
            "upkeep to wait for the writer's insert (its month has begun)",
            run=run,
            table="request_logs_default",
        )
        writer.commit()
    finally:
        writer.close()
    _, stderr = run.communicate(timeout=60)

    assert run.returncode == 0, stderr
    assert f"migrate: attached partition {this_month}" in stderr
    assert empty_db.value("SELECT count(*) FROM request_logs") == 101
    assert empty_db.value(f"SELECT count(*) FROM ONLY {this_month}") == 101


def upkeep_under_inserts(db, created_at, upkeep):
    """50,000 rows dated `created_at` in the default partition, then `upkeep()` while three
    sessions insert more of that date; returns upkeep's result and the inserts' outcomes."""
    seed_keys(db)
    db.rows(
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method,"
        f" path, status_code, response_time) SELECT {created_at}, user_id, id, 1, 'm', 'GET', '/',"
        " 200, 5 FROM api_keys, generate_series(1, 50000)"
    )
    stop, outcomes = threading.Event(), []
    inserters = [
        threading.Thread(target=insert_while, args=(db, stop, outcomes, created_at))
        for _ in range(3)
    ]
    for inserter in inserters:
        inserter.start()
    try:
        poll_until("inserts to run", lambda: len(outcomes) > 30)
        result = upkeep()
        ended = len(outcomes)
        poll_until("inserts after the run", lambda: len(outcomes) > ended + 30)
    finally:
        stop.set()
        for inserter in inserters:
            inserter.join()
    return result, outcomes


def test_upkeep_of_a_missed_month_fails_no_insert_of_that_month(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    this_month = partition.month_name(month(datetime.now(UTC)))
    empty_db.rows(f"ALTER TABLE request_logs DETACH PARTITION {this_month}")
    empty_db.rows(f"DROP TABLE {this_month}")

    result, outcomes = upkeep_under_inserts(  # this month's rows land in the default partition
        empty_db, "now()", lambda: run_migrate(empty_db.url, "--lock-timeout", "60")
    )

    assert result.returncode == 0, result.stderr
    assert f"migrate: attached partition {this_month}" in result.stderr
    assert [o for o in outcomes if isinstance(o, Exception)] == []
    assert empty_db.value("SELECT count(*) FROM ONLY request_logs_default") == 0


@pytest.mark.parametrize("which", ["this month", "default"])
def test_a_detached_partition_holding_its_name_is_drift_not_a_failing_run(empty_db, which):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    name = (
        partition.month_name(month(datetime.now(UTC)))
        if which == "this month"
        else partition.DEFAULT_PARTITION
    )
    empty_db.rows(f"ALTER TABLE request_logs DETACH PARTITION {name}")

    run = run_migrate(empty_db.url)
    check = run_migrate(empty_db.url, "--check")

    assert run.returncode == 0, run.stderr
    assert f"the name {name} upkeep needs for a partition of request_logs is held" in run.stderr
    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert f'-- ALTER TABLE "request_logs" ATTACH PARTITION "{name}"' in check.stdout
    assert "already exists" not in run.stderr + check.stdout


def test_a_partition_covering_part_of_a_month_is_drift_not_a_failing_run(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    following = partition.add_months(month(datetime.now(UTC)), 1)
    name = partition.month_name(following)
    empty_db.rows(f"DROP TABLE {name}")
    empty_db.rows(
        f"CREATE TABLE {quoted('half of it')} PARTITION OF request_logs FOR VALUES"
        f" FROM ('{following.isoformat()}') TO ('{(following + timedelta(days=14)).isoformat()}')"
    )

    run = run_migrate(empty_db.url)
    check = run_migrate(empty_db.url, "--check")

    assert run.returncode == 0, run.stderr
    assert f'{following:%Y-%m} has no partition of its own: "half of it"' in run.stderr
    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert name not in empty_db.tables()


def test_upkeep_ahead_of_a_month_whose_rows_already_arrive_fails_no_insert(empty_db):
    now = datetime.now(UTC)
    following = month(now, 1)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows(f"DROP TABLE {partition.month_name(following)}")

    _, outcomes = upkeep_under_inserts(  # next month's rows, from clocks ahead of ours
        empty_db,
        f"'{(following + timedelta(seconds=5)).isoformat()}'",
        lambda: migrate_here(empty_db.params, now=now.replace(day=1)),  # beyond the skew margin
    )

    assert [o for o in outcomes if isinstance(o, Exception)] == []
    assert empty_db.value("SELECT count(*) FROM ONLY request_logs_default") == 0


@pytest.mark.parametrize(("hours_before", "moved"), [(12, True), (72, False)])
def test_upkeep_switches_in_a_month_that_begins_within_a_day_of_skewed_clocks(
    empty_db, hours_before, moved
):
    """A month whose rows may already arrive (clocks ahead of ours) is filled beside the layout
    and switched in, never attached while inserts could route to the default partition; one
    further off is attached empty. Neither holds inserts with a SHARE lock."""
    now = datetime.now(UTC)
    following = month(now, 1)
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows(f"DROP TABLE {partition.month_name(following)}")  # no row in default

    migrate.connect(empty_db.params)
    plan = apply.Planner(now=following - timedelta(hours=hours_before)).read(target_schema())

    names = [step.name for step in plan.steps]
    assert any(name.startswith("prepare the move") for name in names) == moved, names
    assert ("attach the months ahead" in names) == (not moved), names
    assert not [s.sql for s in plan.pending if "IN SHARE MODE" in s.sql]


def test_conversion_carries_grants_owner_and_checks_to_the_partitioned_table(migrated_db):
    role = scoped_name(migrated_db.name, "gateway")
    migrated_db.rows(f"CREATE ROLE {quoted(role)} LOGIN")
    try:
        migrated_db.rows(f"GRANT SELECT, INSERT ON request_logs TO {quoted(role)}")
        migrated_db.rows(
            "ALTER TABLE request_logs ADD CONSTRAINT positive_time CHECK (response_time >= 0)"
        )
        add_dated_logs(migrated_db, 10)

        result = run_migrate(migrated_db.url, "--partition-request-logs")

        assert result.returncode == 0, result.stderr
        assert is_partitioned(migrated_db)
        assert migrated_db.value("SELECT has_table_privilege(%s, 'request_logs', 'INSERT')", role)
        for created_at in ("now()", "'2999-01-01 00:00+00'"):
            with pytest.raises(psycopg2.errors.CheckViolation):
                migrated_db.rows(
                    INSERT_LOG.format(created_at=created_at).replace("200, 5", "200, -5")
                )
        assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_OK
    finally:
        migrated_db.rows(f"DROP OWNED BY {quoted(role)}")
        migrated_db.rows(f"DROP ROLE {quoted(role)}")


def test_a_trigger_the_conversion_cannot_carry_over_blocks_it_before_any_change(migrated_db):
    migrated_db.rows(
        "CREATE FUNCTION stamp() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$"
    )
    migrated_db.rows(
        "CREATE TRIGGER audit BEFORE INSERT ON request_logs FOR EACH ROW EXECUTE FUNCTION stamp()"
    )
    before = catalog(migrated_db)

    check = run_migrate(migrated_db.url, "--check", "--partition-request-logs")
    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert check.returncode == result.returncode == migrate.EXIT_ERROR
    assert "request_logs cannot be converted to monthly partitions" in error_line(result)
    assert "trigger audit" in error_line(result)
    assert catalog(migrated_db) == before


def test_a_name_the_conversion_needs_held_by_a_view_blocks_it_before_any_change(migrated_db):
    migrated_db.rows("CREATE VIEW request_logs_default AS SELECT 1 AS id")
    before = catalog(migrated_db)
    result = run_migrate(migrated_db.url, "--partition-request-logs")
    assert result.returncode == migrate.EXIT_ERROR
    assert "the name request_logs_default (held by the view request_logs_default)" in (
        error_line(result)
    )
    assert catalog(migrated_db) == before


def test_a_conversion_whose_boundary_is_near_is_bounded_again_and_finishes(migrated_db):
    add_dated_logs(migrated_db, 10)
    conversion_state(migrated_db, "index")  # bounded before next month, validated
    boundary = partition.boundary_after(datetime.now(UTC))

    migrate_here(migrated_db.params, partition=True, now=boundary - timedelta(hours=6))

    ranges = partition_ranges(migrated_db)
    assert ranges[partition.LEGACY] == (None, partition.add_months(boundary, 1))


def test_a_plain_run_drops_an_unfinished_conversions_bound_before_it_refuses_inserts(migrated_db):
    add_dated_logs(migrated_db, 10)
    conversion_state(migrated_db, "validate")
    boundary = partition.boundary_after(datetime.now(UTC))

    _, done = migrate_here(migrated_db.params, now=boundary - timedelta(hours=6))

    assert [s.description for s in done] == [
        f"dropped the unfinished conversion's bound {partition.CHECK_PREFIX}{boundary:%Y_%m}"
    ]
    assert not migrated_db.rows(
        "SELECT 1 FROM pg_constraint WHERE conname LIKE 'request_logs_before_%'"
    )


def test_a_partition_in_another_schema_is_drift_not_a_match(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    schema = scoped_name(empty_db.name, "archive")
    empty_db.rows(f"CREATE SCHEMA {quoted(schema)}")
    try:
        empty_db.rows(f"CREATE TABLE {quoted(schema)}.june (LIKE request_logs INCLUDING DEFAULTS)")
        empty_db.rows(
            f"ALTER TABLE request_logs ATTACH PARTITION {quoted(schema)}.june"
            " FOR VALUES FROM ('2001-06-01 00:00+00') TO ('2001-07-01 00:00+00')"
        )
        check = run_migrate(empty_db.url, "--check")
        assert check.returncode == migrate.EXIT_DRIFT, check.stdout
        assert "-- request_logs has partitions outside its schema" in check.stdout
    finally:
        empty_db.rows(f"DROP SCHEMA {quoted(schema)} CASCADE")


@pytest.mark.parametrize("upper", ["'infinity'", "'12000-01-01 00:00+00'"])
def test_a_partition_bound_python_cannot_read_as_a_date_is_no_crash(empty_db, upper):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows(
        "CREATE TABLE request_logs_future (LIKE request_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS)"
    )
    empty_db.rows(
        "ALTER TABLE request_logs ATTACH PARTITION request_logs_future"
        f" FOR VALUES FROM ('2990-01-01 00:00+00') TO ({upper})"
    )
    for args in (["--check"], ["--retain-request-logs", "30", "--dry-run"], []):
        result = run_migrate(empty_db.url, *args)
        assert result.returncode in (0, 3), result.stderr
        assert "unexpected" not in result.stderr


@pytest.mark.parametrize(
    "created_at", ["'12000-01-05 00:00+00'", "'0044-03-15 00:00+00 BC'", "'-infinity'"]
)
def test_a_default_row_dated_past_what_python_reads_is_drift_not_a_crash(empty_db, created_at):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    add_users_and_logs(empty_db, logs=0)
    empty_db.rows(INSERT_LOG.format(created_at=created_at))  # lands in request_logs_default
    results = [
        run_migrate(empty_db.url, *args)
        for args in (["--check"], ["--check", "--format", "json"], [])
    ]
    assert [r.returncode for r in results] == [migrate.EXIT_DRIFT, migrate.EXIT_DRIFT, 0]
    assert "request_logs_default holds 1 row" in results[0].stdout
    shown = {"'-infinity'": "-infinity", "'0044-03-15 00:00+00 BC'": "0044-03 BC"}
    assert shown.get(created_at, "12000-01") in results[0].stdout
    assert not any("unexpected" in r.stderr for r in results)


HOSTILE_PARTITION = "old\nDROP TABLE sign_in_records;--"


def test_a_partition_named_with_a_newline_neither_splits_lines_nor_runs_in_psql(empty_db):
    from test_reports import pipe_into_psql, stderr_lines_are_all_ours

    run_migrate(empty_db.url, "--partition-request-logs")
    add_users_and_logs(empty_db, logs=0)
    empty_db.rows(
        f"CREATE TABLE {quoted(HOSTILE_PARTITION)} PARTITION OF request_logs"
        " FOR VALUES FROM ('2020-01-01 00:00+00') TO ('2020-02-01 00:00+00')"
    )
    empty_db.rows(INSERT_LOG.format(created_at="'2020-01-05 00:00+00'"))
    empty_db.rows("DROP INDEX idx_request_logs_model")  # a build on each partition, the odd one too

    dry = run_migrate(empty_db.url, "--retain-request-logs", "45", "--dry-run")
    check = run_migrate(empty_db.url, "--check")
    run = run_migrate(empty_db.url, "--retain-request-logs", "45")
    pipe_into_psql(empty_db, dry.stdout)  # a smuggled statement would run, whatever else fails
    pipe_into_psql(empty_db, check.stdout)

    assert any(
        line.startswith('-- then: drop "old\\nDROP TABLE sign_in_records;--" (')
        for line in dry.stdout.splitlines()
    )
    assert not any(
        line.startswith("DROP TABLE sign_in_records") for line in check.stdout.splitlines()
    )
    assert "sign_in_records" in empty_db.tables()
    assert run.returncode == 0, run.stderr
    assert stderr_lines_are_all_ours(run) and stderr_lines_are_all_ours(check)
    assert 'dropped partition "old\\nDROP TABLE sign_in_records;--"' in run.stderr


def test_rows_deleted_from_a_partition_named_with_a_newline_are_reported_on_one_line(empty_db):
    from test_reports import stderr_lines_are_all_ours

    now = datetime.now(UTC)
    run_migrate(empty_db.url, "--partition-request-logs")
    add_users_and_logs(empty_db, logs=0)
    empty_db.rows(
        f"CREATE TABLE {quoted(HOSTILE_PARTITION)} PARTITION OF request_logs"
        " FOR VALUES FROM ('2020-01-01 00:00+00') TO (%s)",
        month(now),
    )
    for created_at in ("'2020-01-05 00:00+00'", f"'{month(now) - timedelta(days=1)}'"):
        empty_db.rows(INSERT_LOG.format(created_at=created_at))

    run = run_migrate(empty_db.url, "--retain-request-logs", "45")

    assert run.returncode == 0, run.stderr
    assert stderr_lines_are_all_ours(run), run.stderr
    assert 'dropped "old\\nDROP TABLE sign_in_records;--", removing its rows before' in run.stderr
    assert empty_db.value("SELECT count(*) FROM request_logs") == 1
