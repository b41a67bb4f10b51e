"""
Years on the partitioned layout, in a test: 36 simulated months of daily inserts, a deploy
run in most months, weekly retention, ALTERs by the application role and kill -9 at random
points, the tool's clock shifted (partition.CLOCK_SHIFT) as the months go by. After each
step: every row that should be there is, none older than the policy once a retention run
completes, this month and the next have their partition after a deploy, no dated row of a
month the layout keeps sits in the default partition after a deploy, and --check finds the
database matching.
"""

import random
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import psycopg2
import pytest

import migrate
import partition
from apply import Planner
from catalog import target_schema
from conftest import HERE, migrate_here
from test_online import add_users_and_logs
from test_partition_carry import app_role, as_role  # noqa: F401 (app_role: a fixture)

MONTHS = 36
RETAIN_DAYS = 90
LOGS_A_DAY = 2
SEED = 20
START = datetime(2031, 1, 3, 9, tzinfo=UTC)


class Life:
    """The simulated database's life: the clock the tool reads, the rows written, the checks."""

    def __init__(self, db, role):
        self.db, self.role = db, role
        self.random = random.Random(SEED)
        self.cutoff = None  # of the last retention run that completed
        self.written = []  # created_at of every log the application wrote
        self.columns = 0
        self.steps = []  # what happened, for the message of a failed check
        self.skipped = False  # whether this month had no deploy

    def at(self, moment):
        partition.CLOCK_SHIFT = moment - datetime.now(UTC)
        self.now = moment

    def run(self, **layout):
        migrate_here(self.db.params, **layout)

    def killed_run(self, *args):
        """migrate.py with these flags and the shifted clock, killed at a random moment of its
        run (a random delay, not a wait for a state: the point is an arbitrary point)."""
        shift = partition.CLOCK_SHIFT.total_seconds()
        code = (
            "import sys, datetime, partition, migrate;"
            f" partition.CLOCK_SHIFT = datetime.timedelta(seconds={shift!r});"
            f" sys.exit(migrate.main({list(args)!r}))"
        )
        run = subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=HERE,
            env={**__import__("os").environ, "DATABASE_URL": self.db.url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(self.random.uniform(0.2, 1.5))
        run.kill()
        run.wait(timeout=30)
        self.steps.append(f"{self.now:%Y-%m-%d %H:%M}: killed {' '.join(args)}")

    def write_days(self, first, days):
        """LOGS_A_DAY logs on each of `days` days from `first`, as the gateway writes them."""
        moments = [
            first + timedelta(days=day, hours=hour * 24 // LOGS_A_DAY)
            for day in range(days)
            for hour in range(LOGS_A_DAY)
        ]
        self.db.rows(
            "INSERT INTO request_logs (created_at, user_id, api_key_id, api_config_id, model,"
            " method, path, status_code, response_time)"
            " SELECT t, k.user_id, k.id, 1, 'm', 'POST', '/', 200, 5"
            " FROM unnest(%s::timestamptz[]) t, (SELECT * FROM api_keys LIMIT 1) k",
            moments,
        )
        self.written += moments

    def check(self, what, deployed=False):
        self.steps.append(f"{self.now:%Y-%m-%d %H:%M}: {what}")
        story = "; ".join(self.steps[-6:])
        db = self.db
        kept = [t for t in self.written if self.cutoff is None or t >= self.cutoff]
        present = db.value(
            "SELECT count(*) FROM request_logs WHERE created_at >= %s",
            self.cutoff or datetime(1, 1, 1, tzinfo=UTC),
        )
        assert present == len(kept), f"rows lost or added after {story}"
        if self.cutoff is not None:
            older = db.value("SELECT count(*) FROM request_logs WHERE created_at < %s", self.cutoff)
            assert older == 0, f"{older} rows older than the policy after {story}"
        if deployed:
            ranges = partition.partitions(self.snapshot())
            # Ready at least this month and next: the months ahead are made all at once
            # when next month lacks its partition (OPERATING.md).
            for offset in range(2):
                month = partition.add_months(partition.month_start(self.now), offset)
                assert partition.covered(ranges, month), f"{month:%Y-%m} missing after {story}"
            kept_months = db.value(
                "SELECT count(*) FROM ONLY request_logs_default d WHERE created_at IS NOT NULL"
                " AND EXISTS (SELECT 1 FROM pg_inherits h JOIN pg_class c ON c.oid = h.inhrelid"
                " WHERE h.inhparent = 'request_logs'::regclass AND c.relname = 'request_logs_'"
                " || to_char(d.created_at AT TIME ZONE 'UTC', 'YYYY_MM'))"
            )
            assert kept_months == 0, f"dated rows of kept months in the default after {story}"
        plan = Planner(now=self.now).read(target_schema())
        status = migrate.check_status(plan)
        assert status == migrate.EXIT_OK, f"--check exits {status} after {story}: " + "; ".join(
            [d.problem for d in plan.drift] + [s.sql for s in plan.pending]
        )

    def snapshot(self):
        from catalog import read_catalog

        migrate.connect(self.db.params)
        return read_catalog(target_schema())

    def alter_as_application(self):
        self.columns += 1
        app = as_role(self.db, self.role)
        with app.cursor() as cursor:
            cursor.execute(f"ALTER TABLE request_logs ADD COLUMN extra_{self.columns} bigint")
        app.close()


@pytest.fixture
def life(empty_db, app_role):  # noqa: F811 (the fixture imported above)
    add_users_and_logs(empty_db, logs=0)
    yield Life(empty_db, app_role)
    partition.CLOCK_SHIFT = timedelta(0)


def test_three_years_on_the_partitioned_layout_lose_no_row_and_keep_matching(life):
    life.at(START)
    life.write_days(START - timedelta(days=200), 200)  # the plain table's past
    life.run(partition=True)
    life.check("converted", deployed=True)
    for offset in range(MONTHS):
        month = partition.add_months(partition.month_start(START), offset + 1)
        # A deploy in most months, never two months missed in a row (the upkeep of a
        # deploy makes this month and the next).
        life.skipped = not life.skipped and life.random.random() < 0.2
        kill_deploy = life.random.random() < 0.15
        kill_retention = life.random.randrange(12)  # a week of this month, one time in three
        life.at(month + timedelta(hours=3))
        if not life.skipped:
            if kill_deploy:
                life.killed_run()
            life.run()  # the same flags finish what the killed run left
            life.check("deploy run", deployed=True)
        if life.random.random() < 0.2:
            life.alter_as_application()
            life.check("the application added a column")
        days = (partition.add_months(month, 1) - month).days
        for week, first in enumerate(range(0, days, 7)):
            start = month + timedelta(days=first)
            life.write_days(start, min(7, days - first))
            life.check("a week of logs")
            life.at(start + timedelta(days=min(7, days - first), hours=-1))
            if week == kill_retention:
                life.killed_run("--retain-request-logs", str(RETAIN_DAYS))
            life.run(retain_days=RETAIN_DAYS)
            life.cutoff = life.now - timedelta(days=RETAIN_DAYS)
            life.check("retention")
    assert life.now > START + timedelta(days=365 * 3 - 31)
    assert len([step for step in life.steps if "killed" in step]) >= 5
    with pytest.raises(psycopg2.errors.UndefinedTable):
        life.db.rows("SELECT 1 FROM request_logs_legacy")  # its months retained away
