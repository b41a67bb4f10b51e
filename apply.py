"""
Run a plan on a live database in named stages, never building a lock queue.

Usage::

    from apply import migrate

    plan, done = migrate(target)                      # online: writers never wait long
    plan, done = migrate(target, atomic=True)         # everything in one transaction
    plan, done = migrate(target, lock_timeout=5, statement_timeout=600)

The stages, and what each may wait for:

1. read: the catalog and the plan, in autocommit. The one locking catalog
   query waits at most LOCK_ATTEMPT for a table lock, then backs off and
   retries. Nothing to add ends the run here: no lock taken, no DDL sent.
   A plan that is blocked (plan.blocked) ends it too, with exit 2.
2. migration lock: pg_try_advisory_xact_lock in a transaction of its own on
   a second connection, kept open until the run ends (so it is released
   whatever happens to this process, and works through a transaction
   pooler). Busy: back off and read the plan again, since the holder may be
   doing our work; give up when the --lock-timeout budget is spent, naming it.
3. transaction: BEGIN, lock_timeout LOCK_ATTEMPT, a statement_timeout guard,
   read the catalog again, plan, execute, read the catalog once more and
   check that every statement made what the models give (plan.unmet), COMMIT.
   A lock not granted within LOCK_ATTEMPT rolls the attempt back; it is
   retried after a jittered back-off until the budget is spent. So the
   application's sessions queue behind a waiting ALTER for LOCK_ATTEMPT at
   most. With --atomic the scans (index builds, foreign key checks) run
   first and the ACCESS EXCLUSIVE statements last, so that lock is held for
   milliseconds before COMMIT.
4. online: each statement on its own, with lock_timeout = the budget and
   statement_timeout = --statement-timeout (default no limit), each checked
   in the catalog before it is logged. They use session settings, so
   consecutive statements must reach one server backend: a transaction
   pooler is detected and refused.

Every setting of a role, a database or PGOPTIONS that could end or bound our
sessions is pinned for our own statements: lock_timeout, statement_timeout,
idle_in_transaction_session_timeout, transaction_timeout (17+) here;
idle_session_timeout and the client encoding in connection.configure_session;
search_path (the target schema), quote_all_identifiers and TimeZone in
catalog.guarded.

A statement that runs longer than a few seconds is watched (`watch_queries`):
a third connection reads its progress from pg_stat_progress_create_index and
pg_stat_activity, logs it every --progress seconds, and ends the run when the
server stops answering.

Every failure raises MigrationError with one line that names what blocked
(pid, application_name, how long its transaction has been open) and says in
which state the database was left, read from the catalog.
"""

import logging
import random
import time
from contextlib import contextmanager

import peewee
import psycopg2.extensions

from catalog import (
    LOCK_ATTEMPT,
    guard_params,
    guard_sql,
    has_transaction_timeout,
    milliseconds,
    one_line,
    read_catalog,
    read_only_words,
    shown,
    shown_name,
)
from connection import (
    MigrationError,
    ServerSilent,
    acting_on_signals,
    configure_session,
    open_side_connection,
    pause,
    watch,
)
from deploy import before_rollout
from models import MODELS, database
from moving import CATCH_UP_TAIL, CHANGED_MEANWHILE
from partition import (
    BATCH_ROWS,
    CHECKED_AFTER_COMMIT,
    MOVING_STEPS,
    REMADE_STEPS,
    clock,
    not_ready_to_swap,
    resume_words,
    retention_plan,
    with_partitions,
)
from plan import (
    STEP_KINDS,
    lock_name,
    plan_changes,
    search_path_line,
    size_words,
    unmet,
    with_hazards,
)

# The advisory lock key the application must not use for a lock of its own.
MIGRATION_LOCK_KEY = 7_283_145_019_226_431
# statement_timeout of the transaction stage when it holds only instant
# statements (the online mode): a guard against a surprise holding
# ACCESS EXCLUSIVE while it rewrites or scans.
TRANSACTION_GUARD = 10.0  # seconds
LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED, QUERY_CANCELED = "55P03", "40P01", "57014"
RETRYABLE = (LOCK_NOT_AVAILABLE, DEADLOCK_DETECTED)
# Errors that reject a statement before it does anything: the next run meets them again.
REJECTIONS = {
    "42501": "permission denied",
    "25006": "the transaction is read-only",
    "P0001": "an event trigger or function raised an error",
    "0A000": "the server does not support it",
    "2BP01": "objects depend on it",
    # A move's copy enforces each CHECK of request_logs, a NOT VALID one too (LIKE makes it
    # valid): a row of the default partition that breaks it stops every copy until it is fixed.
    "23514": "a row breaks a CHECK constraint (fix the row, or drop or VALIDATE the constraint)",
}
# A watched statement: the probe looks every PROBE_EVERY seconds and gives the
# server PROBE_LIMIT seconds to answer it.
PROBE_EVERY, PROBE_LIMIT = 5.0, 10.0

log = logging.getLogger("migrate")

# What the run has done so far, for the line an interruption prints.
progress = {"stage": "read", "committed": False, "left": None, "deferred": []}
# --archive DIR (an archive.Archive) for this run; None: rows are removed without a copy.
archiving = {"archive": None}


def archive_first(statement, target, budget=None):
    """Before a statement that removes rows for good (Statement.removes), with --archive:
    those rows written to DIR and verified, or an error before the statement runs. The
    archive's seconds are work, not waiting: they are given back to `budget`, else a month
    that takes longer than --lock-timeout to archive would leave its DROP one lock attempt."""
    if archiving["archive"] is not None and statement.removes:
        started = time.monotonic()
        for relation, cutoff in statement.removes:
            archiving["archive"].save(target, relation, cutoff)
        if budget is not None:
            budget.deadline += time.monotonic() - started


# --- The budget for waiting --------------------------------------------------------


class Budget:
    """The --lock-timeout budget shared by every wait of a run; 0 means no limit."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.attempts = 0

    def renew(self):
        """A new budget for the waits to come: the minutes a copy works are not waits."""
        self.deadline = time.monotonic() + self.seconds
        self.attempts = 0

    def spent(self):
        return self.seconds > 0 and time.monotonic() >= self.deadline

    def back_off(self):
        """Sleep 0.05 s, 0.1 s, ... up to 1 s, jittered so that parallel runs spread out."""
        self.attempts += 1
        seconds = min(1.0, 0.05 * 2 ** min(self.attempts, 5)) * random.uniform(0.5, 1.5)
        if self.seconds > 0:
            seconds = min(seconds, max(0.0, self.deadline - time.monotonic()))
        pause(seconds)


def pgcode(exc):
    return getattr(getattr(exc, "orig", exc), "pgcode", None)


class Blocked(Exception):
    """A lock of `mode` on `tables` (None: any table) was not granted within LOCK_ATTEMPT."""

    def __init__(self, tables, mode, changed=False):
        super().__init__(tables, mode)
        self.tables, self.mode = tables, mode
        self.changed = changed  # not a lock: the switch found request_logs changed (moving.py)


def with_lock_retries(attempt, budget, target):
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
            raise MigrationError(blocked_message(failure, budget, target)) from None
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
SELECT a.pid, a.application_name, a.state, l.mode, l.granted,
       CASE WHEN c.relnamespace = %(schema)s THEN c.relname ELSE c.oid::regclass::text END,
       extract(epoch FROM now() - coalesce(a.xact_start, a.query_start))
FROM pg_locks l
JOIN pg_class c ON c.oid = l.relation
JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.pid <> pg_backend_pid() AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND (%(tables)s::text[] IS NULL AND c.relnamespace = %(schema)s
       OR c.relnamespace = %(schema)s AND c.relname = ANY(%(tables)s)
       -- a table of another schema (a foreign key's): named as regclass prints it
       OR c.oid::regclass::text = ANY(%(tables)s))
  AND l.mode = ANY(%(modes)s)
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
    application = shown(application) if application else "no application_name"
    return f"pid {pid} ({application}, {shown(state)}, transaction open {seconds or 0:.0f} s)"


def blocked_message(blocked, budget, target):
    if blocked.changed:
        return (
            f"{CHANGED_MEANWHILE}, on its last attempt within the --lock-timeout of"
            f" {budget.seconds:g} s; {state_words()}; the next run makes the copies again"
        )
    tables = ", ".join(blocked.tables) if blocked.tables else "a table"
    row = database.execute_sql(
        BLOCKERS_QUERY,
        {
            "schema": target.oid,
            "tables": list(blocked.tables or []) or None,
            "modes": CONFLICTS[blocked.mode],
        },
    ).fetchone()
    if row:
        pid, application, state, mode, granted, table, seconds = row
        holds = "holds" if granted else "waits for"
        who = f"{session_words(pid, application, state, seconds)} {holds} {lock_name(mode)} on {shown(table)}"
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
    """What a failed or interrupted run leaves behind, as far as the catalog shows it."""
    committed = "the transaction was committed; " if progress["committed"] else ""
    if progress["stage"] not in ("read", "transaction", "online") and progress["left"]:
        # A step: its own words; what the run committed before it is not "the transaction".
        earlier = (
            "what this run committed before this step stays; " if progress["committed"] else ""
        )
        return earlier + progress["left"]
    if progress["stage"] == "online":
        left = progress["left"] or (
            "an index build or foreign key validation cut short leaves an INVALID index or a"
            " NOT VALID foreign key, which the next run rebuilds or validates"
        )
        return committed + left
    if progress["committed"]:
        return "the transaction was committed; the next run does what is left"
    return "nothing was changed"


# --- Watching long statements -----------------------------------------------------------

PROGRESS_QUERY = """
SELECT a.state, a.wait_event_type, a.wait_event, p.phase, p.blocks_done, p.blocks_total,
       p.tuples_done, p.tuples_total, p.lockers_done, p.lockers_total
FROM pg_stat_activity a LEFT JOIN pg_stat_progress_create_index p ON p.pid = a.pid
WHERE a.pid = %s
"""
watched = {"statement": None, "every": 10.0, "logged": 0.0, "probe": None}


def watch_queries(progress_every):
    """Watch every wait of this run longer than PROBE_EVERY: a probe on a connection of its
    own checks that the server still runs our statement, and every `progress_every` seconds
    (0: never) logs how far a statement of a stage has got."""
    watched.update(every=progress_every, probe=None)
    watch.probe = probe
    watch.probe_every = min(PROBE_EVERY, progress_every) if progress_every else PROBE_EVERY


def stop_watching():
    watch.probe = None
    connection = watched["probe"]
    watched["probe"] = None
    if connection is not None and not connection.closed:
        connection.close()


def probe(connection, elapsed):
    """One look at the session behind `connection`, from the probe's own connection."""
    if watched["probe"] is None or watched["probe"].closed:
        try:
            watched["probe"] = open_side_connection()
        except MigrationError as exc:
            if not getattr(exc, "unreachable", True):
                raise  # refused by a server that answered: CONNECTION LIMIT, not silence
            raise ServerSilent(
                f"the server did not answer while a statement ran ({elapsed:.0f} s): a new"
                " connection to watch it got no answer"
            ) from None
    limit, watch.silence_limit = watch.silence_limit, PROBE_LIMIT
    try:
        with watched["probe"].cursor() as cursor:
            cursor.execute(PROGRESS_QUERY, (connection.info.backend_pid,))
            row = cursor.fetchone()
    finally:
        watch.silence_limit = limit
    if row is None:
        raise ServerSilent(
            f"the server no longer runs our session (pid {connection.info.backend_pid}),"
            " yet the connection did not say so"
        )
    statement = watched["statement"]
    if statement and watched["every"] and elapsed - watched["logged"] >= watched["every"]:
        watched["logged"] = elapsed
        log.info("%s: %s", ongoing(statement), progress_words(row, elapsed, statement))


def progress_words(row, elapsed, statement):
    """'building index: scanning table, 1,234 of 5,678 blocks (21%), 30 s'; where PostgreSQL
    has no progress view (a foreign key's validation), the rows it has to read."""
    _state, wait_type, wait_event, phase, *counts = row
    words = []
    if not phase and watched.get("tables"):
        words += [size_words(table, watched["tables"]) for table in statement.tables]
    if phase:
        words.append(shown(phase))
        for done, total, unit in zip(
            counts[::2], counts[1::2], ("blocks", "tuples", "transactions")
        ):
            if total:
                words.append(f"{done:,} of {total:,} {unit} ({100 * done // total}%)")
                break
    if wait_type:
        words.append(f"waiting ({shown(wait_type)}: {shown(wait_event)})")
    words.append(f"{elapsed:.0f} s")
    return ", ".join(words)


@contextmanager
def watching(statement, tables=None):
    watched.update(statement=statement, logged=0.0, tables=tables)
    try:
        yield
    finally:
        watched["statement"] = None


# --- The stages -------------------------------------------------------------------------


class Planner:
    """The plan of a run, from a catalog snapshot: the models' changes, then the partition
    layout's steps (partition.py), then retention's steps; with `pre_deploy`, only what the
    application needs to run correctly (deploy.py), the rest in `deferred`. `now` is fixed
    for the run, so that each plan made again agrees on the months."""

    def __init__(
        self,
        atomic=False,
        models=MODELS,
        partition=False,
        retain_days=None,
        now=None,
        pre_deploy=False,
    ):
        self.atomic, self.models, self.partition, self.retain_days = (
            atomic,
            models,
            partition,
            retain_days,
        )
        self.now = now or clock()
        self.pre_deploy, self.deferred = pre_deploy, []

    def __call__(self, snapshot):
        plan = plan_changes(snapshot, self.atomic, self.models)
        plan = with_partitions(plan, self.partition, self.now)
        if self.pre_deploy:
            plan, self.deferred = before_rollout(plan, self.models)
        if self.retain_days is not None:
            # And the upkeep of a plain run: cron runs one line, and retention alone once left
            # this month's partition unmade. Removal first: the months it drops are never the
            # ones upkeep makes, and a default partition upkeep attaches would turn its
            # DETACH ... CONCURRENTLY into a plain one.
            removal = retention_plan(plan, self.retain_days, self.now)
            plan = plan._replace(steps=[*removal.steps, *plan.steps])
        return plan

    def read(self, target):
        return self(read_catalog(target, self.models))


def migrate(
    target,
    atomic=False,
    lock_timeout=5.0,
    statement_timeout=0.0,
    models=MODELS,
    archive=None,
    **layout,
):
    """Read, plan and apply; returns the last plan and the statements executed (none when up
    to date). `layout`: partition=True (--partition-request-logs), retain_days=N, now=;
    `archive`: an archive.Archive that rows are written to before they are removed."""
    progress.update(stage="read", committed=False, left=None, deferred=[])
    archiving["archive"] = archive
    budget = Budget(lock_timeout)
    planner = Planner(atomic, models, **layout)

    def read_plan():
        return plan_with_retries(target, planner, budget)

    plan = read_plan()
    refuse_blocked(plan)
    progress["deferred"] = planner.deferred
    if not plan.pending:
        return plan, []
    holder, plan = take_migration_lock(budget, read_plan, plan)
    if holder is None:  # another run did the work while we waited
        progress["deferred"] = planner.deferred
        return plan, []
    try:
        # Made again inside the transaction: another run may have done part of it.
        # Its online part still holds after the commit.
        plan, done = run_transaction(target, planner, statement_timeout, budget)
        online, after = run_online(
            plan.online, plan, target, planner, lock_timeout, statement_timeout, budget
        )
        steps, after = run_steps(
            after or plan, target, planner, lock_timeout, statement_timeout, budget
        )
        done += online + steps
    finally:
        holder.close()  # ends its transaction: the migration lock is released
        progress["deferred"] = planner.deferred
    return after or plan, done


def refuse_blocked(plan):
    if plan.blocked:
        more = f" (and {len(plan.blocked) - 1} more)" if len(plan.blocked) > 1 else ""
        raise MigrationError(
            f"{plan.blocked[0].reason}{more}; nothing was changed: python migrate.py --dry-run"
            " lists the SQL for it and everything else pending"
        )


def plan_with_retries(target, planner, budget):
    """Stage 1: the catalog read and the plan, retried while a table lock keeps it waiting."""
    return with_lock_retries(lambda: planner.read(target), budget, target)


def lock_holder_sql():
    """The migration lock's transaction, in one round trip so that no role timeout can end
    it before its settings arrive."""
    timeout = " SET LOCAL transaction_timeout = 0;" if has_transaction_timeout() else ""
    return (
        # READ COMMITTED whatever the default: a repeatable-read transaction keeps a
        # snapshot, and our own CREATE INDEX CONCURRENTLY would wait for it.
        "BEGIN ISOLATION LEVEL READ COMMITTED;"
        " SET LOCAL idle_in_transaction_session_timeout = 0;"
        f"{timeout} SET LOCAL statement_timeout = '{milliseconds(TRANSACTION_GUARD)}ms';"
        f" SELECT pg_try_advisory_xact_lock({MIGRATION_LOCK_KEY})"
    )


def take_migration_lock(budget, read_plan, plan):
    """(side connection holding the migration lock, plan); (None, plan) once, while
    waiting, another run has done the work."""
    holder = open_side_connection()
    announced = False
    while True:
        with holder.cursor() as cursor:
            cursor.execute(lock_holder_sql())
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
        refuse_blocked(plan)
        if not plan.pending:
            holder.close()
            return None, plan


def in_lock_order(statements):
    """The transaction's statements with those taking ACCESS EXCLUSIVE last (and what needs
    their effect after them), each group in its order: a scan of one table (an index build,
    a foreign key check) then never runs while reads of another wait behind an ACCESS
    EXCLUSIVE taken before it, held until COMMIT."""
    exclusive = [s for s in statements if s.hazard.lock == "AccessExclusiveLock"]
    effects = {s.effect for s in exclusive}
    after = [s for s in statements if s not in exclusive and effects & set(s.needs)]
    return [s for s in statements if s not in exclusive and s not in after] + exclusive + after


def run_transaction(target, planner, statement_timeout, budget, step=None):
    """Stage 3 (or a step of kind "transaction"): the catalog read again, the plan made again,
    its statements applied and checked in the catalog, all or nothing. Returns that plan and
    the statements executed."""
    progress["stage"] = step or "transaction"
    guard = statement_timeout if planner.atomic and step is None else TRANSACTION_GUARD

    def pick(plan):
        if step is None:
            return in_lock_order(plan.transaction)
        at = next((i for i, s in enumerate(plan.steps) if s.name == step), None)
        if at is None:
            return []
        # A copy that went stale since the step was planned (a DBA's CREATE INDEX while the
        # switch waited for its lock): ATTACH would build what it lacks under the switch's
        # ACCESS EXCLUSIVE on request_logs. Nothing now; run_steps makes the copy again.
        if step.startswith("switch ") and any(
            s.name.startswith(REMADE_STEPS) for s in plan.steps[:at]
        ):
            return []
        return plan.steps[at].statements

    def attempt():
        with transaction(target, guard):
            plan = planner.read(target)
            refuse_blocked(plan)
            reason = (
                not_ready_to_swap(plan)
                if step and step.startswith("swap ") and pick(plan)
                else None
            )
            if reason:
                raise MigrationError(f"{step}: not now, {reason}; {state_words()}")
            statements = pick(plan)
            # The locks are taken from the first statement on: the plan made above holds none
            # that a writer waits for, so the time logged starts here.
            transaction_ms["from"] = time.perf_counter()
            for statement in statements:
                archive_first(statement, target, budget)
                execute_statement(statement)
            if statements and not swapping:
                check_effects(statements, planner.read(target))
        return plan, statements

    # The swap, a switch, a drop hold ACCESS EXCLUSIVE on request_logs: their effects are
    # read back right after COMMIT instead of inside it, which would hold that lock for a
    # read of the whole catalog, 15-40 ms and more with the partitions (BENCHMARKS.md,
    # sections 10 and 12). The catalog still decides what is logged.
    swapping = bool(step and step.startswith(CHECKED_AFTER_COMMIT))
    plan, statements = with_lock_retries(attempt, budget, target)
    if swapping and statements:
        check_effects(statements, planner.read(target))
    progress["committed"] = progress["committed"] or bool(statements)
    for statement in statements:
        if statement.description:  # the swap's minor statements say nothing of their own
            log.info(statement.description)
    if step and statements:
        log.info("%s: its transaction held its locks for %.0f ms", step, transaction_ms["last"])
    return plan, list(statements)


def run_steps(plan, target, planner, lock_timeout, statement_timeout, budget):
    """The plan's steps, each planned again from the catalog right before it runs (another
    run, or an earlier step, may have done it). Returns the statements run and the last plan."""
    done, after, ran, again = [], None, set(), False
    names = [step.name for step in plan.steps]
    while names:
        name = names.pop(0)
        fresh = plan_with_retries(target, planner, budget)
        at = next((i for i, s in enumerate(fresh.steps) if s.name == name), None)
        if at is None:
            continue
        if any(s.name in ran and s.name.startswith(REMADE_STEPS) for s in fresh.steps[:at]):
            # A step this run ran is planned again before this one: its work went stale
            # meanwhile (a move's copy lacks the column or index the application or a DBA
            # added since). Run on from there once; a switch now would build under its lock.
            if not again:
                again, names, ran = True, [s.name for s in fresh.steps], set()
            continue
        step = fresh.steps[at]
        ran.add(name)
        progress["left"] = resume_words(name)
        if name.startswith(MOVING_STEPS):
            budget.renew()
        if step.kind == "transaction":
            _, statements = run_transaction(target, planner, statement_timeout, budget, step=name)
            done += statements
        elif step.kind == "online":
            statements, after = run_online(
                step.statements,
                fresh,
                target,
                planner,
                lock_timeout,
                statement_timeout,
                budget,
                name,
            )
            done += statements
        else:
            done += run_batches(
                step, fresh, target, planner, lock_timeout, statement_timeout, budget
            )
    if done:
        after = plan_with_retries(target, planner, budget)
    return done, after


def run_batches(step, plan, target, planner, lock_timeout, statement_timeout, budget):
    """A "batched" step: its statement repeated, each time its own transaction, until it
    changes no row; a line every --progress seconds with the rows so far."""
    progress["stage"] = step.name
    backend = start_online_session(
        plan.snapshot.backend_pid, target, lock_timeout, statement_timeout
    )
    done = []
    for statement in step.statements:
        started = last = time.monotonic()
        total = 0
        log.info("%s: started (%s)", ongoing(statement), statement.hazard.work)
        # With --archive, only the rows archived, as they were archived (archive.deletions).
        archived = (
            archiving["archive"].deletions(target, *statement.removes[0], BATCH_ROWS)
            if archiving["archive"] is not None and statement.removes
            else None
        )
        while True:
            sql, params = (statement.sql, None) if archived is None else next(archived, (None, 0))
            if sql is None:
                break
            with watching(statement):
                rows = database.execute_sql(sql, params).rowcount
            check_same_backend(backend)
            total += rows
            now = time.monotonic()
            if watched["every"] and now - last >= watched["every"]:
                last = now
                log.info(
                    "%s: %s rows so far, %.0f s", ongoing(statement), f"{total:,}", now - started
                )
            # A catch-up stops at a batch that is not full: writers keep logging changes,
            # and the switch replays the last few under its lock.
            if archived is None and (
                rows == 0 or (catching_up(statement) and rows < CATCH_UP_TAIL)
            ):
                break
        reset_online_session()
        if not catching_up(statement):  # what it replays is never "made": nothing to read back
            check_effects([statement], plan_with_retries(target, planner, budget))
        log.info("%s: %s rows", statement.description.rsplit(" (", 1)[0], f"{total:,}")
        done.append(statement)
    return done


def catching_up(statement):
    return statement.effect[0] == "caught up"


def check_effects(statements, after):
    """Raise unless each statement's object is in the catalog `after` was planned from, as
    the models give it: a statement that succeeded without effect (IF NOT EXISTS finding
    the name taken) is never reported as done."""
    for statement in statements:
        reason = unmet(statement, after)
        if reason:
            raise MigrationError(f"{ongoing(statement)} had no effect: {reason}; {state_words()}")


def transaction_settings(target, statement_timeout):
    """The SET LOCALs of the transaction stage, as --dry-run prints them."""
    settings = [
        f"SET LOCAL lock_timeout = '{milliseconds(LOCK_ATTEMPT)}ms'",
        f"SET LOCAL statement_timeout = '{milliseconds(statement_timeout)}ms'",
        f"SET LOCAL idle_in_transaction_session_timeout = '{milliseconds(TRANSACTION_GUARD)}ms'",
        search_path_line(target).removesuffix(";").replace("SET ", "SET LOCAL ", 1),
        # The catalog is read again inside the transaction: its spelling must not change.
        "SET LOCAL quote_all_identifiers = off",
        "SET LOCAL TimeZone = 'UTC'",
    ]
    if has_transaction_timeout():
        settings.append("SET LOCAL transaction_timeout = 0")
    return settings


# The first statement (after the plan made inside) to COMMIT of the last transaction that
# committed: how long it held its locks.
transaction_ms = {"last": 0.0, "from": 0.0}


@contextmanager
def transaction(target, statement_timeout):
    """BEGIN with the pinned settings in one round trip ... COMMIT, or ROLLBACK on any exception.

    Not Peewee's atomic(): it sends BEGIN alone (a role's
    idle_in_transaction_session_timeout can end the session before the
    settings arrive), and its ROLLBACK on a lost connection raises over the
    error that explains it.
    """
    params = guard_params(target, LOCK_ATTEMPT, statement_timeout)
    params["idle"] = f"{milliseconds(TRANSACTION_GUARD)}ms"
    started = transaction_ms["from"] = time.perf_counter()
    database.execute_sql(
        f"BEGIN; {guard_sql()}, set_config('idle_in_transaction_session_timeout', %(idle)s, true)",
        params,
    )
    try:
        yield
    except BaseException:
        try:
            database.execute_sql("ROLLBACK")
        except (peewee.PeeweeException, psycopg2.Error, ServerSilent):
            pass  # the session is gone, and its transaction with it
        raise
    try:
        database.execute_sql("COMMIT")
        transaction_ms["last"] = (time.perf_counter() - max(started, transaction_ms["from"])) * 1000
    except BaseException:
        # A signal can arrive while COMMIT is on its way: say whether it took effect.
        connection = database.connection()
        status = None if connection.closed else connection.get_transaction_status()
        progress["committed"] = status == psycopg2.extensions.TRANSACTION_STATUS_IDLE
        raise


def execute_statement(statement):
    try:
        with watching(statement):
            database.execute_sql(statement.sql)
    except peewee.DatabaseError as exc:
        if pgcode(exc) in RETRYABLE:
            # The tables it locks besides, in the same mode: the switch's ATTACH waits for a
            # reader of users as much as for one of the copy.
            others = (t for t, mode in statement.hazard.others if mode == statement.hazard.lock)
            changed = getattr(exc, "orig", exc).diag.message_primary == CHANGED_MEANWHILE
            raise Blocked((*statement.tables, *others), statement.hazard.lock, changed) from None
        raise


def run_online(
    statements, plan, target, planner, lock_timeout, statement_timeout, budget, stage="online"
):
    """Stage 4 (or a step of kind "online"): statements that block no writer, each on its own,
    on one server backend, each checked in the catalog. Returns them and the plan read after
    the last."""
    if not statements:
        return [], None
    progress["stage"] = stage
    done, statement, after = [], None, None
    try:
        backend = start_online_session(
            plan.snapshot.backend_pid, target, lock_timeout, statement_timeout
        )
        for statement in statements:
            log.info("%s: started (%s)", ongoing(statement), statement.hazard.work)
            archive_first(statement, target)
            with watching(statement, plan.snapshot.tables):
                rows = database.execute_sql(statement.sql).rowcount
            check_same_backend(backend)
            after = plan_with_retries(target, planner, budget)
            check_effects([statement], after)
            done.append(statement)
            if statement.effect[0] == "copied":  # its last statement is the INSERT
                log.info("%s: %s rows", statement.description, f"{max(rows, 0):,}")
            else:
                log.info(statement.description)
        reset_online_session()
    except (peewee.DatabaseError, psycopg2.Error) as exc:
        if pgcode(exc) is None:  # the connection was lost: say what the catalog shows, then why
            progress["left"] = what_is_left(statement, target, stage) if statement else None
            raise
        raise MigrationError(
            online_failure(exc, statement, target, lock_timeout, statement_timeout)
        ) from None
    except KeyboardInterrupt:
        if statement is not None:
            progress["left"] = what_is_left(statement, target, stage)
        raise
    return done, after


def what_is_left(statement, target, stage):
    """left_behind, and for a step which run carries on."""
    acting_on_signals()
    left = left_behind(statement, target)
    if stage == "online":
        return left
    return f"{left}; {resume_words(stage)}" if left else resume_words(stage)


def reset_online_session():
    database.execute_sql(
        "RESET lock_timeout; RESET statement_timeout; RESET search_path"
        + ("; RESET transaction_timeout" if has_transaction_timeout() else "")
    )


def online_settings(target, lock_timeout, statement_timeout):
    settings = {
        "lock_timeout": f"{milliseconds(lock_timeout)}ms",
        "statement_timeout": f"{milliseconds(statement_timeout)}ms",
    }
    if has_transaction_timeout():
        settings["transaction_timeout"] = "0"
    return settings


def start_online_session(backend, target, lock_timeout, statement_timeout):
    """Set the online settings on `backend`, the one the catalog was read on; returns it.

    set_config only runs on that backend, so a pooler that switched backends
    gets no setting it would hand to another client.
    """
    settings = online_settings(target, lock_timeout, statement_timeout)
    calls = " || ".join(f"set_config('{name}', %({name})s, false)" for name in settings)
    row = database.execute_sql(
        f"SELECT pg_backend_pid(), CASE WHEN pg_backend_pid() = %(backend)s THEN {calls}"
        " || set_config('search_path', quote_ident(%(schema)s) || ', pg_temp', false) END",
        {**settings, "backend": backend, "schema": target.name},
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


def online_failure(exc, statement, target, lock_timeout, statement_timeout):
    """One line for a statement of the online stage that failed, with what it left behind."""
    code = pgcode(exc)
    if statement is None:
        return f"the online stage could not start ({first_line(exc)}); {state_words()}"
    progress["left"] = what_is_left(statement, target, progress["stage"])
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
    if code == "25006":
        return f"{what} was rejected: {read_only_words()}; {state_words()}"
    if code in REJECTIONS:
        return (
            f"{what} was rejected: {REJECTIONS[code]} ({first_line(exc)}); {state_words()};"
            " the next run meets the same refusal until that changes"
        )
    return f"{what} failed ({first_line(exc)}); {state_words()}"


def left_behind(statement, target):
    """What the failed statement left, read from the catalog; None when it cannot be read."""
    kind, table, name = statement.effect
    try:
        if database.connection().closed:  # psycopg2 closes it when a wait ends in an exception
            database.close()
            database.connect()
            configure_session(database.connection())
        snapshot = read_catalog(target, ())
    except (peewee.PeeweeException, psycopg2.Error, ServerSilent, KeyboardInterrupt):
        return None
    if kind == "detached" and name in snapshot.tables and snapshot.tables[name].detach_pending:
        return (
            f"partition {shown_name(name)} was left DETACH PENDING: the next"
            " --retain-request-logs run finishes the detach (FINALIZE) and drops it"
        )
    if kind in ("index", "dropped"):
        live = snapshot.indexes.get(name)
        if live is not None and not live.valid:
            return f"index {name} was left INVALID: the next run drops and rebuilds it"
        return f"index {name} was not left behind"
    constraint = next(
        (c for c in snapshot.constraints if c.name == name and c.table == table), None
    )
    if constraint is not None and not constraint.validated:
        if constraint.kind == "f":
            return f"foreign key {name} stays NOT VALID: the next run validates it"
        return (
            f"CHECK {name} stays NOT VALID: the next run validates it, or names the rows it"
            " refuses and how to undo it"
        )
    return "nothing of it was left"


def within(budget_seconds):
    return f"for up to {budget_seconds:g} s" if budget_seconds else "with no time limit"


def ongoing(statement):
    """'created index x' -> 'building index x', for lines about a statement still running."""
    verbs = {
        "created": "building",
        "rebuilt": "rebuilding",
        "validated": "validating",
        "added": "adding",
        "commented": "commenting",
        "dropped": "dropping",
        "deleted": "deleting",
        "detached": "detaching",
        "attached": "attaching",
        "bounded": "bounding",
        "converted": "converting",
        "moved": "moving",
        "copied": "copying",
        "caught": "catching",
        "marked": "marking",
    }
    if " " not in statement.description:  # a minor statement of a step, which says nothing
        return statement.sql.split(" (", 1)[0][:80]
    verb, rest = statement.description.split(" ", 1)
    return f"{verbs.get(verb, verb)} {rest}"


# The same, for a plan not run yet (--dry-run, --check, JSON): never the past tense.
PLANNED_VERBS = {
    "created": "creates",
    "rebuilt": "rebuilds",
    "validated": "validates",
    "added": "adds",
    "commented": "comments on",
    "dropped": "drops",
    "deleted": "deletes",
    "detached": "detaches",
    "attached": "attaches",
    "bounded": "bounds",
    "converted": "converts",
    "moved": "moves",
}


def planned(statement):
    """'created index x' -> 'creates index x'; '' for a statement that says nothing."""
    if not statement.description:
        return ""
    verb, _, rest = statement.description.partition(" ")
    return f"{PLANNED_VERBS.get(verb, verb)} {rest}"


def first_line(exc):
    original = getattr(exc, "orig", exc)
    text = str(original).strip()
    return shown(text.splitlines()[0]) if text else type(original).__name__


# --- What a run sends, for --dry-run ----------------------------------------------------


def script(plan, atomic, lock_timeout, statement_timeout):
    """Every statement a run sends for this plan, in order, with its hazard, for a reviewer."""
    target, tables = plan.snapshot.target, plan.snapshot.tables
    lines = [
        f"-- migration lock: on a second connection, held until the run ends (polled {within(lock_timeout)}):",
        *("--   " + part.strip() + ";" for part in lock_holder_sql().split(";")),
    ]
    if plan.transaction:
        guard = statement_timeout if atomic else TRANSACTION_GUARD
        lines += [
            (
                f"-- each lock waited for {milliseconds(LOCK_ATTEMPT)} ms at most, then the"
                f" transaction is retried, {within(lock_timeout)}; every lock taken is held"
                " until COMMIT, ACCESS EXCLUSIVE ones taken last"
            ),
            "BEGIN;",
            *(setting + ";" for setting in transaction_settings(target, guard)),
            *with_hazards(in_lock_order(plan.transaction), tables, until_commit=True),
            "COMMIT;",
        ]
    if plan.online:
        settings = online_settings(target, lock_timeout, statement_timeout)
        lines += [
            "-- session settings, sent with set_config() on the backend the catalog was read on:",
            *(f"SET {name} = '{value}';" for name, value in settings.items()),
            search_path_line(target),
            *with_hazards(plan.online, tables),
            *(f"RESET {name};" for name in [*settings, "search_path"]),
        ]
    for step in plan.steps:
        lines.append(f"-- then: {step.name} ({STEP_KINDS[step.kind]}):")
        if step.kind == "transaction":
            lines += [
                "BEGIN;",
                *(s + ";" for s in transaction_settings(target, TRANSACTION_GUARD)),
                *with_hazards(step.statements, tables, until_commit=True),
                "COMMIT;",
            ]
        else:
            settings = online_settings(target, lock_timeout, statement_timeout)
            lines += [
                *(f"SET {name} = '{value}';" for name, value in settings.items()),
                search_path_line(target),
            ]
            for statement in step.statements:
                if step.kind == "batched":  # with the count of the rows it removes
                    lines.append(f"-- {planned(statement)}")
                lines += with_hazards([statement], tables)
            lines += [f"RESET {name};" for name in [*settings, "search_path"]]
    return [one_line(line) for line in lines]
