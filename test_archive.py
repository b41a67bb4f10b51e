"""
--retain-request-logs DAYS --archive DIR and --restore-request-logs FILE on a real PostgreSQL:
every removed row is in a verified file first, DuckDB reads the files, a restore gives the
same rows back, and a run stopped at any point (kill -9, SIGTERM, a full file system) loses
nothing and is finished by the next.
"""

import glob
import json
import os
import resource
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

import archive
import catalog
import models
import partition
from conftest import HERE, error_line, migrate_here, quoted, run_migrate, wait_for_lock_wait

RICH_LOGS = """
INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path,
    status_code, response_time, tokens_used, error_msg, deleted_at)
SELECT now() - make_interval(days => age) - g * interval '1 minute' - interval '1 microsecond' * g,
    k.user_id, k.id, g %% 3, 'model-' || (g %% 4), 'POST', E'/v1/\\u00e9\\n' || g, 200 + g %% 3, g,
    g * 7, CASE g %% 3 WHEN 0 THEN NULL WHEN 1 THEN '' ELSE E'oops\\n"q", \\\\ ' END,
    CASE WHEN g %% 5 = 0 THEN now() END
FROM unnest(%s::int[]) age, generate_series(1, %s) g, api_keys k
"""
DAYS = 50
USAGE = (
    "SELECT user_id, model, count(*), sum(tokens_used) FROM {source}"
    " WHERE created_at < {cutoff} GROUP BY 1, 2 ORDER BY 1, 2"
)


def users_and_keys(db, users=3):
    db.rows(
        "INSERT INTO users (username, email, password_hash)"
        f" SELECT 'u' || g, 'u' || g || '@x', 'h' FROM generate_series(1, {users}) g"
    )
    db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k' || id, 'n' FROM users")


def partitioned_with_logs(db, ages=(0, 20, 45, 70, 85), per_key=50):
    """request_logs by month since 153 days ago, and rows of every kind `ages` days old."""
    now = datetime.now(UTC)
    for days, convert in (
        (153, True),
        (123, False),
        (93, False),
        (62, False),
        (31, False),
        (0, False),
    ):
        migrate_here(db.params, partition=convert, now=now - timedelta(days=days))
    users_and_keys(db)
    db.rows(RICH_LOGS, list(ages), per_key)
    return now - timedelta(days=DAYS)


def plain_with_logs(db, ages=(1, 40, 70), per_key=50):
    migrate_here(db.params)
    users_and_keys(db)
    db.rows(RICH_LOGS, list(ages), per_key)


def all_rows(db, where="true"):
    return db.rows(f"SELECT * FROM request_logs WHERE {where} ORDER BY id")


def archived(directory):
    """Every row of the verified files of DIR, through pyarrow, ordered by id."""
    rows = []
    for path in sorted(glob.glob(os.path.join(directory, "*.parquet"))):
        assert os.path.exists(path.removesuffix(".parquet") + ".manifest.json"), path
        rows += archive.read_parquet(path).to_pylist()
    return sorted(rows, key=lambda row: row["id"])


def as_tuples(rows, db):
    names = [
        name
        for name, _ in db.rows(
            "SELECT attname, 1 FROM pg_attribute WHERE attrelid = 'request_logs'::regclass"
            " AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
        )
    ]
    return [tuple(row[name] for name in names) for row in rows]


def test_archive_holds_every_removed_row_and_duckdb_reads_the_same_usage(empty_db, tmp_path):
    duckdb = pytest.importorskip(
        "duckdb", reason="missing tool: duckdb (pip install -r requirements-test.txt)"
    )
    cutoff = partitioned_with_logs(empty_db)
    literal = f"'{cutoff.isoformat()}'::timestamptz"
    usage = empty_db.rows(USAGE.format(source="request_logs", cutoff=literal))
    removed = all_rows(empty_db, f"created_at < {literal}")
    kept = all_rows(empty_db, f"created_at >= {literal}")
    directory = tmp_path / "new" / "archive"  # made, parents too

    result = run_migrate(
        empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(directory)
    )

    assert result.returncode == 0, result.stderr
    assert removed and usage
    assert all_rows(empty_db) == kept
    assert as_tuples(archived(directory), empty_db) == removed  # NULLs, '' and newlines kept
    files = os.path.join(directory, "*.parquet")
    read = duckdb.sql(USAGE.format(source=f"read_parquet('{files}')", cutoff=literal)).fetchall()
    assert [tuple(row) for row in read] == [tuple(row) for row in usage]
    for path in glob.glob(os.path.join(directory, "*.manifest.json")):
        with open(path) as file:
            manifest = json.load(file)
        data = archive.read_parquet(os.path.join(directory, manifest["file"]["name"]))
        assert manifest["rows"] == len(data)
        assert {c["name"] for c in manifest["columns"]} >= {"id", "created_at", "tokens_used"}
        assert min(data.column("created_at").to_pylist()).isoformat() == manifest["min_created_at"]


def test_a_quiet_archive_run_says_how_many_rows_it_archived_and_where(empty_db, tmp_path):
    cutoff = partitioned_with_logs(empty_db)
    removed = len(all_rows(empty_db, f"created_at < '{cutoff.isoformat()}'::timestamptz"))

    result = run_migrate(
        empty_db.url, "-q", "--retain-request-logs", str(DAYS), "--archive", str(tmp_path)
    )

    files = glob.glob(os.path.join(tmp_path, "*.parquet"))
    assert result.returncode == 0, result.stderr
    [summary] = result.stderr.strip().splitlines()
    files_words = f"{len(files)} file" + ("s" if len(files) != 1 else "")
    assert f"{removed:,} rows archived first in {files_words} of {tmp_path}" in summary
    loud = run_migrate(empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(tmp_path))
    assert "archived" not in loud.stderr  # nothing left to archive: nothing said


def test_a_plain_table_is_archived_by_month_before_its_batched_delete(migrated_db, tmp_path):
    plain_with_logs(migrated_db)
    removed = all_rows(migrated_db, "created_at < now() - interval '30 days'")

    result = run_migrate(migrated_db.url, "--retain-request-logs", "30", "--archive", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert not all_rows(migrated_db, "created_at < now() - interval '30 days'")
    assert as_tuples(archived(tmp_path), migrated_db) == removed
    months = {row["created_at"].strftime("%Y-%m") for row in archived(tmp_path)}
    assert len(glob.glob(os.path.join(tmp_path, "*.parquet"))) == len(months)


def test_restore_brings_back_the_same_rows_and_refuses_rows_already_present(empty_db, tmp_path):
    cutoff = partitioned_with_logs(empty_db)
    before = all_rows(empty_db)
    assert (
        run_migrate(
            empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(tmp_path)
        ).returncode
        == 0
    )
    files = sorted(glob.glob(os.path.join(tmp_path, "*.parquet")))
    top = max(row[0] for row in before)

    restored = [run_migrate(empty_db.url, "--restore-request-logs", path) for path in files]
    again = run_migrate(empty_db.url, "--restore-request-logs", files[0])

    assert files and all(r.returncode == 0 for r in restored), restored[0].stderr
    assert all_rows(empty_db) == before
    assert again.returncode == 2
    assert "already in request_logs" in error_line(again)
    assert len(again.stderr.strip().splitlines()[-1:]) == 1
    assert all_rows(empty_db) == before
    # A new row gets an id after every one there, restored ones included.
    empty_db.rows(RICH_LOGS, [0], 1)
    assert empty_db.value("SELECT count(*) FROM request_logs WHERE id > %s", top) == 3
    assert cutoff


def test_restoring_a_file_that_is_not_there_says_so_before_connecting(tmp_path):
    result = run_migrate(
        "host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1",
        "--restore-request-logs",
        str(tmp_path / "request_logs.2026-01.run-20260301T000000Z.parquet"),
    )

    assert result.returncode == 2
    assert "no such file" in error_line(result) and "nothing was restored" in error_line(result)
    assert "database" not in result.stderr  # it never got as far as naming the database


def test_restoring_rows_whose_user_is_gone_names_what_to_restore_first(empty_db, tmp_path):
    partitioned_with_logs(empty_db)
    run_migrate(empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(tmp_path))
    files = sorted(glob.glob(os.path.join(tmp_path, "*.parquet")))
    empty_db.rows("DELETE FROM request_logs")
    empty_db.rows("DELETE FROM api_keys")
    empty_db.rows("DELETE FROM users")

    result = run_migrate(empty_db.url, "--restore-request-logs", files[0])

    assert result.returncode == 2
    assert "restore those rows first; nothing was restored" in error_line(result)
    assert empty_db.value("SELECT count(*) FROM request_logs") == 0


def test_a_directory_that_cannot_be_written_is_refused_before_any_change(empty_db, tmp_path):
    partitioned_with_logs(empty_db)
    before = (all_rows(empty_db), empty_db.rows("SELECT relname FROM pg_class ORDER BY 1"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    result = run_migrate(
        empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(blocker / "archive")
    )

    assert result.returncode == 2
    assert "cannot be written" in error_line(result) and "nothing was changed" in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1
    assert (all_rows(empty_db), empty_db.rows("SELECT relname FROM pg_class ORDER BY 1")) == before


def test_archive_without_pyarrow_is_refused_before_connecting(tmp_path):
    hidden = tmp_path / "no-pyarrow"
    (hidden / "pyarrow").mkdir(parents=True)
    (hidden / "pyarrow" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")

    result = run_migrate(
        "host=127.0.0.1 port=1 dbname=nowhere connect_timeout=1",
        "--retain-request-logs",
        "30",
        "--archive",
        str(tmp_path / "archive"),
        PYTHONPATH=str(hidden),
    )

    assert result.returncode == 2
    assert "needs pyarrow" in error_line(result)
    assert "database" not in result.stderr  # it never got as far as naming the database
    assert not (tmp_path / "archive").exists()


def start(url, *args):
    return subprocess.Popen(
        [sys.executable, str(HERE / "migrate.py"), *args],
        env={**{k: v for k, v in os.environ.items() if k != "PGAPPNAME"}, "DATABASE_URL": url},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM])
def test_a_run_stopped_between_archive_and_delete_loses_nothing_and_the_next_finishes(
    migrated_db, tmp_path, how
):
    plain_with_logs(migrated_db)
    old = "created_at < now() - interval '30 days'"
    removed = all_rows(migrated_db, old)
    holder = psycopg2.connect(migrated_db.url)
    with holder.cursor() as cursor:  # the first batch waits, whichever rows it holds
        cursor.execute(f"SELECT 1 FROM request_logs WHERE {old} FOR UPDATE")
    run = start(
        migrated_db.url,
        "--retain-request-logs",
        "30",
        "--archive",
        str(tmp_path),
        "--lock-timeout",
        "60",
    )
    try:
        wait_for_lock_wait(
            migrated_db, "the archived rows' DELETE to wait", run=run, query="%DELETE FROM ONLY%"
        )
        files = glob.glob(os.path.join(tmp_path, "*.manifest.json"))
        run.send_signal(how)
        _, stderr = run.communicate(timeout=60)
    finally:
        holder.rollback()
        holder.close()
    left = all_rows(migrated_db, old)
    names = sorted(os.listdir(tmp_path))
    again = run_migrate(migrated_db.url, "--retain-request-logs", "30", "--archive", str(tmp_path))

    assert files  # verified before the DELETE was sent
    if how == signal.SIGTERM:
        assert left == removed  # the batch waiting was cancelled with its transaction
        assert run.returncode == 143 and "interrupted by SIGTERM" in stderr
    else:  # kill -9 leaves the server's backend: once the row lock goes, it may end the batch
        assert all(row in removed for row in left)
    assert again.returncode == 0, again.stderr
    assert sorted(os.listdir(tmp_path)) == names  # the verified files were not written again
    assert not all_rows(migrated_db, old)
    assert as_tuples(archived(tmp_path), migrated_db) == removed  # each row once


def test_a_row_soft_deleted_after_its_archive_is_archived_again_not_lost(migrated_db, tmp_path):
    plain_with_logs(migrated_db)
    old = "created_at < now() - interval '30 days'"
    removed = all_rows(migrated_db, old)
    locked, changed = removed[0][0], removed[-1][0]
    holder = psycopg2.connect(migrated_db.url)
    with holder.cursor() as cursor:
        cursor.execute("SELECT 1 FROM request_logs WHERE id = %s FOR UPDATE", (locked,))
    run = start(
        migrated_db.url,
        "--retain-request-logs",
        "30",
        "--archive",
        str(tmp_path),
        "--lock-timeout",
        "60",
    )
    try:
        wait_for_lock_wait(
            migrated_db, "the archived rows' DELETE to wait", run=run, query="%DELETE FROM ONLY%"
        )
        with holder.cursor() as cursor:  # the gateway's soft delete, after the archive
            cursor.execute(
                "UPDATE request_logs SET deleted_at = '2001-02-03 04:05:06+00' WHERE id = %s",
                (changed,),
            )
        holder.commit()
        _, stderr = run.communicate(timeout=60)
    finally:
        holder.close()

    assert run.returncode == 0, stderr
    assert not all_rows(migrated_db, old)
    rows = archived(tmp_path)
    versions = [row["deleted_at"] for row in rows if row["id"] == changed]
    assert datetime(2001, 2, 3, 4, 5, 6, tzinfo=UTC) in versions  # its last version is kept
    assert {row["id"] for row in rows} == {row[0] for row in removed}


def droppable(db, cutoff):
    """The month partitions wholly older than cutoff, oldest first."""
    names = [
        n
        for (n,) in db.rows(
            "SELECT relname FROM pg_class WHERE relname ~ '^request_logs_[0-9]{4}_[0-9]{2}$'"
        )
    ]
    months = {name: datetime.strptime(name[-7:], "%Y_%m").replace(tzinfo=UTC) for name in names}
    return sorted(n for n, m in months.items() if partition.add_months(m, 1) <= cutoff)


def test_a_full_file_system_mid_way_removes_only_what_was_verified(empty_db, tmp_path):
    cutoff = partitioned_with_logs(empty_db, ages=(0,), per_key=1)
    first, second = droppable(empty_db, cutoff)[:2]
    for name, rows, width in ((first, 1, 1), (second, 20_000, 8)):
        empty_db.rows(
            "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model,"
            " method, path, status_code, response_time)"
            f" SELECT to_timestamp('{name[-7:]}', 'YYYY_MM') AT TIME ZONE 'UTC'"
            " + g * interval '1 second', k.user_id, k.id, 1, md5(g::text), 'GET',"
            f" repeat(md5(g::text), {width}), 200, 5 FROM generate_series(1, {rows}) g, api_keys k"
        )
    removed = all_rows(empty_db, f"created_at < '{cutoff.isoformat()}'")
    limit = 256 * 1024

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run(
        [sys.executable, str(HERE / "migrate.py"), "--retain-request-logs", str(DAYS)]
        + ["--archive", str(tmp_path)],
        env={**os.environ, "DATABASE_URL": empty_db.url},
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=60,
        check=False,
    )
    first_left = empty_db.value("SELECT count(*) FROM pg_class WHERE relname = %s", first)
    second_rows = empty_db.value(f"SELECT count(*) FROM {second}")  # detached, not dropped
    verified = archived(tmp_path)
    again = run_migrate(
        empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(tmp_path)
    )

    assert full.returncode == 2, full.stderr
    assert "File too large" in error_line(full) and "nothing of it was removed" in full.stderr
    assert first_left == 0 and {row["model"] for row in verified} == {
        "c4ca4238a0b923820dcc509a6f75849b"
    }
    assert second_rows == 3 * 20_000  # every row of it still in the database
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert again.returncode == 0, again.stderr
    assert f"dropped partition {second}" in again.stderr  # the detached, marked table
    assert as_tuples(archived(tmp_path), empty_db) == removed


def test_rows_archived_inside_a_transaction_holding_their_table_are_verified_there(
    migrated_db, tmp_path
):
    # A step that removes rows inside its own transaction (the legacy partition's, say)
    # holds ACCESS EXCLUSIVE: the checksum must not wait for it on a second connection.
    plain_with_logs(migrated_db)
    cutoff = datetime.now(UTC) - timedelta(days=30)
    removed = all_rows(migrated_db, f"created_at < '{cutoff.isoformat()}'")
    migrate_here(migrated_db.params)  # binds models.database to the test database
    target = catalog.target_schema()
    models.database.execute_sql("BEGIN; LOCK TABLE request_logs IN ACCESS EXCLUSIVE MODE")
    try:
        keys = archive.Archive(tmp_path, datetime.now(UTC)).save(
            target, "request_logs", cutoff, keys=True
        )
    finally:
        models.database.execute_sql("ROLLBACK")

    assert len(keys) == len(removed)
    assert as_tuples(archived(tmp_path), migrated_db) == removed


SPREAD_LOGS = """
INSERT INTO request_logs (id, created_at, user_id, api_key_id, api_config_id, model, method, path, status_code,
    response_time, tokens_used, error_msg)
SELECT g * 1021, now() - interval '40 days' - g * interval '1 minute', k.user_id, k.id, 1,
    'model-' || g % 4, 'POST', '/v1/' || g, 200, g, g * 7, CASE WHEN g % 3 = 0 THEN 'e' END
FROM generate_series(1, 60) g, (SELECT id, user_id FROM api_keys LIMIT 1) k
ORDER BY g % 7, g DESC
"""


def test_rows_out_of_id_order_across_many_checksum_groups_are_verified_then_removed(
    migrated_db, tmp_path
):
    migrate_here(migrated_db.params)
    users_and_keys(migrated_db)
    migrated_db.rows(SPREAD_LOGS)  # ids 1021 to 61260: 15 groups of id >> 12, heap not in id order
    removed = all_rows(migrated_db, "created_at < now() - interval '30 days'")

    result = run_migrate(migrated_db.url, "--retain-request-logs", "30", "--archive", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert len(removed) == 60
    assert not all_rows(migrated_db, "created_at < now() - interval '30 days'")
    assert as_tuples(archived(tmp_path), migrated_db) == removed


def test_one_changed_value_in_any_row_changes_the_file_checksum():
    import pyarrow as pa

    columns = [("id", "bigint"), ("created_at", "timestamp with time zone"), ("model", "text")]
    ids = list(range(1, 20_001))
    table = pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "created_at": pa.array([datetime(2025, 1, 1, tzinfo=UTC)] * len(ids)),
            "model": pa.array([None if i % 5 else f"m{i % 7}" for i in ids]),
        }
    )
    before = archive.file_checksum(table, columns)
    shuffled = table.take(list(reversed(range(len(ids)))))
    models = table.column("model").to_pylist()
    models[15_000] = "changed"
    changed = table.set_column(2, "model", pa.array(models))

    assert archive.file_checksum(shuffled, columns) == before  # order of the file is free
    assert archive.file_checksum(changed, columns) != before
    assert archive.file_checksum(changed, columns)[0] == before[0] == 20_000


def as_version_1(directory):
    """The manifests of DIR rewritten as version 1 wrote them: the checksum by its scheme."""
    for path in glob.glob(os.path.join(directory, "*.manifest.json")):
        with open(path) as file:
            manifest = json.load(file)
        table = archive.read_parquet(os.path.join(directory, manifest["file"]["name"]))
        columns = [(c["name"], c["type"]) for c in manifest["columns"]]
        rows, checksum = archive.file_checksum(table, columns, version=1)
        assert rows == manifest["rows"] and checksum != manifest["checksum"]["rows"]
        manifest.update(version=1, checksum={"rows": checksum, "of": archive.CHECKSUM_WORDS[1]})
        with open(path, "w") as file:
            json.dump(manifest, file)


def test_an_archive_of_version_1_still_restores_checked_by_its_own_checksum(empty_db, tmp_path):
    partitioned_with_logs(empty_db)
    before = all_rows(empty_db)
    assert (
        run_migrate(
            empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(tmp_path)
        ).returncode
        == 0
    )
    files = sorted(glob.glob(os.path.join(tmp_path, "*.parquet")))
    as_version_1(tmp_path)
    manifest_path = files[0].removesuffix(".parquet") + ".manifest.json"
    with open(manifest_path) as file:
        first = json.load(file)
    with open(manifest_path, "w") as file:  # a version 1 manifest with another checksum
        json.dump({**first, "checksum": {**first["checksum"], "rows": "12345"}}, file)
    refused = run_migrate(empty_db.url, "--restore-request-logs", files[0])
    with open(manifest_path, "w") as file:
        json.dump(first, file)

    restored = [run_migrate(empty_db.url, "--restore-request-logs", path) for path in files]

    assert refused.returncode == 2
    assert "does not match its manifest" in error_line(refused)
    assert files and all(r.returncode == 0 for r in restored), restored[0].stderr
    assert all_rows(empty_db) == before


def test_rows_a_verified_file_of_version_1_holds_are_not_written_again(migrated_db, tmp_path):
    plain_with_logs(migrated_db)
    cutoff = datetime.now(UTC) - timedelta(days=30)
    removed = all_rows(migrated_db, f"created_at < '{cutoff.isoformat()}'")
    migrate_here(migrated_db.params)  # binds models.database to the test database
    target = catalog.target_schema()
    now = datetime.now(UTC)
    archive.Archive(tmp_path, now).save(target, "request_logs", cutoff)
    as_version_1(tmp_path)
    files = sorted(os.listdir(tmp_path))

    # Before any copy (PostgreSQL's checksum by version 1's scheme), and after one (the file
    # read back, by that scheme): neither writes a second file of the same rows.
    first = archive.Archive(tmp_path, now + timedelta(minutes=1)).save(
        target, "request_logs", cutoff
    )
    keys = archive.Archive(tmp_path, now + timedelta(minutes=2)).save(
        target, "request_logs", cutoff, keys=True
    )

    assert first == [] and len(keys) == len(removed) > 0
    assert sorted(os.listdir(tmp_path)) == files


def test_timestamps_are_hashed_as_postgresql_sends_them(empty_db):
    import pyarrow as pa

    moments = [
        datetime(2026, 9, 1, 0, 0, 1, 393362, tzinfo=UTC),
        datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # before PostgreSQL's epoch
        datetime(1969, 7, 20, 20, 17, 40, tzinfo=UTC),  # before Unix's
        None,
        datetime(1, 1, 1, tzinfo=UTC),
    ]
    values = pa.array(moments, pa.timestamp("us", tz="UTC"))

    sent = [
        text
        for text, _ in empty_db.rows(
            "SELECT coalesce(encode(timestamptz_send(t), 'hex'), '\\N'), n"
            " FROM unnest(%s::timestamptz[]) WITH ORDINALITY AS m(t, n) ORDER BY n",
            moments,
        )
    ]

    assert archive.send_hex(values).to_pylist() == sent
    assert archive.send_hex(values.slice(1, 3)).to_pylist() == sent[1:4]
    assert sent[3] == "\\N" and len(set(sent)) == 5


def test_a_manifest_that_cannot_be_written_leaves_no_data_file_a_glob_would_read(
    migrated_db, tmp_path
):
    # A full disk between the data file and its manifest: a *.parquet without its manifest
    # would be read by DuckDB's glob beside the next run's copy of the same rows.
    plain_with_logs(migrated_db)
    cutoff = datetime.now(UTC) - timedelta(days=30)
    removed = all_rows(migrated_db, f"created_at < '{cutoff.isoformat()}'")
    migrate_here(migrated_db.params)  # binds models.database to the test database
    target = catalog.target_schema()
    run = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    full = archive.Archive(tmp_path, run)
    months = migrated_db.rows(
        "SELECT DISTINCT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM') FROM request_logs"
        " WHERE created_at < %s",
        cutoff,
    )
    for (month,) in months:  # the manifest's temporary name taken: its write fails
        os.mkdir(
            tmp_path / f".request_logs.{month}.run-20260102T030405Z.manifest.json.{os.getpid()}.tmp"
        )

    with pytest.raises(archive.MigrationError, match="nothing of it was removed"):
        full.save(target, "request_logs", cutoff)
    left = glob.glob(os.path.join(tmp_path, "*.parquet"))
    for (month,) in months:
        os.rmdir(
            tmp_path / f".request_logs.{month}.run-20260102T030405Z.manifest.json.{os.getpid()}.tmp"
        )
    archive.Archive(tmp_path, run + timedelta(hours=1)).save(target, "request_logs", cutoff)

    assert months and not left
    assert as_tuples(archived(tmp_path), migrated_db) == removed  # each row once


def truncate_data(path, manifest):
    with open(path, "rb") as file:
        data = file.read()
    with open(path, "wb") as file:
        file.write(data[: len(data) // 2])


EDITS = {
    "columns removed": lambda path, manifest: manifest.pop("columns"),
    "checksum as a string": lambda path, manifest: manifest.update(checksum="0"),
    "rows as a string": lambda path, manifest: manifest.update(rows=str(manifest["rows"])),
    "version true": lambda path, manifest: manifest.update(version=True),
    "a column not in the file": lambda path, manifest: manifest["columns"][1].update(name="x"),
    "data file truncated": truncate_data,
}


@pytest.mark.parametrize("edit", EDITS)
def test_an_edited_manifest_or_damaged_file_is_refused_in_one_line_and_nothing_restored(
    empty_db, tmp_path, edit
):
    plain_with_logs(empty_db)
    assert (
        run_migrate(empty_db.url, "--retain-request-logs", "30", "--archive", str(tmp_path))
    ).returncode == 0
    path = min(glob.glob(os.path.join(tmp_path, "*.parquet")))
    manifest_path = path.removesuffix(".parquet") + ".manifest.json"
    with open(manifest_path) as file:
        manifest = json.load(file)
    EDITS[edit](path, manifest)
    with open(manifest_path, "w") as file:
        json.dump(manifest, file)
    before = all_rows(empty_db)

    result = run_migrate(empty_db.url, "--restore-request-logs", path)

    assert result.returncode == 2, result.stderr
    assert "unexpected" not in result.stderr and "Traceback" not in result.stderr
    line = error_line(result)
    assert "nothing was restored" in line or "never restored" in line, line
    assert all_rows(empty_db) == before


def test_a_run_leaves_the_temporary_files_of_a_run_still_writing_to_the_same_directory(
    empty_db, tmp_path
):
    # A second run sharing DIR (cron overlapping, another database) removed the first's file
    # as it was written: the first then failed with exit 2.
    plain_with_logs(empty_db)
    ended = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    alive = tmp_path / f".request_logs.2026-01.3.{os.getpid()}.tmp"  # this test's process
    dead = tmp_path / f".request_logs.2026-01.4.{ended.stdout.strip()}.tmp"
    manifest = tmp_path / f".request_logs.2026-01.run-1.manifest.json.{ended.stdout.strip()}.tmp"
    for path in (alive, dead, manifest):
        path.write_bytes(b"PAR1")

    result = run_migrate(empty_db.url, "--retain-request-logs", "30", "--archive", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert alive.exists() and not dead.exists() and not manifest.exists()


def test_a_file_too_large_to_write_leaves_no_temporary_file_behind(empty_db, tmp_path):
    # On a full file system the half-written file held the space the next run's probe needed.
    partitioned_with_logs(empty_db, per_key=300)  # 1,800 rows of a month: about 18 kB
    limit = 8_000

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails, EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = subprocess.run(
        [sys.executable, str(HERE / "migrate.py"), "--retain-request-logs", str(DAYS)]
        + ["--archive", str(tmp_path)],
        env={**os.environ, "DATABASE_URL": empty_db.url},
        capture_output=True,
        text=True,
        preexec_fn=small_files,
        timeout=60,
        check=False,
    )

    assert full.returncode == 2, full.stderr
    assert "File too large" in error_line(full)
    assert not os.listdir(tmp_path)


def test_a_refused_checksum_connection_ends_the_run_in_one_line_and_the_next_finishes(
    empty_db, tmp_path
):
    # PostgreSQL's checksum runs on a connection of its own: a role allowed two gets none.
    cutoff = partitioned_with_logs(empty_db)
    removed = all_rows(empty_db, f"created_at < '{cutoff.isoformat()}'")
    role = empty_db.no_create_role  # dropped by the fixture's reset
    empty_db.rows(f"CREATE ROLE {quoted(role)} LOGIN CONNECTION LIMIT 2")
    empty_db.rows(f"GRANT {quoted(empty_db.params['user'])} TO {quoted(role)}")  # the owner's

    limited = run_migrate(
        empty_db.url_with(user=role), "--retain-request-logs", str(DAYS), "--archive", str(tmp_path)
    )
    again = run_migrate(
        empty_db.url, "--retain-request-logs", str(DAYS), "--archive", str(tmp_path)
    )

    assert limited.returncode == 2, limited.stderr
    assert "too many connections" in error_line(limited), limited.stderr
    assert "three with --archive" in error_line(limited)
    assert "Traceback" not in limited.stderr
    assert again.returncode == 0, again.stderr
    assert as_tuples(archived(tmp_path), empty_db) == removed
