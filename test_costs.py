"""
Every drift fix's cost line names every lock its SQL takes.

The lock each statement takes is read from the SQL by PostgreSQL's rules (the "Explicit
Locking" table and ALTER TABLE's page), not from the tool's own words, for drift made in many
ways at once. Not covered here: the fix for dated rows in the default partition
(partition.dated_rows_in_default), which another change rewrites; its LOCK TABLE ... IN SHARE
MODE was named as SHARE UPDATE EXCLUSIVE only.

Every planned statement's locks, those on other tables (Hazard.others) included, are read in
pg_locks while real plans run (a move with the months ahead, a retention beside a default
partition, a conversion, a foreign key added and validated; a DBA's foreign key beside the
models'), for the JSON document and the text of --dry-run and --check alike. Not read here:
statements PostgreSQL refuses in a transaction block (CREATE/DROP INDEX CONCURRENTLY, DETACH
PARTITION ... CONCURRENTLY; their pg_locks are gone at their COMMIT), DETACH ... FINALIZE (a
detach left part way), and locks on indexes and sequences.
"""

import json
import re
from datetime import UTC, datetime, timedelta
from itertools import groupby

import psycopg2

import partition
from conftest import migrate_here, run_migrate
from test_online import add_users_and_logs
from test_partition_upkeep import fill, layout_made_months_ago
from test_partitions import logs_by_age, month

# (pattern on the statement, lock it takes), first match wins.
LOCK_RULES = [
    (r"^LOCK TABLE .* IN (?P<mode>[A-Z ]+) MODE", None),
    (r"^CREATE (UNIQUE )?INDEX CONCURRENTLY", "SHARE UPDATE EXCLUSIVE"),
    (r"^CREATE (UNIQUE )?INDEX", "SHARE"),
    (r"^DROP INDEX CONCURRENTLY", "SHARE UPDATE EXCLUSIVE"),
    (r"^DROP (INDEX|TABLE)", "ACCESS EXCLUSIVE"),
    (r"^ALTER INDEX .* RENAME TO", "SHARE UPDATE EXCLUSIVE"),
    (r"^ALTER TABLE .* VALIDATE CONSTRAINT", "SHARE UPDATE EXCLUSIVE"),
    (r"^ALTER TABLE .* DETACH PARTITION .* CONCURRENTLY", "SHARE UPDATE EXCLUSIVE"),
    (r"^ALTER TABLE .* ADD CONSTRAINT .* FOREIGN KEY", "SHARE ROW EXCLUSIVE"),
    (r"^ALTER TABLE .* ATTACH PARTITION", "SHARE UPDATE EXCLUSIVE|ACCESS EXCLUSIVE"),
    (r"^ALTER TABLE ", "ACCESS EXCLUSIVE"),
    (r"^CREATE TABLE .* PARTITION OF", "ACCESS EXCLUSIVE"),
    (r"^(INSERT|UPDATE|DELETE) ", "ROW EXCLUSIVE"),
]


def locks_of(sql):
    for pattern, mode in LOCK_RULES:
        match = re.search(pattern, sql, flags=re.DOTALL)
        if match:
            return set((match.group("mode") if mode is None else mode).split("|"))
    return set()


def names(cost, mode):
    """Whether the cost line names `mode` (SHARE alone, not inside SHARE ROW EXCLUSIVE)."""
    return re.search(rf"\b{mode}\b(?! (ROW|UPDATE) EXCLUSIVE)", cost) is not None


def make_drift(db):
    db.rows("ALTER TABLE api_keys ALTER COLUMN rate_limit SET DEFAULT 5")
    db.rows("ALTER TABLE api_configs ALTER COLUMN name DROP NOT NULL")
    db.rows("ALTER TABLE users ALTER COLUMN username TYPE varchar(100)")
    db.rows("DROP INDEX idx_request_logs_model")
    db.rows("CREATE INDEX idx_request_logs_model ON request_logs (model, status_code)")
    db.rows("DROP INDEX idx_users_email")
    db.rows("ALTER TABLE users ADD CONSTRAINT users_email_key UNIQUE (email)")
    db.rows("ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user")
    db.rows(
        "ALTER TABLE api_keys ADD CONSTRAINT fk_api_keys_user FOREIGN KEY (user_id)"
        " REFERENCES users (id) ON DELETE CASCADE"
    )
    db.rows("ALTER TABLE sign_in_records RENAME CONSTRAINT fk_sign_in_records_user TO other_fk")
    db.rows("DROP INDEX idx_request_logs_status_code")
    db.rows("CREATE TABLE idx_request_logs_status_code (id int)")


def test_every_fix_cost_names_every_lock_its_sql_takes(migrated_db):
    make_drift(migrated_db)
    result = run_migrate(migrated_db.url, "--check", "--format", "json")
    drift = json.loads(result.stdout)["drift"]
    assert len(drift) >= 8, result.stdout  # each way of making drift above is reported
    assert_costs_name_the_locks(drift)


def test_every_partition_fix_cost_names_every_lock_its_sql_takes(empty_db):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    next_month = partition.month_name(
        partition.add_months(partition.month_start(datetime.now(UTC)), 1)
    )
    empty_db.rows(f"ALTER TABLE request_logs DETACH PARTITION {next_month}")
    result = run_migrate(empty_db.url, "--check", "--format", "json")
    drift = json.loads(result.stdout)["drift"]
    assert [d["kind"] for d in drift] == ["partition name held"], result.stdout
    assert_costs_name_the_locks(drift)


def assert_costs_name_the_locks(drift):
    missing = []
    for item in drift:
        for sql in item["fix"]:
            for mode in locks_of(sql):
                if not names(item["cost"], mode):
                    missing.append((item["problem"], sql, mode, item["cost"]))
    assert not missing, "\n".join(map(str, missing))


# --- What PostgreSQL takes, against what the plan says ----------------------------------------
# Each planned statement is run as a run sends it (a "transaction" step in one transaction,
# any other statement in a transaction of its own) and the locks its backend holds after it
# are read from pg_locks before COMMIT. A lock on a table of the schema that the transaction
# did not hold before the statement, at that mode or a stronger one, is the statement's.

# What each mode conflicts with (the "Explicit Locking" table): a declared mode covers a held
# one when it conflicts with everything the held one conflicts with.
CONFLICTS = {
    "ACCESS SHARE": {"ACCESS EXCLUSIVE"},
    "ROW SHARE": {"EXCLUSIVE", "ACCESS EXCLUSIVE"},
    "ROW EXCLUSIVE": {"SHARE", "SHARE ROW EXCLUSIVE", "EXCLUSIVE", "ACCESS EXCLUSIVE"},
    "SHARE UPDATE EXCLUSIVE": {
        "SHARE UPDATE EXCLUSIVE",
        "SHARE",
        "SHARE ROW EXCLUSIVE",
        "EXCLUSIVE",
        "ACCESS EXCLUSIVE",
    },
    "SHARE": {
        "ROW EXCLUSIVE",
        "SHARE UPDATE EXCLUSIVE",
        "SHARE ROW EXCLUSIVE",
        "EXCLUSIVE",
        "ACCESS EXCLUSIVE",
    },
    "SHARE ROW EXCLUSIVE": {
        "ROW EXCLUSIVE",
        "SHARE UPDATE EXCLUSIVE",
        "SHARE",
        "SHARE ROW EXCLUSIVE",
        "EXCLUSIVE",
        "ACCESS EXCLUSIVE",
    },
    "EXCLUSIVE": {
        "ROW SHARE",
        "ROW EXCLUSIVE",
        "SHARE UPDATE EXCLUSIVE",
        "SHARE",
        "SHARE ROW EXCLUSIVE",
        "EXCLUSIVE",
        "ACCESS EXCLUSIVE",
    },
}
CONFLICTS["ACCESS EXCLUSIVE"] = set(CONFLICTS) | {"ACCESS EXCLUSIVE"}
STRENGTH = list(CONFLICTS)  # weakest first


def covers(declared, held):
    return CONFLICTS[held] <= CONFLICTS[declared]


TABLES = (
    "SELECT c.oid, c.relname FROM pg_class c WHERE c.relkind IN ('r', 'p')"
    " AND c.relnamespace = 'public'::regnamespace"
)
HELD = (
    "SELECT relation, mode FROM pg_locks WHERE locktype = 'relation' AND granted"
    " AND pid = pg_backend_pid() AND relation IS NOT NULL"
)


def mode_words(mode):
    """'ShareRowExclusiveLock' -> 'SHARE ROW EXCLUSIVE'."""
    return re.sub(r"(?<!^)(?=[A-Z])", " ", mode.removesuffix("Lock")).upper()


def declared_in_json(item):
    """(table, lock) pairs a pending statement of the JSON document says it takes."""
    main = [(table, item["lock"]) for table in item["tables"]] if item["lock"] else []
    return main + [(other["table"], other["lock"]) for other in item["also_locks"]]


def declared_in_text(line):
    """(table, lock) pairs a '-- locks ...' line of --dry-run or --check says it takes."""
    pairs = []
    main = re.match(r"-- locks (.+?) ([A-Z][A-Z ]*[A-Z]) \(", line)
    if main:
        pairs += [(table, main[2]) for table in main[1].split(", ")]
    also = re.search(r"; also locks (.+?)(;|$)", line)
    if also:
        for part in also[1].split(", "):
            table, mode = re.fullmatch(r"(.+?) ([A-Z][A-Z ]*[A-Z])", part).groups()
            pairs.append((table, mode))
    return pairs


def text_hazards(output):
    """The hazard line printed above each statement, by the statement's SQL."""
    lines = output.splitlines()
    return {
        line.removesuffix(";"): lines[index - 1]
        for index, line in enumerate(lines)
        if index and lines[index - 1].startswith("-- ") and not line.startswith("--")
    }


def tables_by_name(cursor):
    cursor.execute(TABLES)
    return {name: oid for oid, name in cursor.fetchall()}


def held(cursor):
    cursor.execute(HELD)
    locks = {}
    for oid, mode in cursor.fetchall():
        locks.setdefault(oid, set()).add(mode_words(mode))
    return locks


def wrong_locks(item, before, after, names_before, names_after):
    """How what the statement took differs from what it declares, in words; [] when it is the same."""
    names = {oid: name for name, oid in {**names_after, **names_before}.items()}
    taken = {}
    for oid, modes in after.items():
        if oid not in names:
            continue  # an index, a sequence, a catalog: not a table of the schema
        earlier = before.get(oid, set())
        new = {m for m in modes if not any(covers(e, m) for e in earlier)}
        if new:
            taken[oid] = new
    declared = {}
    for table, mode in declared_in_json(item):
        oid = names_before.get(table, names_after.get(table))
        if oid is not None:
            declared.setdefault(oid, set()).add(mode)
    wrong = []
    for oid, modes in taken.items():
        if oid not in names_before.values():
            continue  # made by this statement: no other session sees it before COMMIT
        for mode in modes:
            if not any(covers(d, mode) for d in declared.get(oid, ())):
                wrong.append(f"takes {mode} on {names[oid]}, undeclared")
    for oid, modes in declared.items():
        if any(covers(earlier, mode) for earlier in before.get(oid, ()) for mode in modes):
            continue  # held already in this transaction: not the statement's to take
        strongest = max(taken.get(oid, ()), key=STRENGTH.index, default=None)
        if strongest is None and modes == {"ROW SHARE"}:
            continue  # the key check of a row inserted: none was, this time
        if strongest not in modes:
            wrong.append(f"declares {sorted(modes)} on {names[oid]}, takes {strongest}")
    return wrong


def run_checking_locks(db, pending):
    """Run the plan's statements in order; what each took that its hazard does not say."""
    connection = psycopg2.connect(db.url)
    wrong = []
    try:
        for stage, items in groupby(pending, key=lambda item: item["stage"]):
            one_transaction = stage.split(":")[0] == "transaction"
            cursor = connection.cursor()
            for item in items:
                if "CONCURRENTLY" in item["sql"]:  # refused in a transaction block
                    connection.commit()
                    connection.autocommit = True
                    cursor.execute(item["sql"])
                    connection.autocommit = False
                    continue
                names_before, before = tables_by_name(cursor), held(cursor)
                cursor.execute(item["sql"])
                names_after, after = tables_by_name(cursor), held(cursor)
                wrong += [
                    f"{stage}: {item['sql'][:90]}: {problem}"
                    for problem in wrong_locks(item, before, after, names_before, names_after)
                ]
                if not one_transaction:
                    connection.commit()
            connection.commit()
    finally:
        connection.close()
    return wrong


def assert_plan_locks_hold(db, *args):
    """The plan of `migrate.py *args`, as JSON and as --dry-run text, run statement by statement."""
    document = json.loads(run_migrate(db.url, *args, "--dry-run", "--format", "json").stdout)
    pending = document["pending"]
    assert pending, document
    text = text_hazards(run_migrate(db.url, *args, "--dry-run").stdout)
    checked = (
        text_hazards(run_migrate(db.url, *args, "--check").stdout)
        if "--retain-request-logs" not in args
        else {}
    )
    for item in pending:
        if item["lock"] is None and not item.get("also_locks"):
            continue
        for output in (text, checked):
            if item["sql"] in output:
                assert sorted(declared_in_text(output[item["sql"]])) == sorted(
                    declared_in_json(item)
                ), (item["sql"], output[item["sql"]])
    wrong = run_checking_locks(db, pending)
    assert not wrong, "\n".join(wrong)
    return pending


def test_a_moves_statements_take_the_locks_their_hazards_name(empty_db):
    layout_made_months_ago(empty_db, 4)
    fill(empty_db, month(datetime.now(UTC)), 100)
    a_dbas_foreign_key(empty_db)
    pending = assert_plan_locks_hold(empty_db)
    stages = {item["stage"] for item in pending}
    assert "transaction: switch request_logs_default for its copies" in stages
    assert "transaction: attach the months ahead" in stages
    assert any(stage.startswith("transaction: unlink ") for stage in stages)
    assert any(("paths", "ACCESS EXCLUSIVE") in declared_in_json(item) for item in pending)


def test_a_retention_drops_statements_take_the_locks_their_hazards_name(empty_db):
    now = datetime.now(UTC)
    migrate_here(empty_db.params, partition=True, now=now - timedelta(days=93))
    for days in (62, 31, 0):
        migrate_here(empty_db.params, now=now - timedelta(days=days))
    add_users_and_logs(empty_db, logs=0)
    logs_by_age(empty_db, [0, 20, 45, 70, 85])
    pending = assert_plan_locks_hold(empty_db, "--retain-request-logs", "50")
    stages = {item["stage"] for item in pending}
    assert any(stage.startswith("transaction: detach ") for stage in stages), stages
    assert any(stage.startswith("transaction: unlink ") for stage in stages), stages


def a_dbas_foreign_key(db):
    """A foreign key of request_logs the models do not declare, into a table of its own."""
    db.rows("CREATE TABLE paths (path varchar(255) PRIMARY KEY)")
    db.rows("INSERT INTO paths SELECT DISTINCT path FROM request_logs")
    db.rows(
        "ALTER TABLE request_logs ADD CONSTRAINT known_path FOREIGN KEY (path) REFERENCES paths"
    )


def test_a_conversions_statements_take_the_locks_their_hazards_name(migrated_db):
    add_users_and_logs(migrated_db, logs=0)
    logs_by_age(migrated_db, [0, 20, 45])
    a_dbas_foreign_key(migrated_db)
    pending = assert_plan_locks_hold(migrated_db, "--partition-request-logs")
    assert any(" VALIDATE CONSTRAINT " in item["sql"] for item in pending)
    assert any(("paths", "SHARE ROW EXCLUSIVE") in declared_in_json(item) for item in pending)


def test_a_foreign_keys_statements_take_the_locks_their_hazards_name(migrated_db):
    add_users_and_logs(migrated_db, logs=10)
    migrated_db.rows("ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user")
    pending = assert_plan_locks_hold(migrated_db)
    assert any(" VALIDATE CONSTRAINT " in item["sql"] for item in pending)
