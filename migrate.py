"""
Bring a PostgreSQL database to the schema of models.py: add what is missing, report drift.

Usage::

    export DATABASE_URL="host=localhost user=postgres dbname=api_aggregator port=5432"
    python migrate.py                  # add what is missing; writers never wait long
    python migrate.py --atomic         # ... all of it in one transaction instead
    python migrate.py --dry-run        # print the SQL a run would send, with each lock; change nothing
    python migrate.py --check          # print pending changes and drift; exit 1 if any
    python migrate.py --sql > schema.sql   # the whole schema as plain SQL

The work is split by module: connection.py (DATABASE_URL, login), catalog.py
(reading the live schema), plan.py (models against catalog: staged
statements with their hazards, drift), apply.py (locks, retries, timeouts,
the stages). This file is the command line: flags, output, signals and exit
codes.

Exit codes: 0 success; 1 --check found pending changes or drift; 2 error;
130 and 143 interrupted by SIGINT and SIGTERM. Errors are one line on
stderr (the traceback only with --verbose); a password is never printed.
"""

import sys

if sys.version_info < (3, 11):  # noqa: UP036 -- run by older Pythons too, before imports fail
    sys.stderr.write(
        f"migrate: error: Python {sys.version_info.major}.{sys.version_info.minor} is too old:"
        " run migrate.py with Python 3.11 or newer\n"
    )
    sys.exit(2)

import argparse
import logging
import math
import os
import signal
import time

try:
    import peewee
    import psycopg2
    import psycopg2.extras
except ImportError as missing:
    sys.stderr.write(
        f"migrate: error: {missing.name} is not installed: pip install -r requirements.txt\n"
    )
    sys.exit(2)

from apply import Budget, migrate, plan_with_retries, progress, script, state_words
from connection import DEFAULT_DATABASE_URL, MigrationError, connect, connection_params, describe
from models import database
from plan import plural, report, schema_sql

EXIT_OK, EXIT_PENDING, EXIT_ERROR = 0, 1, 2
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}
DEFAULT_LOCK_TIMEOUT = 5.0  # seconds
MINIMUM_SERVER_VERSION = 120000  # pg_stat_progress_create_index, attgenerated
# PostgreSQL's timeouts are int milliseconds; --wait gets a day.
MAX_TIMEOUT, MAX_WAIT = 2_147_483.647, 86_400.0

log = logging.getLogger("migrate")
signals_received = []


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
                f"{text} is out of range: give a number of seconds from 0 to {maximum:g}"
            )
        return value

    return seconds


class OneLineErrors(argparse.ArgumentParser):
    """Usage errors as one `migrate: error:` line, like every other error."""

    def error(self, message):
        self.exit(EXIT_ERROR, f"migrate: error: {message} (see --help)\n")


def parse_args(argv):
    parser = OneLineErrors(
        prog="migrate.py",
        description="Bring the database named by DATABASE_URL (libpq 'host=... dbname=...' or a"
        " postgresql:// URL) to the schema of models.py: create missing tables, columns, foreign"
        " keys and indexes without making writers wait. Never renames or rewrites, and drops"
        " nothing but an INVALID index it rebuilds; differences it will not fix are reported"
        " with the SQL that would.",
        epilog="Exit codes: 0 success (with --check: the database matches the models),"
        " 1 --check found pending changes or drift, 2 error, 130/143 interrupted by SIGINT/SIGTERM.",
    )
    parser.add_argument(
        "--wait",
        type=seconds_up_to(MAX_WAIT),
        default=0,
        metavar="SECONDS",
        help="retry the connection until the server accepts it or SECONDS pass (default 0)",
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
    stage = parser.add_mutually_exclusive_group()
    stage.add_argument(
        "--atomic",
        action="store_true",
        help="do everything in one transaction, all or nothing: index builds and foreign key"
        " checks on existing tables then block writes while they scan",
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
        help="change nothing; print pending changes and drift; exit 1 if there are any",
    )
    mode.add_argument(
        "--sql",
        action="store_true",
        help="print the whole schema as SQL for psql -f (as schema.sql) and exit; connects to nothing",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="print the traceback of an unexpected error"
    )
    return parser.parse_args(argv)


# --- Output -------------------------------------------------------------------------------


def setup_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("migrate: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return handler


def elapsed(started):
    return f"{time.monotonic() - started:.2f} s"


def check(plan, started):
    sys.stdout.write(report(plan))
    if plan.pending or plan.drift or plan.in_progress:
        log.info(
            "%s pending, %s (%s)",
            plural(len(plan.pending) + len(plan.in_progress), "change"),
            plural(len(plan.drift), "drift"),
            elapsed(started),
        )
        return EXIT_PENDING
    log.info("the database matches the models (%s)", elapsed(started))
    return EXIT_OK


def dry_run(plan, args):
    if plan.pending:
        lines = script(plan, args.atomic, args.lock_timeout, args.statement_timeout)
        sys.stdout.write("".join(line + "\n" for line in lines))
    else:
        log.info("nothing to do: the run would send no statement")
    log_leftovers(plan)
    return EXIT_OK


def log_leftovers(plan):
    for item in plan.in_progress:
        log.info("left to another session: %s", item)
    for drift in plan.drift:
        log.warning("drift: %s; to fix: %s", drift.problem, drift.fix.replace("\n", " "))
    for item in plan.unknown:
        log.info("not in the models, left alone: %s", item)


def log_run(plan, done, started):
    """After apply has logged each statement as it took effect: what is left, and the summary."""
    log_leftovers(plan)
    drift = (
        f"; up to date except {plural(len(plan.drift), 'drift')} listed above" if plan.drift else ""
    )
    if done:
        log.info("done: %s in %s%s", plural(len(done), "statement"), elapsed(started), drift)
    elif drift:
        log.info("nothing to add (%s)%s", elapsed(started), drift)
    else:
        log.info("schema is up to date (%s)", elapsed(started))


# --- Faults ---------------------------------------------------------------------------------


def on_signal(signum, frame):
    """SIGINT/SIGTERM: stop where we are; apply rolls back and closes the lock's connection.

    A second signal while the first is being handled only waits for it.
    """
    signals_received.append(signum)
    if len(signals_received) == 1:
        raise KeyboardInterrupt


def wait_honouring_signals(connection):
    """psycopg2's wait_select, which turns a signal into a cancel request for the running
    statement; when the statement ends before the cancel lands, the signal is raised here."""
    psycopg2.extras.wait_select(connection)
    if signals_received:
        raise KeyboardInterrupt


def interrupted_line():
    name = signal.Signals(signals_received[0]).name if signals_received else "SIGINT"
    return f"interrupted by {name} during the {progress['stage']} stage: {state_words()}"


def lost_connection(exc):
    """A session that died under us: the server rolled back whatever was open."""
    reason = str(getattr(exc, "orig", exc)).strip().splitlines()
    detail = reason[0] if reason else type(exc).__name__
    return (
        f"lost the connection to the server ({detail}) during the {progress['stage']} stage:"
        f" {state_words()}; rerun when the server is back"
    )


def database_failure(exc):
    """One line for a database error outside the stages' own messages."""
    original = getattr(exc, "orig", exc)
    code = getattr(original, "pgcode", None)
    detail = str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__
    if code == "42501":
        return f"permission denied ({detail}): run as the database owner or GRANT CREATE ON SCHEMA public; {state_words()}"
    if code == "25006":
        return f"the server is read-only (a standby?): point DATABASE_URL at the primary; {state_words()}"
    if code == "57014":
        return f"a statement was cancelled ({detail}); {state_words()}"
    if code is None or code[:2] in ("08", "57"):  # None: the socket closed, no server error
        return lost_connection(exc)
    return f"migration failed ({detail}); {state_words()}"


def error_line(exc):
    """The one line for an exception that ends a run."""
    if isinstance(exc, MigrationError):
        return str(exc)
    if isinstance(exc, (peewee.InterfaceError, psycopg2.InterfaceError)):
        return lost_connection(exc)
    if isinstance(exc, (peewee.DatabaseError, psycopg2.Error)):
        return database_failure(exc)
    if isinstance(exc, OSError):  # stdout or stderr closed or full
        return f"cannot write the output ({exc.strerror or exc})"
    first = str(exc).splitlines()[0] if str(exc) else ""
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
    url = os.environ.get("DATABASE_URL")
    params = connection_params(DEFAULT_DATABASE_URL if url is None else url)
    default = " (the default: DATABASE_URL is not set)" if url is None else ""
    log.info("database %s%s", describe(params), default)
    connect(params, args.wait, log)
    refuse_old_server()
    if args.check or args.dry_run:
        plan = plan_with_retries(args.atomic, Budget(args.lock_timeout))
        status = check(plan, started) if args.check else dry_run(plan, args)
        sys.stdout.flush()  # a full or closed stdout fails here, inside the error handling
        return status
    plan, done = migrate(args.atomic, args.lock_timeout, args.statement_timeout)
    log_run(plan, done, started)
    return EXIT_OK


def main(argv=None):
    args = parse_args(argv)
    if args.sql:
        sys.stdout.write(schema_sql())
        return EXIT_OK
    setup_logging()
    psycopg2.extensions.set_wait_callback(wait_honouring_signals)
    for signum in EXIT_SIGNAL:
        signal.signal(signum, on_signal)
    started = time.monotonic()
    try:
        return run(args, started)
    except BaseException as exc:
        if isinstance(exc, SystemExit):
            raise
        if signals_received or isinstance(exc, KeyboardInterrupt):
            log.error("error: %s", interrupted_line())
            return EXIT_SIGNAL[signals_received[0] if signals_received else signal.SIGINT]
        if args.verbose and not isinstance(exc, MigrationError):
            log.error("traceback of the error below:", exc_info=exc)
        log.error("error: %s", error_line(exc))
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if not database.is_closed():
            try:
                database.close()
            except peewee.PeeweeException:
                pass
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
