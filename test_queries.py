"""
The indexes serve the queries the gateway and its admin pages run (bench.py's
GATEWAY_QUERIES), on about a hundred thousand request logs: no plan may scan
request_logs, but for the counts that read most of it.
"""

import json
from datetime import UTC, datetime, timedelta

import pytest

import bench
import models
import partition
from conftest import migrate_here


@pytest.fixture(scope="module")
def plans(test_database):
    """bench.explain() of every gateway query, on one database loaded for the module."""
    test_database.reset()
    migrate_here(test_database.params)
    bench.load_gateway_data(test_database.execute, request_logs=100_000)
    migrate_here(test_database.params)  # build back the request_logs indexes the load dropped
    test_database.execute("ANALYZE")
    assert test_database.value("SELECT count(*) FROM request_logs") == 100_000
    yield {name: bench.explain(test_database.execute, name) for name in bench.GATEWAY_QUERIES}
    models.database.close()


def test_gateway_queries_never_seq_scan_request_logs(plans):
    scanning = {
        name: plan[0]
        for name, plan in plans.items()
        if "request_logs" in plan[2] and name not in bench.TABLE_SCAN_QUERIES
    }
    assert scanning == {}


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("admin: today's request count", "idx_request_logs_created_at"),
        ("admin: logs page 3, newest first", "idx_request_logs_created_at"),
        ("admin: count of failed requests (>= 400)", "idx_request_logs_status_code"),
    ],
)
def test_admin_queries_use_the_created_at_and_status_code_indexes(plans, query, index):
    assert index in plans[query][3], plans[query][0]


# --- The partitioned layout -----------------------------------------------------------------


def scanned_relations(execute, name):
    """Every relation a gateway query's plan reads (partitions pruned at start-up are absent)."""
    sql = bench.GATEWAY_QUERIES[name]
    result = execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", bench.QUERY_PARAMS)[0][0]
    document = result if isinstance(result, list) else json.loads(result)
    nodes, stack = [], [document[0]["Plan"]]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack += node.get("Plans", [])
    return {n["Relation Name"] for n in nodes if "Relation Name" in n}


@pytest.fixture(scope="module")
def partitioned(test_database):
    """The gateway's data on a request_logs partitioned by month, three months of partitions."""
    test_database.reset()
    now = datetime.now(UTC)
    migrate_here(test_database.params, partition=True, now=now - timedelta(days=62))
    migrate_here(test_database.params, now=now - timedelta(days=31))
    bench.load_gateway_data(test_database.execute, request_logs=100_000)
    migrate_here(test_database.params)  # builds the indexes back: ON ONLY, per partition, attached
    test_database.execute("ANALYZE")
    explained = {name: bench.explain(test_database.execute, name) for name in bench.GATEWAY_QUERIES}
    yield test_database, explained, now
    models.database.close()


def test_gateway_queries_never_seq_scan_a_large_partition_of_request_logs(partitioned):
    db, explained, _ = partitioned
    large = {t for t in bench.large_tables(db.execute) if t.startswith("request_logs")}
    assert large  # the months that hold the logs
    scanning = {
        name: plan[0]
        for name, plan in explained.items()
        if set(plan[2]) & large and name not in bench.TABLE_SCAN_QUERIES
    }
    assert scanning == {}  # empty partitions (the default, next month) may be scanned


@pytest.mark.parametrize("query", ["a model's traffic, last hour", "admin: today's request count"])
def test_time_bounded_queries_read_no_older_month(partitioned, query):
    db, _, now = partitioned
    older = {
        partition.month_name(partition.add_months(partition.month_start(now), offset))
        for offset in (-2, -1)
    }
    relations = scanned_relations(db.execute, query)
    assert partition.month_name(partition.month_start(now)) in relations
    assert not relations & older, relations
