"""
What request_logs' partitions get from request_logs, and what its conversion carries or refuses.

Usage::

    from carry import conversion_carry, made_like, partition_drift

    made_like(snapshot, "request_logs", "request_logs_2027_01")  # Statements: owner, grants, ...
    carry = conversion_carry(snapshot, "request_logs", "request_logs_partitioned")
    carry.twin, carry.indexes, carry.foreign_keys, carry.publications, carry.cannot
    partition_drift(snapshot, "request_logs")                    # Drift: owner, grants, identity

Every partition a run makes (the conversion's twin, default and months; upkeep's default and
months) is given, right after its CREATE and before anyone else can see it, what the parent
has that PostgreSQL does not pass on: the owner (a superuser's run would otherwise own them,
and the application's ALTER TABLE request_logs then fails on them), table and column grants,
statistics targets and column storage, the storage parameters of the newest month, and
REPLICA IDENTITY FULL: partitions have no primary key, and a publication that publishes
updates or deletes (FOR ALL TABLES, FOR TABLES IN SCHEMA, FOR TABLE request_logs, made before
or after the conversion) makes every UPDATE and DELETE of a partition without an identity fail.

Every statement is built from catalog facts read as structured values (role and column
names, privilege keywords, numbers): none pastes deparsed catalog text into SQL. What only
catalog text could carry (a trigger's or policy's body, an expression or partial index, a
publication's row filter) is refused before the conversion changes anything, each with what
to do.
"""

import re
from collections import namedtuple

from peewee import Entity, Value

from catalog import guarded, shown, shown_name
from models import database
from plan import Drift, Hazard, Statement, declared_by, render, sql_text

# A statement on a table made in the same transaction: no other session can see it yet.
ON_NEW_TABLE = Hazard(None, "nothing", "instant: a table no one else sees yet")

# Storage parameters carried, each with the values it may take: names from this list only,
# values matched whole, so that nothing read from reloptions reaches SQL unchecked.
NUMBER = re.compile(r"-?\d+(\.\d+)?([eE][-+]?\d+)?")
BOOLEAN = re.compile(r"(?i)(true|false|on|off|yes|no|1|0)")
RELOPTIONS = {
    "fillfactor": NUMBER,
    "toast_tuple_target": NUMBER,
    "parallel_workers": NUMBER,
    "autovacuum_enabled": BOOLEAN,
    "vacuum_truncate": BOOLEAN,
    "vacuum_index_cleanup": re.compile(r"(?i)(auto|true|false|on|off|yes|no|1|0)"),
    "log_autovacuum_min_duration": NUMBER,
    **{
        f"autovacuum_{name}": NUMBER
        for name in (
            "vacuum_threshold",
            "vacuum_scale_factor",
            "vacuum_insert_threshold",
            "vacuum_insert_scale_factor",
            "analyze_threshold",
            "analyze_scale_factor",
            "vacuum_cost_delay",
            "vacuum_cost_limit",
            "freeze_min_age",
            "freeze_max_age",
            "freeze_table_age",
            "multixact_freeze_min_age",
            "multixact_freeze_max_age",
            "multixact_freeze_table_age",
        )
    },
}

# The parent's facts a partition is given. attstattarget is NULL for the default from 17.
PARENT_QUERY = """
SELECT pg_get_userbyid(c.relowner), current_user,
       ARRAY(SELECT ARRAY[coalesce(r.rolname, 'PUBLIC'), a.privilege_type, a.is_grantable::text]
             FROM aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE a.grantee <> c.relowner ORDER BY 1),
       ARRAY(SELECT ARRAY[t.attname, coalesce(r.rolname, 'PUBLIC'), a.privilege_type,
                          a.is_grantable::text]
             FROM pg_attribute t, aclexplode(t.attacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE t.attrelid = c.oid AND t.attnum > 0 AND NOT t.attisdropped
               AND t.attacl IS NOT NULL AND a.grantee <> c.relowner ORDER BY 1),
       ARRAY(SELECT ARRAY[t.attname, t.attstattarget::text] FROM pg_attribute t
             WHERE t.attrelid = c.oid AND t.attnum > 0 AND NOT t.attisdropped
               AND coalesce(t.attstattarget, -1) >= 0 ORDER BY t.attnum),
       ARRAY(SELECT ARRAY[t.attname, t.attstorage::text] FROM pg_attribute t
             JOIN pg_type y ON y.oid = t.atttypid
             WHERE t.attrelid = c.oid AND t.attnum > 0 AND NOT t.attisdropped
               AND t.attstorage <> y.typstorage ORDER BY t.attnum),
       ARRAY(SELECT ARRAY[t.attname, o] FROM pg_attribute t, unnest(t.attoptions) o
             WHERE t.attrelid = c.oid AND t.attnum > 0 AND NOT t.attisdropped ORDER BY t.attnum)
FROM pg_class c WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s
"""
# The table's storage parameters, and its TOAST table's as toast.NAME (as ALTER TABLE sets them).
RELOPTIONS_QUERY = """
SELECT coalesce(c.reloptions, '{}')
       || ARRAY(SELECT 'toast.' || o FROM pg_class t, unnest(t.reloptions) o WHERE t.oid = c.reltoastrelid)
FROM pg_class c
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s
"""
# Column options (attoptions) carried, with the values they may take.
ATTOPTIONS = {"n_distinct": NUMBER, "n_distinct_inherited": NUMBER}
STORAGE = {"p": "PLAIN", "e": "EXTERNAL", "m": "MAIN", "x": "EXTENDED"}

Parent = namedtuple("Parent", "owner me grants column_grants statistics storage options")


def parent_facts(snapshot, parent):
    row = guarded(
        snapshot.target, PARENT_QUERY, {"schema": snapshot.target.oid, "table": parent}
    ).fetchone()
    return Parent(*row) if row else None


def reloptions(snapshot, table):
    """(carried name=value pairs, those that are not) of the table's storage parameters."""
    row = guarded(
        snapshot.target, RELOPTIONS_QUERY, {"schema": snapshot.target.oid, "table": table}
    ).fetchone()
    carried, refused = [], []
    for option in row[0] if row else []:
        name, _, value = option.partition("=")
        pattern = RELOPTIONS.get(name.removeprefix("toast."))
        if name.startswith("toast.") and not name.startswith("toast.autovacuum_"):
            pattern = None
        (carried if pattern and pattern.fullmatch(value) else refused).append((name, value))
    return carried, refused


def privilege_sql(privilege, columns, table, grantee, grantable):
    # privilege_type is one of PostgreSQL's fixed keywords (aclexplode spells them).
    if not re.fullmatch(r"[A-Z ]+", privilege):
        return None
    on = f" ({', '.join(render(Entity(c)) for c in columns)})" if columns else ""
    who = "PUBLIC" if grantee == "PUBLIC" else render(Entity(grantee))
    option = " WITH GRANT OPTION" if grantable == "true" else ""
    return f"GRANT {privilege}{on} ON TABLE {render(Entity(table))} TO {who}{option}"


def like_sql(facts, name, options=(), identity=True):
    """(lock, SQL) pairs that give the table `name` the parent's owner, grants, column
    statistics targets and storage, the storage parameters `options` (all of the list
    take SHARE UPDATE EXCLUSIVE), and REPLICA IDENTITY FULL; lock None: GRANT takes none."""
    table = Entity(name)
    exclusive, share_update = "AccessExclusiveLock", "ShareUpdateExclusiveLock"
    sql = []
    if facts.owner != facts.me:
        sql.append((exclusive, sql_text("ALTER TABLE", table, "OWNER TO", Entity(facts.owner))))
    for grantee, privilege, grantable in facts.grants:
        sql.append((None, privilege_sql(privilege, (), name, grantee, grantable)))
    for column, grantee, privilege, grantable in facts.column_grants:
        sql.append((None, privilege_sql(privilege, (column,), name, grantee, grantable)))
    for column, target in facts.statistics:
        sql.append(
            (
                share_update,
                sql_text("ALTER TABLE", table, "ALTER COLUMN", Entity(column), "SET STATISTICS")
                + f" {int(target)}",
            )
        )
    for column, storage in facts.storage:
        if storage in STORAGE:
            sql.append(
                (
                    exclusive,
                    sql_text("ALTER TABLE", table, "ALTER COLUMN", Entity(column), "SET STORAGE")
                    + f" {STORAGE[storage]}",
                )
            )
    for column, option in facts.options:
        key, _, value = option.partition("=")
        if key in ATTOPTIONS and ATTOPTIONS[key].fullmatch(value):
            sql.append(
                (
                    share_update,
                    sql_text("ALTER TABLE", table, "ALTER COLUMN", Entity(column), "SET")
                    + f" ({key} = {value})",
                )
            )
    if options:
        sql.append(
            (
                share_update,
                sql_text("ALTER TABLE", table, "SET")
                + f" ({', '.join(f'{key} = {value.lower()}' for key, value in options)})",
            )
        )
    if identity:
        sql.append((exclusive, sql_text("ALTER TABLE", table, "REPLICA IDENTITY FULL")))
    return [(lock, text) for lock, text in sql if text]


def like_statements(facts, parent, name, options=(), identity=True):
    """like_sql as Statements, each with the lock it takes on the table made in this
    transaction, which blocks no one: no other session sees the table before COMMIT."""
    return [
        Statement(
            text,
            "",
            (name,) if lock else (),
            Hazard(lock, "nothing: no one else sees the new table", "instant")
            if lock
            else ON_NEW_TABLE,
            ("made like", parent, name),
        )
        for lock, text in like_sql(facts, name, options, identity)
    ]


def made_like(snapshot, parent, name, source=None):
    """Statements that give the partition `name`, just made in this transaction, what
    `parent` has (see like_sql); its storage parameters are those of `source` (the newest
    month, as a partitioned table has none), else of a plain `parent`."""
    facts = parent_facts(snapshot, parent)
    if facts is None:  # a fresh layout: the run makes and owns every table
        facts = Parent(None, None, [], [], [], [], [])
    options = reloptions(snapshot, source or parent)[0] if (source or facts.owner) else []
    return like_statements(facts, parent, name, options)


# --- Partitions that differ from their parent ------------------------------------------------

PARTITIONS_QUERY = """
SELECT c.relname, pg_get_userbyid(c.relowner),
       ARRAY(SELECT ARRAY[coalesce(r.rolname, 'PUBLIC'), a.privilege_type, a.is_grantable::text]
             FROM aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
             WHERE a.grantee <> c.relowner ORDER BY 1),
       NOT (c.relreplident = 'f'
            OR c.relreplident = 'd' AND EXISTS (SELECT 1 FROM pg_index i
                                                WHERE i.indrelid = c.oid AND i.indisprimary)
            OR c.relreplident = 'i' AND EXISTS (SELECT 1 FROM pg_index i
                                                WHERE i.indrelid = c.oid AND i.indisreplident))
       AND EXISTS (SELECT 1 FROM pg_publication p WHERE (p.pubupdate OR p.pubdelete)
                   AND (p.puballtables
                        OR EXISTS (SELECT 1 FROM pg_publication_rel pr WHERE pr.prpubid = p.oid
                                   AND pr.prrelid IN (SELECT relid FROM pg_partition_ancestors(c.oid)))
                        {in_schema}))
FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid
WHERE h.inhparent = (SELECT oid FROM pg_class WHERE relnamespace = %(schema)s AND relname = %(table)s)
  AND c.relnamespace = %(schema)s
ORDER BY 1
"""
IN_SCHEMA = """OR EXISTS (SELECT 1 FROM pg_publication_namespace n WHERE n.pnpubid = p.oid
                                   AND n.pnnspid = c.relnamespace)"""


def partition_drift(snapshot, parent):
    """Partitions of `parent` with another owner, without one of its grants, or published for
    updates or deletes without a replica identity: drift, each with its fix."""
    facts = parent_facts(snapshot, parent)
    if facts is None:
        return []
    schema_clause = IN_SCHEMA if (database.server_version or 0) >= 150000 else ""
    rows = guarded(
        snapshot.target,
        PARTITIONS_QUERY.format(in_schema=schema_clause),
        {"schema": snapshot.target.oid, "table": parent},
    ).fetchall()
    drift = []
    for name, owner, grants, no_identity in rows:
        shown_table = shown_name(name)
        if owner != facts.owner:
            drift.append(
                Drift(
                    f"the partition {shown_table} of {parent} is owned by {shown_name(owner)},"
                    f" not by {shown_name(facts.owner)} who owns {parent}: {facts.owner}'s"
                    f" ALTER TABLE {parent} (the Go backend's AutoMigrate) fails on it",
                    [sql_text("ALTER TABLE", Entity(name), "OWNER TO", Entity(facts.owner))],
                    True,
                    f"instant; ACCESS EXCLUSIVE on {shown_table} (blocks its reads and writes)"
                    " until COMMIT",
                    ("partition owner", parent, name),
                )
            )
        missing = [g for g in facts.grants if list(g) not in [list(x) for x in grants]]
        if missing:
            drift.append(
                Drift(
                    f"the partition {shown_table} of {parent} lacks "
                    + ", ".join(f"{shown(p)} to {shown_name(who)}" for who, p, _ in missing)
                    + f", which {parent} grants",
                    [
                        sql
                        for who, p, option in missing
                        if (sql := privilege_sql(p, (), name, who, option))
                    ],
                    True,
                    "instant; takes no table lock",
                    ("partition grants", parent, name),
                )
            )
        if no_identity:
            drift.append(
                Drift(
                    f"the partition {shown_table} of {parent} is published for updates or"
                    " deletes and has no replica identity (no primary key): every UPDATE and"
                    " DELETE of its rows fails",
                    [sql_text("ALTER TABLE", Entity(name), "REPLICA IDENTITY FULL")],
                    True,
                    f"instant; ACCESS EXCLUSIVE on {shown_table} (blocks its reads and writes)"
                    " until COMMIT",
                    ("replica identity", parent, name),
                )
            )
    return drift


# --- What the conversion carries, and what it refuses ------------------------------------------

Carry = namedtuple("Carry", "twin indexes foreign_keys publications unpublish cannot")
# name: the index's name, which the partitioned index takes; temporary: its name on the twin
# until the swap's renames; legacy: the name the old table's index is renamed to.
CarriedIndex = namedtuple("CarriedIndex", "name temporary legacy sql comment")
# problem: what blocks, in words; todo: what to do; fix: SQL that does it, where there is one.
Cannot = namedtuple("Cannot", "problem todo fix", defaults=((),))

FOREIGN_KEYS_QUERY = """
SELECT k.conname, t.relname, tn.nspname, k.conrelid = c.oid,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i),
       r.relname, rn.nspname,
       ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, i)
             JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.i),
       k.confupdtype::text, k.confdeltype::text, k.confmatchtype::text, k.condeferrable,
       k.condeferred, k.convalidated AND {enforced}, {set_columns},
       obj_description(k.oid, 'pg_constraint')
FROM pg_class c
JOIN pg_constraint k ON k.contype = 'f' AND c.oid IN (k.conrelid, k.confrelid)
JOIN pg_class t ON t.oid = k.conrelid JOIN pg_namespace tn ON tn.oid = t.relnamespace
JOIN pg_class r ON r.oid = k.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s
ORDER BY 1
"""
ForeignKey = namedtuple(
    "ForeignKey",
    "name table schema outgoing columns ref_table ref_schema ref_columns on_update on_delete"
    " match deferrable deferred valid set_columns comment",
)
ACTIONS = {"a": "NO ACTION", "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}
MATCH = {"s": "MATCH SIMPLE", "f": "MATCH FULL"}

PUBLICATIONS_QUERY = """
SELECT p.pubname, pg_has_role(p.pubowner, 'USAGE'), {via_root},
       CASE WHEN p.puballtables THEN 'FOR ALL TABLES' WHEN pr.oid IS NOT NULL THEN 'FOR TABLE'
            ELSE 'FOR TABLES IN SCHEMA' END,
       {filtered}
FROM pg_class c
JOIN pg_publication p ON true
LEFT JOIN pg_publication_rel pr ON pr.prpubid = p.oid AND pr.prrelid = c.oid
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s
  AND (p.puballtables OR pr.oid IS NOT NULL {in_schema})
ORDER BY 1
"""
IN_SCHEMA_OF_TABLE = """OR EXISTS (SELECT 1 FROM pg_publication_namespace n
                                   WHERE n.pnpubid = p.oid AND n.pnnspid = c.relnamespace)"""

# What only its definition's text could carry: refused, with what to do. A view over the
# table is one: the rename would leave it reading request_logs_legacy (no row from the
# boundary on), and its dependency would refuse retention's DROP of that table for good.
OTHERS_QUERY = """
SELECT 'trigger ' || quote_ident(tgname) FROM pg_trigger t, pg_class c
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s AND tgrelid = c.oid AND NOT tgisinternal
UNION ALL SELECT 'policy ' || quote_ident(polname) FROM pg_policy, pg_class c
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s AND polrelid = c.oid
UNION ALL SELECT 'rule ' || quote_ident(rulename) FROM pg_rewrite, pg_class c
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s AND ev_class = c.oid
UNION ALL SELECT CASE k.contype WHEN 'x' THEN 'exclusion constraint ' WHEN 'u' THEN 'unique constraint '
                  ELSE 'NO INHERIT check ' END || quote_ident(k.conname)
FROM pg_constraint k, pg_class c
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s AND k.conrelid = c.oid
  AND (k.contype IN ('x', 'u') OR k.contype = 'c' AND k.connoinherit)
UNION ALL SELECT 'row level security' FROM pg_class c
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s AND (c.relrowsecurity OR c.relforcerowsecurity)
UNION ALL SELECT DISTINCT CASE v.relkind WHEN 'm' THEN 'materialized view ' ELSE 'view ' END
                          || quote_ident(n.nspname) || '.' || quote_ident(v.relname)
FROM pg_depend d
JOIN pg_rewrite r ON r.oid = d.objid
JOIN pg_class v ON v.oid = r.ev_class
JOIN pg_namespace n ON n.oid = v.relnamespace
JOIN pg_class c ON c.oid = d.refobjid
WHERE c.relnamespace = %(schema)s AND c.relname = %(table)s AND v.oid <> c.oid
  AND d.classid = 'pg_rewrite'::regclass AND d.refclassid = 'pg_class'::regclass
ORDER BY 1
"""


def conversion_carry(snapshot, model, twin, legacy, own_checks=(), own_indexes=()):
    """What the conversion of `model`'s table to the partitioned `twin` carries (statements on
    the twin, indexes, foreign keys, publication memberships) and what it cannot."""
    parent = model._meta.table_name
    params = {"schema": snapshot.target.oid, "table": parent}
    facts = parent_facts(snapshot, parent)
    options, odd_options = reloptions(snapshot, parent)
    cannot = [
        Cannot(
            f"the storage parameter {shown(name)}={shown(value)} of {parent}",
            f"reset it (ALTER TABLE {parent} RESET ({shown(name)})) and set it again on the"
            " partitions after the conversion",
        )
        for name, value in odd_options
    ]
    cannot += [
        Cannot(
            f"the {shown(item)} of {parent}",
            "drop it and make it again on the partitioned table after the conversion"
            " (its definition is catalog text the conversion does not copy; a unique or"
            " exclusion constraint there must hold created_at)",
        )
        for (item,) in guarded(snapshot.target, OTHERS_QUERY, params)
    ]
    cannot += [
        Cannot(
            f"the NOT VALID check {shown_name(c.name)} of {parent}",
            f"validate it (ALTER TABLE {parent} VALIDATE CONSTRAINT ...) or drop it",
            [sql_text("ALTER TABLE", Entity(parent), "VALIDATE CONSTRAINT", Entity(c.name))],
        )
        for c in snapshot.constraints
        if c.table == parent and c.kind == "c" and not c.validated and c.name not in own_checks
    ]
    indexes, refused = carried_indexes(snapshot, model, twin, legacy, own_indexes)
    keys, refused_keys = carried_foreign_keys(snapshot, model, twin)
    publish, unpublish, refused_publications = carried_publications(snapshot, parent, twin, legacy)
    twin_sql = like_statements(facts, parent, twin) if facts else []
    del options  # the partitions get them (made_like); a partitioned table takes none
    return Carry(
        twin_sql,
        indexes,
        keys,
        publish,
        unpublish,
        cannot + refused + refused_keys + refused_publications,
    )


def index_body(index):
    """' USING method (keys) INCLUDE (...)' of an index of plain columns, from its structured
    facts (never its deparsed definition)."""
    keys = []
    for key in index.keys:
        order = ""
        if index.method == "btree":
            order = " DESC" if key.descending else ""
            order += " NULLS FIRST" if key.nulls_first else " NULLS LAST"
        keys.append(render(Entity(key.column)) + order)
    include = (
        f" INCLUDE ({', '.join(render(Entity(c)) for c in index.included)})"
        if index.included
        else ""
    )
    return f" USING {render(Entity(index.method))} ({', '.join(keys)}){include}"


def carried_indexes(snapshot, model, twin, legacy, own_indexes=()):
    """Indexes of the table the models do not declare: each made on the twin (so that every
    partition gets it, and ATTACH adopts the old table's as its partition), or refused."""
    parent = model._meta.table_name
    declared = {index._name for index in model._meta.fields_to_index()}
    carried, cannot = [], []
    for name, index in sorted(snapshot.indexes.items()):
        if index.table != parent or name in declared or index.backs_constraint:
            continue
        if name in own_indexes:
            continue  # the conversion's own
        why = (
            "is INVALID"
            if not index.valid
            else "is unique (a unique index of a partitioned table must hold created_at)"
            if index.unique
            else "has an expression"
            if index.expressions
            else "is partial (its predicate is catalog text)"
            if index.predicate
            else "uses an operator class or collation other than the column's default"
            if not all(k.default_opclass and k.default_collation for k in index.keys)
            else "orders keys with a method that has no order"
            if index.method != "btree" and any(k.descending or k.nulls_first for k in index.keys)
            else None
        )
        if why:
            cannot.append(
                Cannot(
                    f"the index {shown_name(name)} of {parent}, which {why}",
                    "drop it (DROP INDEX CONCURRENTLY) and build it again on the partitioned"
                    " table after the conversion",
                    [sql_text("DROP INDEX CONCURRENTLY", Entity(name))],
                )
            )
            continue
        temporary = f"{name}_partitioned".encode()[:63].decode(errors="ignore")
        renamed = f"{name}_legacy".encode()[:63].decode(errors="ignore")
        sql = sql_text("CREATE INDEX", Entity(temporary), "ON", Entity(twin)) + index_body(index)
        comment = guarded(
            snapshot.target,
            "SELECT obj_description(oid, 'pg_class') FROM pg_class"
            " WHERE relnamespace = %(schema)s AND relname = %(index)s",
            {"schema": snapshot.target.oid, "index": name},
        ).fetchone()[0]
        comment_sql = (
            sql_text("COMMENT ON INDEX", Entity(temporary), "IS", Value(comment))
            if comment is not None
            else None
        )
        carried.append(CarriedIndex(name, temporary, renamed, sql, comment_sql))
    return carried, cannot


def foreign_keys_of(snapshot, table):
    """The foreign keys of `table` and into it, as ForeignKey facts."""
    version = database.server_version or 0
    query = FOREIGN_KEYS_QUERY.format(
        enforced="k.conenforced" if version >= 180000 else "true",
        set_columns=(
            "ARRAY(SELECT a.attname FROM unnest(k.confdelsetcols) WITH ORDINALITY u(n, i)"
            " JOIN pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.i)"
            if version >= 150000
            else "ARRAY[]::name[]"
        ),
    )
    return [
        ForeignKey(*row)
        for row in guarded(snapshot.target, query, {"schema": snapshot.target.oid, "table": table})
    ]


def carriable(key):
    """Whether a key of the table can be made on another table from its facts."""
    return key.outgoing and key.valid and key.match in MATCH


def foreign_key_sql(key, table, not_valid=False):
    """ALTER TABLE table ADD CONSTRAINT: the key `key` (ForeignKey facts) on `table`."""
    return (
        sql_text("ALTER TABLE", Entity(table), "ADD CONSTRAINT", Entity(key.name), "FOREIGN KEY")
        + f" ({', '.join(render(Entity(c)) for c in key.columns)}) REFERENCES "
        + render(Entity(key.ref_schema, key.ref_table))
        + f" ({', '.join(render(Entity(c)) for c in key.ref_columns)}) {MATCH[key.match]}"
        + f" ON UPDATE {ACTIONS[key.on_update]} ON DELETE {ACTIONS[key.on_delete]}"
        # ON DELETE SET NULL (columns), PostgreSQL 15+: only those columns are set.
        + (f" ({', '.join(render(Entity(c)) for c in key.set_columns)})" if key.set_columns else "")
        + (" DEFERRABLE" if key.deferrable else "")
        + (" INITIALLY DEFERRED" if key.deferred else "")
        + (" NOT VALID" if not_valid else "")
    )


def same_key(a, b):
    """Whether two keys check the same thing (ATTACH PARTITION adopts the one for the other)."""
    fields = (
        "columns ref_schema ref_table ref_columns on_update on_delete match deferrable deferred"
        " set_columns"
    )
    return all(getattr(a, f) == getattr(b, f) for f in fields.split())


def carried_foreign_keys(snapshot, model, twin):
    """(statements adding to the twin the table's foreign keys the models do not declare,
    what cannot be carried): keys into the table are refused, as the partitioned table has
    no unique key on id alone that one could reference."""
    parent = model._meta.table_name
    keys = foreign_keys_of(snapshot, parent)
    declared = {
        c.name
        for c in snapshot.constraints
        if c.table == parent and c.kind == "f" and declared_by(model, c)
    }
    statements, cannot = [], []
    for key in keys:
        where = f"{shown_name(key.schema)}.{shown_name(key.table)}"
        if not key.outgoing or key.ref_table == parent:
            cannot.append(
                Cannot(
                    f"the foreign key {shown_name(key.name)} of {where} referencing {parent}",
                    f"the partitioned {parent} has no unique key on id alone for it to"
                    " reference: drop it, or keep request_logs plain",
                    [
                        sql_text(
                            "ALTER TABLE",
                            Entity(key.schema, key.table),
                            "DROP CONSTRAINT",
                            Entity(key.name),
                        )
                    ],
                )
            )
            continue
        if key.name in declared:
            continue  # the swap makes the models' own
        if not carriable(key):  # outgoing here: NOT VALID (or NOT ENFORCED), or MATCH PARTIAL
            cannot.append(
                Cannot(
                    f"the foreign key {shown_name(key.name)} of {parent}, which is"
                    + (" NOT VALID or NOT ENFORCED" if not key.valid else " of a form not carried"),
                    "validate it (or drop it) first",
                    [
                        sql_text(
                            "ALTER TABLE", Entity(parent), "VALIDATE CONSTRAINT", Entity(key.name)
                        )
                    ]
                    if not key.valid
                    else [],
                )
            )
            continue
        sql = foreign_key_sql(key, twin)
        statements.append(
            Statement(
                sql,
                "",
                (key.ref_table,),
                Hazard("ShareRowExclusiveLock", "writes", "instant: the table is empty"),
                ("partitioned", parent, parent),
            )
        )
        if key.comment is not None:
            statements.append(
                Statement(
                    sql_text(
                        "COMMENT ON CONSTRAINT",
                        Entity(key.name),
                        "ON",
                        Entity(twin),
                        "IS",
                        Value(key.comment),
                    ),
                    "",
                    (),
                    ON_NEW_TABLE,
                    ("partitioned", parent, parent),
                )
            )
    return statements, cannot


def carried_publications(snapshot, parent, twin, legacy):
    """(ALTER PUBLICATION ... ADD TABLE twin, ... DROP TABLE legacy, what cannot be carried).

    A publication that publishes request_logs keeps publishing it under that name only with
    publish_via_partition_root: without it, subscribers would get each month's rows under
    the partition's name. Which is the operator's to choose, so the conversion refuses."""
    version = database.server_version or 0
    query = PUBLICATIONS_QUERY.format(
        via_root="p.pubviaroot" if version >= 130000 else "false",
        filtered="pr.prqual IS NOT NULL OR pr.prattrs IS NOT NULL"
        if version >= 150000
        else "false",
        in_schema=IN_SCHEMA_OF_TABLE if version >= 150000 else "",
    )
    publish, unpublish, cannot = [], [], []
    rows = guarded(snapshot.target, query, {"schema": snapshot.target.oid, "table": parent})
    for name, owned, via_root, how, filtered in rows:
        publication = shown_name(name)
        if not via_root:
            cannot.append(
                Cannot(
                    f"the publication {publication} ({how}) with publish_via_partition_root off",
                    f"its subscribers would get each month's rows under the partition's name,"
                    f" not {parent}: set it on (which changes nothing for a plain table), or"
                    f" take {parent} out of it",
                    [
                        sql_text("ALTER PUBLICATION", Entity(name), "SET")
                        + " (publish_via_partition_root = true)"
                    ],
                )
            )
        elif how == "FOR TABLE" and filtered:
            cannot.append(
                Cannot(
                    f"the row filter or column list of {parent} in the publication {publication}",
                    f"drop {parent} from it, convert, then add it again with its filter",
                    [sql_text("ALTER PUBLICATION", Entity(name), "DROP TABLE", Entity(parent))],
                )
            )
        elif how == "FOR TABLE" and not owned:
            cannot.append(
                Cannot(
                    f"the membership of {parent} in the publication {publication}",
                    "run the conversion as the publication's owner or a superuser, who alone"
                    f" may add the partitioned {parent} to it",
                )
            )
        elif how == "FOR TABLE":
            publish.append(sql_text("ALTER PUBLICATION", Entity(name), "ADD TABLE", Entity(twin)))
            unpublish.append(
                sql_text("ALTER PUBLICATION", Entity(name), "DROP TABLE", Entity(legacy))
            )
    return publish, unpublish, cannot
