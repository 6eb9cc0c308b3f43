"""The loop runs one way: observe -> decide -> publish; nothing below reaches up into what drives it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "control_plane"

# (folder, what its modules may not import): the plane (app), the operator's side and the CLI
# drive the rest; xds/ knows only itself, observe/ never reads a decision, and config/ is read by
# the rest (xds/ only for Envoy's weight bounds).
RULES = [
    ("xds", ("app", "cli", "config", "fleet", "observe", "decide", "builders", "operator", "supervisor")),
    ("config", ("app", "cli", "fleet", "observe", "decide", "builders", "operator", "supervisor", "tenants")),
    ("observe", ("app", "cli", "decide", "builders", "operator", "xds", "supervisor")),
    ("decide", ("app", "cli", "builders", "operator", "supervisor")),
    ("fleet", ("app", "cli", "observe", "decide", "builders", "operator", "supervisor")),
    ("builders", ("app", "cli", "observe", "decide", "operator", "supervisor")),
    ("operator", ("cli", "supervisor")),
    ("tenants", ("app", "cli", "config", "fleet", "observe", "decide", "builders", "operator", "xds", "supervisor")),
]


@pytest.mark.parametrize("folder,forbidden", RULES)
def test_imports_run_one_way(folder, forbidden):
    for module in (PACKAGE / folder).glob("*.py"):
        source = re.sub(r"^if TYPE_CHECKING:\n(?:    .*\n)+", "", module.read_text(), flags=re.M)  # hints may name the plane
        imported = re.findall(r"^\s*(?:from|import) control_plane\.(\w+)", source, re.M)  # in functions too
        assert not set(imported) & set(forbidden), (module.name, sorted(set(imported) & set(forbidden)))


def test_the_rules_cover_every_folder():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert folders - {"defaults"} == {folder for folder, _ in RULES}
