"""
Bring a PostgreSQL database to the schema of models.py: add what is missing, report drift.

Usage::

    export DATABASE_URL="host=localhost user=postgres dbname=api_aggregator port=5432"
    python migrate.py                  # add what is missing, in one transaction
    python migrate.py --concurrently   # ... building indexes on existing tables concurrently
    python migrate.py --dry-run        # print the SQL a run would execute; change nothing
    python migrate.py --check          # print pending changes and drift; exit 1 if any
    python migrate.py --sql > schema.sql   # the whole schema as plain SQL

A run reads the catalog (three queries), compares it with the models and
makes a plan: tables, columns, foreign keys and indexes to add, and drift
(types, nullability, defaults, index definitions, names) to report with the
SQL that would fix it. Nothing to add means no lock and no DDL, so the run
never queues behind the application's transactions. Otherwise it takes an
advisory lock (replicas starting together do the work once), reads the
catalog again and applies the additions in one transaction, then, with
--concurrently, builds indexes on existing tables with CREATE INDEX
CONCURRENTLY.

Exit codes: 0 success, 1 --check found pending changes or drift, 2 error.
Errors are one line on stderr; a password is never printed.
"""

import argparse
import logging
import os
import re
import sys
import time
from collections import namedtuple

import peewee
from peewee import SQL, BigIntegerField, Entity, NodeList, Value, ValueLiterals
from playhouse.migrate import PostgresqlMigrator

from connection import DEFAULT_DATABASE_URL, MigrationError, connect, connection_params, describe
from models import MODELS, database

EXIT_OK, EXIT_PENDING, EXIT_ERROR = 0, 1, 2
DEFAULT_LOCK_TIMEOUT = 5.0  # seconds
# Advisory lock keys the application must not use for its own locks: one for
# the transaction, one for concurrent index builds. They differ because a run
# waiting for the transaction lock while another builds an index concurrently
# would deadlock with it (the build waits for the waiter's snapshot).
TRANSACTION_LOCK_KEY = 7_283_145_019_226_431
INDEX_BUILD_LOCK_KEY = 7_283_145_019_226_432

log = logging.getLogger("migrate")


# --- Reading the catalog ----------------------------------------------------

Column = namedtuple("Column", "type not_null default")
Index = namedtuple("Index", "table definition valid backs_constraint")
Constraint = namedtuple("Constraint", "table name kind columns ref_table definition")
Snapshot = namedtuple("Snapshot", "columns indexes constraints")

# One query per kind of object, whatever the number of tables: Peewee's
# get_columns/get_indexes/get_foreign_keys, and playhouse.schema_diff built on
# them, cost three queries per table (bench.py, 80 tables: 241 queries and
# 0.49 s, against 3 and 29 ms here), and they report neither a varchar's
# length nor whether an index is valid.
COLUMNS_QUERY = """
SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       pg_get_expr(d.adbin, d.adrelid)
FROM pg_class c
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""
INDEXES_QUERY = """
SELECT t.relname, i.relname, pg_get_indexdef(i.oid), x.indisvalid,
       x.indisprimary OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid)
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relnamespace = current_schema()::regnamespace
"""
CONSTRAINTS_QUERY = """
SELECT t.relname, k.conname, k.contype,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
       r.relname, pg_get_constraintdef(k.oid)
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.conrelid
LEFT JOIN pg_class r ON r.oid = k.confrelid
WHERE k.connamespace = current_schema()::regnamespace AND k.contype IN ('f', 'u')
ORDER BY t.relname, k.conname
"""


def read_catalog():
    """The live schema: tables and their columns, indexes, FK and UNIQUE constraints."""
    columns = {}
    for table, column, type_, not_null, default in database.execute_sql(COLUMNS_QUERY):
        table_columns = columns.setdefault(table, {})
        if column is not None:
            table_columns[column] = Column(type_, not_null, default)
    indexes = {row[1]: Index(row[0], *row[2:]) for row in database.execute_sql(INDEXES_QUERY)}
    constraints = [Constraint(*row) for row in database.execute_sql(CONSTRAINTS_QUERY)]
    return Snapshot(columns, indexes, constraints)


# --- What the models expect ---------------------------------------------------

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
    return re.sub(r" ON \w+\.", " ON ", text)


# --- Planning -----------------------------------------------------------------

Statement = namedtuple("Statement", "sql description")
Drift = namedtuple("Drift", "problem fix")


class Plan(namedtuple("Plan", "in_transaction concurrent drift unknown")):
    """What a run does: statements in one transaction, then concurrent index
    builds; and what it leaves to a human: drift (with the SQL that would fix
    it) and objects the models don't know."""

    @property
    def pending(self):
        return self.in_transaction + self.concurrent


def plan_changes(snapshot, concurrently=False, models=MODELS):
    """Compare the live schema with the models: additive changes, drift, unknowns."""
    in_transaction, concurrent, drift = [], [], []
    for model in models:
        table = model._meta.table_name
        if table not in snapshot.columns:
            in_transaction += create_table(model)
            continue
        columns, column_drift = plan_columns(model, snapshot)
        foreign_keys, fk_drift = plan_foreign_keys(model, snapshot)
        index_builds, index_drift = plan_indexes(model, snapshot, concurrently)
        in_transaction += columns + foreign_keys + (index_builds if not concurrently else [])
        concurrent += index_builds if concurrently else []
        drift += column_drift + fk_drift + index_drift
    return Plan(in_transaction, concurrent, drift, unknown_objects(snapshot, models))


def create_table(model, safe=False):
    meta = model._meta
    comment = sql_text("COMMENT ON TABLE", Entity(meta.table_name), "IS", Value(meta.comment))
    return [
        Statement(
            render(model._schema._create_table(safe=safe)), f"created table {meta.table_name}"
        ),
        Statement(comment, f"commented table {meta.table_name}"),
    ] + [create_index(model, index, safe=safe) for index in meta.fields_to_index()]


def create_index(model, index, safe=False, concurrently=False):
    sql = render(model._schema._create_index(index, safe=safe))
    if concurrently:  # Peewee's Index has no CONCURRENTLY option
        sql = sql.replace(" INDEX ", " INDEX CONCURRENTLY ", 1)
    return Statement(sql, f"created index {index._name}")


def plan_columns(model, snapshot):
    table = model._meta.table_name
    live = snapshot.columns[table]
    additions, drift = [], []
    for field in model._meta.sorted_fields:
        expected = expected_column(field)
        actual = live.get(field.column_name)
        if actual is None:
            additions.append(add_column(model, field, expected))
        elif actual != expected:
            drift += column_drift(table, field, actual, expected)
    return additions, drift


def add_column(model, field, expected):
    """ADD COLUMN in one statement: a constant DEFAULT needs no table rewrite on PostgreSQL 11+.

    playhouse's add_column instead adds it nullable, UPDATEs every row and
    then sets NOT NULL.
    """
    table = model._meta.table_name
    if expected.not_null and expected.default is None and table_has_rows(table):
        raise MigrationError(
            f"cannot add NOT NULL column {table}.{field.column_name} without a default to a table"
            " that has rows: give it a default in models.py, or add it nullable, backfill, then SET NOT NULL"
        )
    column = field.ddl(database.get_sql_context())
    sql = sql_text("ALTER TABLE", Entity(table), "ADD COLUMN", column)
    return Statement(sql, f"added column {table}.{field.column_name}")


def table_has_rows(table):
    query = sql_text("SELECT EXISTS (SELECT 1 FROM", Entity(table), ")")
    return database.execute_sql(query).fetchone()[0]


def column_drift(table, field, actual, expected):
    migrator = PostgresqlMigrator(database)
    column = field.column_name
    where = f"{table}.{column}"
    drift = []
    if actual.type != expected.type:
        typed = (
            BigIntegerField() if field.primary_key else field
        )  # BIGSERIAL is no type to ALTER to
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
            fix = sql_of(migrator.add_column_default(table, column, SQL(server_default(field))))
        drift.append(
            Drift(
                f"{where} default is {actual.default or 'none'}; the models say {expected.default or 'none'}",
                fix,
            )
        )
    return drift


def plan_foreign_keys(model, snapshot):
    table = model._meta.table_name
    additions, drift = [], []
    for field in model._meta.refs:
        wanted = field.constraint_name
        add = render(model._schema._create_foreign_key(field))
        rel_table = field.rel_model._meta.table_name
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
        if named and named.definition != expected:
            problem = f"foreign key {wanted} is '{named.definition}'; the models say '{expected}'"
            fix = sql_text("ALTER TABLE", Entity(table), "DROP CONSTRAINT", Entity(wanted))
            drift.append(Drift(problem, fix + ";\n" + add))
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
        elif not named:
            additions.append(Statement(add, f"added foreign key {wanted}"))
    return additions, drift


def plan_indexes(model, snapshot, concurrently):
    table = model._meta.table_name
    builds, drift = [], []
    for index in model._meta.fields_to_index():
        name = index._name
        wanted = create_index(model, index, concurrently=concurrently)
        live = snapshot.indexes.get(name)
        if live is None:
            enforced_by = unique_constraint_for(index, table, snapshot)
            if enforced_by:
                drift.append(
                    Drift(
                        f"{table}: uniqueness of ({', '.join(enforced_by.columns)}) is enforced by UNIQUE"
                        f" constraint {enforced_by.name} instead of unique index {name}",
                        create_index(model, index, concurrently=True).sql
                        + ";\n"
                        + sql_text(
                            "ALTER TABLE",
                            Entity(table),
                            "DROP CONSTRAINT",
                            Entity(enforced_by.name),
                        ),
                    )
                )
            else:
                builds.append(wanted)
        elif comparable(live.definition) != comparable(wanted.sql):
            drift.append(
                Drift(
                    f"index {name} is '{live.definition}'; the models say '{comparable(wanted.sql)}'",
                    sql_text("DROP INDEX CONCURRENTLY", Entity(name)) + ";\n" + wanted.sql,
                )
            )
        elif not live.valid:
            drop = "DROP INDEX CONCURRENTLY" if concurrently else "DROP INDEX"
            builds += [
                Statement(sql_text(drop, Entity(name)), f"dropped invalid index {name}"),
                wanted._replace(description=f"rebuilt index {name}"),
            ]
    return builds, drift


def index_columns(index):
    """The column names an index covers, in order (None for an expression)."""
    return [
        getattr(getattr(part, "node", part), "column_name", None) for part in index._expressions
    ]


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


# --- Applying -----------------------------------------------------------------

LOCK_IN_TRANSACTION = f"SELECT pg_advisory_xact_lock({TRANSACTION_LOCK_KEY})"
TRY_LOCK_SESSION = f"SELECT pg_try_advisory_lock({INDEX_BUILD_LOCK_KEY})"
UNLOCK_SESSION = f"SELECT pg_advisory_unlock({INDEX_BUILD_LOCK_KEY})"


def set_lock_timeout(seconds):
    return f"SET LOCAL lock_timeout = '{round(seconds * 1000)}ms'"


def take_session_lock():
    # Not pg_advisory_lock: a run waiting inside that statement keeps a snapshot
    # open, the running CREATE INDEX CONCURRENTLY waits for that snapshot, and
    # PostgreSQL reports a deadlock (seen with 8 parallel runs). Poll instead.
    while not database.execute_sql(TRY_LOCK_SESSION).fetchone()[0]:
        time.sleep(0.2)


def script(plan, lock_timeout):
    """Every statement a run sends for this plan, in order, as SQL lines for a reviewer."""
    lines = []
    if plan.in_transaction:
        lines += ["BEGIN;", LOCK_IN_TRANSACTION + ";", set_lock_timeout(lock_timeout) + ";"]
        lines += [statement.sql + ";" for statement in plan.in_transaction]
        lines.append("COMMIT;")
    if plan.concurrent:
        # Concurrent builds on one table deadlock each other: one run at a time.
        lines.append(TRY_LOCK_SESSION + "; -- repeated until it returns true")
        lines += [statement.sql + ";" for statement in plan.concurrent]
        lines.append(UNLOCK_SESSION + ";")
    return lines


def apply(plan, lock_timeout, concurrently):
    """Run the plan; under each lock the catalog is read again, as another run may have done the work.

    Returns the statements executed.
    """
    done = []
    if plan.in_transaction:
        try:
            with database.atomic():
                database.execute_sql(LOCK_IN_TRANSACTION)
                database.execute_sql(set_lock_timeout(lock_timeout))
                for statement in plan_changes(read_catalog(), concurrently).in_transaction:
                    database.execute_sql(statement.sql)
                    done.append(statement)
        except peewee.DatabaseError as exc:
            raise MigrationError(failure(exc, lock_timeout) + "; nothing was changed") from None
    if plan.concurrent:
        try:
            take_session_lock()
            try:
                for statement in plan_changes(read_catalog(), concurrently).concurrent:
                    database.execute_sql(statement.sql)
                    done.append(statement)
            finally:
                database.execute_sql(UNLOCK_SESSION)
        except peewee.DatabaseError as exc:
            committed = "the transaction before it was committed; " if plan.in_transaction else ""
            raise MigrationError(
                f"{failure(exc, lock_timeout)} while building indexes concurrently; {committed}"
                "an index left INVALID is rebuilt by the next run"
            ) from None
    return done


def migrate(concurrently=False, lock_timeout=DEFAULT_LOCK_TIMEOUT):
    """Read, plan and apply; returns the plan and the statements executed (none when up to date)."""
    plan = plan_changes(read_catalog(), concurrently)
    return plan, apply(plan, lock_timeout, concurrently) if plan.pending else []


def failure(exc, lock_timeout):
    """One line for a database error raised while migrating."""
    original = getattr(exc, "orig", exc)  # Peewee keeps psycopg2's error here
    pgcode = getattr(original, "pgcode", None)
    detail = str(original).strip().splitlines()[0] if str(original).strip() else type(exc).__name__
    if pgcode == "42501":
        return f"permission denied ({detail}): run as the database owner or GRANT CREATE ON SCHEMA public"
    if pgcode == "25006":
        return "the server is read-only (a standby?): point DATABASE_URL at the primary"
    if pgcode == "55P03":
        return (
            f"a table stayed locked by another session for {lock_timeout:g} s ({detail}):"
            " retry when the long transaction ends, or raise --lock-timeout"
        )
    return f"migration failed ({detail})"


def schema_sql():
    """schema.sql: the whole schema, safe to run twice with psql -f."""
    lines = ["-- Generated by `python migrate.py --sql` from models.py; do not edit.", "BEGIN;"]
    lines += [
        statement.sql + ";" for model in MODELS for statement in create_table(model, safe=True)
    ]
    lines.append("COMMIT;")
    return "\n".join(lines) + "\n"


# --- Reporting ----------------------------------------------------------------


def report(plan):
    """The pending changes, the drift and the unknown objects, as SQL a reviewer can read."""
    lines = []
    if plan.pending:
        lines.append("-- pending: what `python migrate.py` would do")
        lines += [statement.sql + ";" for statement in plan.pending]
    if plan.drift:
        lines.append("-- drift: migrate.py leaves these alone; review the SQL before running it")
        for drift in plan.drift:
            lines += ["-- " + drift.problem, drift.fix + ";"]
    if plan.unknown:
        lines.append("-- not in the models (left alone):")
        lines += ["--   " + item for item in plan.unknown]
    return "\n".join(lines) + "\n" if lines else ""


def log_leftovers(plan):
    for drift in plan.drift:
        log.warning("drift: %s; to fix: %s", drift.problem, drift.fix.replace("\n", " "))
    for item in plan.unknown:
        log.info("not in the models, left alone: %s", item)


# --- Command line -------------------------------------------------------------


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


def seconds(text):
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative: give a number of seconds, 0 or more")
    return value


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="migrate.py",
        description="Bring the database named by DATABASE_URL (libpq 'host=... dbname=...' or a"
        " postgresql:// URL) to the schema of models.py: create missing tables, columns, foreign"
        " keys and indexes. Never renames or rewrites, and drops nothing but an INVALID index it"
        " rebuilds; differences it will not fix are reported with the SQL that would.",
        epilog="Exit codes: 0 success (with --check: the database matches the models),"
        " 1 --check found pending changes or drift, 2 error.",
    )
    parser.add_argument(
        "--wait",
        type=seconds,
        default=0,
        metavar="SECONDS",
        help="retry the connection until the server accepts it or SECONDS pass (default 0)",
    )
    parser.add_argument(
        "--lock-timeout",
        type=seconds,
        default=DEFAULT_LOCK_TIMEOUT,
        metavar="SECONDS",
        help="give up, changing nothing, when a table lock is not granted within SECONDS"
        f" (default {DEFAULT_LOCK_TIMEOUT:g}; 0 waits forever)",
    )
    parser.add_argument(
        "--concurrently",
        action="store_true",
        help="build indexes on existing tables with CREATE INDEX CONCURRENTLY, after the"
        " transaction, so writers keep writing",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="print the SQL a run would execute, in order, and change nothing",
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
    return parser.parse_args(argv)


def setup_logging():
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("migrate: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    return handler


def check(plan, started):
    sys.stdout.write(report(plan))
    if plan.pending or plan.drift:
        log.info(
            "%d pending changes, %d drifts (%.2f s)",
            len(plan.pending),
            len(plan.drift),
            time.monotonic() - started,
        )
        return EXIT_PENDING
    log.info("the database matches the models (%.2f s)", time.monotonic() - started)
    return EXIT_OK


def dry_run(plan, lock_timeout):
    sys.stdout.write("".join(line + "\n" for line in script(plan, lock_timeout)))
    log_leftovers(plan)
    return EXIT_OK


def log_run(plan, done, started):
    for statement in done:
        log.info(statement.description)
    log_leftovers(plan)
    elapsed = time.monotonic() - started
    if done:
        log.info("done: %d statements in %.2f s", len(done), elapsed)
    else:
        log.info("schema is up to date (%.2f s)", elapsed)


def main(argv=None):
    args = parse_args(argv)
    if args.sql:
        sys.stdout.write(schema_sql())
        return EXIT_OK
    setup_logging()
    started = time.monotonic()
    try:
        url = os.environ.get("DATABASE_URL")
        params = connection_params(DEFAULT_DATABASE_URL if url is None else url)
        default = " (the default: DATABASE_URL is not set)" if url is None else ""
        log.info("database %s%s", describe(params), default)
        connect(params, args.wait, log)
        if args.check or args.dry_run:
            plan = plan_changes(read_catalog(), args.concurrently)
            return check(plan, started) if args.check else dry_run(plan, args.lock_timeout)
        plan, done = migrate(args.concurrently, args.lock_timeout)
    except MigrationError as exc:
        log.error("error: %s", exc)
        return EXIT_ERROR
    except peewee.DatabaseError as exc:
        log.error("error: %s", failure(exc, args.lock_timeout))
        return EXIT_ERROR
    finally:
        if not database.is_closed():
            database.close()
    log_run(plan, done, started)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
