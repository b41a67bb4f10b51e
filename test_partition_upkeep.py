"""
Living on the partitioned layout: the default partition found by its bound whatever its name,
a month's rows moved out of it while writers insert (no row lost, duplicated or hidden from a
reader), retention giving the disk back on a converted table, and interrupted work finished
by the next run with the same flags.
"""

import signal
import threading
from datetime import UTC, datetime, timedelta

import psycopg2

import apply
import migrate
import models
import partition
from catalog import target_schema
from conftest import migrate_here, poll_until, run_migrate, wait_for_lock_wait
from test_online import add_users_and_logs
from test_partitions import layout, month

FILL = (
    "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method,"
    " path, status_code, response_time) SELECT {start}::timestamptz"
    " + (g::float8 * {spread} / {count}) * interval '1 second', k.user_id, k.id, 1, 'm', 'POST', '/', 200, 5"
    " FROM generate_series(1, {count}) g, (SELECT * FROM api_keys LIMIT 1) k"
)


def layout_made_months_ago(db, months):
    """The layout as a run `months` ago made it: this month and the next ones have no partition."""
    then = month(datetime.now(UTC), -months) + timedelta(days=3)
    migrate_here(db.params, partition=True, now=then)
    add_users_and_logs(db, logs=0)


def fill(db, start, count, spread=86_400 * 27):
    db.rows(FILL.format(start=f"'{start:%Y-%m-%d %H:%M:%S}+00'", spread=spread, count=count))


def default_of(db):
    return db.value(
        "SELECT c.relname FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partdefid"
        " WHERE p.partrelid = 'request_logs'::regclass"
    )


def rows_of(db, table):
    return db.value(f'SELECT count(*) FROM ONLY "{table}"')


class Writer(threading.Thread):
    """Inserts of this month's logs, one a transaction, as the gateway writes them; and a
    reader counting this month's rows, which must never see the count drop."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url, self.stop, self.ids, self.errors = url, threading.Event(), [], []
        self.counts = []

    def run(self):
        writer = psycopg2.connect(self.url)
        writer.autocommit = True
        reader = psycopg2.connect(self.url)
        reader.autocommit = True
        start = month(datetime.now(UTC))
        try:
            while not self.stop.is_set():
                with writer.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id,"
                        " model, method, path, status_code, response_time) SELECT now(), user_id,"
                        " id, 1, 'w', 'POST', '/', 200, 5 FROM api_keys LIMIT 1 RETURNING id"
                    )
                    self.ids.append(cursor.fetchone()[0])
                with reader.cursor() as cursor:
                    cursor.execute(
                        "SELECT count(*) FROM request_logs WHERE created_at >= %s", (start,)
                    )
                    self.counts.append((len(self.ids), cursor.fetchone()[0]))
        except psycopg2.Error as exc:
            self.errors.append(str(exc))
        finally:
            writer.close()
            reader.close()


def test_a_renamed_default_partition_is_kept_by_its_bound(empty_db):
    layout_made_months_ago(empty_db, 0)
    empty_db.rows("ALTER TABLE request_logs_default RENAME TO request_logs_catchall")

    check = run_migrate(empty_db.url, "--check")
    run = run_migrate(empty_db.url)
    retain = run_migrate(empty_db.url, "--retain-request-logs", "90")

    assert check.returncode == 0, check.stdout
    assert run.returncode == 0 and retain.returncode == 0, run.stderr + retain.stderr
    assert default_of(empty_db) == "request_logs_catchall"
    assert "request_logs_default" not in layout(empty_db)


def test_a_months_rows_leave_the_default_partition_while_inserts_run(empty_db):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 20_000, spread=max(60, int((datetime.now(UTC) - this).total_seconds())))
    default = default_of(empty_db)
    before = rows_of(empty_db, default)
    writer = Writer(empty_db.url)
    writer.start()
    poll_until("the writer has inserted", lambda: len(writer.ids) > 20)

    result = run_migrate(empty_db.url, timeout=300)
    poll_until("the writer inserted after the run", lambda: len(writer.ids) > 0)
    writer.stop.set()
    writer.join()

    assert result.returncode == 0, result.stderr
    assert writer.errors == []
    name = partition.month_name(this)
    assert layout(empty_db)[name].startswith("FOR VALUES FROM")
    assert rows_of(empty_db, default_of(empty_db)) == 0
    ids = [i for (i,) in empty_db.rows("SELECT id FROM request_logs")]
    assert len(ids) == len(set(ids)) == before + len(writer.ids)
    assert set(writer.ids) <= set(ids)
    seen = [count - inserted for inserted, count in writer.counts]
    assert min(seen) == before, "a reader saw rows of the month missing (or twice)"
    assert max(seen) == before
    assert f"copied the rows of {default} for {name}: " in result.stderr
    assert "moved the rows" not in result.stderr
    leftovers = empty_db.rows(
        "SELECT relname FROM pg_class WHERE relname LIKE 'request_logs_%%ing'"
        " OR relname IN ('request_logs_default_next', 'request_logs_default_moved_out')"
    )
    assert leftovers == []


def legacy_layout(db, rows):
    """A plain request_logs with `rows` logs over the last 12 months, converted: all of them
    in request_logs_legacy."""
    migrate_here(db.params)
    add_users_and_logs(db, logs=0)
    start = datetime.now(UTC) - timedelta(days=360)
    fill(db, start, rows, spread=86_400 * 358)
    result = run_migrate(db.url, "--partition-request-logs", timeout=300)
    assert result.returncode == 0, result.stderr
    assert rows_of(db, "request_logs_legacy") == rows


def request_logs_bytes(db):
    return db.value(
        "SELECT sum(pg_total_relation_size(relid)) FROM pg_partition_tree('request_logs')"
    )


def test_retention_on_a_converted_table_keeps_the_rows_in_months_and_gives_the_disk_back(empty_db):
    legacy_layout(empty_db, 60_000)
    cutoff_rows = empty_db.value(
        "SELECT count(*) FROM request_logs WHERE created_at >= now() - interval '90 days'"
    )
    kept = {
        i
        for (i,) in empty_db.rows(
            "SELECT id FROM request_logs WHERE created_at >= now() - interval '89 days'"
        )
    }
    old = empty_db.value(
        "SELECT id FROM request_logs WHERE created_at >= now() - interval '80 days' LIMIT 1"
    )

    result = run_migrate(
        empty_db.url, "--retain-request-logs", "90", "--progress", "0", timeout=300
    )

    assert result.returncode == 0, result.stderr
    assert "request_logs_legacy" not in layout(empty_db)
    assert empty_db.value("SELECT to_regclass('request_logs_legacy')") is None
    ids = [i for (i,) in empty_db.rows("SELECT id FROM request_logs")]
    assert len(ids) == len(set(ids))
    assert kept <= set(ids) and abs(len(ids) - cutoff_rows) < 100
    assert old in ids
    used = request_logs_bytes(empty_db)
    empty_db.rows("CREATE TABLE fresh (LIKE request_logs INCLUDING ALL)")
    empty_db.rows("INSERT INTO fresh SELECT * FROM request_logs")
    fresh = empty_db.value("SELECT pg_total_relation_size('fresh')")
    assert used <= 1.3 * fresh, (used, fresh)


def test_a_soft_delete_of_a_row_copied_already_is_kept(empty_db, start_migrate):
    legacy_layout(empty_db, 20_000)
    this, last = month(datetime.now(UTC)), month(datetime.now(UTC), -1)
    target = empty_db.value(
        "SELECT id FROM request_logs WHERE created_at >= %s AND created_at < %s LIMIT 1", last, this
    )
    copied, waiting = partition.month_name(last), partition.month_name(this)
    holder = psycopg2.connect(empty_db.url)
    try:
        run = start_migrate(empty_db.url, "--retain-request-logs", "90", "--lock-timeout", "60")
        poll_until(
            f"{waiting} is made",
            lambda: empty_db.value("SELECT to_regclass(%s) IS NOT NULL", waiting),
            seconds=120,
            every=0.002,
        )
        # The copy of this month waits for this reader, once last month's copy is done: the
        # soft delete lands after that copy, and the catch-up must replay it.
        with holder.cursor() as cursor:
            cursor.execute(f'LOCK TABLE "{waiting}" IN ACCESS SHARE MODE')
        wait_for_lock_wait(empty_db, f"the copy into {waiting} waits", run=run, table=waiting)
        assert "rows copied" in empty_db.value("SELECT obj_description(%s::regclass)", copied)
        empty_db.rows("UPDATE request_logs SET deleted_at = now() WHERE id = %s", target)
    finally:
        holder.close()
    _, stderr = run.communicate(timeout=300)

    assert run.returncode == 0, stderr
    assert empty_db.value("SELECT deleted_at IS NOT NULL FROM request_logs WHERE id = %s", target)
    assert empty_db.value("SELECT count(*) FROM request_logs WHERE id = %s", target) == 1
    assert empty_db.value("SELECT to_regclass('request_logs_legacy')") is None


def test_a_retention_killed_between_its_detach_and_its_drop_is_finished_by_the_next_run(empty_db):
    layout_made_months_ago(empty_db, 0)
    empty_db.rows("ALTER TABLE request_logs DETACH PARTITION request_logs_default")
    empty_db.rows("DROP TABLE request_logs_default")
    old = month(datetime.now(UTC), -6)
    empty_db.rows(
        f"CREATE TABLE request_logs_old PARTITION OF request_logs FOR VALUES FROM"
        f" ('{old:%Y-%m-%d}+00') TO ('{month(old, 1):%Y-%m-%d}+00')"
    )
    fill(empty_db, old, 100)
    # What the run does up to the kill: its detach step, not the DROP after it.
    migrate.connect(empty_db.params)
    step = next(
        s
        for s in apply.Planner(retain_days=90).read(target_schema()).steps
        if s.name == "detach request_logs_old"
    )
    models.database.close()
    assert "DETACH PARTITION" in step.statements[-1].sql
    for statement in step.statements:
        empty_db.rows(statement.sql)
    assert empty_db.value(
        "SELECT NOT relispartition FROM pg_class WHERE relname = 'request_logs_old'"
    )

    check = run_migrate(empty_db.url, "--check")
    retention_check = run_migrate(empty_db.url, "--dry-run", "--retain-request-logs", "90")
    again = run_migrate(empty_db.url, "--retain-request-logs", "90")

    assert "request_logs_old" in check.stdout and "--retain-request-logs" in check.stdout
    assert "DROP TABLE" in retention_check.stdout
    assert again.returncode == 0, again.stderr
    assert empty_db.value("SELECT to_regclass('request_logs_old')") is None


def test_a_move_killed_part_way_is_named_by_check_and_finished_by_the_next_run(
    empty_db, start_migrate
):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 2_000, spread=60)
    name = partition.month_name(this)
    holder = psycopg2.connect(empty_db.url)
    try:
        run = start_migrate(empty_db.url, "--lock-timeout", "60")
        poll_until(
            f"{name} is made beside the layout",
            lambda: empty_db.value("SELECT to_regclass(%s) IS NOT NULL", name),
            every=0.002,
        )
        with holder.cursor() as cursor:  # its copy or its switch waits for this reader
            cursor.execute(f'LOCK TABLE "{name}" IN ACCESS SHARE MODE')
        wait_for_lock_wait(empty_db, f"the copy into {name} waits", run=run, table=name)
        run.send_signal(signal.SIGKILL)
        run.communicate(timeout=60)
    finally:
        holder.close()
    assert empty_db.value("SELECT count(*) FROM pg_trigger WHERE tgname = 'request_logs_moving'")

    check = run_migrate(empty_db.url, "--check")
    again = run_migrate(empty_db.url)

    # Killed in its copy or its switch (whichever waited for the reader): the work is pending.
    assert "switch request_logs_default for its copies" in check.stdout, check.stdout
    assert check.returncode == 1
    assert again.returncode == 0, again.stderr
    assert layout(empty_db)[name].startswith("FOR VALUES FROM")
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert (
        empty_db.value("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'request_logs_%%'") == 0
    )


def test_a_retention_stopped_part_way_is_drift_until_the_next_retention_run(
    empty_db, start_migrate
):
    legacy_layout(empty_db, 5_000)
    name = partition.month_name(month(datetime.now(UTC)))
    kept = empty_db.value(
        "SELECT count(*) FROM request_logs WHERE created_at >= now() - interval '89 days'"
    )
    holder = psycopg2.connect(empty_db.url)
    try:
        run = start_migrate(empty_db.url, "--retain-request-logs", "90", "--lock-timeout", "60")
        poll_until(
            f"{name} is made beside the layout",
            lambda: empty_db.value("SELECT to_regclass(%s) IS NOT NULL", name),
            every=0.002,
        )
        with holder.cursor() as cursor:
            cursor.execute(f'LOCK TABLE "{name}" IN ACCESS SHARE MODE')
        wait_for_lock_wait(empty_db, f"the copy into {name} waits", run=run, table=name)
        run.send_signal(signal.SIGTERM)
        _, stopped = run.communicate(timeout=60)
    finally:
        holder.close()

    check = run_migrate(empty_db.url, "--check")
    plain = run_migrate(empty_db.url)
    assert check.returncode == 3, check.stdout
    assert "--retain-request-logs DAYS" in check.stdout and "request_logs_legacy" in check.stdout
    assert plain.returncode == 0, plain.stderr
    assert empty_db.value("SELECT to_regclass('request_logs_legacy')"), stopped

    again = run_migrate(empty_db.url, "--retain-request-logs", "90")

    assert again.returncode == 0, again.stderr
    assert empty_db.value("SELECT to_regclass('request_logs_legacy')") is None
    assert (
        empty_db.value(
            "SELECT count(*) FROM request_logs WHERE created_at >= now() - interval '89 days'"
        )
        == kept
    )
