"""
What an operator's database did to the partitioned layout's upkeep and retention: a
publication of all tables made after the conversion, and the application's ADD COLUMN while
a move was stopped part way. Each finished by the next run, no row lost or duplicated.
"""

import signal
import threading
from datetime import UTC, datetime

import psycopg2
import pytest

import partition
from conftest import poll_until, run_migrate, wait_for_lock_wait
from test_partition_upkeep import default_of, fill, layout_made_months_ago, legacy_layout, rows_of
from test_partitions import layout, month

IDS = "SELECT count(*), sum(id), count(DISTINCT id) FROM request_logs"


def publication_of_all_tables(db):
    name = f"{db.name}_all"
    db.rows(f'DROP PUBLICATION IF EXISTS "{name}"')
    db.rows(f'CREATE PUBLICATION "{name}" FOR ALL TABLES')
    return name


def move_killed_once_its_copy_is_made(db, start_migrate, before=None):
    """This month's 2,000 rows in the default partition (and `before`, SQL, run), and a run
    killed (kill -9) once the month's copy exists beside the layout: (the month's partition
    name, the month)."""
    layout_made_months_ago(db, 4)
    this = month(datetime.now(UTC))
    fill(db, this, 2_000, spread=60)
    if before:
        db.rows(before)
    name = partition.month_name(this)
    run = start_migrate(db.url)
    poll_until(
        f"{name} is made beside the layout",
        lambda: db.value("SELECT to_regclass(%s) IS NOT NULL", name),
        every=0.002,
    )
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    return name, this


def test_a_move_out_of_the_default_finishes_beside_a_publication_of_all_tables(empty_db):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 2_000, spread=60)
    before = empty_db.rows(IDS)
    name = publication_of_all_tables(empty_db)
    try:
        run = run_migrate(empty_db.url)
    finally:
        empty_db.rows(f'DROP PUBLICATION "{name}"')

    assert run.returncode == 0, run.stderr
    assert rows_of(empty_db, partition.month_name(this)) == 2_000
    assert rows_of(empty_db, default_of(empty_db)) == 0
    assert empty_db.rows(IDS) == before


def test_retention_on_a_converted_table_finishes_beside_a_publication_of_all_tables(empty_db):
    legacy_layout(empty_db, 3_000)
    kept = empty_db.value(
        "SELECT count(*) FROM request_logs WHERE created_at >= now() - interval '89 days'"
    )
    name = publication_of_all_tables(empty_db)
    try:
        run = run_migrate(empty_db.url, "--retain-request-logs", "90")
    finally:
        empty_db.rows(f'DROP PUBLICATION "{name}"')

    assert run.returncode == 0, run.stderr
    assert empty_db.value("SELECT to_regclass('request_logs_legacy')") is None
    assert empty_db.value("SELECT count(*) FROM request_logs") >= kept


def test_a_column_added_while_a_move_was_stopped_is_in_the_copies_the_next_run_attaches(
    empty_db, start_migrate
):
    name, this = move_killed_once_its_copy_is_made(empty_db, start_migrate)
    # GORM's AutoMigrate, for a field the application's new version has.
    empty_db.rows("ALTER TABLE request_logs ADD COLUMN region text")
    fill(empty_db, this, 10, spread=60)
    before = empty_db.rows(IDS)

    again = run_migrate(empty_db.url)

    assert again.returncode == 0, again.stderr
    assert layout(empty_db)[name].startswith("FOR VALUES FROM")
    assert rows_of(empty_db, name) == 2_010 and rows_of(empty_db, default_of(empty_db)) == 0
    assert empty_db.rows(IDS) == before
    assert (
        empty_db.value(
            "SELECT count(*) FROM pg_tables WHERE tablename IN"
            " ('request_logs_moving', 'request_logs_default_next', 'request_logs_default_moved_out')"
        )
        == 0
    )


def test_an_index_and_a_key_added_while_a_move_was_stopped_are_made_beside_not_under_the_switch(
    empty_db, start_migrate
):
    name, _ = move_killed_once_its_copy_is_made(empty_db, start_migrate)
    # A DBA's index and foreign key: PostgreSQL makes them on every partition, not on the copies.
    empty_db.rows(
        "CREATE TABLE dba_configs (id bigint PRIMARY KEY); INSERT INTO dba_configs VALUES (1)"
    )
    empty_db.rows("CREATE INDEX request_logs_path_dba ON request_logs (path)")
    empty_db.rows(
        "ALTER TABLE request_logs ADD CONSTRAINT request_logs_config_dba"
        " FOREIGN KEY (api_config_id) REFERENCES dba_configs (id)"
    )
    before = empty_db.rows(IDS)

    dry = run_migrate(empty_db.url, "--dry-run")
    again = run_migrate(empty_db.url)

    # The copy is made again, LIKE the parent as it is now: the index and the key are made on
    # it while it is empty, not by the switch's ATTACH under its lock on request_logs.
    before_switch = dry.stdout[: dry.stdout.index("switch request_logs_default")]
    assert f'DROP TABLE "{name}"' in before_switch, dry.stdout
    assert f'ALTER TABLE "{name}" ADD CONSTRAINT "request_logs_config_dba"' in before_switch
    assert again.returncode == 0, again.stderr
    assert empty_db.rows(IDS) == before
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    adopted = empty_db.rows(
        "SELECT p.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " JOIN pg_inherits h ON h.inhrelid = i.oid JOIN pg_class p ON p.oid = h.inhparent"
        " WHERE x.indrelid = %s::regclass",
        name,
    )
    assert ("request_logs_path_dba",) in adopted
    key = empty_db.rows(
        "SELECT k.convalidated, parent.conname FROM pg_constraint k"
        " JOIN pg_constraint parent ON parent.oid = k.conparentid"
        " WHERE k.conrelid = %s::regclass AND k.confrelid = 'dba_configs'::regclass",
        name,
    )
    assert key == [(True, "request_logs_config_dba")]


def test_a_check_added_while_a_move_was_stopped_is_on_the_copies_made_again(
    empty_db, start_migrate
):
    name, _ = move_killed_once_its_copy_is_made(empty_db, start_migrate)
    # ATTACH refuses a copy without it: every later run's switch failed.
    empty_db.rows("ALTER TABLE request_logs ADD CONSTRAINT dba_positive CHECK (id > 0)")

    again = run_migrate(empty_db.url)

    assert again.returncode == 0, again.stderr
    assert f"dropped the unfinished copy {name}" in again.stderr
    assert layout(empty_db)[name].startswith("FOR VALUES FROM")
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert empty_db.value(
        "SELECT conislocal OR coninhcount > 0 FROM pg_constraint"
        " WHERE conrelid = %s::regclass AND conname = 'dba_positive'",
        name,
    )
    assert run_migrate(empty_db.url, "--check").returncode == 0


def test_a_check_replaced_while_a_move_was_stopped_is_on_the_copies_made_again(
    empty_db, start_migrate
):
    name, _ = move_killed_once_its_copy_is_made(
        empty_db,
        start_migrate,
        before="ALTER TABLE request_logs ADD CONSTRAINT dba_positive CHECK (id > 0)",
    )
    # The same name, another expression: ATTACH refused the old copy ("different definition").
    empty_db.rows(
        "ALTER TABLE request_logs DROP CONSTRAINT dba_positive,"
        " ADD CONSTRAINT dba_positive CHECK (id >= 1)"
    )

    again = run_migrate(empty_db.url)

    assert again.returncode == 0, again.stderr
    assert f"dropped the unfinished copy {name}" in again.stderr
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert (
        empty_db.value(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
            " WHERE conrelid = %s::regclass AND conname = 'dba_positive'",
            name,
        )
        == "CHECK ((id >= 1))"
    )


def test_a_check_dropped_while_a_move_was_stopped_is_not_on_the_copies_made_again(
    empty_db, start_migrate
):
    name, _ = move_killed_once_its_copy_is_made(
        empty_db,
        start_migrate,
        before="ALTER TABLE request_logs ADD CONSTRAINT small_status CHECK (status_code < 600)",
    )
    # A row the parent now takes and the old copy's CHECK refuses.
    empty_db.rows("ALTER TABLE request_logs DROP CONSTRAINT small_status")
    empty_db.rows(
        "UPDATE request_logs SET status_code = 700 WHERE id = (SELECT max(id) FROM request_logs)"
    )

    again = run_migrate(empty_db.url)

    assert again.returncode == 0, again.stderr
    assert f"dropped the unfinished copy {name}" in again.stderr
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert not empty_db.value(
        "SELECT count(*) FROM pg_constraint WHERE conrelid = %s::regclass"
        " AND conname = 'small_status'",
        name,
    )


def test_a_row_breaking_a_not_valid_check_stops_a_move_saying_so_until_it_is_fixed(empty_db):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 2_000, spread=60)
    empty_db.rows(
        "UPDATE request_logs SET response_time = -1 WHERE id = (SELECT min(id) FROM request_logs)"
    )
    # NOT VALID: the old row stays; the copy, made LIKE request_logs, enforces it on every row.
    empty_db.rows(
        "ALTER TABLE request_logs ADD CONSTRAINT dba_time CHECK (response_time >= 0) NOT VALID"
    )

    stopped = run_migrate(empty_db.url)
    empty_db.rows("UPDATE request_logs SET response_time = 0 WHERE response_time < 0")
    again = run_migrate(empty_db.url)

    assert stopped.returncode == 2
    assert "rejected: a row breaks a CHECK constraint (fix the row" in stopped.stderr
    assert '"dba_time"' in stopped.stderr and "Traceback" not in stopped.stderr
    assert again.returncode == 0, again.stderr
    name = partition.month_name(this)
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0


def test_a_not_valid_check_of_request_logs_leaves_a_move_s_copy_as_it_is(empty_db, start_migrate):
    # The copy's CHECK is valid (LIKE), the parent's NOT VALID: ATTACH accepts it, so the copy
    # is kept, not made again by every run.
    name, _ = move_killed_once_its_copy_is_made(
        empty_db,
        start_migrate,
        before="ALTER TABLE request_logs ADD CONSTRAINT dba_positive CHECK (id > 0) NOT VALID",
    )

    again = run_migrate(empty_db.url)

    assert again.returncode == 0, again.stderr
    assert "dropped the unfinished copy" not in again.stderr
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0


def test_a_key_that_sets_some_columns_null_is_made_on_the_copies_not_validated_by_the_switch(
    empty_db, start_migrate
):
    name, _ = move_killed_once_its_copy_is_made(empty_db, start_migrate)
    # ON DELETE SET NULL of a column list (PostgreSQL 15+).
    empty_db.rows(
        "CREATE TABLE dba_configs (id bigint PRIMARY KEY); INSERT INTO dba_configs VALUES (1)"
    )
    empty_db.rows("ALTER TABLE request_logs ADD COLUMN config_ref bigint")
    empty_db.rows(
        "ALTER TABLE request_logs ADD CONSTRAINT request_logs_config_dba FOREIGN KEY"
        " (config_ref) REFERENCES dba_configs (id) ON DELETE SET NULL (config_ref)"
    )

    dry = run_migrate(empty_db.url, "--dry-run")
    again = run_migrate(empty_db.url)

    assert again.returncode == 0, again.stderr
    assert layout(empty_db)[name].startswith("FOR VALUES FROM")
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    # Made on the copy while empty, so the switch's ATTACH adopts it instead of validating it.
    before_switch = dry.stdout[: dry.stdout.index("switch request_logs_default")]
    assert f'ALTER TABLE "{name}" ADD CONSTRAINT "request_logs_config_dba"' in before_switch
    key = empty_db.rows(
        "SELECT pg_get_constraintdef(k.oid), parent.conname FROM pg_constraint k"
        " JOIN pg_constraint parent ON parent.oid = k.conparentid"
        " WHERE k.conrelid = %s::regclass AND k.confrelid = 'dba_configs'::regclass",
        name,
    )
    assert key == [
        (
            "FOREIGN KEY (config_ref) REFERENCES dba_configs(id) ON DELETE SET NULL (config_ref)",
            "request_logs_config_dba",
        )
    ]


def test_an_index_added_while_a_run_copies_makes_the_run_copy_again_before_its_switch(
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
        with holder.cursor() as cursor:  # the copy into it waits for this reader
            cursor.execute(f'LOCK TABLE "{name}" IN ACCESS SHARE MODE')
        wait_for_lock_wait(empty_db, f"the copy into {name} waits", run=run, table=name)
        empty_db.rows("CREATE INDEX request_logs_path_dba ON request_logs (path)")
    finally:
        holder.close()
    out, err = run.communicate(timeout=120)

    assert run.returncode == 0, err
    assert f"dropped the unfinished copy {name}" in out + err
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    adopted = empty_db.value(
        "SELECT count(*) FROM pg_index x JOIN pg_inherits h ON h.inhrelid = x.indexrelid"
        " WHERE x.indrelid = %s::regclass AND h.inhparent = 'request_logs_path_dba'::regclass",
        name,
    )
    assert adopted == 1


class Inserts(threading.Thread):
    """One of the gateway's writers: a log a transaction, back to back."""

    def __init__(self, url, key):
        super().__init__(daemon=True)
        self.url, self.key, self.stop, self.count, self.errors = url, key, threading.Event(), 0, []

    def run(self):
        connection = psycopg2.connect(self.url)
        connection.autocommit = True
        while not self.stop.is_set():
            try:
                with connection.cursor() as cursor:
                    # As the gateway inserts: the key's ids known, no read of api_keys first.
                    cursor.execute(
                        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id,"
                        " model, method, path, status_code, response_time)"
                        " VALUES (now(), %s, %s, 1, 'w', 'POST', '/', 200, 5)",
                        self.key,
                    )
                self.count += 1
            except psycopg2.Error as exc:
                self.errors.append(str(exc))
        connection.close()


def test_the_old_default_is_unlinked_and_dropped_while_logs_are_inserted_back_to_back(empty_db):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 20_000, spread=60)
    key = empty_db.rows("SELECT user_id, id FROM api_keys LIMIT 1")[0]
    writers = [Inserts(empty_db.url, key) for _ in range(4)]
    for writer in writers:
        writer.start()
    try:
        poll_until("the writers insert", lambda: all(w.count > 10 for w in writers))
        run = run_migrate(empty_db.url, timeout=120)
    finally:
        for writer in writers:
            writer.stop.set()
        for writer in writers:
            writer.join(timeout=30)

    assert run.returncode == 0, run.stderr
    assert [e for w in writers for e in w.errors] == []
    assert empty_db.value("SELECT to_regclass('request_logs_default_moved_out')") is None
    assert rows_of(empty_db, partition.month_name(this)) >= 20_000


def test_a_view_over_request_logs_refuses_the_conversion_naming_it(empty_db):
    plain = run_migrate(empty_db.url)
    assert plain.returncode == 0, plain.stderr
    empty_db.rows(
        "CREATE VIEW recent_errors AS SELECT id, path FROM request_logs WHERE status_code >= 500"
    )

    run = run_migrate(empty_db.url, "--partition-request-logs")

    assert run.returncode == 2
    assert "view public.recent_errors" in run.stderr
    assert empty_db.value("SELECT relkind FROM pg_class WHERE relname = 'request_logs'") == "r"
    # The view still reads request_logs, not a renamed table.
    assert "FROM request_logs" in empty_db.value("SELECT pg_get_viewdef('recent_errors')")


def test_rows_of_a_past_month_in_the_default_get_their_partition_from_a_plain_run(empty_db):
    # Runs every two to three months: the run of month M found M+1 ready and made nothing, the
    # next ran in M+3, so M+2's rows went to the default partition and M+2 is past.
    layout_made_months_ago(empty_db, 4)
    last = month(datetime.now(UTC), -1)
    name = partition.month_name(last)
    empty_db.rows(f'ALTER TABLE request_logs DETACH PARTITION "{name}"')
    empty_db.rows(f'DROP TABLE "{name}"')
    fill(empty_db, last, 1_000)
    before = empty_db.rows(IDS)

    run = run_migrate(empty_db.url)
    check = run_migrate(empty_db.url, "--check")

    assert run.returncode == 0, run.stderr
    assert layout(empty_db)[name].startswith("FOR VALUES FROM")
    assert rows_of(empty_db, name) == 1_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert empty_db.rows(IDS) == before
    assert check.returncode == 0, check.stdout


def a_move_killed_after_its_copy(db, start_migrate):
    """A move out of the default stopped by kill -9 once its month's copy is filled."""
    this = month(datetime.now(UTC))
    fill(db, this, 2_000, spread=60)
    name = partition.month_name(this)
    run = start_migrate(db.url)
    poll_until(
        f"{name} is filled beside the layout",
        lambda: db.value(
            "SELECT obj_description(to_regclass(%s), 'pg_class') LIKE 'migrate.py move: rows copied%%'",
            name,
        ),
        every=0.002,
    )
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
    return name


def indexes_not_of_request_logs(db, table):
    """The indexes of `table` that are no partition of an index of request_logs."""
    return db.rows(
        "SELECT i.relname FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid"
        " LEFT JOIN pg_inherits h ON h.inhrelid = i.oid WHERE x.indrelid = %s::regclass"
        " AND h.inhparent IS NULL",
        table,
    )


def test_an_expression_index_replaced_while_a_move_was_stopped_is_made_beside_not_under_the_switch(
    empty_db, start_migrate
):
    layout_made_months_ago(empty_db, 4)
    empty_db.rows("CREATE INDEX request_logs_model_dba ON request_logs (lower(model))")
    name = a_move_killed_after_its_copy(empty_db, start_migrate)
    # The DBA's index replaced by one of the same shape but another expression.
    empty_db.rows("DROP INDEX request_logs_model_dba")
    empty_db.rows("CREATE INDEX request_logs_path_dba ON request_logs (md5(path))")
    before = empty_db.rows(IDS)

    dry = run_migrate(empty_db.url, "--dry-run")
    again = run_migrate(empty_db.url)

    before_switch = dry.stdout[: dry.stdout.index("switch request_logs_default")]
    assert f'DROP TABLE "{name}"' in before_switch, dry.stdout
    assert again.returncode == 0, again.stderr
    assert empty_db.rows(IDS) == before
    assert rows_of(empty_db, name) == 2_000
    assert indexes_not_of_request_logs(empty_db, name) == []


def test_an_invalid_index_of_request_logs_made_while_a_move_was_stopped_is_in_the_copies(
    empty_db, start_migrate
):
    layout_made_months_ago(empty_db, 4)
    name = a_move_killed_after_its_copy(empty_db, start_migrate)
    # A DBA's index built online: made ON ONLY request_logs (INVALID until every partition's
    # index is attached), ATTACH PARTITION builds it on a table that lacks it.
    empty_db.rows("CREATE INDEX request_logs_path_dba ON ONLY request_logs (path)")
    before = empty_db.rows(IDS)

    dry = run_migrate(empty_db.url, "--dry-run")
    again = run_migrate(empty_db.url)

    before_switch = dry.stdout[: dry.stdout.index("switch request_logs_default")]
    assert f'DROP TABLE "{name}"' in before_switch, dry.stdout
    assert again.returncode == 0, again.stderr
    assert empty_db.rows(IDS) == before
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    adopted = empty_db.value(
        "SELECT count(*) FROM pg_index x JOIN pg_inherits h ON h.inhrelid = x.indexrelid"
        " WHERE x.indrelid = %s::regclass AND h.inhparent = 'request_logs_path_dba'::regclass",
        name,
    )
    assert adopted == 1


def test_an_index_made_while_the_switch_waits_for_its_lock_makes_the_run_copy_again(
    empty_db, start_migrate
):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 2_000, spread=60)
    name = partition.month_name(this)
    holder = psycopg2.connect(empty_db.url)
    try:
        with holder.cursor() as cursor:  # a reader of the default: the switch waits for it
            cursor.execute(f'SELECT count(*) FROM "{default_of(empty_db)}"')
        run = start_migrate(empty_db.url, "--lock-timeout", "60")
        wait_for_lock_wait(empty_db, "the switch waits", run=run, query="%DETACH PARTITION%")
        # A DBA's index, made between two of the switch's lock attempts.
        empty_db.rows("CREATE INDEX request_logs_path_dba ON request_logs (path)")
        made = empty_db.value("SELECT clock_timestamp()")
        poll_until(
            "an attempt of the switch begun after the index was made waits",
            lambda: empty_db.value(
                "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
                " AND NOT l.granted WHERE a.datname = current_database()"
                " AND a.query LIKE '%%DETACH PARTITION%%' AND a.xact_start > %s",
                made,
            ),
            every=0.002,
        )
    finally:
        holder.close()
    out, err = run.communicate(timeout=120)

    assert run.returncode == 0, err
    assert f"dropped the unfinished copy {name}" in out + err
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert indexes_not_of_request_logs(empty_db, name) == []


def commit_inside_a_switch_attempt(db, dba):
    """`dba`'s COMMIT once an attempt of the switch, planned before it, waits for its lock:
    the COMMIT lands inside the attempt's 50 ms, so the DETACH is granted right after it."""

    def attempt_just_begun():
        return db.value(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_locks l ON l.pid = a.pid"
            " AND NOT l.granted WHERE a.datname = current_database()"
            " AND a.query LIKE '%%DETACH PARTITION%%'"
            " AND clock_timestamp() - a.query_start < interval '15 ms'"
        )

    poll_until("an attempt of the switch begins to wait", attempt_just_begun, every=0.001)
    dba.commit()


def switch_attempt_meets_a_commit_of(db, start_migrate, dba_sql, before=None):
    """A run with this month's 2,000 rows in the default whose switch waits (a reader of the
    default), while a DBA's `dba_sql` commits inside one 50 ms attempt of it, after that attempt
    read its plan: (the month's partition name, the run's output)."""
    layout_made_months_ago(db, 4)
    this = month(datetime.now(UTC))
    fill(db, this, 2_000, spread=60)
    if before:
        db.rows(before)
    name = partition.month_name(this)
    holder, dba = psycopg2.connect(db.url), psycopg2.connect(db.url)
    try:
        with holder.cursor() as cursor:  # a reader of the default: the switch waits for it
            cursor.execute(f'SELECT count(*) FROM "{default_of(db)}"')
        run = start_migrate(db.url, "--lock-timeout", "60")
        wait_for_lock_wait(db, "the switch waits", run=run, query="%DETACH PARTITION%")
        with dba.cursor() as cursor:  # holds a lock on request_logs until its COMMIT
            cursor.execute("SET lock_timeout = '30s'")  # a test that fails, not one that hangs
            cursor.execute(dba_sql)
        holder.close()  # from here the switch waits for the DBA's transaction only
        commit_inside_a_switch_attempt(db, dba)
    finally:
        holder.close()
        dba.close()
    out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    return name, out + err


def test_an_index_committed_while_a_switch_attempt_waits_makes_the_run_copy_again(
    empty_db, start_migrate
):
    name, output = switch_attempt_meets_a_commit_of(
        empty_db, start_migrate, "CREATE INDEX request_logs_path_dba ON request_logs (path)"
    )

    assert f"dropped the unfinished copy {name}" in output
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert indexes_not_of_request_logs(empty_db, name) == []


def test_a_switch_whose_last_attempt_meets_a_new_index_says_so_and_the_next_run_finishes(
    empty_db, start_migrate
):
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 2_000, spread=60)
    name = partition.month_name(this)
    dba = psycopg2.connect(empty_db.url)
    try:
        with dba.cursor() as cursor:
            cursor.execute("SET lock_timeout = '30s'")
            # ON ONLY: SHARE on request_logs alone, which only the switch's DETACH waits for.
            cursor.execute("CREATE INDEX request_logs_path_dba ON ONLY request_logs (path)")
        run = start_migrate(empty_db.url, "--lock-timeout", "0.01")  # one attempt
        commit_inside_a_switch_attempt(empty_db, dba)
    finally:
        dba.close()
    _, err = run.communicate(timeout=120)

    # Not "stayed locked": the lock was granted, and the check after it failed.
    assert run.returncode == 2, err
    assert "a foreign key while the switch waited, on its last attempt within" in err, err
    assert "Traceback" not in err
    again = run_migrate(empty_db.url)
    assert again.returncode == 0, again.stderr
    assert f"dropped the unfinished copy {name}" in again.stderr
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0


def test_a_key_validated_while_a_switch_attempt_waits_makes_the_run_copy_again(
    empty_db, start_migrate, pg_server
):
    if pg_server.major < 18:
        pytest.skip("NOT VALID foreign keys of a partitioned table exist from PostgreSQL 18")
    # A NOT VALID key is not carried to the copies. VALIDATE takes SHARE UPDATE EXCLUSIVE,
    # which an attempt's ACCESS SHARE lets commit; ATTACH would then make and validate the key
    # on the filled copy under the switch's lock.
    name, output = switch_attempt_meets_a_commit_of(
        empty_db,
        start_migrate,
        "ALTER TABLE request_logs VALIDATE CONSTRAINT request_logs_config_dba",
        before="CREATE TABLE dba_configs (id bigint PRIMARY KEY); INSERT INTO dba_configs"
        " VALUES (1); ALTER TABLE request_logs ADD CONSTRAINT request_logs_config_dba"
        " FOREIGN KEY (api_config_id) REFERENCES dba_configs (id) NOT VALID",
    )

    assert f"dropped the unfinished copy {name}" in output
    assert rows_of(empty_db, name) == 2_000 and rows_of(empty_db, default_of(empty_db)) == 0
    assert empty_db.value(
        "SELECT convalidated AND conparentid <> 0 FROM pg_constraint"
        " WHERE conrelid = %s::regclass AND conname = 'request_logs_config_dba'",
        name,
    )


def move_held_off_by_a_reader_of(db, table):
    """(pid, run): a run with a 1 s budget while a report's transaction, idle, has read
    `table` (the switch's ATTACH takes ACCESS EXCLUSIVE on what request_logs' keys reference)."""
    holder = psycopg2.connect(db.url)
    try:
        with holder.cursor() as cursor:
            cursor.execute(f"SELECT count(*), pg_backend_pid() FROM {table}")
            pid = cursor.fetchone()[1]
        return pid, run_migrate(db.url, "--lock-timeout", "1")
    finally:
        holder.close()


def test_a_move_held_off_by_a_transaction_on_users_names_it(empty_db):
    layout_made_months_ago(empty_db, 4)
    fill(empty_db, month(datetime.now(UTC)), 2_000, spread=60)
    pid, run = move_held_off_by_a_reader_of(empty_db, "users")

    # The switch's ATTACH takes ACCESS EXCLUSIVE on users: the error names who holds it off.
    assert run.returncode == 2
    assert f"pid {pid} " in run.stderr and "ACCESS SHARE on users" in run.stderr, run.stderr


def test_a_move_held_off_by_a_transaction_on_a_table_of_another_schema_names_it(empty_db):
    layout_made_months_ago(empty_db, 4)
    fill(empty_db, month(datetime.now(UTC)), 2_000, spread=60)
    # A DBA's key from request_logs into a table of another schema (the fixture drops it).
    empty_db.rows("CREATE SCHEMA audit; CREATE TABLE audit.configs (id bigint PRIMARY KEY)")
    empty_db.rows(
        "ALTER TABLE request_logs ADD COLUMN config_ref bigint,"
        " ADD CONSTRAINT config_dba FOREIGN KEY (config_ref) REFERENCES audit.configs (id)"
    )
    pid, run = move_held_off_by_a_reader_of(empty_db, "audit.configs")

    assert run.returncode == 2
    assert f"pid {pid} " in run.stderr and "ACCESS SHARE on audit.configs" in run.stderr, run.stderr
    # The prepare step committed earlier; the switch is not "the transaction".
    assert "the transaction was committed" not in run.stderr
    assert "what this run committed before this step stays" in run.stderr
