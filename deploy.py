"""
A deploy in two stages: what the application needs to run correctly, before the rollout;
the long work (index builds, validations, partition upkeep), in a job after it.

Usage::

    from deploy import before_rollout

    needed, deferred = before_rollout(plan)   # --pre-deploy runs `needed`
    deferred                                  # the statements --post-deploy makes

What the gateway needs for correctness, and so what --pre-deploy makes:

- tables and columns: a query naming a missing one fails;
- foreign keys, NOT VALID: they check every row written from then on, which is what
  correctness needs; validating the older rows (VALIDATE CONSTRAINT) only proves
  what was already true, and can wait;
- the contract's unique indexes: each is a constraint, not a speed-up (without
  idx_users_email two users can register one address, and nothing removes the
  duplicate later, after which the build fails). They are built CONCURRENTLY, so
  writers never wait, however long the build takes;
- the default partition of a partitioned request_logs: without it (and without this
  month's partition) an insert fails. This month's own partition is not needed: its
  rows land in the default partition, which upkeep moves them out of later.

Everything else (non-unique index builds, VALIDATE CONSTRAINT, partition upkeep, the
conversion to partitions) is left to --post-deploy, which is a plain run: it makes the
rest, and a job stopped part way is resumed by the next, as any run is.
"""

from models import MODELS, RequestLog
from plan import index_columns, unique_constraint_for

# A step a partitioned request_logs needs before any insert can succeed.
DEFAULT_PARTITION_STEP = f"attach {RequestLog._meta.table_name}_default"
NEEDED_EFFECTS = ("index", "dropped")  # a unique index built, or its invalid husk dropped first


def unique_indexes(models=MODELS):
    """{name: (table, peewee Index)} of the contract's unique indexes."""
    return {
        index._name: (model._meta.table_name, index)
        for model in models
        for index in model._meta.fields_to_index()
        if index._unique
    }


def unique_index_names(models=MODELS):
    return set(unique_indexes(models))


def uniqueness_missing(plan, models=MODELS):
    """Lines for each contract unique index that no run builds (drift: its name held by
    another relation, another definition) and that no UNIQUE constraint stands in for."""
    unique = unique_indexes(models)
    missing = []
    for drift in plan.drift:
        kind, table, name = drift.key
        if kind == "index" and name in unique and not unique_elsewhere(plan, table, name, unique):
            missing.append(f"unique index {name} is missing and no run builds it ({drift.problem})")
    return missing


def unique_elsewhere(plan, table, name, unique):
    """Whether the columns are unique all the same: a UNIQUE constraint on them, or the index
    of that name, valid and unique on them though it differs otherwise (a collation)."""
    index = unique[name][1]
    live = plan.snapshot.indexes.get(name)
    if live is not None and live.table == table and live.unique and live.valid:
        return tuple(key.column for key in live.keys) == tuple(index_columns(index))
    return unique_constraint_for(index, table, plan.snapshot) is not None


def needed(statement, unique):
    """Whether the application needs this online statement's effect to be correct."""
    kind, _table, name = statement.effect
    return kind in NEEDED_EFFECTS and name in unique


def before_rollout(plan, models=MODELS):
    """(plan with only what the application needs, [statements left for --post-deploy]).

    The transaction stage stays whole: tables, columns, NOT VALID foreign keys, comments and
    the indexes of tables made in it (empty, so built at once)."""
    unique = unique_index_names(models)
    online = [s for s in plan.online if needed(s, unique)]
    steps = [step for step in plan.steps if step.name == DEFAULT_PARTITION_STEP]
    deferred = [s for s in plan.online if s not in online]
    deferred += [s for step in plan.steps if step not in steps for s in step.statements]
    # Another session building a unique index: the application needs it, so the stage waits.
    in_progress = [i for i in plan.in_progress if any(i.startswith(f"index {n} ") for n in unique)]
    in_progress += uniqueness_missing(plan, models)
    return plan._replace(online=online, steps=steps, in_progress=in_progress), deferred
