"""
The indexes serve the queries the gateway and its admin pages run (bench.py's
GATEWAY_QUERIES), on about a hundred thousand request logs: no plan may scan
request_logs, but for the counts that read most of it.
"""

import pytest

import bench
import models
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
