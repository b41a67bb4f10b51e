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

# A step a partitioned request_logs needs before any insert can succeed.
DEFAULT_PARTITION_STEP = f"attach {RequestLog._meta.table_name}_default"
NEEDED_EFFECTS = ("index", "dropped")  # a unique index built, or its invalid husk dropped first


def unique_index_names(models=MODELS):
    return {
        index._name for model in models for index in model._meta.fields_to_index() if index._unique
    }


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
    return plan._replace(online=online, steps=steps, in_progress=in_progress), deferred
