"""
Bring a PostgreSQL database to the schema of models.py: create what is missing, never drop.

Usage::

    export DATABASE_URL="host=localhost user=postgres dbname=api_aggregator port=5432"
    python migrate.py               # create what is missing, in one transaction
    python migrate.py --wait 30     # first retry the connection for up to 30 s
    python migrate.py --sql > schema.sql   # the same schema as plain SQL

A run reads the catalog and stops there when nothing is missing: no lock, no
DDL, so it never queues behind the application's open transactions. When
something is missing it opens one transaction, takes an advisory lock (so
replicas starting together create the schema once), reads the catalog again,
creates what is still missing and commits: all of it or nothing.

Exit codes: 0 success, 2 error (1 is kept for "changes pending" of a later
check mode). Errors are one line on stderr; a password is never printed.
"""

import argparse
import logging
import os
import sys
import time
from collections import namedtuple

import peewee
import psycopg2
from peewee import SQL, Entity, NodeList, Value, ValueLiterals
from psycopg2.extensions import make_dsn, parse_dsn

from models import MODELS, database

DEFAULT_DATABASE_URL = "host=localhost user=postgres password=postgres dbname=api_aggregator port=5432 sslmode=disable"
EXIT_OK, EXIT_ERROR = 0, 2
# Any constant the application does not use for its own advisory locks.
ADVISORY_LOCK_KEY = 7_283_145_019_226_431

log = logging.getLogger("migrate")

Step = namedtuple("Step", "description sql")


class MigrationError(Exception):
    """A failure the operator can act on; its text is the one line printed."""


# --- Connecting --------------------------------------------------------------


def connection_params(url):
    """libpq keyword/value pairs of DATABASE_URL, in either form libpq accepts."""
    try:
        params = parse_dsn(url)
    except psycopg2.ProgrammingError:
        # libpq's reason can quote the input, password included, so it is not shown.
        raise MigrationError(
            "DATABASE_URL cannot be parsed: write it as 'host=H port=P user=U dbname=D'"
            " or as 'postgresql://U:PASSWORD@H:P/D'"
        ) from None
    if not (params.get("dbname") or os.environ.get("PGDATABASE")):
        raise MigrationError(
            "DATABASE_URL names no database: add dbname=NAME (or /NAME to the URL)"
        )
    return params


def describe(params):
    """The connection as a libpq string with the password masked."""
    return make_dsn(
        **{key: "***" if key == "password" else value for key, value in params.items()}
    )


def secrets_of(params):
    return [s for s in (params.get("password"), os.environ.get("PGPASSWORD")) if s]


def connect(params, wait_seconds=0):
    """Bind models.database to params and open it, retrying an unreachable server until wait_seconds."""
    params = dict(params)
    database.init(params.pop("dbname", None) or os.environ["PGDATABASE"], **params)
    deadline = time.monotonic() + wait_seconds
    waiting = False
    while True:
        try:
            database.connect(reuse_if_open=True)
            return database
        except peewee.OperationalError as exc:
            reason = connection_failure(exc, params)
            if not reason.startswith("cannot reach") or time.monotonic() >= deadline:
                raise MigrationError(reason) from None
            if not waiting:
                log.info(
                    "waiting up to %g s for the server to accept connections",
                    wait_seconds,
                )
                waiting = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def connection_failure(exc, params):
    """What a failed connection means for the operator, from libpq's message."""
    text = str(exc).strip()
    # libpq: 'connection to server at "h", port 5432 failed: FATAL:  <reason>'
    first_line = text.splitlines()[0] if text else "unknown error"
    detail = first_line.split(" failed: ", 1)[-1].replace("FATAL:", "").strip()
    where = f"host={params.get('host', 'localhost')} port={params.get('port', '5432')}"
    if "password authentication failed" in text or "no password supplied" in text:
        return f"authentication failed ({detail}): check the password in DATABASE_URL or PGPASSWORD"
    if "no pg_hba.conf entry" in text or ("role" in text and "does not exist" in text):
        return (
            f"the server refused the login ({detail}): check the user in DATABASE_URL"
        )
    if "database" in text and "does not exist" in text:
        dbname = database.database
        return (
            f'database "{dbname}" does not exist: create it first (createdb {dbname})'
        )
    if any(
        sign in text
        for sign in (
            "Connection refused",
            "could not connect",
            "could not translate host name",
            "timeout expired",
            "No such file or directory",
            "the database system is starting up",
            "the database system is shutting down",
        )
    ):
        return f"cannot reach the server at {where} ({detail}): start it, fix DATABASE_URL, or pass --wait SECONDS"
    return f"cannot connect to {where}: {detail}"


# --- Planning ----------------------------------------------------------------


def render(node):
    """SQL text of a Peewee node with every value inlined, ready to print or run."""
    sql, params = database.get_sql_context().sql(ValueLiterals(node)).query()
    assert not params, sql
    return sql


def table_steps(model, safe=False):
    meta = model._meta
    steps = [
        Step(
            f"created table {meta.table_name}",
            render(model._schema._create_table(safe=safe)),
        )
    ]
    comment = NodeList(
        (
            SQL("COMMENT ON TABLE"),
            Entity(meta.table_name),
            SQL("IS"),
            Value(meta.comment),
        )
    )
    steps.append(Step(f"commented table {meta.table_name}", render(comment)))
    return steps


def index_step(model, index, safe=False):
    return Step(
        f"created index {index._name}",
        render(model._schema._create_index(index, safe=safe)),
    )


def full_schema(safe):
    """Every statement that makes the schema from nothing, in order."""
    steps = []
    for model in MODELS:
        steps += table_steps(model, safe)
        steps += [
            index_step(model, index, safe) for index in model._meta.fields_to_index()
        ]
    return steps


def missing_steps():
    """The statements that create what the live database lacks: tables, then indexes."""
    tables = set(database.get_tables())
    steps = []
    for model in MODELS:
        table = model._meta.table_name
        if table in tables:
            existing = {index.name for index in database.get_indexes(table)}
        else:
            steps += table_steps(model)
            existing = set()
        steps += [
            index_step(model, index)
            for index in model._meta.fields_to_index()
            if index._name not in existing
        ]
    return steps


# --- Applying ----------------------------------------------------------------


def migrate():
    """Create what is missing in one transaction; return the steps taken."""
    if not missing_steps():
        return []
    with database.atomic():
        database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_KEY,))
        steps = missing_steps()  # another run may have made it while we waited
        for step in steps:
            database.execute_sql(step.sql)
    return steps


def failure(exc):
    """One line for a database error raised while migrating."""
    original = getattr(exc, "orig", exc)  # Peewee keeps psycopg2's error here
    pgcode = getattr(original, "pgcode", None)
    detail = (
        str(original).strip().splitlines()[0]
        if str(original).strip()
        else type(exc).__name__
    )
    if pgcode == "42501":
        return f"permission denied ({detail}): run as the database owner or GRANT CREATE ON SCHEMA public"
    if pgcode == "25006":
        return "the server is read-only (a standby?): point DATABASE_URL at the primary"
    return f"migration failed ({detail}); nothing was changed"


def schema_sql():
    """schema.sql: the whole schema, safe to run twice with psql -f."""
    lines = [
        "-- Generated by `python migrate.py --sql` from models.py; do not edit.",
        "BEGIN;",
    ]
    lines += [step.sql + ";" for step in full_schema(safe=True)]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


# --- Command line ------------------------------------------------------------


class RedactSecrets(logging.Filter):
    def __init__(self, secrets):
        super().__init__()
        self.secrets = secrets

    def filter(self, record):
        message = record.getMessage()
        for secret in self.secrets:
            message = message.replace(secret, "***")
        record.msg, record.args = message, ()
        return True


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="migrate.py",
        description="Create the API aggregator's tables and indexes that are missing in the "
        "database named by DATABASE_URL (libpq 'host=... dbname=...' or postgresql:// URL). "
        "Never drops or alters anything.",
        epilog="Exit codes: 0 success, 2 error (1 is kept for 'changes pending' of a check mode).",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0,
        metavar="SECONDS",
        help="retry the connection until the server accepts it or SECONDS pass (default 0)",
    )
    parser.add_argument(
        "--sql",
        action="store_true",
        help="print the whole schema as SQL for psql -f (as schema.sql) and exit; connects to nothing",
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.sql:
        sys.stdout.write(schema_sql())
        return EXIT_OK
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("migrate: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    started = time.monotonic()
    try:
        params = connection_params(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
        handler.addFilter(RedactSecrets(secrets_of(params)))
        log.info("database %s", describe(params))
        connect(params, args.wait)
        steps = migrate()
    except MigrationError as exc:
        log.error("error: %s", exc)
        return EXIT_ERROR
    except peewee.DatabaseError as exc:
        log.error("error: %s", failure(exc))
        return EXIT_ERROR
    finally:
        if not database.is_closed():
            database.close()
    for step in steps:
        log.info(step.description)
    elapsed = time.monotonic() - started
    if steps:
        log.info("done: %d statements committed in %.2f s", len(steps), elapsed)
    else:
        log.info("schema is up to date (%.2f s)", elapsed)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
