"""
DATABASE_URL to an open connection of `database`, and back to words an operator can act on.

Usage::

    from connection import connection_params, connect, describe

    params = connection_params(os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL))
    print(describe(params))          # every password masked
    connect(params, wait_seconds=30) # binds and opens `database`

DATABASE_URL is parsed by libpq (psycopg2's parse_dsn), so both the keyword
form and postgresql:// URLs work, and whatever it leaves out comes from the
PG* environment variables. Failures raise MigrationError with one line that
says what to do.

Nothing waits unbounded: `wait`, psycopg2's wait callback for every
connection (migrate.py installs it), ends a connection attempt after the
connect timeout, watches a long statement through a probe, and bounds a
cancel request; TCP keepalives end a connection whose peer vanished. Each
session is set up once (`configure_session`): a client encoding any server
encoding converts to, and no idle_session_timeout.

No password is ever printed. Masking is structural: the password parameters,
the user info of a URL and connection strings nested in a value (libpq can
read a dbname as one) are masked where they are, never by searching the
password's text, which garbles every line when it is a short word.

`database`, the Peewee database every model is bound to (sessions in UTC),
lives here, with `bind_from_url`, so that this module imports no other
module of the tool; models.py re-exports both, so `from models import
database, bind_from_url` stays the way to reach them.
"""

import contextlib
import os
import re
import select
import shlex
import threading
import time

import peewee
import psycopg2
from playhouse.postgres_ext import PostgresqlExtDatabase, Psycopg2ExtAdapter
from psycopg2.extensions import make_dsn, parse_dsn

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
    if is_url(url) and has_misplaced_at_sign(url):
        raise MigrationError(
            "DATABASE_URL has an '@' that libpq reads as part of the host, port or database name:"
            " percent-encode '@' as %40 (and '/' as %2F) in the user name and password,"
            " e.g. postgresql://U:P%40SS@H/D"
        )
    try:
        params = parse_dsn(url)
    except psycopg2.ProgrammingError as exc:
        raise MigrationError(
            f"DATABASE_URL cannot be parsed: {parse_problem(url, str(exc))}"
        ) from None
    except UnicodeEncodeError:
        raise MigrationError(
            "DATABASE_URL is not valid UTF-8: set it again from a UTF-8 text"
        ) from None
    if not (
        params.get("dbname")
        or params.get("service")
        or os.environ.get("PGDATABASE")
        or os.environ.get("PGSERVICE")
    ):
        raise MigrationError(
            "DATABASE_URL names no database: add dbname=NAME (or /NAME to the URL)"
        )
    return params


# --- Masking ------------------------------------------------------------------

URL_PREFIXES = ("postgresql://", "postgres://")
URL_SCHEME = re.compile(r"\s*([A-Za-z][A-Za-z0-9+.-]*)://")
# Keywords whose value is a secret: the login password and the client key's.
SECRET_KEYWORDS = ("password", "sslpassword")
# The user info of a URL of any scheme: scheme://USER:PASSWORD@
URL_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)([^/?#\s]*)@")
MASK = "***"


def is_url(text):
    return text.startswith(URL_PREFIXES)


def split_url(url):
    """A postgresql:// URL cut as libpq cuts it: user info, hosts and ports, database name, query.

    The user info ends at the first '@' before any '/'; the hosts end at '/' or '?'.
    """
    rest = url.split("://", 1)[1]
    end = min((i for i in (rest.find("@"), rest.find("/")) if i >= 0), default=-1)
    userinfo, rest = (rest[:end], rest[end + 1 :]) if end >= 0 and rest[end] == "@" else ("", rest)
    hosts_end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    path, _, query = rest[hosts_end:].partition("?")
    return userinfo, rest[:hosts_end], path[1:], query


def has_misplaced_at_sign(url):
    """Whether a postgresql:// URL has an '@' besides the one that ends its user info.

    A raw '@' in a password moves the rest of it into the host, port or
    database name, where it would be printed and sent out as a host name.
    """
    _, hosts, dbname, query = split_url(url)
    return "@" in hosts + dbname + query


def holds_connection_string(key, value):
    """Whether libpq may read value as a connection string of its own (as it can a dbname)."""
    return is_url(value) or (key == "dbname" and "=" in value)


def masked(params):
    """params with every password replaced by ***, wherever libpq would read one."""
    return {key: masked_value(key, value) for key, value in params.items()}


def masked_value(key, value):
    if key in SECRET_KEYWORDS:
        return MASK
    if holds_connection_string(key, value):
        return masked_connection_string(value)
    return URL_USERINFO.sub(masked_userinfo, value)


def masked_connection_string(text):
    """A nested connection string, parsed and shown masked; *** if it cannot be parsed safely."""
    if is_url(text) and has_misplaced_at_sign(text):
        return MASK
    try:
        return describe(parse_dsn(text))
    except (psycopg2.ProgrammingError, UnicodeEncodeError):
        return MASK


def masked_userinfo(match):
    scheme, userinfo = match.groups()
    user, colon, _ = userinfo.partition(":")
    if "@" in user:  # where the user name ends is ambiguous: show none of it
        return f"{scheme}{MASK}@"
    return f"{scheme}{user}:{MASK}@" if colon else match.group(0)


def describe(params):
    """The connection as a libpq string with every password masked."""
    return make_dsn(**masked(params))


def nested_params(value):
    try:
        return parse_dsn(value)
    except (psycopg2.ProgrammingError, UnicodeEncodeError):
        return {}


def secrets_of(params):
    """Every password params and PGPASSWORD give, those of nested connection strings included."""
    found = {os.environ.get("PGPASSWORD")}
    for key, value in params.items():
        if key in SECRET_KEYWORDS:
            found.add(value)
        elif holds_connection_string(key, value):
            found |= secrets_of(nested_params(value))
    return {secret for secret in found if secret}


def without_secrets(text, params):
    """A message of libpq or the server with what it may echo of params masked: a last guard.

    A value masking changes (a nested connection string) is replaced whole,
    also as the server truncates a name (63 bytes). Then each password of 4
    or more characters: a shorter one would garble the line (d***t***b***se)
    and one that is also the user or database name is shown by the first line
    anyway.
    """
    for key, value in params.items():
        shown = masked_value(key, value)
        if key not in SECRET_KEYWORDS and shown != value:
            text = text.replace(value, shown).replace(truncated_name(value), shown)
    plain_values = set(params.values())
    for secret in secrets_of(params):
        if len(secret) >= 4 and secret not in plain_values - {params.get("password")}:
            text = text.replace(secret, MASK)
    return text


def truncated_name(value, max_bytes=63):
    """value as PostgreSQL truncates an identifier (NAMEDATALEN - 1 bytes, whole characters)."""
    return value.encode()[:max_bytes].decode(errors="ignore")


# --- What libpq could not parse -----------------------------------------------

# libpq's keywords (PostgreSQL 17), to recognise a misspelt one. A word that
# is not close to one is not shown: it may be a piece of a password.
LIBPQ_KEYWORDS = (  # noqa: SIM905 - 42 words read better as text than as 42 lines
    "host hostaddr port dbname user password passfile require_auth channel_binding"
    " connect_timeout client_encoding options application_name fallback_application_name"
    " keepalives keepalives_idle keepalives_interval keepalives_count tcp_user_timeout"
    " replication gssencmode sslmode requiressl sslcompression sslcert sslkey sslpassword"
    " sslcertmode sslrootcert sslcrl sslcrldir sslsni requirepeer ssl_min_protocol_version"
    " ssl_max_protocol_version krbsrvname gsslib gssdelegation service target_session_attrs"
    " load_balance_hosts sslnegotiation"
).split()
QUOTE_HINT = "quote a value that has spaces: password='a b'"
URL_VALUE_HINT = "percent-encode '&' and '=' in a value as %26 and %3D"


def parse_problem(url, message):
    """What libpq found wrong in DATABASE_URL: the keyword or URL part, never a value."""
    if (scheme := URL_SCHEME.match(url)) and not url.startswith(URL_PREFIXES):
        return f"its scheme {scheme.group(1)}:// is not postgresql:// or postgres://"
    if (word := quoted_in(message, 'invalid connection option "(.*)"')) is not None:
        if not word:
            return f'an "=" with no keyword before it: {QUOTE_HINT}'
        return naming("unknown keyword {}", word, QUOTE_HINT)
    if (word := quoted_in(message, 'invalid URI query parameter: "(.*)"')) is not None:
        return naming("unknown query parameter {}", word, URL_VALUE_HINT)
    if (word := quoted_in(message, 'separator "=" in URI query parameter: "(.*)"')) is not None:
        return naming("query parameter {} is not NAME=VALUE", word, URL_VALUE_HINT)
    if (word := quoted_in(message, 'missing "=" after "(.*)" in connection info')) is not None:
        if word in LIBPQ_KEYWORDS:
            return f'word "{word}" has no "=VALUE"'
        # Not even a near keyword is shown: a word without "=" is most often the
        # rest of an unquoted value with a space, such as a password ("my host1").
        return f'a word has no "=VALUE" (not shown, as it may be part of a password): {QUOTE_HINT}'
    if "unterminated quoted string" in message:
        return "a quoted value has no closing quote (write a quote inside a value as \\')"
    if (token := quoted_in(message, 'percent-encoded (?:token|value): "(.*)"')) is not None:
        part = url_part_holding(url, token)
        return f"the {part} has a '%' not followed by two hex digits (or %00): write '%' as %25"
    if "IPv6" in message or "unexpected character" in message:
        return "the host is malformed: write an IPv6 address as [::1], followed by ':PORT' or '/'"
    return "write it as 'host=H port=P user=U dbname=D' or as 'postgresql://U:PASSWORD@H:P/D'"


def quoted_in(message, pattern):
    """The text libpq quoted where pattern's group is, or None."""
    match = re.search(pattern, message)
    return match.group(1) if match else None


def naming(template, word, hint):
    """template naming word if it is a keyword or a misspelt one; else not shown, and the hint."""
    import difflib  # here, not at the top: 1.7 ms that a run without this error need not pay

    if word in LIBPQ_KEYWORDS:
        return template.format(f'"{word}"')
    close = difflib.get_close_matches(word, LIBPQ_KEYWORDS, n=1, cutoff=0.75)
    if close:
        return template.format(f'"{word}" (did you mean {close[0]}?)')
    return template.format("(not shown, as it may be part of a password)") + f": {hint}"


def url_part_holding(url, token):
    """Which part of a postgresql:// URL token is (libpq quotes the part): password, host, ..."""
    if not is_url(url):
        return "value"
    userinfo, hosts, dbname, query = split_url(url)
    user, _, password = userinfo.partition(":")
    parts = [("password", password), ("user name", user), ("host", hosts)]
    parts += [("database name", dbname)]
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        parts += [("name of a query parameter", name), ("value of a query parameter", value)]
    return next((label for label, text in parts if text == token), "URL")


# --- The database: every session in UTC ------------------------------------------


def utc_session_options(database, options=None):
    """libpq `options` for a connection: the caller's, then `-c TimeZone=UTC`, which wins.

    Passing `options` hides a URL's own options and PGOPTIONS from libpq, so
    they are merged in here as libpq would have picked them.
    """
    if options is None:
        try:
            options = parse_dsn(database).get("options")
        except psycopg2.ProgrammingError:  # a plain database name, not a DSN
            options = None
        options = options or os.environ.get("PGOPTIONS")
    return f"{options} -c TimeZone=UTC" if options else "-c TimeZone=UTC"


class UtcSessionAdapter(Psycopg2ExtAdapter):
    """Opens every connection with TimeZone=UTC, a startup option: no extra statement."""

    def connect(self, db, **params):
        if db.utc_sessions:
            params["options"] = utc_session_options(db.database, params.get("options"))
        return super().connect(db, **params)


class GatewayDatabase(PostgresqlExtDatabase):
    # Only the psycopg2 adapter: requirements.txt installs psycopg2, not psycopg 3.
    psycopg2_adapter = UtcSessionAdapter
    # migrate.py turns this off: it writes no timestamps, and pgbouncer before
    # 1.20 (Debian 12 ships 1.18) refuses a connection that sends `options`.
    utc_sessions = True

    # Set by bind_from_url: masks what a failed connection's message echoes of the URL.
    masked = None

    def init(self, database, **kwargs):
        # Peewee merges these into the parameters of an earlier init(); start
        # afresh, so no option (or password) of a previous binding leaks into this one.
        self.connect_params = {}
        self.masked = None
        super().init(database, **kwargs)

    def _connect(self):
        try:
            return super()._connect()
        except psycopg2.OperationalError as exc:
            if self.masked is None:
                raise
            raise psycopg2.OperationalError(self.masked(str(exc).strip())) from None


database = GatewayDatabase(None)


class DatabaseUrlError(ValueError):
    """DATABASE_URL cannot be used; the message says why and never holds a password."""


def bind_from_url(url=None):
    """Bind the models to DATABASE_URL (or `url`), parsed as migrate.py parses it.

    Either form libpq reads (`host=... dbname=...` or postgresql://), the PG* variables for
    what it leaves out, migrate.py's default when DATABASE_URL is unset; sessions in UTC.
    Nothing connects here. A bad URL raises DatabaseUrlError, and a failed connection later
    raises with every password masked, as in migrate.py's output. Returns the database.
    """
    if url is None:
        url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    try:
        params = connection_params(url)
    except MigrationError as exc:
        raise DatabaseUrlError(str(exc)) from None
    dbname = params.pop("dbname", None) or os.environ.get("PGDATABASE")
    database.utc_sessions = True
    if dbname:
        database.init(dbname, **params)
    else:  # a service names the database: libpq must get no dbname (make_dsn drops None)
        database.init(f"the database of service {params.get('service')}", dbname=None, **params)
    everything = {**params, **({"dbname": dbname} if dbname else {})}
    database.masked = lambda text: without_secrets(text, everything)
    return database


# Each connection attempt gives up after this many seconds unless DATABASE_URL
# (connect_timeout) or PGCONNECT_TIMEOUT says otherwise; libpq's own timer does
# not run while psycopg2 waits through a wait callback, so `wait` enforces it.
CONNECT_TIMEOUT = 5
# TCP keepalives, so that a connection to a peer that vanished (a half-open path)
# fails within about 25 s of silence instead of never; tcp_user_timeout (libpq 12+)
# bounds how long data we sent may stay unacknowledged.
KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}
TCP_USER_TIMEOUT = "30000"  # milliseconds


def session_params(params):
    """params plus what every session of ours needs, where the operator did not choose it:
    the application_name that marks our sessions, a connect timeout and TCP keepalives."""
    params = dict(params)
    if "application_name" not in params and "PGAPPNAME" not in os.environ:
        params["application_name"] = APPLICATION_NAME
    for key, value in KEEPALIVES.items():
        params.setdefault(key, value)
    if psycopg2.extensions.libpq_version() >= 120000:
        params.setdefault("tcp_user_timeout", TCP_USER_TIMEOUT)
    return params


def connect_limit(params):
    """Seconds one connection attempt may take: connect_timeout, PGCONNECT_TIMEOUT, or
    CONNECT_TIMEOUT. 0 (libpq's "forever") and values libpq rounds up count as libpq counts
    them, except that nothing waits forever."""
    text = params.get("connect_timeout") or os.environ.get("PGCONNECT_TIMEOUT") or ""
    try:
        seconds = int(text)
    except ValueError:
        seconds = 0
    return max(2, seconds) if seconds > 0 else CONNECT_TIMEOUT


def connect(params, wait_seconds=0, log=None):
    """Bind `database` to params and open it, retrying an unreachable server until wait_seconds."""
    params = session_params(params)
    database.utc_sessions = False
    dbname = params.pop("dbname", None) or os.environ.get("PGDATABASE")
    if dbname:
        database.init(dbname, **params)
    else:  # the service names it: Peewee needs a name, libpq must get none (make_dsn drops None)
        database.init(f"the database of service {params.get('service')}", dbname=None, **params)
    watch.connect_limit = connect_limit(params)
    deadline = time.monotonic() + wait_seconds
    waiting = False
    while True:
        try:
            connect_guarded()
            configure_session(database.connection())
            return database
        except (peewee.OperationalError, psycopg2.OperationalError, ServerSilent) as exc:
            database.close() if not database.is_closed() else None
            reason = connection_failure(exc, params, wait_seconds)
            if not is_unreachable(exc) or time.monotonic() >= deadline:
                raise MigrationError(reason) from None
            if not waiting and log:
                log.info("waiting up to %g s for the server to accept connections", wait_seconds)
            waiting = True
            pause(min(1.0, max(0.0, deadline - time.monotonic())))


# Startup options for our sessions, after the caller's own (the last -c wins): a role's
# statement_timeout or lock_timeout of a millisecond would cancel the very first statement,
# before any SET of ours could arrive. Per transaction, catalog.guarded pins tighter ones.
GUARD_OPTIONS = "-c statement_timeout=30s -c lock_timeout=30s"


def connect_guarded():
    """Open `database` with GUARD_OPTIONS; without them where a pooler refuses `options`
    (pgbouncer before 1.20), as it then refuses every session that sends them."""
    plain = dict(database.connect_params)
    own = plain.get("options") or os.environ.get("PGOPTIONS") or ""
    database.connect_params = {**plain, "options": f"{own} {GUARD_OPTIONS}".strip()}
    try:
        database.connect(reuse_if_open=True)
    except peewee.OperationalError as exc:
        database.connect_params = plain
        if "unsupported startup parameter" not in str(exc):
            raise
        database.connect(reuse_if_open=True)


def open_side_connection(own_thread=False):
    """Another connection, in autocommit mode, opened as `database` opens its own.

    Peewee's _connect, not make_dsn: Peewee turns a postgresql:// database name
    into a connection string, and libpq would take it as a database's name.

    own_thread: for statements run on another thread, through `execute_awaited`. Such a
    connection is asynchronous and awaits its statements with `wait` itself: psycopg2's
    wait callback is process-wide, archive turns it off for its COPY on the main thread,
    and a statement another thread had started with it could then not await its end
    ("wait callback not available").
    """
    try:
        if own_thread:
            encoding = "LATIN1" if text_limits["raw_server_bytes"] else "UTF8"
            params = {**database.connect_params, "client_encoding": encoding, "async_": True}
            connection = database._adapter.connect(database, **params)
            wait(connection)
        else:
            connection = database._connect()
            connection.autocommit = True
        configure_session(connection)
    except (psycopg2.OperationalError, ServerSilent) as exc:
        refused = MigrationError(
            connection_failure(exc, database.connect_params)
            + " (another connection: a run needs two, three with --archive, and one more to watch"
            " a long statement)"
        )
        # A server that answered with a refusal (too many connections) is not a silent one:
        # the probe says what the server said instead.
        refused.unreachable = is_unreachable(exc)
        raise refused from None
    return connection


def execute_awaited(cursor, sql, params=None):
    """cursor.execute, then its end awaited by `wait` when the connection is asynchronous."""
    cursor.execute(sql, params)
    if cursor.connection.async_:
        wait(cursor.connection)


# --- Our sessions' settings -------------------------------------------------------------

# What the session setup reads: whether this is a standby, and where a
# read-only default comes from, so that a refused write can be explained.
SESSION_QUERY = """
SELECT set_config('statement_timeout', '30s', true), set_config('lock_timeout', '30s', true);
SELECT pg_is_in_recovery(), s.setting, s.source, current_user, current_database(){extra}
FROM pg_settings s WHERE s.name = 'default_transaction_read_only'
"""
session_facts = {}
# What output may hold (catalog.shown): on a SQL_ASCII server the bytes of a
# name have no known encoding, so they are read as LATIN1 (which keeps every
# byte) and printed as \xNN; where stdout is not UTF-8 (migrate.py sets
# ascii_output), every non-ASCII character is printed escaped.
text_limits = {"raw_server_bytes": False, "ascii_output": False}


def configure_session(connection):
    """Settle what every session of ours needs, in one round trip after the login.

    The client encoding: UTF8, into which every server encoding converts;
    LATIN1 on a SQL_ASCII server, whose bytes have no known encoding and come
    back unchanged. idle_session_timeout (PostgreSQL 14+) of the role or
    database is turned off for the session: a run is idle while it backs off
    between lock attempts; client_connection_check_interval (14+) is 1 s. (The settings that bound one statement or
    transaction are pinned per transaction instead, see catalog.guarded.)
    """
    server_encoding = connection.info.parameter_status("server_encoding")
    text_limits["raw_server_bytes"] = server_encoding == "SQL_ASCII"
    wanted = "LATIN1" if text_limits["raw_server_bytes"] else "UTF8"
    if connection.encoding.replace("_", "") != wanted:
        connection.set_client_encoding(wanted)
    # client_connection_check_interval: a run killed (kill -9, a lost client) mid-statement
    # has the server end that statement within a second, not run it to its end unseen.
    extra = (
        ", set_config('idle_session_timeout', '0', false),"
        " set_config('client_connection_check_interval', '1s', false)"
    )
    query = SESSION_QUERY.format(extra=extra if connection.server_version >= 140000 else "")
    with connection.cursor() as cursor:
        execute_awaited(cursor, query)
        standby, read_only, source, role, dbname = cursor.fetchone()[:5]
    if connection.autocommit is False:
        connection.rollback()  # the query opened a transaction; a run starts outside one
    session_facts.update(
        standby=standby,
        read_only=read_only == "on",
        read_only_source=source,
        role=role,
        dbname=dbname,
    )


# --- Waiting for the server -------------------------------------------------------------


class ServerSilent(Exception):
    """The server (or the path to it) stopped answering; the connection was closed."""


# Signals received (SIGINT, SIGTERM); migrate.py's handler appends to it.
signals_received = []
TICK = 0.2  # seconds between looks at the clock (and at signals) while waiting
CANCEL_LIMIT = 5.0  # how long a cancel request and the answer to it may take


class PerThread:
    """An attribute whose value each thread sets for itself (threading.local), `default`
    until it does."""

    def __init__(self, default):
        self.default, self.values = default, threading.local()

    def __get__(self, owner, owner_type=None):
        return getattr(self.values, "value", self.default)

    def __set__(self, owner, value):
        self.values.value = value


class Watch:
    """What `wait` does while a statement runs: connect_limit bounds a connection attempt;
    `probe(connection, elapsed)`, set by apply for its statements, runs every probe_every seconds of a
    long wait (progress, and whether the server still answers); `silence_limit` bounds any
    wait outright (a probe's own)."""

    connect_limit = CONNECT_TIMEOUT
    probe_every = 5.0
    signals_handled = 0
    # Per thread: archive's checksum waits on a thread of its own, and a probe there set the
    # short limit of its own query for the main thread's wait too (a "lost connection"), and
    # ran on the probe's connection beside the main thread. That thread's statement is
    # probed from the main thread instead, by `join_watched`.
    probe = PerThread(None)
    silence_limit = PerThread(None)
    probing = PerThread(False)


watch = Watch()


def signal_pending():
    """Whether a SIGINT or SIGTERM arrived that nobody has acted on yet."""
    return len(signals_received) > watch.signals_handled


def pause(seconds):
    """time.sleep that a signal ends: migrate.py's handler only records signals, so that none
    lands between psycopg2 sending a statement and `wait` starting to watch it."""
    deadline = time.monotonic() + seconds
    while not signal_pending():
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.05))
    raise KeyboardInterrupt


def wait(connection):
    """psycopg2's wait callback: waits for the server like psycopg2.extras.wait_select, but
    bounded. A connection attempt ends after connect_limit; a long statement is watched by
    the probe; a signal (recorded by migrate.py's handler, which never raises) sends a cancel
    request for the running statement, bounded too, and is raised once the statement has
    ended. A ServerSilent goes up as it is: psycopg2 closes a connection whose wait callback
    raised, without the round trip close() would make to a peer that no longer answers."""
    started = time.monotonic()
    connecting = connection.status == psycopg2.extensions.STATUS_SETUP
    limit = watch.connect_limit if connecting else watch.silence_limit
    next_probe = started + watch.probe_every
    cancelled_at = None
    while True:
        if signal_pending() and cancelled_at is None:
            if connecting:
                raise KeyboardInterrupt
            cancelled_at = time.monotonic()
            cancel_bounded(connection)
        state = connection.poll()
        if state == psycopg2.extensions.POLL_OK:
            break
        readers = [connection.fileno()] if state == psycopg2.extensions.POLL_READ else []
        writers = [] if readers else [connection.fileno()]
        if any(select.select(readers, writers, [], TICK)):
            continue
        now = time.monotonic()
        if cancelled_at is not None and now - cancelled_at > CANCEL_LIMIT:
            raise ServerSilent(
                f"the server did not answer a cancel request within {CANCEL_LIMIT:g} s"
            )
        if limit is not None and now - started > limit:
            what = "a connection attempt" if connecting else "a query"
            raise ServerSilent(f"the server did not answer {what} within {limit:g} s")
        if not connecting and now >= next_probe:
            next_probe = now + watch.probe_every
            probe_once(connection, now - started)
    if signal_pending():
        raise KeyboardInterrupt


def probe_once(connection, elapsed):
    """The probe's look at the statement running on `connection`, if this thread has one."""
    if watch.probe and not watch.probing:
        watch.probing = True
        try:
            watch.probe(connection, elapsed)
        finally:
            watch.probing = False


def join_watched(thread, connection):
    """thread.join(), for a thread awaiting a statement on `connection`: the statement is
    probed from here as `wait` probes this thread's own (that thread acts on signals)."""
    started = time.monotonic()
    next_probe = started + watch.probe_every
    while thread.is_alive():
        thread.join(TICK)
        now = time.monotonic()
        if thread.is_alive() and now >= next_probe:
            next_probe = now + watch.probe_every
            probe_once(connection, now - started)


def acting_on_signals():
    """Called by whoever handles the interrupt: the reads it then makes are not cancelled."""
    watch.signals_handled = len(signals_received)


def cancel_bounded(connection):
    """Ask the server to cancel the running statement, waiting at most CANCEL_LIMIT:
    PQcancel blocks, and a frozen path would hold it forever."""
    sender = threading.Thread(target=cancel_quietly, args=(connection,), daemon=True)
    sender.start()
    sender.join(CANCEL_LIMIT)


def cancel_quietly(connection):
    # A failed cancel (a closed connection, a refused path) changes nothing to do: the wait
    # that asked for it has its own limit. Unsuppressed, the thread would print a traceback.
    with contextlib.suppress(psycopg2.Error):
        connection.cancel()


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


def connection_failure(exc, params, waited=0):
    """What a failed connection means for the operator, from libpq's message; `waited`: the
    --wait it was given, spent."""
    where = server_words(params)
    retry = f"or raise --wait (it waited {waited:g} s)" if waited else "or pass --wait SECONDS"
    if isinstance(exc, ServerSilent):
        return (
            f"{exc} at {where} (a stopped server, a dead load balancer or a half-open network"
            f" path?): check the server and the path to it, {retry}"
        )
    text = without_secrets(str(exc).strip(), params)
    # libpq: 'connection to server at "h", port 5432 failed: FATAL:  <reason>'
    first_line = text.splitlines()[0] if text else "unknown error"
    detail = first_line.split(" failed: ", 1)[-1].replace("FATAL:", "").strip()
    if "password authentication failed" in text or "no password supplied" in text:
        return f"authentication failed ({detail}): check the password in DATABASE_URL or PGPASSWORD"
    if "no pg_hba.conf entry" in detail or re.match(r'role ".*" does not exist', detail):
        return f"the server refused the login ({detail}): check the user in DATABASE_URL"
    if re.match(r'database ".*" does not exist', detail):
        return missing_database(database.database)
    if re.match(r'definition of service ".*" not found|service file ".*" not found', detail):
        return f"{detail}: {service_files()}"
    if is_unreachable(exc):
        return f"cannot reach the server at {where} ({detail}): start it, fix DATABASE_URL, {retry}"
    return f"cannot connect to {where}: {detail}"


def is_unreachable(exc):
    """Whether a failed connection is one --wait retries: no server (yet), or a silent one."""
    return isinstance(exc, ServerSilent) or any(sign in str(exc) for sign in UNREACHABLE_SIGNS)


def effective_target(params):
    """' (connected to host=h port=p dbname=d user=u)', as libpq resolved them (DATABASE_URL,
    then the PG* variables, a service file, the defaults), where that is not what params
    name; '' where it is."""
    info = database.connection().info
    used = {"host": info.host, "port": str(info.port), "dbname": info.dbname, "user": info.user}
    if all(str(params.get(name, "")) == value for name, value in used.items()):
        return ""
    return f" (connected to {make_dsn(**used)})"


def server_words(params):
    """'host=db port=5432', as far as params and the PG* variables say; a service by its name."""
    shown = masked(params)
    host = shown.get("host") or shown.get("hostaddr") or os.environ.get("PGHOST")
    port = shown.get("port") or os.environ.get("PGPORT") or "5432"
    service = shown.get("service") or os.environ.get("PGSERVICE")
    if service and not host:
        return f"the server of service {service}"
    return f"host={host or 'localhost (the default socket)'} port={port}"


def service_files():
    """Where libpq looks for a service definition, for the error that names none found."""
    user_file = os.environ.get("PGSERVICEFILE") or os.path.expanduser("~/.pg_service.conf")
    system_folder = os.environ.get("PGSYSCONFDIR") or "libpq's built-in system folder"
    return (
        f"libpq reads {user_file} (PGSERVICEFILE) and pg_service.conf in {system_folder}"
        " (PGSYSCONFDIR); define the service there or fix service= in DATABASE_URL"
    )


def missing_database(dbname):
    if holds_connection_string("dbname", dbname):
        return (
            "the database does not exist: dbname holds a connection string, which psycopg2 sends"
            " to the server as a database name; put its parameters in DATABASE_URL itself"
        )
    return f'database "{dbname}" does not exist: create it first (createdb {shlex.quote(dbname)})'
