"""
What else uses request_logs survives its conversion and upkeep: the conversion carries
owner, grants, extra indexes and foreign keys, publications and what the partitions need
for them, or refuses before any change, naming each blocker; every partition a run makes
belongs to request_logs' owner, as production has it (the application role owns the
tables, a superuser runs migrate.py).
"""

from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

import migrate
import partition
from conftest import catalog, error_line, migrate_here, quoted, run_migrate, scoped_name
from test_partitions import INSERT_LOG, add_dated_logs, is_partitioned, month


def partitions_of(db, table="request_logs"):
    return [
        name
        for (name,) in db.rows(
            "SELECT c.relname FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid"
            " WHERE h.inhparent = %s::regclass ORDER BY 1",
            table,
        )
    ]


def owners(db):
    """{partition: owner} of request_logs' partitions."""
    return dict(
        db.rows(
            "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_inherits h"
            " JOIN pg_class c ON c.oid = h.inhrelid WHERE h.inhparent = 'request_logs'::regclass"
        )
    )


def a_month(db):
    """A month's partition the run made."""
    made = [
        p for p in partitions_of(db) if p not in (partition.LEGACY, partition.DEFAULT_PARTITION)
    ]
    return made[0]


def upkeep_next_month(db):
    """A plain run as the superuser on the first day of next month: upkeep makes a new month."""
    now = month(datetime.now(UTC), 1) + timedelta(hours=1)
    migrate_here(db.params, now=now)
    return partition.month_name(month(now, 1))


def as_role(db, role):
    connection = psycopg2.connect(db.url_with(user=role))
    connection.autocommit = True
    return connection


@pytest.fixture
def app_role(empty_db):
    """The application's role, owning the tables: it ran the plain migrate, as in production."""
    role = scoped_name(empty_db.name, "app")
    empty_db.rows(f"DROP ROLE IF EXISTS {quoted(role)}")
    empty_db.rows(f"CREATE ROLE {quoted(role)} LOGIN")
    empty_db.rows(f"GRANT CREATE ON SCHEMA public TO {quoted(role)}")
    try:
        result = run_migrate(empty_db.url_with(user=role))
        assert result.returncode == 0, result.stderr
        yield role
    finally:
        empty_db.rows(f"DROP OWNED BY {quoted(role)} CASCADE")
        empty_db.rows(f"DROP ROLE {quoted(role)}")


@pytest.fixture
def other_role(empty_db):
    role = scoped_name(empty_db.name, "reader")
    empty_db.rows(f"DROP ROLE IF EXISTS {quoted(role)}")
    empty_db.rows(f"CREATE ROLE {quoted(role)}")
    try:
        yield role
    finally:
        empty_db.rows(f"DROP OWNED BY {quoted(role)} CASCADE")
        empty_db.rows(f"DROP ROLE {quoted(role)}")


# --- Owner and grants (production: the application owns, a superuser runs) ----------------


def test_the_application_adds_a_column_after_a_superuser_converted_and_kept_the_layout(
    empty_db, app_role, other_role
):
    empty_db.rows(f"GRANT SELECT ON request_logs TO {quoted(other_role)}")
    empty_db.rows(f"GRANT UPDATE (model) ON request_logs TO {quoted(other_role)}")
    empty_db.rows("COMMENT ON TABLE request_logs IS 'the operator''s words'")
    add_dated_logs(empty_db, 10)

    converted = run_migrate(empty_db.url, "--partition-request-logs")
    assert converted.returncode == 0, converted.stderr
    new_month = upkeep_next_month(empty_db)

    assert new_month in partitions_of(empty_db)
    assert set(owners(empty_db).values()) == {app_role}
    for name in partitions_of(empty_db):
        assert empty_db.value("SELECT has_table_privilege(%s, %s, 'SELECT')", other_role, name)
        assert empty_db.value(
            "SELECT has_column_privilege(%s, %s, 'model', 'UPDATE')", other_role, name
        )
    assert empty_db.value(
        "SELECT has_column_privilege(%s, 'request_logs', 'model', 'UPDATE')", other_role
    )
    assert empty_db.value("SELECT obj_description('request_logs'::regclass, 'pg_class')") == (
        "the operator's words"
    )
    app = as_role(empty_db, app_role)
    with app.cursor() as cursor:  # what GORM's AutoMigrate sends when the model gains a field
        cursor.execute("ALTER TABLE request_logs ADD COLUMN prompt_tokens bigint")
    app.close()
    assert empty_db.value(
        "SELECT count(*) FROM pg_attribute WHERE attname = 'prompt_tokens'"
        " AND attrelid IN (SELECT inhrelid FROM pg_inherits"
        " WHERE inhparent = 'request_logs'::regclass)"
    ) == len(partitions_of(empty_db))


def test_a_fresh_layout_made_by_a_superuser_for_an_application_owner_is_theirs_after_upkeep(
    empty_db, app_role
):
    # The application's tables exist; request_logs alone is made by a partitioned run.
    empty_db.rows("DROP TABLE request_logs")
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows(f"ALTER TABLE request_logs OWNER TO {quoted(app_role)}")
    for name in partitions_of(empty_db):
        empty_db.rows(f"ALTER TABLE {quoted(name)} OWNER TO {quoted(app_role)}")

    new_month = upkeep_next_month(empty_db)

    assert owners(empty_db)[new_month] == app_role


def test_the_application_role_converts_and_keeps_its_own_layout(empty_db, app_role):
    add_dated_logs(empty_db, 10)
    url = empty_db.url_with(user=app_role)

    converted = run_migrate(url, "--partition-request-logs")
    new_month = upkeep_next_month(empty_db)  # the superuser's cron, the month after

    assert converted.returncode == 0, converted.stderr
    assert set(owners(empty_db).values()) == {app_role}
    assert new_month in owners(empty_db)
    assert run_migrate(url, "--check").returncode == migrate.EXIT_OK


def test_a_default_partition_upkeep_makes_again_is_the_applications(empty_db, app_role):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    empty_db.rows("ALTER TABLE request_logs DETACH PARTITION request_logs_default")
    empty_db.rows("DROP TABLE request_logs_default")

    migrate_here(empty_db.params)

    assert owners(empty_db)[partition.DEFAULT_PARTITION] == app_role
    assert (
        empty_db.value(
            "SELECT relreplident FROM pg_class WHERE relname = %s", partition.DEFAULT_PARTITION
        )
        == "f"
    )


def test_a_partition_owned_by_another_role_is_drift_with_the_fix(empty_db, app_role):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    stray = a_month(empty_db)
    empty_db.rows(f"ALTER TABLE {quoted(stray)} OWNER TO postgres")

    check = run_migrate(empty_db.url, "--check")

    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert f"the partition {stray} of request_logs is owned by postgres" in check.stdout
    fix = f'ALTER TABLE "{stray}" OWNER TO "{app_role}";'
    assert fix in check.stdout
    empty_db.rows(fix.lstrip("- "))
    assert run_migrate(empty_db.url, "--check").returncode == migrate.EXIT_OK


def test_a_partition_missing_a_grant_of_request_logs_is_drift_with_the_fix(
    empty_db, app_role, other_role
):
    empty_db.rows(f"GRANT SELECT ON request_logs TO {quoted(other_role)}")
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    stray = a_month(empty_db)
    empty_db.rows(f"REVOKE SELECT ON {quoted(stray)} FROM {quoted(other_role)}")

    check = run_migrate(empty_db.url, "--check")

    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert f'GRANT SELECT ON TABLE "{stray}" TO "{other_role}";' in check.stdout


# --- Publications and replica identity ------------------------------------------------------


def publication(db, name, how, via_root):
    pub = scoped_name(db.name, name)
    db.rows(f"DROP PUBLICATION IF EXISTS {quoted(pub)}")
    db.rows(
        f"CREATE PUBLICATION {quoted(pub)} {how} WITH (publish_via_partition_root = {via_root})"
    )
    return pub


@pytest.fixture
def publications(empty_db):
    made = []
    yield (
        lambda name, how, via_root: (
            made.append(publication(empty_db, name, how, via_root)) or (made[-1])
        )
    )
    for pub in made:
        empty_db.rows(f"DROP PUBLICATION IF EXISTS {quoted(pub)}")


def update_and_delete_a_log_of_each_partition(db):
    """GORM's soft delete (an UPDATE) and a DELETE on a row of every month the layout has."""
    now = datetime.now(UTC)
    for offset in range(3):  # the third month exists once upkeep has run next month
        moment = month(now, offset) + timedelta(days=2)
        db.rows(INSERT_LOG.format(created_at=f"'{moment.isoformat()}'"))
    db.rows("UPDATE request_logs SET deleted_at = now()")
    db.rows("DELETE FROM request_logs WHERE created_at >= %s", month(now, 0))
    assert db.value("SELECT count(*) FROM request_logs WHERE created_at >= %s", month(now, 0)) == 0


HOW = ["FOR ALL TABLES", "FOR TABLE request_logs", "FOR TABLES IN SCHEMA public"]


@pytest.mark.parametrize("how", HOW)
def test_a_publication_via_the_partition_root_is_carried_and_updates_still_work(
    migrated_db, publications, how
):
    add_dated_logs(migrated_db, 10)
    pub = publications("pub", how, "true")

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert result.returncode == 0, result.stderr
    update_and_delete_a_log_of_each_partition(migrated_db)
    published = [
        name
        for (name,) in migrated_db.rows(
            "SELECT tablename FROM pg_publication_tables WHERE pubname = %s", pub
        )
    ]
    assert "request_logs" in published and partition.LEGACY not in published
    upkeep_next_month(migrated_db)
    update_and_delete_a_log_of_each_partition(migrated_db)
    assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_OK


@pytest.mark.parametrize("how", HOW)
def test_a_publication_of_partitions_by_their_own_names_blocks_the_conversion(
    migrated_db, publications, how
):
    add_dated_logs(migrated_db, 10)
    pub = publications("pub", how, "false")
    before = catalog(migrated_db)

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert result.returncode == migrate.EXIT_ERROR
    assert (
        f"the publication {pub} ({how.removesuffix(' request_logs').removesuffix(' public')})"
        in error_line(result)
    )
    assert "publish_via_partition_root" in error_line(result)
    assert catalog(migrated_db) == before
    assert not is_partitioned(migrated_db)


def test_a_publication_made_after_the_conversion_fails_no_update(migrated_db, publications):
    add_dated_logs(migrated_db, 10)
    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0
    publications("late", "FOR ALL TABLES", "false")

    update_and_delete_a_log_of_each_partition(migrated_db)
    upkeep_next_month(migrated_db)
    update_and_delete_a_log_of_each_partition(migrated_db)

    assert run_migrate(migrated_db.url, "--check").returncode == migrate.EXIT_OK


def test_a_partition_published_without_a_replica_identity_is_drift_with_the_fix(
    empty_db, publications
):
    assert run_migrate(empty_db.url, "--partition-request-logs").returncode == 0
    stray = a_month(empty_db)
    empty_db.rows(f"ALTER TABLE {quoted(stray)} REPLICA IDENTITY DEFAULT")
    publications("pub", "FOR ALL TABLES", "true")

    check = run_migrate(empty_db.url, "--check")

    assert check.returncode == migrate.EXIT_DRIFT, check.stdout
    assert f'ALTER TABLE "{stray}" REPLICA IDENTITY FULL;' in check.stdout


# --- Foreign keys, indexes, checks, storage ----------------------------------------------------


def test_a_foreign_key_of_another_table_into_request_logs_blocks_the_conversion(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows(
        "CREATE TABLE log_details (id bigserial PRIMARY KEY,"
        " log_id bigint CONSTRAINT details_log REFERENCES request_logs (id))"
    )
    before = catalog(migrated_db)

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert result.returncode == migrate.EXIT_ERROR
    assert "the foreign key details_log of public.log_details referencing request_logs" in (
        error_line(result)
    )
    assert catalog(migrated_db) == before


def test_a_dbas_index_and_foreign_key_are_on_every_partition_present_and_future(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("CREATE INDEX logs_path ON request_logs (path DESC) INCLUDE (model)")
    migrated_db.rows("CREATE TABLE paths (path varchar(255) PRIMARY KEY)")
    migrated_db.rows("INSERT INTO paths SELECT DISTINCT path FROM request_logs")
    migrated_db.rows(
        "ALTER TABLE request_logs ADD CONSTRAINT known_path FOREIGN KEY (path) REFERENCES paths"
    )
    listed = "index request_logs.logs_path"
    assert listed in run_migrate(migrated_db.url, "--check").stdout

    result = run_migrate(migrated_db.url, "--partition-request-logs")
    assert result.returncode == 0, result.stderr
    new_month = upkeep_next_month(migrated_db)

    assert is_partitioned(migrated_db)
    children = migrated_db.rows(
        "SELECT c.relname FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid"
        " JOIN pg_class c ON c.oid = x.indrelid WHERE i.inhparent = 'logs_path'::regclass"
        " ORDER BY 1"
    )
    assert [name for (name,) in children] == partitions_of(migrated_db)
    assert new_month in partitions_of(migrated_db)
    assert migrated_db.value(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = 'logs_path'::regclass"
    )
    for created_at in ("now()", f"'{month(datetime.now(UTC), 1).isoformat()}'", "NULL"):
        with pytest.raises(psycopg2.errors.ForeignKeyViolation):
            migrated_db.rows(
                INSERT_LOG.format(created_at=created_at).replace("'GET', '/'", "'GET', '/nowhere'")
            )
    check = run_migrate(migrated_db.url, "--check")
    assert check.returncode == migrate.EXIT_OK, check.stdout
    assert listed in check.stdout
    assert "constraint request_logs.known_path" in check.stdout


@pytest.mark.parametrize(
    "sql, named",
    [
        ("CREATE INDEX odd ON request_logs (lower(path))", "the index odd"),
        ("CREATE INDEX odd ON request_logs (path) WHERE status_code >= 500", "the index odd"),
        ("CREATE UNIQUE INDEX odd ON request_logs (id, path)", "the index odd"),
        ("CREATE INDEX odd ON request_logs (path text_pattern_ops)", "the index odd"),
        ("ALTER TABLE request_logs ADD CONSTRAINT odd UNIQUE (id, path)", "unique constraint odd"),
        (
            "ALTER TABLE request_logs ADD CONSTRAINT odd CHECK (response_time >= 0) NO INHERIT",
            "NO INHERIT check odd",
        ),
        (
            "ALTER TABLE request_logs ADD CONSTRAINT odd CHECK (response_time >= 0) NOT VALID",
            "NOT VALID check odd",
        ),
        (
            (
                "ALTER TABLE request_logs ADD CONSTRAINT odd FOREIGN KEY (api_config_id)"
                " REFERENCES api_configs NOT VALID"
            ),
            "foreign key odd",
        ),
        ("CREATE POLICY odd ON request_logs USING (true)", "policy odd"),
        ("CREATE RULE odd AS ON DELETE TO request_logs DO INSTEAD NOTHING", "rule odd"),
        ("ALTER TABLE request_logs SET (user_catalog_table = true)", "user_catalog_table=true"),
    ],
)
def test_what_the_conversion_cannot_rebuild_blocks_it_before_any_change(migrated_db, sql, named):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows(sql)
    before = catalog(migrated_db)

    result = run_migrate(migrated_db.url, "--partition-request-logs")
    check = run_migrate(migrated_db.url, "--partition-request-logs", "--check")

    assert result.returncode == check.returncode == migrate.EXIT_ERROR
    assert named in error_line(result)
    assert "request_logs cannot be converted to monthly partitions" in check.stdout
    assert catalog(migrated_db) == before
    assert not is_partitioned(migrated_db)


def test_every_blocker_is_named_in_one_line_with_what_to_do(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("CREATE INDEX odd ON request_logs (lower(path))")
    migrated_db.rows("ALTER TABLE request_logs ENABLE ROW LEVEL SECURITY")
    migrated_db.rows("ALTER TABLE request_logs SET (user_catalog_table = true)")

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    line = error_line(result)
    assert result.returncode == migrate.EXIT_ERROR
    for blocker in ("the index odd", "row level security", "user_catalog_table=true"):
        assert blocker in line
    assert line.count("(") >= 3  # each with what to do


def test_storage_parameters_and_statistics_targets_reach_every_new_partition(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows(
        "ALTER TABLE request_logs SET (fillfactor = 90, autovacuum_vacuum_scale_factor = 0.01,"
        " toast.autovacuum_enabled = false)"
    )
    migrated_db.rows("ALTER TABLE request_logs ALTER COLUMN model SET STATISTICS 500")
    migrated_db.rows("ALTER TABLE request_logs ALTER COLUMN path SET (n_distinct = -0.5)")

    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0
    new_month = upkeep_next_month(migrated_db)

    for name in partitions_of(migrated_db):
        options = migrated_db.value("SELECT reloptions FROM pg_class WHERE relname = %s", name)
        assert sorted(options) == ["autovacuum_vacuum_scale_factor=0.01", "fillfactor=90"], name
        target = migrated_db.value(
            "SELECT attstattarget FROM pg_attribute WHERE attrelid = %s::regclass"
            " AND attname = 'model'",
            name,
        )
        assert target == 500, name
        assert migrated_db.value(
            # This server's own options (Debian's builds add pg_attver) left out.
            "SELECT array_agg(o) FROM pg_attribute, unnest(attoptions) o"
            " WHERE attrelid = %s::regclass AND attname = 'path' AND o NOT LIKE 'pg\\_%%'",
            name,
        ) == ["n_distinct=-0.5"], name
        assert migrated_db.value(
            "SELECT t.reloptions FROM pg_class c JOIN pg_class t ON t.oid = c.reltoastrelid"
            " WHERE c.relname = %s",
            name,
        ) == ["autovacuum_enabled=false"], name
    assert new_month in partitions_of(migrated_db)


@pytest.mark.parametrize("method", ["brin", "hash"])
def test_an_index_of_another_method_and_its_comment_reach_every_partition(migrated_db, method):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows(f"CREATE INDEX logs_extra ON request_logs USING {method} (created_at)")
    migrated_db.rows("COMMENT ON INDEX logs_extra IS 'the DBA''s'")

    assert run_migrate(migrated_db.url, "--partition-request-logs").returncode == 0
    upkeep_next_month(migrated_db)

    methods = migrated_db.rows(
        "SELECT c.relname, am.amname FROM pg_inherits i JOIN pg_index x ON x.indexrelid = i.inhrelid"
        " JOIN pg_class c ON c.oid = x.indrelid JOIN pg_class ic ON ic.oid = x.indexrelid"
        " JOIN pg_am am ON am.oid = ic.relam WHERE i.inhparent = 'logs_extra'::regclass ORDER BY 1"
    )
    assert methods == [(name, method) for name in partitions_of(migrated_db)]
    assert migrated_db.value("SELECT obj_description('logs_extra'::regclass, 'pg_class')") == (
        "the DBA's"
    )


def test_a_publication_of_some_columns_of_request_logs_blocks_the_conversion(
    migrated_db, publications
):
    if migrated_db.value("SHOW server_version_num") < "150000":
        pytest.skip("column lists of publications exist from PostgreSQL 15")
    pub = publications("cols", "FOR TABLE request_logs (id, created_at, model)", "true")
    before = catalog(migrated_db)

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert result.returncode == migrate.EXIT_ERROR
    assert f"row filter or column list of request_logs in the publication {pub}" in (
        error_line(result)
    )
    assert catalog(migrated_db) == before


def test_a_dbas_key_that_sets_some_columns_null_is_carried_by_the_conversion(migrated_db):
    add_dated_logs(migrated_db, 10)
    migrated_db.rows("CREATE TABLE dba_configs (id bigint PRIMARY KEY)")
    migrated_db.rows("ALTER TABLE request_logs ADD COLUMN config_ref bigint")
    # ON DELETE SET NULL of a column list, PostgreSQL 15+.
    migrated_db.rows(
        "ALTER TABLE request_logs ADD CONSTRAINT config_dba FOREIGN KEY (config_ref)"
        " REFERENCES dba_configs (id) ON DELETE SET NULL (config_ref)"
    )

    result = run_migrate(migrated_db.url, "--partition-request-logs")

    assert result.returncode == 0, result.stderr
    assert is_partitioned(migrated_db)
    assert migrated_db.value(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE conrelid = 'request_logs'::regclass AND conname = 'config_dba'"
    ) == ("FOREIGN KEY (config_ref) REFERENCES dba_configs(id) ON DELETE SET NULL (config_ref)")
