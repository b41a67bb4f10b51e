"""
Request-log rows written to Parquet files before retention removes them, verified, restorable.

Usage::

    from archive import Archive, require_pyarrow, restore

    require_pyarrow()                              # one line, before connecting, if missing
    archive = Archive("/srv/log-archive", run=now) # --archive DIR: made if missing, probed
    archive.save(target, "request_logs_2025_01", None)         # every row of a relation
    for sql, params in archive.deletions(target, "request_logs_default", cutoff, 5_000):
        database.execute_sql(sql, params)          # only the rows archived, as archived
    restore(target, "/srv/log-archive/request_logs.2025-01.run-20250301T000000Z.parquet")

Each call of save writes one file per month of created_at (UTC) for this run,
``request_logs.YYYY-MM.run-<run>.parquet`` (zstd, columns typed as the table's, timestamps as
UTC instants, NULLs kept), and beside it ``<same>.manifest.json``: month, rows, min and max
created_at, the rows' checksum, the file's sha256 and size, the columns with their types.

Order of a month, so that a crash at any point leaves each row in the table or in a verified
file: the rows and PostgreSQL's own count and checksum of them are read in one snapshot; the
file goes to a hidden temporary name, is fsynced, read back from disk and its count and
checksum compared with the database's; then the manifest (temporary name, fsync, rename,
fsync), then the file renamed (directory fsynced): no *.parquet is ever without its manifest,
which a glob of DIR would read twice once the next run archives the same rows. Only then does
the caller remove the rows. A file without its manifest is never trusted; a month whose rows a
verified file already holds (a run that was killed before its DROP) is not written again.

The checksum: the rows, ordered by (id, created_at), fall in groups of ids that share all but
their low 12 bits (id >> 12); each group's text is its rows' canonical texts (each value's
PostgreSQL text output, a timestamp as the hex of PostgreSQL's binary form, joined by '|', NULL
as \\N, each row ended by a newline) one after another; the checksum is the sum of the first
64 bits of md5 of each group's text, signed, as a decimal. PostgreSQL computes it in one
aggregate (string_agg per group), pyarrow from the file read back (vectorised casts and joins,
one md5 per group over a contiguous buffer), each on its own: a thousand md5 calls for a
million rows rather than a million. Version 1 archives printed timestamps with to_char, four
times PostgreSQL's cost of the hex; they are still checked by that scheme (their manifest's
version says which), on restore and when a run finds one holding the rows it would write.
"""

import array
import bisect
import concurrent.futures
import contextlib
import functools
import hashlib
import itertools
import json
import logging
import os
import struct
import sys
import tempfile
import threading
from datetime import UTC

import psycopg2.errors
import psycopg2.extensions
from peewee import Entity, Value

from catalog import guard_params, guard_sql, guarded, one_snapshot, shown, shown_name
from connection import (
    CANCEL_LIMIT,
    MigrationError,
    cancel_bounded,
    execute_awaited,
    join_watched,
    open_side_connection,
    signal_pending,
    wait,
)
from models import RequestLog, database
from plan import render

PARENT = RequestLog._meta.table_name
log = logging.getLogger("migrate")
FORMAT = "request_logs archive"
VERSION = 2  # 2: timestamps hashed as hex of PostgreSQL's binary form; 1 is still read
SUFFIX, MANIFEST = ".parquet", ".manifest.json"
NULL_TEXT = "\\N"  # NULL in a row's text, as COPY writes it
ZSTD_LEVEL = 3  # BENCHMARKS.md, section 15: level 3 already beats gzip -6 several times over
# What a manifest's "checksum" {"of"} says, by the manifest's version.
CHECKSUM_WORDS = {
    1: (
        "rows ordered by (id, created_at) and grouped by id >> 12; for each group, md5 of its"
        " rows' texts one after another, each row's text the columns' PostgreSQL text output"
        " (timestamps as YYYY-MM-DD HH24:MI:SS.US, UTC; NULL as \\N) joined by '|' and ended by"
        " a newline; the sum over groups of the first 64 bits of that md5, each as a signed"
        " bigint"
    ),
    2: (
        "rows ordered by (id, created_at) and grouped by id >> 12; for each group, md5 of its"
        " rows' texts one after another, each row's text the columns' PostgreSQL text output"
        " (timestamps as the 16 lowercase hex digits of their microseconds since 2000-01-01"
        " 00:00:00 UTC, a signed big-endian 64-bit integer, PostgreSQL's binary form; NULL as"
        " \\N) joined by '|' and ended by a newline; the sum over groups of the first 64 bits of"
        " that md5, each as a signed bigint"
    ),
}
RESUME = (
    "what was archived and removed before stays so; free space and rerun with"
    " --retain-request-logs and --archive: it does the rest"
)
# Column types stored as themselves; every other type as its PostgreSQL text form.
TIMESTAMPS = ("timestamp with time zone", "timestamp without time zone")
INTEGERS = {"bigint": "int64", "integer": "int32", "smallint": "int16"}


def require_pyarrow():
    """pyarrow, or the one line that says how to get it (before anything changes)."""
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MigrationError(
            "--archive needs pyarrow, which is not installed: pip install -r requirements.txt;"
            " nothing was changed"
        ) from None


def use_fast_memory_pool():
    """jemalloc for Arrow where the wheel has it and the environment names no pool: the
    default (mimalloc) gives a month's buffers back to the system and faults them in again,
    a third of the file's checksum (BENCHMARKS.md, 15)."""
    import pyarrow as pa

    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    with contextlib.suppress(NotImplementedError, pa.ArrowException):
        pa.set_memory_pool(pa.jemalloc_memory_pool())


def arrow_type(pg_type):
    import pyarrow as pa

    if pg_type in INTEGERS:
        return getattr(pa, INTEGERS[pg_type])()
    if pg_type == "boolean":
        return pa.bool_()
    if pg_type == TIMESTAMPS[0]:
        return pa.timestamp("us", tz="UTC")
    if pg_type == TIMESTAMPS[1]:
        return pa.timestamp("us")
    return pa.string()


# --- The row checksum, twice ------------------------------------------------------------


def canonical_sql(name, pg_type, version):
    column = render(Entity(name))
    if pg_type in TIMESTAMPS and version >= 2:  # a quarter of to_char's cost
        send = "timestamptz_send" if pg_type == TIMESTAMPS[0] else "timestamp_send"
        text = f"encode({send}({column}), 'hex')"
    elif pg_type in TIMESTAMPS:  # six digits always: what Arrow's cast to text prints
        zone = " AT TIME ZONE 'UTC'" if pg_type == TIMESTAMPS[0] else ""
        text = f"to_char({column}{zone}, 'YYYY-MM-DD HH24:MI:SS.US')"
    else:
        text = f"{column}::text"
    return f"coalesce({text}, {render(Value(NULL_TEXT))})"


GROUP_BITS = 12  # rows hashed together: those whose ids share all but the low 12 bits


def row_text_sql(columns, version):
    """The row's text: concat_ws of the values' texts (none NULL), a quarter cheaper for
    PostgreSQL than a chain of ||; nested, as a function takes at most 100 arguments."""
    texts = [canonical_sql(name, pg_type, version) for name, pg_type in columns]
    while len(texts) > 1:
        texts = [
            f"concat_ws('|', {', '.join(texts[at : at + 50])})" for at in range(0, len(texts), 50)
        ]
    return texts[0]


def checksum_sql(columns, rows, version=VERSION):
    """(month, rows, checksum, min and max created_at) of the rows `rows` ("FROM ... WHERE")
    selects, a line per month of created_at in UTC; the checksum as archives of `version`
    have it (CHECKSUM_WORDS)."""
    group_hash = (
        f"('x' || left(md5(string_agg({row_text_sql(columns, version)} || E'\\n', ''"
        " ORDER BY id, created_at)), 16))::bit(64)::bigint"
    )
    return (
        # to_char of each row's month cost 0.17 s a million rows: once a month instead
        "SELECT to_char(month, 'YYYY-MM'), sum(rows)::bigint, sum(hash)::text, min(first),"
        " max(last) FROM (SELECT date_trunc('month', created_at AT TIME ZONE 'UTC') AS month,"
        " count(*) AS rows,"
        f" {group_hash} AS hash, min(created_at) AS first, max(created_at) AS last {rows}"
        f" GROUP BY 1, id >> {GROUP_BITS}) AS groups GROUP BY 1"
    )


def canonical_arrow(values, pg_type, version):
    """A column as canonical_sql prints it (DateStyle ISO, TimeZone UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pg_type in TIMESTAMPS and version >= 2:
        return pa.chunked_array(
            [send_hex(chunk) for chunk in as_chunked(values).chunks], pa.string()
        )
    if pg_type in TIMESTAMPS:  # the UTC wall clock: many times faster than strftime
        text = pc.cast(pc.cast(values, pa.timestamp("us")), pa.string())
    else:
        text = pc.cast(values, pa.string())
    return pc.fill_null(text, NULL_TEXT)


EPOCH_2000 = 946_684_800_000_000  # PostgreSQL's epoch, in microseconds since 1970


def send_hex(timestamps):
    """encode(timestamptz_send(t), 'hex') of an Arrow timestamp array (microseconds), NULL
    as \\N: the microseconds since 2000-01-01 as big-endian bytes, turned to hex in C by
    bytes.hex (no kernel of Arrow prints hex)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    micros = pc.subtract(pc.cast(timestamps, pa.int64()), EPOCH_2000).fill_null(0)
    values = array.array("q")
    values.frombytes(memoryview(micros.buffers()[1])[micros.offset * 8 :][: len(micros) * 8])
    if sys.byteorder == "little":
        values.byteswap()
    digits = pa.py_buffer(values.tobytes().hex().encode("ascii"))
    text = pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(values), [None, digits])
    text = pc.cast(text, pa.string())
    return pc.if_else(pc.is_valid(timestamps), text, NULL_TEXT) if timestamps.null_count else text


def as_chunked(values):
    import pyarrow as pa

    return values if isinstance(values, pa.ChunkedArray) else pa.chunked_array([values])


PIECE_ROWS = 1 << 18  # rows whose texts are made at a time, in whole groups


def file_checksum(table, columns, version=VERSION):
    """(rows, checksum) of an Arrow table, computed as checksum_sql computes them for
    `version`: the rows' texts in (id, created_at) order, one md5 per group of ids over a
    contiguous buffer. Pieces of whole groups, a few at once: Arrow's kernels and md5 release
    the GIL, and a piece's texts are all that is held of them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not len(table):
        return 0, "0"
    ids = table.column("id").combine_chunks()
    # A partition is usually read in id order already: then no copy of its rows to sort them.
    ordered = len(ids) < 2 or pc.all(pc.greater(pc.pairwise_diff(ids).slice(1), 0)).as_py()
    order = (
        None
        if ordered
        else pc.sort_indices(table, [("id", "ascending"), ("created_at", "ascending")])
    )
    groups = pc.shift_right(ids if order is None else pc.take(ids, order), GROUP_BITS)
    changes = pc.indices_nonzero(pc.not_equal(groups[1:], groups[:-1])).to_pylist()
    bounds = [0, *(at + 1 for at in changes), len(ids)]
    pieces, low = [], 0
    while low < len(ids):
        high = bounds[bisect.bisect_left(bounds, min(low + PIECE_ROWS, len(ids)))]
        pieces.append((low, high))
        low = high

    def piece_sum(piece):
        low, high = piece
        rows = table.slice(low, high - low) if order is None else table.take(order[low:high])
        parts = []
        for name, pg_type in columns:
            parts += [canonical_arrow(rows.column(name), pg_type, version), "|"]
        parts[-1] = "\n"
        texts = pc.binary_join_element_wise(*parts, "")
        inside = bounds[bisect.bisect_left(bounds, low) : bisect.bisect_right(bounds, high)]
        digests = group_texts(texts, [at - low for at in inside])
        return sum(struct.unpack(">q", digest.digest()[:8])[0] for digest in digests)

    with concurrent.futures.ThreadPoolExecutor(min(pa.cpu_count(), 4)) as pool:
        return len(table), str(sum(pool.map(piece_sum, pieces)))


def group_texts(texts, bounds):
    """md5 of the texts of rows bounds[i] to bounds[i + 1] - 1, for each i: read where the
    chunks of `texts` hold them, each chunk's bytes contiguous (no copy of the column)."""
    import pyarrow as pa

    cuts, at = set(bounds), 0
    for chunk in texts.chunks:
        cuts.add(at)
        at += len(chunk)
    cuts, ends = sorted(cuts), set(bounds[1:])
    chunks = iter(texts.chunks)
    chunk, chunk_start, data, offsets = None, 0, None, None
    digest = hashlib.md5()
    for start, stop in itertools.pairwise(cuts):
        while chunk is None or start >= chunk_start + len(chunk):
            chunk_start += 0 if chunk is None else len(chunk)
            chunk = next(chunks)
            width = "q" if pa.types.is_large_string(chunk.type) else "i"
            offsets = memoryview(chunk.buffers()[1]).cast(width)[chunk.offset :]
            data = memoryview(chunk.buffers()[2] or b"")
        digest.update(data[offsets[start - chunk_start] : offsets[stop - chunk_start]])
        if stop in ends:
            yield digest
            digest = hashlib.md5()


# --- The directory ----------------------------------------------------------------------


def writing(name):
    """Whether the temporary file `name` (its writer's pid last) is being written by a process
    alive on this machine: another run sharing DIR (cron overlapping, a second database),
    whose file removed under it would end that run."""
    pid = name.removesuffix(".tmp").rsplit(".", 1)[-1]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # alive, another user's
    return True


class Archive:
    """--archive DIR for one run: `run` (the run's fixed now) names its files."""

    def __init__(self, directory, run):
        self.directory = os.path.abspath(directory)
        self.run = run.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
        self.written = []  # (path, rows) of each file this run verified and kept
        self.check_writable()

    def check_writable(self):
        """Make DIR if missing and write, fsync and remove a probe in it, or one line."""
        probe = os.path.join(self.directory, f".probe-{os.getpid()}")
        try:
            os.makedirs(self.directory, exist_ok=True)
            # First: a file system a failed run filled frees that run's space for the probe.
            for name in os.listdir(self.directory):  # a run killed while writing left these
                if name.startswith(f".{PARENT}.") and name.endswith(".tmp") and not writing(name):
                    os.remove(os.path.join(self.directory, name))
            try:
                with open(probe, "wb") as file:
                    file.write(b"probe")
                    os.fsync(file.fileno())
            finally:
                with contextlib.suppress(OSError):
                    os.remove(probe)  # a full disk: created, not written
        except OSError as exc:
            raise MigrationError(
                f"--archive {shown(self.directory)} cannot be written ({exc.strerror or exc}):"
                " nothing was changed"
            ) from None

    def free_path(self, month):
        """DIR/request_logs.YYYY-MM.run-RUN.parquet, or .run-RUN-2... when this run has
        written that month already (a second pass, or a second relation)."""
        for attempt in range(1, 10_000):
            run = self.run if attempt == 1 else f"{self.run}-{attempt}"
            path = os.path.join(self.directory, f"{PARENT}.{month}.run-{run}{SUFFIX}")
            if not os.path.exists(path) and not os.path.exists(
                path.removesuffix(SUFFIX) + MANIFEST
            ):
                return path
        raise MigrationError(f"{shown(self.directory)} holds 10,000 files of {month} for one run")

    def save(self, target, relation, cutoff, keys=False):
        """Archive the rows of `relation` before `cutoff` (None: all), a verified file per
        month; returns (ctid, xmin) of each archived row as the snapshot saw it, if `keys`.

        PostgreSQL's count and checksum run on a second connection in the snapshot of the
        COPY, while this process reads the rows, writes and reads back the files
        (BENCHMARKS.md, 15); on this connection after the COPY instead when the second one
        cannot read the table (a caller's transaction holds it)."""
        use_fast_memory_pool()
        columns = relation_columns(target, relation)
        where = rows_where(relation, cutoff)
        written = {}
        try:
            with one_snapshot(target):
                database.execute_sql(SESSION_SETTINGS)
                snapshot = database.execute_sql("SELECT pg_export_snapshot()").fetchone()[0]
                side = SideChecksum(target, snapshot, checksum_sql(columns, where))
                try:
                    # A retry of the caller's transaction (its DROP's lock attempt failed) or
                    # a run killed before its DROP finds the verified files written before:
                    # no rows copied again. A file of an older version is checked by its own
                    # scheme, PostgreSQL's sums of which are computed here, on this
                    # connection, only then.
                    if not keys and self.holds(relation):
                        sums = side.result()
                        older = functools.cache(
                            lambda version: sums_of(
                                database.execute_sql(checksum_sql(columns, where, version))
                            )
                        )

                        def by_scheme(month):
                            return lambda version: older(version).get(month, (0, "0"))[:2]

                        if all(
                            self.verified_copy(month, by_scheme(month), sums[month][:2])
                            for month in sums
                        ):
                            return []
                    table = read_rows(relation, cutoff, columns, keys)
                    if table is None:
                        return []
                    for month, part in by_month(table, relation, keys):
                        written[month] = self.write_month(relation, month, part, columns)
                    sums = side.result()
                finally:
                    side.close()
            for month, (temporary, found) in sorted(written.items()):
                rows, checksum, first, last = sums.get(month, (0, "0", None, None))
                if found != (rows, checksum):
                    raise MigrationError(
                        f"the archive of {shown_name(relation)} {month} read back {found[0]:,}"
                        f" rows, checksum {found[1]}, where the database has {rows:,},"
                        f" {checksum}: nothing of it was removed"
                    )
                if self.verified_copy(
                    month,
                    lambda version, path=temporary: file_checksum(
                        read_parquet(path), columns, version
                    ),
                    (rows, checksum),
                ):
                    os.remove(temporary)  # an earlier run's file holds these very rows
                else:
                    self.keep(relation, month, temporary, columns, rows, checksum, first, last)
                del written[month]
        except OSError as exc:
            raise MigrationError(
                f"writing the archive of {shown_name(relation)} to {shown(self.directory)}"
                f" failed ({exc.strerror or exc}): nothing of it was removed, {RESUME}"
            ) from None
        finally:
            for temporary, _ in written.values():
                with contextlib.suppress(OSError):
                    os.remove(temporary)
        if not keys:
            return []
        return list(zip(table.column("_ctid").to_pylist(), table.column("_xmin").to_pylist()))

    def write_month(self, relation, month, part, columns):
        """The month's rows in a temporary file of DIR, fsynced, read back from disk:
        (its path, (rows, checksum) of what was read)."""
        name = f".{PARENT}.{month}.{len(os.listdir(self.directory))}.{os.getpid()}.tmp"
        temporary = os.path.join(self.directory, name)
        try:
            write_parquet(part, temporary)
            return temporary, file_checksum(read_parquet(temporary), columns)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)  # a full disk: its space back at once, not at the next run
            raise

    def keep(self, relation, month, temporary, columns, rows, checksum, first, last):
        """The verified file's manifest, then the file under its name, each made durable. In
        this order, so that no `*.parquet` is ever without its manifest: a full disk or a kill
        between the two leaves a manifest whose file is missing (never trusted: its sha256
        cannot be read) rather than a data file that a `*.parquet` glob (DuckDB, pandas)
        would read beside the next run's copy of the same rows."""
        path = self.free_path(month)
        digest, size = sha256_of(temporary)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "relation": relation,
            "month": month,
            "run": self.run,
            "rows": rows,
            "min_created_at": first,
            "max_created_at": last,
            "checksum": {"rows": checksum, "of": CHECKSUM_WORDS[VERSION]},
            "file": {"name": os.path.basename(path), "sha256": digest, "bytes": size},
            "columns": [
                {"name": name, "type": pg_type, "arrow": str(arrow_type(pg_type))}
                for name, pg_type in columns
            ],
        }
        write_atomically(
            path.removesuffix(SUFFIX) + MANIFEST, json.dumps(manifest, indent=2) + "\n"
        )
        os.replace(temporary, path)
        fsync_directory(self.directory)
        self.written.append((path, rows))
        log.info("archived %s rows of %s to %s", f"{rows:,}", month, shown(path))

    def manifests(self):
        """(name, manifest) of each readable manifest of DIR; torn or foreign ones left out."""
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(MANIFEST):
                continue
            try:
                with open(os.path.join(self.directory, name)) as file:
                    manifest = json.load(file)
            except (OSError, ValueError):
                continue
            if isinstance(manifest, dict):
                yield name, manifest

    def holds(self, relation):
        """Whether DIR has a manifest of rows of `relation` (verified or not: a hint only)."""
        return any(manifest.get("relation") == relation for _, manifest in self.manifests())

    def verified_copy(self, month, older, sums):
        """Whether a file of an earlier run holds these very rows: its manifest says so and
        the file is the one the manifest describes. `sums`: (rows, checksum) of the rows;
        older(version): the same by the checksum of an older version's manifest."""
        for name, manifest in self.manifests():
            if f".{month}.run-" not in name:
                continue
            try:
                version = manifest.get("version")
                if not known_version(version) or manifest["rows"] != sums[0]:
                    continue
                found = sums if version == VERSION else older(version)
                data = os.path.join(self.directory, manifest["file"]["name"])
                same = (manifest["rows"], manifest["checksum"]["rows"]) == found
                if same and sha256_of(data)[0] == manifest["file"]["sha256"]:
                    return True
            except (OSError, ValueError, KeyError, TypeError):
                continue  # not one of ours, or torn: never trusted
        return False

    def deletions(self, target, relation, cutoff, batch):
        """(sql, params) of DELETEs that remove only rows archived as they were archived: a row
        updated after its archive (a soft delete) has another (ctid, xmin), stays, and is
        archived again on the next pass; passes repeat until no row before cutoff is left."""
        delete = f"DELETE FROM ONLY {render(Entity(relation))}"
        while True:
            keys = self.save(target, relation, cutoff, keys=True)
            if not keys:
                return
            for start in range(0, len(keys), batch):
                chunk = keys[start : start + batch]
                yield (
                    (
                        f"{delete} WHERE ctid = ANY (%s::tid[])"
                        " AND (ctid::text || ' ' || xmin::text) = ANY (%s::text[])"
                    ),
                    ([c for c, _ in chunk], [f"{c} {x}" for c, x in chunk]),
                )


# --- Reading rows ----------------------------------------------------------------------


def relation_columns(target, relation):
    return guarded(
        target,
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = %(relation)s::regclass AND attnum > 0 AND NOT attisdropped"
        " ORDER BY attnum",
        {"relation": render(Entity(relation))},
    ).fetchall()


def rows_where(relation, cutoff):
    where = f" WHERE created_at < {render(Value(cutoff))}::timestamptz" if cutoff else ""
    return f"FROM ONLY {render(Entity(relation))}{where}"


SESSION_SETTINGS = (
    "SELECT set_config('statement_timeout', '0', true), set_config('DateStyle', 'ISO', true),"
    " set_config('idle_in_transaction_session_timeout', '0', true),"
    " set_config('max_parallel_workers_per_gather', '0', true)"
)


def read_rows(relation, cutoff, columns, keys):
    """The rows as an Arrow table, with _ctid and _xmin if keys."""
    select = ", ".join(render(Entity(name)) for name, _ in columns)
    extra = ["_ctid", "_xmin"] if keys else []
    return copy_out(
        f"COPY (SELECT {'ctid, xmin, ' if keys else ''}{select}"
        f" {rows_where(relation, cutoff)}) TO STDOUT WITH (FORMAT csv)",
        [*extra, *(name for name, _ in columns)],
        [*(None for _ in extra), *(pg_type for _, pg_type in columns)],
        relation,
    )


def by_month(table, relation, keys):
    """(month, its rows without the helper columns), for each month of created_at (UTC)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    created = table.column("created_at")
    if created.null_count:
        raise MigrationError(
            f"{shown_name(relation)} has rows with a NULL created_at among those to remove"
        )
    rows = table.drop_columns(["_ctid", "_xmin"]) if keys else table
    first, last = (month_of(value) for value in pc.min_max(created).values())
    if first == last:  # a month partition holds one month: no copy of it
        yield first, rows
        return
    # The wall clock in UTC: PostgreSQL's to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM').
    # Without the zone first: Arrow reads the zone's rules from a database Windows lacks.
    wall = pc.cast(created, pa.timestamp("us"))
    months = pc.add(pc.multiply(pc.year(wall), 100), pc.month(wall))
    for month in sorted(pc.unique(months).to_pylist()):
        yield f"{month // 100:04d}-{month % 100:02d}", rows.filter(pc.equal(months, month))


def month_of(value):
    """YYYY-MM of an Arrow timestamp scalar, in UTC when it has a zone."""
    moment = value.as_py()
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return f"{moment.year:04d}-{moment.month:02d}"


class SideChecksum(threading.Thread):
    """PostgreSQL's {month: (rows, checksum, min, max)} of the rows, computed on a
    connection of its own in the exported snapshot `snapshot`, in the background; on the
    caller's connection, when asked for, if the second one could not get its lock in time
    (the caller's transaction holds the table: waiting for it would never end)."""

    def __init__(self, target, snapshot, sql):
        super().__init__(daemon=True)
        self.target, self.snapshot, self.sql = target, snapshot, sql
        self.rows, self.error, self.sums = None, None, None
        self.connection = open_side_connection(own_thread=True)
        self.start()

    def run(self):
        try:
            with self.connection.cursor() as cursor:
                execute_awaited(
                    cursor,
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY;"
                    f" SET TRANSACTION SNAPSHOT %(snapshot)s; {guard_sql()};"
                    f" {SESSION_SETTINGS}",
                    {**guard_params(self.target), "snapshot": self.snapshot},
                )
                execute_awaited(cursor, self.sql)
                self.rows = cursor.fetchall()
                execute_awaited(cursor, "COMMIT")
        except BaseException as exc:  # noqa: BLE001 -- raised again by result(), in the main thread
            self.error = exc

    def result(self):
        if self.sums is None:
            join_watched(self, self.connection)
            if getattr(self.error, "pgcode", None) == LOCK_NOT_AVAILABLE:
                self.error, self.rows = None, database.execute_sql(self.sql).fetchall()
            if self.error is not None:
                raise self.error
            self.sums = sums_of(self.rows)
        return self.sums

    def close(self):
        if self.is_alive():  # the main thread failed: the checksum is not wanted any more
            cancel_bounded(self.connection)
        # Bounded: after a frozen path, the thread's wait only ends once the connection
        # is closed under it (a daemon thread, it never holds the process).
        self.join(CANCEL_LIMIT)
        if not self.connection.closed:
            self.connection.close()


LOCK_NOT_AVAILABLE = "55P03"


def sums_of(rows):
    return {
        month: (count, checksum, first.isoformat(), last.isoformat())
        for month, count, checksum, first, last in rows
    }


def copy_out(sql, names, pg_types, relation):
    """COPY ... TO STDOUT parsed by pyarrow while it arrives, through a pipe. psycopg2 refuses
    COPY with a wait callback, so it is off for the COPY; a signal meanwhile is acted on
    after it."""
    reading, writing = os.pipe()
    parser = CsvParser(os.fdopen(reading, "rb"), names, pg_types)
    try:
        with open(writing, "wb", buffering=1 << 20) as sink:
            psycopg2.extensions.set_wait_callback(None)
            try:
                cursor = database.cursor()
                cursor.copy_expert(sql, sink)
            finally:
                psycopg2.extensions.set_wait_callback(wait)
    finally:
        parser.join()  # the end of the pipe is its end of input
    if signal_pending():
        raise KeyboardInterrupt
    if not cursor.rowcount:  # no row: Arrow refuses an empty CSV
        return None
    if parser.error is not None:
        import pyarrow as pa

        if isinstance(parser.error, pa.ArrowInvalid):  # infinity, year 10000
            raise MigrationError(
                f"a row of {shown_name(relation)} cannot be archived"
                f" ({shown(str(parser.error).splitlines()[0])}): nothing of it was removed"
            ) from None
        raise parser.error
    return parser.table


class CsvParser(threading.Thread):
    """pyarrow's CSV reader on `source` in the background (its parsing releases the GIL);
    after an error it reads the rest, so that the COPY writing to it still ends."""

    def __init__(self, source, names, pg_types):
        super().__init__(daemon=True)
        self.source, self.names, self.pg_types = source, names, pg_types
        self.table, self.error = None, None
        self.start()

    def run(self):
        with self.source:
            try:
                self.table = parse_csv(self.source, self.names, self.pg_types)
            except BaseException as exc:  # noqa: BLE001 -- raised again by copy_out, in the main thread
                self.error = exc
            while self.source.read(1 << 20):
                pass


def parse_csv(source, names, pg_types):
    import pyarrow as pa
    from pyarrow import csv

    types = {n: arrow_type(t) if t else pa.string() for n, t in zip(names, pg_types)}
    return csv.read_csv(
        source,
        read_options=csv.ReadOptions(column_names=names, block_size=1 << 22),
        parse_options=csv.ParseOptions(newlines_in_values=True),
        convert_options=csv.ConvertOptions(
            column_types=types,
            null_values=[""],
            strings_can_be_null=True,
            quoted_strings_can_be_null=False,
            true_values=["t"],
            false_values=["f"],
        ),
    )


# --- Files ------------------------------------------------------------------------------


def write_parquet(table, path):
    import pyarrow.parquet as pq

    with open(path, "wb") as file:
        pq.write_table(table, file, compression="zstd", compression_level=ZSTD_LEVEL)
        file.flush()
        os.fsync(file.fileno())


def read_parquet(path):
    import pyarrow.parquet as pq

    return pq.read_table(path, memory_map=False)


def sha256_of(path):
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_atomically(path, text):
    directory, name = os.path.split(path)
    temporary = os.path.join(directory, f".{name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(temporary)  # a full disk: not left for the next run to clear
        raise
    fsync_directory(os.path.dirname(path))


def fsync_directory(path):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- Restore ----------------------------------------------------------------------------


def restore(target, path):
    """The rows of an archive file back into request_logs, ids kept, in one transaction that
    holds no lock an insert waits for (ROW EXCLUSIVE); checked against the manifest before
    COMMIT; refused if any id is present. Returns the number of rows."""
    from pyarrow import csv

    use_fast_memory_pool()
    manifest = read_manifest(path)
    version = manifest.get("version")
    # The file's sha256 first: a truncated or overwritten file is refused in the words of a
    # mismatch, before Arrow reads it (its own error names no file and restores nothing).
    if sha256_of(path)[0] != manifest["file"]["sha256"]:
        raise MigrationError(f"{shown(path)} does not match its manifest: nothing was restored")
    table = read_parquet(path)
    columns = [(c["name"], c["type"]) for c in manifest["columns"]]
    if set(table.column_names) != {name for name, _ in columns} or file_checksum(
        table, columns, version
    ) != (manifest["rows"], manifest["checksum"]["rows"]):
        raise MigrationError(f"{shown(path)} does not match its manifest: nothing was restored")
    ids = table.column("id").to_pylist()
    lowest, highest = min(ids, default=0), max(ids, default=0)
    names = ", ".join(render(Entity(name)) for name, _ in columns)
    parent = render(Entity(PARENT))
    # A join on the ids within their range: index range scans, then a hash join.
    restored = (
        f"FROM {parent} JOIN unnest(%(ids)s::bigint[]) AS restored(restored_id)"
        " ON id = restored_id WHERE id BETWEEN %(lowest)s AND %(highest)s"
    )
    params = {"ids": ids, "lowest": lowest, "highest": highest}
    with one_snapshot_writable(target):
        present = database.execute_sql(f"SELECT count(*) {restored}", params).fetchone()[0]
        if present:
            raise MigrationError(
                f"{present:,} of the {len(ids):,} rows of {shown(path)} are already in"
                f" {PARENT} (same id): nothing was restored"
            )
        with tempfile.TemporaryFile() as buffer:
            csv.write_csv(table, buffer, csv.WriteOptions(include_header=False))
            buffer.seek(0)
            psycopg2.extensions.set_wait_callback(None)
            try:
                database.cursor().copy_expert(
                    f"COPY {parent} ({names}) FROM STDIN WITH (FORMAT csv)", buffer, size=1 << 20
                )
            except psycopg2.errors.ForeignKeyViolation as exc:
                detail = shown(str(exc).splitlines()[0])
                raise MigrationError(
                    f"the rows of {shown(path)} reference users or API keys that are no longer"
                    f" there ({detail}): restore those rows first; nothing was restored"
                ) from None
            finally:
                psycopg2.extensions.set_wait_callback(wait)
        if signal_pending():
            raise KeyboardInterrupt
        found = database.execute_sql(checksum_sql(columns, restored, version), params).fetchall()
        rows = sum(row[1] for row in found)
        checksum = str(sum(int(row[2]) for row in found))
        if (rows, checksum) != (manifest["rows"], manifest["checksum"]["rows"]):
            raise MigrationError(
                f"the restored rows of {shown(path)} do not match its manifest ({rows:,} rows,"
                f" checksum {checksum}): rolled back, nothing was restored"
            )
        # The sequence only ever moves forward, past the restored ids.
        database.execute_sql(
            "SELECT setval(s, %(top)s) FROM pg_get_serial_sequence(%(table)s, 'id') AS s"
            " WHERE %(top)s > coalesce(pg_sequence_last_value(s), 0)",
            {"top": highest, "table": parent},
        )
    return rows


def read_manifest(path):
    name = os.path.basename(path)
    if not name.endswith(SUFFIX):
        raise MigrationError(f"{shown(path)} is not an archive data file (*{SUFFIX})")
    if not os.path.isfile(path):
        raise MigrationError(f"{shown(path)}: no such file; nothing was restored")
    try:
        with open(path.removesuffix(SUFFIX) + MANIFEST) as file:
            manifest = json.load(file)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ValueError("another format")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or exc
        raise MigrationError(
            f"{shown(path)} has no readable manifest beside it ({shown(str(reason))}): an"
            " unverified file is never restored"
        ) from None
    if not known_version(manifest.get("version")):
        raise MigrationError(
            f"{shown(path)} is an archive of version {shown(str(manifest.get('version')))},"
            f" which this migrate.py (version {VERSION}) cannot check: nothing was restored"
        )
    if not well_formed(manifest):
        raise MigrationError(
            f"{shown(path)} has a manifest without its rows, checksum, file or columns (edited?):"
            " an unverified file is never restored"
        )
    return manifest


def well_formed(manifest):
    """Whether a manifest has what a restore reads: rows, checksum, file and columns."""
    columns, file = manifest.get("columns"), manifest.get("file")
    return (
        type(manifest.get("rows")) is int
        and isinstance(file, dict)
        and isinstance(file.get("sha256"), str)
        and isinstance(manifest.get("checksum"), dict)
        and isinstance(manifest["checksum"].get("rows"), str)
        and isinstance(columns, list)
        and bool(columns)
        and all(
            isinstance(c, dict)
            and isinstance(c.get("name"), str)
            and isinstance(c.get("type"), str)
            for c in columns
        )
    )


def known_version(version):
    return type(version) is int and version in CHECKSUM_WORDS  # not true, which == 1


@contextlib.contextmanager
def one_snapshot_writable(target):
    """A read-write transaction with the guard and no statement timeout: all or nothing."""
    database.execute_sql(f"BEGIN; {guard_sql()}", guard_params(target))
    try:
        database.execute_sql(
            "SELECT set_config('statement_timeout', '0', true), set_config('DateStyle', 'ISO', true)"
        )
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            database.execute_sql("ROLLBACK")
        raise
    database.execute_sql("COMMIT")
