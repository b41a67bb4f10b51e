"""
Measure migrate.py against what operators would otherwise run, and the
indexes against the queries the gateway runs. Prints one markdown table.

Usage::

    python bench.py            # the full run: a million request logs (minutes)
    python bench.py --quick    # a smoke run of a few minutes (CI runs it)
    python bench.py --only 9,10,11   # sections by number

BENCH_DATABASE_URL names the server (default: that of TEST_DATABASE_URL, or
postgres on localhost). The script makes one scratch database there,
bench_scratch_<pid>, and drops it at the end. Timings are the median of
several runs, with min and max; every ratio compares figures of this run.

Whole runs (`python migrate.py`, `bench.py --create-tables`) are timed as an
installed copy runs: with the bytecode of every module they load compiled
beforehand, as pip compiles a package at install, into a cache of this run
(PYTHONPYCACHEPREFIX), not compiled afresh on each run as a checkout does
under PYTHONDONTWRITEBYTECODE=1; section 2 shows that case apart.
"""

import argparse
import contextlib
import hashlib
import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import namedtuple
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

import psycopg2
from peewee import BigIntegerField, CharField, ForeignKeyField, TextField
from playhouse.schema_diff import diff_models
from psycopg2.extensions import make_dsn, parse_dsn

import apply
import catalog
import migrate
import models
import partition
import plan

HERE = Path(__file__).resolve().parent
SERVER_URL = os.environ.get(
    "BENCH_DATABASE_URL",
    os.environ.get("TEST_DATABASE_URL", "host=localhost user=postgres password=postgres port=5432"),
)

Settings = namedtuple("Settings", "repeats request_logs stall_rows inserts hold_seconds")
QUICK = Settings(
    repeats=3, request_logs=100_000, stall_rows=100_000, inserts=20_000, hold_seconds=1.0
)
FULL = Settings(
    repeats=5, request_logs=1_000_000, stall_rows=1_000_000, inserts=100_000, hold_seconds=3.0
)

rows = []  # the one table: (section, what, result, note)


def add_row(section, what, result, note=""):
    rows.append((section, what, result, note))
    print(f"  {section} | {what} | {result} | {note}", file=sys.stderr, flush=True)


def spread(samples, unit="s", scale=1.0):
    """'median (min–max)' of samples."""
    values = [sample * scale for sample in samples]
    return f"{statistics.median(values):.3g} {unit} ({min(values):.3g}–{max(values):.3g})"


# --- The scratch database -----------------------------------------------------------


class Scratch:
    """A scratch database on the bench server, with a raw autocommit connection."""

    def __init__(self):
        params = parse_dsn(SERVER_URL)
        self.name = f"bench_scratch_{os.getpid()}"
        self.params = {**params, "dbname": self.name, "sslmode": "disable", "gssencmode": "disable"}
        self.url = make_dsn(**self.params)
        self._admin(f'CREATE DATABASE "{self.name}"')
        self.connection = psycopg2.connect(self.url)
        self.connection.autocommit = True

    def _admin(self, sql):
        admin = psycopg2.connect(make_dsn(**{**parse_dsn(SERVER_URL), "dbname": "postgres"}))
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(sql)
        admin.close()

    def url_with(self, **changes):
        return make_dsn(**{**self.params, **changes})

    def execute(self, sql, params=None):
        with self.connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def reset(self):
        drop_partitions(self)  # a section's 1,200 partitions in one DROP exhaust the lock table
        self.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")

    def drop(self):
        self.connection.close()
        if not models.database.is_closed():
            models.database.close()
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


# --- Counting what is sent to the server -----------------------------------------------


class CountingProxy:
    """A TCP proxy in front of PostgreSQL that counts the queries clients send.

    It counts Query ('Q') and Execute ('E') messages of the wire protocol, so
    it counts psql, psycopg2 and anything else alike. Needs sslmode=disable.
    """

    def __init__(self, host, port):
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.count = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            client, _ = self.listener.accept()
            server = socket.create_connection(self.target)
            for end in (client, server):  # no Nagle delay: it would add ~40 ms per round trip
                end.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source, destination, from_client):
        buffer, started = b"", False
        try:
            while data := source.recv(65536):
                destination.sendall(data)
                if not from_client:
                    continue
                buffer += data
                while True:
                    if not started:  # the startup message has a length but no type byte
                        if len(buffer) < 4:
                            break
                        length = int.from_bytes(buffer[:4], "big")
                        kind, size = None, length
                    else:
                        if len(buffer) < 5:
                            break
                        kind, size = buffer[:1], 1 + int.from_bytes(buffer[1:5], "big")
                    if len(buffer) < size:
                        break
                    buffer, started = buffer[size:], True
                    if kind in (b"Q", b"E"):
                        with self.lock:
                            self.count += 1
        except OSError:
            pass
        finally:
            for end in (source, destination):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def url_for(self, scratch):
        return scratch.url_with(host="127.0.0.1", port=str(self.port))

    def take(self):
        with self.lock:
            count, self.count = self.count, 0
        return count


# --- The three ways to make the schema ---------------------------------------------------

TOOLS = ("migrate.py", "psql -f schema.sql", "create_tables")


def tool_command(tool):
    if tool == "migrate.py":
        return [sys.executable, str(HERE / "migrate.py")]
    if tool == "create_tables":
        return [sys.executable, str(HERE / "bench.py"), "--create-tables"]
    return ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-f", str(HERE / "schema.sql")]


# Where the Python runs' bytecode goes, warmed before any timing (main).
bytecode_caches = {}


def child_environment(url, cached=True):
    """The environment of a whole run against url: every module's bytecode cached, as after an
    install, or (cached=False) a checkout's run under PYTHONDONTWRITEBYTECODE=1, which reads the
    bytecode pip wrote for the standard library and the packages but compiles the tool's own
    modules on every run."""
    environment = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    environment.pop("PYTHONPYCACHEPREFIX", None)
    environment["DATABASE_URL"] = url
    if not cached:
        environment["PYTHONDONTWRITEBYTECODE"] = "1"
    elif "cached" in bytecode_caches:
        environment["PYTHONPYCACHEPREFIX"] = bytecode_caches["cached"]
    return environment


@contextlib.contextmanager
def bytecode_cached():
    """A bytecode cache for the run's children, warmed with every module bench.py (so
    migrate.py) imports; removed at the end. Modules imported later, inside a function, are
    cached by the untimed runs of section 1 before any timed run."""
    with tempfile.TemporaryDirectory(prefix="bench-bytecode-") as folder:
        bytecode_caches.update(cached=folder)
        warm = [sys.executable, "-c", "import bench"]
        subprocess.run(warm, cwd=HERE, env=child_environment(SERVER_URL), check=True)
        try:
            yield
        finally:
            bytecode_caches.clear()


def run_tool(tool, url, *args, background=False, cached=True):
    """Run one tool against url; returns (seconds, exit status), or the Popen in the background."""
    command = tool_command(tool) + list(args)
    if tool.startswith("psql"):
        command += ["-d", url]
    environment = child_environment(url, cached)
    if background:
        return subprocess.Popen(
            command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
    started = time.perf_counter()
    status = subprocess.run(command, env=environment, capture_output=True, check=False).returncode
    return time.perf_counter() - started, status


def create_tables_with_peewee():
    """What `--create-tables` runs: Peewee's plain create_tables(safe=True)."""
    migrate.connect(migrate.connection_params(os.environ["DATABASE_URL"]))
    models.database.create_tables(models.MODELS, safe=True)


def hold_write_transaction(scratch, seconds):
    """Another session keeps an insert into request_logs open for `seconds`."""
    writer = psycopg2.connect(scratch.url)
    with writer.cursor() as cursor:
        cursor.execute(
            "INSERT INTO users (username, email, password_hash) VALUES ('w', 'w@x', 'h')"
        )
        cursor.execute(
            "INSERT INTO api_keys (user_id, key, name) SELECT id, 'wk', 'n' FROM users WHERE username = 'w'"
        )
        cursor.execute(
            "INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path, status_code,"
            " response_time) SELECT user_id, id, 1, 'm', 'GET', '/', 200, 1 FROM api_keys WHERE key = 'wk'"
        )
    timer = threading.Timer(seconds, lambda: (writer.rollback(), writer.close()))
    timer.start()
    return timer


def children_cpu_seconds():
    import resource  # POSIX only; test_queries imports this module on Windows too

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_counted(tool, url, proxy, **options):
    """One whole run: (wall seconds, statements sent, CPU seconds of the process). The CPU
    time hardly changes when other work shares the machine; the wall time does."""
    cpu = children_cpu_seconds()
    seconds, status = run_tool(tool, url, **options)
    assert status == 0, f"{tool} failed"
    return seconds, proxy.take(), children_cpu_seconds() - cpu


def bench_bootstrap_and_rerun(scratch, settings):
    proxy = CountingProxy(scratch.params.get("host", "localhost"), scratch.params.get("port", 5432))
    url = proxy.url_for(scratch)
    fresh, noop, blocked = {}, {}, {}
    for tool in TOOLS:
        # Untimed: a fresh and a no-op run, so that what a run imports late is cached too.
        scratch.reset()
        for _ in range(2):
            run_counted(tool, url, proxy)
    for tool in TOOLS:
        fresh[tool], noop[tool], blocked[tool] = [], [], []
        for _ in range(settings.repeats):
            scratch.reset()
            proxy.take()
            fresh[tool].append(run_counted(tool, url, proxy))
            noop[tool].append(run_counted(tool, url, proxy))
            timer = hold_write_transaction(scratch, settings.hold_seconds)
            seconds, _ = run_tool(tool, url)
            timer.join()
            blocked[tool].append(seconds)
    uncached = [
        run_counted("migrate.py", url, proxy, cached=False) for _ in range(settings.repeats)
    ]
    for label, results in (("1 fresh bootstrap", fresh), ("2 no-op re-run", noop)):
        base = statistics.median(s for s, _, _ in results["migrate.py"])
        for tool in TOOLS:
            times = [s for s, _, _ in results[tool]]
            statements = statistics.median(n for _, n, _ in results[tool])
            cpu = statistics.median(c for _, _, c in results[tool])
            add_row(
                label,
                tool,
                f"{spread(times)}, {statements:g} statements, CPU {cpu:.3g} s",
                f"{statistics.median(times) / base:.2f}× migrate.py's time",
            )
    cached_cpu = statistics.median(c for _, _, c in noop["migrate.py"])
    cpu = statistics.median(c for _, _, c in uncached)
    stale = " (a __pycache__ in the checkout: some may be cached)"
    add_row(
        "2 no-op re-run, the tool's bytecode not cached",
        "migrate.py",
        f"{spread([s for s, _, _ in uncached])}, CPU {cpu:.3g} s",
        f"CPU {cpu / cached_cpu:.2f}× the cached run's: a checkout under"
        " PYTHONDONTWRITEBYTECODE=1 compiles the tool's modules on each run"
        f"{stale if (HERE / '__pycache__').exists() else ''}",
    )
    for tool in TOOLS:
        add_row(
            "2 no-op re-run, write transaction open",
            tool,
            spread(blocked[tool]),
            f"the writer's transaction ends after {settings.hold_seconds:g} s",
        )


# --- Growth: catalog reads for 6, 20 and 80 tables -----------------------------------------


def synthetic_models(count):
    """`count` GORM-style models, each with an index and, but the first, a foreign key."""
    made = []
    for number in range(count):
        meta = type("Meta", (), {"table_name": f"synthetic_{number}", "comment": "synthetic"})
        attrs = {
            "name": CharField(max_length=255, index=True),
            "amount": BigIntegerField(**models.server_default(0)),
            "note": TextField(null=True),
            "Meta": meta,
        }
        if made:
            attrs["parent"] = ForeignKeyField(
                made[0], constraint_name=f"fk_synthetic_{number}_parent", index=True
            )
        made.append(type(f"Synthetic{number}", (models.GormModel,), attrs))
    return made


def count_queries(function):
    """(seconds, queries sent) of one call, counting models.database.execute_sql."""
    sent = []
    original = models.database.execute_sql

    def counting(sql, *args, **kwargs):
        sent.append(sql)
        return original(sql, *args, **kwargs)

    models.database.execute_sql = counting
    try:
        started = time.perf_counter()
        function()
        return time.perf_counter() - started, len(sent)
    finally:
        del models.database.execute_sql


def plan_synthetic(synthetic):
    plan.plan_changes(catalog.read_catalog(catalog.target_schema(), synthetic), models=synthetic)


def bench_growth(scratch, settings):
    migrate.connect(scratch.params)
    for count in (6, 20, 80):
        scratch.reset()
        synthetic = synthetic_models(count)
        models.database.create_tables(synthetic)
        ours = [count_queries(partial(plan_synthetic, synthetic)) for _ in range(settings.repeats)]
        theirs = [
            count_queries(partial(diff_models, models.database, synthetic))
            for _ in range(settings.repeats)
        ]
        ratio = statistics.median(s for s, _ in theirs) / statistics.median(s for s, _ in ours)
        add_row(
            "3 growth, no-op",
            f"{count} tables",
            f"migrate.py {spread([s for s, _ in ours], 'ms', 1000)}, {ours[0][1]} queries;"
            f" schema_diff {spread([s for s, _ in theirs], 'ms', 1000)}, {theirs[0][1]} queries",
            f"schema_diff takes {ratio:.1f}× as long",
        )
    models.database.close()


# --- Concurrency: replicas starting together ------------------------------------------------


def bench_concurrency(scratch):
    for count in (8, 16):
        for tool in ("migrate.py", "create_tables"):
            scratch.reset()
            runs = [run_tool(tool, scratch.url, background=True) for _ in range(count)]
            errors = [run.communicate(timeout=300)[1].decode() for run in runs]
            successes = sum(run.returncode == 0 for run in runs)
            failure = next(
                (e.strip().splitlines()[-1] for e, r in zip(errors, runs) if r.returncode), ""
            )
            add_row(
                "4 simultaneous runs, fresh database",
                f"{count} × {tool}",
                f"{successes}/{count} succeed",
                failure[:90],
            )


# --- Writer stall: building an index under insert traffic ---------------------------------


class Inserter(threading.Thread):
    """Inserts request logs one at a time and records how long each took."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.url = url
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True
        self.stop = threading.Event()
        self.latencies = []  # (finished at, seconds)
        self.failure = None  # an insert's error, with request_logs' partitions at that moment

    def run(self):
        try:
            with self.connection.cursor() as cursor:
                while not self.stop.is_set():
                    started = time.perf_counter()
                    cursor.execute(
                        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id,"
                        " model, method, path, status_code, response_time)"
                        " VALUES (now(), 1, 1, 1, 'model-1', 'POST', '/', 200, 10)"
                    )
                    finished = time.perf_counter()
                    self.latencies.append((finished, finished - started))
        except psycopg2.Error as exc:
            # An insert the application would have lost: what the layout was, for the report.
            self.failure = f"{exc.pgerror or exc}".strip() + f"; partitions then: {self.layout()}"
        finally:
            self.connection.close()

    def layout(self):
        connection = psycopg2.connect(self.url)
        with contextlib.closing(connection), connection.cursor() as cursor:
            cursor.execute(
                "SELECT now(), array_agg(c.relname || ' ' || pg_get_expr(c.relpartbound, c.oid)"
                " ORDER BY c.relname DESC) FILTER (WHERE c.relname IS NOT NULL)"
                " FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid"
                " WHERE h.inhparent = to_regclass('request_logs')"
            )
            moment, partitions = cursor.fetchone()
        return f"at {moment}: {(partitions or [])[:4]} ({len(partitions or [])} in all)"


def build_while_inserting(scratch, *flags):
    """Drop one index of request_logs and let migrate.py rebuild it under insert traffic."""
    scratch.execute("DROP INDEX idx_request_logs_model_created")
    inserter = Inserter(scratch.url)
    inserter.start()
    time.sleep(0.3)
    started = time.perf_counter()
    seconds, status = run_tool("migrate.py", scratch.url, *flags)
    finished = time.perf_counter()
    inserter.stop.set()
    inserter.join()
    assert status == 0, "migrate.py failed while building the index"
    waits = [
        latency for at, latency in inserter.latencies if at >= started and at - latency <= finished
    ]
    return seconds, max(waits), statistics.median(waits)


def bench_writer_stall(scratch, settings):
    prepare_gateway_database(scratch, settings.stall_rows)
    results = {}
    for label, flags in (("online (the default)", ()), ("--atomic", ("--atomic",))):
        results[label] = [build_while_inserting(scratch, *flags) for _ in range(settings.repeats)]
    longest = {label: [r[1] for r in runs] for label, runs in results.items()}
    ratio = statistics.median(longest["--atomic"]) / statistics.median(
        longest["online (the default)"]
    )
    for label, runs in results.items():
        add_row(
            f"5 building idx_request_logs_model_created on {settings.stall_rows:,} rows while inserting",
            f"migrate.py {label}",
            f"longest insert {spread(longest[label], 'ms', 1000)}; median insert"
            f" {spread([r[2] for r in runs], 'ms', 1000)}; whole run {spread([r[0] for r in runs])}",
            ""
            if label == "--atomic"
            else f"the longest insert is {ratio:.0f}× shorter than with --atomic",
        )


# --- Stall per kind of change: what writers wait while a change is applied -------------------

# Each change undone before a run, and the plain DDL a psql -f file or GORM's
# AutoMigrate sends for it (no lock_timeout, the checks in the statement).
CHANGES = {
    "add a column to users": (
        "ALTER TABLE users DROP COLUMN last_sign_in",
        'ALTER TABLE "users" ADD COLUMN "last_sign_in" TIMESTAMPTZ',
    ),
    "add a foreign key to request_logs": (
        "ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user",
        (
            'ALTER TABLE "request_logs" ADD CONSTRAINT "fk_request_logs_user"'
            ' FOREIGN KEY ("user_id") REFERENCES "users" ("id")'
        ),
    ),
    "add an index to request_logs": (
        "DROP INDEX idx_request_logs_model_created",
        'CREATE INDEX "idx_request_logs_model_created" ON "request_logs" ("model", "created_at" DESC)',
    ),
}
WAYS = ("migrate.py (online)", "migrate.py --atomic", "plain DDL (psql -f, AutoMigrate)")


def apply_change(scratch, way, ddl):
    """Run one way of applying a change; returns (seconds, exit status)."""
    if way.startswith("plain"):
        started = time.perf_counter()
        command = ["psql", "-q", "-X", "-v", "ON_ERROR_STOP=1", "-d", scratch.url, "-c", ddl]
        status = subprocess.run(command, capture_output=True, check=False).returncode
        return time.perf_counter() - started, status
    flags = ("--atomic",) if way.endswith("--atomic") else ()
    return run_tool("migrate.py", scratch.url, "--lock-timeout", "10", *flags)


def stall_while_inserting(scratch, change, way, reader_seconds):
    """Undo `change`, then apply it `way` under insert traffic (and a reader on users)."""
    undo, ddl = CHANGES[change]
    scratch.execute(undo)
    inserter = Inserter(scratch.url)
    inserter.start()
    time.sleep(0.3)
    timer = None
    if reader_seconds:
        reader = psycopg2.connect(scratch.url)
        reader.cursor().execute("SELECT count(*) FROM users")
        timer = threading.Timer(reader_seconds, lambda: (reader.rollback(), reader.close()))
        timer.start()
    started = time.perf_counter()
    seconds, status = apply_change(scratch, way, ddl)
    finished = time.perf_counter()
    if timer:
        timer.join()
    time.sleep(0.2)
    inserter.stop.set()
    inserter.join()
    waits = [w for at, w in inserter.latencies if at >= started and at - w <= finished]
    return seconds, status, max(waits), statistics.median(waits)


def bench_stall_per_change(scratch, settings):
    """Section 8 (same database as section 5): the longest insert while each change is applied."""
    repeats = min(settings.repeats, 3)
    for condition, reader_seconds in (
        ("inserts running", 0),
        (
            f"inserts + a {settings.hold_seconds:g} s read transaction on users",
            settings.hold_seconds,
        ),
    ):
        for change in CHANGES:
            for way in WAYS:
                runs = [
                    stall_while_inserting(scratch, change, way, reader_seconds)
                    for _ in range(repeats)
                ]
                succeeded = sum(status == 0 for _, status, _, _ in runs)
                add_row(
                    f"8 stall: {change}, {settings.stall_rows:,} logs, {condition}",
                    way,
                    f"longest insert {spread([r[2] for r in runs], 'ms', 1000)}; median"
                    f" {spread([r[3] for r in runs], 'ms', 1000)}; run {spread([r[0] for r in runs])}",
                    f"{succeeded}/{repeats} runs succeeded",
                )


# --- Reads of another table during --atomic ----------------------------------------------------


class Reader(threading.Thread):
    """Reads one user by id at a time and records how long each read took."""

    def __init__(self, url):
        super().__init__(daemon=True)
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True
        self.stop = threading.Event()
        self.latencies = []

    def run(self):
        with self.connection.cursor() as cursor:
            while not self.stop.is_set():
                started = time.perf_counter()
                cursor.execute("SELECT * FROM users WHERE id = 42")
                finished = time.perf_counter()
                self.latencies.append((finished, finished - started))
        self.connection.close()


ATOMIC_UNDO = (
    "ALTER TABLE users DROP COLUMN last_sign_in;"
    " DROP INDEX idx_request_logs_model, idx_request_logs_status_code"
)
# The same three statements in the order the transaction had before (the ALTER first).
ATOMIC_ALTER_FIRST = (
    'BEGIN; ALTER TABLE "users" ADD COLUMN "last_sign_in" TIMESTAMPTZ;'
    ' CREATE INDEX "idx_request_logs_model" ON "request_logs" ("model");'
    ' CREATE INDEX "idx_request_logs_status_code" ON "request_logs" ("status_code"); COMMIT'
)


def reads_during(scratch, apply_it):
    scratch.execute(ATOMIC_UNDO)
    reader = Reader(scratch.url)
    reader.start()
    time.sleep(0.3)
    started = time.perf_counter()
    apply_it()
    finished = time.perf_counter()
    reader.stop.set()
    reader.join()
    waits = [w for at, w in reader.latencies if at >= started and at - w <= finished]
    return finished - started, max(waits)


def bench_atomic_reads(scratch, settings):
    """Section 9: reads of users while --atomic adds a column to users and builds two indexes
    on request_logs."""
    prepare_gateway_database(scratch, settings.stall_rows)
    ways = {
        "migrate.py --atomic (scans first, ACCESS EXCLUSIVE last)": lambda: run_tool(
            "migrate.py", scratch.url, "--atomic"
        ),
        "one transaction, ALTER TABLE users first": lambda: subprocess.run(
            [
                "psql",
                "-q",
                "-X",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                scratch.url,
                "-c",
                ATOMIC_ALTER_FIRST,
            ],
            capture_output=True,
            check=True,
        ),
    }
    for way, apply_it in ways.items():
        runs = [reads_during(scratch, apply_it) for _ in range(min(settings.repeats, 3))]
        add_row(
            f"9 reads of users during --atomic: a users column and 2 request_logs indexes,"
            f" {settings.stall_rows:,} logs",
            way,
            f"longest read {spread([r[1] for r in runs], 'ms', 1000)}; run {spread([r[0] for r in runs])}",
        )


# --- Partitioning -------------------------------------------------------------------------------


def dated_logs(scratch, count):
    """Section 5's kind of data, `count` logs over the last 30 days."""
    prepare_gateway_database(scratch, count)


def convert_while_inserting(scratch):
    """The conversion under insert traffic: its time, the longest insert, the swap's lock
    time, and the first line migrate.py printed after the longest insert began (the step it
    fell in)."""
    inserter = Inserter(scratch.url)
    inserter.start()
    time.sleep(0.3)
    started = time.perf_counter()
    run = subprocess.Popen(
        [sys.executable, str(HERE / "migrate.py"), "--partition-request-logs"]
        + ["--lock-timeout", "30", "--progress", "0"],
        env=child_environment(scratch.url),
        stderr=subprocess.PIPE,
        text=True,
    )
    printed = [(time.perf_counter(), line.rstrip()) for line in run.stderr]
    run.wait()
    finished = time.perf_counter()
    time.sleep(0.2)
    inserter.stop.set()
    inserter.join()
    assert run.returncode == 0, "\n".join(line for _, line in printed)
    swap = next(
        float(line.rsplit(" for ", 1)[1].split()[0])
        for _, line in printed
        if line.startswith("migrate: swap ") and "held its locks" in line
    )
    at, longest = max(
        ((at, w) for at, w in inserter.latencies if at >= started and at - w <= finished),
        key=lambda pair: pair[1],
    )
    after = [line for when, line in printed if when >= at - longest]
    step = after[0].removeprefix("migrate: ").split(":")[0] if after else "the end"
    return finished - started, longest, swap, step


def bench_partitioning(scratch, settings):
    """Section 10: converting request_logs to monthly partitions under insert traffic."""
    sizes = (100_000, 300_000) if settings is QUICK else (1_000_000, 10_000_000)
    for size in sizes:
        runs = []
        for _ in range(1 if size >= 10_000_000 else min(settings.repeats, 3)):
            dated_logs(scratch, size)
            runs.append(convert_while_inserting(scratch))
        add_row(
            f"10 partitioning: converting {size:,} request logs while inserting",
            "migrate.py --partition-request-logs",
            f"longest insert {spread([r[1] for r in runs], 'ms', 1000)}; swap transaction"
            f" {spread([r[2] for r in runs], 'ms')}; whole run {spread([r[0] for r in runs])}",
            f"{len(runs)} run(s), every insert succeeded; the longest fell in the step"
            f' that printed "{runs[-1][3]}" (last run)',
        )


def wal_bytes_and_seconds(scratch, action):
    before = scratch.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    after = scratch.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
    written = scratch.execute("SELECT pg_wal_lsn_diff(%(a)s, %(b)s)", {"a": after, "b": before})[0][
        0
    ]
    return seconds, int(written)


def bench_retention(scratch, settings):
    """Section 11: one month of request logs removed by dropping its partition, against a
    batched DELETE of the same rows from a plain table."""
    count = settings.stall_rows
    now = datetime.now(UTC)
    old_month = partition.add_months(partition.month_start(now), -3)
    fill = (
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method,"
        " path, status_code, response_time) SELECT %(start)s::timestamptz + (g %% 2419200) * interval"
        " '1 second', 1, 1, 1, 'model-1', 'POST', '/', 200, 10 FROM generate_series(1, %(count)s) g"
    )
    results = {}
    for layout in ("partitioned", "plain"):
        scratch.reset()
        if layout == "partitioned":
            migrate_in_process(scratch, partition=True, now=old_month)
            migrate_in_process(scratch, now=now)
        else:
            migrate_in_process(scratch)
        scratch.execute("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
        scratch.execute("INSERT INTO api_keys (user_id, key, name) VALUES (1, 'k', 'n')")
        scratch.execute(fill, {"start": old_month, "count": count})
        scratch.execute("CHECKPOINT")

        def retain():
            _, status = run_tool("migrate.py", scratch.url, "--retain-request-logs", "60")
            assert status == 0

        seconds, wal = wal_bytes_and_seconds(scratch, retain)
        size = (
            scratch.execute("SELECT pg_total_relation_size('request_logs')")[0][0]
            if layout == "plain"
            else sum(
                s
                for (s,) in scratch.execute(
                    "SELECT pg_total_relation_size(relid) FROM pg_partition_tree('request_logs')"
                )
            )
        )
        left = scratch.execute("SELECT count(*) FROM request_logs")[0][0]
        results[layout] = (seconds, wal, size, left)
    for layout, label in (
        ("partitioned", "drop the month's partition"),
        ("plain", "batched DELETE"),
    ):
        seconds, wal, size, left = results[layout]
        add_row(
            f"11 retention: removing one month, {count:,} request logs",
            label,
            f"{seconds:.2f} s; WAL {wal / 2**20:.1f} MiB; request_logs {size / 2**20:.1f} MiB after",
            f"{left} rows left"
            + (
                ""
                if layout == "partitioned"
                else "; the space returns only after VACUUM, to the table"
            ),
        )


class MonthReader(threading.Thread):
    """Counts the rows of [since, ...) over and over; the count must never drop (the inserts
    only add rows), else a reader saw rows missing."""

    def __init__(self, url, since):
        super().__init__(daemon=True)
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True
        self.since, self.stop, self.counts = since, threading.Event(), []

    def run(self):
        with self.connection.cursor() as cursor:
            while not self.stop.is_set():
                cursor.execute(
                    "SELECT count(*) FROM request_logs WHERE created_at >= %s", (self.since,)
                )
                self.counts.append(cursor.fetchone()[0])
                # A pause, as the gateway's readers have: a reader that never lets go of
                # request_logs holds off every lock attempt of 50 ms (OPERATING.md); and each
                # count of a 2 M-row month is 0.1-0.2 s of a core: counting it back to back
                # every 50 ms, with the copy, kept both cores busy and an insert took 144 ms
                # in the copy step, which holds no lock any writer waits for.
                time.sleep(0.25)
        self.connection.close()

    def drops(self):
        return sum(1 for a, b in zip(self.counts, self.counts[1:], strict=False) if b < a)


class LockHolds(logging.Handler):
    """The 'held its locks for N ms' lines of an in-process run, by step."""

    def __init__(self):
        super().__init__()
        self.holds, self.printed = [], []

    def emit(self, record):
        message = record.getMessage()
        self.printed.append((time.perf_counter(), f"migrate: {message}"))
        if "its transaction held its locks for" in message:
            step = message.split(": its transaction")[0]
            self.holds.append((step, float(message.rsplit(" for ", 1)[1].split()[0])))


def with_inserts(scratch, action, since=None, when=False):
    """action() while a session inserts this month's logs one at a time (and a reader counts
    rows from `since`); returns (action's result, longest insert in s, the reader's drops);
    with `when`, the longest insert as (seconds, the perf_counter it began at)."""
    inserter = Inserter(scratch.url)
    reader = MonthReader(scratch.url, since) if since else None
    inserter.start()
    if reader:
        reader.start()
    try:
        time.sleep(0.3)
        started = time.perf_counter()
        result = action()
        finished = time.perf_counter()
        time.sleep(0.2)
    finally:  # the action failed: its inserter must not go on into the next section
        for thread in (inserter, reader):
            if thread:
                thread.stop.set()
                thread.join()
        if inserter.failure:
            raise AssertionError(f"an insert failed during the action: {inserter.failure}")
    waits = [(w, at - w) for at, w in inserter.latencies if at >= started and at - w <= finished]
    longest = max(waits) if when else max(waits)[0]
    inserts_seen.update(count=len(waits), over_100_ms=sum(w > 0.1 for w, _ in waits))
    return result, longest, (reader.drops() if reader else None)


# The inserts of with_inserts' last action: how many, and how many waited over 100 ms.
inserts_seen = {"count": 0, "over_100_ms": 0}


def seed_users(scratch):
    scratch.execute("INSERT INTO users (username, email, password_hash) VALUES ('u', 'e', 'h')")
    scratch.execute("INSERT INTO api_keys (user_id, key, name) VALUES (1, 'k', 'n')")


FILL_SPREAD = (
    "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method,"
    " path, status_code, response_time) SELECT %(start)s::timestamptz + (g::float8 * %(seconds)s"
    " / %(count)s) * interval '1 second', 1, 1, 1, 'model-1', 'POST', '/', 200, 10"
    " FROM generate_series(1, %(count)s) g"
)


def run_migrate_logged(scratch, *args, printed=None):
    """migrate.py as operators run it; (seconds, exit code, its stderr lines). `printed`, a
    list, gets (perf_counter, line) as each line arrives."""
    started = time.perf_counter()
    run = subprocess.Popen(
        [sys.executable, str(HERE / "migrate.py"), *args, "--progress", "0"],
        env={**os.environ, "DATABASE_URL": scratch.url},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    for line in run.stderr:
        lines.append(line.rstrip("\n"))
        if printed is not None:
            printed.append((time.perf_counter(), lines[-1]))
    run.wait()
    return time.perf_counter() - started, run.returncode, lines


def step_at(printed, moment):
    """The step migrate.py was in at `moment`: the first line it printed after then."""
    after = [line for when, line in printed if when >= moment]
    return after[0].removeprefix("migrate: ").split(":")[0] if after else "the end"


def held_ms(lines, prefix):
    return [
        float(line.rsplit(" for ", 1)[1].split()[0])
        for line in lines
        if line.startswith(f"migrate: {prefix}") and "held its locks" in line
    ]


def bench_move_out_of_default(scratch, settings):
    """Section 12: a month's rows in the default partition (a month no run made ready) given
    their partition while inserts run: the switch (moving.py) against the SHARE-lock move."""
    count = 200_000 if settings is QUICK else 2_000_000
    now = datetime.now(UTC)
    this = partition.month_start(now)
    results = {}
    for way in ("switch", "one-statement copy", "share lock"):
        scratch.reset()
        migrate_in_process(scratch, partition=True, now=partition.add_months(this, -4))
        seed_users(scratch)
        seconds_so_far = max(60, int((now - this).total_seconds()) - 60)
        scratch.execute(FILL_SPREAD, {"start": this, "seconds": seconds_so_far, "count": count})
        scratch.execute("CHECKPOINT")
        printed = []
        if way == "switch":

            def action(printed=printed):
                return run_migrate_logged(scratch, "--lock-timeout", "60", printed=printed)

        elif way == "one-statement copy":

            def action():
                return copy_in_one_statement(scratch, this)

        else:

            def action():
                connection = psycopg2.connect(scratch.url)
                started = time.perf_counter()
                with connection, connection.cursor() as cursor:
                    for sql in partition.move_by_hand("request_logs_default", this)[1:-1]:
                        cursor.execute(sql)
                connection.close()
                return time.perf_counter() - started, 0, []

        (seconds, status, lines), (longest, began), drops = with_inserts(
            scratch, action, since=this, when=True
        )
        assert status == 0, "\n".join(lines)
        left = scratch.execute("SELECT count(*) FROM ONLY request_logs_default")[0][0]
        step = step_at(printed, began) if printed else None
        over = f"{inserts_seen['over_100_ms']:,} of {inserts_seen['count']:,} inserts over 100 ms"
        results[way] = (seconds, longest, drops, held_ms(lines, "switch "), left, step, over)
    for way, label in (
        ("switch", "migrate.py: copy beside, catch up, one switch"),
        (
            "one-statement copy",
            (
                "the copy alone as one INSERT ... SELECT, into a table LIKE request_logs with"
                " its indexes and foreign keys"
            ),
        ),
        ("share lock", "one transaction: LOCK SHARE, move the rows, ATTACH (before)"),
    ):
        seconds, longest, drops, holds, left, step, over = results[way]
        add_row(
            f"12 upkeep: {count:,} rows of this month in the default partition, inserts running",
            label,
            f"longest insert {longest * 1000:.0f} ms ({over}); whole run {seconds:.1f} s"
            + (f"; switch held its locks {holds[0]:.0f} ms" if holds else ""),
            f"the reader's count of the month dropped {drops} times; {left} rows left in default"
            + (f'; the longest insert fell in the step that printed "{step}"' if step else ""),
        )


def copy_in_one_statement(scratch, this):
    """The month's rows copied as moving.py copied them before its batches: one statement."""
    scratch.execute(
        "CREATE TABLE copied (LIKE request_logs INCLUDING DEFAULTS INCLUDING CONSTRAINTS"
        " INCLUDING INDEXES); ALTER TABLE copied ADD FOREIGN KEY (user_id) REFERENCES users (id),"
        " ADD FOREIGN KEY (api_key_id) REFERENCES api_keys (id)"
    )
    started = time.perf_counter()
    scratch.execute(
        "INSERT INTO copied SELECT * FROM ONLY request_logs_default WHERE created_at >= %s", (this,)
    )
    return time.perf_counter() - started, 0, []


WALDUMP = Path("/usr/lib/postgresql") / "{major}" / "bin" / "pg_waldump"


def database_wal(scratch, action):
    """The WAL bytes of records touching the scratch database's relations while action()
    runs: pg_waldump over the server's pg_wal (the server is shared, and its LSN counts every
    database's writes); the LSN difference where pg_waldump or pg_wal cannot be read."""
    major = scratch.execute("SHOW server_version_num")[0][0][:2]
    folder = Path(scratch.execute("SHOW data_directory")[0][0]) / "pg_wal"
    dboid = scratch.execute("SELECT oid FROM pg_database WHERE datname = current_database()")[0][0]
    # A slot keeps the segments from start on: a checkpoint during a large action recycles
    # them, and pg_waldump then read only the tail (56 MiB counted of some 500).
    slot = f"{scratch.name}_wal"
    start = scratch.execute(
        "SELECT lsn::text FROM pg_create_physical_replication_slot(%s, true)", (slot,)
    )[0][0]
    try:
        result = action()
        # The end before the switch: after it, the next segment may be a recycled file, which
        # pg_waldump reads as an error ("unexpected pageaddr").
        end = scratch.execute("SELECT pg_current_wal_insert_lsn()")[0][0]
        scratch.execute("SELECT pg_switch_wal()")  # the records written so far are on disk
        waldump = str(WALDUMP).format(major=major)
        try:
            run = subprocess.run(
                [waldump, "-p", str(folder), "-s", start, "-e", end],
                capture_output=True,
                text=True,
                check=False,
            )
            dump, why = run.stdout, run.stderr.strip().splitlines()[:1]
            if run.returncode:  # a part of the range could not be read: not a count
                dump = ""
        except OSError as exc:
            dump, why = "", [str(exc)]
    finally:
        scratch.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    if not dump:
        lsn = scratch.execute("SELECT pg_wal_lsn_diff(%s, %s)", (end, start))[0][0]
        return result, int(lsn), f"LSN difference, all databases ({'; '.join(why)})"
    marker = f" rel 1663/{dboid}/"
    total = 0
    for line in dump.splitlines():
        if marker in line and "len (rec/tot):" in line:
            total += int(line.split("len (rec/tot):")[1].split(",")[0].split("/")[1])
    return result, total, "pg_waldump, this database's records"


def bench_legacy_retention(scratch, settings):
    """Section 13: --retain-request-logs 90 on a converted table (12 months in
    request_logs_legacy): month partitions of the kept rows (moving.py) against the batched
    DELETE, with WAL, disk afterwards, and the longest insert."""
    count = 200_000 if settings is QUICK else 2_000_000
    now = datetime.now(UTC)
    results = {}
    for way in ("keep", "batched DELETE"):
        scratch.reset()
        migrate_in_process(scratch)
        seed_users(scratch)
        scratch.execute(
            FILL_SPREAD,
            {"start": now - timedelta(days=360), "seconds": 86_400 * 359, "count": count},
        )
        migrate_in_process(scratch, partition=True)
        scratch.execute("VACUUM ANALYZE request_logs_legacy")
        scratch.execute("CHECKPOINT")
        cutoff = now - timedelta(days=90)
        kept = scratch.execute(
            "SELECT count(*) FROM request_logs WHERE created_at >= %s", (cutoff,)
        )[0][0]

        def load_kept(cutoff=cutoff):
            scratch.execute("CREATE TABLE fresh (LIKE request_logs INCLUDING ALL)")
            scratch.execute(
                "INSERT INTO fresh SELECT * FROM request_logs WHERE created_at >= %s", (cutoff,)
            )

        _, wal_fresh, _ = database_wal(scratch, load_kept)
        fresh = scratch.execute("SELECT pg_total_relation_size('fresh')")[0][0]
        scratch.execute("DROP TABLE fresh")
        scratch.execute("CHECKPOINT")
        printed = []
        if way == "keep":

            def action(printed=printed):
                return run_migrate_logged(
                    scratch, "--retain-request-logs", "90", "--lock-timeout", "60", printed=printed
                )

        else:

            def action(cutoff=cutoff):
                started = time.perf_counter()
                while scratch.execute(
                    "WITH gone AS (DELETE FROM ONLY request_logs_legacy WHERE ctid = ANY (ARRAY ("
                    "SELECT ctid FROM ONLY request_logs_legacy WHERE created_at < %s LIMIT 5000))"
                    " RETURNING 1) SELECT count(*) FROM gone",
                    (cutoff,),
                )[0][0]:
                    pass
                return time.perf_counter() - started, 0, []

        holder = {}

        def measured(holder=holder, action=action):
            holder["result"] = action()

        # The inserts run during the action only: pg_switch_wal and pg_waldump after it once
        # held an insert 3 s ("the end"), the harness's own doing.
        (_, (longest, began), drops), wal, how = database_wal(
            scratch,
            lambda cutoff=cutoff, measured=measured: with_inserts(
                scratch, measured, since=cutoff, when=True
            ),
        )
        seconds, status, lines = holder["result"]
        assert status == 0, "\n".join(lines)
        size = sum(
            s
            for (s,) in scratch.execute(
                "SELECT pg_total_relation_size(relid) FROM pg_partition_tree('request_logs')"
            )
        )
        results[way] = (
            seconds,
            wal,
            size,
            longest,
            drops,
            held_ms(lines, "switch "),
            kept,
            fresh,
            wal_fresh,
            how,
            step_at(printed, began) if printed else None,
        )
    for way, label in (
        ("keep", "migrate.py: kept rows copied to months, legacy dropped"),
        ("batched DELETE", "batched DELETE, 5,000 rows a batch (before)"),
    ):
        seconds, wal, size, longest, drops, holds, kept, fresh, wal_fresh, how, step = results[way]
        add_row(
            f"13 retention: {count:,} logs over 12 months in request_logs_legacy, 90 days kept"
            f" ({kept:,} rows)",
            label,
            f"{seconds:.1f} s; WAL {wal / 2**20:.1f} MiB ({wal / wal_fresh:.2f}x writing the kept"
            f" rows once); request_logs {size / 2**20:.1f} MiB after ({size / fresh:.2f}x the kept"
            f" rows loaded fresh); longest insert {longest * 1000:.0f} ms"
            + (f"; switch held its locks {holds[0]:.0f} ms" if holds else ""),
            f"the reader's count of kept rows dropped {drops} times; WAL by {how}; the"
            " inserts' own rows are in the WAL and the space"
            + (f'; the longest insert fell in the step that printed "{step}"' if step else ""),
        )


def drop_partitions(scratch):
    """request_logs' partitions dropped 40 a transaction: one DROP SCHEMA of 1,200 of them
    exhausts the server's shared lock table."""
    names = [
        name
        for (name,) in scratch.execute(
            "SELECT c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid"
            " WHERE h.inhparent = to_regclass('request_logs')"
        )
    ]
    for first in range(0, len(names), 40):
        scratch.execute(
            "DROP TABLE "
            + ", ".join('"' + n.replace('"', '""') + '"' for n in names[first : first + 40])
        )


def add_past_months(scratch, this, first, last):
    """Partitions of request_logs for the months `first` to `last` before `this`, 40 a
    transaction: each holds a lock per partition and index, and the server's lock table
    (max_locks_per_transaction 64) is shared by every session."""
    for start in range(first, last + 1, 40):
        scratch.execute(
            "DO $$ DECLARE m timestamptz; BEGIN FOR i IN %(first)s..%(last)s LOOP"
            " m := %(this)s::timestamptz - make_interval(months => i);"
            " EXECUTE format('CREATE TABLE %%I PARTITION OF request_logs FOR VALUES FROM"
            " (%%L) TO (%%L)', 'request_logs_' || to_char(m AT TIME ZONE 'UTC',"
            " 'YYYY_MM'), m, m + interval '1 month'); END LOOP; END $$",
            {"first": start, "last": min(start + 39, last), "this": this},
        )


def bench_drops(scratch, settings):
    """Section 14: retention dropping months beside a default partition (a plain DETACH and
    DROP in one transaction) at 120 and 1,200 partitions: the lock hold per drop, effects read
    inside the transaction (before) and after its COMMIT (now)."""
    sizes = (120,) if settings is QUICK else (120, 1_200)
    now = datetime.now(UTC)
    this = partition.month_start(now)
    for size in sizes:
        for way in ("inside", "after COMMIT"):
            scratch.reset()
            migrate_in_process(scratch, partition=True, now=now)
            seed_users(scratch)
            months = size - partition.MONTHS_AHEAD - 2
            add_past_months(scratch, this, 1, months)
            days = (
                now - partition.add_months(this, -(size - partition.MONTHS_AHEAD - 2) + 10)
            ).days
            if way == "inside":
                # In process, to put back the old order (apply.CHECKED_AFTER_COMMIT); the
                # inserter's thread then shares the planner's GIL, which lengthens its waits.
                saved = apply.CHECKED_AFTER_COMMIT
                handler = LockHolds()
                logger = logging.getLogger("migrate")
                level = logger.level
                logger.setLevel(logging.INFO)
                logger.addHandler(handler)
                apply.CHECKED_AFTER_COMMIT = ("swap ",)
                try:
                    _, (longest, began), _ = with_inserts(
                        scratch,
                        lambda days=days: migrate_in_process(scratch, retain_days=days),
                        when=True,
                    )
                finally:
                    apply.CHECKED_AFTER_COMMIT = saved
                    logger.removeHandler(handler)
                    logger.setLevel(level)
                printed = handler.printed
                lines = [line for _, line in printed]
            else:  # as operators run it: its own process
                printed = []
                (_, status, lines), (longest, began), _ = with_inserts(
                    scratch,
                    lambda days=days, printed=printed: run_migrate_logged(
                        scratch,
                        "--retain-request-logs",
                        str(days),
                        "--lock-timeout",
                        "60",
                        printed=printed,
                    ),
                    when=True,
                )
                assert status == 0, "\n".join(lines)
            holds = held_ms(lines, "detach ")
            others = held_ms(lines, "unlink ") + held_ms(lines, "drop ")
            add_row(
                f"14 retention: dropping {len(holds)} months beside a default, {size:,} partitions",
                f"effects read {way}",
                f"lock held per detach {spread(holds, 'ms')}; longest insert {longest * 1000:.0f} ms"
                f' (in the step that printed "{step_at(printed, began)}")',
                "the DETACH's transaction: ACCESS EXCLUSIVE on request_logs; then the foreign"
                " keys' and the DROP's, each locking only the detached table (and users, api_keys"
                f" for the first): {spread(others, 'ms')}",
            )


def bench_switch_sizes(scratch, settings):
    """Section 16: the switch of a move (DETACH the default, ATTACH the month's copy and the
    new default: statements the plan calls instant) at 20,000 and 200,000 rows and at 8 and
    120 partitions: its lock hold, read from the run's log. No inserts run: the hold of the
    statements alone, not of a replay."""
    now = datetime.now(UTC)
    this = partition.month_start(now)
    made = partition.add_months(this, -4)  # the layout has months this - 4 ... this - 1
    for partitions in (8, 120):
        for count in (20_000, 200_000):
            drop_partitions(scratch)
            scratch.reset()
            migrate_in_process(scratch, partition=True, now=made)
            seed_users(scratch)
            add_past_months(scratch, made, 1, partitions - 6)  # + 4 months and the default
            total = scratch.execute(
                "SELECT count(*) FROM pg_inherits WHERE inhparent = to_regclass('request_logs')"
            )[0][0]
            seconds_so_far = max(60, int((now - this).total_seconds()) - 60)
            scratch.execute(FILL_SPREAD, {"start": this, "seconds": seconds_so_far, "count": count})
            scratch.execute("CHECKPOINT")
            _, status, lines = run_migrate_logged(scratch, "--lock-timeout", "60")
            assert status == 0, "\n".join(lines)
            holds = held_ms(lines, "switch ")
            add_row(
                "16 upkeep: the switch of a move at two sizes, no inserts",
                f"{count:,} rows of this month in the default, {total + 1:,} partitions",
                f"switch held its locks {holds[0]:.0f} ms",
                "DETACH the default, ATTACH the month's copy and the new default, in one"
                " transaction under ACCESS EXCLUSIVE on request_logs, users and api_keys",
            )


# --- Retention with --archive ------------------------------------------------------------------

# A month of logs as the gateway writes them: a few hundred users and models, most requests
# succeed, one in twenty carries an error text.
ARCHIVE_FILL = """
INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path,
    status_code, response_time, tokens_used, error_msg)
SELECT %(start)s::timestamptz + (g %% 2419200) * interval '1 second' + random() * interval '1 second',
    1 + g %% 200, 1 + g %% 200, 1 + g %% 7, 'model-' || (g::bigint * 7919 %% 40), 'POST',
    '/v1/chat/completions', CASE WHEN g %% 20 = 0 THEN 500 ELSE 200 END,
    (random() * 3000)::int, (random() * 4000)::int,
    CASE WHEN g %% 20 = 0 THEN 'upstream error: timeout after ' || (random() * 30)::int || ' s'
         ELSE '' END
FROM generate_series(1, %(count)s) g
"""


def archive_month(scratch, count):
    """A partitioned request_logs whose month of three months ago holds `count` logs;
    returns that partition's name."""
    now = datetime.now(UTC)
    old_month = partition.add_months(partition.month_start(now), -3)
    scratch.reset()
    migrate_in_process(scratch, partition=True, now=old_month)
    migrate_in_process(scratch, now=now)
    scratch.execute(
        "INSERT INTO users (username, email, password_hash)"
        " SELECT 'u' || g, 'u' || g || '@x', 'h' FROM generate_series(1, 200) g"
    )
    scratch.execute(
        "INSERT INTO api_keys (user_id, key, name) SELECT id, 'k' || id, 'n' FROM users"
    )
    scratch.execute(ARCHIVE_FILL, {"start": old_month, "count": count})
    scratch.execute("VACUUM ANALYZE")
    scratch.execute("CHECKPOINT")
    return partition.month_name(old_month)


def copy_gzip(scratch, name, target):
    """The operator's alternative: COPY (SELECT * FROM the partition) TO STDOUT | gzip."""
    started = time.perf_counter()
    subprocess.run(
        f"psql -X -q -d \"$DATABASE_URL\" -c 'COPY (SELECT * FROM {name}) TO STDOUT'"
        f" | gzip > {target}",
        shell=True,
        check=True,
        env={**os.environ, "DATABASE_URL": scratch.url},
    )
    return time.perf_counter() - started, os.path.getsize(target)


def while_inserting(scratch, *args):
    """migrate.py with args under insert traffic: (seconds, longest insert)."""
    inserter = Inserter(scratch.url)
    inserter.start()
    time.sleep(0.3)
    started = time.perf_counter()
    run = subprocess.run(
        tool_command("migrate.py") + list(args),
        env={**os.environ, "DATABASE_URL": scratch.url},
        capture_output=True,
        text=True,
        check=False,
    )
    finished = time.perf_counter()
    seconds = finished - started
    inserter.stop.set()
    inserter.join()
    assert run.returncode == 0, run.stderr
    waits = [w for at, w in inserter.latencies if at >= started and at - w <= finished]
    return seconds, max(waits)


def bench_archive(scratch, settings):
    """Section 12: retention of a month with --archive against COPY ... | gzip of the same
    partition, its file's size, the longest insert meanwhile; then its restore."""
    import tempfile

    count = settings.stall_rows
    runs = []
    for _ in range(min(settings.repeats, 3)):
        name = archive_month(scratch, count)
        with tempfile.TemporaryDirectory() as directory:
            gzip_seconds, gzip_bytes = copy_gzip(scratch, name, os.path.join(directory, "m.gz"))
            archive_dir = os.path.join(directory, "archive")
            seconds, longest = while_inserting(
                scratch, "--retain-request-logs", "60", "--archive", archive_dir
            )
            files = [os.path.join(archive_dir, f) for f in os.listdir(archive_dir)]
            data = [f for f in files if f.endswith(".parquet")]
            parquet_bytes = sum(os.path.getsize(f) for f in data)
            restore_seconds, restore_longest = while_inserting(
                scratch, "--restore-request-logs", data[0]
            )
        runs.append(
            (
                gzip_seconds,
                gzip_bytes,
                seconds,
                parquet_bytes,
                longest,
                restore_seconds,
                restore_longest,
            )
        )
    section = f"15 retention with --archive: one month, {count:,} request logs"
    add_row(
        section,
        "COPY (SELECT * FROM the partition) TO STDOUT | gzip",
        f"{spread([r[0] for r in runs])}; {statistics.median(r[1] for r in runs) / 2**20:.1f} MiB",
        "psql and gzip -6, the file only (no check, nothing removed)",
    )
    add_row(
        section,
        "migrate.py --retain-request-logs 60 --archive DIR",
        f"{spread([r[2] for r in runs])} ({statistics.median(r[2] / r[0] for r in runs):.2f}x the"
        f" gzip); {statistics.median(r[3] for r in runs) / 2**20:.1f} MiB"
        f" ({statistics.median(r[3] / r[1] for r in runs):.2f}x its size); longest insert"
        f" {spread([r[4] for r in runs], 'ms', 1000)}",
        "the whole run: rows read, Parquet zstd written, read back and checked, partition dropped",
    )
    add_row(
        section,
        "migrate.py --restore-request-logs FILE",
        f"{spread([r[5] for r in runs])}; longest insert {spread([r[6] for r in runs], 'ms', 1000)}",
        "one transaction, checked against the manifest before COMMIT",
    )


# --- The gateway's queries on realistic data -------------------------------------------------

# The lookups the gateway runs, and the Go backend's admin and stats queries
# (as GORM sends them: soft-deleted rows left out), with the parameters used
# to explain them.
GATEWAY_QUERIES = {
    "API key by its key": "SELECT * FROM api_keys WHERE key = %(key)s AND deleted_at IS NULL",
    "a user's latest 50 logs": (
        "SELECT * FROM request_logs WHERE user_id = %(user_id)s AND deleted_at IS NULL"
        " ORDER BY created_at DESC LIMIT 50"
    ),
    "a user's usage per model, last day": (
        "SELECT model, count(*), sum(tokens_used) FROM request_logs WHERE user_id = %(user_id)s"
        " AND created_at >= now() - interval '1 day' AND deleted_at IS NULL GROUP BY model"
    ),
    "a model's traffic, last hour": (
        "SELECT count(*), avg(response_time), sum(tokens_used) FROM request_logs"
        " WHERE model = %(model)s AND created_at >= now() - interval '1 hour' AND deleted_at IS NULL"
    ),
    "active configs of a type by priority": (
        "SELECT * FROM api_configs WHERE type = %(type)s AND is_active = true AND deleted_at IS NULL"
        " ORDER BY priority DESC"
    ),
    "active configs serving a model": (
        "SELECT * FROM api_configs WHERE is_active = true AND models @> %(models)s"
        " AND deleted_at IS NULL ORDER BY priority DESC, weight DESC"
    ),
    "a user's sign-ins since midnight": (
        "SELECT * FROM sign_in_records WHERE user_id = %(user_id)s"
        " AND created_at >= date_trunc('day', now()) AND deleted_at IS NULL"
    ),
    "active load-balancer config of a model": (
        "SELECT * FROM load_balancer_configs WHERE model_name = %(model)s AND is_active = true"
        " AND deleted_at IS NULL LIMIT 1"
    ),
    "login by username": (
        "SELECT * FROM users WHERE username = %(username)s AND deleted_at IS NULL"
        " ORDER BY id LIMIT 1"
    ),
    "a user's API keys": "SELECT * FROM api_keys WHERE user_id = %(user_id)s AND deleted_at IS NULL",
    "admin: today's request count": (
        "SELECT count(*) FROM request_logs WHERE created_at >= %(today)s AND deleted_at IS NULL"
    ),
    "admin: count of 2xx requests": (
        "SELECT count(*) FROM request_logs WHERE status_code >= 200 AND status_code < 300"
        " AND deleted_at IS NULL"
    ),
    "admin: count of failed requests (>= 400)": (
        "SELECT count(*) FROM request_logs WHERE status_code >= 400 AND deleted_at IS NULL"
    ),
    "admin: logs page 3, newest first": (
        "SELECT * FROM request_logs WHERE deleted_at IS NULL"
        " ORDER BY created_at DESC LIMIT 20 OFFSET %(offset)s"
    ),
}
QUERY_PARAMS = {
    "key": "sk-" + hashlib.md5(b"1234").hexdigest(),  # api_keys row 1234 of load_gateway_data
    "user_id": 42,
    "username": "user42",
    "model": "model-7",
    "models": '["model-1"]',
    "type": "openai",
    "today": models.utc_day_bounds()[0],
    "offset": 40,
}
# Queries that count most of request_logs (98% of the loaded logs succeed):
# reading the whole table is their right plan, and no index would spare it.
TABLE_SCAN_QUERIES = {"admin: count of 2xx requests"}
LARGE_TABLE_ROWS = 10_000  # a Seq Scan on a table above this many rows fails the check


def load_gateway_data(execute, request_logs):
    """Realistic data: 1,000 users, 5,000 keys, 100 configs, 50 models, logs over 30 days, sign-ins.

    request_logs' indexes are dropped for the load; run migrate.py afterwards
    to build them back, then ANALYZE.
    """
    names = [index._name for index in models.RequestLog._meta.fields_to_index()]
    execute(f"DROP INDEX {', '.join(names)}")
    execute(
        "INSERT INTO users (username, email, password_hash, created_at)"
        " SELECT 'user' || g, 'user' || g || '@example.com', 'h', now() - interval '60 days'"
        " FROM generate_series(1, 1000) g"
    )
    execute(
        "INSERT INTO api_keys (user_id, key, name, created_at)"
        " SELECT 1 + (g % 1000), 'sk-' || md5(g::text), 'key ' || g, now() - interval '30 days'"
        " FROM generate_series(1, 5000) g"
    )
    execute(
        "INSERT INTO api_configs (name, type, base_url, models, priority, is_active)"
        " SELECT 'config ' || g, (ARRAY['openai', 'anthropic', 'azure', 'gemini', 'custom'])[1 + g % 5],"
        "        'https://upstream' || g || '.example.com', '[\"model-1\"]', g % 10 * 10, g % 7 <> 0"
        " FROM generate_series(1, 100) g"
    )
    execute(
        "INSERT INTO load_balancer_configs (model_name, strategy)"
        " SELECT 'model-' || g, (ARRAY['round_robin', 'weighted', 'least_latency'])[1 + g % 3]"
        " FROM generate_series(1, 50) g"
    )
    execute("SET session_replication_role = replica")  # no FK triggers while loading
    execute(
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path,"
        " status_code, response_time, tokens_used)"
        " SELECT now() - random() * interval '30 days', k.user_id, k.id, 1 + (g % 100),"
        "        'model-' || (1 + (g % 50)), 'POST', '/v1/chat/completions',"
        "        CASE WHEN g % 50 = 0 THEN 500 ELSE 200 END, 50 + (g % 950), g % 4000"
        f" FROM generate_series(1, {int(request_logs)}) g JOIN api_keys k ON k.id = 1 + (g::bigint * 7919 % 5000)"
    )
    execute(
        "INSERT INTO sign_in_records (user_id, quota_awarded, created_at)"
        " SELECT u, 10, date_trunc('day', now()) - d * interval '1 day' + interval '9 hours'"
        " FROM generate_series(1, 1000) u, generate_series(0, 29) d"
    )
    execute("RESET session_replication_role")


def explain(execute, name, params=None):
    """EXPLAIN (ANALYZE, BUFFERS) of a gateway query: (plan summary, ms, seq-scanned tables, indexes used)."""
    sql = GATEWAY_QUERIES[name]
    params = {**QUERY_PARAMS, **(params or {})}
    result = execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", params)[0][0]
    document = result if isinstance(result, list) else json.loads(result)
    nodes, stack = [], [document[0]["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack += node.get("Plans", [])
    seq_scans = sorted({n["Relation Name"] for n in nodes if n["Node Type"] == "Seq Scan"})
    indexes = sorted({n["Index Name"] for n in nodes if "Index Name" in n})
    summary = ", ".join(
        f"{n['Node Type']} on {n.get('Index Name') or n['Relation Name']}"
        for n in nodes
        if "Index Name" in n or "Relation Name" in n
    )
    return summary, document[0]["Execution Time"], seq_scans, indexes


def large_tables(execute):
    query = "SELECT relname FROM pg_class WHERE relkind = 'r' AND reltuples > %(rows)s"
    return {name for (name,) in execute(query, {"rows": LARGE_TABLE_ROWS})}


def migrate_in_process(scratch, **layout):
    migrate.connect(scratch.params)
    apply.migrate(catalog.target_schema(), **layout)
    models.database.close()


def prepare_gateway_database(scratch, request_logs):
    scratch.reset()
    migrate_in_process(scratch)
    load_gateway_data(scratch.execute, request_logs)
    migrate_in_process(scratch)
    scratch.execute("ANALYZE")


def bench_queries(scratch, settings):
    prepare_gateway_database(scratch, settings.request_logs)
    large = large_tables(scratch.execute)
    used = set()
    for name in GATEWAY_QUERIES:
        runs = [explain(scratch.execute, name) for _ in range(settings.repeats)]
        summary, _, seq_scans, indexes = runs[0]
        used.update(indexes)
        slow = sorted(set(seq_scans) & large)
        if name in TABLE_SCAN_QUERIES:
            verdict = "counts most of the table, a Seq Scan is expected"
        elif slow:
            verdict = f"SEQ SCAN ON LARGE TABLE {', '.join(slow)}"
        else:
            verdict = "no Seq Scan on a large table"
        add_row(
            f"6 query on {settings.request_logs:,} logs",
            name,
            spread([r[1] for r in runs], "ms"),
            f"{verdict}: {summary}",
        )
    return used


# --- Write cost --------------------------------------------------------------------------


def insert_rate(scratch, count):
    """Rows per second of one INSERT ... SELECT of `count` request logs: the cost of index upkeep."""
    started = time.perf_counter()
    scratch.execute(
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path,"
        " status_code, response_time)"
        " SELECT now() - random() * interval '1 day', k.user_id, k.id, 1, 'model-' || (1 + g % 50),"
        "        'POST', '/', 200, 10"
        f" FROM generate_series(1, {int(count)}) g JOIN api_keys k ON k.id = 1 + (g::bigint * 7919 % 5000)"
    )
    return count / (time.perf_counter() - started)


def bench_write_cost(scratch, settings, used_indexes):
    unused = [
        (name, size)
        for name, size in scratch.execute(
            "SELECT indexrelid::regclass::text, pg_relation_size(indexrelid) FROM pg_index"
            " WHERE indrelid = 'request_logs'::regclass AND NOT indisprimary ORDER BY 1"
        )
        if name not in used_indexes
    ]
    with_all = [insert_rate(scratch, settings.inserts) for _ in range(settings.repeats)]
    add_row(
        "7 write cost",
        f"INSERT ... SELECT of {settings.inserts:,} request logs, contract indexes",
        spread(with_all, "rows/s"),
    )
    scratch.execute(f"DROP INDEX {', '.join(name for name, _ in unused)}")
    without = [insert_rate(scratch, settings.inserts) for _ in range(settings.repeats)]
    add_row(
        "7 write cost",
        f"the same without the {len(unused)} indexes no query above uses",
        spread(without, "rows/s"),
        f"{statistics.median(without) / statistics.median(with_all):.2f}× the rate with them",
    )
    for name, size in unused:
        add_row(
            "7 write cost",
            f"unused by the queries: {name}",
            f"{size / 2**20:.1f} MiB",
            redundancy(name),
        )


def redundancy(index_name):
    """Why an index may be redundant: its column leads a composite index of the contract."""
    indexes = {index._name: index for index in models.RequestLog._meta.fields_to_index()}
    column = plan.index_columns(indexes[index_name])
    for other, index in indexes.items():
        parts = plan.index_columns(index)
        if other != index_name and len(parts) > 1 and parts[:1] == column:
            return f"its column leads {other}"
    return "supports a foreign key" if index_name.endswith("_key_id") else ""


# --- Main --------------------------------------------------------------------------------


def machine():
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def print_table(settings, server_version):
    command = "bench.py --quick" if settings is QUICK else "bench.py"
    print(f"{command} on {machine()}, PostgreSQL {server_version}")
    print()
    print(
        "Whole runs of migrate.py and create_tables are timed with their bytecode cached,"
        " as after an install (compiled once before timing; PYTHONPYCACHEPREFIX)."
    )
    print()
    print("| # | what | result | note |")
    print("|---|---|---|---|")
    for section, what, result, note in rows:
        print(f"| {section} | {what} | {result} | {note} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run in under a minute")
    parser.add_argument(
        "--only",
        metavar="N,N",
        help="run only these sections, e.g. --only 5,8 (8 needs 5's database), 1 to 16",
    )
    parser.add_argument("--create-tables", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.create_tables:
        create_tables_with_peewee()
        return 0
    settings = QUICK if args.quick else FULL
    scratch = Scratch()
    try:
        with bytecode_cached():
            server_version = scratch.execute("SHOW server_version")[0][0]
            wanted = set(args.only.split(",")) if args.only else {str(n) for n in range(1, 17)}
            if wanted & {"1", "2"}:
                bench_bootstrap_and_rerun(scratch, settings)
            if "3" in wanted:
                bench_growth(scratch, settings)
            if "4" in wanted:
                bench_concurrency(scratch)
            if wanted & {"5", "8"}:
                bench_writer_stall(scratch, settings)
            if "8" in wanted:
                bench_stall_per_change(scratch, settings)
            if "9" in wanted:
                bench_atomic_reads(scratch, settings)
            if wanted & {"6", "7"}:
                used = bench_queries(scratch, settings)
                bench_write_cost(scratch, settings, used)
            if "10" in wanted:
                bench_partitioning(scratch, settings)
            if "11" in wanted:
                bench_retention(scratch, settings)
            if "12" in wanted:
                bench_move_out_of_default(scratch, settings)
            if "13" in wanted:
                bench_legacy_retention(scratch, settings)
            if "14" in wanted:
                bench_drops(scratch, settings)
            if "15" in wanted:
                bench_archive(scratch, settings)
            if "16" in wanted:
                bench_switch_sizes(scratch, settings)
    finally:
        with contextlib.suppress(psycopg2.Error):
            drop_partitions(scratch)
        scratch.drop()
    print_table(settings, server_version)
    return 0


if __name__ == "__main__":
    sys.exit(main())
