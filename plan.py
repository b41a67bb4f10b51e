"""
Compare the models with a catalog snapshot: what to add, in which stage, at what cost.

Usage::

    from catalog import read_catalog, target_schema
    from plan import plan_changes, report

    snapshot = read_catalog(target_schema())
    plan = plan_changes(snapshot)                # online: the default
    plan = plan_changes(snapshot, atomic=True)
    print(report(plan))                          # what --check prints

A plan has two stages of additive statements and lists for a human:

- ``transaction``: run in one transaction, all or nothing. New tables with
  their comment and indexes; columns added to existing tables (instant: a
  constant DEFAULT needs no rewrite); foreign keys on existing tables as
  ``NOT VALID`` (instant; with ``atomic`` they are checked here instead).
- ``online``: run after the commit, one statement at a time, blocking no
  writer: ``CREATE INDEX CONCURRENTLY`` and ``VALIDATE CONSTRAINT`` on
  existing tables (with ``atomic`` these go into the transaction, where they
  block writes while they scan).
- ``drift``: what differs and is left alone, each with the SQL that would fix
  it, whether that SQL is safe to run as it is, and what it costs.
- ``blocked``: what no run can add until someone acts (a NOT NULL column
  without a default for a table with rows, a table name held by a view...);
  a run then changes nothing.
- ``unknown``: tables, columns, indexes and constraints the models don't declare.
  ``in_progress``: indexes another session is building right now.

Every statement carries its hazard (the lock it takes, what that lock
blocks, whether it scans) and its effect: the object it makes, which the run
reads back from the catalog before it says it was made (``unmet``).

Everything printed is one line per line: names and text read from the
catalog are escaped (catalog.shown), and SQL is built from quoted
identifiers and literals that `one_line_sql` writes in PostgreSQL's escape
forms (U&"..." and E'...') when they hold a control character. So piping
``--check`` into psql runs exactly the statements printed, whatever the
catalog holds.
"""

import re
from collections import namedtuple
from contextlib import contextmanager
from datetime import UTC, datetime

import peewee
from peewee import SQL, BigIntegerField, Entity, NodeList, Value, ValueLiterals
from playhouse.migrate import PostgresqlMigrator
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from catalog import guard_params, guard_sql, guarded, index_builder, one_line, shown, shown_name
from connection import text_limits
from models import MODELS, database

# --- Hazards ---------------------------------------------------------------------

# lock: the mode taken on each of the statement's `tables`; others: ((table, mode), ...), each
# lock it takes on another table (the tables its foreign keys reference, the default
# partition an ATTACH reads, the table a copy reads...), printed after the main lock.
Hazard = namedtuple("Hazard", "lock blocks work others", defaults=((),))
NEW_TABLE = Hazard(None, "nothing", "a table made in this transaction")
CREATE_TABLE = Hazard("ShareRowExclusiveLock", "writes", "instant")  # on the tables it references
ADD_COLUMN = Hazard("AccessExclusiveLock", "reads and writes", "instant, no rewrite")
ADD_FOREIGN_KEY_NOT_VALID = Hazard("ShareRowExclusiveLock", "writes", "instant, no scan")
ADD_FOREIGN_KEY = Hazard("ShareRowExclusiveLock", "writes", "scans the table")
VALIDATE_CONSTRAINT = Hazard("ShareUpdateExclusiveLock", "nothing", "scans the table")
CREATE_INDEX = Hazard("ShareLock", "writes", "scans the table")
CREATE_INDEX_CONCURRENTLY = Hazard(
    "ShareUpdateExclusiveLock", "nothing", "scans the table twice, waits for older transactions"
)
DROP_INDEX = Hazard("AccessExclusiveLock", "reads and writes", "instant")
DROP_INDEX_CONCURRENTLY = Hazard(
    "ShareUpdateExclusiveLock", "nothing", "instant, waits for older transactions"
)
# What a drift fix costs, said with it.
INSTANT_ALTER = "instant; ACCESS EXCLUSIVE on {table} (blocks reads and writes) until COMMIT"
REWRITE = "rewrites {table} under ACCESS EXCLUSIVE (blocks reads and writes for the whole rewrite)"
SCAN_UNDER_LOCK = "scans {table} under ACCESS EXCLUSIVE (blocks reads and writes for the scan)"
ONLINE_INDEX = (
    "builds online under SHARE UPDATE EXCLUSIVE (CREATE INDEX CONCURRENTLY blocks no writer),"
    " then swaps the index: DROP INDEX CONCURRENTLY and the rename take SHARE UPDATE EXCLUSIVE"
    " too (block no writer)"
)


def lock_name(mode):
    """'ShareRowExclusiveLock' -> 'SHARE ROW EXCLUSIVE', as the LOCK TABLE docs spell it."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", mode.removesuffix("Lock")).upper()


# --- SQL text --------------------------------------------------------------------------


def render(node):
    """SQL text of a Peewee node with every value inlined, ready to print or run."""
    sql, params = database.get_sql_context().sql(ValueLiterals(node)).query()
    assert not params, sql
    return one_line_sql(sql)


def sql_text(*parts):
    """SQL from keywords (str) and Peewee nodes (Entity for names), e.g. sql_text("DROP INDEX", Entity(n))."""
    return render(NodeList([SQL(part) if isinstance(part, str) else part for part in parts]))


def sql_of(operation):
    """The SQL of a playhouse.migrate operation, without running it."""
    sql, params = operation.fn(operation.migrator, *operation.args, **operation.kwargs).query()
    assert not params, sql
    return one_line_sql(sql)


QUOTED = re.compile(r"\"(?:[^\"]|\"\")*\"|'(?:[^']|'')*'")


def one_line_sql(sql):
    """sql with every quoted identifier and literal that holds a character which could end
    or hide a line written in PostgreSQL's escape syntax: U&"a\\000ab", E'a\\nb'."""
    return QUOTED.sub(lambda match: one_line_token(match.group(0)), sql)


def one_line_token(token):
    quote = token[0]
    body = token[1:-1].replace(quote * 2, quote)
    if shown(body) == body.replace("\\", "\\\\"):  # nothing to escape but backslashes
        return token
    if quote == '"':
        return 'U&"' + "".join(unicode_escaped(char, '"') for char in body) + '"'
    return "E'" + "".join(literal_escaped(char) for char in body) + "'"


def unicode_escaped(char, quote):
    if char == "\\":
        return "\\\\"
    if char == quote:
        return quote * 2
    if shown(char) == char:
        return char
    code = ord(char)
    return f"\\{code:04X}" if code <= 0xFFFF else f"\\+{code:06X}"


def literal_escaped(char):
    if char in "\\'":
        return "\\" + char
    if shown(char) == char:
        return char
    code = ord(char)
    return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"


def commented(statements):
    """Statements as comment lines, for SQL that must not run as it is."""
    return ["-- " + statement for statement in statements]


# --- What the models expect ---------------------------------------------------------

# Peewee's DDL type names, as PostgreSQL's format_type() prints them.
PG_TYPE_NAMES = {
    "BIGSERIAL": "bigint",
    "BIGINT": "bigint",
    "BOOLEAN": "boolean",
    "TEXT": "text",
    "TIMESTAMPTZ": "timestamp with time zone",
    "JSONB": "jsonb",
}
OWN_SEQUENCE = "nextval() of a sequence owned by the column"

Expected = namedtuple("Expected", "type not_null default")


def expected_column(field):
    """What the catalog shows for a field, in PostgreSQL's own spelling."""
    ddl_type = render(field.ddl_datatype(database.get_sql_context()))
    if ddl_type.startswith("VARCHAR"):
        type_ = "character varying" + ddl_type[len("VARCHAR") :]
    else:
        type_ = PG_TYPE_NAMES[ddl_type]
    if field.primary_key:
        return Expected(type_, True, OWN_SEQUENCE)
    default = server_default(field)
    if default and default.startswith("'"):  # PostgreSQL adds the cast to a literal
        default = f"{default}::{type_.split('(')[0]}"
    return Expected(type_, not field.null, default)


def server_default(field):
    """The SQL DEFAULT expression declared on a field, or None."""
    for constraint in field.constraints or ():
        if constraint.sql.startswith("DEFAULT "):
            return constraint.sql[len("DEFAULT ") :]
    return None


def default_matches(actual, expected):
    if expected.default == OWN_SEQUENCE:
        return bool(actual.serial and actual.serial.owned and actual.default)
    return actual.default == expected.default


def expected_keys(index):
    """The (column, descending, nulls first) of each key of a Peewee index."""
    keys = []
    for part in index._expressions:
        descending = getattr(part, "direction", "ASC") == "DESC"
        column = getattr(part, "node", part).column_name
        nulls = getattr(part, "nulls", None)
        keys.append((column, descending, descending if nulls is None else nulls == "FIRST"))
    return tuple(keys)


# Peewee quotes every name; PostgreSQL (quote_all_identifiers pinned off) only
# those that need it. The predicates of the models name plain columns.
QUOTED_PLAIN_NAME = re.compile(r'"([a-z_][a-z0-9_]*)"')


def expected_predicate(model, index):
    """The index's WHERE as pg_get_expr prints it, or None."""
    sql = index_sql(model, index)
    if " WHERE " not in sql:
        return None
    return QUOTED_PLAIN_NAME.sub(r"\1", sql.split(" WHERE ", 1)[1])


def index_differences(live, model, index):
    """How a live index differs from the model's, in words; [] when it is the same."""
    table = model._meta.table_name
    differences = []
    if live.table != table:
        differences.append(f"it is on table {shown_name(live.table or '?')}, not {table}")
    if live.method != "btree":
        differences.append(f"it uses {shown(live.method)}, not btree")
    if bool(live.unique) != bool(index._unique):
        differences.append("it is unique" if live.unique else "it is not unique")
    if live.expressions or live.included:
        differences.append("it has expressions or INCLUDE columns")
    keys = tuple((key.column, key.descending, key.nulls_first) for key in live.keys)
    if keys != expected_keys(index):
        differences.append(f"its keys are ({', '.join(describe_key(*key) for key in keys)})")
    elif not all(key.default_opclass and key.default_collation for key in live.keys):
        differences.append("a key has another operator class or collation")
    if live.predicate != expected_predicate(model, index):
        differences.append(f"its predicate is {shown(live.predicate)}")
    return differences


def describe_key(column, descending, nulls_first):
    words = [shown_name(column) if column else "an expression"]
    if descending:
        words.append("DESC")
    if nulls_first != descending:
        words.append("NULLS FIRST" if nulls_first else "NULLS LAST")
    return " ".join(words)


def index_columns(index):
    """The column names an index covers, in order."""
    return [key[0] for key in expected_keys(index)]


def foreign_key_matches(constraint, field):
    return (
        constraint.kind == "f"
        and constraint.columns == [field.column_name]
        and constraint.ref_table == field.rel_model._meta.table_name
        and constraint.ref_columns == [field.rel_field.column_name]
        and constraint.actions == ("a", "a", "s")  # NO ACTION on update and delete, MATCH SIMPLE
        and not constraint.deferrable
    )


# --- Planning -------------------------------------------------------------------------

# effect: the object a statement makes, as a key the next plan can be asked about;
# needs: the effects of other statements it must follow (a column it indexes).
# removes: ((relation, cutoff), ...), the rows this statement deletes for good (created_at
# before cutoff; cutoff None: every row of the relation), so that they can be archived first.
Statement = namedtuple(
    "Statement", "sql description tables hazard effect needs removes", defaults=((), ())
)
# fix: statements; safe: whether they may run as printed; cost: their lock and work.
Drift = namedtuple("Drift", "problem fix safe cost key")
Unknown = namedtuple("Unknown", "kind table name")
# Why no run can proceed, and the SQL (steps) an operator can run by hand.
Blocker = namedtuple("Blocker", "reason steps", defaults=((),))


# Work after the online stage, in the order given: each "transaction" step in a short
# transaction of its own (lock attempts of LOCK_ATTEMPT), each "online" step one statement
# at a time, each "batched" step a statement repeated until it changes no row.
Step = namedtuple("Step", "name kind statements")


class Plan(
    namedtuple(
        "Plan",
        "transaction online drift blocked unknown in_progress snapshot models steps",
        defaults=((),),
    )
):
    """What a run does (two stages of statements, then steps) and what it leaves to a human."""

    @property
    def pending(self):
        return self.transaction + self.online + [s for step in self.steps for s in step.statements]

    def open_keys(self):
        """The effects still to make and the objects still in drift."""
        return {s.effect for s in self.pending} | {d.key for d in self.drift}


def plan_changes(snapshot, atomic=False, models=MODELS):
    """Compare the live schema with the models: staged additions, drift, unknowns."""
    stages = {"transaction": [], "online": [], "attach": []}
    drift, blocked, in_progress = [], [], []
    for model in models:
        table = model._meta.table_name
        if table not in snapshot.tables:
            holder = snapshot.relations.get(table)
            if holder:
                blocked.append(name_held_by_other(table, "table", holder))
                continue
            stages["transaction"] += create_table(model, snapshot, drift)
            continue
        later = "transaction" if atomic else "online"
        for stage, statement in (
            plan_columns(model, snapshot, drift, blocked)
            + plan_foreign_keys(model, snapshot, drift, later)
            + plan_indexes(model, snapshot, drift, in_progress, later)
        ):
            stages[stage].append(statement)
        drift += writes_that_fail(model, snapshot)
    unknown = unknown_objects(snapshot, models)
    steps = (
        [Step("attach partition indexes", "transaction", stages["attach"])]
        if stages["attach"]
        else []
    )
    return Plan(
        stages["transaction"],
        stages["online"],
        drift,
        blocked,
        unknown,
        in_progress,
        snapshot,
        models,
        steps,
    )


def name_held_by_other(name, wanted_kind, holder):
    where = f" on table {shown_name(holder.table)}" if holder.table else ""
    return Blocker(
        f"{wanted_kind} {name} cannot be created: the name is held by the {holder.kind}"
        f" {shown_name(holder.name)}{where}; rename or drop that {holder.kind}, then rerun"
    )


def create_table(model, snapshot, drift):
    """CREATE TABLE, its comment and its indexes (those whose name is free)."""
    meta = model._meta
    table = meta.table_name
    # Only a referenced table that exists before the run can be held by someone else.
    referenced = tuple(
        sorted({f.rel_model._meta.table_name for f in meta.refs} & set(snapshot.tables))
    )
    comment = sql_text("COMMENT ON TABLE", Entity(table), "IS", Value(meta.comment))
    statements = [
        Statement(
            render(model._schema._create_table(safe=False)),
            f"created table {table}",
            referenced,
            CREATE_TABLE if referenced else NEW_TABLE,
            ("table", table, table),
        ),
        Statement(comment, f"commented table {table}", (), NEW_TABLE, ("comment", table, table)),
    ]
    for index in meta.fields_to_index():
        holder = snapshot.relations.get(index._name)
        if holder:
            drift.append(index_name_held(model, index, holder, snapshot))
            continue
        statements.append(
            Statement(
                index_sql(model, index),
                f"created index {index._name}",
                (),
                NEW_TABLE,
                ("index", table, index._name),
            )
        )
    return statements


def index_sql(model, index, safe=False, concurrently=False):
    sql = render(model._schema._create_index(index, safe=safe))
    if concurrently:  # Peewee's Index has no CONCURRENTLY option
        sql = sql.replace(" INDEX ", " INDEX CONCURRENTLY ", 1)
    return sql


def build_index(model, index, stage, description=None, needs=()):
    """(stage, Statement) that builds index on an existing table: concurrently when online."""
    online = stage == "online"
    table = model._meta.table_name
    columns = tuple(("column", table, column) for column in index_columns(index))
    return stage, Statement(
        index_sql(model, index, safe=online, concurrently=online),
        description or f"created index {index._name}",
        (table,),
        CREATE_INDEX_CONCURRENTLY if online else CREATE_INDEX,
        ("index", table, index._name),
        columns + tuple(needs),
    )


# --- Columns --------------------------------------------------------------------------


def plan_columns(model, snapshot, drift, blocked):
    table = model._meta.table_name
    live = snapshot.tables[table]
    additions = []
    for field in model._meta.sorted_fields:
        expected = expected_column(field)
        actual = live.columns.get(field.column_name)
        if actual is None:
            if expected.not_null and expected.default is None and table_has_rows(snapshot, table):
                blocked.append(not_null_column_blocked(model, field))
            else:
                additions.append(("transaction", add_column(model, field)))
        else:
            drift += column_drift(table, field, actual, expected)
    return additions


def add_column(model, field):
    """ADD COLUMN in one statement: a constant DEFAULT needs no table rewrite on PostgreSQL 11+.

    playhouse's add_column instead adds it nullable, UPDATEs every row and
    then sets NOT NULL.
    """
    table = model._meta.table_name
    column = field.ddl(database.get_sql_context())
    sql = sql_text("ALTER TABLE", Entity(table), "ADD COLUMN IF NOT EXISTS", column)
    return Statement(
        sql,
        f"added column {table}.{field.column_name}",
        (table,),
        ADD_COLUMN,
        ("column", table, field.column_name),
    )


def table_has_rows(snapshot, table):
    query = sql_text("SELECT EXISTS (SELECT 1 FROM", Entity(table), ")")
    return guarded(snapshot.target, query).fetchone()[0]


BACKFILL_BATCH = 10_000


def not_null_column_blocked(model, field):
    """Why a NOT NULL column without a default cannot be added, and the SQL that adds it online."""
    table, column = model._meta.table_name, field.column_name
    check = f"{table}_{column}_not_null"[:63]
    ddl_type = render(field.ddl_datatype(database.get_sql_context()))
    name, relation, constraint = (
        render(Entity(column)),
        render(Entity(table)),
        render(Entity(check)),
    )
    steps = [
        f"ALTER TABLE {relation} ADD COLUMN {name} {ddl_type}",
        (
            f"UPDATE {relation} SET {name} = PLACEHOLDER WHERE id IN"
            f" (SELECT id FROM {relation} WHERE {name} IS NULL LIMIT {BACKFILL_BATCH})"
        ),
        f"ALTER TABLE {relation} ADD CONSTRAINT {constraint} CHECK ({name} IS NOT NULL) NOT VALID",
        f"ALTER TABLE {relation} VALIDATE CONSTRAINT {constraint}",
        f"ALTER TABLE {relation} ALTER COLUMN {name} SET NOT NULL",
        f"ALTER TABLE {relation} DROP CONSTRAINT {constraint}",
    ]
    return Blocker(
        f"cannot add NOT NULL column {table}.{column} without a default to a table that has"
        " rows: a run changes nothing until it is there. Add it online by hand: add it nullable,"
        f" backfill in batches of {BACKFILL_BATCH:,} (choose the PLACEHOLDER value; repeat the"
        " UPDATE until it updates 0 rows), then a NOT VALID check, validated online, lets"
        " SET NOT NULL skip its scan",
        steps,
    )


def column_drift(table, field, actual, expected):
    migrator = PostgresqlMigrator(database)
    column = field.column_name
    where = f"{table}.{column}"
    key = ("column", table, column)
    drift = []
    if actual.generated or (actual.identity and expected.default != OWN_SEQUENCE):
        kind = "a generated column" if actual.generated else "an identity column"
        drift.append(
            Drift(
                f"{where} is {kind}, which refuses the values the models insert",
                [
                    sql_text(
                        "ALTER TABLE",
                        Entity(table),
                        "ALTER COLUMN",
                        Entity(column),
                        "DROP EXPRESSION" if actual.generated else "DROP IDENTITY",
                    )
                ],
                True,
                INSTANT_ALTER.format(table=table),
                key,
            )
        )
        return drift
    if actual.type != expected.type:
        drift.append(type_drift(table, field, actual, expected))
    if actual.not_null != expected.not_null:
        if expected.not_null:
            fix, cost = migrator.add_not_null(table, column), SCAN_UNDER_LOCK
            note = "; it fails while a row holds NULL"
        else:
            fix, cost, note = migrator.drop_not_null(table, column), INSTANT_ALTER, ""
        wanted = "NOT NULL" if expected.not_null else "nullable"
        drift.append(
            Drift(
                f"{where} should be {wanted}{note}",
                [sql_of(fix)],
                True,
                cost.format(table=table),
                key,
            )
        )
    if expected.default == OWN_SEQUENCE:
        drift += sequence_drift(table, column, actual)
    elif not default_matches(actual, expected):
        if expected.default is None:
            fix = sql_of(migrator.drop_column_default(table, column))
        else:
            fix = sql_of(migrator.add_column_default(table, column, SQL(expected.default)))
        drift.append(
            Drift(
                f"{where} default is {shown(actual.default)}; the models say {expected.default or 'none'}",
                [fix],
                True,
                INSTANT_ALTER.format(table=table),
                key,
            )
        )
    return drift


def sequence_drift(table, column, actual):
    """An id column draws from a bigint sequence it owns (bigserial), whatever its name."""
    where, key = f"{table}.{column}", ("column", table, column)
    serial = actual.serial
    if actual.identity:
        # Inserts that leave the id out work; GORM's AutoMigrate skips primary keys.
        problem = f"{where} is an identity column; the models (and GORM) make it bigserial"
        return [Drift(problem, [], False, "a rewrite of the column's default by hand", key)]
    if serial is None or not actual.default:
        sequence = f"{table}_{column}_seq"
        name, relation = render(Entity(column)), render(Entity(table))
        regclass = render(Value(render(Entity(sequence))))
        fix = [
            sql_text(
                "CREATE SEQUENCE IF NOT EXISTS", Entity(sequence), "OWNED BY", Entity(table, column)
            ),
            f"SELECT setval({regclass}, coalesce(max({name}), 0) + 1, false) FROM {relation}",
            f"ALTER TABLE {relation} ALTER COLUMN {name} SET DEFAULT nextval({regclass}::regclass)",
        ]
        problem = f"{where} has default {shown(actual.default)}; the models say nextval() of its own sequence (bigserial)"
        return [Drift(problem, fix, False, INSTANT_ALTER.format(table=table), key)]
    drift = []
    if not serial.owned:
        drift.append(
            Drift(
                f"{where} draws from sequence {shown_name(serial.sequence)}, which it does not own"
                " (dropping the table would leave the sequence behind)",
                [
                    sql_text(
                        "ALTER SEQUENCE", Entity(serial.sequence), "OWNED BY", Entity(table, column)
                    )
                ],
                True,
                "instant",
                key,
            )
        )
    if serial.type != "bigint":
        drift.append(
            Drift(
                f"sequence {shown_name(serial.sequence)} of {where} is {shown(serial.type)}: ids stop"
                " at its maximum; the models say bigint",
                [sql_text("ALTER SEQUENCE", Entity(serial.sequence), "AS bigint")],
                True,
                "instant; locks the sequence (nextval waits) until COMMIT",
                ("sequence", table, serial.sequence),
            )
        )
    return drift


# Conversions that keep every stored value: (from, to) -> (USING clause or None, rewrites).
INTEGER_TYPES = ("smallint", "integer")
VARCHAR = re.compile(r"character varying\((\d+)\)")


def type_drift(table, field, actual, expected):
    """The drift of a column's type, with a fix that keeps the data, or a commented one."""
    column = field.column_name
    where = f"{table}.{column}"
    typed = BigIntegerField() if field.primary_key else field  # BIGSERIAL is no type to ALTER to
    migrator = PostgresqlMigrator(database)
    problem = f"{where} is {shown(actual.type)}; the models say {expected.type}"
    key = ("column", table, column)
    source, target = actual.type, expected.type
    if (source in INTEGER_TYPES and target == "bigint") or (
        source == "timestamp without time zone" and target == "timestamp with time zone"
    ):
        cast = None
        if source.startswith("timestamp"):
            # The models and the Go backend store UTC: read the naive values as UTC, not as
            # the session's zone, which would shift every row by its offset.
            cast = SQL(f"{render(Entity(column))} AT TIME ZONE 'UTC'")
            problem += " (the fix reads the stored values as UTC, the models' convention)"
        fix = sql_of(migrator.alter_column_type(table, column, typed, cast=cast))
        return Drift(problem, [fix], True, REWRITE.format(table=table), key)
    widened = VARCHAR.fullmatch(source), VARCHAR.fullmatch(target)
    if (
        source.startswith("character varying")
        and target == "text"
        or (all(widened) and int(widened[1].group(1)) >= int(widened[0].group(1)))
    ):
        fix = sql_of(migrator.alter_column_type(table, column, typed))
        return Drift(problem, [fix], True, INSTANT_ALTER.format(table=table) + ", no rewrite", key)
    fix = sql_of(migrator.alter_column_type(table, column, typed))
    loss, count = conversion_loss(table, column, source, target)
    problem += f" (not run as printed: {loss}; count them with: {count})"
    return Drift(problem, [fix], False, REWRITE.format(table=table), key)


def conversion_loss(table, column, source, target):
    """What a conversion would change or refuse, and a query counting the rows concerned."""
    name, relation = render(Entity(column)), render(Entity(table))
    shorter = VARCHAR.fullmatch(target)
    if shorter:
        limit = shorter.group(1)
        return (
            f"values longer than {limit} characters make it fail",
            f"SELECT count(*) FROM {relation} WHERE length({name}) > {limit}",
        )
    if (
        target == "bigint"
        and source in ("numeric", "real", "double precision")
        or source.startswith("numeric(")
    ):
        return (
            "fractions are rounded and values out of the bigint range make it fail",
            f"SELECT count(*) FROM {relation} WHERE {name} <> round({name})",
        )
    if target == "bigint":
        return (
            "values that are not integers make it fail",
            f"SELECT count(*) FROM {relation} WHERE {name} IS NOT NULL",
        )
    if target == "jsonb":
        return (
            "text that is not JSON makes it fail, and jsonb drops duplicate keys and reorders keys",
            f"SELECT count(*) FROM {relation} WHERE {name} IS NOT NULL",
        )
    return (
        "the conversion may fail or change stored values",
        f"SELECT count(*) FROM {relation} WHERE {name} IS NOT NULL",
    )


# --- Writes the models make that the table refuses ------------------------------------------


def writes_that_fail(model, snapshot):
    """Columns the models do not know that make every insert of theirs fail: NOT NULL, no default."""
    table = model._meta.table_name
    declared = {field.column_name for field in model._meta.sorted_fields}
    migrator = PostgresqlMigrator(database)
    drift = []
    for name, column in snapshot.tables[table].columns.items():
        if name in declared or not (column.not_null or column.domain_not_null):
            continue
        if column.default is not None or column.identity or column.generated:
            continue
        if column.domain_not_null and not column.not_null:
            # The NOT NULL is the domain's, shared with every column of that type.
            drift.append(
                Drift(
                    f"{table}.{shown_name(name)} is of the NOT NULL domain {shown(column.type)}"
                    " with no default, and not in the models: every insert through the models"
                    " (and the Go backend) fails; give it a DEFAULT (value yours to choose)",
                    [
                        sql_text(
                            "ALTER TABLE",
                            Entity(table),
                            "ALTER COLUMN",
                            Entity(name),
                            "SET DEFAULT PLACEHOLDER",
                        )
                    ],
                    False,
                    INSTANT_ALTER.format(table=table),
                    ("column", table, name),
                )
            )
        else:
            drift.append(
                Drift(
                    f"{table}.{shown_name(name)} ({shown(column.type)}) is NOT NULL with no default"
                    " and not in the models: every insert through the models (and the Go backend)"
                    " fails; drop NOT NULL, or give it a DEFAULT",
                    [sql_of(migrator.drop_not_null(table, name))],
                    True,
                    INSTANT_ALTER.format(table=table),
                    ("column", table, name),
                )
            )
    return drift + checks_the_defaults_violate(model, snapshot)


def checks_the_defaults_violate(model, snapshot):
    """CHECK constraints the models do not declare that refuse the row the models insert when
    given nothing but their defaults (created_at and updated_at: now).

    Evaluated by the server, never by pasting the CHECK's text into SQL: a temporary copy of
    the table (CREATE TEMP TABLE ... LIKE, with its CHECKs and no NOT NULL) takes the row in
    a transaction that is always rolled back. Only CHECKs on columns the defaults decide,
    that call nothing but immutable functions of pg_catalog (catalog: evaluable), are tried.
    """
    table = model._meta.table_name
    values = default_row(model)
    declared = {field.column_name for field in model._meta.sorted_fields}
    decided = set(values) | (set(snapshot.tables[table].columns) - declared)
    candidates = {
        c.name: c
        for c in snapshot.constraints
        if c.table == table
        and c.kind == "c"
        and not c.inherited
        and c.evaluable
        and c.columns
        and set(c.columns) <= decided
    }
    if not candidates:
        return []
    migrator = PostgresqlMigrator(database)
    return [
        Drift(
            f"{table}: CHECK constraint {shown_name(name)}, {shown(candidates[name].definition)},"
            " refuses the row the models insert with their defaults: every such insert fails",
            [sql_of(migrator.drop_constraint(table, name))],
            False,
            INSTANT_ALTER.format(table=table),
            ("check", table, name),
        )
        for name in sorted(violated_checks(snapshot, table, set(candidates), values))
    ]


def default_row(model):
    """{column: value} of what the models insert when given nothing else."""
    now = datetime.now(UTC)
    row = {}
    for field in model._meta.sorted_fields:
        if field.name in ("created_at", "updated_at"):
            row[field.column_name] = now
        elif field.default is not None:
            default = field.default() if callable(field.default) else field.default
            row[field.column_name] = field.db_value(default)
    return row


PROBE = Entity("pg_temp", "migrate_probe")
CHECK_VIOLATION = "23514"


def violated_checks(snapshot, table, candidates, values):
    """The names among candidates whose CHECK refuses `values` in a temporary copy of table."""
    columns = snapshot.tables[table].columns
    insert = sql_text("INSERT INTO", PROBE, "(", NodeList([Entity(c) for c in values], ", "), ")")
    insert += " VALUES (" + ", ".join(["%s"] * len(values)) + ")"
    violated = set()
    with probe_transaction(snapshot.target) as ok:
        if not ok:
            return violated
        database.execute_sql(
            sql_text(
                "CREATE TEMP TABLE",
                PROBE,
                "(LIKE",
                Entity(table),
                "INCLUDING DEFAULTS INCLUDING CONSTRAINTS)",
            )
        )
        # No NOT NULL, and no default that evaluating would change something (a sequence).
        clauses = [
            sql_text("ALTER COLUMN", Entity(c), "DROP NOT NULL")
            for c, facts in columns.items()
            if facts.not_null
        ] + [
            sql_text("ALTER COLUMN", Entity(c), "DROP DEFAULT")
            for c, facts in columns.items()
            if facts.default is not None and not facts.pure_default
        ]
        if clauses:
            database.execute_sql(f"{sql_text('ALTER TABLE', PROBE)} {', '.join(clauses)}")
        for _ in range(len(snapshot.constraints) + 1):
            database.execute_sql("SAVEPOINT migrate_attempt")
            try:
                database.execute_sql(insert, list(values.values()))
                break
            except peewee.IntegrityError as exc:
                original = getattr(exc, "orig", exc)
                if getattr(original, "pgcode", None) != CHECK_VIOLATION:
                    break
                database.execute_sql("ROLLBACK TO SAVEPOINT migrate_attempt")
                name = original.diag.constraint_name
                if name in candidates:
                    violated.add(name)
                database.execute_sql(
                    sql_text("ALTER TABLE", PROBE, "DROP CONSTRAINT", Entity(name))
                )
    return violated


@contextmanager
def probe_transaction(target):
    """A transaction (or, inside one, a savepoint) that is rolled back whatever happens; yields
    False where a temporary table cannot be made (a standby)."""
    nested = database.connection().get_transaction_status() != TRANSACTION_STATUS_IDLE
    try:
        if nested:
            database.execute_sql("SAVEPOINT migrate_probe")
        else:
            database.execute_sql(f"BEGIN READ WRITE; {guard_sql()}", guard_params(target))
    except peewee.DatabaseError:
        yield False
        return
    try:
        yield True
    except peewee.DatabaseError:
        pass  # not evaluated: a lock not granted in time, a read-only server
    finally:
        database.execute_sql("ROLLBACK TO SAVEPOINT migrate_probe" if nested else "ROLLBACK")


# --- Foreign keys ----------------------------------------------------------------------------


def plan_foreign_keys(model, snapshot, drift, later):
    """A missing foreign key is added NOT VALID in the transaction and validated `later`."""
    table = model._meta.table_name
    changes = []
    mine = [c for c in snapshot.constraints if c.table == table and not c.inherited]
    for field in model._meta.refs:
        wanted = field.constraint_name
        rel_table = field.rel_model._meta.table_name
        add = render(model._schema._create_foreign_key(field))
        key = ("foreign key", table, wanted)
        validate = Statement(
            sql_text("ALTER TABLE", Entity(table), "VALIDATE CONSTRAINT", Entity(wanted)),
            f"validated foreign key {wanted}",
            (table,),
            # Its check reads the referenced table as SELECT ... FOR KEY SHARE does.
            VALIDATE_CONSTRAINT._replace(others=((rel_table, "RowShareLock"),)),
            ("validated foreign key", table, wanted),
            (("column", table, field.column_name),),
        )
        named = next((c for c in mine if c.name == wanted), None)
        other = next((c for c in mine if foreign_key_matches(c, field)), None)
        if named and not foreign_key_matches(named, field):
            problem = (
                f"foreign key {wanted} is {shown(named.definition)}; the models say"
                f" FOREIGN KEY ({field.column_name}) REFERENCES {rel_table}({field.rel_field.column_name})"
            )
            fix = [
                sql_text("ALTER TABLE", Entity(table), "DROP CONSTRAINT", Entity(wanted)),
                add + " NOT VALID",
                validate.sql,
            ]
            cost = (
                f"instant: DROP CONSTRAINT takes ACCESS EXCLUSIVE on {table} and {rel_table}"
                " (blocks reads and writes), ADD ... NOT VALID SHARE ROW EXCLUSIVE on both"
                f" (blocks writes), until COMMIT; then VALIDATE scans {table} online under"
                " SHARE UPDATE EXCLUSIVE (blocks no writer)"
            )
            drift.append(Drift(problem, fix, True, cost, key))
        elif named and not named.enforced:
            drift.append(
                Drift(
                    f"foreign key {wanted} is NOT ENFORCED: nothing checks {table}.{field.column_name}",
                    [
                        sql_text(
                            "ALTER TABLE",
                            Entity(table),
                            "ALTER CONSTRAINT",
                            Entity(wanted),
                            "ENFORCED",
                        )
                    ],
                    True,
                    f"scans {table} to validate it; SHARE ROW EXCLUSIVE on {table} (blocks writes) until COMMIT",
                    key,
                )
            )
        elif named and not named.validated:
            changes.append((later, validate))
        elif not named and other:
            problem = f"foreign key {table}.{field.column_name} is named {shown_name(other.name)}, not {wanted}"
            fix = sql_text(
                "ALTER TABLE",
                Entity(table),
                "RENAME CONSTRAINT",
                Entity(other.name),
                "TO",
                Entity(wanted),
            )
            drift.append(Drift(problem, [fix], True, INSTANT_ALTER.format(table=table), key))
        elif not named and later == "transaction":
            changes.append(
                (
                    "transaction",
                    Statement(
                        add,
                        f"added foreign key {wanted}",
                        (table, rel_table),
                        ADD_FOREIGN_KEY,
                        ("validated foreign key", table, wanted),
                        (("column", table, field.column_name),),
                    ),
                )
            )
        elif not named:
            not_valid = Statement(
                add + " NOT VALID",
                f"added foreign key {wanted} (NOT VALID)",
                (table, rel_table),
                ADD_FOREIGN_KEY_NOT_VALID,
                key,
                (("column", table, field.column_name),),
            )
            changes += [("transaction", not_valid), ("online", validate)]
    return changes


# --- Indexes --------------------------------------------------------------------------------


def plan_indexes(model, snapshot, drift, in_progress, later):
    table = model._meta.table_name
    changes = []
    for index in model._meta.fields_to_index():
        name = index._name
        live = snapshot.indexes.get(name)
        holder = snapshot.relations.get(name)
        if holder and (live is None or live.table != table):
            drift.append(index_name_held(model, index, holder, snapshot))
            continue
        if live is None or live.predicate is None and live.definition is None:
            # None: not there, or dropped while the catalog was read
            enforced_by = unique_constraint_for(index, table, snapshot)
            if enforced_by:
                drift.append(unique_constraint_drift(model, index, enforced_by))
            elif snapshot.tables[table].kind == "p":
                changes.append(build_index_on_only(model, index))
                changes += build_partition_indexes(model, index, snapshot, later)
            else:
                changes.append(build_index(model, index, later))
        elif differences := index_differences(live, model, index):
            drift.append(index_definition_drift(model, index, live, differences))
        elif not live.valid and live.partitioned:
            changes += build_partition_indexes(model, index, snapshot, later)
        elif not live.valid:
            changes += rebuild_invalid_index(model, index, snapshot, in_progress, later)
    return changes


# --- Indexes of a partitioned table ------------------------------------------------------
# CREATE INDEX CONCURRENTLY is refused on a partitioned table: the index is made on the
# parent alone (ON ONLY, instant, INVALID), built concurrently on each partition, and each
# partition's index attached; the parent's is valid once every partition has one.

CREATE_INDEX_ON_ONLY = Hazard("ShareLock", "writes", "instant: ON ONLY builds nothing")
ATTACH_INDEX = Hazard("AccessExclusiveLock", "queries that use the partition's index", "instant")


def build_index_on_only(model, index):
    table = model._meta.table_name
    sql = index_sql(model, index, safe=True).replace(
        f" ON {render(Entity(table))} ", f" ON ONLY {render(Entity(table))} ", 1
    )
    return "transaction", Statement(
        sql,
        f"created index {index._name} on {table} alone (valid once every partition has it)",
        (table,),
        CREATE_INDEX_ON_ONLY,
        ("index", table, index._name),
    )


def partition_index_name(partition, index_name, table):
    suffix = index_name.removeprefix(f"idx_{table}_")
    return f"{partition}_{suffix}".encode()[:63].decode(errors="ignore")


def build_partition_indexes(model, index, snapshot, later):
    """The index built on each partition that lacks it, then attached to the parent's."""
    table, name = model._meta.table_name, index._name
    changes = []
    for partition in sorted(t.name for t in snapshot.tables.values() if t.parent == table):
        if any(i.table == partition and i.parent == name for i in snapshot.indexes.values()):
            continue
        child = partition_index_name(partition, name, table)
        live = snapshot.indexes.get(child)
        if live is None or not live.valid:
            stage, build = build_index(model, index, later)
            sql = build.sql.replace(render(Entity(name)), render(Entity(child)), 1).replace(
                f" ON {render(Entity(table))} ", f" ON {render(Entity(partition))} ", 1
            )
            if live is not None:
                changes.append(
                    (
                        later,
                        Statement(
                            sql_text(
                                "DROP INDEX CONCURRENTLY IF EXISTS"
                                if later == "online"
                                else "DROP INDEX",
                                Entity(child),
                            ),
                            f"dropped invalid index {shown_name(child)}",
                            (partition,),
                            DROP_INDEX_CONCURRENTLY if later == "online" else DROP_INDEX,
                            ("dropped", partition, child),
                        ),
                    )
                )
            changes.append(
                (
                    stage,
                    build._replace(
                        sql=sql,
                        description=f"created index {shown_name(child)} for {name}",
                        tables=(partition,),
                        effect=("partition index", partition, child),
                    ),
                )
            )
        attach = Statement(
            sql_text("ALTER INDEX", Entity(name), "ATTACH PARTITION", Entity(child)),
            f"attached index {shown_name(child)} to {name}",
            (partition,),
            ATTACH_INDEX,
            ("attached index", partition, name),
            (("partition index", partition, child),),
        )
        changes.append(("transaction" if later == "transaction" else "attach", attach))
    return changes


def rebuild_invalid_index(model, index, snapshot, in_progress, later):
    table, name = model._meta.table_name, index._name
    builder = index_builder(snapshot.target, name)
    if builder:
        pid, application = builder
        in_progress.append(
            f"index {name} is being built by another session (pid {pid},"
            f" {shown(application) if application else 'no application_name'})"
        )
        return []
    online = later == "online"
    drop = Statement(
        sql_text("DROP INDEX CONCURRENTLY IF EXISTS" if online else "DROP INDEX", Entity(name)),
        f"dropped invalid index {name}",
        (table,),
        DROP_INDEX_CONCURRENTLY if online else DROP_INDEX,
        ("dropped", table, name),
    )
    rebuild = build_index(model, index, later, f"rebuilt index {name}", needs=[drop.effect])
    return [(later, drop), rebuild]


RENAME_VERBS = {
    "index": "ALTER INDEX",
    "partitioned index": "ALTER INDEX",
    "table": "ALTER TABLE",
    "partitioned table": "ALTER TABLE",
    "view": "ALTER VIEW",
    "materialized view": "ALTER MATERIALIZED VIEW",
    "sequence": "ALTER SEQUENCE",
    "foreign table": "ALTER FOREIGN TABLE",
    "composite type": "ALTER TYPE",
}


def index_name_held(model, index, holder, snapshot):
    """An index of the models whose name another relation holds: no run can build it."""
    table, name = model._meta.table_name, index._name
    where = f" on table {shown_name(holder.table)}" if holder.table else ""
    unique = " (until then nothing stops duplicate values)" if index._unique else ""
    new_name = free_name(f"{name}_{holder.table or 'old'}", snapshot)
    fix = []
    verb = RENAME_VERBS.get(holder.kind)
    if verb:
        fix.append(sql_text(verb, Entity(holder.name), "RENAME TO", Entity(new_name)))
    return Drift(
        f"index {name} of {table} is not built: its name is held by the {holder.kind}"
        f" {shown_name(holder.name)}{where}; rename that {holder.kind} and rerun{unique}",
        fix,
        bool(fix),
        f"instant; ACCESS EXCLUSIVE on {shown_name(holder.table or holder.name)} until COMMIT",
        ("index", table, name),
    )


def free_name(base, snapshot):
    """base (at most 63 bytes), or base with a number, not held by any relation of the schema."""
    base = base.encode()[:59].decode(errors="ignore")
    candidate, number = base, 1
    while candidate in snapshot.relations:
        candidate, number = f"{base}_{number}", number + 1
    return candidate


def index_definition_drift(model, index, live, differences):
    """An index of the models' name whose definition differs: rebuilt online under a new name, then swapped."""
    table, name = model._meta.table_name, index._name
    shown_definition = shown(live.definition) if live.definition else "?"
    replacement = f"{name}_new"[:63]
    build = index_sql(model, index, concurrently=True).replace(
        render(Entity(name)), render(Entity(replacement)), 1
    )
    if live.partitioned:
        drop = sql_text("DROP INDEX", Entity(name))
        cost = (
            "a partitioned index cannot be built or dropped concurrently: DROP INDEX takes"
            f" ACCESS EXCLUSIVE on {table} and every partition; rebuild it with"
            " python migrate.py --partition-request-logs after dropping it"
        )
        fix = [drop]
    else:
        drop = sql_text("DROP INDEX CONCURRENTLY", Entity(name))
        rename = sql_text("ALTER INDEX", Entity(replacement), "RENAME TO", Entity(name))
        fix, cost = [build, drop, rename], ONLINE_INDEX
    return Drift(
        f"index {name} differs from the models ({'; '.join(differences)}): it is {shown_definition}",
        fix,
        not live.partitioned,
        cost,
        ("index", table, name),
    )


def unique_constraint_drift(model, index, constraint):
    table = model._meta.table_name
    return Drift(
        f"{table}: uniqueness of ({', '.join(constraint.columns)}) is enforced by UNIQUE"
        f" constraint {shown_name(constraint.name)} instead of unique index {index._name}",
        [
            index_sql(model, index, concurrently=True),
            sql_text("ALTER TABLE", Entity(table), "DROP CONSTRAINT", Entity(constraint.name)),
        ],
        True,
        f"builds online under SHARE UPDATE EXCLUSIVE (CREATE INDEX CONCURRENTLY blocks no"
        f" writer); then DROP CONSTRAINT, instant, takes ACCESS EXCLUSIVE on {table} (blocks"
        " reads and writes) until COMMIT",
        ("index", table, index._name),
    )


def unique_constraint_for(index, table, snapshot):
    """The UNIQUE constraint that already enforces a unique index's columns, if any."""
    if not index._unique:
        return None
    for constraint in snapshot.constraints:
        if (
            constraint.table == table
            and constraint.kind == "u"
            and constraint.columns == index_columns(index)
        ):
            return constraint
    return None


# --- What the models do not declare ---------------------------------------------------------


def unknown_objects(snapshot, models):
    """Tables, columns, indexes and constraints the models don't declare."""
    known = {model._meta.table_name: model for model in models}
    unknown = []
    for table, facts in sorted(snapshot.tables.items()):
        model = known.get(table)
        if model is None:
            if facts.parent not in known:
                unknown.append(Unknown("table", None, table))
            continue
        declared = {field.column_name for field in model._meta.sorted_fields}
        unknown += [Unknown("column", table, c) for c in facts.columns if c not in declared]
    declared_indexes = {index._name for model in models for index in model._meta.fields_to_index()}
    unknown += [
        Unknown("index", index.table, name)
        for name, index in sorted(snapshot.indexes.items())
        if index.table in known and name not in declared_indexes and not index.backs_constraint
    ]
    unknown += [
        Unknown("constraint", c.table, c.name)
        for c in snapshot.constraints
        if c.table in known and not declared_by(known[c.table], c)
    ]
    return unknown


def declared_by(model, constraint):
    """Whether the model declares this FK or uniqueness (under any name)."""
    if constraint.kind == "f":
        return any(foreign_key_matches(constraint, field) for field in model._meta.refs)
    return constraint.kind == "u" and any(
        index._unique and constraint.columns == index_columns(index)
        for index in model._meta.fields_to_index()
    )


def describe_unknown(item):
    where = f"{item.table}." if item.table else ""
    return f"{item.kind} {shown(where)}{shown_name(item.name)}"


# --- Checking what a stage did -------------------------------------------------------------


def unmet(statement, plan):
    """Why the statement's effect is not what the models give in the catalog `plan` was made
    from, or None when it is: the object exists, valid, on the model's table, as the models
    define it."""
    kind, table, name = statement.effect
    snapshot = plan.snapshot
    if kind == "comment":
        model = next(m for m in plan.models if m._meta.table_name == table)
        facts = snapshot.tables.get(table)
        return (
            None if facts and facts.comment == model._meta.comment else "the comment is not there"
        )
    if kind == "dropped":
        live = snapshot.indexes.get(name)
        return None if live is None or live.valid else "the INVALID index is still there"
    if kind == "table":
        open_columns = [k for k in plan.open_keys() if k[0] == "column" and k[1] == table]
        if table in snapshot.tables and not open_columns:
            return None
    elif statement.effect not in plan.open_keys():
        return None
    concerned = {statement.effect} | (
        {k for k in plan.open_keys() if k[:2] == ("column", table)} if kind == "table" else set()
    )
    reasons = [drift.problem for drift in plan.drift if drift.key in concerned]
    reasons += [s.description for s in plan.pending if s.effect in concerned]
    return "; ".join(reasons) or "it is still pending"


# --- Reporting --------------------------------------------------------------------------


def hazard_comment(statement, tables, until_commit=False):
    """'-- locks users ACCESS EXCLUSIVE (blocks reads and writes until COMMIT); instant, no rewrite; users ~3 rows',
    with '; also locks api_keys SHARE ROW EXCLUSIVE, ...' after the main lock for its other tables."""
    hazard = statement.hazard
    also = also_locks_words(hazard)
    if hazard.lock is None:
        return f"-- {hazard.work}: blocks nothing{also}"
    names = ", ".join(shown_name(table) for table in statement.tables)
    sizes = ", ".join(size_words(table, tables) for table in statement.tables)
    held = " until COMMIT" if until_commit and hazard.blocks != "nothing" else ""
    line = (
        f"-- locks {names} {lock_name(hazard.lock)} (blocks {hazard.blocks}{held}){also};"
        f" {hazard.work}"
    )
    return f"{line}; {sizes}" if sizes else line.replace("-- locks  ", "-- locks ", 1)


def also_locks_words(hazard):
    """'; also locks request_logs_default ACCESS EXCLUSIVE, users SHARE ROW EXCLUSIVE', or ''."""
    if not hazard.others:
        return ""
    return "; also locks " + ", ".join(
        f"{shown_name(table)} {lock_name(mode)}" for table, mode in hazard.others
    )


def size_words(table, tables):
    """The planner's estimate (pg_class.reltuples), which VACUUM and ANALYZE keep up."""
    rows = tables[table].rows if table in tables else None
    name = shown_name(table)
    return f"{name} ~? rows (not analyzed yet)" if rows is None else f"{name} ~{rows:,} rows"


def with_hazards(statements, tables, until_commit=False):
    lines = []
    for statement in statements:
        lines += [hazard_comment(statement, tables, until_commit), statement.sql + ";"]
    return lines


STEP_KINDS = {
    "transaction": "in one short transaction",
    "online": "one statement at a time",
    "batched": "repeated until it changes no row, each batch its own transaction",
    "catch-up": "repeated until a batch replays fewer than 50 changes, each its own transaction",
}


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


UNICODE_ESCAPE = re.compile(r"\\([0-9A-F]{4})|\\\+([0-9A-F]{6})")


def runnable(drift):
    """Whether a drift's fix may run as printed: safe, and able to name what it names. On a
    SQL_ASCII server a U&"..." escape above 007F cannot name the raw bytes of a name."""
    if not drift.safe:
        return False
    if not text_limits["raw_server_bytes"]:
        return True
    return not any(
        int(match.group(1) or match.group(2), 16) > 0x7F
        for statement in drift.fix
        for match in UNICODE_ESCAPE.finditer(statement)
    )


def drift_lines(drift):
    """A drift as SQL to review: the problem and cost as comments, the fix (commented when unsafe)."""
    statements = [statement + ";" for statement in drift.fix]
    if not drift.fix:
        statements = ["(no statement: see above)"]
    return [f"-- {drift.problem}", f"--   cost: {drift.cost}"] + (
        statements if runnable(drift) else commented(statements)
    )


def report(plan):
    """The pending changes with their hazards, the drift and the unknown objects, as SQL to review."""
    lines = []
    tables = plan.snapshot.tables
    if plan.blocked:
        lines.append("-- blocked: no run adds anything until these are resolved")
        for blocker in plan.blocked:
            lines.append("-- " + blocker.reason)
            lines += commented(step + ";" for step in blocker.steps)
    if plan.transaction:
        lines.append("-- pending, in one transaction:")
        lines += with_hazards(plan.transaction, tables, until_commit=True)
    if plan.online:
        lines.append("-- pending, online after the transaction (one statement at a time):")
        lines += with_hazards(plan.online, tables)
    for step in plan.steps:
        lines.append(f"-- pending, then: {step.name} ({STEP_KINDS[step.kind]}):")
        lines += with_hazards(step.statements, tables, until_commit=step.kind == "transaction")
    if plan.in_progress:
        lines.append("-- in progress in another session (left to it):")
        lines += ["--   " + item for item in plan.in_progress]
    if plan.drift:
        lines.append(
            "-- drift: migrate.py leaves these alone; review the SQL before running it"
            " (a commented-out fix would change or refuse stored values)"
        )
        for drift in plan.drift:
            lines += drift_lines(drift)
    if plan.unknown:
        lines.append("-- not in the models (left alone):")
        lines += ["--   " + describe_unknown(item) for item in plan.unknown]
    return "\n".join(one_line(line) for line in lines) + "\n" if lines else ""


def search_path_line(target):
    """The statement that puts psql, fed this output, in the schema the plan is for."""
    return sql_text("SET search_path TO", Entity(target.name)) + ", pg_temp;"


def schema_sql():
    """schema.sql: the whole schema, safe to run twice with psql -f."""
    lines = ["-- Generated by `python migrate.py --sql` from models.py; do not edit.", "BEGIN;"]
    for model in MODELS:
        lines.append(render(model._schema._create_table(safe=True)) + ";")
        meta = model._meta
        lines.append(
            sql_text("COMMENT ON TABLE", Entity(meta.table_name), "IS", Value(meta.comment)) + ";"
        )
        lines += [index_sql(model, index, safe=True) + ";" for index in meta.fields_to_index()]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"
