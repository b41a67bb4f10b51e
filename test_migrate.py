"""
What `python migrate.py` does to a real PostgreSQL database.

The expected catalog below is copied by hand from SCHEMA.md (what the Go
tool makes), not derived from models.py, so any drift in either fails.
"""

import os
import shlex
import subprocess
import sys
from collections import defaultdict

import psycopg2

import migrate
from conftest import (
    HERE,
    PASSWORD,
    assert_clean_failure,
    catalog,
    error_line,
    open_write_transaction,
    quoted,
    record_ddl,
    run_in_parallel,
    run_migrate,
    scoped_name,
)

TS = "timestamp with time zone"
VARCHAR = "character varying(255)"


def pk(table):
    return ("id", "bigint", True, f"nextval('{table}_id_seq'::regclass)")


def gorm_model(table, updated_at=True):
    columns = [pk(table), ("created_at", TS, False, None)]
    if updated_at:
        columns.append(("updated_at", TS, False, None))
    return columns + [("deleted_at", TS, False, None)]


EXPECTED_COLUMNS = {
    "users": gorm_model("users")
    + [
        ("username", VARCHAR, True, None),
        ("email", VARCHAR, True, None),
        ("password_hash", VARCHAR, True, None),
        ("quota", "bigint", True, "10000"),
        ("used_quota", "bigint", True, "0"),
        ("is_admin", "boolean", True, "false"),
        ("status", "character varying(50)", True, "'active'::character varying"),
        ("last_sign_in", TS, False, None),
    ],
    "api_keys": gorm_model("api_keys")
    + [
        ("user_id", "bigint", True, None),
        ("key", VARCHAR, True, None),
        ("name", VARCHAR, True, None),
        ("is_active", "boolean", True, "true"),
        ("rate_limit", "bigint", True, "60"),
        ("last_used_at", TS, False, None),
    ],
    "api_configs": gorm_model("api_configs")
    + [
        ("name", VARCHAR, True, None),
        ("type", "character varying(50)", True, None),
        ("base_url", "text", True, None),
        ("api_key", "text", False, None),
        ("models", "jsonb", True, "'[]'::jsonb"),
        ("headers", "jsonb", False, None),
        ("is_active", "boolean", True, "true"),
        ("priority", "bigint", True, "100"),
        ("weight", "bigint", True, "1"),
        ("max_rps", "bigint", True, "0"),
        ("timeout", "bigint", True, "30"),
    ],
    "load_balancer_configs": gorm_model("load_balancer_configs")
    + [
        ("model_name", VARCHAR, True, None),
        ("strategy", "character varying(50)", True, "'round_robin'::character varying"),
        ("is_active", "boolean", True, "true"),
    ],
    "request_logs": gorm_model("request_logs", updated_at=False)
    + [
        ("user_id", "bigint", True, None),
        ("api_key_id", "bigint", True, None),
        ("api_config_id", "bigint", True, None),
        ("model", VARCHAR, True, None),
        ("method", "character varying(10)", True, None),
        ("path", "text", True, None),
        ("status_code", "bigint", True, None),
        ("response_time", "bigint", True, None),
        ("tokens_used", "bigint", True, "0"),
        ("error_msg", "text", False, None),
    ],
    "sign_in_records": gorm_model("sign_in_records", updated_at=False)
    + [("user_id", "bigint", True, None), ("quota_awarded", "bigint", True, "0")],
}
TABLES = sorted(EXPECTED_COLUMNS)

EXPECTED_CONSTRAINTS = sorted(
    [(table, f"{table}_pkey", "p", "PRIMARY KEY (id)") for table in TABLES]
    + [
        ("api_keys", "fk_api_keys_user", "f", "FOREIGN KEY (user_id) REFERENCES users(id)"),
        (
            "request_logs",
            "fk_request_logs_api_key",
            "f",
            "FOREIGN KEY (api_key_id) REFERENCES api_keys(id)",
        ),
        ("request_logs", "fk_request_logs_user", "f", "FOREIGN KEY (user_id) REFERENCES users(id)"),
        (
            "sign_in_records",
            "fk_sign_in_records_user",
            "f",
            "FOREIGN KEY (user_id) REFERENCES users(id)",
        ),
    ]
)

NOT_DELETED = "WHERE (deleted_at IS NULL)"
EXPECTED_INDEXES = [(table, f"{table}_pkey", "UNIQUE", "(id)") for table in TABLES] + [
    ("users", "idx_users_deleted_at", "", "(deleted_at)"),
    ("users", "idx_users_username", "UNIQUE", "(username)"),
    ("users", "idx_users_email", "UNIQUE", "(email)"),
    ("api_keys", "idx_api_keys_deleted_at", "", "(deleted_at)"),
    ("api_keys", "idx_api_keys_user_id", "", "(user_id)"),
    ("api_keys", "idx_api_keys_key", "UNIQUE", "(key)"),
    ("api_configs", "idx_api_configs_deleted_at", "", "(deleted_at)"),
    ("load_balancer_configs", "idx_load_balancer_configs_deleted_at", "", "(deleted_at)"),
    ("load_balancer_configs", "idx_load_balancer_configs_model_name", "", "(model_name)"),
    ("request_logs", "idx_request_logs_deleted_at", "", "(deleted_at)"),
    ("request_logs", "idx_request_logs_user_id", "", "(user_id)"),
    ("request_logs", "idx_request_logs_api_key_id", "", "(api_key_id)"),
    ("request_logs", "idx_request_logs_api_config_id", "", "(api_config_id)"),
    ("request_logs", "idx_request_logs_model", "", "(model)"),
    ("request_logs", "idx_request_logs_status_code", "", "(status_code)"),
    ("sign_in_records", "idx_sign_in_records_deleted_at", "", "(deleted_at)"),
    ("sign_in_records", "idx_sign_in_records_user_id", "", "(user_id)"),
    # The explicit performance list.
    ("users", "idx_users_status", "", f"(status) {NOT_DELETED}"),
    ("users", "idx_users_is_admin", "", f"(is_admin) {NOT_DELETED}"),
    ("api_keys", "idx_api_keys_user_active", "", f"(user_id, is_active) {NOT_DELETED}"),
    ("api_configs", "idx_api_configs_type_active", "", f"(type, is_active) {NOT_DELETED}"),
    (
        "api_configs",
        "idx_api_configs_priority",
        "",
        "(priority DESC) WHERE ((deleted_at IS NULL) AND (is_active = true))",
    ),
    ("request_logs", "idx_request_logs_created_at", "", "(created_at DESC)"),
    ("request_logs", "idx_request_logs_user_created", "", "(user_id, created_at DESC)"),
    ("request_logs", "idx_request_logs_model_created", "", "(model, created_at DESC)"),
    ("sign_in_records", "idx_sign_in_records_user_created", "", "(user_id, created_at DESC)"),
]

EXPECTED_COMMENTS = [
    ("api_configs", "Third-party API provider configurations"),
    ("api_keys", "API keys for user authentication and rate limiting"),
    ("load_balancer_configs", "Load-balancing strategy per model"),
    ("request_logs", "API request logs for analytics and monitoring"),
    ("sign_in_records", "Daily sign-in records for quota rewards"),
    ("users", "User accounts with authentication and quota management"),
]


def indexdef(table, name, unique, definition):
    kind = "CREATE UNIQUE INDEX" if unique else "CREATE INDEX"
    return (table, name, f"{kind} {name} ON public.{table} USING btree {definition}")


def assert_contract_catalog(db):
    actual = catalog(db)
    columns = defaultdict(list)
    for table, _, name, type_, not_null, default in actual["columns"]:
        columns[table].append((name, type_, not_null, default))
    assert dict(columns) == EXPECTED_COLUMNS
    assert actual["constraints"] == EXPECTED_CONSTRAINTS
    assert actual["indexes"] == sorted(indexdef(*index) for index in EXPECTED_INDEXES)
    assert actual["comments"] == EXPECTED_COMMENTS
    assert actual["sequences"] == [
        (f"{table}_id_seq", "bigint", f"public.{table}_id_seq") for table in TABLES
    ]


# --- A fresh database -------------------------------------------------------


def test_empty_database_gets_exactly_the_contract_catalog(empty_db):
    result = run_migrate(empty_db.url)
    assert result.returncode == 0, result.stderr
    assert_contract_catalog(empty_db)


def test_run_logs_each_created_object_and_the_elapsed_time(empty_db):
    result = run_migrate(empty_db.url)
    log = result.stderr.splitlines()
    for table in TABLES:
        assert f"migrate: created table {table}" in log
    for _, name, _, _ in EXPECTED_INDEXES:
        if not name.endswith("_pkey"):
            assert f"migrate: created index {name}" in log
    assert log[-1].startswith("migrate: done: ") and log[-1].endswith(" s")


def test_run_names_the_database_with_the_password_masked(empty_db):
    result = run_migrate(empty_db.url_with(password=PASSWORD))
    assert result.returncode == 0, result.stderr
    assert f"dbname={empty_db.name}" in result.stderr
    assert "password=***" in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def test_postgresql_url_form_is_accepted(empty_db):
    params = empty_db.params
    url = f"postgresql://{params['user']}:{PASSWORD}@{params['host']}:{params.get('port', 5432)}/{empty_db.name}"
    result = run_migrate(url)
    assert result.returncode == 0, result.stderr
    assert empty_db.tables() == TABLES
    assert PASSWORD not in result.stderr


def test_default_database_url_is_the_go_readme_one():
    assert migrate.connection_params(migrate.DEFAULT_DATABASE_URL) == {
        "host": "localhost",
        "user": "postgres",
        "password": "postgres",
        "dbname": "api_aggregator",
        "port": "5432",
        "sslmode": "disable",
    }


def test_libpq_environment_variables_fill_what_the_url_leaves_out(empty_db):
    result = run_migrate(
        "dbname=" + empty_db.name,
        PGHOST=empty_db.params["host"],
        PGPORT=str(empty_db.params.get("port", 5432)),
        PGUSER=empty_db.params["user"],
        PGSSLMODE="disable",
    )
    assert result.returncode == 0, result.stderr
    assert empty_db.tables() == TABLES


def test_a_table_name_held_by_a_view_stops_the_run_before_any_change(empty_db):
    empty_db.rows("CREATE VIEW sign_in_records AS SELECT 1 AS id")
    result = run_migrate(empty_db.url)
    assert_clean_failure(
        result, "table sign_in_records cannot be created: the name is held by the view"
    )
    assert "nothing was changed" in error_line(result)
    assert empty_db.tables() == []
    assert empty_db.value("SELECT count(*) FROM pg_class WHERE relname LIKE 'idx_%'") == 0


# --- Re-runs on a live database ----------------------------------------------


def test_second_run_issues_no_ddl_and_leaves_the_catalog_unchanged(migrated_db):
    before = catalog(migrated_db)
    record_ddl(migrated_db)
    result = run_migrate(migrated_db.url)
    assert result.returncode == 0, result.stderr
    assert "schema is up to date" in result.stderr
    assert migrated_db.rows("SELECT command FROM audit.ddl_log") == []
    assert catalog(migrated_db) == before


def test_no_op_run_finishes_while_a_write_transaction_is_open_on_request_logs(migrated_db):
    writer = open_write_transaction(migrated_db)
    try:
        # lock_timeout turns any wait for a table lock into an error instead of a hang.
        result = run_migrate(migrated_db.url_with(options="-c lock_timeout=2000"))
        assert result.returncode == 0, result.stderr
        assert "schema is up to date" in result.stderr
    finally:
        writer.rollback()
        writer.close()


def test_partly_built_database_gets_only_what_is_missing(migrated_db):
    migrated_db.rows("DROP TABLE sign_in_records")
    migrated_db.rows("DROP INDEX idx_request_logs_model_created, idx_users_email")
    result = run_migrate(migrated_db.url)
    assert result.returncode == 0, result.stderr
    created = [line for line in result.stderr.splitlines() if " created " in line]
    assert created == [
        "migrate: created table sign_in_records",
        "migrate: created index idx_sign_in_records_deleted_at",
        "migrate: created index idx_sign_in_records_user_id",
        "migrate: created index idx_sign_in_records_user_created",
        # Indexes of existing tables are built online, after the transaction.
        "migrate: created index idx_users_email",
        "migrate: created index idx_request_logs_model_created",
    ]
    assert_contract_catalog(migrated_db)


def test_eight_parallel_runs_on_a_fresh_database_all_succeed(empty_db):
    statuses, outputs = run_in_parallel(empty_db, 8)
    assert statuses == [0] * 8, outputs
    assert sum(output.count("created table users") for output in outputs) == 1
    assert_contract_catalog(empty_db)


# --- Bad input ----------------------------------------------------------------


def test_unparsable_database_url_is_refused_without_echoing_it():
    result = run_migrate(f"postgresql://postgres:{PASSWORD}@[broken/db")
    assert_clean_failure(result, "DATABASE_URL cannot be parsed")


def test_unreachable_server_suggests_starting_it_or_waiting():
    result = run_migrate(f"host=127.0.0.1 port=1 user=postgres password={PASSWORD} dbname=x")
    assert_clean_failure(result, "cannot reach the server at host=127.0.0.1 port=1")
    assert "--wait" in error_line(result)


def test_wait_gives_up_when_the_time_is_up():
    result = run_migrate(
        f"host=127.0.0.1 port=1 user=postgres password={PASSWORD} dbname=x", "--wait", "1.5"
    )
    assert_clean_failure(result, "cannot reach the server")
    assert "waiting up to 1.5 s" in result.stderr


def test_wait_connects_once_the_server_comes_up(throwaway_server):
    throwaway_server.stop()
    url = throwaway_server.url(password=throwaway_server.PASSWORD)
    environment = {**os.environ, "DATABASE_URL": url}
    run = subprocess.Popen(
        [sys.executable, str(HERE / "migrate.py"), "--wait", "60"],
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The database line comes once connected: libpq alone knows the target it resolved.
    waiting_line = run.stderr.readline()
    throwaway_server.start()
    rest = run.communicate(timeout=120)[1]
    assert run.returncode == 0, rest
    assert waiting_line.startswith("migrate: waiting up to 60 s")
    assert rest.startswith("migrate: database ")


def test_wrong_password_is_reported_as_authentication_failure(throwaway_server):
    result = run_migrate(throwaway_server.url(password=PASSWORD))
    assert_clean_failure(result, "authentication failed")
    assert "PGPASSWORD" in error_line(result)


def test_pgpassword_is_used_and_never_printed(throwaway_server):
    admin = psycopg2.connect(throwaway_server.url(password=throwaway_server.PASSWORD))
    admin.autocommit = True
    admin.cursor().execute("DROP DATABASE IF EXISTS pgpassword_db")
    admin.cursor().execute("CREATE DATABASE pgpassword_db")
    admin.close()
    url = throwaway_server.url(dbname="pgpassword_db")
    result = run_migrate(url, "--wait", "5", PGPASSWORD=throwaway_server.PASSWORD)
    assert result.returncode == 0, result.stderr
    assert throwaway_server.PASSWORD not in result.stdout + result.stderr
    made = psycopg2.connect(url, password=throwaway_server.PASSWORD)
    try:
        with made.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
            assert cursor.fetchone()[0] == len(TABLES)
    finally:
        made.close()


def test_missing_database_suggests_createdb(empty_db):
    missing = scoped_name(empty_db.name, "missing")  # no run makes it, whatever its database
    result = run_migrate(empty_db.url_with(dbname=missing, password=PASSWORD))
    assert_clean_failure(result, f'database "{missing}" does not exist')
    assert f"createdb {shlex.quote(missing)}" in error_line(result)


def test_permission_denied_is_reported_and_nothing_is_created(empty_db):
    empty_db.rows(f"CREATE ROLE {quoted(empty_db.no_create_role)} LOGIN")
    result = run_migrate(empty_db.url_with(user=empty_db.no_create_role, password=PASSWORD))
    assert_clean_failure(result, "permission denied")
    assert "GRANT CREATE ON SCHEMA public" in error_line(result)
    assert empty_db.tables() == []


def test_read_only_server_is_reported_and_nothing_is_created(empty_db):
    url = empty_db.url_with(options="-c default_transaction_read_only=on", password=PASSWORD)
    result = run_migrate(url)
    assert_clean_failure(
        result, "default_transaction_read_only is on, set by the connection's options"
    )
    assert empty_db.tables() == []


def test_negative_seconds_are_refused_with_a_usage_error():
    result = run_migrate(None, "--lock-timeout", "-1")
    assert result.returncode == migrate.EXIT_ERROR
    assert error_line(result) == (
        "migrate: error: argument --lock-timeout: -1 is out of range:"
        " give a number of seconds from 0 to 2,147,483.647 (see --help)"
    )


def test_help_documents_the_flags_and_exit_codes():
    result = run_migrate(None, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for flag in (
        "--wait SECONDS",
        "--lock-timeout SECONDS",
        "--concurrently",
        "--dry-run",
        "--check",
        "--sql",
    ):
        assert flag in text
    assert "Exit codes: 0 success" in text
    assert "1 --check: changes are pending (run python migrate.py), 3 --check: only drift" in text
    assert "2 error, 130/143 interrupted" in text


# --- schema.sql ---------------------------------------------------------------


def test_schema_sql_is_what_the_models_generate():
    generated = run_migrate(None, "--sql").stdout
    assert (HERE / "schema.sql").read_text() == generated


def test_schema_sql_through_psql_twice_gives_the_migrate_catalog(empty_db):
    for _ in range(2):
        result = subprocess.run(
            [
                "psql",
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-d",
                empty_db.url,
                "-f",
                str(HERE / "schema.sql"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert_contract_catalog(empty_db)
