"""The package's import direction (docs/layout.md), checked with import-linter's contracts in
pyproject.toml: no import cycle inside torchtitan_ext (deferred imports, inside functions,
included), the runtime never imports ``torchtitan_ext.tools``, and the layers import only
downwards. The contracts run on the package as it is, and on a copy with one deferred import
added that breaks them, so a pass means something."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` with ``root``'s pyproject.toml on ``root``'s package."""
    return subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports"), "--no-cache"],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_import_contracts_hold() -> None:
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.parametrize(
    ("module", "deferred_import", "broken"),
    [
        # The runtime reaching up into the planner: a climb, and a cycle (the tools import
        # the curriculum).
        (
            "curriculum.py",
            "from torchtitan_ext.tools import auto_mesh",
            ["acyclic", "tools", "layers"],
        ),
        # A feature importing the rule table that imports it: a cycle and a layer climbed.
        ("parallel_dims.py", "import torchtitan_ext.validate", ["acyclic", "layers"]),
    ],
)
def test_import_contracts_can_fail(
    tmp_path: Path, module: str, deferred_import: str, broken: list[str]
) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    shutil.copytree(
        ROOT / "torchtitan_ext",
        copy / "torchtitan_ext",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    path = copy / "torchtitan_ext" / module
    path.write_text(path.read_text() + f"\n\ndef _added() -> None:\n    {deferred_import}\n")
    proc = lint_imports(copy)
    assert proc.returncode != 0, proc.stdout[-2000:]
    names = {
        "acyclic": "No import cycle inside torchtitan_ext",
        "tools": "The runtime never imports the tools",
        "layers": "Layers, top to bottom",
    }
    for key, name in names.items():
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(name))
        assert (" BROKEN" in line) == (key in broken), line
