"""
The API aggregator's PostgreSQL schema, declared as Peewee models.

These models make the schema the Go backend's GORM AutoMigrate made
(``../shared/SCHEMA.md``): the same columns, database-level defaults,
constraint names and index names. Nothing is connected at import time; bind
the database when you know where it is::

    from models import database, User

    database.init('api_aggregator', host='localhost', user='postgres')
    alice = User.create(username='alice', email='a@example.com',
                        password_hash='...')
    alice.delete_instance()                   # soft delete: sets deleted_at
    User.select().count()                     # 0: soft-deleted rows are hidden
    User.with_deleted().count()               # 1
    alice.restore()                           # visible again
    alice.delete_instance(permanently=True)   # really deleted

``MODELS`` lists the models in creation order and ``PERFORMANCE_INDEXES``
the hand-picked indexes the Go script added; both are attached to the models,
so ``Model._meta.fields_to_index()`` yields every index of a table.
"""

import json
from datetime import UTC, datetime

from peewee import (
    SQL,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    ForeignKeyField,
    Metadata,
    Model,
    ModelIndex,
    TextField,
)
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField, PostgresqlExtDatabase

database = PostgresqlExtDatabase(None)


def server_default(value):
    """Field options that give a column `value` both in Python and as its SQL DEFAULT.

    Peewee's `default=` lives only in Python; the contract wants the DEFAULT in
    the DDL too, so that raw SQL inserts and the Go backend get it as well.
    """
    if isinstance(value, bool):
        literal = "true" if value else "false"
    elif isinstance(value, int):
        literal = str(value)
    elif isinstance(value, (list, dict)):
        literal = f"'{json.dumps(value)}'"
    else:
        literal = "'{}'".format(value.replace("'", "''"))
    python_default = type(value) if isinstance(value, (list, dict)) else value
    return {"default": python_default, "constraints": [SQL("DEFAULT " + literal)]}


class GormMetadata(Metadata):
    """Names a field's index idx_<table>_<column>, as GORM does (Peewee says <table>_<column>)."""

    def fields_to_index(self):
        field_indexes = [
            ModelIndex(
                self.model,
                (field,),
                unique=field.unique,
                name=f"idx_{self.table_name}_{field.column_name}",
            )
            for field in self.sorted_fields
            if (field.index or field.unique) and not field.primary_key
        ]
        return field_indexes + list(self.indexes)


class GormModel(Model):
    """GORM's gorm.Model: bigserial id, timestamps kept by save(), soft delete."""

    id = BigAutoField()
    created_at = DateTimeTZField(null=True)
    updated_at = DateTimeTZField(null=True)
    deleted_at = DateTimeTZField(null=True, index=True)

    class Meta:
        database = database
        model_metadata_class = GormMetadata

    @classmethod
    def select(cls, *fields):
        """Rows not soft-deleted; get(), get_by_id() and counts are built on this."""
        return super().select(*fields).where(cls.deleted_at.is_null())

    @classmethod
    def with_deleted(cls, *fields):
        """All rows, soft-deleted ones included."""
        return super().select(*fields)

    def save(self, force_insert=False, only=None):
        now = datetime.now(UTC)
        if force_insert or self._pk is None:
            self.created_at = self.created_at or now
        if "updated_at" in self._meta.fields:
            self.updated_at = now
        return super().save(force_insert=force_insert, only=only)

    def delete_instance(self, permanently=False, **kwargs):
        """Soft delete (sets deleted_at); permanently=True deletes the row."""
        if permanently:
            return super().delete_instance(**kwargs)
        self.deleted_at = datetime.now(UTC)
        return self._set_deleted_at(self.deleted_at)

    def restore(self):
        """Undo a soft delete."""
        self.deleted_at = None
        return self._set_deleted_at(None)

    def _set_deleted_at(self, value):
        cls = type(self)
        return cls.update(deleted_at=value).where(cls._meta.primary_key == self._pk).execute()


class User(GormModel):
    username = CharField(max_length=255, unique=True)
    email = CharField(max_length=255, unique=True)
    password_hash = CharField(max_length=255)
    quota = BigIntegerField(**server_default(10000))
    used_quota = BigIntegerField(**server_default(0))
    is_admin = BooleanField(**server_default(False))
    status = CharField(max_length=50, **server_default("active"))
    last_sign_in = DateTimeTZField(null=True)

    class Meta:
        table_name = "users"
        comment = "User accounts with authentication and quota management"


class ApiKey(GormModel):
    user = ForeignKeyField(User, constraint_name="fk_api_keys_user", backref="api_keys", index=True)
    key = CharField(max_length=255, unique=True)
    name = CharField(max_length=255)
    is_active = BooleanField(**server_default(True))
    rate_limit = BigIntegerField(**server_default(60))
    last_used_at = DateTimeTZField(null=True)

    class Meta:
        table_name = "api_keys"
        comment = "API keys for user authentication and rate limiting"


class ApiConfig(GormModel):
    name = CharField(max_length=255)
    type = CharField(max_length=50)
    base_url = TextField()
    api_key = TextField(null=True)
    # index=False: BinaryJSONField adds a GIN index by default; the contract has none.
    models = BinaryJSONField(index=False, **server_default([]))
    headers = BinaryJSONField(index=False, null=True, default=dict)
    is_active = BooleanField(**server_default(True))
    priority = BigIntegerField(**server_default(100))
    weight = BigIntegerField(**server_default(1))
    max_rps = BigIntegerField(**server_default(0))
    timeout = BigIntegerField(**server_default(30))

    class Meta:
        table_name = "api_configs"
        comment = "Third-party API provider configurations"


class LoadBalancerConfig(GormModel):
    model_name = CharField(max_length=255, index=True)
    strategy = CharField(max_length=50, **server_default("round_robin"))
    is_active = BooleanField(**server_default(True))

    class Meta:
        table_name = "load_balancer_configs"
        comment = "Load-balancing strategy per model"


class RequestLog(GormModel):
    updated_at = None  # logs are written once
    user = ForeignKeyField(
        User, constraint_name="fk_request_logs_user", backref="request_logs", index=True
    )
    api_key = ForeignKeyField(
        ApiKey, constraint_name="fk_request_logs_api_key", backref="request_logs", index=True
    )
    api_config_id = BigIntegerField(index=True)  # no FK: logs outlive configs
    model = CharField(max_length=255, index=True)
    method = CharField(max_length=10)
    path = TextField()
    status_code = BigIntegerField(index=True)
    response_time = BigIntegerField()  # milliseconds
    tokens_used = BigIntegerField(**server_default(0))
    error_msg = TextField(null=True)

    class Meta:
        table_name = "request_logs"
        comment = "API request logs for analytics and monitoring"


class SignInRecord(GormModel):
    updated_at = None  # a sign-in is never edited
    user = ForeignKeyField(
        User, constraint_name="fk_sign_in_records_user", backref="sign_ins", index=True
    )
    quota_awarded = BigIntegerField(**server_default(0))

    class Meta:
        table_name = "sign_in_records"
        comment = "Daily sign-in records for quota rewards"


MODELS = (User, ApiKey, ApiConfig, LoadBalancerConfig, RequestLog, SignInRecord)

PERFORMANCE_INDEXES = (
    User.index(User.status, name="idx_users_status", where=User.deleted_at.is_null()),
    User.index(User.is_admin, name="idx_users_is_admin", where=User.deleted_at.is_null()),
    ApiKey.index(
        ApiKey.user,
        ApiKey.is_active,
        name="idx_api_keys_user_active",
        where=ApiKey.deleted_at.is_null(),
    ),
    ApiConfig.index(
        ApiConfig.type,
        ApiConfig.is_active,
        name="idx_api_configs_type_active",
        where=ApiConfig.deleted_at.is_null(),
    ),
    ApiConfig.index(
        ApiConfig.priority.desc(),
        name="idx_api_configs_priority",
        where=ApiConfig.deleted_at.is_null() & (ApiConfig.is_active == SQL("true")),
    ),
    RequestLog.index(RequestLog.created_at.desc(), name="idx_request_logs_created_at"),
    RequestLog.index(
        RequestLog.user, RequestLog.created_at.desc(), name="idx_request_logs_user_created"
    ),
    RequestLog.index(
        RequestLog.model, RequestLog.created_at.desc(), name="idx_request_logs_model_created"
    ),
    SignInRecord.index(
        SignInRecord.user, SignInRecord.created_at.desc(), name="idx_sign_in_records_user_created"
    ),
)

for index in PERFORMANCE_INDEXES:
    index._model.add_index(index)
