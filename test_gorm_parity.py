"""
The models do what the Go backend's GORM calls do, one test per GORM call.

Each test is named for what GORM sends (measured with GORM's logger against
its own models) and checks the effect on real rows, read back with raw SQL,
so a row written by either side reads the same in the other.
"""

import pytest
from peewee import JOIN

from models import ApiConfig, ApiKey, LoadBalancerConfig, MissingWhereError, RequestLog, User


def make_user(name):
    return User.create(username=name, email=f"{name}@example.com", password_hash="hash")


def log_fields(user, api_key):
    return {
        "user": user,
        "api_key": api_key,
        "api_config_id": 1,
        "model": "gpt-4",
        "method": "POST",
        "path": "/v1/chat/completions",
        "status_code": 200,
        "response_time": 120,
    }


def user_row(db, name, columns):
    return db.rows(f"SELECT {columns} FROM users WHERE username = %s", name)[0]


# Model(&T{}).Where(..).Update(col, v)


def test_update_sets_updated_at_and_skips_soft_deleted_rows(migrated_db):
    make_user("live")
    make_user("gone").delete_instance()
    before = {name: user_row(migrated_db, name, "updated_at")[0] for name in ("live", "gone")}

    changed = User.update(status="banned").where(User.username.in_(["live", "gone"])).execute()

    assert changed == 1
    status, updated_at = user_row(migrated_db, "live", "status, updated_at")
    assert status == "banned" and updated_at > before["live"]
    assert user_row(migrated_db, "gone", "status, updated_at") == ("active", before["gone"])


# UpdateColumn(col, gorm.Expr("col + ?"))


def test_update_column_leaves_updated_at_and_skips_soft_deleted_rows(migrated_db):
    make_user("live")
    make_user("gone").delete_instance()
    before = {name: user_row(migrated_db, name, "updated_at")[0] for name in ("live", "gone")}

    changed = (
        User.update_columns(used_quota=User.used_quota + 5)
        .where(User.username.in_(["live", "gone"]))
        .execute()
    )

    assert changed == 1
    assert user_row(migrated_db, "live", "used_quota, updated_at") == (5, before["live"])
    assert user_row(migrated_db, "gone", "used_quota, updated_at") == (0, before["gone"])


# Delete(&T{}, id) / Delete(&T{}, ids) / Where(..).Delete(&T{})


def test_delete_soft_deletes_once_and_a_second_delete_changes_nothing(migrated_db):
    users = {
        name: make_user(name) for name in ("by_id", "by_ids_1", "by_ids_2", "by_where", "inst")
    }

    assert User.delete_by_id(users["by_id"].id) == 1
    assert (
        User.delete().where(User.id.in_([users["by_ids_1"].id, users["by_ids_2"].id])).execute()
        == 2
    )
    assert User.delete().where(User.username == "by_where").execute() == 1
    assert users["inst"].delete_instance() == 1
    first = dict(migrated_db.rows("SELECT username, deleted_at FROM users"))

    assert User.delete_by_id(users["by_id"].id) == 0
    assert User.delete().where(User.username.startswith("by_")).execute() == 0
    assert users["inst"].delete_instance() == 0
    assert migrated_db.value("SELECT count(*) FROM users") == 5
    assert None not in first.values()
    assert dict(migrated_db.rows("SELECT username, deleted_at FROM users")) == first


# Unscoped().Delete


def test_unscoped_delete_removes_rows_soft_deleted_or_not(migrated_db):
    make_user("live")
    make_user("gone").delete_instance()
    instance = make_user("instance")

    removed = User.delete_permanently().where(User.username.in_(["live", "gone"])).execute()
    instance.delete_instance(permanently=True)

    assert removed == 2
    assert migrated_db.value("SELECT count(*) FROM users") == 0


# Create(&[]T{..})


def test_create_batch_sets_created_at_and_updated_at_on_every_row(migrated_db):
    user = make_user("alice")
    key = ApiKey.create(user=user, key="sk-1", name="default")
    RequestLog.insert_many([log_fields(user, key) for _ in range(3)]).execute()
    RequestLog.bulk_create([RequestLog(**log_fields(user, key)) for _ in range(2)])
    RequestLog.insert(**log_fields(user, key)).execute()
    User.insert_many(
        [{"username": f"u{n}", "email": f"u{n}@x", "password_hash": "h"} for n in range(2)]
    ).execute()
    User.bulk_create([User(username="b", email="b@x", password_hash="h")])

    assert migrated_db.value("SELECT count(*) FROM request_logs WHERE created_at IS NULL") == 0
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 6
    assert migrated_db.rows(
        "SELECT count(*) FROM users WHERE created_at IS NULL OR updated_at IS DISTINCT FROM created_at"
    ) == [(0,)]
    newest_first = migrated_db.rows("SELECT id FROM request_logs ORDER BY created_at DESC, id DESC")
    assert newest_first[0] == (6,)


# Where(..).First(&t)


def test_first_orders_by_primary_key(migrated_db):
    # Written in reverse, so the heap (and the index on model_name) holds row 2 before row 1.
    for config_id in (2, 1):
        LoadBalancerConfig.insert(id=config_id, model_name="gpt-4").execute()
    query = LoadBalancerConfig.select().where(LoadBalancerConfig.model_name == "gpt-4")

    assert query.get().id == 2  # get() is GORM's Take: no order, the scan's first row
    assert query.first().id == 1
    assert [config.id for config in query.first(n=2)] == [1, 2]


# Save(&t) after Select(..)


def test_save_of_selected_fields_still_writes_updated_at(migrated_db):
    make_user("alice")
    before = user_row(migrated_db, "alice", "updated_at")[0]
    user = User.get(User.username == "alice")
    user.quota = 5

    user.save(only=[User.quota])

    quota, updated_at = user_row(migrated_db, "alice", "quota, updated_at")
    assert quota == 5 and updated_at > before
    assert updated_at == user.updated_at


# Joins("User")


def test_joins_attach_no_soft_deleted_row(migrated_db):
    live, gone = make_user("live"), make_user("gone")
    key = ApiKey.create(user=live, key="sk-1", name="default")
    for user in (live, gone):
        RequestLog.create(**log_fields(user, key))
    gone.delete_instance()

    left = RequestLog.select(RequestLog, User).join(User, JOIN.LEFT_OUTER).order_by(RequestLog.id)
    inner = RequestLog.select(RequestLog, User).join(User)

    assert [(log.user_id, log.user and log.user.username) for log in left] == [
        (live.id, "live"),
        (gone.id, None),
    ]
    assert [log.user.username for log in inner] == ["live"]


# update/delete without WHERE


@pytest.mark.parametrize("call", ["update", "update_columns", "delete", "delete_permanently"])
def test_update_and_delete_without_where_are_refused(migrated_db, call):
    queries = {
        "update": lambda: User.update(status="banned"),
        "update_columns": lambda: User.update_columns(quota=0),
        "delete": lambda: User.delete(),
        "delete_permanently": lambda: User.delete_permanently(),
    }
    make_user("alice")
    before = migrated_db.rows("SELECT * FROM users")

    with pytest.raises(
        MissingWhereError, match=rf"^{call}\(\) on users without a WHERE .*all_rows"
    ):
        queries[call]().execute()

    assert migrated_db.rows("SELECT * FROM users") == before
    assert queries[call]().all_rows().execute() == 1
    assert migrated_db.rows("SELECT * FROM users") != before


# headers written by Go with a nil map


def test_null_headers_read_back_as_an_empty_map(migrated_db):
    migrated_db.rows(
        "INSERT INTO api_configs (name, type, base_url, headers) VALUES ('go', 'openai', 'https://x', NULL)"
    )

    config = ApiConfig.get(ApiConfig.name == "go")
    (row,) = ApiConfig.select(ApiConfig.headers, ApiConfig.models).dicts()

    assert config.headers == {} and dict(config.headers.items()) == {}
    assert row == {"headers": {}, "models": []}


# Go string fields left empty


def test_empty_go_strings_are_stored_as_empty_not_null(migrated_db):
    ApiConfig.create(name="openai", type="openai", base_url="https://api.openai.com")
    user = make_user("alice")
    RequestLog.create(**log_fields(user, ApiKey.create(user=user, key="sk-1", name="default")))

    assert migrated_db.rows("SELECT api_key FROM api_configs") == [("",)]
    assert migrated_db.rows("SELECT error_msg FROM request_logs") == [("",)]
