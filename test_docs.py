"""
The documents say what the code does: SCHEMA.md is the contract the tests
check, every sample output in OPERATING.md is what migrate.py prints (its JSON
example too), and the README is a door of at most 12 KB that links the rest.

A sample is a code block right after a `<!-- sample: SCENARIO -->`
comment. It starts with the command (`$ python migrate.py FLAGS`, optionally
followed by `; echo "exit $?"`), then the output as a terminal shows it:
lines starting with `migrate: ` are stderr, the others stdout, and a closing
`exit N` line is the exit code. A line `...` stands for any number of lines
of the same stream. SCENARIOS below prepares the database for each one.

The test runs the command against the test database and compares, after
replacing elapsed times by `N.NN s` and the test database's connection by
the README's DATABASE_URL, and leaving out the `transaction_timeout` lines
that PostgreSQL 17 and later add. When an output changes on purpose, the failure
message shows the real stderr and stdout, normalised, ready to paste into the
document (`pytest test_docs.py -k sample`): put the lines in the order the
terminal shows them (today: the first stderr line, stdout, the rest of
stderr) and keep `...` where the README leaves lines out. A new sample needs
its scenario in SCENARIOS.
"""

import ast
import json
import re
import shlex

import pytest

from conftest import HERE, TESTED_VERSIONS, run_migrate
from connection import connection_params, describe
from test_migrate import (
    EXPECTED_COLUMNS,
    EXPECTED_COMMENTS,
    EXPECTED_CONSTRAINTS,
    EXPECTED_INDEXES,
    indexdef,
)

SCHEMA_MD = (HERE / "SCHEMA.md").read_text()


def table_sections(text):
    """{table: its section's text} for each '### table' heading."""
    parts = re.split(r"^### (\w+)\n", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def table_rows(section):
    """The cells of each row of the Markdown tables in section, header and rule left out."""
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip().strip("`") for cell in row] for row in rows[1:] if row[0].strip()]


def test_schema_md_lists_every_column_as_the_contract_has_it():
    documented = {
        table: [
            (name, type_, null == "not null", default or None)
            for name, type_, null, default, _ in table_rows(section.split("\n## ")[0])
        ]
        for table, section in table_sections(SCHEMA_MD).items()
    }
    assert documented == EXPECTED_COLUMNS


def test_schema_md_gives_each_table_its_comment():
    sections = table_sections(SCHEMA_MD)
    for table, comment in EXPECTED_COMMENTS:
        assert sections[table].strip().startswith(comment + ".")


def test_schema_md_lists_the_32_indexes_exactly():
    documented = re.findall(r"^CREATE (?:UNIQUE )?INDEX .*$", SCHEMA_MD, flags=re.MULTILINE)
    expected = [indexdef(*index)[2] for index in EXPECTED_INDEXES]
    assert len(documented) == 32
    assert sorted(documented) == sorted(expected)


def test_schema_md_names_every_foreign_key():
    section = SCHEMA_MD.split("## Constraints")[1].split("\n## ")[0]
    documented = [tuple(row) for row in table_rows(section) if row[1].startswith("fk_")]
    expected = [(table, name, definition) for table, name, kind, definition in EXPECTED_CONSTRAINTS]
    assert sorted(documented) == [row for row in expected if row[1].startswith("fk_")]


# --- README samples ---------------------------------------------------------------

README = (HERE / "README.md").read_text()
OPERATING = (HERE / "OPERATING.md").read_text()
SAMPLE = re.compile(r"<!-- sample: (\S+) -->\n```[^\n]*\n(.*?)```", re.DOTALL)
JSON_SAMPLE = re.compile(r"<!-- json-sample: (\S+) -->\n```json\n(.*?)```", re.DOTALL)
ELAPSED = re.compile(r"\d+\.\d+ s\b")
BEHIND = ["ALTER TABLE users DROP COLUMN last_sign_in", "DROP INDEX idx_request_logs_model_created"]
SCENARIOS = {
    "fresh": [],
    "up-to-date": ["MIGRATE"],
    "behind": ["MIGRATE", *BEHIND],
    "drift": [
        "MIGRATE",
        *BEHIND,
        "ALTER TABLE api_keys ALTER COLUMN rate_limit TYPE integer",
        "ALTER TABLE api_keys RENAME CONSTRAINT fk_api_keys_user TO api_keys_user_id_fkey",
        "CREATE TABLE audit_trail (id bigint)",
    ],
}


def readme_samples():
    return [
        pytest.param(scenario, body, id=scenario) for scenario, body in SAMPLE.findall(OPERATING)
    ]


def readme_database_url():
    return re.search(r'^export DATABASE_URL="(.*)"$', README, flags=re.MULTILINE).group(1)


def parse_sample(body):
    """The command's arguments, the expected stderr and stdout lines, and the exit code (or None)."""
    command, *lines = body.rstrip("\n").split("\n")
    command, _, echo = command.removeprefix("$ ").partition(";")
    args = shlex.split(command)[2:]  # after "python migrate.py"
    exit_code = int(lines.pop().removeprefix("exit ")) if echo else None
    streams = {"stderr": [], "stdout": []}
    for index, line in enumerate(lines):
        if line == "...":  # the stream of the line before it (of the line after, at the start)
            line_of_stream = lines[index - 1] if index else lines[index + 1]
        else:
            line_of_stream = line
        streams["stderr" if line_of_stream.startswith("migrate: ") else "stdout"].append(line)
    return args, streams["stderr"], streams["stdout"], exit_code


def prepare(db, scenario):
    for statement in SCENARIOS[scenario]:
        if statement == "MIGRATE":
            assert run_migrate(db.url).returncode == 0
        else:
            db.rows(statement)


def as_in_readme(output, db):
    """Real output with elapsed times and the test database's connection as the README shows them."""
    shown = describe(connection_params(readme_database_url()))
    output = output.replace(describe(connection_params(db.url)), shown)
    lines = ELAPSED.sub("N.NN s", output).splitlines()
    return [line for line in lines if "transaction_timeout" not in line]


def matches(sample, real):
    """Whether real lines are the sample's, each `...` line of the sample standing for any lines."""
    chunks = [[]]
    for line in sample:
        if line == "...":
            chunks.append([])
        else:
            chunks[-1].append(ELAPSED.sub("N.NN s", line))
    if len(chunks) == 1:
        return chunks[0] == real
    first, *middle, last = chunks
    start, end = len(first), len(real) - len(last)
    if start > end or real[:start] != first or real[end:] != last:
        return False
    for chunk in middle:
        found = next(
            (i for i in range(start, end - len(chunk) + 1) if real[i : i + len(chunk)] == chunk),
            None,
        )
        if found is None:
            return False
        start = found + len(chunk)
    return True


def test_operating_has_the_samples_this_test_knows():
    assert sorted({scenario for scenario, _ in SAMPLE.findall(OPERATING)}) == sorted(SCENARIOS)


def test_readme_is_a_door_of_at_most_12_kb_that_links_every_document():
    assert len(README.encode()) <= 12_000
    for document in (
        "OPERATING.md",
        "MODELS.md",
        "SCHEMA.md",
        "DESIGN.md",
        "BENCHMARKS.md",
        "TESTING.md",
    ):
        assert f"]({document})" in README
        assert (HERE / document).exists()


def test_readme_names_exactly_the_versions_ci_tests():
    sentence = re.search(r"CI runs every test on PostgreSQL ([^;.]+)[;.]", " ".join(README.split()))
    assert sentence, "the README no longer says which versions CI tests"
    assert [int(n) for n in re.findall(r"\d+", sentence.group(1))] == list(TESTED_VERSIONS)
    assert "./setup_test_db.sh --pg all" in (HERE / ".ci" / "run").read_text()


JSON_SCENARIOS = {
    "check": (
        ["--check", "--format", "json"],
        [
            "MIGRATE",
            "ALTER TABLE users DROP COLUMN last_sign_in",
            "ALTER TABLE api_keys ALTER COLUMN rate_limit SET DEFAULT 5",
        ],
    )
}


@pytest.mark.parametrize(("scenario", "body"), JSON_SAMPLE.findall(OPERATING))
def test_the_json_example_is_the_real_document(empty_db, scenario, body):
    args, statements = JSON_SCENARIOS[scenario]
    for statement in statements:
        if statement == "MIGRATE":
            assert run_migrate(empty_db.url).returncode == 0
        else:
            empty_db.rows(statement)
    result = run_migrate(empty_db.url, *args)
    real = json.loads(result.stdout)
    real["database"] = describe(connection_params(readme_database_url()))
    assert real == json.loads(body), result.stdout


@pytest.mark.parametrize(("scenario", "body"), readme_samples())
def test_readme_sample_is_the_real_output(empty_db, scenario, body):
    prepare(empty_db, scenario)
    args, stderr, stdout, exit_code = parse_sample(body)
    result = run_migrate(empty_db.url, *args)
    real_stderr, real_stdout = (
        as_in_readme(result.stderr, empty_db),
        as_in_readme(result.stdout, empty_db),
    )
    real = "\n".join(["real stderr:", *real_stderr, "real stdout:", *real_stdout])
    assert matches(stdout, real_stdout), f"stdout differs; the real output:\n{real}"
    assert matches(stderr, real_stderr), f"stderr differs; the real output:\n{real}"
    if exit_code is not None:
        assert result.returncode == exit_code, real


def skip_calls(path):
    """(function the call is in, first argument's source) of each pytest.skip call in `path`."""
    tree = ast.parse(path.read_text())
    calls = []
    for function in ast.walk(tree):
        if isinstance(function, ast.FunctionDef):
            for node in ast.walk(function):
                if (
                    isinstance(node, ast.Call)
                    and ast.unparse(node.func) in ("pytest.skip", "pytest.mark.skipif")
                    and node.args
                ):
                    calls.append((function.name, ast.unparse(node.args[0])))
    return calls


def test_every_skip_for_a_missing_tool_goes_through_the_helper_ci_turns_into_failures():
    # Anything else that skips states a version the feature needs, not a tool to install.
    for path in sorted(HERE.glob("test_*.py")) + [HERE / "conftest.py"]:
        for function, reason in skip_calls(path):
            assert function == "skip_for" or re.search(r"exists? from PostgreSQL \d+", reason), (
                f"{path.name}: {function} skips with {reason}: use conftest.skip_missing_tool"
            )
