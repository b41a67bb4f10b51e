"""
The documents say what the code does: SCHEMA.md is the contract the tests check.
"""

import re

from conftest import HERE
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
