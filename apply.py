"""
Run a plan on a live database in named stages, never building a lock queue.

Usage::

    from apply import migrate

    plan, done = migrate()                            # online: writers never wait long
    plan, done = migrate(atomic=True)                 # everything in one transaction
    plan, done = migrate(lock_timeout=5, statement_timeout=600)

The stages, and what each may wait for:

1. read: the catalog and the plan, in autocommit. The one locking catalog
   query waits at most LOCK_ATTEMPT for a table lock, then backs off and
   retries. Nothing to add ends the run here: no lock taken, no DDL sent.
2. migration lock: pg_try_advisory_xact_lock in a transaction of its own on
   a second connection, kept open until the run ends (so it is released
   whatever happens to this process, and works through a transaction
   pooler). Busy: back off and read the plan again, since the holder may be
   doing our work; give up when the --lock-timeout budget is spent, naming it.
3. transaction: BEGIN, lock_timeout LOCK_ATTEMPT, a statement_timeout guard,
   read the catalog again, plan, execute, COMMIT. A lock not granted within
   LOCK_ATTEMPT rolls the attempt back; it is retried after a jittered back-off
   until the budget is spent. So the application's sessions queue behind a
   waiting ALTER for LOCK_ATTEMPT at most.
4. online: each statement on its own, with lock_timeout = the budget and
   statement_timeout = --statement-timeout (default no limit); the locks they
   take block no reads or writes. They use session settings, so consecutive
   statements must reach one server backend: a transaction pooler is detected
   and refused.

Every failure raises MigrationError with one line that names what blocked
(pid, application_name, how long its transaction has been open) and says in
which state the database was left.
"""

import logging
import random
import time
from contextlib import contextmanager

import peewee
import psycopg2.extensions

from catalog import LOCK_ATTEMPT, milliseconds, read_catalog
from connection import MigrationError, open_side_connection
from models import MODELS, database
from plan import lock_name, plan_changes, with_hazards

# The advisory lock key the application must not use for a lock of its own.
MIGRATION_LOCK_KEY = 7_283_145_019_226_431
# statement_timeout of the transaction stage when it holds only instant
# statements (the online mode): a guard against a surprise holding
# ACCESS EXCLUSIVE while it rewrites or scans.
TRANSACTION_GUARD = 10.0  # seconds
LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED, QUERY_CANCELED = "55P03", "40P01", "57014"
RETRYABLE = (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED)

log = logging.getLogger("migrate")

# What the run has done so far, for the line an interruption prints.
progress = {"stage": "read", "committed": False}

# --- The budget for waiting --------------------------------------------------------


class Budget:
    """The --lock-timeout budget shared by every wait of a run; 0 means no limit."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.attempts = 0

    def spent(self):
        return self.seconds > 0 and time.monotonic() >= self.deadline

    def back_off(self):
        """Sleep 0.05 s, 0.1 s, ... up to 1 s, jittered so that parallel runs spread out."""
        self.attempts += 1
        pause = min(1.0, 0.05 * 2 ** min(self.attempts, 5)) * random.uniform(0.5, 1.5)
        if self.seconds > 0:
            pause = min(pause, max(0.0, self.deadline - time.monotonic()))
        time.sleep(pause)


def pgcode(exc):
    return getattr(getattr(exc, "orig", exc), "pgcode", None)


class Blocked(Exception):
    """A lock of `mode` on `tables` (None: any table) was not granted within LOCK_ATTEMPT."""

    def __init__(self, tables, mode):
        super().__init__(tables, mode)
        self.tables, self.mode = tables, mode


def with_lock_retries(attempt, budget):
    """attempt() until no lock wait in it times out, backing off between tries, within budget."""
    while True:
        try:
            return attempt()
        except Blocked as blocked:
            failure = blocked
        except peewee.DatabaseError as exc:
            if pgcode(exc) not in RETRYABLE:
                raise
            failure = Blocked(None, "AccessShareLock")  # a catalog read or a row check
        if budget.spent():
            raise MigrationError(blocked_message(failure, budget)) from None
        budget.back_off()


# --- Naming who blocks ----------------------------------------------------------------

# Which lock modes conflict with the one asked for (PostgreSQL's table-level lock matrix).
CONFLICTS = {
    "AccessShareLock": ["AccessExclusiveLock"],
    "RowExclusiveLock": [
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ],
    "ShareUpdateExclusiveLock": [
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ],
    "ShareLock": [
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ],
    "ShareRowExclusiveLock": [
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ],
    "AccessExclusiveLock": [
        "AccessShareLock",
        "RowShareLock",
        "RowExclusiveLock",
        "ShareUpdateExclusiveLock",
        "ShareLock",
        "ShareRowExclusiveLock",
        "ExclusiveLock",
        "AccessExclusiveLock",
    ],
}
# Granted locks first (they are the cause), then requests queued ahead of ours.
BLOCKERS_QUERY = """
SELECT a.pid, a.application_name, a.state, l.mode, l.granted, c.relname,
       extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.pid <> pg_backend_pid() AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
  AND (%(tables)s::text[] IS NULL OR c.relname = ANY(%(tables)s)) AND l.mode = ANY(%(modes)s)
ORDER BY l.granted DESC, a.xact_start
LIMIT 1
"""
OLDEST_TRANSACTION_QUERY = """
SELECT pid, application_name, state, extract(epoch FROM now() - xact_start)
FROM pg_stat_activity
WHERE pid <> pg_backend_pid() AND datname = current_database() AND xact_start IS NOT NULL
  AND (backend_xid IS NOT NULL OR backend_xmin IS NOT NULL)
ORDER BY xact_start
LIMIT 1
"""
MIGRATION_LOCK_HOLDER_QUERY = f"""
SELECT a.pid, a.application_name, a.state, extract(epoch FROM now() - a.xact_start)
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND (l.classid::bigint << 32 | l.objid::bigint) = {MIGRATION_LOCK_KEY}
"""


def session_words(pid, application, state, seconds):
    """'pid 4242 (gateway, idle in transaction, transaction open 12 s)'."""
    return f"pid {pid} ({application or 'no application_name'}, {state}, transaction open {seconds or 0:.0f} s)"


def blocked_message(blocked, budget):
    tables = ", ".join(blocked.tables) if blocked.tables else "a table"
    row = database.execute_sql(
        BLOCKERS_QUERY,
        {"tables": list(blocked.tables or []) or None, "modes": CONFLICTS[blocked.mode]},
    ).fetchone()
    if row:
        pid, application, state, mode, granted, table, seconds = row
        holds = "holds" if granted else "waits for"
        who = f"{session_words(pid, application, state, seconds)} {holds} {lock_name(mode)} on {table}"
    else:
        who = "the session that held it has just let go"
    return (
        f"{tables} stayed locked for the whole --lock-timeout of {budget.seconds:g} s"
        f" ({budget.attempts + 1} attempts of {LOCK_ATTEMPT * 1000:g} ms for {lock_name(blocked.mode)}):"
        f" {who}; {state_words()}: rerun when it ends, or raise --lock-timeout"
    )


def migration_lock_holder():
    row = database.execute_sql(MIGRATION_LOCK_HOLDER_QUERY).fetchone()
    return session_words(*row) if row else "a session that has just let go"


def oldest_transaction():
    row = database.execute_sql(OLDEST_TRANSACTION_QUERY).fetchone()
    return session_words(*row) if row else "none is open now"


def state_words():
    """What an interrupted or failed run leaves behind, and what the next run does."""
    if progress["stage"] == "online":
        committed = "the transaction was committed; " if progress["committed"] else ""
        return (
            f"{committed}an index left INVALID is dropped and rebuilt, and a NOT VALID"
            " foreign key validated, by the next run"
        )
    if progress["committed"]:
        return "the transaction was committed; the next run does what is left"
    return "nothing was changed"


# --- The stages -------------------------------------------------------------------------


def migrate(atomic=False, lock_timeout=5.0, statement_timeout=0.0, models=MODELS):
    """Read, plan and apply; returns the last plan and the statements executed (none when up to date)."""
    progress.update(stage="read", committed=False)
    budget = Budget(lock_timeout)

    def read_plan():
        return plan_with_retries(atomic, budget, models)

    plan = read_plan()
    if not plan.pending:
        return plan, []
    holder, plan = take_migration_lock(budget, read_plan, plan)
    if holder is None:  # another run did the work while we waited
        return plan, []
    try:
        # Made again inside the transaction: another run may have done part of it.
        # Its online part still holds after the commit.
        plan, done = run_transaction(atomic, statement_timeout, budget, models)
        done += run_online(plan, lock_timeout, statement_timeout)
    finally:
        holder.close()  # ends its transaction: the migration lock is released
    return plan, done


def plan_with_retries(atomic, budget, models=MODELS):
    """Stage 1: the catalog read and the plan, retried while a table lock keeps it waiting."""
    return with_lock_retries(lambda: plan_changes(read_catalog(models), atomic, models), budget)


def take_migration_lock(budget, read_plan, plan):
    """(side connection holding the migration lock, plan); (None, plan) once, while
    waiting, another run has done the work."""
    holder = open_side_connection()
    announced = False
    while True:
        with holder.cursor() as cursor:
            # One round trip, so a role's idle_in_transaction_session_timeout cannot end it first.
            cursor.execute(
                # READ COMMITTED whatever the default: a repeatable-read transaction keeps a
                # snapshot, and our own CREATE INDEX CONCURRENTLY would wait for it.
                "BEGIN ISOLATION LEVEL READ COMMITTED;"
                " SET LOCAL idle_in_transaction_session_timeout = 0;"
                f" SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY})"
            )
            if cursor.fetchone()[0]:
                return holder, plan
            cursor.execute("ROLLBACK")
        holder_words = migration_lock_holder()
        if not announced:
            log.info("waiting for the migration lock, held by %s", holder_words)
            announced = True
        if budget.spent():
            holder.close()
            raise MigrationError(
                f"another migrate.py run held the migration lock for the whole --lock-timeout of"
                f" {budget.seconds:g} s: {holder_words}; nothing was changed: rerun when it"
                " ends, or raise --lock-timeout"
            )
        budget.back_off()
        plan = read_plan()
        if not plan.pending:
            holder.close()
            return None, plan


def run_transaction(atomic, statement_timeout, budget, models):
    """Stage 3: the catalog read again, the plan made again, its transaction part applied,
    all or nothing. Returns that plan and the statements executed."""
    progress["stage"] = "transaction"
    guard = statement_timeout if atomic else TRANSACTION_GUARD

    def attempt():
        with transaction(transaction_settings(guard)):
            plan = plan_changes(read_catalog(models), atomic, models)
            for statement in plan.transaction:
                execute_statement(statement)
        return plan

    plan = with_lock_retries(attempt, budget)
    progress["committed"] = bool(plan.transaction)
    for statement in plan.transaction:
        log.info(statement.description)
    return plan, list(plan.transaction)


def transaction_settings(statement_timeout):
    return [
        f"SET LOCAL lock_timeout = '{milliseconds(LOCK_ATTEMPT)}ms'",
        f"SET LOCAL statement_timeout = '{milliseconds(statement_timeout)}ms'",
        f"SET LOCAL idle_in_transaction_session_timeout = '{milliseconds(TRANSACTION_GUARD)}ms'",
    ]


@contextmanager
def transaction(settings):
    """BEGIN with settings in one round trip ... COMMIT, or ROLLBACK on any exception.

    Not Peewee's atomic(): it sends BEGIN alone (a role's
    idle_in_transaction_session_timeout can end the session before the
    settings arrive), and its ROLLBACK on a lost connection raises over the
    error that explains it.
    """
    database.execute_sql("; ".join(["BEGIN", *settings]))
    try:
        yield
    except BaseException:
        try:
            database.execute_sql("ROLLBACK")
        except peewee.PeeweeException:
            pass  # the session is gone, and its transaction with it
        raise
    try:
        database.execute_sql("COMMIT")
    except BaseException:
        # A signal can arrive while COMMIT is on its way: say whether it took effect.
        status = database.connection().get_transaction_status()
        progress["committed"] = status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        raise


def execute_statement(statement):
    try:
        database.execute_sql(statement.sql)
    except peewee.DatabaseError as exc:
        if pgcode(exc) in RETRYABLE:
            raise Blocked(statement.tables, statement.hazard.lock) from None
        raise


def run_online(plan, lock_timeout, statement_timeout):
    """Stage 4: statements that block no writer, each on its own, on one server backend."""
    if not plan.online:
        return []
    progress["stage"] = "online"
    done, statement = [], None
    try:
        backend = start_online_session(plan.snapshot.backend_pid, lock_timeout, statement_timeout)
        for statement in plan.online:
            log.info("%s: started (%s)", ongoing(statement), statement.hazard.work)
            database.execute_sql(statement.sql)
            done.append(statement)
            check_same_backend(backend)
            log.info(statement.description)
        database.execute_sql("RESET lock_timeout; RESET statement_timeout")
    except peewee.DatabaseError as exc:
        raise MigrationError(
            online_failure(exc, statement, lock_timeout, statement_timeout)
        ) from None
    return done


def start_online_session(backend, lock_timeout, statement_timeout):
    """Set the online timeouts on `backend`, the one the catalog was read on; returns it.

    set_config only runs on that backend, so a pooler that switched backends
    gets no setting it would hand to another client.
    """
    row = database.execute_sql(
        "SELECT pg_backend_pid(), CASE WHEN pg_backend_pid() = %s THEN"
        " set_config('lock_timeout', %s, false) || set_config('statement_timeout', %s, false) END",
        (backend, f"{milliseconds(lock_timeout)}ms", f"{milliseconds(statement_timeout)}ms"),
    ).fetchone()
    check_same_backend(backend, row[0])
    return backend


def check_same_backend(backend, now=None):
    if now is None:
        now = database.execute_sql("SELECT pg_backend_pid()").fetchone()[0]
    if now != backend:
        raise MigrationError(
            f"consecutive statements ran on different server backends (pid {backend}, then {now}):"
            " DATABASE_URL goes through a transaction pooler (pgbouncer pool_mode=transaction?),"
            " and the online stage needs one session: point DATABASE_URL at the server or a"
            f" session-mode pool, or run with --atomic; {state_words()}"
        )


def online_failure(exc, statement, lock_timeout, statement_timeout):
    """One line for a statement of the online stage that failed."""
    code = pgcode(exc)
    if statement is None:
        return f"the online stage could not start ({first_line(exc)}); {state_words()}"
    what = ongoing(statement)
    if code == LOCK_NOT_AVAILABLE:
        return (
            f"{what} waited more than the --lock-timeout of {lock_timeout:g} s for a lock or an"
            f" older transaction (the oldest open: {oldest_transaction()}); {state_words()}:"
            " rerun when it ends, or raise --lock-timeout"
        )
    if code == QUERY_CANCELED and statement_timeout:
        return (
            f"{what} ran longer than the --statement-timeout of {statement_timeout:g} s"
            f" (statement_timeout); {state_words()}: raise --statement-timeout, or 0 for no limit"
        )
    return f"{what} failed ({first_line(exc)}); {state_words()}"


def within(budget_seconds):
    return f"for up to {budget_seconds:g} s" if budget_seconds else "with no time limit"


def ongoing(statement):
    """'created index x' -> 'building index x', for lines about a statement still running."""
    verbs = {"created": "building", "rebuilt": "rebuilding", "validated": "validating"}
    verb, rest = statement.description.split(" ", 1)
    return f"{verbs.get(verb, verb.replace('dropped', 'dropping'))} {rest}"


def first_line(exc):
    original = getattr(exc, "orig", exc)
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__


# --- What a run sends, for --dry-run ----------------------------------------------------


def script(plan, atomic, lock_timeout, statement_timeout):
    """Every statement a run sends for this plan, in order, with its hazard, for a reviewer."""
    lines = [
        f"-- migration lock: on a second connection, held until the run ends (polled {within(lock_timeout)}):",
        "--   BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL idle_in_transaction_session_timeout = 0;",
        f"--   SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY});",
    ]
    if plan.transaction:
        guard = statement_timeout if atomic else TRANSACTION_GUARD
        lines += [
            (
                f"-- each lock waited for {milliseconds(LOCK_ATTEMPT)} ms at most, then the"
                f" transaction is retried, {within(lock_timeout)}"
            ),
            "BEGIN;",
            *(setting + ";" for setting in transaction_settings(guard)),
            *with_hazards(plan.transaction, plan.snapshot.rows),
            "COMMIT;",
        ]
    if plan.online:
        lines += [
            "-- session settings, sent with set_config() on the backend the catalog was read on:",
            f"SET lock_timeout = '{milliseconds(lock_timeout)}ms';",
            f"SET statement_timeout = '{milliseconds(statement_timeout)}ms';",
            *with_hazards(plan.online, plan.snapshot.rows),
            "RESET lock_timeout;",
            "RESET statement_timeout;",
        ]
    return lines
