"""
What the models and the schema they make guarantee to the application.

Each test starts from a database freshly migrated by migrate.py, with the
models bound to it (the `migrated_db` fixture).
"""

import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import pytest
from peewee import JOIN, IntegrityError, Select, fn

import migrate
from conftest import HERE, bind_models
from models import (
    ApiConfig,
    ApiKey,
    LoadBalancerConfig,
    RequestLog,
    SignInRecord,
    User,
    database,
    utc_day_bounds,
)


def make_user(name="alice"):
    return User.create(username=name, email=f"{name}@example.com", password_hash="hash")


def make_key(user, key="sk-1"):
    return ApiKey.create(user=user, key=key, name="default")


def log_request(user, api_key):
    return RequestLog.create(
        user=user,
        api_key=api_key,
        api_config_id=1,
        model="gpt-4",
        method="POST",
        path="/v1/chat/completions",
        status_code=200,
        response_time=120,
    )


# --- What the Go suite checked --------------------------------------------


def test_all_six_tables_exist(migrated_db):
    assert migrated_db.tables() == sorted(
        model._meta.table_name
        for model in (User, ApiKey, ApiConfig, LoadBalancerConfig, RequestLog, SignInRecord)
    )


@pytest.mark.parametrize("column", ["username", "email"])
def test_duplicate_user_column_is_rejected(migrated_db, column):
    make_user("alice")
    other = {"username": "bob", "email": "bob@example.com", "password_hash": "h"}
    other[column] = "alice" if column == "username" else "alice@example.com"
    with pytest.raises(IntegrityError, match=f"idx_users_{column}"), database.atomic():
        User.create(**other)


def test_duplicate_api_key_is_rejected(migrated_db):
    make_key(make_user(), key="sk-same")
    with pytest.raises(IntegrityError, match="idx_api_keys_key"), database.atomic():
        make_key(make_user("bob"), key="sk-same")


def test_api_key_for_missing_user_is_rejected(migrated_db):
    with pytest.raises(IntegrityError, match="fk_api_keys_user"), database.atomic():
        ApiKey.create(user=999, key="sk-orphan", name="x")


def test_request_log_for_missing_user_is_rejected(migrated_db):
    api_key = make_key(make_user())
    with pytest.raises(IntegrityError, match="fk_request_logs_user"), database.atomic():
        log_request(999, api_key)


def test_request_log_for_missing_api_key_is_rejected(migrated_db):
    user = make_user()
    with pytest.raises(IntegrityError, match="fk_request_logs_api_key"), database.atomic():
        log_request(user, 999)


def test_sign_in_record_for_missing_user_is_rejected(migrated_db):
    with pytest.raises(IntegrityError, match="fk_sign_in_records_user"), database.atomic():
        SignInRecord.create(user=999)


# Raw SQL that omits every defaulted column, and what the row then holds.
RAW_INSERTS = {
    "users": (
        "INSERT INTO users (username, email, password_hash) VALUES ('u', 'u@x', 'h')",
        {"quota": 10000, "used_quota": 0, "is_admin": False, "status": "active"},
    ),
    "api_keys": (
        "INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users LIMIT 1",
        {"is_active": True, "rate_limit": 60},
    ),
    "api_configs": (
        "INSERT INTO api_configs (name, type, base_url) VALUES ('c', 'openai', 'https://x')",
        {
            "models": [],
            "headers": None,
            "is_active": True,
            "priority": 100,
            "weight": 1,
            "max_rps": 0,
            "timeout": 30,
        },
    ),
    "load_balancer_configs": (
        "INSERT INTO load_balancer_configs (model_name) VALUES ('gpt-4')",
        {"strategy": "round_robin", "is_active": True},
    ),
    "request_logs": (
        (
            "INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path,"
            " status_code, response_time) SELECT user_id, id, 1, 'm', 'GET', '/', 200, 5 FROM api_keys LIMIT 1"
        ),
        {"tokens_used": 0, "error_msg": None},
    ),
    "sign_in_records": (
        "INSERT INTO sign_in_records (user_id) SELECT id FROM users LIMIT 1",
        {"quota_awarded": 0},
    ),
}


@pytest.mark.parametrize("table", list(RAW_INSERTS))
def test_raw_insert_omitting_columns_gets_the_contract_defaults(migrated_db, table):
    migrated_db.rows("INSERT INTO users (username, email, password_hash) VALUES ('o', 'o@x', 'h')")
    migrated_db.rows("INSERT INTO api_keys (user_id, key, name) SELECT id, 'ko', 'n' FROM users")
    insert, expected = RAW_INSERTS[table]
    migrated_db.rows(insert)
    columns = ", ".join(expected)
    row = migrated_db.rows(f"SELECT {columns} FROM {table} ORDER BY id DESC LIMIT 1")[0]
    assert dict(zip(expected, row)) == expected


def test_orm_insert_gets_the_same_defaults_as_the_database(migrated_db):
    user = make_user()
    stored = User.get_by_id(user.id)
    assert (user.quota, user.used_quota, user.is_admin, user.status) == (10000, 0, False, "active")
    assert (stored.quota, stored.used_quota, stored.is_admin, stored.status) == (
        10000,
        0,
        False,
        "active",
    )


def test_models_and_headers_round_trip_as_list_and_dict(migrated_db):
    models = ["gpt-4o", "gpt-4o-mini", "o1"]
    headers = {"X-Org": "acme", "X-Trace": "on"}
    config = ApiConfig.create(
        name="openai",
        type="openai",
        base_url="https://api.openai.com",
        models=models,
        headers=headers,
    )
    stored = ApiConfig.get_by_id(config.id)
    assert stored.models == models
    assert stored.headers == headers
    assert (
        migrated_db.value("SELECT jsonb_typeof(models) || jsonb_typeof(headers) FROM api_configs")
        == "arrayobject"
    )


def test_config_saved_without_models_or_headers_stores_empty_array_and_object(migrated_db):
    ApiConfig.create(name="bare", type="custom", base_url="https://x")
    assert migrated_db.rows("SELECT models::text, headers::text FROM api_configs") == [("[]", "{}")]
    stored = ApiConfig.get(ApiConfig.name == "bare")
    assert (stored.models, stored.headers) == ([], {})


# --- Timestamps -------------------------------------------------------------


def test_created_at_is_set_on_insert_and_updated_at_on_every_save(migrated_db):
    user = make_user()
    created, first_update = user.created_at, user.updated_at
    assert created is not None and created.tzinfo is not None
    user.quota = 5
    user.save()
    stored = User.get_by_id(user.id)
    assert stored.created_at == created
    assert stored.updated_at > first_update


def test_tables_without_updated_at_still_get_created_at(migrated_db):
    record = SignInRecord.create(user=make_user(), quota_awarded=10)
    assert SignInRecord.get_by_id(record.id).created_at is not None
    assert "updated_at" not in SignInRecord._meta.fields


# --- Soft delete --------------------------------------------------------------


def test_delete_instance_sets_deleted_at_and_keeps_the_row(migrated_db):
    user = make_user()
    user.delete_instance()
    assert migrated_db.value("SELECT deleted_at IS NOT NULL FROM users WHERE id = %s", user.id)


def test_soft_deleted_rows_are_hidden_from_select_get_and_count(migrated_db):
    keep, gone = make_user("keep"), make_user("gone")
    gone.delete_instance()
    assert [u.username for u in User.select()] == ["keep"]
    assert User.select().count() == 1
    assert User.get_or_none(User.username == "gone") is None
    with pytest.raises(User.DoesNotExist):
        User.get_by_id(gone.id)
    assert User.get_by_id(keep.id).username == "keep"


def test_with_deleted_includes_soft_deleted_rows(migrated_db):
    make_user("keep")
    make_user("gone").delete_instance()
    assert sorted(u.username for u in User.with_deleted()) == ["gone", "keep"]


def test_restore_makes_a_soft_deleted_row_visible_again(migrated_db):
    user = make_user()
    user.delete_instance()
    user.restore()
    assert User.get_by_id(user.id).deleted_at is None


def test_permanent_delete_removes_the_row(migrated_db):
    user = make_user()
    user.delete_instance(permanently=True)
    assert User.with_deleted().count() == 0
    assert migrated_db.value("SELECT count(*) FROM users") == 0


def test_orwhere_cannot_bring_back_soft_deleted_rows(migrated_db):
    make_user("keep")
    make_user("gone").delete_instance()
    query = User.select().where(User.username == "keep").orwhere(User.username == "gone")
    assert [u.username for u in query] == ["keep"]
    assert query.count() == 1


def test_aliased_model_hides_soft_deleted_rows(migrated_db):
    make_user("keep")
    make_user("gone").delete_instance()
    other = User.alias("other")
    assert [u.username for u in other.select()] == ["keep"]
    assert sorted(u.username for u in other.with_deleted()) == ["gone", "keep"]


def test_subqueries_and_unions_hide_soft_deleted_rows(migrated_db):
    keep, gone = make_user("keep"), make_user("gone")
    make_key(keep, "sk-keep")
    make_key(gone, "sk-gone").delete_instance()
    gone.delete_instance()
    with_live_keys = User.with_deleted().where(User.id.in_(ApiKey.select(ApiKey.user)))
    names = User.select(User.username)
    from_subquery = Select([names], [names.c.username]).bind(database)
    union = User.select().where(User.username == "keep") | User.select().where(
        User.username == "gone"
    )
    assert [u.username for u in with_live_keys] == ["keep"]
    assert list(from_subquery.tuples()) == [("keep",)]
    assert [u.username for u in union] == ["keep"]


def test_joined_tables_hide_soft_deleted_rows_in_inner_left_and_cross_joins(migrated_db):
    keep, gone = make_user("keep"), make_user("gone")
    make_key(keep, "sk-keep")
    make_key(keep, "sk-gone").delete_instance()
    gone.delete_instance()
    inner = ApiKey.select(ApiKey.key).join(User)
    left = User.select(User.username, ApiKey.key).join(ApiKey, JOIN.LEFT_OUTER)
    cross = User.select(User.username, ApiKey.key).join(ApiKey, JOIN.CROSS)
    assert list(inner.tuples()) == [("sk-keep",)]
    assert list(left.tuples()) == [("keep", "sk-keep")]
    assert list(cross.tuples()) == [("keep", "sk-keep")]


def test_with_deleted_joins_soft_deleted_rows_too(migrated_db):
    gone = make_user("gone")
    make_key(gone)
    gone.delete_instance()
    query = ApiKey.with_deleted(ApiKey, User).join(User, JOIN.LEFT_OUTER)
    assert [key.user.username for key in query] == ["gone"]


def test_scalar_of_an_aggregate_works_unordered(migrated_db):
    make_user("a")
    make_user("b").delete_instance()
    assert User.select(fn.MAX(User.quota)).scalar() == 10000
    assert User.select(fn.COUNT(User.id)).scalar() == 1


# --- Day boundaries -------------------------------------------------------------


@pytest.fixture
def shanghai_database_default(migrated_db):
    """New sessions of the test database default to Asia/Shanghai (UTC+8), as a server may."""
    migrated_db.rows(f"ALTER DATABASE \"{migrated_db.name}\" SET timezone = 'Asia/Shanghai'")
    database.close()
    yield migrated_db
    migrated_db.rows(f'ALTER DATABASE "{migrated_db.name}" RESET timezone')


def test_sessions_run_in_utc_whatever_the_server_default(shanghai_database_default):
    record = SignInRecord.create(
        user=make_user(), created_at=datetime(2024, 5, 1, 23, 30, tzinfo=UTC)
    )
    naive_start, naive_end = datetime(2024, 5, 1), datetime(2024, 5, 2)
    counted = database.execute_sql(
        "SELECT count(*) FROM sign_in_records WHERE created_at >= %s AND created_at < %s",
        (naive_start, naive_end),
    ).fetchone()[0]
    day = database.execute_sql(
        "SELECT created_at::date::text FROM sign_in_records WHERE id = %s", (record.id,)
    ).fetchone()[0]
    assert database.execute_sql("SHOW TimeZone").fetchone()[0] == "UTC"
    assert (counted, day) == (1, "2024-05-01")


def test_utc_day_bounds_count_a_late_sign_in_for_its_utc_day(migrated_db):
    late = datetime(2024, 5, 1, 23, 30, tzinfo=UTC)
    SignInRecord.create(user=make_user(), created_at=late)
    same_moment_in_shanghai = late.astimezone(timezone(timedelta(hours=8)))
    start, end = utc_day_bounds(same_moment_in_shanghai)
    assert (start, end) == (datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 2, tzinfo=UTC))
    query = SignInRecord.select().where(
        (SignInRecord.created_at >= start) & (SignInRecord.created_at < end)
    )
    assert query.count() == 1


def test_naive_datetimes_are_refused_with_a_hint(migrated_db):
    with pytest.raises(ValueError, match=r"SignInRecord.created_at got a naive datetime.*aware"):
        SignInRecord.select().where(SignInRecord.created_at >= datetime(2024, 5, 1)).count()


def test_binding_keeps_the_callers_options_and_runs_in_utc(empty_db):
    bind_models({**empty_db.params, "options": "-c lock_timeout=1234"})
    assert database.execute_sql("SHOW lock_timeout").fetchone()[0] == "1234ms"
    assert database.execute_sql("SHOW TimeZone").fetchone()[0] == "UTC"


def test_migrate_sessions_send_their_guard_options_and_no_utc_option(empty_db):
    # TimeZone=UTC is the models' option for the application; migrate.py writes no timestamps.
    migrate.connect(empty_db.params)
    dsn = database.connection().dsn
    assert "statement_timeout=30s" in dsn and "TimeZone" not in dsn


def test_pgoptions_still_apply_when_no_options_are_passed(empty_db, monkeypatch):
    monkeypatch.setenv("PGOPTIONS", "-c statement_timeout=4321")
    bind_models({k: v for k, v in empty_db.params.items() if k != "options"})
    assert database.execute_sql("SHOW statement_timeout").fetchone()[0] == "4321ms"
    assert database.execute_sql("SHOW TimeZone").fetchone()[0] == "UTC"


# --- Binding ------------------------------------------------------------------


def test_importing_models_connects_to_nothing():
    probe = "import models; print(models.database.deferred, models.database.is_closed())"
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.stdout.split() == ["True", "True"], result.stderr
