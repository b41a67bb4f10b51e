"""
The settings a run gives its sessions, read from the server's side.

An event trigger on ddl_command_start records, for every DDL statement the
server starts, the settings the statement runs under (pg_settings, so that
timeouts read in milliseconds). Each is compared with what --dry-run printed
before that statement: the guards a dry run shows are the guards that run, in
every mode and stage (transaction, online, steps, --atomic). The database's
own settings are hostile (short timeouts, another TimeZone, quoted
identifiers), so that a setting left to them shows.
"""

import re

import pytest

from conftest import run_migrate
from test_evolve import break_partly
from test_partitions import INSERT_LOG, seed_keys

RECORDED = (
    "statement_timeout",
    "lock_timeout",
    "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    "client_connection_check_interval",
    "transaction_timeout",
    "search_path",
    "TimeZone",
    "quote_all_identifiers",
    "client_encoding",
)
# What a role or database might set: each would show if a run left it in place.
HOSTILE = {
    "statement_timeout": "'7s'",
    "lock_timeout": "'7s'",
    "idle_in_transaction_session_timeout": "'7s'",
    "idle_session_timeout": "'7s'",
    "TimeZone": "'Asia/Tokyo'",
    "quote_all_identifiers": "on",
}


def record_settings(db):
    """audit.settings_log: each DDL statement the server starts, with its session's settings."""
    db.rows("CREATE SCHEMA audit")
    db.rows("CREATE TABLE audit.settings_log (n serial, query text, settings jsonb)")
    names = ", ".join(f"'{name}'" for name in RECORDED)
    db.rows(
        f"""
        CREATE FUNCTION audit.log_settings() RETURNS event_trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO audit.settings_log (query, settings)
            SELECT current_query(), jsonb_object_agg(name, setting)
            FROM pg_catalog.pg_settings WHERE name IN ({names});
        END $$
        """
    )
    db.rows(
        "CREATE EVENT TRIGGER record_settings ON ddl_command_start"
        " EXECUTE FUNCTION audit.log_settings()"
    )


def printed_settings(dry_run):
    """{statement: {setting: value}} from --dry-run's output: the SET and SET LOCAL lines in
    force where each statement is printed, as pg_settings spells them."""
    session, local, found = {}, {}, {}
    for line in dry_run.splitlines():
        if line.startswith("--"):
            continue
        statement = line.rstrip(";")
        words = statement.split()
        if words[:1] == ["BEGIN"] or words[:1] == ["COMMIT"]:
            local = {}
        elif words[:2] == ["SET", "LOCAL"]:
            name, value = setting_of(words[2:])
            local[name] = value
        elif words[:1] == ["SET"]:
            name, value = setting_of(words[1:])
            session[name] = value
        elif words[:1] == ["RESET"]:
            session.pop(words[1], None)
        elif words[:1] in (["CREATE"], ["ALTER"], ["COMMENT"], ["DROP"], ["DELETE"]):
            found[without_cutoff(statement)] = {**session, **local}
    return found


def without_cutoff(statement):
    """Retention's DELETE names its cutoff to the second: the dry run and the run a second
    apart print different ones."""
    return re.sub(r"'\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\+00'", "'CUTOFF'", statement)


def setting_of(words):
    """['lock_timeout', '=', "'50ms'"] -> ('lock_timeout', '50');
    ['search_path', 'TO', '"public",', 'pg_temp'] -> ('search_path', 'public, pg_temp')."""
    name, value = words[0], " ".join(words[2:]).replace('"', "").strip("'")
    if value.endswith("ms"):
        value = value.removesuffix("ms")
    return name.lower() if name != "TimeZone" else name, value


def settings_at_each_ddl(db, url, *args):
    """Run migrate.py with --dry-run, then for real; returns (printed, recorded) settings."""
    dry_run = run_migrate(url, "--dry-run", *args)
    assert dry_run.returncode == 0, dry_run.stderr
    printed = printed_settings(dry_run.stdout)
    db.rows("TRUNCATE audit.settings_log")
    run = run_migrate(url, *args)
    assert run.returncode == 0, run.stderr
    recorded = db.rows("SELECT query, settings FROM audit.settings_log ORDER BY n")
    assert recorded, "the run started no DDL statement"
    return printed, recorded


def assert_every_statement_ran_under_its_printed_settings(printed, recorded):
    for query, settings in recorded:
        query = without_cutoff(query)
        assert query in printed, f"a statement --dry-run did not print: {query}"
        expected = printed[query]
        # Every statement is bounded by timeouts the dry run shows, none of the database's.
        assert "statement_timeout" in expected and "lock_timeout" in expected, query
        for name, value in expected.items():
            live = settings[name].replace('"', "") if name == "search_path" else settings[name]
            assert live == value, (query, name, live, value)
        assert settings["idle_session_timeout"] == "0", query
        assert settings["client_connection_check_interval"] == "1000", query
        assert settings["client_encoding"] == "UTF8", query


@pytest.fixture
def hostile_database(migrated_db, database_setting):
    for name, value in HOSTILE.items():
        database_setting(name, value)
    record_settings(migrated_db)
    return migrated_db


def test_a_plain_run_runs_each_statement_under_the_settings_dry_run_prints(hostile_database):
    break_partly(hostile_database)
    printed, recorded = settings_at_each_ddl(hostile_database, hostile_database.url)
    assert_every_statement_ran_under_its_printed_settings(printed, recorded)
    timeouts = {(s["statement_timeout"], s["lock_timeout"]) for _, s in recorded}
    # The transaction's 10 s guard and 50 ms attempts, then the online stage's flags.
    assert timeouts == {("10000", "50"), ("0", "5000")}


@pytest.mark.parametrize("seconds", ["600", "0"])
def test_atomic_runs_every_statement_under_the_statement_timeout_it_was_given(
    hostile_database, seconds
):
    break_partly(hostile_database)
    printed, recorded = settings_at_each_ddl(
        hostile_database, hostile_database.url, "--atomic", "--statement-timeout", seconds
    )
    assert_every_statement_ran_under_its_printed_settings(printed, recorded)
    assert {s["statement_timeout"] for _, s in recorded} == {str(int(seconds) * 1000)}
    assert {s["TimeZone"] for _, s in recorded} == {"UTC"}


def test_the_conversion_steps_run_under_the_settings_dry_run_prints(hostile_database):
    seed_keys(hostile_database)
    for days in range(0, 70, 7):
        hostile_database.rows(INSERT_LOG.format(created_at=f"now() - interval '{days} days'"))
    printed, recorded = settings_at_each_ddl(
        hostile_database,
        hostile_database.url,
        "--partition-request-logs",
        "--statement-timeout",
        "120",
    )
    assert_every_statement_ran_under_its_printed_settings(printed, recorded)
    timeouts = {(s["statement_timeout"], s["lock_timeout"]) for _, s in recorded}
    assert ("120000", "5000") in timeouts  # the online steps
    assert ("10000", "50") in timeouts  # the transaction steps


def test_retention_deletes_under_the_settings_dry_run_prints(hostile_database):
    # DELETE starts no event trigger: a statement trigger on request_logs records it.
    names = ", ".join(f"'{name}'" for name in RECORDED)
    hostile_database.rows(
        f"""
        CREATE FUNCTION audit.log_delete() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO audit.settings_log (query, settings)
            SELECT current_query(), jsonb_object_agg(name, setting)
            FROM pg_catalog.pg_settings WHERE name IN ({names});
            RETURN NULL;
        END $$
        """
    )
    hostile_database.rows(
        "CREATE TRIGGER log_delete AFTER DELETE ON request_logs"
        " FOR EACH STATEMENT EXECUTE FUNCTION audit.log_delete()"
    )
    seed_keys(hostile_database)
    for days in (1, 100, 200):
        hostile_database.rows(INSERT_LOG.format(created_at=f"now() - interval '{days} days'"))

    printed, recorded = settings_at_each_ddl(
        hostile_database, hostile_database.url, "--retain-request-logs", "30"
    )

    assert [q.split()[0] for q, _ in recorded] == ["DELETE", "DELETE"]  # a batch, then none left
    assert_every_statement_ran_under_its_printed_settings(printed, recorded)
    assert {(s["statement_timeout"], s["lock_timeout"]) for _, s in recorded} == {("0", "5000")}
    assert hostile_database.value("SELECT count(*) FROM request_logs") == 1
