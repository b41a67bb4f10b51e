"""
Compare the models with a catalog snapshot: what to add, in which stage, at what cost.

Usage::

    from catalog import read_catalog
    from plan import plan_changes, report

    plan = plan_changes(read_catalog())          # online: the default
    plan = plan_changes(read_catalog(), atomic=True)
    print(report(plan))                          # what --check prints

A plan has two stages of additive statements and two lists for a human:

- ``transaction``: run in one transaction, all or nothing. New tables with
  their comment and indexes; columns added to existing tables (instant: a
  constant DEFAULT needs no rewrite); foreign keys on existing tables as
  ``NOT VALID`` (instant; with ``atomic`` they are checked here instead).
- ``online``: run after the commit, one statement at a time, blocking no
  writer: ``CREATE INDEX CONCURRENTLY`` and ``VALIDATE CONSTRAINT`` on
  existing tables (with ``atomic`` these go into the transaction, where they
  block writes while they scan).
- ``drift``: what differs and is left alone, each with the SQL that would fix it.
- ``unknown``: tables, columns, indexes and constraints the models don't declare.
  ``in_progress``: indexes another session is building right now.

Every statement carries its hazard: the lock it takes, what that lock
blocks, and whether it scans the table.
"""

import re
from collections import namedtuple

from peewee import SQL, BigIntegerField, Entity, NodeList, Value, ValueLiterals
from playhouse.migrate import PostgresqlMigrator

from catalog import Column, bounded, index_builder
from connection import MigrationError
from models import MODELS, database

# --- Hazards ---------------------------------------------------------------------

Hazard = namedtuple("Hazard", "lock blocks work")
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


def lock_name(mode):
    """'ShareRowExclusiveLock' -> 'SHARE ROW EXCLUSIVE', as the LOCK TABLE docs spell it."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", mode.removesuffix("Lock")).upper()


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


def render(node):
    """SQL text of a Peewee node with every value inlined, ready to print or run."""
    sql, params = database.get_sql_context().sql(ValueLiterals(node)).query()
    assert not params, sql
    return sql


def sql_text(*parts):
    """SQL from keywords (str) and Peewee nodes (Entity for names), e.g. sql_text("DROP INDEX", Entity(n))."""
    return render(NodeList([SQL(part) if isinstance(part, str) else part for part in parts]))


def sql_of(operation):
    """The SQL of a playhouse.migrate operation, without running it."""
    sql, params = operation.fn(operation.migrator, *operation.args, **operation.kwargs).query()
    assert not params, sql
    return sql


def expected_column(field):
    """The Column the catalog shows for a field, in PostgreSQL's own spelling."""
    ddl_type = render(field.ddl_datatype(database.get_sql_context()))
    if ddl_type.startswith("VARCHAR"):
        type_ = "character varying" + ddl_type[len("VARCHAR") :]
    else:
        type_ = PG_TYPE_NAMES[ddl_type]
    if field.primary_key:
        default = f"nextval('{field.model._meta.table_name}_{field.column_name}_seq'::regclass)"
    else:
        default = server_default(field)
        if default and default.startswith("'"):  # PostgreSQL adds the cast to a literal
            default = f"{default}::{type_.split('(')[0]}"
    return Column(type_, not field.null, default)


def server_default(field):
    """The SQL DEFAULT expression declared on a field, or None."""
    for constraint in field.constraints or ():
        if constraint.sql.startswith("DEFAULT "):
            return constraint.sql[len("DEFAULT ") :]
    return None


def comparable(index_definition):
    """An index definition without what Peewee and pg_get_indexdef spell differently.

    Both then read 'CREATE INDEX name ON table (col DESC) WHERE (col IS NULL)'.
    """
    text = index_definition.replace('"', "").replace(" IF NOT EXISTS", "")
    text = text.replace(" CONCURRENTLY", "").replace(" USING btree", "")
    return re.sub(r" ON [^ .]+\.", " ON ", text)  # the schema, whatever its name


def index_columns(index):
    """The column names an index covers, in order (None for an expression)."""
    return [
        getattr(getattr(part, "node", part), "column_name", None) for part in index._expressions
    ]


# --- Planning -------------------------------------------------------------------------

Statement = namedtuple("Statement", "sql description tables hazard")
Drift = namedtuple("Drift", "problem fix")


class Plan(namedtuple("Plan", "transaction online drift unknown in_progress snapshot")):
    """What a run does (two stages of statements) and what it leaves to a human."""

    @property
    def pending(self):
        return self.transaction + self.online


def plan_changes(snapshot, atomic=False, models=MODELS):
    """Compare the live schema with the models: staged additions, drift, unknowns."""
    stages = {"transaction": [], "online": []}
    drift, in_progress = [], []
    for model in models:
        table = model._meta.table_name
        if table not in snapshot.columns:
            stages["transaction"] += create_table(model)
            continue
        later = "transaction" if atomic else "online"
        for stage, statement in (
            plan_columns(model, snapshot, drift)
            + plan_foreign_keys(model, snapshot, drift, later)
            + plan_indexes(model, snapshot, drift, in_progress, later)
        ):
            stages[stage].append(statement)
    unknown = unknown_objects(snapshot, models)
    return Plan(stages["transaction"], stages["online"], drift, unknown, in_progress, snapshot)


def create_table(model, safe=False):
    meta = model._meta
    table = meta.table_name
    referenced = tuple(sorted({field.rel_model._meta.table_name for field in meta.refs}))
    comment = sql_text("COMMENT ON TABLE", Entity(table), "IS", Value(meta.comment))
    return [
        Statement(
            render(model._schema._create_table(safe=safe)),
            f"created table {table}",
            referenced,
            CREATE_TABLE if referenced else NEW_TABLE,
        ),
        Statement(comment, f"commented table {table}", (), NEW_TABLE),
    ] + [
        Statement(index_sql(model, index, safe=safe), f"created index {index._name}", (), NEW_TABLE)
        for index in meta.fields_to_index()
    ]


def index_sql(model, index, safe=False, concurrently=False):
    sql = render(model._schema._create_index(index, safe=safe))
    if concurrently:  # Peewee's Index has no CONCURRENTLY option
        sql = sql.replace(" INDEX ", " INDEX CONCURRENTLY ", 1)
    return sql


def build_index(model, index, stage, description=None):
    """(stage, Statement) that builds index on an existing table: concurrently when online."""
    online = stage == "online"
    return stage, Statement(
        index_sql(model, index, safe=online, concurrently=online),
        description or f"created index {index._name}",
        (model._meta.table_name,),
        CREATE_INDEX_CONCURRENTLY if online else CREATE_INDEX,
    )


def plan_columns(model, snapshot, drift):
    table = model._meta.table_name
    live = snapshot.columns[table]
    additions = []
    for field in model._meta.sorted_fields:
        expected = expected_column(field)
        actual = live.get(field.column_name)
        if actual is None:
            additions.append(("transaction", add_column(model, field, expected)))
        elif actual != expected:
            drift += column_drift(table, field, actual, expected)
    return additions


def add_column(model, field, expected):
    """ADD COLUMN in one statement: a constant DEFAULT needs no table rewrite on PostgreSQL 11+.

    playhouse's add_column instead adds it nullable, UPDATEs every row and
    then sets NOT NULL.
    """
    table = model._meta.table_name
    if expected.not_null and expected.default is None and table_has_rows(table):
        raise MigrationError(
            f"cannot add NOT NULL column {table}.{field.column_name} without a default to a table"
            f" that has rows: give it a database default in models.py"
            f" ({field.name} = {type(field).__name__}(**server_default(VALUE))), or add it"
            " nullable (null=True), backfill, then SET NOT NULL"
        )
    column = field.ddl(database.get_sql_context())
    sql = sql_text("ALTER TABLE", Entity(table), "ADD COLUMN IF NOT EXISTS", column)
    return Statement(sql, f"added column {table}.{field.column_name}", (table,), ADD_COLUMN)


def table_has_rows(table):
    query = sql_text("SELECT EXISTS (SELECT 1 FROM", Entity(table), ")")
    return database.execute_sql(bounded(query)).fetchone()[0]


def column_drift(table, field, actual, expected):
    migrator = PostgresqlMigrator(database)
    column = field.column_name
    where = f"{table}.{column}"
    drift = []
    if actual.type != expected.type:
        # BIGSERIAL is no type to ALTER to.
        typed = BigIntegerField() if field.primary_key else field
        drift.append(
            Drift(
                f"{where} is {actual.type}; the models say {expected.type} (the fix rewrites the table)",
                sql_of(migrator.alter_column_type(table, column, typed)),
            )
        )
    if actual.not_null != expected.not_null:
        wanted = "NOT NULL" if expected.not_null else "nullable"
        fix = migrator.add_not_null if expected.not_null else migrator.drop_not_null
        drift.append(Drift(f"{where} should be {wanted}", sql_of(fix(table, column))))
    if actual.default != expected.default:
        if expected.default is None:
            fix = sql_of(migrator.drop_column_default(table, column))
        else:
            fix = sql_of(migrator.add_column_default(table, column, SQL(expected.default)))
        drift.append(
            Drift(
                f"{where} default is {actual.default or 'none'}; the models say {expected.default or 'none'}",
                fix,
            )
        )
    return drift


def plan_foreign_keys(model, snapshot, drift, later):
    """A missing foreign key is added NOT VALID in the transaction and validated `later`."""
    table = model._meta.table_name
    changes = []
    for field in model._meta.refs:
        wanted = field.constraint_name
        rel_table = field.rel_model._meta.table_name
        add = render(model._schema._create_foreign_key(field))
        validate = Statement(
            sql_text("ALTER TABLE", Entity(table), "VALIDATE CONSTRAINT", Entity(wanted)),
            f"validated foreign key {wanted}",
            (table,),
            VALIDATE_CONSTRAINT,
        )
        expected = f"FOREIGN KEY ({field.column_name}) REFERENCES {rel_table}({field.rel_field.column_name})"
        mine = [c for c in snapshot.constraints if c.table == table]
        named = next((c for c in mine if c.name == wanted), None)
        other = next(
            (
                c
                for c in mine
                if c.kind == "f" and c.columns == [field.column_name] and c.ref_table == rel_table
            ),
            None,
        )
        if named and named.definition.removesuffix(" NOT VALID") != expected:
            problem = f"foreign key {wanted} is '{named.definition}'; the models say '{expected}'"
            fix = sql_text("ALTER TABLE", Entity(table), "DROP CONSTRAINT", Entity(wanted))
            drift.append(Drift(problem, fix + ";\n" + add))
        elif named and not named.validated:
            changes.append((later, validate))
        elif not named and other:
            problem = f"foreign key {table}.{field.column_name} is named {other.name}, not {wanted}"
            fix = sql_text(
                "ALTER TABLE",
                Entity(table),
                "RENAME CONSTRAINT",
                Entity(other.name),
                "TO",
                Entity(wanted),
            )
            drift.append(Drift(problem, fix))
        elif not named and later == "transaction":
            changes.append(
                (
                    "transaction",
                    Statement(
                        add, f"added foreign key {wanted}", (table, rel_table), ADD_FOREIGN_KEY
                    ),
                )
            )
        elif not named:
            not_valid = Statement(
                add + " NOT VALID",
                f"added foreign key {wanted} (NOT VALID)",
                (table, rel_table),
                ADD_FOREIGN_KEY_NOT_VALID,
            )
            changes += [("transaction", not_valid), ("online", validate)]
    return changes


def plan_indexes(model, snapshot, drift, in_progress, later):
    table = model._meta.table_name
    changes = []
    for index in model._meta.fields_to_index():
        name = index._name
        wanted = index_sql(model, index)
        live = snapshot.indexes.get(name)
        if live is None or live.definition is None:  # None: dropped while the catalog was read
            enforced_by = unique_constraint_for(index, table, snapshot)
            if enforced_by:
                drift.append(unique_constraint_drift(model, index, enforced_by))
            else:
                changes.append(build_index(model, index, later))
        elif comparable(live.definition) != comparable(wanted):
            drift.append(
                Drift(
                    f"index {name} is '{live.definition}'; the models say '{comparable(wanted)}'",
                    sql_text("DROP INDEX CONCURRENTLY", Entity(name))
                    + ";\n"
                    + index_sql(model, index, concurrently=True),
                )
            )
        elif not live.valid:
            builder = index_builder(name)
            if builder:
                pid, application = builder
                in_progress.append(
                    f"index {name} is being built by another session (pid {pid}, {application or 'no application_name'})"
                )
                continue
            online = later == "online"
            drop = Statement(
                sql_text(
                    "DROP INDEX CONCURRENTLY IF EXISTS" if online else "DROP INDEX", Entity(name)
                ),
                f"dropped invalid index {name}",
                (table,),
                DROP_INDEX_CONCURRENTLY if online else DROP_INDEX,
            )
            changes += [(later, drop), build_index(model, index, later, f"rebuilt index {name}")]
    return changes


def unique_constraint_drift(model, index, constraint):
    table = model._meta.table_name
    return Drift(
        f"{table}: uniqueness of ({', '.join(constraint.columns)}) is enforced by UNIQUE"
        f" constraint {constraint.name} instead of unique index {index._name}",
        index_sql(model, index, concurrently=True)
        + ";\n"
        + sql_text("ALTER TABLE", Entity(table), "DROP CONSTRAINT", Entity(constraint.name)),
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


def unknown_objects(snapshot, models):
    """Tables, columns, indexes and constraints the models don't declare."""
    known = {model._meta.table_name: model for model in models}
    unknown = []
    for table, columns in sorted(snapshot.columns.items()):
        model = known.get(table)
        if model is None:
            unknown.append(f"table {table}")
            continue
        declared = {field.column_name for field in model._meta.sorted_fields}
        unknown += [f"column {table}.{column}" for column in columns if column not in declared]
    declared_indexes = {index._name for model in models for index in model._meta.fields_to_index()}
    unknown += [
        f"index {index.table}.{name}"
        for name, index in sorted(snapshot.indexes.items())
        if index.table in known and name not in declared_indexes and not index.backs_constraint
    ]
    unknown += [
        f"constraint {c.table}.{c.name}"
        for c in snapshot.constraints
        if c.table in known and not declared_by(known[c.table], c)
    ]
    return unknown


def declared_by(model, constraint):
    """Whether the model declares this FK or uniqueness (under any name)."""
    if constraint.kind == "f":
        return any(
            constraint.columns == [field.column_name]
            and constraint.ref_table == field.rel_model._meta.table_name
            for field in model._meta.refs
        )
    return any(
        index._unique and constraint.columns == index_columns(index)
        for index in model._meta.fields_to_index()
    )


# --- Reporting --------------------------------------------------------------------------


def hazard_comment(statement, rows):
    """'-- locks users ACCESS EXCLUSIVE (blocks reads and writes); instant, no rewrite; users ~3 rows'."""
    hazard = statement.hazard
    if hazard.lock is None:
        return f"-- {hazard.work}: blocks nothing"
    tables = ", ".join(statement.tables)
    sizes = ", ".join(row_estimate(table, rows.get(table)) for table in statement.tables)
    return f"-- locks {tables} {lock_name(hazard.lock)} (blocks {hazard.blocks}); {hazard.work}; {sizes}"


def row_estimate(table, rows):
    """The planner's estimate (pg_class.reltuples), which VACUUM and ANALYZE keep up."""
    return f"{table} ~? rows (not analyzed yet)" if rows is None else f"{table} ~{rows:,} rows"


def with_hazards(statements, rows):
    lines = []
    for statement in statements:
        lines += [hazard_comment(statement, rows), statement.sql + ";"]
    return lines


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def report(plan):
    """The pending changes with their hazards, the drift and the unknown objects, as SQL to review."""
    lines = []
    if plan.transaction:
        lines.append("-- pending, in one transaction:")
        lines += with_hazards(plan.transaction, plan.snapshot.rows)
    if plan.online:
        lines.append("-- pending, online after the transaction (one statement at a time):")
        lines += with_hazards(plan.online, plan.snapshot.rows)
    if plan.in_progress:
        lines.append("-- in progress in another session (left to it):")
        lines += ["--   " + item for item in plan.in_progress]
    if plan.drift:
        lines.append("-- drift: migrate.py leaves these alone; review the SQL before running it")
        for drift in plan.drift:
            lines += ["-- " + drift.problem, drift.fix + ";"]
    if plan.unknown:
        lines.append("-- not in the models (left alone):")
        lines += ["--   " + item for item in plan.unknown]
    return "\n".join(lines) + "\n" if lines else ""


def schema_sql():
    """schema.sql: the whole schema, safe to run twice with psql -f."""
    lines = ["-- Generated by `python migrate.py --sql` from models.py; do not edit.", "BEGIN;"]
    lines += [
        statement.sql + ";" for model in MODELS for statement in create_table(model, safe=True)
    ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"
