"""
The live schema of the target schema, read from pg_catalog as structured facts.

Usage::

    from catalog import read_catalog, target_schema

    target = target_schema()                 # the schema a run works in, and where that came from
    snapshot = read_catalog(target)
    snapshot.tables["users"].columns["quota"]   # Column(type='bigint', not_null=True, default='10000', ...)
    snapshot.indexes["idx_users_status"]        # Index(table='users', keys=(IndexKey('status', ...),), ...)
    snapshot.relations["users_old"].kind        # 'table'
    shown(name)                                 # catalog text made safe to print on one line

The target schema is the connection's current_schema(), the first schema of
its search_path that exists. A temporary schema, a system schema or none at
all is refused before anything is read or made. Every query of ours runs
with settings pinned for it alone (`guarded`): the search_path reduced to
the target schema, so that DDL lands there and `::regclass` prints
unqualified; quote_all_identifiers off and TimeZone UTC, so that deparsed
text does not depend on a role's settings; a short lock_timeout, and no
statement_timeout or transaction_timeout of the role's.

Structured facts, not deparsed text, wherever PostgreSQL keeps them: index
keys, sort order, operator classes and collations from pg_index; foreign
key columns and actions from pg_constraint; sequence ownership from
pg_depend. Text stays for column defaults and index predicates: PostgreSQL
exposes no structure for an expression but its node tree, whose text changes
between versions. Deparsing a predicate or a CHECK opens its table (ACCESS
SHARE), so it is done for the models' tables only and waits at most
LOCK_ATTEMPT (the caller retries, apply.with_lock_retries): waiting that
briefly queues nobody, since only ACCESS EXCLUSIVE conflicts with it, and
that waits for the holder anyway. Everything else takes no lock.
"""

import math
import re
import unicodedata
from collections import namedtuple
from contextlib import contextmanager

import peewee
import psycopg2
from psycopg2.extensions import TRANSACTION_STATUS_IDLE

from connection import MigrationError, session_facts, text_limits
from models import MODELS, database

Target = namedtuple("Target", "name oid search_path source")
# bound: pg_get_expr(relpartbound) in UTC (TimeZone is pinned): 'FOR VALUES FROM (...) TO (...)'.
Table = namedtuple("Table", "name kind rows comment columns parent bound detach_pending")
# pure_default: a default that evaluating changes nothing: no sequence, no function of the
# application (pg_depend records neither of pg_catalog's own, which are pinned).
# domain_not_null: of a NOT NULL domain without a default of its own.
Column = namedtuple(
    "Column", "type not_null default identity generated serial domain_not_null pure_default"
)
Serial = namedtuple("Serial", "sequence owned type")  # the sequence a nextval() default draws from
Relation = namedtuple("Relation", "name kind table")  # table: what an index is on
IndexKey = namedtuple("IndexKey", "column descending nulls_first default_opclass default_collation")
Index = namedtuple(
    "Index",
    "name table unique valid method keys included expressions predicate definition"
    " backs_constraint partitioned parent partial",
)
Constraint = namedtuple(
    "Constraint",
    "table name kind columns ref_table ref_columns actions deferrable validated enforced"
    " definition inherited evaluable",
)
Snapshot = namedtuple("Snapshot", "target tables relations indexes constraints backend_pid")

# How long one attempt waits for a table lock. Every session that then asks
# for a conflicting lock queues behind ours, so this is the longest a writer
# can be held up by one attempt of a run (bench.py, section 8).
LOCK_ATTEMPT = 0.05  # seconds
# The statement_timeout of a catalog read: generous for a catalog of many
# thousand tables, short enough that nothing waits silently.
CATALOG_GUARD = 30.0  # seconds

RELATION_KINDS = {
    "r": "table",
    "p": "partitioned table",
    "i": "index",
    "I": "partitioned index",
    "v": "view",
    "m": "materialized view",
    "S": "sequence",
    "f": "foreign table",
    "c": "composite type",
    "t": "TOAST table",
}

# --- Printing catalog text -----------------------------------------------------------


def shown(text):
    """Catalog text safe to print inside one line: control and other invisible characters
    (newlines, carriage returns, Unicode line separators, bidi controls), bytes of unknown
    encoding and backslashes written as Python-style escapes."""
    if text is None:
        return "none"
    return "".join(escaped_char(char) for char in str(text))


def escaped_char(char):
    if char == "\\":
        return "\\\\"
    if ord(char) > 0x7F and text_limits["raw_server_bytes"]:
        return f"\\x{ord(char):02x}"
    if ord(char) > 0x7F and text_limits["ascii_output"]:
        return f"\\u{ord(char):04x}" if ord(char) <= 0xFFFF else f"\\U{ord(char):08x}"
    if char.isprintable() and unicodedata.category(char) != "Cf":
        return char
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    code = ord(char)
    return (
        f"\\x{code:02x}"
        if code <= 0xFF
        else f"\\u{code:04x}"
        if code <= 0xFFFF
        else f"\\U{code:08x}"
    )


def one_line(text):
    """A line that stays one line: the control and invisible characters shown() would escape,
    escaped, the rest as it is (a last guard where lines are printed, as what they hold was
    escaped, or built by us, when it was made)."""
    return "".join(
        char if char.isprintable() and unicodedata.category(char) != "Cf" else escaped_char(char)
        for char in text
    )


PLAIN_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_$]*")


def shown_name(name):
    """A name as SQL would write it, quoted when it needs to be, then escaped for one line."""
    if PLAIN_IDENTIFIER.fullmatch(name):
        return name
    return shown('"' + name.replace('"', '""') + '"')


def read_only_words():
    """Why the server refused a write: a standby, or a read-only default and where it is set."""
    if session_facts.get("standby"):
        return "the server is a standby (in recovery): point DATABASE_URL at the primary"
    source = session_facts.get("read_only_source")
    where = {
        "user": f"on role {shown_name(session_facts.get('role', '?'))}"
        " (ALTER ROLE ... RESET default_transaction_read_only)",
        "database": f"on database {shown_name(session_facts.get('dbname', '?'))}"
        " (ALTER DATABASE ... RESET default_transaction_read_only)",
        "database user": "on the role in this database"
        " (ALTER ROLE ... IN DATABASE ... RESET default_transaction_read_only)",
        "client": "by the connection's options (PGOPTIONS or options in DATABASE_URL)",
        "configuration file": "in the server's configuration file",
    }.get(source, f"by {source}")
    return (
        f"default_transaction_read_only is on, set {where}: reset it there, or add"
        " options='-c default_transaction_read_only=off' to DATABASE_URL"
    )


# --- Pinned settings ------------------------------------------------------------------

# Session settings of a role, a database or PGOPTIONS that would change what
# a query of ours reads or how long it may run, pinned for each query alone
# (set_config(..., true) lasts only for its transaction).
GUARD_SQL = (
    "SELECT set_config('lock_timeout', %(guard_lock)s, true),"
    " set_config('statement_timeout', %(guard_statement)s, true),"
    " set_config('quote_all_identifiers', 'off', true), set_config('TimeZone', 'UTC', true),"
    " set_config('search_path', quote_ident(%(guard_schema)s) || ', pg_temp', true)"
    "{transaction_timeout}"
)


def guard_sql():
    """The guard statement; transaction_timeout exists from PostgreSQL 17."""
    extra = ", set_config('transaction_timeout', '0', true)" if has_transaction_timeout() else ""
    return GUARD_SQL.format(transaction_timeout=extra)


def has_transaction_timeout():
    return (database.server_version or 0) >= 170000


def guard_params(target, lock_timeout=LOCK_ATTEMPT, statement_timeout=CATALOG_GUARD):
    return {
        "guard_lock": f"{milliseconds(lock_timeout)}ms",
        "guard_statement": f"{milliseconds(statement_timeout)}ms",
        "guard_schema": target.name,
    }


def guarded(target, sql, params=None, lock_timeout=LOCK_ATTEMPT):
    """Run sql in one implicit transaction after the guard: nothing set outlives it.

    Inside a transaction of ours, which pinned the same settings at its BEGIN, sql runs under
    them: a SET LOCAL here would last until COMMIT, and the transaction's statement_timeout
    (--statement-timeout with --atomic) would silently become CATALOG_GUARD.
    """
    if database.connection().get_transaction_status() != TRANSACTION_STATUS_IDLE:
        return database.execute_sql(sql, params or {})
    values = {**guard_params(target, lock_timeout), **(params or {})}
    return database.execute_sql(f"{guard_sql()}; {sql}", values)


def milliseconds(seconds):
    """PostgreSQL's timeout setting for `seconds`: 0 means no limit, and a positive value never rounds to it."""
    return 0 if seconds == 0 else max(1, round(seconds * 1000))


# --- The target schema --------------------------------------------------------------------

TARGET_QUERY = """
SELECT current_schema(), n.oid, s.setting, s.source, current_user, current_database(),
       n.oid = pg_my_temp_schema() OR current_schema() ~ '^pg_(toast_)?temp_'
FROM pg_settings s LEFT JOIN pg_namespace n ON n.nspname = current_schema()
WHERE s.name = 'search_path'
"""


def target_schema():
    """The schema a run works in: current_schema(), refused when temporary, a system schema or none."""
    # Guarded like every query of ours; the schema is not known yet, so no search_path.
    guard = "SELECT set_config('statement_timeout', '30s', true), set_config('lock_timeout', '30s', true)"
    name, oid, setting, source, role, dbname, temporary = database.execute_sql(
        f"{guard}; {TARGET_QUERY}"
    ).fetchone()
    where = f"search_path {shown(setting)}, {setting_source(source, role, dbname)}"
    if name is None:
        raise MigrationError(
            f"no schema of the {where} exists: create the schema, or set search_path"
            " (ALTER ROLE ... SET search_path, or options='-c search_path=...' in DATABASE_URL);"
            " nothing was changed"
        )
    if temporary:
        raise MigrationError(
            f"the target schema would be the temporary schema {shown_name(name)} ({where}):"
            " its tables vanish when the session ends; put a permanent schema first in"
            " search_path; nothing was changed"
        )
    if name.startswith("pg_") or name == "information_schema":
        raise MigrationError(
            f"the target schema would be the system schema {shown_name(name)} ({where}):"
            " put the application's schema first in search_path; nothing was changed"
        )
    return Target(name, oid, setting, setting_source(source, role, dbname))


def setting_source(source, role, dbname):
    """Where a setting's value came from, in words (pg_settings.source)."""
    words = {
        "default": "the server's default",
        "configuration file": "from the server's configuration file",
        "database": f"set on database {shown_name(dbname)} (ALTER DATABASE ... SET)",
        "user": f"set on role {shown_name(role)} (ALTER ROLE ... SET)",
        "database user": f"set on role {shown_name(role)} in database {shown_name(dbname)}"
        " (ALTER ROLE ... IN DATABASE ... SET)",
        "client": "from the connection's options (PGOPTIONS, or options in DATABASE_URL)",
    }
    return words.get(source, f"set by {shown(source)}")


def describe_target(target):
    """'schema public (search_path "$user", public, the server's default)'."""
    return f"schema {shown_name(target.name)} (search_path {shown(target.search_path)}, {target.source})"


# --- The catalog ------------------------------------------------------------------------------

TABLES_QUERY = """
SELECT c.relname, c.relkind, c.reltuples::float8, obj_description(c.oid, 'pg_class'),
       CASE WHEN parent.relnamespace = %(schema)s THEN parent.relname END,
       CASE WHEN c.relispartition THEN pg_get_expr(c.relpartbound, 0) END, {detach_pending},
       pg_backend_pid(),
       a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.attgenerated = '' THEN pg_get_expr(d.adbin, 0) END,
       a.attidentity <> '', a.attgenerated <> '', s.relname,
       EXISTS (SELECT 1 FROM pg_depend o WHERE o.classid = 'pg_class'::regclass AND o.objid = s.oid
               AND o.refobjid = c.oid AND o.refobjsubid = a.attnum AND o.deptype IN ('a', 'i')),
       format_type(q.seqtypid, NULL),
       (SELECT t.typnotnull AND t.typdefaultbin IS NULL FROM pg_type t
        WHERE t.oid = a.atttypid AND t.typtype = 'd'),
       d.oid IS NOT NULL AND pg_get_expr(d.adbin, 0) NOT LIKE '%%nextval(%%' AND NOT EXISTS (
           SELECT 1 FROM pg_depend x WHERE x.classid = 'pg_attrdef'::regclass AND x.objid = d.oid
             AND (x.refclassid = 'pg_proc'::regclass
                  OR x.refclassid = 'pg_class'::regclass AND x.refobjid <> c.oid))
FROM pg_class c
LEFT JOIN pg_inherits h ON c.relispartition AND h.inhrelid = c.oid
LEFT JOIN pg_class parent ON parent.oid = h.inhparent
LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
LEFT JOIN LATERAL (
    SELECT s.oid, s.relname FROM pg_depend dep JOIN pg_class s ON s.oid = dep.refobjid AND s.relkind = 'S'
    WHERE dep.classid = 'pg_attrdef'::regclass AND dep.objid = d.oid AND dep.refclassid = 'pg_class'::regclass
    LIMIT 1) s ON true
LEFT JOIN pg_sequence q ON q.seqrelid = s.oid
WHERE c.relnamespace = %(schema)s AND c.relkind IN ('r', 'p')
ORDER BY c.relname, a.attnum
"""
# Every relation of the schema (what a name is held by), with the facts of those that are indexes.
RELATIONS_QUERY = """
SELECT c.relname, c.relkind, t.relname, x.indisunique, x.indisvalid, am.amname, x.indnkeyatts, x.indnatts,
       ARRAY(SELECT a.attname FROM unnest(x.indkey::int2[]) WITH ORDINALITY k(attnum, i)
             LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum ORDER BY k.i),
       x.indoption::int2[],
       ARRAY(SELECT o.opcdefault FROM unnest(x.indclass::oid[]) WITH ORDINALITY k(opclass, i)
             JOIN pg_opclass o ON o.oid = k.opclass ORDER BY k.i),
       ARRAY(SELECT coalesce(k.coll = a.attcollation, k.coll = 0)
             FROM unnest(x.indcollation::oid[], x.indkey::int2[]) WITH ORDINALITY k(coll, attnum, i)
             LEFT JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = k.attnum ORDER BY k.i),
       x.indexprs IS NOT NULL,
       CASE WHEN t.relname = ANY(%(tables)s) THEN pg_get_expr(x.indpred, x.indrelid) END,
       CASE WHEN t.relname = ANY(%(tables)s) THEN pg_get_indexdef(c.oid) END,
       x.indisprimary OR EXISTS (SELECT 1 FROM pg_constraint k WHERE k.conindid = c.oid AND k.contype IN ('p', 'u', 'x')),
       (SELECT pi.relname FROM pg_inherits h JOIN pg_class pi ON pi.oid = h.inhparent WHERE h.inhrelid = c.oid),
       x.indpred IS NOT NULL
FROM pg_class c
LEFT JOIN pg_index x ON x.indexrelid = c.oid
LEFT JOIN pg_class t ON t.oid = x.indrelid
LEFT JOIN pg_am am ON am.oid = c.relam
WHERE c.relnamespace = %(schema)s
"""
# A CHECK is evaluable when it calls only immutable functions and operators of pg_catalog:
# evaluating it then has no effect beyond its result.
CONSTRAINTS_QUERY = """
SELECT t.relname, k.conname, k.contype,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
       CASE WHEN r.relnamespace = %(schema)s THEN r.relname ELSE r.oid::regclass::text END,
       ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i),
       ARRAY[k.confupdtype, k.confdeltype, k.confmatchtype]::text[], k.condeferrable,
       k.convalidated, {enforced},
       CASE WHEN k.contype <> 'c' OR t.relname = ANY(%(tables)s) THEN pg_get_constraintdef(k.oid) END,
       k.conparentid <> 0,
       k.contype = 'c' AND NOT EXISTS (
           SELECT 1 FROM pg_depend d
           LEFT JOIN pg_proc f ON d.refclassid = 'pg_proc'::regclass AND f.oid = d.refobjid
           LEFT JOIN pg_operator o ON d.refclassid = 'pg_operator'::regclass AND o.oid = d.refobjid
           LEFT JOIN pg_proc of ON of.oid = o.oprcode
           WHERE d.classid = 'pg_constraint'::regclass AND d.objid = k.oid
             AND (f.pronamespace <> 'pg_catalog'::regnamespace OR f.provolatile <> 'i'
                  OR o.oprnamespace <> 'pg_catalog'::regnamespace OR of.provolatile <> 'i'))
FROM pg_constraint k
JOIN pg_class t ON t.oid = k.conrelid
LEFT JOIN pg_class r ON r.oid = k.confrelid
WHERE k.connamespace = %(schema)s AND k.contype IN ('f', 'u', 'c')
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
FROM pg_stat_activity a, (SELECT oid FROM pg_class WHERE relnamespace = %(schema)s AND relname = %(index)s) i
WHERE a.pid <> pg_backend_pid() AND a.backend_type = 'client backend'
  AND (a.pid IN (SELECT l.pid FROM pg_locks l JOIN pg_index x ON l.relation IN (x.indexrelid, x.indrelid)
                 WHERE x.indexrelid = i.oid
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND (l.relation = x.indexrelid OR l.mode = 'ShareUpdateExclusiveLock'))
       OR a.pid IN (SELECT pid FROM pg_stat_progress_create_index WHERE index_relid = i.oid))
LIMIT 1
"""


def row_estimate(reltuples):
    """pg_class.reltuples as a count, None when unknown (-1: never analyzed; NaN, infinite, or
    past what a JSON reader's integer holds)."""
    if reltuples is None or not math.isfinite(reltuples) or not 0 <= reltuples < 2**53:
        return None
    return int(reltuples)


def read_catalog(target, models=MODELS):
    """The live schema: tables and their columns, every relation, indexes, constraints.

    Predicates, index definitions and CHECKs are deparsed for the tables of
    `models` (and their partitions) only. A table lock not granted within
    LOCK_ATTEMPT raises peewee's OperationalError (psycopg2's LockNotAvailable).
    """
    with one_snapshot(target):
        return read_snapshot(target, models)


@contextmanager
def one_snapshot(target):
    """The three queries in one REPEATABLE READ snapshot, so that they see one moment: a table
    another session commits in between would otherwise be missing from the tables yet hold
    its name among the relations. Inside a transaction of the caller's, its own."""
    if database.connection().get_transaction_status() != TRANSACTION_STATUS_IDLE:
        yield
        return
    database.execute_sql(
        f"BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {guard_sql()}", guard_params(target)
    )
    try:
        yield
    except BaseException:
        rollback_quietly()
        raise
    database.execute_sql("COMMIT")


def rollback_quietly():
    try:
        database.execute_sql("ROLLBACK")
    except (peewee.PeeweeException, psycopg2.Error):
        pass  # the session is gone, and its transaction with it


def read_snapshot(target, models):
    tables, backend_pid = read_tables(target)
    names = [model._meta.table_name for model in models]
    names += [table.name for table in tables.values() if table.parent in names]
    params = {"schema": target.oid, "tables": names}
    relations, indexes = {}, {}
    for row in guarded(target, RELATIONS_QUERY, params):
        name, kind, table = row[:3]
        relations[name] = Relation(name, RELATION_KINDS.get(kind, kind), table)
        if kind in ("i", "I"):
            indexes[name] = index_of(name, kind, table, row[3:])
    # PostgreSQL 18 has NOT ENFORCED foreign keys: one is no more a check than a NOT VALID one.
    enforced = "k.conenforced" if (database.server_version or 0) >= 180000 else "true"
    constraints = [
        Constraint(*row[:6], tuple(row[6]), *row[7:])
        for row in guarded(target, CONSTRAINTS_QUERY.format(enforced=enforced), params)
    ]
    return Snapshot(target, tables, relations, indexes, constraints, backend_pid)


def read_tables(target):
    tables, backend_pid = {}, None
    # DETACH PARTITION ... CONCURRENTLY, and its pending state, exist from PostgreSQL 14.
    pending = "h.inhdetachpending" if (database.server_version or 0) >= 140000 else "false"
    query = TABLES_QUERY.format(detach_pending=f"coalesce({pending}, false)")
    rows = guarded(target, query, {"schema": target.oid})
    for name, kind, reltuples, comment, parent, bound, detach, backend_pid, *column in rows:
        table = tables.get(name)
        if table is None:
            table = tables[name] = Table(
                name, kind, row_estimate(reltuples), comment, {}, parent, bound, detach
            )
        attname, type_, not_null, default, identity, generated, sequence, owned, seq_type, *rest = (
            column
        )
        if attname is not None:
            serial = Serial(sequence, owned, seq_type) if sequence else None
            table.columns[attname] = Column(
                type_, not_null, default, identity, generated, serial, *rest
            )
    return tables, backend_pid


def index_of(name, kind, table, facts):
    unique, valid, method, key_count, count, columns, options, opclasses, collations = facts[:9]
    expressions, predicate, definition, backs_constraint, parent, partial = facts[9:]
    keys = tuple(
        IndexKey(column, bool(option & 1), bool(option & 2), opclass, collation)
        for column, option, opclass, collation in zip(
            columns[:key_count], options, opclasses, collations, strict=False
        )
    )
    return Index(
        name,
        table,
        unique,
        valid,
        method,
        keys,
        tuple(columns[key_count:count]),
        expressions,
        predicate,
        definition,
        backs_constraint,
        kind == "I",
        parent,
        partial,
    )


def index_builder(target, index_name):
    """(pid, application_name) of another session building this index, or None."""
    return guarded(
        target, INDEX_BUILDER_QUERY, {"schema": target.oid, "index": index_name}
    ).fetchone()
