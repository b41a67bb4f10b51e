"""
What an operator's database did to the partitioned layout's upkeep and retention: a
publication of all tables made after the conversion, and the application's ADD COLUMN while
a move was stopped part way. Each finished by the next run, no row lost or duplicated.
"""

import signal
from datetime import UTC, datetime

import partition
from conftest import poll_until, run_migrate
from test_partition_upkeep import default_of, fill, layout_made_months_ago, legacy_layout, rows_of
from test_partitions import layout, month

IDS = "SELECT count(*), sum(id), count(DISTINCT id) FROM request_logs"


def publication_of_all_tables(db):
    name = f"{db.name}_all"
    db.rows(f'DROP PUBLICATION IF EXISTS "{name}"')
    db.rows(f'CREATE PUBLICATION "{name}" FOR ALL TABLES')
    return name


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
    layout_made_months_ago(empty_db, 4)
    this = month(datetime.now(UTC))
    fill(empty_db, this, 2_000, spread=60)
    name = partition.month_name(this)
    run = start_migrate(empty_db.url)
    poll_until(
        f"{name} is made beside the layout",
        lambda: empty_db.value("SELECT to_regclass(%s) IS NOT NULL", name),
        every=0.002,
    )
    run.send_signal(signal.SIGKILL)
    run.communicate(timeout=60)
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
