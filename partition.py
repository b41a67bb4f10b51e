"""
request_logs by month: the partitioned layout, its online conversion, upkeep and retention.

Usage::

    from partition import retention_plan, with_partitions

    plan = with_partitions(plan_changes(snapshot), convert=True)   # conversion or upkeep steps
    plan = retention_plan(plan_changes(snapshot), days=90)          # what --retain-request-logs 90 removes

Each returns the plan with steps (plan.Step) that apply.py runs after the online stage,
each statement with its hazard and the effect the next plan is asked about, so that
--dry-run, --check and --format json show them like every other statement.

The layout: request_logs partitioned by RANGE (created_at) into request_logs_YYYY_MM, one a
calendar month in UTC, [YYYY-MM-01 00:00+00, next month) whatever the server's or session's
time zone; request_logs_default takes what no month holds (a NULL created_at, a date past the
partitions made). No primary key on the parent (it would have to include created_at, and the
Go backend's AutoMigrate then fails to DROP NOT NULL on it): idx_request_logs_id stands in for
lookups by id. Every plain run keeps this month's and the next month's partitions there.

The conversion of a plain request_logs keeps its rows where they are: the table becomes the
partition request_logs_legacy, FROM (MINVALUE) TO (the first month it does not hold).

1. transaction: CHECK (created_at IS NOT NULL AND created_at < boundary) NOT VALID, instant
   under ACCESS EXCLUSIVE (until it is valid, an insert with a NULL or later created_at fails).
2. online: VALIDATE the CHECK (SHARE UPDATE EXCLUSIVE: blocks no writer), and the index on id
   built concurrently.
3. transaction, the swap: the partitioned twin with its default and monthly partitions,
   indexes and foreign keys, and what carry.py carries (all empty: instant); the renames; ATTACH PARTITION, which the
   valid CHECK spares its scan and which adopts the table's indexes and foreign keys as they
   are. No statement scans, so its length does not grow with the rows (BENCHMARKS.md).

Each step is planned again from the catalog, so an interrupted conversion is finished by the
next run with the flag (kill -9 leaves the table as it was before a step or after it).
"""

import re
from datetime import UTC, datetime, timedelta

from peewee import Entity, Value

import moving
from carry import Cannot, conversion_carry, made_like, partition_drift
from catalog import guarded, shown, shown_name
from models import RequestLog, database
from moving import Work, literal
from plan import (
    Blocker,
    Drift,
    Hazard,
    Statement,
    Step,
    build_index_on_only,
    build_partition_indexes,
    index_sql,
    plural,
    render,
    sql_text,
)

PARENT = RequestLog._meta.table_name
DEFAULT_PARTITION = f"{PARENT}_default"
LEGACY = f"{PARENT}_legacy"
TWIN = f"{PARENT}_partitioned"
ID_INDEX = RequestLog.index(RequestLog.id, name=f"idx_{PARENT}_id")
LEGACY_ID_INDEX = f"{LEGACY}_id"
CHECK_PREFIX = f"{PARENT}_before_"  # + YYYY_MM: the boundary the CHECK proves
# Partitions for this month and the three after: a deploy (or cron run) every two to three
# months still finds the month ready before its first row, so rows never land in the default.
MONTHS_AHEAD = 3
BATCH_ROWS = 5_000  # rows a retention DELETE removes per transaction

ADD_CHECK_NOT_VALID = Hazard("AccessExclusiveLock", "reads and writes", "instant, no scan")
VALIDATE_CHECK = Hazard("ShareUpdateExclusiveLock", "nothing", "scans the table")
SWAP = Hazard(
    "AccessExclusiveLock",
    "reads and writes",
    "instant, no scan: renames, and ATTACH spared its scan",
)
ATTACH_MONTH = Hazard(
    "ShareUpdateExclusiveLock",
    "nothing on request_logs; its ACCESS EXCLUSIVE on the default partition blocks NULL-dated"
    " inserts, its SHARE ROW EXCLUSIVE on the tables the foreign keys reference their writes",
    "the new partition is empty; reads the default partition, which upkeep keeps small (its"
    " months moved out first)",
)
DETACH_CONCURRENTLY = Hazard(
    "ShareUpdateExclusiveLock", "nothing", "instant, waits for older transactions"
)
DETACH = Hazard("AccessExclusiveLock", "reads and writes", "instant, no scan")
DROP_DETACHED = Hazard("AccessExclusiveLock", "nothing: the table is detached", "instant")
BATCHED_DELETE = Hazard(
    "RowExclusiveLock", "nothing (rows it deletes are locked)", f"{BATCH_ROWS:,} rows a batch"
)


# --- Months ------------------------------------------------------------------------------

# Month decisions follow the clock of the machine that runs migrate.py, as GORM stamps
# created_at with the application's clock. A test shifts it (CLOCK_SHIFT) to live years in
# minutes: libfaketime breaks time.sleep under Python 3.11.
CLOCK_SHIFT = timedelta(0)


def clock():
    """Now, by the clock every month decision of a run reads."""
    return datetime.now(UTC) + CLOCK_SHIFT


def month_start(moment):
    moment = moment.astimezone(UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def add_months(month, count):
    index = month.year * 12 + month.month - 1 + count
    return month.replace(year=index // 12, month=index % 12 + 1)


def month_name(month):
    return f"{PARENT}_{month:%Y_%m}"


def boundary_after(now):
    """The first month a converted table does not hold: the next, or the one after when the
    next starts within a day (the conversion may take that long; the CHECK must admit now)."""
    month = add_months(month_start(now), 1)
    return add_months(month, 1) if month - now < timedelta(days=1) else month


# --- What the catalog holds --------------------------------------------------------------

BOUND = re.compile(r"FOR VALUES FROM \((.+)\) TO \((.+)\)")


FAR_PAST = datetime.min.replace(tzinfo=UTC)
FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


def bound_value(text):
    """A bound of pg_get_expr(relpartbound): None for MINVALUE/MAXVALUE, else the moment.
    Text, as PostgreSQL offers no structured bound; TimeZone is pinned to UTC for it. An
    operator's 'infinity', or a year Python cannot hold, is the far past or future."""
    if text in ("MINVALUE", "MAXVALUE"):
        return None
    value = text.strip("'")
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return FAR_PAST if value.startswith("-") or value.endswith(" BC") else FAR_FUTURE


def default_partition(snapshot):
    """The name of request_logs' DEFAULT partition, whatever it is called, or None."""
    return next(
        (t.name for t in snapshot.tables.values() if t.parent == PARENT and t.bound == "DEFAULT"),
        None,
    )


def partitions(snapshot):
    """{name: (lower, upper)} of request_logs' range partitions (None: unbounded)."""
    found = {}
    for table in snapshot.tables.values():
        match = BOUND.fullmatch(table.bound or "") if table.parent == PARENT else None
        if match:
            found[table.name] = (bound_value(match.group(1)), bound_value(match.group(2)))
    return found


def overlaps(ranges, month):
    """The partitions that hold part of the month, but not all of it."""
    end = add_months(month, 1)
    return sorted(
        name
        for name, (lower, upper) in ranges.items()
        if (lower is None or lower < end) and (upper is None or upper > month)
    )


def partly_covered_drift(month, names):
    return Drift(
        f"{month:%Y-%m} has no partition of its own: {', '.join(shown_name(n) for n in names)}"
        " of request_logs hold part of it, so runs cannot attach request_logs_"
        f"{month:%Y_%m}; rows of the rest of the month go to {DEFAULT_PARTITION}: make the"
        " partitions cover whole UTC months",
        [],
        False,
        "none",
        ("month partly covered", PARENT, month_name(month)),
    )


def name_held_drift(snapshot, name, bounds):
    """The name upkeep needs for a partition, held by a relation that is not that partition
    (a detached partition, a table of the same name): upkeep cannot make it."""
    holder = snapshot.relations[name]
    where = f" of {shown_name(holder.table)}" if holder.table else ""
    return Drift(
        f"the name {shown_name(name)} upkeep needs for a partition of {PARENT} is held by the"
        f" {holder.kind} {shown_name(name)}{where}, not a partition of {PARENT}: "
        + (
            "attach it (the fix, which scans it under lock and fails if a row does not fit)"
            " or rename it"
            if holder.kind == "table"
            else "rename it"
        ),
        [sql_text("ALTER TABLE", Entity(PARENT), "ATTACH PARTITION", Entity(name)) + " " + bounds]
        if holder.kind == "table"
        else [],
        False,
        f"SHARE UPDATE EXCLUSIVE on {PARENT}, ACCESS EXCLUSIVE on {shown_name(name)} while it"
        " is scanned"
        if holder.kind == "table"
        else "none",
        ("partition name held", PARENT, name),
    )


def covered(ranges, month):
    end = add_months(month, 1)
    return any(
        (lower is None or lower <= month) and (upper is None or upper >= end)
        for lower, upper in ranges.values()
    )


def conversion_check(snapshot):
    """(name, boundary) of the CHECK a conversion put on request_logs, or None."""
    for constraint in snapshot.constraints:
        if constraint.table == PARENT and constraint.kind == "c":
            match = re.fullmatch(re.escape(CHECK_PREFIX) + r"(\d{4})_(\d{2})", constraint.name)
            if match and 1 <= int(match.group(1)) <= 9998 and 1 <= int(match.group(2)) <= 12:
                month = datetime(int(match.group(1)), int(match.group(2)), 1, tzinfo=UTC)
                return constraint, month
    return None


# --- The plan ----------------------------------------------------------------------------


def with_partitions(plan, convert=False, now=None):
    """plan with what the layout needs: on a partitioned request_logs the upkeep and its
    health; with `convert`, the partitioned layout made (fresh) or converted to (plain)."""
    now = now or clock()
    table = plan.snapshot.tables.get(PARENT)
    if table is None:
        return fresh_layout(plan, now) if convert else plan
    if table.kind == "p":
        return upkeep(plan, now)
    if convert:
        return conversion(plan, now)
    return leftover_conversion(plan, now)


def fresh_layout(plan, now):
    """The plain CREATE TABLE request_logs and its indexes, replaced by the partitioned layout."""
    ours = [s for s in plan.transaction if s.effect[1] == PARENT]
    if not ours:
        return plan
    at = plan.transaction.index(ours[0])
    create = ours[0].sql.replace(
        '("id" BIGSERIAL NOT NULL PRIMARY KEY,', '("id" BIGSERIAL NOT NULL,', 1
    )
    statements = [ours[0]._replace(sql=create + ' PARTITION BY RANGE ("created_at")')]
    statements += [s for s in ours[1:]] + [
        Statement(
            index_sql(RequestLog, ID_INDEX),
            f"created index {ID_INDEX._name}",
            (),
            ours[1].hazard,
            ("index", PARENT, ID_INDEX._name),
        )
    ]
    statements += made_like_parent(plan.snapshot, PARENT)
    statements += [partition_of(PARENT, DEFAULT_PARTITION, None, ours[1].hazard)]
    statements += made_like_parent(plan.snapshot, DEFAULT_PARTITION)
    month = month_start(now)
    for offset in range(MONTHS_AHEAD + 1):
        statements.append(
            partition_of(
                PARENT,
                month_name(add_months(month, offset)),
                add_months(month, offset),
                ours[1].hazard,
            )
        )
        statements += made_like_parent(plan.snapshot, month_name(add_months(month, offset)))
    transaction = (
        plan.transaction[:at] + statements + [s for s in plan.transaction[at:] if s not in ours]
    )
    return plan._replace(transaction=transaction)


def made_like_parent(snapshot, name):
    """What PostgreSQL does not pass on to a partition just made (carry.made_like): the
    owner, grants, statistics targets and storage of request_logs, REPLICA IDENTITY FULL, and
    the storage parameters of the newest month (a partitioned table has none of its own)."""
    ranges = [(upper, n) for n, (_, upper) in partitions(snapshot).items() if upper and n != name]
    return made_like(snapshot, PARENT, name, max(ranges)[1] if ranges else None)


def partition_of(parent, name, month, hazard):
    bounds = (
        "DEFAULT"
        if month is None
        else f"FOR VALUES FROM ({literal(month)}) TO ({literal(add_months(month, 1))})"
    )
    return Statement(
        sql_text("CREATE TABLE", Entity(name), "PARTITION OF", Entity(parent)) + " " + bounds,
        f"created partition {name}",
        (),
        hazard,
        ("partition", PARENT, name),
    )


def month_blocked(snapshot, ranges, start):
    """Why upkeep cannot make the partition of the month `start` (partitions covering part
    of it, its name held by another relation), as drift; None when it can."""
    if overlapping := overlaps(ranges, start):
        return partly_covered_drift(start, overlapping)
    name = month_name(start)
    if not moving.name_free(snapshot, "move", name):
        bounds = f"FOR VALUES FROM ({literal(start)}) TO ({literal(add_months(start, 1))})"
        return name_held_drift(snapshot, name, bounds)
    return None


def upkeep(plan, now):
    """Partitions for this month and the MONTHS_AHEAD after, the default partition, the id
    index; the health of the layout as drift. A month whose rows may already be arriving
    (it has begun, by this clock or a skewed one, or the default partition holds some) is
    filled beside the layout and switched in (moving.py): writers are never held while its
    rows move."""
    snapshot = plan.snapshot
    ranges = partitions(snapshot)
    steps, drift = list(plan.steps), list(plan.drift)
    default = default_partition(snapshot)
    if default is None:
        if DEFAULT_PARTITION in snapshot.relations:
            drift.append(name_held_drift(snapshot, DEFAULT_PARTITION, "DEFAULT"))
        else:
            steps.append(
                Step(f"attach {DEFAULT_PARTITION}", "transaction", attach_default(snapshot))
            )
    month = month_start(now)
    moves, later = [], []
    for offset in range(MONTHS_AHEAD + 1):
        start = add_months(month, offset)
        name = month_name(start)
        if covered(ranges, start):
            continue
        if (problem := month_blocked(snapshot, ranges, start)) is not None:
            drift.append(problem)
        elif default is not None and (
            start <= now + CLOCK_SKEW
            or name in moving.ours(snapshot, "move")
            or default_holds(snapshot, default, start, add_months(start, 1))
        ):
            moves.append((name, start, add_months(start, 1)))
        else:
            later += attach_month(snapshot, start)
    # Past months the default partition holds rows of (a month no run made before it began,
    # and none ran during it) are moved too, without holding writers; left there, their rows
    # stayed for good, with a fix that holds every insert while they move.
    for start in past_months_in_default(snapshot, default, month) if default else []:
        name = month_name(start)
        if covered(ranges, start):
            continue
        if (problem := month_blocked(snapshot, ranges, start)) is not None:
            drift.append(problem)
        else:
            moves.insert(0, (name, start, add_months(start, 1)))
    held = [
        name
        for name in (moving.REST, moving.MOVED_OUT)
        if name in snapshot.relations
        and not moving.name_free(snapshot, "move", name)
        and not (name == moving.MOVED_OUT and moving.moved_out(snapshot))
    ]
    if moves and held:
        drift.append(
            Drift(
                f"rows of {', '.join(f'{m[1]:%Y-%m}' for m in moves)} in the default partition"
                f" {shown_name(default)} cannot get their partition: the name"
                f" {shown_name(held[0])} a move needs is held by another relation; rename it",
                [],
                False,
                "none",
                ("move name held", PARENT, held[0]),
            )
        )
        moves = []
    if moving.moved_out(snapshot) and not moves:
        steps += moving.drop_moved_out(snapshot)
    if moves:
        steps += moving.work_steps(snapshot, Work("move", default, moves, None))
    else:
        steps += moving.cleanup_steps(snapshot, "move")
    # After the move: an ATTACH beside a default partition reads all of it, under a lock that
    # holds its inserts, and the move leaves it small. Empty months ahead are made only once
    # this or next month lacks its partition, then all of them: a layout with next month ready
    # is healthy, so that --check exits 0 in a month no deploy ran (a run would do nothing).
    # One step, as a step is planned again before it runs and the first month made would
    # make the rest look not due.
    # "Next month" as of a day from now (CLOCK_SKEW): a run on a month's last day that found
    # the coming month ready made nothing, and an hour later --check found its next missing.
    soon = month_start(now + CLOCK_SKEW)
    if later and not (covered(ranges, month) and covered(ranges, add_months(soon, 1))):
        steps.append(Step("attach the months ahead", "transaction", later))
    transaction, online = list(plan.transaction), list(plan.online)
    if ID_INDEX._name not in snapshot.indexes:
        stage, statement = build_index_on_only(RequestLog, ID_INDEX)
        transaction.append(statement)
    if ID_INDEX._name not in snapshot.indexes or not snapshot.indexes[ID_INDEX._name].valid:
        for stage, statement in build_partition_indexes(RequestLog, ID_INDEX, snapshot, "online"):
            if stage == "attach":
                steps.insert(0, Step("attach partition indexes", "transaction", [statement]))
            else:
                online.append(statement)
    if default is not None:
        drift += dated_rows_in_default(snapshot, default, now)
    drift += partitions_elsewhere(snapshot)
    drift += partition_drift(snapshot, PARENT)
    drift += interrupted_retention(snapshot)
    unknown = [
        u
        for u in plan.unknown
        if (u.kind, u.table, u.name) != ("index", PARENT, ID_INDEX._name)
        and not (u.kind == "table" and u.name in work_tables(snapshot))
    ]
    return plan._replace(
        transaction=transaction,
        online=online,
        steps=merge_attach_steps(steps),
        drift=drift,
        unknown=unknown,
    )


def work_tables(snapshot):
    """The tables of moving.py's unfinished works, and those retention is dropping."""
    return {
        *moving.LOG.values(),
        *moving.ours(snapshot, "move"),
        *moving.ours(snapshot, "keep"),
        *moving.retired(snapshot),
        *([moving.MOVED_OUT] if moving.moved_out(snapshot) else []),
    }


def interrupted_retention(snapshot):
    """A retention run stopped before it finished: what it left, and the run that finishes it."""
    left = []
    if moving.in_progress(snapshot, "keep") or moving.ours(snapshot, "keep"):
        since = moving.kept_from(snapshot)
        source = moving.logged_source(snapshot, "keep")
        left.append(
            f"the copy of the kept rows of {shown_name(source) if source else 'a partition'}"
            " into month partitions"
            + (f" (rows from {since:%Y-%m-%d %H:%M} UTC)" if since else "")
            + (f", whose writes are logged by the trigger {moving.LOG['keep']}" if source else "")
        )
    for name, cutoff in sorted(moving.retired(snapshot).items()):
        left.append(
            f"the detached table {shown_name(name)}, whose rows "
            + (f"before {cutoff:%Y-%m-%d %H:%M} UTC" if cutoff else "")
            + " retention removes"
        )
    if not left:
        return []
    return [
        Drift(
            f"a --retain-request-logs run was stopped before it finished: {'; '.join(left)};"
            " python migrate.py --retain-request-logs DAYS (the days it was given) finishes it",
            [],
            False,
            "none",
            ("retention interrupted", PARENT, PARENT),
        )
    ]


def merge_attach_steps(steps):
    """One step attaches every partition index, whoever planned it."""
    attach = [
        s for step in steps if step.name == "attach partition indexes" for s in step.statements
    ]
    rest = [step for step in steps if step.name != "attach partition indexes"]
    return ([Step("attach partition indexes", "transaction", attach)] if attach else []) + rest


def attach_locks(snapshot, name):
    """ATTACH_MONTH with the other tables it locks: the partition attached, the default
    partition it reads (when there is one and it is another) and the tables the foreign keys
    it clones onto the partition reference."""
    default = default_partition(snapshot)
    others = [(name, "AccessExclusiveLock")]
    if default and default != name:
        others.append((default, "AccessExclusiveLock"))
    return ATTACH_MONTH._replace(
        others=(*others, *moving.referenced(snapshot, "ShareRowExclusiveLock"))
    )


def attach_default(snapshot):
    return [
        Statement(
            moving.like_parent(DEFAULT_PARTITION),
            f"created table {DEFAULT_PARTITION}",
            (),
            moving.NEW_LIKE,
            ("table", DEFAULT_PARTITION, DEFAULT_PARTITION),
        ),
        *made_like_parent(snapshot, DEFAULT_PARTITION),
        Statement(
            sql_text(
                "ALTER TABLE",
                Entity(PARENT),
                "ATTACH PARTITION",
                Entity(DEFAULT_PARTITION),
                "DEFAULT",
            ),
            f"attached partition {DEFAULT_PARTITION}",
            (PARENT,),
            attach_locks(snapshot, DEFAULT_PARTITION),
            ("partition", PARENT, DEFAULT_PARTITION),
        ),
    ]


CLOCK_SKEW = timedelta(days=1)  # how far the application's clocks may run ahead of ours


def default_holds(snapshot, default, month, end):
    """Whether the default partition holds rows of [month, end) (its created_at index serves
    the read)."""
    column = render(Entity("created_at"))
    return guarded(
        snapshot.target,
        f"SELECT EXISTS (SELECT 1 FROM ONLY {render(Entity(default))}"
        f" WHERE {column} >= {literal(month)} AND {column} < {literal(end)})",
    ).fetchone()[0]


def attach_month(snapshot, month):
    """A month's partition made empty beside the table, then attached: ATTACH takes SHARE
    UPDATE EXCLUSIVE on request_logs, where CREATE TABLE ... PARTITION OF would take ACCESS
    EXCLUSIVE. Only for a month no row of which can be arriving (upkeep's rule): with a
    default partition, ATTACH reads it (ACCESS EXCLUSIVE on it) and finds no row to move."""
    name, end = month_name(month), add_months(month, 1)
    return [
        Statement(
            moving.like_parent(name),
            f"created table {name}",
            (),
            moving.NEW_LIKE,
            ("table", name, name),
        ),
        *made_like_parent(snapshot, name),
        Statement(
            sql_text("ALTER TABLE", Entity(PARENT), "ATTACH PARTITION", Entity(name))
            + f" FOR VALUES FROM ({literal(month)}) TO ({literal(end)})",
            f"attached partition {name}",
            (PARENT,),
            attach_locks(snapshot, name),
            ("partition", PARENT, name),
        ),
    ]


def move_by_hand(default, month):
    """The SQL an operator can run to give a month of the default partition its partition
    in one transaction: writers to request_logs wait while the month's rows move."""
    name, end = month_name(month), add_months(month, 1)
    column = render(Entity("created_at"))
    within = f"{column} >= {literal(month)} AND {column} < {literal(end)}"
    source = render(Entity(default))
    return [
        "BEGIN",
        moving.like_parent(name),
        f"LOCK TABLE {render(Entity(PARENT))} IN SHARE MODE",
        f"LOCK TABLE ONLY {source} IN ACCESS EXCLUSIVE MODE",
        (
            f"WITH moved AS (DELETE FROM ONLY {source} WHERE {within} RETURNING *)"
            f" INSERT INTO {render(Entity(name))} SELECT * FROM moved"
        ),
        sql_text("ALTER TABLE", Entity(PARENT), "ATTACH PARTITION", Entity(name))
        + f" FOR VALUES FROM ({literal(month)}) TO ({literal(end)})",
        "COMMIT",
    ]


ELSEWHERE_QUERY = """
SELECT c.oid::regclass::text FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
WHERE h.inhparent = (SELECT oid FROM pg_class WHERE relnamespace = %(schema)s AND relname = %(table)s)
  AND c.relnamespace <> %(schema)s ORDER BY 1
"""


def partitions_elsewhere(snapshot):
    """Partitions of request_logs in another schema, which no run indexes, keeps or retains."""
    rows = guarded(
        snapshot.target, ELSEWHERE_QUERY, {"schema": snapshot.target.oid, "table": PARENT}
    ).fetchall()
    if not rows:
        return []
    names = ", ".join(shown(name) for (name,) in rows)
    return [
        Drift(
            f"{PARENT} has partitions outside its schema ({names}): migrate.py indexes, keeps and"
            " retains only the partitions of its schema, so an index of the parent may stay"
            " INVALID and old rows there stay; move them into the schema or detach them",
            [],
            False,
            "none",
            ("partitions elsewhere", PARENT, PARENT),
        )
    ]


# Each month as text, and as a timestamp only where Python's datetime can hold it (years 1
# to 9998): a row of year 12000 or BC would otherwise end the read with a ValueError.
MONTHS_IN_DEFAULT = """
SELECT CASE WHEN NOT isfinite(m) THEN m::text WHEN m < '0001-01-01' THEN to_char(m, 'YYYY-MM BC')
  ELSE to_char(m, 'YYYY-MM') END,
  CASE WHEN m > '0001-01-01' AND m < '9999-01-01' THEN m AT TIME ZONE 'UTC' END
FROM (SELECT date_trunc('month', created_at AT TIME ZONE 'UTC') AS m
  FROM ONLY {default} WHERE {outside}) AS dated
GROUP BY m ORDER BY m LIMIT 13
"""


PAST_MONTHS = 12  # months before this one whose rows a run moves out of the default partition


def past_months_in_default(snapshot, default, month):
    """The months of [month - PAST_MONTHS, month) the default partition holds rows of."""
    column = render(Entity("created_at"))
    within = (
        f"{column} >= {literal(add_months(month, -PAST_MONTHS))} AND {column} < {literal(month)}"
    )
    rows = guarded(
        snapshot.target, MONTHS_IN_DEFAULT.format(default=render(Entity(default)), outside=within)
    ).fetchall()
    return [start.astimezone(UTC) for _, start in rows if start is not None]


def dated_rows_in_default(snapshot, name, now):
    """Rows of the default partition dated outside the months upkeep keeps (those upkeep
    moves itself): each month of them can get its partition by hand."""
    default = render(Entity(name))
    column = render(Entity("created_at"))
    first = month_start(now)
    # Two ranges of the created_at index: no read of the rows upkeep moves itself.
    outside = (
        f"({column} < {literal(add_months(first, -PAST_MONTHS))}"
        f" OR {column} >= {literal(add_months(first, MONTHS_AHEAD + 1))})"
    )
    count = guarded(
        snapshot.target, f"SELECT count(*) FROM ONLY {default} WHERE {outside}"
    ).fetchone()[0]
    if not count:
        return []
    months = guarded(
        snapshot.target, MONTHS_IN_DEFAULT.format(default=default, outside=outside)
    ).fetchall()
    ranges = partitions(snapshot)
    fix = []
    for _, month in months[:12]:
        if (
            month is not None
            and FAR_PAST < month < FAR_FUTURE - timedelta(days=62)
            and not covered(ranges, month)
            and month_name(month) not in snapshot.relations
            and not overlaps(ranges, month)
        ):
            fix += move_by_hand(name, month)
    return [
        Drift(
            f"{shown_name(name)} holds {plural(count, 'row')} with a created_at that no partition"
            f" covers (months {', '.join(text for text, _ in months[:12])}"
            f"{', ...' if len(months) > 12 else ''}): runs make only this month's partition and"
            f" the {MONTHS_AHEAD} after, and move the rows of the {PAST_MONTHS} before; the fix"
            " makes one for each month and moves its rows there",
            fix,
            bool(fix),
            f"per month, until its COMMIT: SHARE on request_logs (blocks every write to it) and"
            f" ACCESS EXCLUSIVE on {shown_name(name)} (blocks its reads and writes) while the"
            " month's rows move, which grows with them; SHARE UPDATE EXCLUSIVE on request_logs"
            " and SHARE ROW EXCLUSIVE on users and api_keys (blocks their writes) for the ATTACH",
            ("default rows", PARENT, name),
        )
    ]


def conversion(plan, now):
    """The steps that turn a plain request_logs into the partitioned layout, from where the
    catalog shows the conversion to be."""
    snapshot = plan.snapshot
    found = conversion_check(snapshot)
    steps, blocked = list(plan.steps), list(plan.blocked)
    boundary = found[1] if found else boundary_after(now)
    stale = found is not None and found[1] - now < timedelta(days=1)
    if stale:  # its boundary is (nearly) here: bounded again, or inserts would soon fail
        boundary = boundary_after(now)
    carried = carried_over(snapshot, found)
    problems = carried.cannot + held_names(snapshot, boundary, now, carried)
    if found is None or stale or not found[0].validated:
        blocked += rows_outside_bound(snapshot, boundary, found)
    if problems:
        blocked.append(conversion_blocker(problems, found))
    if blocked != list(plan.blocked):
        return plan._replace(blocked=blocked)
    if found is None or stale:
        drop = [drop_check(found[0].name)] if stale else []
        steps.append(
            Step("bound request_logs by created_at", "transaction", [*drop, add_check(boundary)])
        )
        validated = False
    else:
        validated = found[0].validated
    online = []
    name = CHECK_PREFIX + f"{boundary:%Y_%m}"
    if not validated:
        online.append(
            Statement(
                sql_text("ALTER TABLE", Entity(PARENT), "VALIDATE CONSTRAINT", Entity(name)),
                f"validated the bound {name} of {PARENT}",
                (PARENT,),
                VALIDATE_CHECK,
                ("validated check", PARENT, name),
            )
        )
    legacy_id = snapshot.indexes.get(LEGACY_ID_INDEX)
    if legacy_id is None or not legacy_id.valid or legacy_id.table != PARENT:
        build = index_sql(RequestLog, ID_INDEX, safe=True, concurrently=True).replace(
            render(Entity(ID_INDEX._name)), render(Entity(LEGACY_ID_INDEX)), 1
        )
        if legacy_id is not None:
            online.append(
                Statement(
                    sql_text("DROP INDEX CONCURRENTLY IF EXISTS", Entity(LEGACY_ID_INDEX)),
                    f"dropped invalid index {LEGACY_ID_INDEX}",
                    (PARENT,),
                    Hazard(
                        "ShareUpdateExclusiveLock",
                        "nothing",
                        "instant, waits for older transactions",
                    ),
                    ("dropped", PARENT, LEGACY_ID_INDEX),
                )
            )
        online.append(
            Statement(
                build,
                f"created index {LEGACY_ID_INDEX}",
                (PARENT,),
                Hazard(
                    "ShareUpdateExclusiveLock",
                    "nothing",
                    "scans the table twice, waits for older transactions",
                ),
                ("index", PARENT, LEGACY_ID_INDEX),
            )
        )
    if online:
        steps.append(Step("check and index request_logs online", "online", online))
    steps.append(
        Step(
            "swap request_logs for its partitioned twin",
            "transaction",
            swap(snapshot, boundary, now, carried),
        )
    )
    unknown = [
        u for u in plan.unknown if not (u.table == PARENT and u.name in (name, LEGACY_ID_INDEX))
    ]
    return plan._replace(steps=steps, blocked=blocked, unknown=unknown)


def carried_over(snapshot, found=None):
    """What the conversion carries from request_logs to its twin and what it cannot
    (carry.conversion_carry): owner, grants, indexes, foreign keys and publications carried;
    triggers, policies, rules, row security, keys into request_logs refused."""
    return conversion_carry(
        snapshot,
        RequestLog,
        TWIN,
        LEGACY,
        own_checks=[found[0].name] if found else [],
        own_indexes=[ID_INDEX._name, LEGACY_ID_INDEX],
    )


def held_names(snapshot, boundary, now, carried=None):
    """The names the conversion would create that another relation already holds."""
    wanted = [DEFAULT_PARTITION, LEGACY, TWIN]
    wanted += [n for i in (carried.indexes if carried else []) for n in (i.temporary, i.legacy)]
    month = boundary
    while month <= add_months(month_start(now), MONTHS_AHEAD):
        wanted.append(month_name(month))
        month = add_months(month, 1)
    indexes = [*RequestLog._meta.fields_to_index(), ID_INDEX]
    wanted += [twin_index_name(i._name) for i in indexes]
    wanted += [legacy_index_name(i._name) for i in RequestLog._meta.fields_to_index()]
    held = [name for name in wanted if name in snapshot.relations]
    legacy_id = snapshot.relations.get(LEGACY_ID_INDEX)
    if legacy_id is not None and legacy_id.table != PARENT:
        held.append(LEGACY_ID_INDEX)
    if ID_INDEX._name in snapshot.relations:
        held.append(ID_INDEX._name)
    return [
        Cannot(
            f"the name {shown_name(name)} (held by the {snapshot.relations[name].kind}"
            f" {shown_name(name)})",
            "rename or drop what holds it",
        )
        for name in held
    ]


def conversion_blocker(problems, found):
    """One blocker naming each problem (carry.Cannot) with what to do, and the SQL for it."""
    check = (
        f"; meanwhile its CHECK {shown_name(found[0].name)} refuses inserts at or after"
        f" {found[1]:%Y-%m-%d}: drop it if the conversion is not finished before then"
        if found
        else ""
    )
    steps = [sql for problem in problems for sql in problem.fix]
    steps += [drop_check(found[0].name).sql] if found else []
    return Blocker(
        f"{PARENT} cannot be converted to monthly partitions, for "
        + "; ".join(f"{p.problem} ({p.todo})" for p in problems)
        + check,
        steps,
    )


def drop_check(name):
    return Statement(
        sql_text("ALTER TABLE", Entity(PARENT), "DROP CONSTRAINT", Entity(name)),
        f"dropped the unfinished conversion's bound {shown_name(name)}",
        (PARENT,),
        ADD_CHECK_NOT_VALID,
        ("dropped check", PARENT, name),
    )


def rows_outside_bound(snapshot, boundary, found):
    """Blockers for rows the bound would refuse (NULL, or dated at or after its boundary):
    found before the bound is added, or while a NOT VALID bound cannot be validated. Both
    reads are served by idx_request_logs_created_at."""
    relation, column = render(Entity(PARENT)), render(Entity("created_at"))
    bound = literal(boundary)
    undated, future = guarded(
        snapshot.target,
        f"SELECT EXISTS (SELECT 1 FROM ONLY {relation} WHERE {column} IS NULL),"
        f" EXISTS (SELECT 1 FROM ONLY {relation} WHERE {column} >= {bound})",
    ).fetchone()
    undo = (
        f"; meanwhile its NOT VALID CHECK {shown_name(found[0].name)} refuses such inserts:"
        " drop it (the last statement of the SQL listed) if the conversion is to wait"
        if found
        else ""
    )
    undo_steps = [drop_check(found[0].name).sql] if found else []
    blockers = []
    if undated:
        blockers.append(
            Blocker(
                f"{PARENT} has rows whose created_at is NULL, which no month's partition can hold,"
                " and the conversion keeps every row where it is: give them a time (or delete"
                f" them), then run --partition-request-logs again{undo}",
                [
                    f"SELECT count(*) FROM {relation} WHERE {column} IS NULL",
                    f"UPDATE {relation} SET {column} = PLACEHOLDER WHERE {column} IS NULL",
                    *undo_steps,
                ],
            )
        )
    if future:
        blockers.append(
            Blocker(
                f"{PARENT} has rows dated at or after {boundary:%Y-%m-%d %H:%M} UTC, where the"
                " monthly partitions begin, and the conversion keeps every row where it is (in"
                f" {LEGACY}, bounded before it): correct their created_at (or delete them), then"
                f" run --partition-request-logs again{undo}",
                [
                    f"SELECT count(*), max({column}) FROM {relation} WHERE {column} >= {bound}",
                    f"UPDATE {relation} SET {column} = PLACEHOLDER WHERE {column} >= {bound}",
                    *undo_steps,
                ],
            )
        )
    return blockers


def add_check(boundary):
    name = CHECK_PREFIX + f"{boundary:%Y_%m}"
    column = render(Entity("created_at"))
    return Statement(
        sql_text("ALTER TABLE", Entity(PARENT), "ADD CONSTRAINT", Entity(name))
        + f" CHECK ({column} IS NOT NULL AND {column} < {literal(boundary)}) NOT VALID",
        f"bounded {PARENT} by created_at before {boundary:%Y-%m-%d} (NOT VALID)",
        (PARENT,),
        ADD_CHECK_NOT_VALID,
        ("conversion check", PARENT, name),
    )


def twin_index_name(name):
    return f"{name}_partitioned".encode()[:63].decode(errors="ignore")


def legacy_index_name(name):
    return name.replace(f"idx_{PARENT}_", f"{LEGACY}_", 1)


def swap(snapshot, boundary, now, carried=None):
    """The one transaction of the swap. No statement scans: each is a catalog change."""
    indexes = [*RequestLog._meta.fields_to_index(), ID_INDEX]
    parent, twin = render(Entity(PARENT)), render(Entity(TWIN))
    new = Hazard(None, "nothing", "a new empty table")
    key = ("partitioned", PARENT, PARENT)

    def step(sql, description="", hazard=new, tables=()):
        return Statement(sql, description, tables, hazard, key)

    carried = carried or carried_over(snapshot)
    comment = snapshot.tables[PARENT].comment or RequestLog._meta.comment  # an operator's stays
    check = CHECK_PREFIX + f"{boundary:%Y_%m}"
    statements = [
        step(
            # Everything of the table but its indexes: CHECKs, NOT NULLs, defaults, column
            # comments, storage, statistics; what PostgreSQL does not copy follows (`carried`).
            sql_text(
                "CREATE TABLE",
                Entity(TWIN),
                "(LIKE",
                Entity(PARENT),
                "INCLUDING ALL EXCLUDING INDEXES)",
            )
            + ' PARTITION BY RANGE ("created_at")',
            f"created {TWIN}, partitioned by created_at",
            moving.NEW_LIKE,
        ),
        step(sql_text("ALTER TABLE", Entity(TWIN), "DROP CONSTRAINT", Entity(check))),
        step(sql_text("COMMENT ON TABLE", Entity(TWIN), "IS", Value(comment))),
        *(step(s.sql, hazard=s.hazard, tables=s.tables) for s in carried.twin),
        *(step(sql) for sql in carried.publications),
        *(step(sql) for i in carried.indexes for sql in (i.sql, i.comment) if sql),
    ]
    for index in indexes:
        statements.append(
            step(
                index_sql(RequestLog, index)
                .replace(
                    render(Entity(index._name)), render(Entity(twin_index_name(index._name))), 1
                )
                .replace(f" ON {parent} ", f" ON {twin} ", 1)
            )
        )
    statements.append(
        step(
            sql_text(
                "CREATE TABLE", Entity(DEFAULT_PARTITION), "PARTITION OF", Entity(TWIN), "DEFAULT"
            ),
            f"created partition {DEFAULT_PARTITION}",
        )
    )
    statements += [
        step(s.sql, hazard=s.hazard, tables=s.tables)
        for s in made_like_parent(snapshot, DEFAULT_PARTITION)
    ]
    month = boundary
    while month <= add_months(month_start(now), MONTHS_AHEAD):
        statements.append(
            step(
                sql_text("CREATE TABLE", Entity(month_name(month)), "PARTITION OF", Entity(TWIN))
                + f" FOR VALUES FROM ({literal(month)}) TO ({literal(add_months(month, 1))})",
                f"created partition {month_name(month)}",
            )
        )
        statements += [
            step(s.sql, hazard=s.hazard, tables=s.tables)
            for s in made_like_parent(snapshot, month_name(month))
        ]
        month = add_months(month, 1)
    # The foreign keys last before the renames: from here to COMMIT writes to users wait.
    statements += [step(k.sql, hazard=k.hazard, tables=k.tables) for k in carried.foreign_keys]
    for field in RequestLog._meta.refs:
        fk = render(RequestLog._schema._create_foreign_key(field))
        statements.append(
            step(
                fk.replace(f"ALTER TABLE {parent} ", f"ALTER TABLE {twin} ", 1),
                hazard=Hazard("ShareRowExclusiveLock", "writes", "instant: the table is empty"),
                tables=(field.rel_model._meta.table_name,),
            )
        )
    renames = [sql_text("ALTER TABLE", Entity(PARENT), "RENAME TO", Entity(LEGACY))]
    renames += [
        sql_text("ALTER INDEX", Entity(i._name), "RENAME TO", Entity(legacy_index_name(i._name)))
        for i in RequestLog._meta.fields_to_index()
        if i._name in snapshot.indexes
    ]
    renames += [
        sql_text("ALTER INDEX", Entity(i.name), "RENAME TO", Entity(i.legacy))
        for i in carried.indexes
    ]
    renames.append(sql_text("ALTER TABLE", Entity(TWIN), "RENAME TO", Entity(PARENT)))
    renames += [
        sql_text("ALTER INDEX", Entity(i.temporary), "RENAME TO", Entity(i.name))
        for i in carried.indexes
    ]
    renames += [
        sql_text("ALTER INDEX", Entity(twin_index_name(i._name)), "RENAME TO", Entity(i._name))
        for i in indexes
    ]
    serial = snapshot.tables[PARENT].columns["id"].serial
    if serial is not None:  # the sequence goes with the parent, not with the partition
        renames.append(
            sql_text("ALTER SEQUENCE", Entity(serial.sequence), "OWNED BY", Entity(PARENT, "id"))
        )
    exclusive = Hazard("AccessExclusiveLock", "reads and writes", "instant, a catalog change")
    statements += [step(sql, hazard=exclusive, tables=(PARENT,)) for sql in renames]
    statements.append(
        step(
            sql_text("ALTER TABLE", Entity(PARENT), "ATTACH PARTITION", Entity(LEGACY))
            + f" FOR VALUES FROM (MINVALUE) TO ({literal(boundary)})",
            f"converted {PARENT} to monthly partitions: {LEGACY} holds its rows before"
            f" {boundary:%Y-%m-%d}",
            SWAP,
            # The foreign keys' triggers move: their referenced tables are locked too.
            (LEGACY, "users", "api_keys", *(k.tables[0] for k in carried.foreign_keys)),
        )
    )
    statements.append(
        step(
            sql_text(
                "ALTER TABLE",
                Entity(LEGACY),
                "DROP CONSTRAINT",
                Entity(CHECK_PREFIX + f"{boundary:%Y_%m}"),
            ),
            hazard=exclusive,
            tables=(LEGACY,),
        )
    )
    statements += [step(sql, hazard=exclusive, tables=(LEGACY,)) for sql in carried.unpublish]
    return statements


def not_ready_to_swap(plan):
    """Why the swap cannot run now (a regular change or drift on request_logs), or None."""
    if plan.snapshot.tables.get(PARENT) is None or plan.snapshot.tables[PARENT].kind == "p":
        return "request_logs is already partitioned"
    waiting = [s.description for s in plan.transaction + plan.online if PARENT in s.effect[1:2]]
    waiting += [d.problem for d in plan.drift if d.key[1] == PARENT]
    if waiting:
        return f"request_logs must match the models first: {waiting[0]}"
    return None


def leftover_conversion(plan, now):
    """A conversion started by --partition-request-logs and not finished: its CHECK refuses
    inserts with a NULL created_at until the conversion ends."""
    found = conversion_check(plan.snapshot)
    if found is None:
        return plan
    constraint, boundary = found
    if boundary - now < timedelta(days=1):
        # Ours, and about to refuse every insert: a plain run drops it.
        step = Step(
            "drop an unfinished conversion's bound", "transaction", [drop_check(constraint.name)]
        )
        unknown = [u for u in plan.unknown if not (u.table == PARENT and u.name == constraint.name)]
        return plan._replace(steps=[*plan.steps, step], unknown=unknown)
    drift = plan.drift + [
        Drift(
            f"a conversion of {PARENT} to monthly partitions is not finished: its CHECK"
            f" {shown_name(constraint.name)} refuses inserts with a NULL created_at or one at or after"
            f" {boundary:%Y-%m-%d}; finish it (python migrate.py --partition-request-logs) or drop it",
            [sql_text("ALTER TABLE", Entity(PARENT), "DROP CONSTRAINT", Entity(constraint.name))],
            True,
            "instant; ACCESS EXCLUSIVE on request_logs until COMMIT",
            ("conversion check", PARENT, constraint.name),
        )
    ]
    unknown = [
        u
        for u in plan.unknown
        if not (u.table == PARENT and u.name in (constraint.name, LEGACY_ID_INDEX))
    ]
    return plan._replace(drift=drift, unknown=unknown)


# --- Retention -----------------------------------------------------------------------------


def retention_plan(plan, days, now=None):
    """What --retain-request-logs DAYS removes: partitions wholly older than the cutoff
    detached and dropped; a partition spanning many months (the converted table) replaced by
    month partitions of its kept rows (moving.py) and dropped; older rows of a month's
    partition, of the default partition or of a plain request_logs deleted in batches.
    A real DELETE or DROP, not a soft delete: the point is disk space."""
    now = now or clock()
    cutoff = now.astimezone(UTC) - timedelta(days=days)
    snapshot = plan.snapshot
    table = snapshot.tables.get(PARENT)
    # A drop interrupted after its detach (kill -9 between them) is finished first.
    steps = [
        step
        for name, when in sorted(moving.retired(snapshot).items())
        for step in moving.drop_retired(snapshot, name, when)
    ]
    if table is not None and table.kind == "p":
        default = default_partition(snapshot)
        keep = None
        for name, (lower, upper) in sorted(partitions(snapshot).items()):
            if upper is not None and upper <= cutoff:
                steps += drop_partition(snapshot, name, default)
            elif lower is None or lower < cutoff:
                work = kept_months(snapshot, name, lower, upper, cutoff) if keep is None else None
                if work is not None:
                    keep = work
                elif has_rows_before(snapshot, name, cutoff):
                    steps.append(
                        Step(
                            f"delete from {shown_name(name)}",
                            "batched",
                            [batched_delete(snapshot, name, cutoff)],
                        )
                    )
        if keep is not None:
            steps += moving.work_steps(snapshot, keep)
        else:
            steps += moving.cleanup_steps(snapshot, "keep")
        if default is not None and has_rows_before(snapshot, default, cutoff):
            steps.append(
                Step(
                    f"delete from {shown_name(default)}",
                    "batched",
                    [batched_delete(snapshot, default, cutoff)],
                )
            )
    elif table is not None and has_rows_before(snapshot, PARENT, cutoff):
        steps.append(
            Step(f"delete from {PARENT}", "batched", [batched_delete(snapshot, PARENT, cutoff)])
        )
    return plan._replace(
        transaction=[], online=[], steps=steps, drift=[], in_progress=[], unknown=[]
    )


def kept_months(snapshot, name, lower, upper, cutoff):
    """The work that keeps the rows of a many-month partition from the cutoff on, in month
    partitions (an interrupted one keeps the cutoff it began with), or None where a batched
    DELETE stays the way: one month's partition, no upper bound, a month's name held."""
    one_month = lower is not None and lower == month_start(lower) and upper == add_months(lower, 1)
    if one_month or upper is None:
        return None
    source = moving.logged_source(snapshot, "keep")
    began = moving.kept_from(snapshot) if source == name else None
    keep_from = began or cutoff
    pieces, month = [], month_start(max(keep_from, lower) if lower else keep_from)
    while month < upper:
        end = min(add_months(month, 1), upper)
        pieces.append((month_name(month), max(month, lower) if lower else month, end))
        month = add_months(month, 1)
    if not all(moving.name_free(snapshot, "keep", piece[0]) for piece in pieces):
        return None
    return Work("keep", name, pieces, keep_from)


def drop_partition(snapshot, name, default):
    """The steps that detach a partition, drop its foreign keys, then drop it. DETACH ...
    CONCURRENTLY blocks nothing, but PostgreSQL refuses it beside a DEFAULT partition (and
    before 14): then a plain DETACH runs in one short transaction, whose ACCESS EXCLUSIVE on
    request_logs is tried in LOCK_ATTEMPT attempts like every other instant statement. The
    partition is marked by a COMMENT before or with its detach, so that a run stopped before
    the DROP leaves a table the next retention run recognises and drops. The DROP runs
    alone, after its foreign keys are dropped: a DROP of a table with foreign keys holds
    ACCESS EXCLUSIVE on users and api_keys while its files go."""
    concurrently = (database.server_version or 0) >= 140000 and default is None
    pending = snapshot.tables[name].detach_pending
    mark = []
    if snapshot.tables[name].comment != moving.RETIRED_ALL:
        mark.append(
            Statement(
                sql_text("COMMENT ON TABLE", Entity(name), "IS", Value(moving.RETIRED_ALL)),
                f"marked partition {shown_name(name)} as retention's to drop",
                (name,),
                Hazard("ShareUpdateExclusiveLock", "nothing", "instant"),
                ("retiring", PARENT, name),
            )
        )
    if pending or concurrently:
        word = "FINALIZE" if pending else "CONCURRENTLY"
        detach = Statement(
            sql_text("ALTER TABLE", Entity(PARENT), "DETACH PARTITION", Entity(name), word),
            f"detached partition {shown_name(name)}",
            (PARENT,),
            DETACH_CONCURRENTLY._replace(
                # FINALIZE opens the partition under ACCESS EXCLUSIVE (ATExecDetachPartitionFinalize)
                others=(
                    (name, "AccessExclusiveLock" if pending else "ShareUpdateExclusiveLock"),
                    *moving.referenced(snapshot, "ShareRowExclusiveLock"),
                )
            ),
            ("detached", PARENT, name),
        )
    else:
        detach = Statement(
            sql_text("ALTER TABLE", Entity(PARENT), "DETACH PARTITION", Entity(name)),
            f"detached partition {shown_name(name)}",
            (PARENT, name, *([default] if default else [])),
            # The partition's foreign keys become its own: their triggers made on the
            # tables they reference, under SHARE ROW EXCLUSIVE there.
            DETACH._replace(others=moving.referenced(snapshot, "ShareRowExclusiveLock")),
            ("detached", PARENT, name),
        )
    first = Step(
        f"detach {shown_name(name)}",
        "online" if pending or concurrently else "transaction",
        [*mark, detach],
    )
    return [first, *moving.drop_retired(snapshot, name, None, planned_from=name)]


def rows_before(name, cutoff):
    return (
        f"FROM ONLY {render(Entity(name))} WHERE {render(Entity('created_at'))} < {literal(cutoff)}"
    )


def has_rows_before(snapshot, name, cutoff):
    return guarded(
        snapshot.target, f"SELECT EXISTS (SELECT 1 {rows_before(name, cutoff)})"
    ).fetchone()[0]


# Rows the retention plan counts exactly (index-served on created_at: about 40 ms for 100,000
# rows); past it, the planner's estimate, which statistics can leave several times off.
COUNTED_ROWS = 100_000


def rows_words(snapshot, name, cutoff):
    """'2,840 rows', or 'over 100,000 rows; ~1,234,567 by the planner's statistics, rough'."""
    counted = guarded(
        snapshot.target,
        f"SELECT count(*) FROM (SELECT 1 {rows_before(name, cutoff)} LIMIT {COUNTED_ROWS}) s",
    ).fetchone()[0]
    if counted < COUNTED_ROWS:
        return f"{counted:,} rows"
    estimate = guarded(
        snapshot.target, f"EXPLAIN (FORMAT JSON) SELECT 1 {rows_before(name, cutoff)}"
    ).fetchone()[0]
    rows = max(int(estimate[0]["Plan"]["Plan Rows"]), COUNTED_ROWS)
    return f"over {COUNTED_ROWS:,} rows; ~{rows:,} by the planner's statistics, rough"


def batched_delete(snapshot, name, cutoff):
    relation = render(Entity(name))
    return Statement(
        f"DELETE FROM ONLY {relation} WHERE ctid = ANY (ARRAY (SELECT ctid {rows_before(name, cutoff)}"
        f" LIMIT {BATCH_ROWS}))",
        f"deleted the rows of {shown_name(name)} older than {cutoff:%Y-%m-%d %H:%M} UTC"
        f" ({rows_words(snapshot, name, cutoff)})",
        (name,),
        BATCHED_DELETE,
        ("rows before", name, cutoff.isoformat()),
        (),
        ((name, cutoff),),
    )


# Steps that a run runs once: planned again only when what they made went stale meanwhile.
REMADE_STEPS = ("prepare the ", "copy rows into ")
MOVING_STEPS = (*REMADE_STEPS, "catch up the ", "switch ", "clean up the ")
# Steps whose effects are read back after COMMIT: read inside, the whole catalog would be read
# while their ACCESS EXCLUSIVE on request_logs holds every writer (0.2-5 s at 120-1,200
# partitions). The catalog still decides what is logged.
CHECKED_AFTER_COMMIT = (
    "swap ",
    "drop ",
    "switch ",
    "prepare the ",
    "clean up the ",
    "attach ",
    "detach ",
    "unlink ",
)
CONVERSION_STEPS = ("bound request_logs", "check and index request_logs", "swap request_logs")


def resume_words(step_name):
    """What a step stopped part way leaves, and which run carries on."""
    if step_name.startswith(CONVERSION_STEPS):
        return (
            "request_logs keeps the layout it had before this step (each step is all or nothing);"
            " python migrate.py --partition-request-logs continues the conversion"
        )
    if step_name.startswith(REMADE_STEPS[0]):
        return (
            "the prepare is one transaction, rolled back unless it committed; the next run with"
            " the same flags carries on"
        )
    if step_name.startswith(MOVING_STEPS):
        return (
            "the tables being filled, the change log and its trigger stay (the switch is all or"
            " nothing); the next run with the same flags carries on"
        )
    if step_name.startswith(("drop ", "delete from ", "detach ", "unlink ")):
        return (
            "what was dropped or deleted before stays so; the next run with"
            " --retain-request-logs does the rest"
        )
    return "the partitions and indexes made so far stay; the next run makes the rest"
