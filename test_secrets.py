"""
No password reaches migrate.py's output, wherever DATABASE_URL (or PGPASSWORD) puts it.

The property test generates passwords, puts each in one of the places libpq
reads a password from, runs migrate.py with some flags against the test
server or against a server that is not there, and checks the output. Every
generated password has one of RARE in each 4 characters, characters that
migrate.py never prints, so finding any 4-character piece of it in the
output means it leaked, not that it happens to spell a word of the output.
"""

from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg2.extensions import make_dsn

from conftest import assert_clean_failure, error_line, run_migrate
from connection import DEFAULT_DATABASE_URL, MigrationError, connection_params, describe

RARE = "~^!€"
# Mostly what URLs and connection strings give a meaning to, then anything else.
SPECIAL = "@:/?#%&=,[] '\"\\\nAz09"
OTHER = st.one_of(
    st.sampled_from(SPECIAL),
    st.characters(codec="utf-8", exclude_categories=("Cs",), exclude_characters="\0" + RARE),
)

FLAGS = (("--check",), ("--dry-run",), ("--wait", "0.5"), ("--lock-timeout", "1"))
UNREACHABLE = (
    {"host": "127.0.0.1", "port": "1"},
    {"host": "/nonexistent-socket-dir-of-migrate-tests", "port": "5432"},
)


@st.composite
def passwords(draw):
    pieces = draw(
        st.lists(
            st.tuples(st.sampled_from(RARE), st.text(OTHER, max_size=2)), min_size=1, max_size=6
        )
    )
    return "".join(rare + other for rare, other in pieces)


def pieces(password, size=4):
    """Every piece of password of `size` characters (the whole of a shorter one)."""
    if len(password) <= size:
        return {password}
    return {password[i : i + size] for i in range(len(password) - size + 1)}


def url(server, password=None, dbname=None, query=""):
    """A postgresql:// URL to server, the password percent-encoded as it should be."""
    userinfo = quote(server["user"], safe="")
    if password is not None:
        userinfo += ":" + quote(password, safe="")
    host = quote(server["host"], safe="")
    return f"postgresql://{userinfo}@{host}:{server['port']}/{quote(dbname or server['dbname'])}{query}"


# Each place libpq takes a password from: (DATABASE_URL, extra environment).
PLACES = {
    "password keyword": lambda s, p: (make_dsn(**s, password=p), {}),
    "sslpassword keyword": lambda s, p: (make_dsn(**s, sslpassword=p), {}),
    "URL user info": lambda s, p: (url(s, p, query="?sslmode=disable"), {}),
    "URL user info, not encoded": lambda s, p: (
        f"postgresql://{s['user']}:{p}@{s['host']}:{s['port']}/{s['dbname']}",
        {},
    ),
    "URL query": lambda s, p: (url(s, query=f"?sslmode=disable&password={quote(p)}"), {}),
    "dbname holding a URL": lambda s, p: (make_dsn(**{**s, "dbname": url(s, p)}), {}),
    "dbname holding a connection string": lambda s, p: (
        make_dsn(**{**s, "dbname": make_dsn(**s, password=p)}),
        {},
    ),
    "URL whose dbname parameter holds a connection string": lambda s, p: (
        url(s, query="?dbname=" + quote(make_dsn(**s, password=p), safe="")),
        {},
    ),
    "PGPASSWORD": lambda s, p: (make_dsn(**s), {"PGPASSWORD": p}),
    "a URL inside options": lambda s, p: (
        make_dsn(**s, options=f"-c migrate.feed=https://bot:{quote(p, safe='')}@feed.example/"),
        {},
    ),
}


@pytest.fixture(scope="module")
def server(test_database):
    """The test server, its database migrated, so that every run there is a no-op (exit 0)."""
    test_database.reset()
    assert run_migrate(test_database.url).returncode == 0
    params = test_database.params
    yield {
        "host": params.get("host", "localhost"),
        "port": params.get("port", "5432"),
        "user": params.get("user", "postgres"),
        "dbname": params["dbname"],
    }
    test_database.reset()


@settings(max_examples=60, deadline=None)
@given(
    password=passwords(),
    place=st.sampled_from(sorted(PLACES)),
    reachable=st.booleans(),
    unreachable=st.sampled_from(UNREACHABLE),
    flags=st.lists(st.sampled_from(FLAGS), unique=True, max_size=2),
)
def test_no_piece_of_a_password_is_ever_printed(
    server, password, place, reachable, unreachable, flags
):
    target = server if reachable else {**server, **unreachable}
    database_url, env = PLACES[place](target, password)
    result = run_migrate(database_url, *(flag for group in flags for flag in group), **env)
    output = result.stdout + result.stderr
    assert result.returncode in (0, 2), output
    if not reachable:
        assert result.returncode == 2, output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == (1 if result.returncode == 2 else 0), output
    assert "Traceback" not in output
    leaked = [piece for piece in pieces(password) if piece in output]
    assert not leaked, output


# --- Masking, case by case ------------------------------------------------------


def test_a_short_password_masks_the_password_and_nothing_else():
    params = connection_params("host=localhost user=a password=a dbname=database")
    assert describe(params) == "user=a password=*** dbname=database host=localhost"


def test_the_default_password_does_not_hide_the_user_of_the_same_name():
    assert describe(connection_params(DEFAULT_DATABASE_URL)) == (
        "user=postgres password=*** dbname=api_aggregator host=localhost port=5432 sslmode=disable"
    )


def test_a_dbname_holding_a_url_is_shown_with_its_password_masked():
    params = connection_params("dbname=postgresql://u:TopSecret9@db.internal/app?sslmode=require")
    assert describe(params) == (
        "dbname='user=u password=*** dbname=app host=db.internal sslmode=require'"
    )


def test_a_dbname_holding_a_connection_string_is_shown_with_its_password_masked():
    params = connection_params("dbname='host=db.internal password=TopSecret9 dbname=app'")
    assert describe(params) == "dbname='password=*** dbname=app host=db.internal'"


def test_the_password_of_a_url_in_any_other_value_is_masked():
    params = connection_params(
        "dbname=app options='-c x.feed=https://bot:TopSecret9@feed.example/'"
    )
    assert "TopSecret9" not in describe(params)
    assert "https://bot:***@feed.example/" in describe(params)


def test_a_missing_database_named_by_a_connection_string_says_what_to_do(test_database):
    nested = make_dsn(**{**test_database.params, "password": "TopSecret9"})
    result = run_migrate(make_dsn(**{**test_database.params, "dbname": nested}))
    assert_clean_failure(result, "dbname holds a connection string")
    assert "put its parameters in DATABASE_URL itself" in error_line(result)
    assert "TopSecret9" not in result.stdout + result.stderr


def test_a_raw_at_sign_in_a_url_password_gets_a_percent_encoding_hint():
    result = run_migrate("postgresql://app:P@ssw0rd@localhost/db")
    assert_clean_failure(result, "percent-encode '@' as %40")
    assert "ssw0rd" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1  # before the first line would print the host


# --- What libpq could not parse ---------------------------------------------------


def test_a_misspelt_keyword_is_named_without_its_value():
    result = run_migrate("host=localhost dbnme=TopSecret9")
    assert_clean_failure(result, 'unknown keyword "dbnme" (did you mean dbname?)')
    assert "TopSecret9" not in result.stderr


def test_a_misspelt_url_query_parameter_is_named():
    result = run_migrate("postgresql://u:TopSecret9@localhost/db?sslmod=disable")
    assert_clean_failure(result, 'unknown query parameter "sslmod" (did you mean sslmode?)')


def test_a_url_of_another_scheme_names_the_scheme_not_the_password():
    result = run_migrate("mysql://u:TopSecret9@localhost/db")
    assert_clean_failure(result, "its scheme mysql:// is not postgresql:// or postgres://")
    assert "TopSecret9" not in result.stderr


def test_an_unquoted_word_that_may_be_a_password_is_not_shown():
    result = run_migrate("host=localhost password=Top Secret9 dbname=x")
    assert_clean_failure(result, "quote a value that has spaces")
    assert "Secret9" not in result.stderr


def test_a_bad_percent_escape_names_the_url_part_it_is_in():
    result = run_migrate("postgresql://u:100%sure@localhost/db")
    assert_clean_failure(result, "the password has a '%' not followed by two hex digits")
    assert "sure" not in result.stderr


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            "host=h password=Top Secret9",
            'a word has no "=VALUE" (not shown, as it may be part of a password)',
        ),
        (
            "host=h password=my host1",
            'a word has no "=VALUE" (not shown, as it may be part of a password)',
        ),
        (
            "host=h password=x Secret9=1",
            "unknown keyword (not shown, as it may be part of a password)",
        ),
        ("host=h password", 'word "password" has no "=VALUE"'),
        ("host=h password='Secret9", "a quoted value has no closing quote"),
        (
            "postgresql://h/db?passwrd=Secret9",
            'unknown query parameter "passwrd" (did you mean password?)',
        ),
        ("postgresql://h/db?password=a&Secret9", "query parameter (not shown, as it may be part"),
        ("postgresql://Secret9%zz@h/db", "the user name has a '%' not followed"),
        ("postgresql://u:p@h/db?options=Secret9%zz", "the value of a query parameter has a '%'"),
    ],
)
def test_a_parse_error_names_the_keyword_or_url_part_and_no_value(url, problem):
    with pytest.raises(MigrationError) as error:
        connection_params(url)
    assert str(error.value).startswith("DATABASE_URL cannot be parsed: " + problem)
    assert "Secret9" not in str(error.value)


def test_a_bad_ipv6_host_is_named():
    result = run_migrate("postgresql://u:TopSecret9@[::1/db")
    assert_clean_failure(result, "the host is malformed")
