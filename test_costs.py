"""
Every drift fix's cost line names every lock its SQL takes.

The lock each statement takes is read from the SQL by PostgreSQL's rules (the "Explicit
Locking" table and ALTER TABLE's page), not from the tool's own words, for drift made in many
ways at once. Not covered here: the fix for dated rows in the default partition
(partition.dated_rows_in_default), which another change rewrites; its LOCK TABLE ... IN SHARE
MODE was named as SHARE UPDATE EXCLUSIVE only.
"""

import json
import re
from datetime import UTC, datetime

import partition
from conftest import run_migrate

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
