"""
A partition's rows of some months moved into month partitions of their own without holding
writers: copied beside the layout, the changes made meanwhile caught up, one short switch.

Usage::

    from moving import Work, work_steps

    work = Work("move", "request_logs_default", [("request_logs_2026_11", nov, dec)], None)
    steps, drift = work_steps(snapshot, work)     # plan.Step list, and what blocks it

Two kinds of work use it (partition.py plans them):

- "move": the default partition holds rows of a month that gets its partition. The month's
  table and a new default (its other rows) are filled beside it; the switch detaches the old
  default, attaches the month and the new default, and drops the old one.
- "keep": retention on a partition spanning many months (request_logs_legacy after a
  conversion). The kept rows [cutoff, its upper bound) are copied into month tables; the
  switch detaches the old partition and attaches the months; the old partition is then
  dropped in a statement of its own, which says the rows it removes (Statement.removes).

The steps, each planned again from the catalog (so an interrupted run is finished by the
next run with the same flags):

1. prepare (a short transaction): the month tables, LIKE the parent with its indexes, the
   model's foreign keys (made while empty: instant) and a CHECK of the month's range (so
   ATTACH adopts them and skips its scan); a change log and a trigger on the source partition
   that records the id of every row inserted, updated or deleted there from now on.
2. copy (one statement per table, its own transaction): TRUNCATE (a killed copy leaves dead
   rows) + INSERT ... SELECT + a COMMENT saying the copy is done. Blocks no writer.
3. catch up (batched): the logged ids, a batch at a time: their rows deleted from the copies
   and copied again as the source holds them now. Stops when a batch is not full.
4. switch (one short transaction, ACCESS EXCLUSIVE on request_logs): DETACH the source, catch
   up the last changes, ATTACH the copies (no scan), drop the log. Its length grows with the
   changes since the last batch, not with the rows.

State lives in the catalog: a table being filled carries a COMMENT of ours (PREPARED or
COPIED), the change log exists, the trigger names the source.
"""

import re
from collections import namedtuple
from datetime import UTC, datetime

from peewee import Entity, Value

from carry import carriable, foreign_key_sql, foreign_keys_of, made_like, same_key
from catalog import guarded, shown_name
from models import RequestLog
from plan import Hazard, Statement, Step, render, sql_text

PARENT = RequestLog._meta.table_name
LOG = {"move": f"{PARENT}_moving", "keep": f"{PARENT}_keeping"}
REST = f"{PARENT}_default_next"  # the new default partition, renamed at the switch
MOVED_OUT = f"{PARENT}_default_moved_out"  # the old one, its rows copied, until its DROP
MOVED = "migrate.py move: a detached default partition whose rows are in their partitions"
PREPARED = "migrate.py {kind}: rows not copied yet"
COPIED = "migrate.py {kind}: rows copied, changes caught up until the switch"
# A detached partition whose rows retention removes, dropped by the next retention run.
RETIRED = "migrate.py retention: rows before {cutoff} removed"
RETIRED_ALL = "migrate.py retention: all rows removed"
RETIRED_FORM = re.compile(
    r"migrate\.py retention: rows before (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\+00 removed"
)
CATCH_UP_ROWS = 5_000  # logged changes a catch-up batch replays
# A catch-up ends at a batch this small: the switch replays what is left under its lock.
CATCH_UP_TAIL = 50

# The parts of a work: `pieces` [(table, lower, upper)], the rows of [max(lower, keep_from), upper).
Work = namedtuple("Work", "kind source pieces keep_from")

NEW = Hazard(None, "nothing", "a new empty table")
TRIGGER = Hazard(
    "ShareRowExclusiveLock",
    "writes to the partition",
    "instant; from here each write there also logs its row's id",
)
FOREIGN_KEY = Hazard("ShareRowExclusiveLock", "writes", "instant: the table is empty")
COPY = Hazard(
    "AccessExclusiveLock",
    "nothing: the table is not attached yet; its ACCESS SHARE on the partition it reads blocks"
    " no writer",
    "copies the rows: grows with them, its own transaction",
)
CATCH_UP = Hazard(
    "RowExclusiveLock",
    "nothing; its ACCESS SHARE on the partition it reads blocks no writer",
    "replays a batch of logged changes",
)
SWITCH_DETACH = Hazard(
    "AccessExclusiveLock",
    "reads and writes of request_logs (lock attempts of 50 ms)",
    "instant, no scan",
)
SWITCH_CATCH_UP = Hazard(
    "RowExclusiveLock",
    "nothing more (ACCESS EXCLUSIVE on request_logs held)",
    "replays the changes since the last batch (few)",
)
# Adopting a copy's own foreign key drops that key's triggers on the table it references:
# ACCESS EXCLUSIVE there (pg_locks, PostgreSQL 15), held until COMMIT.
SWITCH_ATTACH = Hazard(
    "AccessExclusiveLock",
    "nothing more on request_logs (ACCESS EXCLUSIVE held); its ACCESS EXCLUSIVE on the tables"
    " the foreign keys reference blocks their reads and writes",
    "instant: the CHECK spares the scan, indexes and foreign keys adopted",
)
SWITCH_DEFAULT = SWITCH_ATTACH._replace(
    work="scans the new default partition (rows of no month: few)"
)
SWITCH_CATALOG = Hazard(
    "AccessExclusiveLock", "nothing more (ACCESS EXCLUSIVE on request_logs held)", "instant"
)
SWITCH_COMMENT = SWITCH_CATALOG._replace(lock="ShareUpdateExclusiveLock")  # COMMENT ON TABLE
DROP_RETIRED = Hazard("AccessExclusiveLock", "nothing: the table is detached", "instant")
# CREATE TABLE ... (LIKE request_logs ...) reads the parent's definition under ACCESS SHARE.
NEW_LIKE = NEW._replace(others=((PARENT, "AccessShareLock"),))


def referenced(snapshot, mode, table=PARENT):
    """((table, mode), ...) for each table the foreign keys of `table` reference: what an
    ATTACH or DETACH of a partition (their triggers), or an insert (its key checks: ROW
    SHARE), locks there besides."""
    tables = {c.ref_table for c in snapshot.constraints if c.table == table and c.kind == "f"}
    return tuple((name, mode) for name in sorted(tables))


def literal(moment):
    """A timestamptz literal with its offset, read the same in every session time zone."""
    return render(Value(moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00")))


def bounds_sql(lower, upper):
    return f"FOR VALUES FROM ({literal(lower)}) TO ({literal(upper)})"


def check_name(table):
    return f"{table}_bound".encode()[:63].decode(errors="ignore")


def columns(snapshot):
    """The parent's columns a copy carries (a generated column is computed again)."""
    facts = snapshot.tables[PARENT].columns
    return ", ".join(render(Entity(name)) for name, c in facts.items() if not c.generated)


def same_columns(snapshot, name):
    """Whether a copy has the parent's columns, as ATTACH and the copy's INSERT need them."""

    def shape(table):
        return {
            column: (c.type, c.not_null)
            for column, c in snapshot.tables[table].columns.items()
            if not c.generated
        }

    return shape(name) == shape(PARENT)


# What ATTACH PARTITION compares of two indexes besides their columns (CompareIndexInfo): the
# expressions and the predicate as text (the tables' columns have the same names), operator
# classes and collations. Read only while a copy exists.
INDEX_DETAILS_QUERY = """
SELECT c.relname, pg_get_expr(x.indexprs, x.indrelid), pg_get_expr(x.indpred, x.indrelid),
       x.indclass::oid[]::text, x.indcollation::oid[]::text
FROM pg_index x JOIN pg_class c ON c.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relnamespace = %(schema)s AND t.relname = ANY (%(tables)s)
"""


# The CHECKs ATTACH PARTITION matches by name and compares by expression.
CHECKS_QUERY = """
SELECT t.relname, k.conname, pg_get_expr(k.conbin, k.conrelid)
FROM pg_constraint k JOIN pg_class t ON t.oid = k.conrelid
WHERE k.contype = 'c' AND t.relnamespace = %(schema)s AND t.relname = ANY (%(tables)s)
"""


def index_shape(index, details):
    return (index.unique, index.method, index.keys, index.included, details.get(index.name))


def lacks(snapshot, name, parent_keys):
    """What a copy lacks of the parent's indexes, foreign keys and CHECKs (added after the
    copy was made): ATTACH would build each under its ACCESS EXCLUSIVE on request_logs (159 ms at
    400,000 rows for one index), so such a copy is made again, LIKE the parent as it is now.
    An INVALID index of the parent counts (a DBA's CREATE INDEX ON ONLY, its partitions'
    indexes not all attached yet): ATTACH builds it on the copy all the same."""
    details = {
        row[0]: tuple(row[1:])
        for row in guarded(
            snapshot.target,
            INDEX_DETAILS_QUERY,
            {"schema": snapshot.target.oid, "tables": [PARENT, name]},
        )
    }
    have = [index_shape(i, details) for i in snapshot.indexes.values() if i.table == name]
    missing = []
    for index in snapshot.indexes.values():
        if index.table == PARENT and index.partitioned:
            if index_shape(index, details) in have:
                have.remove(index_shape(index, details))
            else:
                missing.append(index.name)
    # ATTACH refuses a table without each of the parent's CHECKs, by name and expression
    # ("child table is missing constraint", "... has different definition for check
    # constraint"): one added or replaced since the copy was made would fail every run's switch.
    # A NOT VALID CHECK of the parent is valid on the copy (LIKE), which ATTACH accepts.
    checks = {}
    for table, check, expression in guarded(
        snapshot.target, CHECKS_QUERY, {"schema": snapshot.target.oid, "tables": [PARENT, name]}
    ):
        checks.setdefault(table, set()).add((check, expression))
    missing += sorted({c for c, _ in checks.get(PARENT, set()) - checks.get(name, set())})
    # One the parent no longer has (dropped while the move was stopped) would refuse rows it
    # takes, in the copy and, once attached, in the month.
    extra = checks.get(name, set()) - checks.get(PARENT, set())
    missing += sorted({c for c, _ in extra if c != check_name(name)})
    if parent_keys:  # those make_copy_table makes: a key it cannot make is no reason
        have_keys = [key for key in foreign_keys_of(snapshot, name) if key.outgoing]
        missing += [k.name for k in parent_keys if not any(same_key(k, h) for h in have_keys)]
    return missing


def within(work, piece):
    _, lower, upper = piece
    start = max(lower, work.keep_from) if work.keep_from else lower
    column = render(Entity("created_at"))
    return f"{column} >= {literal(start)} AND {column} < {literal(upper)}"


def rest_predicate(work):
    column = render(Entity("created_at"))
    return f"{column} IS NULL OR NOT ({' OR '.join(f'({within(work, p)})' for p in work.pieces)})"


def targets(work):
    """(table, predicate) of each copy: the pieces, and for a move the new default."""
    found = [(piece[0], within(work, piece)) for piece in work.pieces]
    if work.kind == "move":
        found.append((REST, rest_predicate(work)))
    return found


# --- What the catalog holds --------------------------------------------------------------

TRIGGER_QUERY = """
SELECT c.relname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = %(schema)s AND t.tgname = %(name)s AND NOT t.tgisinternal
"""


def logged_source(snapshot, kind):
    """The table whose writes the work's trigger logs, or None."""
    row = guarded(
        snapshot.target, TRIGGER_QUERY, {"schema": snapshot.target.oid, "name": LOG[kind]}
    ).fetchone()
    return row[0] if row else None


def in_progress(snapshot, kind):
    return LOG[kind] in snapshot.tables


def ours(snapshot, kind):
    """{table: 'prepared' | 'copied'} of the tables a work of this kind is filling."""
    marks = {PREPARED.format(kind=kind): "prepared", COPIED.format(kind=kind): "copied"}
    return {
        t.name: marks[t.comment]
        for t in snapshot.tables.values()
        if t.parent is None and t.kind == "r" and t.comment in marks
    }


def name_free(snapshot, kind, name):
    return name not in snapshot.relations or name in ours(snapshot, kind)


def retired(snapshot):
    """{table: cutoff (None: all rows)} of detached tables retention is removing."""
    found = {}
    for t in snapshot.tables.values():
        if t.parent is not None or t.kind != "r" or not t.comment:
            continue
        if t.comment == RETIRED_ALL:
            found[t.name] = None
        elif match := RETIRED_FORM.fullmatch(t.comment):
            found[t.name] = datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC)
    return found


def kept_from(snapshot):
    """The cutoff an interrupted retention copy was given (its log's comment), or None."""
    table = snapshot.tables.get(LOG["keep"])
    match = re.fullmatch(
        r"keep from (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\+00", (table and table.comment) or ""
    )
    return datetime.fromisoformat(match.group(1)).replace(tzinfo=UTC) if match else None


# --- The steps ---------------------------------------------------------------------------


def work_steps(snapshot, work):
    """The steps that finish `work` from where the catalog shows it."""
    filling = ours(snapshot, work.kind)
    source = logged_source(snapshot, work.kind)
    logging = in_progress(snapshot, work.kind)
    prepare = []
    if source is not None and source != work.source:
        # The work of another source (renamed or replaced since): begin again.
        prepare += [drop_table(name) for name in sorted(filling)]
        prepare += [stop_logging(work.kind, source), *drop_log(work.kind)]
        filling, source, logging = {}, None, False
    if source is None:  # copies made while no trigger logged the writes cannot be trusted
        filling = dict.fromkeys(filling, "prepared")
    wanted = {name for name, _ in targets(work)}
    # A copy made before the application altered request_logs (GORM's ADD COLUMN) can be
    # neither filled nor attached: made again.
    parent_keys = [k for k in foreign_keys_of(snapshot, PARENT) if carriable(k)] if filling else []
    stale = {
        name
        for name in filling
        if not same_columns(snapshot, name) or lacks(snapshot, name, parent_keys)
    }
    prepare += [drop_table(name) for name in sorted(filling) if name not in wanted or name in stale]
    filling = {name: state for name, state in filling.items() if name not in stale}
    for piece in work.pieces:
        if piece[0] not in filling:
            prepare += make_copy_table(snapshot, work.kind, piece)
    if work.kind == "move" and REST not in filling:
        prepare += make_copy_table(snapshot, work.kind, (REST, None, None))
    if not logging:
        prepare += make_log(snapshot, work)
    if source is None:
        prepare.append(start_logging(snapshot, work))
    # A switch stopped before the old default's DROP: dropped first, its name is needed.
    steps = drop_moved_out(snapshot) if work.kind == "move" and moved_out(snapshot) else []
    if prepare:
        steps.append(
            Step(
                f"prepare the {work.kind} out of {shown_name(work.source)}", "transaction", prepare
            )
        )
    for name, predicate in targets(work):
        if filling.get(name) != "copied":
            steps.append(
                Step(
                    f"copy rows into {shown_name(name)}",
                    "online",
                    [copy_rows(snapshot, work, name, predicate, again=name in stale)],
                )
            )
    steps.append(
        Step(f"catch up the {work.kind}", "catch-up", [replay(snapshot, work, CATCH_UP_ROWS)])
    )
    steps.append(
        Step(
            f"switch {shown_name(work.source)} for its copies",
            "transaction",
            switch(snapshot, work),
        )
    )
    # Planned now, so that the run goes on to it after the switch.
    if work.kind == "keep":
        steps += drop_retired(snapshot, work.source, work.keep_from)
    else:
        steps += drop_moved_out(snapshot, work.source)
    return steps


def cleanup_steps(snapshot, kind):
    """A work no longer wanted (its months got partitions another way): its tables, log and
    trigger dropped. Nothing of request_logs depends on them."""
    statements = [drop_table(name) for name in sorted(ours(snapshot, kind))]
    source = logged_source(snapshot, kind)
    if source is not None:
        statements.append(stop_logging(kind, source))
    if in_progress(snapshot, kind):
        statements += drop_log(kind)
    return [Step(f"clean up the {kind}", "transaction", statements)] if statements else []


def drop_table(name):
    return Statement(
        sql_text("DROP TABLE", Entity(name)),
        f"dropped the unfinished copy {shown_name(name)}",
        (name,),
        Hazard("AccessExclusiveLock", "nothing: the table is not attached", "instant"),
        ("dropped copy", PARENT, name),
    )


def like_parent(name, indexes=False):
    """CREATE TABLE name LIKE request_logs with its defaults and CHECKs (ATTACH refuses a
    table missing one of the parent's), and with `indexes` its indexes (ATTACH adopts them)."""
    what = "INCLUDING DEFAULTS INCLUDING CONSTRAINTS" + (" INCLUDING INDEXES" if indexes else "")
    return sql_text("CREATE TABLE", Entity(name), "(LIKE", Entity(PARENT), what + ")")


def make_copy_table(snapshot, kind, piece):
    """A table beside the layout, LIKE the parent with its indexes, the model's foreign keys
    and (for a month) the CHECK of its range."""
    name, lower, upper = piece
    key = ("copy table", PARENT, name)
    statements = [
        Statement(
            like_parent(name, indexes=True),
            f"created table {shown_name(name)} beside {PARENT}",
            (),
            NEW_LIKE,
            key,
        ),
        # The owner, grants, replica identity... a partition of request_logs must have.
        *made_like(snapshot, PARENT, name),
    ]
    if lower is not None:
        column = render(Entity("created_at"))
        statements.append(
            Statement(
                sql_text("ALTER TABLE", Entity(name), "ADD CONSTRAINT", Entity(check_name(name)))
                + f" CHECK ({column} IS NOT NULL AND {column} >= {literal(lower)}"
                f" AND {column} < {literal(upper)})",
                "",
                (),
                NEW,
                key,
            )
        )
    # Every key of the parent (the model's and a DBA's): instant on the empty table, and
    # ATTACH adopts them instead of validating each on the filled one under its lock.
    for fk in foreign_keys_of(snapshot, PARENT):
        if carriable(fk):
            statements.append(
                Statement(foreign_key_sql(fk, name), "", (fk.ref_table,), FOREIGN_KEY, key)
            )
    statements.append(
        Statement(
            sql_text("COMMENT ON TABLE", Entity(name), "IS", Value(PREPARED.format(kind=kind))),
            "",
            (),
            NEW,
            key,
        )
    )
    return statements


def function_name(snapshot, kind):
    return Entity(snapshot.target.name, LOG[kind])


def make_log(snapshot, work):
    log = Entity(snapshot.target.name, LOG[work.kind])
    old, new = (
        "INSERT INTO {} (id) VALUES ({}.id);".format(render(log), "OLD"),
        "INSERT INTO {} (id) VALUES ({}.id);".format(render(log), "NEW"),
    )
    body = (
        f"BEGIN IF TG_OP <> 'INSERT' THEN {old} END IF;"
        f" IF TG_OP <> 'DELETE' THEN {new} END IF; RETURN NULL; END"
    )
    key = ("change log", PARENT, LOG[work.kind])
    comment = (
        f"keep from {work.keep_from.astimezone(UTC):%Y-%m-%d %H:%M:%S}+00" if work.keep_from else ""
    )
    statements = [
        Statement(
            sql_text("CREATE TABLE", Entity(LOG[work.kind]), "(id bigint NOT NULL)"),
            "",
            (),
            NEW,
            key,
        ),
        # A publication FOR ALL TABLES (or TABLES IN SCHEMA) takes the log in too, and the
        # catch-up's DELETE of a published table without an identity fails.
        Statement(
            sql_text("ALTER TABLE", Entity(LOG[work.kind]), "REPLICA IDENTITY FULL"),
            "",
            (),
            NEW,
            key,
        ),
        # SECURITY DEFINER: the application's role writes the log without a grant on it.
        Statement(
            sql_text("CREATE OR REPLACE FUNCTION", function_name(snapshot, work.kind))
            + "() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER"
            " SET search_path = pg_catalog, pg_temp AS " + render(Value(body)),
            "",
            (),
            NEW,
            key,
        ),
    ]
    if comment:
        statements.append(
            Statement(
                sql_text("COMMENT ON TABLE", Entity(LOG[work.kind]), "IS", Value(comment)),
                "",
                (),
                NEW,
                key,
            )
        )
    return statements


def start_logging(snapshot, work):
    return Statement(
        sql_text(
            "CREATE TRIGGER",
            Entity(LOG[work.kind]),
            "AFTER INSERT OR UPDATE OR DELETE ON",
            Entity(work.source),
            "FOR EACH ROW EXECUTE FUNCTION",
            function_name(snapshot, work.kind),
        )
        + "()",
        f"logging the changes to {shown_name(work.source)} while its rows are copied",
        (work.source,),
        TRIGGER,
        ("logging", PARENT, work.source),
    )


def stop_logging(kind, source):
    return Statement(
        sql_text("DROP TRIGGER", Entity(LOG[kind]), "ON", Entity(source)),
        "",
        (source,),
        Hazard("AccessExclusiveLock", "reads and writes of the partition", "instant"),
        ("stopped logging", PARENT, source),
    )


def drop_log(kind):
    key = ("dropped log", PARENT, LOG[kind])
    return [
        Statement(sql_text("DROP TABLE", Entity(LOG[kind])), "", (LOG[kind],), SWITCH_CATALOG, key),
        Statement(
            sql_text("DROP FUNCTION", Entity(LOG[kind])) + "()",
            "",
            (),
            Hazard(None, "nothing", "instant: the trigger that called it is gone"),
            key,
        ),
    ]


def copy_rows(snapshot, work, name, predicate, again=False):
    """One statement (one implicit transaction): a killed copy leaves its table empty again.
    `again`: into a copy made again (stale): its own effect, so that the copy that went stale
    right after it ran is not taken for one that had no effect."""
    table, source = render(Entity(name)), render(Entity(work.source))
    cols = columns(snapshot)
    return Statement(
        f"TRUNCATE {table}; "
        + sql_text("COMMENT ON TABLE", Entity(name), "IS", Value(COPIED.format(kind=work.kind)))
        + f"; INSERT INTO {table} ({cols}) SELECT {cols} FROM ONLY {source} WHERE {predicate}",
        f"copied the rows of {shown_name(work.source)} for {shown_name(name)}",
        (name,),
        COPY._replace(
            others=((work.source, "AccessShareLock"), *referenced(snapshot, "RowShareLock"))
        ),
        ("copied", PARENT, f"{name} (made again)" if again else name),
    )


def replay(snapshot, work, limit):
    """The logged changes (`limit` of them, or all): their rows deleted from the copies and
    copied again as the source holds them. One statement, so one snapshot: a change
    committed after it is logged after it, and replayed by the next batch."""
    log, source = render(Entity(LOG[work.kind])), render(Entity(work.source))
    picked = (
        f"DELETE FROM {log} WHERE ctid = ANY (ARRAY (SELECT ctid FROM {log} LIMIT {limit})) RETURNING id"
        if limit
        else f"DELETE FROM {log} RETURNING id"
    )
    cols = columns(snapshot)
    parts = [f"changed AS ({picked})"]
    for number, (name, predicate) in enumerate(targets(work)):
        table = render(Entity(name))
        # = ANY (ARRAY (...)): an index scan on id, whatever the planner guesses of the log.
        parts.append(
            f"gone_{number} AS (DELETE FROM {table} WHERE id = ANY (ARRAY (SELECT id FROM changed)))"
        )
        # OFFSET 0 fences the rows read by id from the month's range: the planner would
        # otherwise AND in the created_at index, a read of the whole month (34 ms at 600,000
        # rows, under the switch's lock).
        parts.append(
            f"now_{number} AS (INSERT INTO {table} ({cols}) SELECT {cols} FROM (SELECT * FROM"
            f" ONLY {source} WHERE id = ANY (ARRAY (SELECT id FROM changed)) OFFSET 0) AS changed_rows"
            f" WHERE {predicate})"
        )
    return Statement(
        f"WITH {', '.join(parts)} SELECT 1 FROM changed",
        f"caught up the changes to {shown_name(work.source)} made while its rows were copied",
        (LOG[work.kind], *(name for name, _ in targets(work))),
        (CATCH_UP if limit else SWITCH_CATCH_UP)._replace(
            others=((work.source, "AccessShareLock"), *referenced(snapshot, "RowShareLock"))
        ),
        ("caught up", PARENT, LOG[work.kind]),
    )


# Raised by the switch when request_logs gained (or validated) an index or a foreign key after
# its plan was read: the lock error's code, so that the attempt is rolled back and planned again
# like one that waited too long (apply.with_lock_retries), and the stale copies are made again.
CHANGED_MEANWHILE = (
    "request_logs gained or validated an index or a foreign key while the switch waited"
)


def unchanged_since_planned(snapshot, key):
    """A check run right after the DETACH, which holds ACCESS EXCLUSIVE on request_logs: a
    DBA's CREATE INDEX (or ADD FOREIGN KEY, or on 18 VALIDATE CONSTRAINT of a NOT VALID key,
    which copies do not carry) that committed while the DETACH waited for its lock, after the plan
    was read, would otherwise be built (or validated) on a copy by ATTACH, under that lock.
    Counts, not names: catalog text never goes into SQL."""
    indexes = sum(1 for i in snapshot.indexes.values() if i.table == PARENT)
    # Its own keys: a key referencing request_logs itself has a row per partition it
    # references besides (conparentid), one of them the default's, gone with the DETACH.
    keys = [
        c for c in snapshot.constraints if c.table == PARENT and c.kind == "f" and not c.inherited
    ]
    valid = sum(1 for c in keys if c.validated)  # a NOT VALID or NOT ENFORCED key (18) is not
    # Found by the run's search_path, as the DETACH before it found it.
    parent = f"{render(Value(render(Entity(PARENT))))}::pg_catalog.regclass"
    keys_of = (
        f"FROM pg_catalog.pg_constraint WHERE conrelid = {parent} AND contype = 'f'"
        " AND conparentid = 0"
    )
    body = (
        f"BEGIN IF (SELECT count(*) FROM pg_catalog.pg_index WHERE indrelid = {parent}) <> {indexes}"
        f" OR (SELECT count(*) {keys_of}) <> {len(keys)}"
        f" OR (SELECT count(*) {keys_of} AND convalidated) <> {valid}"
        f" THEN RAISE EXCEPTION {render(Value(CHANGED_MEANWHILE))}"
        " USING ERRCODE = 'lock_not_available'; END IF; END"
    )
    return Statement(
        "DO " + render(Value(body)),
        "",
        (PARENT,),
        SWITCH_CATALOG._replace(work="instant: reads request_logs' indexes and keys"),
        key,
    )


def switch(snapshot, work):
    """The one short transaction: detach the source, replay the last changes, attach the copies."""
    key = ("switched", PARENT, work.source)
    parent = Entity(PARENT)
    statements = [
        Statement(
            sql_text("ALTER TABLE", parent, "DETACH PARTITION", Entity(work.source)),
            "",
            (PARENT, work.source),
            SWITCH_DETACH._replace(others=referenced(snapshot, "ShareRowExclusiveLock")),
            key,
        ),
        unchanged_since_planned(snapshot, key),
        replay(snapshot, work, None)._replace(effect=key, description=""),
    ]
    for name, lower, upper in work.pieces:
        statements += [
            Statement(
                sql_text("COMMENT ON TABLE", Entity(name), "IS NULL"),
                "",
                (name,),
                SWITCH_COMMENT,
                key,
            ),
            Statement(
                sql_text("ALTER TABLE", parent, "ATTACH PARTITION", Entity(name))
                + " "
                + bounds_sql(lower, upper),
                f"attached partition {shown_name(name)}",
                (name,),
                SWITCH_ATTACH._replace(
                    others=(
                        (PARENT, "AccessExclusiveLock"),
                        *referenced(snapshot, "AccessExclusiveLock"),
                    )
                ),
                key,
            ),
            Statement(
                sql_text("ALTER TABLE", Entity(name), "DROP CONSTRAINT", Entity(check_name(name))),
                "",
                (name,),
                SWITCH_CATALOG,
                key,
            ),
        ]
    if work.kind == "move":
        # The old default is dropped after COMMIT, in a step of its own: a DROP here would
        # hold every writer while its files go (60 ms at 200,000 rows).
        statements += [
            stop_logging(work.kind, work.source)._replace(effect=key, hazard=SWITCH_CATALOG),
            Statement(
                sql_text("ALTER TABLE", Entity(work.source), "RENAME TO", Entity(MOVED_OUT)),
                "",
                (work.source,),
                SWITCH_CATALOG,
                key,
            ),
            Statement(
                sql_text("COMMENT ON TABLE", Entity(MOVED_OUT), "IS", Value(MOVED)),
                f"detached the old default partition {shown_name(work.source)}, its rows copied,"
                f" as {MOVED_OUT}",
                (MOVED_OUT,),
                SWITCH_COMMENT,
                key,
            ),
            Statement(
                sql_text("COMMENT ON TABLE", Entity(REST), "IS NULL"),
                "",
                (REST,),
                SWITCH_COMMENT,
                key,
            ),
            Statement(
                sql_text("ALTER TABLE", Entity(REST), "RENAME TO", Entity(work.source)),
                "",
                (REST,),
                SWITCH_CATALOG,
                key,
            ),
            Statement(
                sql_text("ALTER TABLE", parent, "ATTACH PARTITION", Entity(work.source), "DEFAULT"),
                f"attached the new default partition {shown_name(work.source)}",
                (work.source,),
                SWITCH_DEFAULT._replace(
                    others=(
                        (PARENT, "AccessExclusiveLock"),
                        *referenced(snapshot, "AccessExclusiveLock"),
                    )
                ),
                key,
            ),
        ]
    else:
        cutoff = work.keep_from.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S+00")
        statements += [
            stop_logging(work.kind, work.source)._replace(effect=key, hazard=SWITCH_CATALOG),
            Statement(
                sql_text(
                    "COMMENT ON TABLE",
                    Entity(work.source),
                    "IS",
                    Value(RETIRED.format(cutoff=cutoff)),
                ),
                f"detached {shown_name(work.source)}, its rows from {cutoff[:16]} UTC kept in month partitions",
                (work.source,),
                SWITCH_COMMENT,
                key,
            ),
        ]
    statements += [s._replace(effect=key) for s in drop_log(work.kind)]
    return statements


def moved_out(snapshot):
    """Whether the old default partition of a finished move waits for its DROP."""
    table = snapshot.tables.get(MOVED_OUT)
    return table is not None and table.parent is None and table.comment == MOVED


def drop_moved_out(snapshot, source=None):
    """The DROP of the old default partition: every row of it is in a partition (copies)."""
    drop = Statement(
        sql_text("DROP TABLE", Entity(MOVED_OUT)),
        f"dropped {MOVED_OUT} (its rows are in their partitions)",
        (MOVED_OUT,),
        DROP_RETIRED,
        ("dropped", PARENT, MOVED_OUT),
    )
    return unlinked(snapshot, MOVED_OUT, source) + [
        Step(f"drop {MOVED_OUT}", "transaction", [drop])
    ]


def unlinked(snapshot, name, planned_from=None):
    """The steps that drop a detached table's foreign keys before its DROP: a DROP of a table
    with foreign keys holds ACCESS EXCLUSIVE on users and api_keys while its files go (1.5 s
    at 2 M rows); each ALTER here is instant, in 50 ms lock attempts. One key a transaction:
    holding api_keys while waiting for users deadlocks with an insert of a log that holds
    users (its first key check) and waits for api_keys, so under steady inserts every
    attempt timed out. `planned_from`: the partition the table is now, whose constraints it
    keeps when detached (and renamed)."""
    table = name if name in snapshot.tables else planned_from
    keys = sorted(
        (c for c in snapshot.constraints if c.table == table and c.kind == "f"),
        key=lambda c: c.name,
    )
    return [
        Step(
            f"unlink {shown_name(name)}: {shown_name(key.name)}",
            "transaction",
            [
                Statement(
                    sql_text("ALTER TABLE", Entity(name), "DROP CONSTRAINT", Entity(key.name)),
                    f"dropped the foreign key {shown_name(key.name)} of {shown_name(name)}",
                    (name, key.ref_table),
                    Hazard(
                        "AccessExclusiveLock",
                        f"reads and writes of {shown_name(key.ref_table)}",
                        "instant",
                    ),
                    ("unlinked", PARENT, f"{name}.{key.name}"),
                )
            ],
        )
        for key in keys
    ]


def drop_retired(snapshot, name, cutoff, planned_from=None):
    """The DROP of a detached table retention removes: rows before `cutoff` (None: all) for
    good; its foreign keys dropped first (unlinked)."""
    return unlinked(snapshot, name, planned_from) + [
        Step(
            f"drop {shown_name(name)}",
            "transaction",
            [
                Statement(
                    sql_text("DROP TABLE", Entity(name)),
                    f"dropped {shown_name(name)}, removing its rows before {cutoff:%Y-%m-%d %H:%M} UTC"
                    if cutoff
                    else f"dropped partition {shown_name(name)}",
                    (name,),
                    DROP_RETIRED,
                    ("dropped partition", PARENT, name),
                    (),
                    ((name, cutoff),),
                )
            ],
        )
    ]
