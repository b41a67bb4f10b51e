"""
The API aggregator's PostgreSQL schema, declared as Peewee models that behave
like the Go backend's GORM models.

The models make the schema the Go backend's GORM AutoMigrate made (SCHEMA.md
describes it; test_migrate.py holds it exactly): the same columns,
database-level defaults, constraint names and index names. Nothing is
connected at import time; bind the database from the DATABASE_URL migrate.py
reads (or database.init(...) by hand)::

    from models import bind_from_url, User

    bind_from_url()                           # DATABASE_URL, as migrate.py parses it
    alice = User.create(username='alice', email='a@example.com',
                        password_hash='...')
    User.update(status='banned').where(User.id == alice.id).execute()  # sets updated_at
    alice.delete_instance()                   # soft delete: sets deleted_at
    User.select().count()                     # 0: soft-deleted rows are hidden
    User.with_deleted().count()               # 1
    alice.restore()                           # visible again
    User.delete().where(User.id == alice.id).execute()   # soft delete too
    User.delete_permanently().where(User.id == alice.id).execute()  # really deleted

What GORM does, the models do, in bulk queries too (MODELS.md has the table
of GORM call and Peewee call): select() hides soft-deleted rows of every table
it reads, however the query is chained; update() sets updated_at and skips
soft-deleted rows (update_columns() leaves updated_at alone); delete() and
delete_by_id() soft-delete; insert(), insert_many() and bulk_create() stamp
created_at and updated_at; first() orders by the primary key; an update or
delete without a WHERE is refused unless .all_rows() says it is meant.
Connections run in UTC, as the Go backend's day boundaries do, and timestamp
fields refuse naive datetimes.

``MODELS`` lists the models in creation order and ``PERFORMANCE_INDEXES``
the hand-picked indexes the Go script added; both are attached to the models,
so ``Model._meta.fields_to_index()`` yields every index of a table.
"""

import json
import operator
from datetime import UTC, datetime, timedelta
from functools import reduce

from peewee import (
    JOIN,
    SQL,
    BigAutoField,
    BigIntegerField,
    BooleanField,
    CharField,
    ForeignKeyField,
    Join,
    Metadata,
    Model,
    ModelAlias,
    ModelDelete,
    ModelIndex,
    ModelInsert,
    ModelSelect,
    ModelUpdate,
    Node,
    TextField,
    classmethod_only,
    database_required,
)
from playhouse.postgres_ext import BinaryJSONField, DateTimeTZField

# The database lives in connection.py, the one module of ours this one imports;
# importing it from here stays the way to reach it.
from connection import DatabaseUrlError, bind_from_url, database  # noqa: F401 - re-exported

# --- Time: UTC, as the Go backend's days ---------------------------------------------


def utc_now():
    return datetime.now(UTC)


def utc_day_bounds(moment=None):
    """[start, end) of the UTC day holding `moment` (default: now), the Go backend's "today".

    A naive `moment` is taken as UTC, as the database sessions take it.
    """
    moment = moment or utc_now()
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    start = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    return start, start + timedelta(days=1)


# --- Fields ------------------------------------------------------------------------


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


class UtcDateTimeField(DateTimeTZField):
    """timestamptz that refuses a naive datetime: it would be read in whatever zone the reader assumes."""

    def db_value(self, value):
        value = super().db_value(value)
        if isinstance(value, datetime) and value.tzinfo is None:
            raise ValueError(
                f"{self.model.__name__}.{self.name} got a naive datetime ({value}):"
                " pass an aware one, e.g. datetime.now(UTC) or models.utc_day_bounds()"
            )
        return value


class JSONBField(BinaryJSONField):
    """jsonb that reads NULL as an empty list or dict, as Go reads it into a nil slice or map."""

    def __init__(self, empty, **kwargs):
        self.empty = empty
        # index=False: BinaryJSONField adds a GIN index by default; the contract has none.
        super().__init__(index=False, **kwargs)

    def python_value(self, value):
        return self.empty() if value is None else value


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


# --- Queries that behave as GORM's ------------------------------------------------


class MissingWhereError(ValueError):
    """An UPDATE or DELETE without a WHERE, not marked .all_rows() (GORM's ErrMissingWhereClause)."""


def deleted_at_guard(source):
    """`deleted_at IS NULL` for a source that soft-deletes (a model or an alias of one), else None."""
    model = source.model if isinstance(source, ModelAlias) else source
    if isinstance(model, type) and issubclass(model, Model) and "deleted_at" in model._meta.fields:
        return source.deleted_at.is_null()
    return None


def conjunction(*conditions):
    present = [condition for condition in conditions if condition is not None]
    return reduce(operator.and_, present) if present else None


def guard_source(source, where_guards):
    """`source` with `deleted_at IS NULL` in the ON clause of each soft-deleting table it joins.

    The guards of the tables it reads without an ON clause (the first table,
    cross joins) are appended to where_guards.
    """
    if not isinstance(source, Join):
        where_guards.append(deleted_at_guard(source))
        return source
    joined = source.clone()
    joined.lhs = guard_source(source.lhs, where_guards)
    guard = deleted_at_guard(source.rhs)
    if source.join_type == JOIN.CROSS:
        where_guards.append(guard)
    else:
        joined._on = conjunction(source._on, guard)
    return joined


class SoftDeleteSelect(ModelSelect):
    """A SELECT that leaves out the soft-deleted rows of every table it reads.

    The conditions are added when the SQL is generated, not when the query is
    built, so nothing chained (orwhere, from_, join, alias, a union) can
    loosen them: tables in FROM get `deleted_at IS NULL` ANDed to the WHERE,
    joined tables get it in their ON clause, as GORM's Joins does (a LEFT
    JOIN keeps the row and attaches no soft-deleted one). with_deleted() turns
    them all off, as GORM's Unscoped.
    """

    _with_deleted = False

    @Node.copy
    def with_deleted(self):
        self._with_deleted = True

    @database_required
    def first(self, database, n=1):
        """The first n rows by primary key, as GORM's First (get() is GORM's Take: no order)."""
        key = getattr(self.model, self.model._meta.primary_key.name)
        return super(SoftDeleteSelect, self.order_by_extend(key)).first(database, n)

    @database_required
    def scalar(self, database, as_tuple=False, as_dict=False):
        # One value, as GORM's Scan: no ORDER BY, which first() would add (and
        # which an aggregate without GROUP BY cannot have).
        query = self.dicts() if as_dict else self.tuples()
        row = super(SoftDeleteSelect, query).first(database)
        return row if as_dict or as_tuple or not row else row[0]

    def __sql__(self, ctx):
        if self._with_deleted:
            return super().__sql__(ctx)
        # Node.clone, not clone(): the copy keeps the query's hash, so the
        # alias manager names it as it names the query.
        rendered = Node.clone(self)
        where_guards = []
        rendered._from_list = [guard_source(source, where_guards) for source in self._from_list]
        rendered._where = conjunction(self._where, *where_guards)
        return super(SoftDeleteSelect, rendered).__sql__(ctx)


class GormAlias(ModelAlias):
    """Model.alias() of a soft-deleting model: its selects hide soft-deleted rows too."""

    def select(self, *selection):
        return SoftDeleteSelect(self, selection or self.get_field_aliases())

    def with_deleted(self, *selection):
        return self.select(*selection).with_deleted()


class GuardedWrite:
    """What GORM adds to an UPDATE or DELETE.

    The query is refused without a WHERE, unless all_rows() says the whole
    table is meant, and soft-deleted rows are left alone unless with_deleted().
    """

    verb = None  # the call that made the query, for the error message
    _all_rows = False
    _with_deleted = False

    @Node.copy
    def all_rows(self):
        self._all_rows = True

    @Node.copy
    def with_deleted(self):
        self._with_deleted = True

    def guarded_where(self):
        if self._where is None and not self._all_rows:
            table = self.model._meta.table_name
            raise MissingWhereError(
                f"{self.verb} on {table} without a WHERE would change every row:"
                " add .where(...), or call .all_rows() if that is meant"
            )
        return conjunction(
            self._where, None if self._with_deleted else deleted_at_guard(self.model)
        )


class GormUpdate(GuardedWrite, ModelUpdate):
    """GORM's Update: sets updated_at unless given, skips soft-deleted rows unless with_deleted()."""

    verb = "update()"

    def assignments(self):
        values = dict(self._update)
        if "updated_at" in self.model._meta.fields:
            values.setdefault(self.model.updated_at, utc_now())
        return values

    def __sql__(self, ctx):
        rendered = Node.clone(self)
        rendered._update = self.assignments()
        rendered._where = self.guarded_where()
        return super(GormUpdate, rendered).__sql__(ctx)


class ColumnUpdate(GormUpdate):
    """GORM's UpdateColumn(s): as update(), but updated_at is left alone."""

    verb = "update_columns()"

    def assignments(self):
        return dict(self._update)


class SoftDelete(ColumnUpdate):
    """GORM's Delete of a soft-deleting model: sets deleted_at on the rows not deleted yet."""

    verb = "delete()"

    def assignments(self):
        return {self.model.deleted_at: utc_now()}


class PermanentDelete(GuardedWrite, ModelDelete):
    """GORM's Unscoped().Delete: DELETE, soft-deleted rows included."""

    verb = "delete_permanently()"
    _with_deleted = True

    def __sql__(self, ctx):
        rendered = Node.clone(self)
        rendered._where = self.guarded_where()
        return super(PermanentDelete, rendered).__sql__(ctx)


class GormInsert(ModelInsert):
    """GORM's Create: rows that leave out created_at (and updated_at) get the statement's time."""

    def get_default_data(self):
        now = utc_now()
        fields = self.model._meta.fields
        stamps = {fields[name]: now for name in ("created_at", "updated_at") if name in fields}
        return {**stamps, **super().get_default_data()}


# --- The models ------------------------------------------------------------------


class GormModel(Model):
    """GORM's gorm.Model: bigserial id, timestamps, soft delete, in every kind of query."""

    id = BigAutoField()
    created_at = UtcDateTimeField(null=True)
    updated_at = UtcDateTimeField(null=True)
    deleted_at = UtcDateTimeField(null=True, index=True)

    class Meta:
        database = database
        model_metadata_class = GormMetadata

    @classmethod
    def select(cls, *fields):
        """Rows not soft-deleted; get(), get_by_id(), counts and joins are built on this."""
        return SoftDeleteSelect(cls, fields or cls._meta.sorted_fields, is_default=not fields)

    @classmethod
    def with_deleted(cls, *fields):
        """All rows, soft-deleted ones included (GORM's Unscoped)."""
        return cls.select(*fields).with_deleted()

    @classmethod
    def alias(cls, alias=None):
        return GormAlias(cls, alias)

    @classmethod
    def update(cls, data=None, /, **update):
        return GormUpdate(cls, cls._normalize_data(data, update))

    @classmethod
    def update_columns(cls, data=None, /, **update):
        """update() without touching updated_at, as GORM's UpdateColumn(s)."""
        return ColumnUpdate(cls, cls._normalize_data(data, update))

    @classmethod_only
    def delete(cls):
        """Soft delete: UPDATE ... SET deleted_at; delete_by_id() is built on this."""
        return SoftDelete(cls, {})

    @classmethod
    def delete_permanently(cls):
        """DELETE, soft-deleted rows included."""
        return PermanentDelete(cls)

    @classmethod
    def insert(cls, data=None, /, **insert):
        return GormInsert(cls, cls._normalize_data(data, insert))

    @classmethod
    def insert_many(cls, rows, fields=None):
        return GormInsert(cls, insert=rows, columns=fields)

    @classmethod
    def bulk_create(cls, model_list, batch_size=None):
        """As Peewee's, with created_at and updated_at set on instances that have none."""
        model_list = list(model_list)
        now = utc_now()
        for instance in model_list:
            instance.created_at = instance.created_at or now
            if "updated_at" in cls._meta.fields:
                instance.updated_at = instance.updated_at or now
        return super().bulk_create(model_list, batch_size)

    def save(self, force_insert=False, only=None):
        """As Peewee's, setting created_at on insert and updated_at always, even with only=."""
        now = utc_now()
        if force_insert or self._pk is None:
            self.created_at = self.created_at or now
        if "updated_at" in self._meta.fields:
            self.updated_at = now
            if only is not None:
                only = [*only, type(self).updated_at]
        return super().save(force_insert=force_insert, only=only)

    def delete_instance(self, permanently=False):
        """Soft delete, once: a row already deleted keeps its deleted_at. Returns the rows changed.

        permanently=True deletes the row. (No recursive=: GORM's Delete does not
        cascade either; delete dependent rows first.)
        """
        cls = type(self)
        if permanently:
            return cls.delete_permanently().where(self._pk_expr()).execute()
        now = utc_now()
        rows = cls.update_columns(deleted_at=now).where(self._pk_expr()).execute()
        if rows:
            self.deleted_at = now
        return rows

    def restore(self):
        """Undo a soft delete."""
        cls = type(self)
        rows = cls.update_columns(deleted_at=None).with_deleted().where(self._pk_expr()).execute()
        self.deleted_at = None
        return rows


class User(GormModel):
    username = CharField(max_length=255, unique=True)
    email = CharField(max_length=255, unique=True)
    password_hash = CharField(max_length=255)
    quota = BigIntegerField(**server_default(10000))
    used_quota = BigIntegerField(**server_default(0))
    is_admin = BooleanField(**server_default(False))
    status = CharField(max_length=50, **server_default("active"))
    last_sign_in = UtcDateTimeField(null=True)

    class Meta:
        table_name = "users"
        comment = "User accounts with authentication and quota management"


class ApiKey(GormModel):
    user = ForeignKeyField(User, constraint_name="fk_api_keys_user", backref="api_keys", index=True)
    key = CharField(max_length=255, unique=True)
    name = CharField(max_length=255)
    is_active = BooleanField(**server_default(True))
    rate_limit = BigIntegerField(**server_default(60))
    last_used_at = UtcDateTimeField(null=True)

    class Meta:
        table_name = "api_keys"
        comment = "API keys for user authentication and rate limiting"


class ApiConfig(GormModel):
    name = CharField(max_length=255)
    type = CharField(max_length=50)
    base_url = TextField()
    # '' in Python only: the Go side writes '' for an unset string; the DDL has no DEFAULT.
    api_key = TextField(null=True, default="")
    models = JSONBField(list, **server_default([]))
    headers = JSONBField(dict, null=True, default=dict)
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
    error_msg = TextField(null=True, default="")  # as api_configs.api_key

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
