"""
migrate.py on databases that already hold data: made by an older schema
file, by an older version of the models, or left half-built.

It adds what is missing and never changes what is there; what differs is
reported (--check) with the SQL that would fix it.
"""

import re
import threading

import psycopg2
import pytest

import migrate
from catalog import read_catalog, target_schema
from conftest import (
    BUDGET_BOUND,
    assert_clean_failure,
    catalog,
    error_line,
    has_column,
    open_write_transaction,
    poll_until,
    record_ddl,
    run_in_parallel,
    run_migrate,
    run_migrate_timed,
)
from test_migrate import assert_contract_catalog

# The hand-written schema file older deployments were made from: serial ids,
# timestamps without time zone, UNIQUE constraints and default-named foreign
# keys, no last_sign_in, and only some of the indexes.
LEGACY_SCHEMA = """
CREATE TABLE users (
    id SERIAL PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT now(),
    updated_at TIMESTAMP NOT NULL DEFAULT now(),
    deleted_at TIMESTAMP,
    username VARCHAR(255) NOT NULL UNIQUE,
    email VARCHAR(255) NOT NULL UNIQUE,
    password_hash VARCHAR(255) NOT NULL,
    quota INTEGER NOT NULL DEFAULT 10000,
    used_quota INTEGER NOT NULL DEFAULT 0,
    is_admin BOOLEAN NOT NULL DEFAULT false,
    status VARCHAR(50) NOT NULL DEFAULT 'active'
);
CREATE TABLE api_keys (
    id SERIAL PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT now(),
    updated_at TIMESTAMP NOT NULL DEFAULT now(),
    deleted_at TIMESTAMP,
    user_id INTEGER NOT NULL REFERENCES users(id),
    key VARCHAR(255) NOT NULL UNIQUE,
    name VARCHAR(255) NOT NULL,
    is_active BOOLEAN NOT NULL DEFAULT true,
    rate_limit INTEGER NOT NULL DEFAULT 60,
    last_used_at TIMESTAMP
);
CREATE TABLE api_configs (
    id SERIAL PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT now(),
    updated_at TIMESTAMP NOT NULL DEFAULT now(),
    deleted_at TIMESTAMP,
    name VARCHAR(255) NOT NULL,
    type VARCHAR(50) NOT NULL,
    base_url TEXT NOT NULL,
    api_key TEXT,
    models JSONB NOT NULL DEFAULT '[]',
    headers JSONB,
    is_active BOOLEAN NOT NULL DEFAULT true,
    priority INTEGER NOT NULL DEFAULT 100,
    weight INTEGER NOT NULL DEFAULT 1,
    max_rps INTEGER NOT NULL DEFAULT 0,
    timeout INTEGER NOT NULL DEFAULT 30
);
CREATE TABLE load_balancer_configs (
    id SERIAL PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT now(),
    updated_at TIMESTAMP NOT NULL DEFAULT now(),
    deleted_at TIMESTAMP,
    model_name VARCHAR(255) NOT NULL,
    strategy VARCHAR(50) NOT NULL DEFAULT 'round_robin',
    is_active BOOLEAN NOT NULL DEFAULT true
);
CREATE TABLE request_logs (
    id SERIAL PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT now(),
    deleted_at TIMESTAMP,
    user_id INTEGER NOT NULL REFERENCES users(id),
    api_key_id INTEGER NOT NULL REFERENCES api_keys(id),
    api_config_id INTEGER NOT NULL,
    model VARCHAR(255) NOT NULL,
    method VARCHAR(10) NOT NULL,
    path TEXT NOT NULL,
    status_code INTEGER NOT NULL,
    response_time INTEGER NOT NULL,
    tokens_used INTEGER NOT NULL DEFAULT 0,
    error_msg TEXT
);
CREATE TABLE sign_in_records (
    id SERIAL PRIMARY KEY,
    created_at TIMESTAMP NOT NULL DEFAULT now(),
    deleted_at TIMESTAMP,
    user_id INTEGER NOT NULL REFERENCES users(id),
    quota_awarded INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX idx_users_deleted_at ON users(deleted_at);
CREATE INDEX idx_api_keys_user_id ON api_keys(user_id);
CREATE INDEX idx_request_logs_user_id ON request_logs(user_id);
CREATE INDEX idx_request_logs_created_at ON request_logs(created_at DESC);
"""
LEGACY_ROWS = """
INSERT INTO users (username, email, password_hash, quota, created_at)
    SELECT 'user' || g, 'user' || g || '@example.com', 'hash' || g, 100 * g,
           TIMESTAMP '2024-01-01 12:00' + g * INTERVAL '1 day'
    FROM generate_series(1, 3) g;
INSERT INTO api_keys (user_id, key, name) SELECT id, 'sk-' || id, 'key of ' || username FROM users;
INSERT INTO api_configs (name, type, base_url, models, headers)
    VALUES ('openai', 'openai', 'https://api.openai.com', '["gpt-4o"]', '{"X-Org": "acme"}');
INSERT INTO load_balancer_configs (model_name, strategy) VALUES ('gpt-4o', 'weighted');
INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path, status_code,
                          response_time, tokens_used, error_msg)
    SELECT user_id, id, 1, 'gpt-4o', 'POST', '/v1/chat/completions', 200, 100 + id, 10 * id, NULL
    FROM api_keys;
INSERT INTO sign_in_records (user_id, quota_awarded) SELECT id, 50 FROM users;
"""


def table_contents(db, tables):
    """Every row of every table, as JSON text, to compare before and after a run."""
    return {
        table: db.rows(f"SELECT row_to_json(t)::jsonb FROM {table} t ORDER BY id")
        for table in tables
    }


def without_new_columns(contents, new_columns):
    return {
        table: [{k: v for k, v in row.items() if (table, k) not in new_columns} for (row,) in rows]
        for table, rows in contents.items()
    }


def column_types(db):
    return {(table, name): type_ for table, _, name, type_, _, _ in catalog(db)["columns"]}


def build_legacy(db):
    db.rows(LEGACY_SCHEMA)
    db.rows(LEGACY_ROWS)


# --- A database made by the older hand-written schema ------------------------

LEGACY_TABLES = [
    "users",
    "api_keys",
    "api_configs",
    "load_balancer_configs",
    "request_logs",
    "sign_in_records",
]


def test_legacy_database_gets_what_is_missing_and_keeps_every_row_and_type(empty_db):
    build_legacy(empty_db)
    rows_before = table_contents(empty_db, LEGACY_TABLES)
    types_before = column_types(empty_db)

    result = run_migrate(empty_db.url)

    assert result.returncode == 0, result.stderr
    assert "migrate: added column users.last_sign_in" in result.stderr
    assert "migrate: created index idx_request_logs_model_created" in result.stderr
    types_after = column_types(empty_db)
    assert {key: types_after[key] for key in types_before} == types_before
    assert types_after[("users", "last_sign_in")] == "timestamp with time zone"
    rows_after = without_new_columns(
        table_contents(empty_db, LEGACY_TABLES), {("users", "last_sign_in")}
    )
    assert rows_after == without_new_columns(rows_before, set())


def test_check_on_a_legacy_database_reports_only_drift_and_exits_3(empty_db):
    build_legacy(empty_db)
    assert run_migrate(empty_db.url).returncode == 0

    result = run_migrate(empty_db.url, "--check")

    assert result.returncode == migrate.EXIT_DRIFT, result.stderr
    report = result.stdout
    assert "-- users.id is integer; the models say bigint" in report
    assert 'ALTER TABLE "users" ALTER COLUMN "id" TYPE BIGINT;' in report
    assert (
        "-- users.created_at is timestamp without time zone; the models say timestamp with time zone"
        in report
    )
    assert (
        'ALTER TABLE "users" ALTER COLUMN "created_at" TYPE TIMESTAMPTZ USING "created_at"'
        " AT TIME ZONE 'UTC';" in report.splitlines()
    )
    assert "-- users.created_at should be nullable" in report
    assert 'ALTER SEQUENCE "users_id_seq" AS bigint;' in report.splitlines()
    assert (
        "-- foreign key api_keys.user_id is named api_keys_user_id_fkey, not fk_api_keys_user"
        in report
    )
    assert (
        "-- users: uniqueness of (username) is enforced by UNIQUE constraint users_username_key"
        " instead of unique index idx_users_username" in report
    )
    assert "-- pending" not in report


def test_legacy_unique_constraints_and_foreign_keys_are_not_duplicated(empty_db):
    build_legacy(empty_db)
    result = run_migrate(empty_db.url)
    assert result.returncode == 0, result.stderr
    indexes = {name for _, name, _ in catalog(empty_db)["indexes"]}
    constraints = {name for _, name, _, _ in catalog(empty_db)["constraints"]}
    # The run did its work beside them: what the legacy schema lacked is there.
    assert "idx_request_logs_model_created" in indexes
    assert has_column(empty_db, "users", "last_sign_in")
    assert "idx_users_username" not in indexes and "users_username_key" in indexes
    assert "fk_api_keys_user" not in constraints and "api_keys_user_id_fkey" in constraints


# --- A database from an older version of the models ---------------------------


def test_missing_nullable_and_defaulted_columns_are_added_with_data_intact(migrated_db):
    migrated_db.rows(
        "INSERT INTO users (username, email, password_hash, quota) VALUES ('a', 'a@x', 'h1', 7), ('b', 'b@x', 'h2', 9)"
    )
    migrated_db.rows("ALTER TABLE users DROP COLUMN last_sign_in, DROP COLUMN used_quota")

    result = run_migrate(migrated_db.url)

    assert result.returncode == 0, result.stderr
    rows = migrated_db.rows(
        "SELECT username, password_hash, quota, used_quota, last_sign_in FROM users ORDER BY id"
    )
    assert rows == [("a", "h1", 7, 0, None), ("b", "h2", 9, 0, None)]
    assert run_migrate(migrated_db.url, "--check").returncode == 0


def test_not_null_column_with_a_default_is_added_in_one_statement(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN used_quota")
    result = run_migrate(migrated_db.url, "--dry-run")
    assert (
        'ALTER TABLE "users" ADD COLUMN IF NOT EXISTS "used_quota" BIGINT NOT NULL DEFAULT 0;'
        in result.stdout
    )
    assert "UPDATE" not in result.stdout


def test_not_null_column_without_default_on_a_table_with_rows_stops_before_any_change(migrated_db):
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('a', 'a@x', 'h')")
    migrated_db.rows("ALTER TABLE users DROP COLUMN password_hash")
    migrated_db.rows("DROP TABLE sign_in_records")

    result = run_migrate(migrated_db.url)

    assert_clean_failure(result, "cannot add NOT NULL column users.password_hash without a default")
    assert "--dry-run lists the SQL for it" in error_line(result)
    assert "sign_in_records" not in migrated_db.tables()


def test_a_blocked_column_leaves_the_rest_of_the_plan_listed_with_sql_that_adds_it_online(
    migrated_db,
):
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('a', 'a@x', 'h')")
    migrated_db.rows("ALTER TABLE users DROP COLUMN password_hash")
    migrated_db.rows("DROP INDEX idx_request_logs_model")

    for flag in ("--check", "--dry-run"):
        result = run_migrate(migrated_db.url, flag)
        assert result.returncode == migrate.EXIT_ERROR, result.stderr
        lines = result.stdout.splitlines()
        assert "-- blocked: no run adds anything until these are resolved" in lines
        assert '-- ALTER TABLE "users" ADD COLUMN "password_hash" VARCHAR(255);' in lines
        assert (
            '-- ALTER TABLE "users" ADD CONSTRAINT "users_password_hash_not_null"'
            ' CHECK ("password_hash" IS NOT NULL) NOT VALID;' in lines
        )
        assert '-- ALTER TABLE "users" ALTER COLUMN "password_hash" SET NOT NULL;' in lines
        assert any(
            line.startswith('CREATE INDEX CONCURRENTLY IF NOT EXISTS "idx_request_logs_model"')
            for line in lines
        )
        assert error_line(result).startswith("migrate: error: 1 blocker stops every run")


def test_not_null_column_without_default_is_added_to_an_empty_table(migrated_db):
    migrated_db.rows("ALTER TABLE users DROP COLUMN password_hash")
    result = run_migrate(migrated_db.url)
    assert result.returncode == 0, result.stderr
    assert migrated_db.value(
        "SELECT attnotnull FROM pg_attribute WHERE attrelid = 'users'::regclass AND attname = 'password_hash'"
    )


# --- Drift and unknown objects --------------------------------------------------


def test_check_on_a_migrated_database_exits_0_and_prints_nothing(migrated_db):
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "the database matches the models" in result.stderr


def test_check_reports_pending_changes_and_changes_nothing(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    before = catalog(migrated_db)
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == migrate.EXIT_PENDING
    assert (
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "idx_users_status" ON "users" ("status")'
        ' WHERE ("deleted_at" IS NULL);' in result.stdout
    )
    assert catalog(migrated_db) == before


def test_index_with_the_contract_name_but_another_definition_is_reported_not_rebuilt(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    migrated_db.rows("CREATE INDEX idx_users_status ON users (status)")  # not partial

    result = run_migrate(migrated_db.url, "--check")

    assert result.returncode == migrate.EXIT_DRIFT
    assert (
        "-- index idx_users_status differs from the models (its predicate is none): it is"
        " CREATE INDEX idx_users_status ON public.users USING btree (status)"
        in result.stdout.splitlines()
    )
    assert run_migrate(migrated_db.url).returncode == 0
    assert "WHERE" not in migrated_db.value(
        "SELECT indexdef FROM pg_indexes WHERE indexname = 'idx_users_status'"
    )


@pytest.mark.parametrize(
    ("name", "definition", "words"),
    [
        ("idx_users_status", ("UNIQUE INDEX idx_users_status ON users (status)"
         " WHERE deleted_at IS NULL"), "it is unique"),
        ("idx_users_email", "INDEX idx_users_email ON users (email)", "it is not unique"),
    ],
)  # fmt: skip
def test_an_index_whose_uniqueness_differs_from_the_models_is_drift(
    migrated_db, name, definition, words
):
    migrated_db.rows(f"DROP INDEX {name}")
    migrated_db.rows(f"CREATE {definition}")
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == migrate.EXIT_DRIFT, result.stdout
    assert f"-- index {name} differs from the models ({words}): it is CREATE " in result.stdout


def test_a_column_one_character_wider_than_the_models_is_drift_whose_count_finds_what_fails(
    migrated_db,
):
    migrated_db.rows("ALTER TABLE users ALTER COLUMN username TYPE varchar(256)")
    for length in (255, 256):
        migrated_db.rows(
            "INSERT INTO users (username, email, password_hash) VALUES (repeat('u', %s), %s, 'h')",
            length,
            f"{length}@x",
        )
    result = run_migrate(migrated_db.url, "--check")

    assert result.returncode == migrate.EXIT_DRIFT, result.stdout
    lines = result.stdout.splitlines()
    assert '-- ALTER TABLE "users" ALTER COLUMN "username" TYPE VARCHAR(255);' in lines  # not run
    count = re.search(
        r"count them with: (SELECT count\(\*\) FROM .*?)\)$", result.stdout, re.MULTILINE
    )
    assert count, result.stdout
    assert migrated_db.value(count[1]) == 1  # the 256 characters, not the 255


@pytest.mark.parametrize(
    ("order", "words"),
    [
        ("DESC", "status DESC"),
        ("NULLS FIRST", "status NULLS FIRST"),
        ("DESC NULLS LAST", "status DESC NULLS LAST"),
    ],
)
def test_an_index_with_another_key_order_is_drift_naming_the_order(migrated_db, order, words):
    migrated_db.rows("DROP INDEX idx_users_status")
    migrated_db.rows(
        f"CREATE INDEX idx_users_status ON users (status {order}) WHERE deleted_at IS NULL"
    )
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == migrate.EXIT_DRIFT, result.stdout
    assert f"-- index idx_users_status differs from the models (its keys are ({words})):" in (
        result.stdout
    )


def test_foreign_key_with_the_contract_name_but_another_definition_is_reported(migrated_db):
    migrated_db.rows("ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user")
    migrated_db.rows(
        "ALTER TABLE api_keys ADD CONSTRAINT fk_api_keys_user FOREIGN KEY (user_id)"
        " REFERENCES users(id) ON DELETE CASCADE"
    )

    result = run_migrate(migrated_db.url, "--check")

    assert result.returncode == migrate.EXIT_DRIFT
    assert (
        "-- foreign key fk_api_keys_user is FOREIGN KEY (user_id) REFERENCES users(id) ON DELETE"
        " CASCADE; the models say FOREIGN KEY (user_id) REFERENCES users(id)" in result.stdout
    )
    assert "-- pending" not in result.stdout


def test_objects_the_models_do_not_know_are_listed_and_left_alone(migrated_db):
    migrated_db.rows("CREATE TABLE audit_trail (id int)")
    migrated_db.rows("ALTER TABLE users ADD COLUMN nickname text")
    migrated_db.rows("CREATE INDEX users_lower_email ON users (lower(email))")

    result = run_migrate(migrated_db.url, "--check")

    assert result.returncode == 0  # extra objects alone are not a mismatch
    for item in ("table audit_trail", "column users.nickname", "index users.users_lower_email"):
        assert f"--   {item}" in result.stdout
    assert run_migrate(migrated_db.url).returncode == 0
    assert "audit_trail" in migrated_db.tables()


def test_catalog_is_read_in_one_snapshot_of_three_queries_however_many_tables(
    migrated_db, monkeypatch
):
    for number in range(40):
        migrated_db.rows(f"CREATE TABLE extra_{number} (id serial PRIMARY KEY, name text UNIQUE)")
    queries = []
    execute_sql = migrate.database.execute_sql
    monkeypatch.setattr(
        migrate.database, "execute_sql", lambda sql, *a: queries.append(sql) or execute_sql(sql, *a)
    )

    snapshot = read_catalog(target_schema())

    # The target schema; BEGIN REPEATABLE READ; the tables, relations and constraints; COMMIT.
    assert len(queries) == 6
    assert queries[1].startswith("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    assert queries[-1] == "COMMIT"
    assert len(snapshot.tables) == 46


# --- --dry-run ---------------------------------------------------------------------


def break_partly(db):
    db.rows("DROP TABLE sign_in_records")
    db.rows("DROP INDEX idx_request_logs_model_created, idx_users_email")
    db.rows("ALTER TABLE request_logs DROP COLUMN error_msg")


def test_dry_run_prints_the_statements_with_transaction_boundaries_and_changes_nothing(migrated_db):
    break_partly(migrated_db)
    before = catalog(migrated_db)
    record_ddl(migrated_db)

    result = run_migrate(migrated_db.url, "--dry-run")

    assert result.returncode == 0, result.stderr
    statements = [line for line in result.stdout.splitlines() if not line.startswith("--")]
    statements = [line for line in statements if "transaction_timeout" not in line]  # 17+
    assert statements[:6] == [
        'SET search_path TO "public", pg_temp;',
        "BEGIN;",
        "SET LOCAL lock_timeout = '50ms';",
        "SET LOCAL statement_timeout = '10000ms';",
        "SET LOCAL idle_in_transaction_session_timeout = '10000ms';",
        'SET LOCAL search_path TO "public", pg_temp;',
    ]
    assert 'ALTER TABLE "request_logs" ADD COLUMN IF NOT EXISTS "error_msg" TEXT;' in statements
    assert statements[-3:] == [
        "RESET lock_timeout;",
        "RESET statement_timeout;",
        "RESET search_path;",
    ]
    assert migrated_db.rows("SELECT command FROM audit.ddl_log") == []
    assert catalog(migrated_db) == before


def test_a_real_run_executes_exactly_what_dry_run_printed(migrated_db):
    break_partly(migrated_db)
    printed = run_migrate(migrated_db.url, "--dry-run").stdout.splitlines()
    record_ddl(migrated_db)

    assert run_migrate(migrated_db.url).returncode == 0

    executed = [query for (query,) in migrated_db.rows("SELECT query FROM audit.ddl_log")]
    ddl = [
        line.rstrip(";") for line in printed if line.split()[0] in ("CREATE", "ALTER", "COMMENT")
    ]
    assert executed == ddl
    assert_contract_catalog(migrated_db)


def test_dry_run_builds_indexes_on_existing_tables_online_after_the_commit(migrated_db):
    break_partly(migrated_db)
    statements = run_migrate(migrated_db.url, "--dry-run").stdout.splitlines()
    commit = statements.index("COMMIT;")
    online = [line for line in statements[commit + 1 :] if not line.startswith("--")]
    online = [line for line in online if "transaction_timeout" not in line]  # 17+
    assert online[:3] == [
        "SET lock_timeout = '5000ms';",
        "SET statement_timeout = '0ms';",
        'SET search_path TO "public", pg_temp;',
    ]
    assert sorted(online[3:-3]) == [
        'CREATE INDEX CONCURRENTLY IF NOT EXISTS "idx_request_logs_model_created" ON "request_logs" ("model", "created_at" DESC);',
        'CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS "idx_users_email" ON "users" ("email");',
    ]
    # The new table's indexes are built inside the transaction, with the table.
    assert (
        'CREATE INDEX "idx_sign_in_records_user_id" ON "sign_in_records" ("user_id");'
        in statements[:commit]
    )


def test_concurrently_is_accepted_and_plans_what_the_default_plans(migrated_db):
    break_partly(migrated_db)
    default = run_migrate(migrated_db.url, "--dry-run")
    concurrently = run_migrate(migrated_db.url, "--dry-run", "--concurrently")
    assert concurrently.returncode == 0, concurrently.stderr
    assert "CREATE INDEX CONCURRENTLY" in default.stdout
    assert concurrently.stdout == default.stdout


def test_dry_run_with_atomic_builds_every_index_inside_the_transaction(migrated_db):
    break_partly(migrated_db)
    statements = run_migrate(migrated_db.url, "--dry-run", "--atomic").stdout.splitlines()
    commit = statements.index("COMMIT;")
    assert statements[commit + 1 :] == []
    assert 'CREATE UNIQUE INDEX "idx_users_email" ON "users" ("email");' in statements[:commit]


# --- Locks and concurrency ------------------------------------------------------


def test_lock_timeout_gives_up_naming_the_blocking_session_and_changes_nothing(migrated_db):
    migrated_db.rows("DROP TABLE load_balancer_configs")
    migrated_db.rows("DROP INDEX idx_request_logs_model")  # --atomic: a SHARE lock on request_logs
    writer = open_write_transaction(migrated_db)
    writer_pid = writer.get_backend_pid()
    try:
        result, seconds = run_migrate_timed(migrated_db.url, "--atomic", "--lock-timeout", "0.5")
    finally:
        writer.rollback()
        writer.close()

    assert seconds < BUDGET_BOUND, seconds

    assert_clean_failure(result, "request_logs stayed locked for the whole --lock-timeout of 0.5 s")
    assert f"pid {writer_pid} (" in result.stderr
    assert "holds ROW EXCLUSIVE on request_logs" in result.stderr
    assert "nothing was changed" in result.stderr
    assert "--lock-timeout" in result.stderr.splitlines()[-1]
    assert "load_balancer_configs" not in migrated_db.tables()
    assert run_migrate(migrated_db.url).returncode == 0
    assert_contract_catalog(migrated_db)


def test_eight_parallel_runs_on_a_partly_built_database_all_succeed(migrated_db):
    break_partly(migrated_db)
    statuses, outputs = run_in_parallel(migrated_db, 8)
    assert statuses == [0] * 8, outputs
    assert sum(output.count("created table sign_in_records") for output in outputs) == 1
    assert_contract_catalog(migrated_db)


def test_eight_parallel_atomic_runs_on_a_partly_built_database_all_succeed(migrated_db):
    break_partly(migrated_db)
    statuses, outputs = run_in_parallel(migrated_db, 8, "--atomic")
    assert statuses == [0] * 8, outputs
    assert sum(output.count("created index idx_users_email") for output in outputs) == 1
    assert_contract_catalog(migrated_db)


def test_failed_concurrent_build_leaves_an_invalid_index_that_the_next_run_rebuilds(migrated_db):
    migrated_db.rows("DROP INDEX idx_api_keys_key")
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('a', 'a@x', 'h')")
    migrated_db.rows(
        "INSERT INTO api_keys (user_id, key, name) SELECT id, 'dup', n FROM users, (VALUES ('1'), ('2')) v(n)"
    )

    failed = run_migrate(migrated_db.url)

    assert_clean_failure(failed, "was left INVALID: the next run drops and rebuilds it")
    assert not migrated_db.value(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'idx_api_keys_key'::regclass"
    )
    assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_PENDING

    migrated_db.rows("DELETE FROM api_keys WHERE name = '2'")
    repaired = run_migrate(migrated_db.url)

    assert repaired.returncode == 0, repaired.stderr
    assert "migrate: dropped invalid index idx_api_keys_key" in repaired.stderr
    assert "migrate: rebuilt index idx_api_keys_key" in repaired.stderr
    assert_contract_catalog(migrated_db)
    assert migrated_db.value("SELECT bool_and(indisvalid) FROM pg_index")


# --- Writers keep writing during the online stage --------------------------------------

REQUEST_LOG_INDEXES = [
    "idx_request_logs_deleted_at",
    "idx_request_logs_user_id",
    "idx_request_logs_api_key_id",
    "idx_request_logs_api_config_id",
    "idx_request_logs_model",
    "idx_request_logs_status_code",
    "idx_request_logs_created_at",
    "idx_request_logs_user_created",
    "idx_request_logs_model_created",
]


def load_a_million_request_logs(db):
    db.rows("INSERT INTO users (username, email, password_hash) VALUES ('u', 'u@x', 'h')")
    db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
    db.rows(f"DROP INDEX {', '.join(REQUEST_LOG_INDEXES)}")
    db.rows("SET session_replication_role = replica")  # skip the FK triggers while loading
    db.rows(
        "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model, method, path,"
        " status_code, response_time)"
        " SELECT now() - (g % 2592000) * interval '1 second', u.id, k.id, g % 100, 'model-' || (g % 50),"
        " 'POST', '/v1/chat/completions', 200, g % 1000"
        " FROM generate_series(1, 1000000) g, users u, api_keys k"
    )
    db.rows("RESET session_replication_role")


class Inserter(threading.Thread):
    """Inserts request logs one by one; an insert that waits longer than its lock_timeout fails."""

    def __init__(self, url, lock_timeout_ms):
        super().__init__(daemon=True)
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True
        with self.connection.cursor() as cursor:
            cursor.execute(f"SET lock_timeout = {lock_timeout_ms}")
        self.stop = threading.Event()
        self.inserted = self.timed_out = 0

    def run(self):
        with self.connection.cursor() as cursor:
            while not self.stop.is_set():
                try:
                    cursor.execute(
                        "INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path,"
                        " status_code, response_time) SELECT user_id, id, 1, 'm', 'GET', '/', 200, 5"
                        " FROM api_keys LIMIT 1"
                    )
                    self.inserted += 1
                except psycopg2.errors.LockNotAvailable:
                    self.timed_out += 1
        self.connection.close()


def migrate_while_inserting(db, *args):
    inserter = Inserter(db.url, lock_timeout_ms=200)
    inserter.start()
    # Its counter counts inserts the server has committed (autocommit).
    poll_until("the inserter has a committed insert", lambda: inserter.inserted > 0)
    before = inserter.inserted
    result = run_migrate(db.url, *args, timeout=600)
    during = inserter.inserted - before
    inserter.stop.set()
    inserter.join(timeout=60)
    return result, during, inserter.timed_out


def test_default_run_builds_indexes_on_a_million_rows_while_inserts_keep_going(migrated_db):
    load_a_million_request_logs(migrated_db)

    result, inserted, timed_out = migrate_while_inserting(migrated_db)

    assert result.returncode == 0, result.stderr
    assert timed_out == 0  # no insert waited 200 ms for a lock
    assert inserted > 0
    assert_contract_catalog(migrated_db)


def test_with_atomic_the_same_build_makes_inserts_wait(migrated_db):
    load_a_million_request_logs(migrated_db)

    result, _, timed_out = migrate_while_inserting(migrated_db, "--atomic")

    assert result.returncode == 0, result.stderr
    assert timed_out > 0  # the SHARE lock of CREATE INDEX held inserts back


# --- Defaults and schemas that once broke the planner ------------------------------------


def test_a_renamed_id_sequence_the_column_still_owns_is_no_drift(migrated_db):
    # GORM's AutoMigrate skips primary keys; the sequence is the column's, whatever its name.
    migrated_db.rows("ALTER SEQUENCE sign_in_records_id_seq RENAME TO sign_in_ids")
    migrated_db.rows("DROP INDEX idx_users_status")  # what --check must still see
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == migrate.EXIT_PENDING, result.stdout
    statements = [
        line for line in result.stdout.splitlines() if line and not line.startswith(("--", "SET "))
    ]
    assert len(statements) == 1 and '"idx_users_status"' in statements[0], result.stdout


def test_an_id_without_its_sequence_default_is_drift_with_a_commented_fix(migrated_db):
    migrated_db.rows("ALTER TABLE sign_in_records ALTER COLUMN id DROP DEFAULT")
    result = run_migrate(migrated_db.url, "--check")
    assert result.returncode == migrate.EXIT_DRIFT, result.stderr
    assert (
        """-- ALTER TABLE "sign_in_records" ALTER COLUMN "id" SET DEFAULT"""
        """ nextval('"sign_in_records_id_seq"'::regclass);""" in result.stdout.splitlines()
    )


def test_a_schema_whose_name_needs_quotes_is_migrated_and_then_matches(empty_db):
    empty_db.rows('CREATE SCHEMA "my-App"')
    empty_db.rows("CREATE SCHEMA app")  # a lowercase twin must not be mistaken for it
    url = empty_db.url_with(options='-c search_path="my-App"')
    try:
        assert run_migrate(url).returncode == 0
        check = run_migrate(url, "--check")
        assert check.returncode == 0, check.stdout + check.stderr
        assert empty_db.value("SELECT count(*) FROM pg_tables WHERE schemaname = 'my-App'") == len(
            LEGACY_TABLES
        )
    finally:
        empty_db.rows('DROP SCHEMA "my-App" CASCADE')
        empty_db.rows("DROP SCHEMA app CASCADE")
