"""
DATABASE_URL to an open connection of models.database, and back to words an operator can act on.

Usage::

    from connection import connection_params, connect, describe

    params = connection_params(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    print(describe(params))          # the password masked
    connect(params, wait_seconds=30) # binds and opens models.database

DATABASE_URL is parsed by libpq (psycopg2's parse_dsn), so both the keyword
form and postgresql:// URLs work, and whatever it leaves out comes from the
PG* environment variables. Failures raise MigrationError with one line that
says what to do; the password is never part of it.
"""

import os
import time

import peewee
import psycopg2
from psycopg2.extensions import make_dsn, parse_dsn

from models import database

DEFAULT_DATABASE_URL = (
    "host=localhost user=postgres password=postgres dbname=api_aggregator port=5432 sslmode=disable"
)
# Sessions of migrate.py show as this in pg_stat_activity, so that another run
# (and an operator) can tell who holds the migration lock.
APPLICATION_NAME = "migrate.py"


class MigrationError(Exception):
    """A failure the operator can act on; its text is the one line printed."""


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
    return make_dsn(**{key: "***" if key == "password" else value for key, value in params.items()})


def secrets_of(params):
    return [s for s in (params.get("password"), os.environ.get("PGPASSWORD")) if s]


def session_params(params):
    """params plus the application_name that marks our sessions, unless the operator chose one."""
    if "application_name" in params or "PGAPPNAME" in os.environ:
        return dict(params)
    return {**params, "application_name": APPLICATION_NAME}


def connect(params, wait_seconds=0, log=None):
    """Bind models.database to params and open it, retrying an unreachable server until wait_seconds."""
    params = session_params(params)
    database.utc_sessions = False
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
            if not waiting and log:
                log.info("waiting up to %g s for the server to accept connections", wait_seconds)
            waiting = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def open_side_connection():
    """A second connection with the same parameters as models.database, in autocommit mode."""
    connection = psycopg2.connect(make_dsn(dbname=database.database, **database.connect_params))
    connection.autocommit = True
    return connection


# libpq's words for a server that is not (yet) there: --wait retries these.
UNREACHABLE_SIGNS = (
    "Connection refused",
    "could not connect",
    "could not translate host name",
    "timeout expired",
    "No such file or directory",
    "the database system is starting up",
    "the database system is shutting down",
)


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
        return f"the server refused the login ({detail}): check the user in DATABASE_URL"
    if "database" in text and "does not exist" in text:
        dbname = database.database
        return f'database "{dbname}" does not exist: create it first (createdb {dbname})'
    if any(sign in text for sign in UNREACHABLE_SIGNS):
        return f"cannot reach the server at {where} ({detail}): start it, fix DATABASE_URL, or pass --wait SECONDS"
    return f"cannot connect to {where}: {detail}"
