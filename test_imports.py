"""
The tool's modules import one way: connection.py imports none of them,
models.py at most connection.py, and no module reaches back up to one that
imports it, so `from models import User` in a handler loads two modules, not
half of the tool.

The graph is read from the source (every import statement, those inside
functions too, which load as surely as the ones at the top, only later); the
subprocess tests check what importing a module really loads.
"""

import ast
import subprocess
import sys

from conftest import HERE

TOOL_MODULES = sorted(
    path.stem
    for path in HERE.glob("*.py")
    if not path.stem.startswith("test_") and path.stem != "conftest"
)


def imported_tool_modules(module):
    """The tool's modules that `module`'s source imports, anywhere in it."""
    tree = ast.parse((HERE / f"{module}.py").read_text(), filename=f"{module}.py")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names & set(TOOL_MODULES) - {module}


def import_graph():
    return {module: imported_tool_modules(module) for module in TOOL_MODULES}


def first_cycle(graph):
    """One import cycle of graph as a list of modules (the first repeated at the end), or None."""
    done, path = set(), []

    def visit(module):
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        path.append(module)
        for imported in sorted(graph[module]):
            cycle = visit(imported)
            if cycle:
                return cycle
        path.pop()
        done.add(module)
        return None

    for module in sorted(graph):
        cycle = visit(module)
        if cycle:
            return cycle
    return None


def tool_modules_loaded_by(statement):
    """The tool's modules in sys.modules after a fresh interpreter runs `statement`."""
    probe = (
        f"import sys; {statement}; "
        f"print(' '.join(sorted(set(sys.modules) & set({TOOL_MODULES!r}))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        check=False,
        cwd=HERE,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_the_modules_of_the_tool_are_found():
    assert {"connection", "models", "catalog", "plan", "apply", "migrate"} <= set(TOOL_MODULES)


def test_connection_imports_no_other_module_of_the_tool():
    assert imported_tool_modules("connection") == set()
    assert tool_modules_loaded_by("import connection") == {"connection"}


def test_models_imports_at_most_connection():
    assert imported_tool_modules("models") <= {"connection"}
    assert tool_modules_loaded_by("import models") <= {"models", "connection"}


def test_the_models_and_the_database_are_reached_from_models_as_before():
    loaded = tool_modules_loaded_by(
        "from models import MODELS, User, bind_from_url, database, DatabaseUrlError;"
        " assert User._meta.database is database and len(MODELS) == 6"
    )
    assert loaded <= {"models", "connection"}


def test_the_import_graph_of_the_tool_has_no_cycle():
    graph = import_graph()
    assert first_cycle(graph) is None, " -> ".join(first_cycle(graph))


def test_a_cycle_is_found_where_there_is_one():
    # The cycle that once ran connection -> models -> connection, and a longer one.
    assert first_cycle({"connection": {"models"}, "models": {"connection"}}) == [
        "connection",
        "models",
        "connection",
    ]
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert first_cycle(graph) == ["a", "b", "c", "a"]
    assert first_cycle({"a": {"b"}, "b": set()}) is None
