"""
The indexes serve the queries the gateway runs (bench.py's GATEWAY_QUERIES),
on about a hundred thousand request logs: no plan may scan request_logs.
"""

import bench
import migrate


def test_gateway_queries_never_seq_scan_request_logs(migrated_db):
    bench.load_gateway_data(migrated_db.execute, request_logs=100_000)
    migrate.migrate()  # build back the request_logs indexes the load dropped
    migrated_db.execute("ANALYZE")

    plans = {name: bench.explain(migrated_db.execute, name) for name in bench.GATEWAY_QUERIES}

    scanning = {name: plan[0] for name, plan in plans.items() if "request_logs" in plan[2]}
    assert scanning == {}
    assert migrated_db.value("SELECT count(*) FROM request_logs") == 100_000
