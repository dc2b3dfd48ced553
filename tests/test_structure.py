"""The package's structure: import-linter's contracts (pyproject.toml) and ruff, as CI runs them."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return str(path)


def test_imports_go_only_downward():
    """`lint-imports` at the repository root, as a contributor runs it: import-linter reads
    packages from disk, and vipllava_jax/convert and vipllava_jax/train are links to the
    top-level convert/ and train/, the installed layout."""
    out = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "BROKEN" not in out.stdout


def test_ruff_is_clean():
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]


def test_every_package_is_listed_for_the_wheel():
    """pyproject.toml lists the packages explicitly (convert/ and train/ install under
    vipllava_jax): a folder missing there would be missing from a non-editable install."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = set()
    for top, name in (("vipllava_jax", "vipllava_jax"), ("convert", "vipllava_jax.convert"), ("train", "vipllava_jax.train")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((name, *rel)))
    assert found == listed, (sorted(found - listed), sorted(listed - found))


def test_no_test_file_imports_another():
    """Shared helpers live in tests.helpers and shared fixtures in conftest.py files."""
    import re

    pattern = re.compile(r"^\s*(from|import)\s+(tests\.\S*\.)?test_\w+|^\s*from\s+conftest\s+import", re.M)
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py") if pattern.search(p.read_text())]
    assert not offenders, offenders
