"""
The live schema of the connection's current schema, read from pg_catalog in three queries.

Usage::

    from catalog import read_catalog

    snapshot = read_catalog()
    snapshot.columns["users"]["quota"]      # Column(type='bigint', not_null=True, default='10000')
    snapshot.indexes["idx_users_status"]    # Index(table='users', definition='CREATE INDEX ...', ...)
    snapshot.rows["request_logs"]           # the planner's row estimate (reltuples)

Only the index query takes table locks: pg_get_indexdef opens the table
(ACCESS SHARE), so it waits behind a session holding ACCESS EXCLUSIVE and
behind a queued ALTER TABLE. It is called for the models' tables only, so
another application's locked table holds up nothing. It runs with a short lock_timeout; the caller
retries (apply.with_lock_retries). Waiting that briefly queues nobody:
only an ACCESS EXCLUSIVE request conflicts with ours, and it waits for the
holder anyway. Column defaults are deparsed without the
table (pg_get_expr(..., 0)), which takes no lock; format_type and
pg_get_constraintdef take none either.
"""

from collections import namedtuple

from models import MODELS, database

Column = namedtuple("Column", "type not_null default")
Index = namedtuple("Index", "table definition valid backs_constraint")
Constraint = namedtuple("Constraint", "table name kind columns ref_table definition validated")
Snapshot = namedtuple("Snapshot", "columns indexes constraints rows backend_pid")

# How long one attempt waits for a table lock. Every session that then asks
# for a conflicting lock queues behind ours, so this is the longest a writer
# can be held up by one attempt of a run (bench.py, section 8).
LOCK_ATTEMPT = 0.05  # seconds

# One query per kind of object, whatever the number of tables: Peewee's
# get_columns/get_indexes/get_foreign_keys, and playhouse.schema_diff built on
# them, cost three queries per table (bench.py, 80 tables: 241 queries and
# 0.49 s, against 3 and 29 ms here), report neither a varchar's length nor
# whether an index is valid, and their pg_get_expr calls lock every table.
COLUMNS_QUERY = """
SELECT c.relname, c.reltuples, pg_backend_pid(), a.attname, format_type(a.atttypid, a.atttypmod),
       a.attnotnull, CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, 0) END
FROM pg_class c
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""
INDEXES_QUERY = """
SELECT t.relname, i.relname,
       CASE WHEN t.relname = ANY(%(tables)s) THEN pg_get_indexdef(i.oid) END, x.indisvalid,
       x.indisprimary OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = i.oid)
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_class t ON t.oid = x.indrelid
WHERE t.relnamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema())
"""
CONSTRAINTS_QUERY = """
SELECT t.relname, k.conname, k.contype,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
       r.relname, pg_get_constraintdef(k.oid), k.convalidated
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.conrelid
LEFT JOIN pg_class r ON r.oid = k.confrelid
WHERE k.connamespace = (SELECT oid FROM pg_namespace WHERE nspname = current_schema()) AND k.contype IN ('f', 'u')
ORDER BY t.relname, k.conname
"""
# Who else works on an INVALID index: CREATE INDEX CONCURRENTLY holds a
# SHARE UPDATE EXCLUSIVE lock on the table from start to end (between its
# transactions too), a lock on the index while it builds, and shows in the
# progress view (to its role and pg_read_all_stats). A failed build has none.
# Another client's VACUUM or ALTER also holds the table lock: the index is then
# left alone this once, and the next run rebuilds it.
INDEX_BUILDER_QUERY = """
SELECT a.pid, a.application_name
FROM pg_stat_activity a
WHERE a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
  AND (a.pid IN (SELECT l.pid FROM pg_locks l JOIN pg_index x ON l.relation IN (x.indexrelid, x.indrelid)
                 WHERE x.indexrelid = quote_ident(%(index)s)::regclass
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND (l.relation = x.indexrelid OR l.mode = 'ShareUpdateExclusiveLock'))
       OR a.pid IN (SELECT pid FROM pg_stat_progress_create_index
                    WHERE index_relid = quote_ident(%(index)s)::regclass))
LIMIT 1
"""


def bounded(sql, lock_timeout=LOCK_ATTEMPT):
    """sql preceded by a lock_timeout for it alone: SET LOCAL lasts only for the query's implicit
    transaction (or the explicit one it runs in), so no setting outlives it."""
    return f"SET LOCAL lock_timeout = '{milliseconds(lock_timeout)}ms'; {sql}"


def milliseconds(seconds):
    """PostgreSQL's timeout setting for `seconds`: 0 means no limit, and a positive value never rounds to it."""
    return 0 if seconds == 0 else max(1, round(seconds * 1000))


def read_catalog(models=MODELS):
    """The live schema: tables and their columns, indexes, FK and UNIQUE constraints, row estimates.

    Index definitions are read for the tables of `models` only.

    A table lock not granted within LOCK_ATTEMPT raises peewee's
    OperationalError (from psycopg2's LockNotAvailable).
    """
    columns, rows, backend_pid = {}, {}, None
    for table, estimate, backend_pid, column, type_, not_null, default in database.execute_sql(
        COLUMNS_QUERY
    ):
        table_columns = columns.setdefault(table, {})
        rows[table] = int(estimate) if estimate >= 0 else None  # -1: never analyzed
        if column is not None:
            table_columns[column] = Column(type_, not_null, default)
    tables = [model._meta.table_name for model in models]
    index_rows = database.execute_sql(bounded(INDEXES_QUERY), {"tables": tables})
    indexes = {row[1]: Index(row[0], *row[2:]) for row in index_rows}
    constraints = [Constraint(*row) for row in database.execute_sql(CONSTRAINTS_QUERY)]
    return Snapshot(columns, indexes, constraints, rows, backend_pid)


def index_builder(index_name):
    """(pid, application_name) of another session building this index, or None."""
    return database.execute_sql(INDEX_BUILDER_QUERY, {"index": index_name}).fetchone()
