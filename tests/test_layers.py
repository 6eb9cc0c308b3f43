"""The loop runs one way: observe -> decide -> publish; nothing below reaches up into what drives it.

An import is any import of the package, wherever it stands: at the top, in a function, or under
`if TYPE_CHECKING:` (a hint names what the module depends on as much as a call does).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "control_plane"


def units() -> set[str]:
    """The package's parts: its top-level modules and its folders (a folder is one part)."""
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return modules | folders


def everything_but(*allowed: str) -> tuple[str, ...]:
    return tuple(sorted(units() - set(allowed)))


# (part, what its modules may not import). What drives the loop: the plane (app, and its parts in
# plane/), the CLI and `python -m control_plane` (__main__), the supervisor of the processes `up`
# starts, and the operator's side (admin API, /status, /metrics). xds/ knows only itself,
# observe/ never reads a decision, and operator/ sees the plane only through operator/view.py
# (the plane hands it one).
DRIVERS = ("app", "plane", "cli", "__main__", "supervisor")
RULES = [
    ("xds", everything_but()),
    # Long recordings: where to cut and how to join the answers know only themselves; the worker
    # (longform/worker.py) reads the headers' names too.
    ("longform", everything_but("names")),
    ("tenants", everything_but("validation")),
    ("observe", (*DRIVERS, "decide", "builders", "operator", "xds")),
    ("decide", (*DRIVERS, "builders", "operator")),
    ("fleet", (*DRIVERS, "observe", "decide", "builders", "operator")),
    ("builders", (*DRIVERS, "observe", "decide", "operator")),
    ("operator", DRIVERS),
    # The top-level modules. Names, OpenAI's error shape, addresses and the config's checks are leaves
    # everyone reads (tenants/ checks its names with validation).
    ("names", everything_but()),
    ("openai_errors", everything_but()),
    ("addresses", everything_but()),
    ("validation", everything_but()),
    # The plane's own traces: its tracer, read by the admin API, the plane's parts and the xDS callbacks
    # it answers; it reads only the tracing settings and the xDS layer's names and callbacks.
    ("traces", everything_but("config", "xds")),
    # config/ reads only what its fields are checked with (addresses, validation, Envoy's weight
    # bounds in xds/, the internal CA's file names), never a part that reads the config.
    ("config", (*DRIVERS, "bootstrap", "certificates", "peers", "fleet", "observe", "decide", "builders", "operator",
                "tenants")),
    # Certificates, the internal CA and the peers it names: files and TLS, below everything that serves.
    ("certificates", (*DRIVERS, "bootstrap", "peers", "operator", "builders", "decide", "observe", "fleet", "xds",
                      "tenants")),
    ("internal_pki", (*DRIVERS, "bootstrap", "peers", "operator", "builders", "decide", "observe", "fleet", "xds",
                      "tenants", "config")),
    ("peers", everything_but("internal_pki")),
    # An Envoy's bootstrap file: from the config and the internal CA's file names.
    ("bootstrap", (*DRIVERS, "operator", "builders", "decide", "observe", "fleet", "xds", "tenants")),
    # The supervisor starts processes (Envoy, engines, `serve`): it never runs the plane in its own.
    ("supervisor", ("app", "plane", "cli", "__main__", "operator", "builders", "decide", "observe", "fleet", "xds", "tenants")),
    # The plane's parts (plane/) are built by app.py, the composition root, and never reach up to it,
    # nor to operator/ but for its admin tokens' table and its view's types (PLANE_READS_OF_OPERATOR).
    ("plane", ("app", "cli", "__main__", "supervisor")),
    # The plane is started by the CLI alone (`serve`, `up` through the supervisor's `serve`).
    ("app", ("cli", "__main__", "supervisor")),
    ("cli", ("__main__",)),
    ("__main__", everything_but("cli")),
]


def files(unit: str) -> list[Path]:
    module = PACKAGE / f"{unit}.py"
    return [module] if module.exists() else sorted((PACKAGE / unit).rglob("*.py"))


def imported(path: Path, source: str | None = None) -> set[str]:
    """The parts of the package the module at `path` imports (`source`: its text, else read):
    every import statement in it, in functions and under TYPE_CHECKING too; `from control_plane
    import x` and relative imports included."""
    inside = path.relative_to(PACKAGE.parent).with_suffix("").parts  # ("control_plane", "operator", "admin")
    if inside[-1] == "__init__":
        inside = inside[:-1] + ("",)
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.Import):
            names = [alias.name.split(".") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(inside[:-node.level]) if node.level else []
            base += node.module.split(".") if node.module else []
            names = [base + [alias.name] for alias in node.names] if len(base) == 1 else [base]
        else:
            continue
        found |= {name[1] for name in names if name[0] == "control_plane" and len(name) > 1}
    return found


def part_of(path: Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


@pytest.mark.parametrize("unit,forbidden", RULES, ids=[unit for unit, _ in RULES])
def test_imports_run_one_way(unit, forbidden):
    for module in files(unit):
        wrong = (imported(module) - {unit}) & set(forbidden)
        assert not wrong, (str(module.relative_to(PACKAGE)), sorted(wrong))


def test_the_rules_cover_every_part():
    assert units() - {"defaults"} == {unit for unit, _ in RULES}


def test_the_plane_is_imported_by_the_cli_alone():
    importers = {part_of(p) for p in PACKAGE.rglob("*.py") if "app" in imported(p) and part_of(p) != "app"}
    assert importers == {"cli"}


def test_the_plane_parts_are_built_by_app_alone():
    importers = {part_of(p) for p in PACKAGE.rglob("*.py") if "plane" in imported(p) and part_of(p) != "plane"}
    assert importers == {"app"}


# What plane/ may read of operator/: the admin tokens' table, kept and saved with the API keys by
# the state keeper, and the view's types, which plane/operator_view.py answers.
PLANE_READS_OF_OPERATOR = {"control_plane.operator.tokens", "control_plane.operator.view"}


def modules_imported(path: Path) -> set[str]:
    """The dotted modules of the package that the module at `path` imports from (absolute imports)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, (str(path), "a relative import: name the module")
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("control_plane.")}


def test_the_plane_parts_read_operator_only_for_tokens_and_the_view():
    for module in files("plane"):
        reads = {name for name in modules_imported(module) if name.startswith("control_plane.operator")}
        # `from control_plane.operator.tokens import TokenTable` names the module and the name in it
        wrong = {name for name in reads if not any(name == allowed or name.startswith(allowed + ".")
                                                  for allowed in PLANE_READS_OF_OPERATOR)}
        assert not wrong, (str(module.relative_to(PACKAGE)), sorted(wrong))


def test_hints_and_late_imports_count():
    """The checks above see what a regex stripping TYPE_CHECKING blocks would not."""
    source = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from control_plane.app import ControlPlane\n"
              "def late():\n    from control_plane import supervisor\n    import control_plane.cli\n"
              "from . import tokens\nfrom ..names import MODEL_HEADER\nfrom .. import decide\n")
    assert imported(PACKAGE / "operator" / "probe.py", source) == {"app", "supervisor", "cli", "operator", "names",
                                                                    "decide"}


# -- operator/ reads the plane only through operator/view.py's PlaneView ------------------------------------------

def _view_members() -> set[str]:
    tree = ast.parse((PACKAGE / "operator" / "view.py").read_text())
    view = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "PlaneView")
    return {n.name for n in view.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} | \
        {n.target.id for n in view.body if isinstance(n, ast.AnnAssign)}


def _reads_of_the_plane(path: Path) -> set[str]:
    """Attributes taken of `plane`, `self.plane` or `_plane(...)`: the names operator code gives the view."""
    def is_plane(node) -> bool:
        return (isinstance(node, ast.Name) and node.id == "plane") or \
            (isinstance(node, ast.Attribute) and node.attr == "plane" and isinstance(node.value, ast.Name)
             and node.value.id == "self") or \
            (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "_plane")
    return {node.attr for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and is_plane(node.value)}


def test_operator_code_asks_the_plane_only_what_the_view_holds():
    members, asked = _view_members(), set()
    for module in files("operator"):
        reads = _reads_of_the_plane(module)
        assert reads <= members, (module.name, sorted(reads - members))
        asked |= reads
    assert asked == members, ("in the view but never asked", sorted(members - asked))


def test_the_plane_gives_operator_the_whole_view():
    from control_plane.plane.operator_view import OperatorView
    from control_plane.operator.view import PlaneView

    public = {name for name in vars(OperatorView) if not name.startswith("_")}
    assert public == _view_members(), "OperatorView answers what PlaneView holds, and nothing more"
    for name in _view_members():
        promised, given = inspect.getattr_static(PlaneView, name), inspect.getattr_static(OperatorView, name, None)
        assert given is not None, name
        assert isinstance(given, property) == isinstance(promised, property), name
        if not isinstance(promised, property):
            assert list(inspect.signature(given).parameters) == list(inspect.signature(promised).parameters), name
            assert inspect.iscoroutinefunction(given) == inspect.iscoroutinefunction(promised), name
