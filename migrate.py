"""
Bring a PostgreSQL database to the schema of models.py: add what is missing, report drift.

Usage::

    export DATABASE_URL="host=localhost user=postgres dbname=api_aggregator port=5432"
    python migrate.py                  # add what is missing; writers never wait long
    python migrate.py --atomic         # ... all of it in one transaction instead
    python migrate.py --dry-run        # print the SQL a run would send, with each lock; change nothing
    python migrate.py --check          # print pending changes and drift; exit 1 or 3 if any
    python migrate.py --check --format json   # the same as one JSON document
    python migrate.py --sql > schema.sql      # the whole schema as plain SQL

The work is split by module: connection.py (DATABASE_URL, login, bounded
waits), catalog.py (reading the live schema), plan.py (models against
catalog: staged statements with their hazards, drift), apply.py (locks,
retries, timeouts, the stages, what each statement made). This file is the
command line: flags, output, signals and exit codes.

Exit codes: 0 success (--check: the database matches); 1 --check: changes
are pending that a run makes; 3 --check: only drift is left, which a run
leaves alone; 2 error (a blocked plan included); 130 and 143 interrupted by
SIGINT and SIGTERM. Errors are one line on stderr (the traceback only with
--verbose); a password is never printed.
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 -- run by older Pythons too, before imports fail
    sys.stderr.write(
        f"migrate: error: Python {sys.version_info.major}.{sys.version_info.minor} is too old:"
        " run migrate.py with Python 3.11 or newer\n"
    )
    sys.exit(2)

import argparse
import itertools
import json
import logging
import math
import os
import signal
import time

try:
    import peewee
    import psycopg2
    import psycopg2.extensions
except ImportError as missing:
    sys.stderr.write(
        f"migrate: error: {missing.name} is not installed: pip install -r requirements.txt\n"
    )
    sys.exit(2)


from apply import (
    REJECTIONS,
    Budget,
    Planner,
    in_lock_order,
    migrate,
    ongoing,
    pgcode,
    plan_with_retries,
    planned,
    progress,
    script,
    state_words,
    stop_watching,
    watch_queries,
)
from archive import Archive, read_manifest, require_pyarrow, restore
from catalog import describe_target, one_line, read_only_words, shown, shown_name, target_schema
from connection import (
    DEFAULT_DATABASE_URL,
    MigrationError,
    ServerSilent,
    connect,
    connection_failure,
    connection_params,
    describe,
    effective_target,
    signals_received,
    text_limits,
    wait,
)
from models import database
from partition import clock
from plan import describe_unknown, lock_name, plural, report, runnable, schema_sql, search_path_line

EXIT_OK, EXIT_PENDING, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2, 3
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
DEFAULT_LOCK_TIMEOUT = 5.0  # seconds
DEFAULT_PROGRESS = 10.0  # seconds between progress lines of a long statement
MINIMUM_SERVER_VERSION = 120000  # pg_stat_progress_create_index, attgenerated
# PostgreSQL's timeouts are int milliseconds; --wait gets a day.
MAX_TIMEOUT, MAX_WAIT = 2_147_483.647, 86_400.0
JSON_FORMAT_VERSION = 2  # 2: description in the planned wording, logged_when_done added
documented = {"written": False}  # --format json: stdout holds its one document already

log = logging.getLogger("migrate")


# --- Flags ------------------------------------------------------------------------------


def seconds_up_to(maximum):
    """An argparse type: a finite number of seconds from 0 to maximum."""

    def seconds(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not math.isfinite(value) or not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"{text} is out of range: give a number of seconds from 0 to"
                f" {f'{maximum:,.3f}'.rstrip('0').rstrip('.')}"
            )
        return value

    return seconds


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one `migrate: error:` line, like every other error."""

    wants_json = False  # set from the raw arguments, as a usage error comes before parsing ends

    def error(self, message):
        if self.wants_json:
            error_document(f"{message} (see --help)")
        self.exit(EXIT_ERROR, f"migrate: error: {message} (see --help)\n")

    def _print_message(self, message, file=None):
        write_out(message) if file in (None, sys.stdout) else super()._print_message(message, file)


def parse_args(argv):
    parser = OneLineErrors(
        prog="migrate.py",
        description="Bring the database named by DATABASE_URL (libpq 'host=... dbname=...' or a"
        " postgresql:// URL) to the schema of models.py: create missing tables, columns, foreign"
        " keys and indexes without making writers wait. Without the two request_logs flags it"
        " never renames, rewrites or drops what it did not make; differences it will not fix are reported"
        " with the SQL that would.",
        epilog="Exit codes: 0 success (with --check: the database matches the models),"
        " 1 --check: changes are pending (run python migrate.py), 3 --check: only drift is left"
        " (a run changes nothing; a person must look), 2 error, 130/143 interrupted by"
        " SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "--wait",
        type=seconds_up_to(MAX_WAIT),
        default=0,
        metavar="SECONDS",
        help="retry the connection until the server accepts it or SECONDS pass (default 0);"
        " each attempt gives up after connect_timeout (default 5 s)",
    )
    parser.add_argument(
        "--lock-timeout",
        type=seconds_up_to(MAX_TIMEOUT),
        default=DEFAULT_LOCK_TIMEOUT,
        metavar="SECONDS",
        help="the most a run spends waiting for locks, in short attempts that queue no writer"
        f" behind them; then it stops, naming the blocking session (default {DEFAULT_LOCK_TIMEOUT:g};"
        " 0: no limit)",
    )
    parser.add_argument(
        "--statement-timeout",
        type=seconds_up_to(MAX_TIMEOUT),
        default=0,
        metavar="SECONDS",
        help="the longest an index build or foreign key validation may run (default 0: no limit)",
    )
    parser.add_argument(
        "--progress",
        type=seconds_up_to(MAX_WAIT),
        default=DEFAULT_PROGRESS,
        metavar="SECONDS",
        help="log how far a statement running longer than SECONDS has got, every SECONDS"
        f" (default {DEFAULT_PROGRESS:g}; 0: never)",
    )
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument(
        "--atomic",
        action="store_true",
        help="do everything in one transaction, all or nothing: index builds and foreign key"
        " checks on existing tables then block writes while they scan",
    )
    stage.add_argument(
        "--pre-deploy",
        action="store_true",
        help="before a rollout: make only what the application needs to run correctly (tables,"
        " columns, NOT VALID foreign keys, unique indexes built online, the default partition);"
        " exit 2 while any of it is missing (OPERATING.md)",
    )
    stage.add_argument(
        "--post-deploy",
        action="store_true",
        help="after a rollout, as a job: the rest (index builds, validations, partition upkeep),"
        " which is what a plain run does; a later run resumes what a stopped one left",
    )
    stage.add_argument(
        "--concurrently",
        action="store_true",
        help="the default (indexes and foreign key checks on existing tables run online);"
        " accepted for older scripts",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the SQL a run would send, in order, with the lock each statement takes;"
        " change nothing",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="change nothing; print pending changes and drift; exit 1 if a run would change"
        " something, 3 if only drift is left",
    )
    mode.add_argument(
        "--sql",
        action="store_true",
        help="print the whole schema as SQL for psql -f (as schema.sql) and exit; connects to nothing",
    )
    parser.add_argument(
        "--partition-request-logs",
        action="store_true",
        help="make request_logs partitioned by month (a fresh database), or convert it online"
        " (its rows stay where they are); every plain run then keeps partitions ready for this"
        " month and the three after it",
    )
    parser.add_argument(
        "--retain-request-logs",
        type=positive_days,
        metavar="DAYS",
        help="delete request logs whose created_at is older than DAYS: drop the partitions"
        " wholly older, delete the rest in small batches (a real DELETE, not a soft delete);"
        " also does a plain run's work (upkeep included); alone, with --post-deploy, --archive"
        " or --dry-run",
    )
    parser.add_argument(
        "--archive",
        metavar="DIR",
        help="with --retain-request-logs: first write the rows it removes to DIR (made if"
        " missing), a verified Parquet file and manifest per month (OPERATING.md)",
    )
    parser.add_argument(
        "--restore-request-logs",
        metavar="FILE",
        help="put the rows of an --archive data file back into request_logs; alone",
    )
    parser.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="with --check or --dry-run: text (SQL with comments, the default) or one JSON"
        " document on stdout",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        help="for cron: nothing on stderr when there was nothing to do, one summary line when"
        " there was; errors stay one line",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the traceback of an unexpected error"
    )
    parser.wants_json = requested_format(sys.argv[1:] if argv is None else list(argv)) == "json"
    args = parser.parse_args(argv)
    if args.format == "json" and not (args.check or args.dry_run):
        parser.error("--format json goes with --check or --dry-run")
    if args.retain_request_logs is not None and (
        args.check or args.sql or args.partition_request_logs or args.pre_deploy
    ):
        parser.error(
            "--retain-request-logs goes alone (with upkeep), with --post-deploy or with --dry-run"
            "; --check reports no retention: run --dry-run with it to see what it would remove"
        )
    if args.archive is not None and args.retain_request_logs is None:
        parser.error("--archive goes with --retain-request-logs")
    restore_with = args.check or args.sql or args.dry_run or args.partition_request_logs
    if args.restore_request_logs is not None and (restore_with or args.retain_request_logs):
        parser.error("--restore-request-logs goes alone")
    return args


def requested_format(arguments):
    """The --format the raw arguments ask for (the last one, abbreviations too, as argparse
    reads them), for a usage error found before parsing ends."""
    wanted = "text"
    for option, following in itertools.pairwise([*arguments, ""]):
        name, equals, value = option.partition("=")
        if len(name) >= 4 and "--format".startswith(name):
            wanted = value if equals else following
    return wanted


MAX_RETENTION_DAYS = 36_500  # a hundred years: a cutoff Python's dates and PostgreSQL's hold


def positive_days(text):
    """An argparse type: a whole number of days, from 1 to MAX_RETENTION_DAYS."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_RETENTION_DAYS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number of days from 1 to {MAX_RETENTION_DAYS:,}"
        )
    return int(text)


# --- Output -------------------------------------------------------------------------------


class OutputError(Exception):
    """stdout or stderr cannot be written: closed, a broken pipe, a full disk."""


def write_out(text):
    """Write to stdout, turning every way that can fail into OutputError.

    Through the binary layer, in a loop: with PYTHONUNBUFFERED that layer is the raw file,
    whose write may take part of the bytes, and the text layer drops the rest unsaid.
    """
    if not text:
        return
    if sys.stdout is None:
        raise OutputError("stdout is closed")
    try:
        sys.stdout.flush()
        data = memoryview(text.encode(sys.stdout.encoding or "utf-8", "backslashreplace"))
        binary = sys.stdout.buffer
        while data:
            written = binary.write(data)
            data = data[len(data) if written is None else written :]
        binary.flush()
    except (OSError, ValueError) as exc:
        silence_stdout()
        raise OutputError(f"stdout: {exc.strerror or exc}") from None


def silence_stdout():
    """Point stdout at /dev/null, so that the interpreter's flush at exit cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


class LineHandler(logging.StreamHandler):
    """stderr lines; a failed write is remembered (the run then exits 2), never a traceback."""

    failed = None

    def handleError(self, record):
        LineHandler.failed = LineHandler.failed or "stderr cannot be written"


class OneLineFormatter(logging.Formatter):
    """Each message one line, whatever text it carries (a --verbose traceback follows it)."""

    def formatMessage(self, record):
        record.message = one_line(record.message)
        return super().formatMessage(record)


SUMMARY = {"summary": True}  # extra= of the lines --quiet keeps


def quiet_filter(record):
    """--quiet: errors, and the summary of a run that did something."""
    return record.levelno >= logging.ERROR or getattr(record, "summary", False)


def setup_logging():
    # A closed stderr (2>&-) is None: main refuses to run then (exit 2).
    handler = LineHandler(sys.stderr or open(os.devnull, "w"))  # noqa: SIM115 -- lives as long as the process
    handler.setFormatter(OneLineFormatter("migrate: %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    return handler


def elapsed(started):
    return f"{time.monotonic() - started:.2f} s"


def check_status(plan):
    if plan.blocked:
        return EXIT_ERROR
    if plan.pending or plan.in_progress:
        return EXIT_PENDING
    return EXIT_DRIFT if plan.drift else EXIT_OK


def run_command(args):
    """The command that makes what --check or --dry-run listed."""
    words = ["python migrate.py"]
    if args.pre_deploy or args.post_deploy:
        words.append("--pre-deploy" if args.pre_deploy else "--post-deploy")
    if args.partition_request_logs:
        words.append("--partition-request-logs")
    if args.retain_request_logs is not None:
        words.append(f"--retain-request-logs {args.retain_request_logs}")
    return " ".join(words)


def summary(plan, status, started, command="python migrate.py", retain_days=None, deferred=0):
    """The last line of --check and --dry-run: what is left, and what to run."""
    changes = plural(len(plan.pending) + len(plan.in_progress), "change")
    drifts = plural(len(plan.drift), "drift")
    if status == EXIT_ERROR:
        return (
            f"error: {plural(len(plan.blocked), 'blocker')}"
            f" {'stops' if len(plan.blocked) == 1 else 'stop'} every run (listed above with the"
            f" SQL to resolve them by hand); besides, {changes} pending, {drifts}"
        )
    if status == EXIT_PENDING:
        return f"{changes} pending, {drifts} ({elapsed(started)}): run {command} to make them"
    if retain_days is not None and not plan.pending:
        return f"nothing older than {plural(retain_days, 'day')} to remove ({elapsed(started)})"
    if deferred:
        return (
            f"the application's needs are met ({elapsed(started)}); {plural(deferred, 'change')}"
            " left for python migrate.py --post-deploy"
        )
    if status == EXIT_DRIFT:
        return (
            f"nothing for a run to add; {drifts} left alone ({elapsed(started)}):"
            " review the SQL above, a run will not change it"
        )
    return f"the database matches the models ({elapsed(started)})"


def text_report(plan, args):
    """--check: the plan as SQL to review; --dry-run: the statements a run sends."""
    if args.check:
        body = report(plan)
    else:
        body = "".join(line + "\n" for line in dry_run_lines(plan, args))
    if not body:
        return ""
    target = plan.snapshot.target
    header = [f"-- {describe_target(target)}", search_path_line(target)]
    return "\n".join(header) + "\n" + body


def dry_run_lines(plan, args):
    lines = []
    if plan.blocked:
        lines += report(
            plan._replace(transaction=[], online=[], drift=[], unknown=[], in_progress=[])
        ).splitlines()
    if plan.pending:
        lines += script(plan, args.atomic, args.lock_timeout, args.statement_timeout)
    return lines


def log_leftovers(plan):
    for item in plan.in_progress:
        log.info("left to another session: %s", item)
    for drift in plan.drift:
        fix = " ".join(statement + ";" for statement in drift.fix)
        how = "to fix" if runnable(drift) else "not safe to run as is"
        log.warning("drift: %s; %s: %s", drift.problem, how, fix or "see --check")
    for item in plan.unknown:
        log.info("not in the models, left alone: %s", describe_unknown(item))


def log_run(plan, done, started, retain_days=None, archive=None):
    """After apply has logged each statement as it took effect: what is left, and the summary."""
    log_leftovers(plan)
    log_deferred()
    drift = (
        f"; up to date except {plural(len(plan.drift), 'drift')} listed above" if plan.drift else ""
    )
    removed = sum(1 for statement in done if statement.removes)
    if done:
        what = f", {removed} of them removing old logs" if retain_days and removed else ""
        if archive is not None and archive.written:
            rows = sum(rows for _, rows in archive.written)
            what += (
                f", {plural(rows, 'row')} archived first in"
                f" {plural(len(archive.written), 'file')} of {shown(archive.directory)}"
            )
        log.info(
            "done: %s%s in %s%s",
            plural(len(done), "statement"),
            what,
            elapsed(started),
            drift,
            extra=SUMMARY,
        )
    elif retain_days is not None:
        log.info(
            "nothing older than %s to remove, and nothing to add (%s)%s",
            plural(retain_days, "day"),
            elapsed(started),
            drift,
        )
    elif drift:
        log.info("nothing to add (%s)%s", elapsed(started), drift)
    else:
        log.info("schema is up to date (%s)", elapsed(started))


def log_deferred():
    """--pre-deploy: what it left for --post-deploy."""
    deferred = [s for s in progress.get("deferred") or [] if s.description]
    if deferred:
        names = ", ".join(ongoing(statement) for statement in deferred[:3])
        more = f" and {len(deferred) - 3} more" if len(deferred) > 3 else ""
        log.info(
            "left for python migrate.py --post-deploy: %s (%s%s)",
            plural(len(deferred), "statement"),
            names,
            more,
        )


def refuse_missing_needs(plan):
    """--pre-deploy never ends 0 while the application lacks something it needs."""
    if plan.pending or plan.in_progress:
        first = plan.in_progress[0] if plan.in_progress else ongoing(plan.pending[0])
        raise MigrationError(
            f"the application's needs are not all met yet: {first}; {state_words()}: rerun"
            " python migrate.py --pre-deploy before the rollout"
        )


# --- JSON -----------------------------------------------------------------------------------


def plan_document(plan, args, params, status):
    """--format json: the plan as one document (the format JSON.md describes)."""
    target, tables = plan.snapshot.target, plan.snapshot.tables
    order = {"transaction": in_lock_order(plan.transaction), "online": plan.online}
    order.update({f"{step.kind}: {step.name}": step.statements for step in plan.steps})
    return {
        "format": "migrate.py plan",
        "version": JSON_FORMAT_VERSION,
        "mode": "check" if args.check else "dry-run",
        "atomic": args.atomic,
        "database": describe(params),
        "schema": {"name": target.name, "search_path": target.search_path, "source": target.source},
        "pending": [
            {
                "stage": stage,
                "sql": statement.sql,
                "description": planned(statement),
                "logged_when_done": statement.description,
                "tables": list(statement.tables),
                "lock": lock_name(statement.hazard.lock) if statement.hazard.lock else None,
                "blocks": statement.hazard.blocks,
                "work": statement.hazard.work,
                "also_locks": [
                    {"table": table, "lock": lock_name(mode)}
                    for table, mode in statement.hazard.others
                ],
                "rows": {t: tables[t].rows if t in tables else None for t in statement.tables},
            }
            for stage, statements in order.items()
            for statement in statements
        ],
        "drift": [
            {
                "kind": d.key[0],
                "table": d.key[1],
                "object": d.key[2],
                "problem": d.problem,
                "fix": d.fix,
                "safe": runnable(d),
                "cost": d.cost,
            }
            for d in plan.drift
        ],
        "blocked": [{"problem": b.reason, "sql": b.steps} for b in plan.blocked],
        "in_progress": plan.in_progress,
        "deferred": [  # --pre-deploy: what it leaves for --post-deploy
            {"sql": statement.sql, "description": planned(statement)}
            for statement in progress.get("deferred") or []
        ],
        "unknown": [
            {"kind": u.kind, "table": u.table, "name": u.name, "shown": describe_unknown(u)}
            for u in plan.unknown
        ],
        "exit": status,
    }


def error_document(line, status=EXIT_ERROR):
    """--format json on an error or a signal: a document that says so, so that tooling reading
    stdout never parses an empty one."""
    try:
        document = {"format": "migrate.py plan", "version": JSON_FORMAT_VERSION, "error": line}
        write_out(json.dumps({**document, "exit": status}, indent=2) + "\n")
    except OutputError:
        pass  # stdout is gone: stderr has said it


# --- Faults ---------------------------------------------------------------------------------


def on_signal(signum, frame):
    """SIGINT/SIGTERM: recorded, never raised here, so that none lands between psycopg2 sending
    a statement and connection.wait watching it; wait cancels the running statement on the
    server and raises once it has ended, and every pause of the run ends at once."""
    signals_received.append(signum)


def interrupted_line():
    name = signal.Signals(signals_received[0]).name if signals_received else "SIGINT"
    return f"interrupted by {name} during the {progress['stage']} stage: {state_words()}"


ADMIN_SHUTDOWN = "57P01"
ADMIN_SHUTDOWN_TEXT = "terminating connection due to administrator command"


def lost_connection(exc):
    """A session that died under us: the server rolled back whatever was open."""
    original = getattr(exc, "orig", exc)
    reason = str(original).strip().splitlines()
    detail = shown(reason[0]) if reason else type(exc).__name__
    if "statement pooling" in detail or "transaction blocks not allowed" in detail:
        return (
            f"the connection refuses transactions ({detail}): DATABASE_URL goes through a"
            " statement pooler (pgbouncer pool_mode=statement); point it at the server or a"
            f" session-mode pool; {state_words()}"
        )
    if (
        pgcode(exc) == ADMIN_SHUTDOWN
        or ADMIN_SHUTDOWN_TEXT in detail  # a FATAL read as the socket closed carries no code
    ):
        # pg_terminate_backend and a server shutdown both end a session this way.
        return (
            f"the server ended a session of this run ({detail}: pg_terminate_backend, or a"
            f" shutdown) during the {progress['stage']} stage: {state_words()}; rerun it"
            " (once the server accepts connections again)"
        )
    return (
        f"lost the connection to the server ({detail}) during the {progress['stage']} stage:"
        f" {state_words()}; rerun when the server is back"
    )


def database_failure(exc):
    """One line for a database error outside the stages' own messages."""
    original = getattr(exc, "orig", exc)
    code = pgcode(exc)
    text = str(original).strip()
    detail = shown(text.splitlines()[0]) if text else type(exc).__name__
    if code == "42501":
        schema = shown_name(progress.get("schema") or "public")
        return f"permission denied ({detail}): run as the database owner or GRANT CREATE ON SCHEMA {schema}; {state_words()}"
    if code == "25006":
        return f"{read_only_words()}; {state_words()}"
    if code == "57014":
        return f"a statement was cancelled ({detail}); {state_words()}"
    if code in REJECTIONS:
        return (
            f"rejected: {REJECTIONS[code]} ({detail}); {state_words()}; the next run meets the"
            " same refusal until that changes"
        )
    if code is None or code[:2] in ("08", "57"):  # None: the socket closed, no server error
        return lost_connection(exc)
    return f"migration failed ({detail}); {state_words()}"


def error_line(exc):
    """The one line for an exception that ends a run."""
    if isinstance(exc, MigrationError):
        return str(exc)
    if isinstance(exc, ServerSilent):
        return f"{connection_failure(exc, database.connect_params)}; {state_words()}"
    if isinstance(exc, (peewee.InterfaceError, psycopg2.InterfaceError)):
        return lost_connection(exc)
    if isinstance(exc, (peewee.DatabaseError, psycopg2.Error)):
        return database_failure(exc)
    if isinstance(exc, OutputError):
        return f"cannot write the output ({exc})"
    if isinstance(exc, OSError):
        return f"cannot write the output ({exc.strerror or exc})"
    first = shown(str(exc).splitlines()[0]) if str(exc) else ""
    return f"unexpected {type(exc).__name__}: {first} (run with --verbose for the traceback)"


def refuse_old_server():
    version = database.server_version
    if version and version < MINIMUM_SERVER_VERSION:
        raise MigrationError(
            f"PostgreSQL {version // 10000} is too old: migrate.py needs 12 or newer"
            " (instant ADD COLUMN ... DEFAULT, index build progress); use schema.sql with psql"
        )


# --- Main -------------------------------------------------------------------------------------


def run(args, started):
    if args.sql:
        write_out(schema_sql())
        return EXIT_OK
    archive, now = None, clock()  # the clock every month decision reads (partition.clock)
    if args.restore_request_logs is not None or args.archive is not None:
        require_pyarrow()  # before connecting: nothing changes without it
    if args.archive is not None and not args.dry_run:
        archive = Archive(args.archive, now)
    if args.restore_request_logs is not None:
        read_manifest(args.restore_request_logs)  # a missing or unverified file: before connecting
    url = os.environ.get("DATABASE_URL")
    params = connection_params(DEFAULT_DATABASE_URL if url is None else url)
    default = " (the default: DATABASE_URL is not set)" if url is None else ""
    watch_queries(args.progress)
    try:
        connect(params, args.wait, log)
    except MigrationError as exc:
        if url is None:
            raise MigrationError(
                f"{exc} (DATABASE_URL is not set: the default was tried)"
            ) from None
        raise
    # After connecting: libpq alone knows what PGHOST, PGUSER, a service file made of it.
    log.info("database %s%s%s", describe(params), effective_target(params), default)
    refuse_old_server()
    target = target_schema()
    progress["schema"] = target.name
    log.info(describe_target(target))
    if args.restore_request_logs is not None:
        rows = restore(target, args.restore_request_logs)
        log.info("restored %s into request_logs (%s)", plural(rows, "row"), elapsed(started))
        return EXIT_OK
    layout = {
        "partition": args.partition_request_logs,
        "retain_days": args.retain_request_logs,
        "pre_deploy": args.pre_deploy,
    }
    if args.check or args.dry_run:
        planner = Planner(args.atomic, **layout)
        plan = plan_with_retries(target, planner, Budget(args.lock_timeout))
        status = check_status(plan) if args.check else (EXIT_ERROR if plan.blocked else EXIT_OK)
        progress["deferred"] = planner.deferred
        if args.format == "json":
            write_out(json.dumps(plan_document(plan, args, params, status), indent=2) + "\n")
            documented["written"] = True
        else:
            write_out(text_report(plan, args))
        if args.dry_run:
            log_leftovers(plan)
            if not plan.pending and not plan.blocked:
                log.info("nothing to do: the run would send no statement")
        log_deferred()
        line = summary(
            plan,
            check_status(plan),
            started,
            run_command(args),
            args.retain_request_logs,
            len(planner.deferred),
        )
        if line.startswith("error: "):
            log.error("%s", line)
        else:
            log.info("%s", line, extra=SUMMARY if check_status(plan) != EXIT_OK else None)
        return status
    plan, done = migrate(
        target,
        args.atomic,
        args.lock_timeout,
        args.statement_timeout,
        archive=archive,
        now=now,
        **layout,
    )
    if args.pre_deploy:  # read again: the catalog, not the plan the run began with, decides
        refuse_missing_needs(
            plan_with_retries(target, Planner(**layout), Budget(args.lock_timeout))
        )
    log_run(plan, done, started, args.retain_request_logs, archive)
    return EXIT_OK


def main(argv=None):
    if sys.stderr is None:  # 2>&-: no line could say what happened, so nothing happens
        return EXIT_ERROR
    setup_logging()
    encodings = [
        getattr(stream, "encoding", None) or "utf-8" for stream in (sys.stdout, sys.stderr)
    ]
    text_limits["ascii_output"] = not all(
        e.lower().replace("-", "").startswith("utf") for e in encodings
    )
    try:
        args = parse_args(argv)
    except OutputError as exc:  # --help into a closed or full stdout
        log.error("error: cannot write the output (%s)", exc)
        return EXIT_ERROR
    documented["written"] = False
    if args.quiet:
        for handler in log.handlers:
            handler.addFilter(quiet_filter)
    psycopg2.extensions.set_wait_callback(wait)
    for signum in EXIT_SIGNAL:
        signal.signal(signum, on_signal)
    started = time.monotonic()
    status = EXIT_ERROR
    try:
        status = run(args, started)
        if signals_received:  # arrived after the last statement: say so, with the state left
            raise KeyboardInterrupt
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        if signals_received or isinstance(exc, KeyboardInterrupt):
            line = interrupted_line()
            log.error("error: %s", line)
            status = EXIT_SIGNAL[signals_received[0] if signals_received else signal.SIGINT]
            if args.format == "json" and not documented["written"]:
                error_document(line, status)
            return status
        if args.verbose and not isinstance(exc, MigrationError):
            log.error("traceback of the error below:", exc_info=exc)
        log.error("error: %s", error_line(exc))
        status = EXIT_ERROR
        if args.format == "json" and not isinstance(exc, OutputError) and not documented["written"]:
            error_document(error_line(exc))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop_watching()
        if not database.is_closed():
            try:
                database.close()
            except (peewee.PeeweeException, psycopg2.Error):
                pass
    return EXIT_ERROR if LineHandler.failed else status


if __name__ == "__main__":
    sys.exit(main())
