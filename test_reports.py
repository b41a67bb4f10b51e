"""
What a run and --check say is what the catalog shows, and their output is safe to read and to
pipe into psql, whatever the database holds.

A run logs `created ...` only for an object that is there, valid, on the model's table, as the
models define it; the schema it works in is named, and a temporary one refused; names and text
read from the catalog can neither split a line nor smuggle a statement into psql; fixes keep
the data or are commented out; columns that make the models' inserts fail are drift; and
spellings PostgreSQL may choose (settings, schema names, generated names) are no drift.
"""

import json
import os
import subprocess

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg2 import sql

import catalog
import migrate
import plan
from conftest import (
    assert_clean_failure,
    bind_models,
    error_line,
    migrate_here,
    quoted,
    record_ddl,
    run_migrate,
    scoped_name,
)
from models import User
from test_evolve import build_legacy
from test_migrate import TABLES, assert_contract_catalog


def stderr_lines_are_all_ours(result):
    return all(line.startswith("migrate: ") for line in result.stderr.splitlines())


def pipe_into_psql(db, text, **env):
    """Run text with psql on db, going on after errors (so a smuggled statement would run too)."""
    return subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=0", "-d", db.url, "-f", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PGCLIENTENCODING": "UTF8", **env},
    )


def executed_ddl(db):
    return [query.strip().rstrip(";") for (query,) in db.rows("SELECT query FROM audit.ddl_log")]


def statements_of(output):
    """The lines of --check or --dry-run output that psql would run (not comments)."""
    return [line.rstrip(";") for line in output.splitlines() if line and not line.startswith("--")]


# --- Verified effects ----------------------------------------------------------------------

SWAP_USERS = [
    "CREATE TABLE users_new (LIKE users INCLUDING DEFAULTS)",
    "INSERT INTO users_new SELECT * FROM users",
    "ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user",
    "ALTER TABLE request_logs DROP CONSTRAINT fk_request_logs_user",
    "ALTER TABLE sign_in_records DROP CONSTRAINT fk_sign_in_records_user",
    "ALTER TABLE users RENAME TO users_old",
    "ALTER TABLE users_new RENAME TO users",
    "ALTER TABLE users ADD PRIMARY KEY (id)",
]


def test_index_names_held_on_the_table_swapped_out_are_never_reported_created(migrated_db):
    for statement in SWAP_USERS:
        migrated_db.rows(statement)

    result = run_migrate(migrated_db.url)

    assert result.returncode == 0, result.stderr
    assert "created index idx_users" not in result.stderr
    assert (
        "migrate: drift: index idx_users_username of users is not built: its name is held by the"
        " index idx_users_username on table users_old; rename that index and rerun (until then"
        " nothing stops duplicate values)" in result.stderr
    )
    assert not migrated_db.rows(
        "SELECT 1 FROM pg_indexes WHERE tablename = 'users' AND indexname LIKE 'idx_%'"
    )


def test_check_keeps_reporting_a_held_index_name_until_its_fix_is_run(migrated_db):
    for statement in SWAP_USERS:
        migrated_db.rows(statement)
    assert run_migrate(migrated_db.url).returncode == 0

    check = run_migrate(migrated_db.url, "--check")
    assert check.returncode == migrate.EXIT_DRIFT, check.stderr
    rename = 'ALTER INDEX "idx_users_username" RENAME TO "idx_users_username_users_old";'
    assert rename in check.stdout.splitlines()
    assert run_migrate(migrated_db.url, "--check").stdout == check.stdout

    assert pipe_into_psql(migrated_db, check.stdout).returncode == 0
    rerun = run_migrate(migrated_db.url)

    assert "migrate: created index idx_users_username" in rerun.stderr
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('a', 'a@x', 'h')")
    with pytest.raises(psycopg2.errors.UniqueViolation):
        migrated_db.rows(
            "INSERT INTO users (username, email, password_hash) VALUES ('a', 'b@x', 'h')"
        )


def test_a_build_that_found_its_name_taken_is_an_error_not_created(migrated_db):
    # An event trigger takes the index's name just before the build, as a racing session could.
    migrated_db.rows("DROP INDEX idx_request_logs_model")
    migrated_db.rows(
        """CREATE FUNCTION take_the_name() RETURNS event_trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF current_query() LIKE '%idx_request_logs_model"%' THEN
            CREATE TABLE IF NOT EXISTS idx_request_logs_model (x int);
          END IF;
        END $$"""
    )
    migrated_db.rows(
        "CREATE EVENT TRIGGER take_the_name ON ddl_command_start WHEN TAG IN ('CREATE INDEX')"
        " EXECUTE FUNCTION take_the_name()"
    )

    result = run_migrate(migrated_db.url)

    assert_clean_failure(result, "building index idx_request_logs_model had no effect")
    assert "its name is held by the table idx_request_logs_model" in error_line(result)
    assert "migrate: created index idx_request_logs_model" not in result.stderr


def test_every_created_index_of_a_run_is_in_the_catalog_valid_on_its_table(empty_db):
    result = run_migrate(empty_db.url)
    created = [line.split()[-1] for line in result.stderr.splitlines() if " created index " in line]
    rows = empty_db.rows(
        "SELECT c.relname, t.relname, x.indisvalid FROM pg_index x JOIN pg_class c"
        " ON c.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid WHERE c.relname = ANY(%s)",
        created,
    )
    assert len(rows) == len(created) == 26
    assert all(valid and name.startswith(f"idx_{table}_") for name, table, valid in rows)


# --- The target schema ---------------------------------------------------------------------


@pytest.mark.parametrize("search_path", ["pg_temp,public", "app,pg_temp"])
def test_a_temporary_target_schema_is_refused_before_anything_is_made(empty_db, search_path):
    result = run_migrate(empty_db.url_with(options=f"-c search_path={search_path}"))
    assert_clean_failure(result, "the target schema would be the temporary schema pg_temp_")
    assert empty_db.value("SELECT count(*) FROM pg_class WHERE relname = ANY(%s)", TABLES) == 0


def test_a_search_path_whose_schemas_are_missing_is_refused(empty_db):
    result = run_migrate(empty_db.url_with(options="-c search_path=nosuch"), "--check")
    assert_clean_failure(result, "no schema of the search_path nosuch")


def test_the_schema_line_names_a_database_setting_and_the_tables_land_there(
    empty_db, database_setting
):
    empty_db.rows("CREATE SCHEMA tenant_a")
    database_setting("search_path", "tenant_a, public")

    for flag in ("--check", "--dry-run", None):
        result = run_migrate(empty_db.url, *([flag] if flag else []))
        assert result.stderr.splitlines()[1] == (
            f"migrate: schema tenant_a (search_path tenant_a, public, set on database"
            f" {empty_db.name} (ALTER DATABASE ... SET))"
        )
    assert empty_db.value(
        "SELECT count(*) FROM pg_tables WHERE schemaname = 'tenant_a' AND tablename = ANY(%s)",
        TABLES,
    ) == len(TABLES)
    assert empty_db.tables() == []
    empty_db.rows("DROP SCHEMA tenant_a CASCADE")


def test_the_schema_line_names_the_connection_options_and_the_default(empty_db):
    default = run_migrate(empty_db.url, "--check")
    assert default.stderr.splitlines()[1] == (
        'migrate: schema public (search_path "$user", public, the server\'s default)'
    )
    options = run_migrate(empty_db.url_with(options="-c search_path=public"), "--check")
    assert options.stderr.splitlines()[1] == (
        "migrate: schema public (search_path public, from the connection's options"
        " (PGOPTIONS, or options in DATABASE_URL))"
    )


@pytest.mark.parametrize("schema", ["a.b", "my app", "Upper", 'q"uote'])
def test_a_schema_name_that_needs_quoting_gets_the_schema_and_then_no_drift(
    empty_db, database_setting, schema
):
    quoted = sql.Identifier(schema).as_string(empty_db.connection)
    empty_db.rows(f"CREATE SCHEMA {quoted}")
    database_setting("search_path", quoted)
    try:
        assert run_migrate(empty_db.url).returncode == 0
        made = empty_db.rows(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s ORDER BY 1",
            schema,
        )
        assert [name for (name,) in made] == sorted(TABLES)
        assert not empty_db.rows(
            "SELECT 1 FROM information_schema.tables WHERE table_schema = 'public'"
        )
        check = run_migrate(empty_db.url, "--check")
        assert check.returncode == migrate.EXIT_OK, check.stdout + check.stderr
        assert check.stdout == ""
    finally:
        empty_db.rows(f"DROP SCHEMA {quoted} CASCADE")


# --- Output that cannot be hijacked --------------------------------------------------------


def test_a_default_and_a_table_name_with_newlines_neither_split_lines_nor_run_in_psql(migrated_db):
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('a', 'a@x', 'h')")
    migrated_db.rows(
        "ALTER TABLE api_keys ALTER COLUMN name SET DEFAULT E'ok\\nDROP TABLE api_configs; --'"
    )
    migrated_db.rows('CREATE TABLE "t\nDELETE FROM users; --" (id int)')
    record_ddl(migrated_db)

    check = run_migrate(migrated_db.url, "--check")
    run = run_migrate(migrated_db.url)

    assert "-- api_keys.name default is 'ok\\nDROP TABLE api_configs; --'::character varying;" in (
        check.stdout
    )
    assert '--   table "t\\nDELETE FROM users; --"' in check.stdout.splitlines()
    assert stderr_lines_are_all_ours(check) and stderr_lines_are_all_ours(run)
    pipe_into_psql(migrated_db, check.stdout)
    assert executed_ddl(migrated_db) == ['ALTER TABLE "api_keys" ALTER COLUMN "name" DROP DEFAULT']
    assert migrated_db.value("SELECT count(*) FROM users") == 1
    assert "api_configs" in migrated_db.tables()


PIECES = [
    "\n", "\r", "\t", ";", "'", '"', "--", "/*", "*/", "\\", " ", "$$", ":x", "é", "\u2028",
    "\u202e", "\x1b", "\x7f", "a", "DROP TABLE api_configs", "DELETE FROM users",
]  # fmt: skip
hostile = (
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=5)
    .map("".join)
    .map(lambda text: text.encode()[:40].decode(errors="ignore"))
    .filter(bool)
)


def plant(db, name, text):
    """Objects of another application with hostile names and text, and some pending work."""
    ident, literal = sql.Identifier, sql.Literal
    statements = [
        sql.SQL("CREATE TABLE {} ({} int NOT NULL)").format(ident("t" + name), ident("c" + name)),
        sql.SQL("ALTER TABLE users ADD COLUMN {} int NOT NULL").format(ident("n" + name)),
        sql.SQL("ALTER TABLE request_logs ADD COLUMN {} bigint").format(ident("r" + name)),
        sql.SQL("ALTER TABLE api_keys ALTER COLUMN name SET DEFAULT {}").format(literal(text)),
        sql.SQL("ALTER TABLE api_keys RENAME CONSTRAINT fk_api_keys_user TO {}").format(
            ident("k" + name)
        ),
        sql.SQL("ALTER TABLE users ADD CONSTRAINT {} CHECK (status <> {})").format(
            ident("c" + name), literal(text)
        ),
        sql.SQL("CREATE INDEX {} ON users (email)").format(ident("i" + name)),
        sql.SQL("DROP INDEX idx_users_status"),
        sql.SQL(
            "INSERT INTO users (username, email, password_hash, {}) VALUES ('u', 'e', 'h', 1)"
        ).format(ident("n" + name)),
    ]
    for statement in statements:
        db.rows(statement.as_string(db.connection))


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=hostile, text=hostile)
def test_check_and_dry_run_piped_into_psql_run_only_the_statements_they_print(empty_db, name, text):
    empty_db.reset()
    migrate_here(empty_db.params)
    plant(empty_db, name, text)
    tables_before = set(empty_db.rows("SELECT relname FROM pg_class WHERE relkind = 'r'"))
    record_ddl(empty_db)

    for flag in ("--check", "--dry-run"):
        result = run_migrate(empty_db.url, flag)
        assert result.returncode in (0, 1, 3), result.stderr
        assert stderr_lines_are_all_ours(result), result.stderr
        printed = statements_of(result.stdout)
        if flag == "--check":  # plant() dropped an index: it is printed (psql then builds it)
            assert any("idx_users_status" in statement for statement in printed), result.stdout
        assert all(
            line.endswith(";") for line in result.stdout.splitlines() if not line.startswith("--")
        )
        empty_db.rows("TRUNCATE audit.ddl_log")
        pipe_into_psql(empty_db, result.stdout)
        assert set(executed_ddl(empty_db)) <= set(printed), result.stdout
        assert empty_db.value("SELECT count(*) FROM users") == 1
        assert (
            set(empty_db.rows("SELECT relname FROM pg_class WHERE relkind = 'r'")) >= tables_before
        )


# --- Fixes that keep the data --------------------------------------------------------------


def test_the_printed_timestamp_fix_keeps_every_value_in_a_berlin_session(empty_db):
    build_legacy(empty_db)
    empty_db.rows("UPDATE users SET created_at = '2025-03-30 00:30' WHERE id = 1")
    assert run_migrate(empty_db.url).returncode == 0
    check = run_migrate(empty_db.url, "--check")
    fix = next(
        line
        for line in check.stdout.splitlines()
        if '"users" ALTER COLUMN "created_at" TYPE' in line
    )

    ran = pipe_into_psql(empty_db, fix, PGTZ="Europe/Berlin")

    assert ran.returncode == 0, ran.stderr
    assert (
        empty_db.value(
            "SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM users WHERE id = 1"
        )
        == "2025-03-30 00:30"
    )


def test_a_conversion_that_rounds_is_printed_commented_with_a_count_of_what_it_changes(migrated_db):
    migrated_db.rows("ALTER TABLE users ALTER COLUMN quota TYPE numeric(20,2)")
    check = run_migrate(migrated_db.url, "--check")
    lines = check.stdout.splitlines()
    assert '-- ALTER TABLE "users" ALTER COLUMN "quota" TYPE BIGINT;' in lines
    assert 'ALTER TABLE "users" ALTER COLUMN "quota" TYPE BIGINT;' not in lines
    assert any(
        "fractions are rounded" in line
        and 'SELECT count(*) FROM "users" WHERE "quota" <> round("quota")' in line
        for line in lines
    )


def test_every_fix_says_whether_it_rewrites_the_table_and_under_which_lock(empty_db):
    build_legacy(empty_db)
    assert run_migrate(empty_db.url).returncode == 0
    lines = run_migrate(empty_db.url, "--check").stdout.splitlines()
    problems = [
        i for i, line in enumerate(lines) if line.startswith("-- ") and not line.startswith("--  ")
    ]
    fixes = [i for i in problems if i + 1 < len(lines) and lines[i + 1].startswith("--   cost: ")]
    assert len(fixes) > 60
    assert (
        "--   cost: rewrites users under ACCESS EXCLUSIVE (blocks reads and writes for the whole rewrite)"
        in lines
    )


# --- Writes that would fail ----------------------------------------------------------------


def test_an_unknown_not_null_column_is_drift_and_its_fix_lets_the_models_insert(migrated_db):
    migrated_db.rows("ALTER TABLE users ADD COLUMN tenant_id bigint NOT NULL")

    check = run_migrate(migrated_db.url, "--check")

    assert check.returncode == migrate.EXIT_DRIFT, check.stderr
    assert (
        check.stdout.splitlines().count(
            'ALTER TABLE "users" ALTER COLUMN "tenant_id" DROP NOT NULL;'
        )
        == 1
    )
    assert any(
        line.startswith("-- users.tenant_id (bigint) is NOT NULL with no default")
        for line in check.stdout.splitlines()
    )
    pipe_into_psql(migrated_db, check.stdout)

    bind_models(migrated_db.params)
    assert User.create(username="a", email="a@x", password_hash="h").id


def test_a_check_the_models_defaults_violate_is_drift_and_one_they_meet_is_not(migrated_db):
    migrated_db.rows("ALTER TABLE users ADD CONSTRAINT quota_big CHECK (quota > 20000) NOT VALID")
    migrated_db.rows("ALTER TABLE users ADD CONSTRAINT quota_positive CHECK (quota >= 0)")
    migrated_db.rows("ALTER TABLE users ADD COLUMN tier int DEFAULT 1 CHECK (tier > 1)")

    check = run_migrate(migrated_db.url, "--check")

    assert check.returncode == migrate.EXIT_DRIFT, check.stderr
    lines = check.stdout.splitlines()
    assert '-- ALTER TABLE "users" DROP CONSTRAINT "quota_big";' in lines
    assert '-- ALTER TABLE "users" DROP CONSTRAINT "users_tier_check";' in lines
    assert not any("quota_positive" in line for line in lines if "refuses" in line)
    assert migrated_db.value("SELECT count(*) FROM pg_class WHERE relname = 'migrate_probe'") == 0


def test_a_check_calling_a_function_of_the_application_is_never_evaluated(migrated_db):
    migrated_db.rows("CREATE TABLE calls (n int)")
    migrated_db.rows(
        "CREATE FUNCTION noisy(q bigint) RETURNS boolean LANGUAGE sql IMMUTABLE AS"
        " 'SELECT q > 20000'"
    )
    migrated_db.rows("ALTER TABLE users ADD CONSTRAINT quota_noisy CHECK (noisy(quota)) NOT VALID")
    check = run_migrate(migrated_db.url, "--check")
    assert "refuses" not in check.stdout
    assert "--   constraint users.quota_noisy" in check.stdout.splitlines()


# --- Foreign keys that only look right -----------------------------------------------------


def test_a_foreign_key_to_a_users_table_of_another_schema_is_drift(migrated_db):
    migrated_db.rows("CREATE SCHEMA other")
    migrated_db.rows("CREATE TABLE other.users (id bigint PRIMARY KEY)")
    migrated_db.rows("ALTER TABLE api_keys DROP CONSTRAINT fk_api_keys_user")
    migrated_db.rows(
        "ALTER TABLE api_keys ADD CONSTRAINT fk_api_keys_user FOREIGN KEY (user_id) REFERENCES other.users(id) NOT VALID"
    )
    try:
        check = run_migrate(migrated_db.url, "--check")
        assert check.returncode == migrate.EXIT_DRIFT, check.stdout
        assert (
            "-- foreign key fk_api_keys_user is FOREIGN KEY (user_id) REFERENCES other.users(id)"
            " NOT VALID; the models say FOREIGN KEY (user_id) REFERENCES users(id)"
            in check.stdout.splitlines()
        )
    finally:
        migrated_db.rows("DROP SCHEMA other CASCADE")


def test_a_not_enforced_foreign_key_is_drift_on_postgresql_18(migrated_db, pg_server):
    if pg_server.major < 18:
        pytest.skip("NOT ENFORCED foreign keys exist from PostgreSQL 18")
    migrated_db.rows("ALTER TABLE api_keys ALTER CONSTRAINT fk_api_keys_user NOT ENFORCED")
    check = run_migrate(migrated_db.url, "--check")
    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert (
        'ALTER TABLE "api_keys" ALTER CONSTRAINT "fk_api_keys_user" ENFORCED;'
        in check.stdout.splitlines()
    )


# --- No false drift --------------------------------------------------------------------------


def test_quote_all_identifiers_set_on_the_database_is_no_drift(empty_db, database_setting):
    database_setting("quote_all_identifiers", "on")
    assert run_migrate(empty_db.url).returncode == 0
    check = run_migrate(empty_db.url, "--check")
    assert check.returncode == migrate.EXIT_OK, check.stdout
    assert_contract_catalog(empty_db)


def test_objects_left_before_the_first_run_that_change_generated_names_are_no_drift(empty_db):
    empty_db.rows("CREATE SEQUENCE users_id_seq")  # bigserial then picks users_id_seq1
    assert run_migrate(empty_db.url).returncode == 0
    assert empty_db.value("SELECT pg_get_serial_sequence('users', 'id')") == "public.users_id_seq1"
    check = run_migrate(empty_db.url, "--check")
    assert check.returncode == migrate.EXIT_OK, check.stdout


def test_stderr_of_a_run_escapes_what_it_reads_from_the_catalog(migrated_db):
    migrated_db.rows('CREATE TABLE "x\ry\u2028z" (id int)')
    result = run_migrate(migrated_db.url)
    assert (
        'migrate: not in the models, left alone: table "x\\ry\\u2028z"'
        in result.stderr.splitlines()
    )


# --- Found by trying to break it -------------------------------------------------------------


def test_an_unknown_column_of_a_not_null_domain_is_drift(migrated_db):
    domain = scoped_name(migrated_db.name, "region")
    migrated_db.rows(f"CREATE DOMAIN {quoted(domain)} AS text NOT NULL")
    try:
        migrated_db.rows(f"ALTER TABLE sign_in_records ADD COLUMN region {quoted(domain)}")
        check = run_migrate(migrated_db.url, "--check")
        assert check.returncode == migrate.EXIT_DRIFT, check.stdout
        assert any(
            line.startswith("-- sign_in_records.region is of the NOT NULL domain")
            for line in check.stdout.splitlines()
        )
    finally:
        migrated_db.rows(f"DROP DOMAIN {quoted(domain)} CASCADE")


def test_check_evaluating_a_check_advances_no_sequence(migrated_db):
    migrated_db.rows("ALTER TABLE users ADD CONSTRAINT quota_positive CHECK (quota >= 0)")
    before = migrated_db.value("SELECT last_value || ' ' || is_called FROM users_id_seq")
    for _ in range(3):
        check = run_migrate(migrated_db.url, "--check")
        assert check.returncode == migrate.EXIT_OK
        assert check.stderr.splitlines()[-1].startswith("migrate: the database matches the models")
    assert migrated_db.value("SELECT last_value || ' ' || is_called FROM users_id_seq") == before


def test_json_error_is_a_document_too():
    result = run_migrate("host=127.0.0.1 port=1 dbname=x", "--check", "--format", "json")
    assert result.returncode == migrate.EXIT_ERROR
    document = json.loads(result.stdout)
    assert document["exit"] == migrate.EXIT_ERROR
    assert document["error"].startswith("cannot reach the server")


def test_a_json_row_estimate_too_large_for_readers_is_null(migrated_db):
    migrated_db.rows("DROP INDEX idx_users_status")
    migrated_db.rows("UPDATE pg_class SET reltuples = 3e38 WHERE oid = 'users'::regclass")
    document = json.loads(run_migrate(migrated_db.url, "--check", "--format", "json").stdout)
    assert document["pending"][0]["rows"] == {"users": None}


@pytest.mark.parametrize(
    "format_args",
    [
        ["--format", "json"],
        ["--format=json"],
        ["--form", "json"],
        ["--format", "text", "--form=json"],
    ],
)
def test_json_usage_error_is_a_document_too(format_args):
    result = run_migrate(
        "host=127.0.0.1 port=1 dbname=x", "--check", "--retain-request-logs", "5", *format_args
    )
    assert result.returncode == migrate.EXIT_ERROR
    assert json.loads(result.stdout)["error"].startswith("--retain-request-logs goes alone")
    assert result.stderr.count("\n") == 1


def test_a_usage_error_after_text_won_over_json_is_no_document():
    result = run_migrate("dbname=x", "--check", "--format", "json", "--format", "text", "--bogus")
    assert result.returncode == migrate.EXIT_ERROR
    assert result.stdout == ""


# --- Every character a terminal interprets is escaped ------------------------------------------

# What a terminal acts on rather than shows: a name holding one could recolour, move the
# cursor, rewrite what an operator reads (ESC [, CSI), reorder it (bidi overrides) or split
# it (line and paragraph separators, NEL).
TERMINAL_CLASSES = {
    "C0 controls and DEL": [chr(code) for code in range(0x01, 0x20)] + ["\x7f"],
    "C1 controls": [chr(code) for code in range(0x80, 0xA0)],
    "bidirectional controls": [chr(code) for code in range(0x202A, 0x202F)]
    + [chr(code) for code in range(0x2066, 0x206A)]
    + ["\u200e", "\u200f", "\u061c"],
    "line and paragraph separators": ["\u2028", "\u2029"],
}
# A name per class within PostgreSQL's 63 bytes: its ends and the characters known to be used
# in attacks (ESC of a CSI sequence, NEL, RLO, FSI).
TERMINAL_NAMES = {
    "C0 controls and DEL": "a\x01\x07\x08\x1b[2J\x1b]0;x\x07\x1f\x7fz",
    "C1 controls": "a\x80\x85\x9b2J\x9d\x9fz",
    "bidirectional controls": "a" + "".join(TERMINAL_CLASSES["bidirectional controls"]) + "z",
    "line and paragraph separators": "a\u2028b\u2029z",
}


def escaped_form(char):
    code = ord(char)
    if char in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[char]
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


@pytest.mark.parametrize("kind", TERMINAL_CLASSES)
def test_every_character_a_terminal_interprets_is_escaped_by_each_printer(kind):
    for char in TERMINAL_CLASSES[kind]:
        for printer in (catalog.shown, catalog.one_line):
            assert printer(f"a{char}z") == f"a{escaped_form(char)}z", (kind, hex(ord(char)))
        assert catalog.shown_name(f"a{char}z") == f'"a{escaped_form(char)}z"'


@pytest.mark.parametrize("kind", TERMINAL_NAMES)
def test_a_table_name_holding_terminal_controls_is_printed_escaped(migrated_db, kind):
    name = TERMINAL_NAMES[kind]
    migrated_db.rows(
        sql.SQL("CREATE TABLE {} (id int)")
        .format(sql.Identifier(name))
        .as_string(migrated_db.connection)
    )
    run = run_migrate(migrated_db.url)
    check = run_migrate(migrated_db.url, "--check")

    escaped = "".join(
        escaped_form(char) if char in TERMINAL_CLASSES[kind] else char for char in name
    )
    assert f'migrate: not in the models, left alone: table "{escaped}"' in run.stderr.splitlines()
    assert f'--   table "{escaped}"' in check.stdout.splitlines()
    for output in (run.stdout, run.stderr, check.stdout, check.stderr):
        assert not set(output) & set(TERMINAL_CLASSES[kind]) - {"\n"}, ascii(output)


def test_a_backslash_is_doubled_so_that_a_name_cannot_forge_an_escape(migrated_db):
    assert catalog.shown("x\\ny") == "x\\\\ny" != catalog.shown("x\ny")
    assert catalog.shown_name("x\\ny") == '"x\\\\ny"'
    migrated_db.rows('CREATE TABLE "x\\ny" (id int)')
    result = run_migrate(migrated_db.url)
    assert 'migrate: not in the models, left alone: table "x\\\\ny"' in result.stderr.splitlines()


@pytest.mark.parametrize("name", ["my app", "Upper", "1st", "a-b", 'q"uote', "é"])
def test_a_name_sql_would_quote_is_printed_quoted(migrated_db, name):
    expected = '"' + name.replace('"', '""') + '"'
    assert catalog.shown_name(name) == expected
    migrated_db.rows(
        sql.SQL("CREATE TABLE {} (id int)")
        .format(sql.Identifier(name))
        .as_string(migrated_db.connection)
    )
    result = run_migrate(migrated_db.url)
    assert f"migrate: not in the models, left alone: table {expected}" in result.stderr.splitlines()


def test_names_are_printed_in_ascii_escapes_where_the_output_is_not_utf8(migrated_db):
    migrated_db.rows('CREATE TABLE "café" (id int)')
    migrated_db.rows('CREATE TABLE "日本" (id int)')
    result = run_migrate(migrated_db.url, PYTHONIOENCODING="ascii")
    lines = result.stderr.splitlines()
    assert 'migrate: not in the models, left alone: table "caf\\u00e9"' in lines
    assert 'migrate: not in the models, left alone: table "\\u65e5\\u672c"' in lines
    assert result.stderr.isascii()


@pytest.mark.parametrize("kind", TERMINAL_CLASSES)
def test_printed_sql_writes_terminal_controls_in_postgresql_escapes(migrated_db, kind):
    chars = "".join(char for char in TERMINAL_CLASSES[kind] if char != "\x00")
    statement = plan.one_line_sql(f"SELECT 'a{chars}z' AS \"b{chars}y\"")
    assert statement.isprintable() and statement.isascii(), ascii(statement)
    # What psql would run is what was meant: the same text back from the server.
    assert migrated_db.rows(statement) == [("a" + chars + "z",)]
