"""Installed, the project is one package, `ruvllm`, and lives beside PyPI's AdapterHub
`adapters` (issue 15: before, `pip install .` put top-level `adapters`, `router`,
`deployments` and `isq` packages into site-packages and overwrote or shadowed AdapterHub's:
`import adapters` found whichever was installed last).

Both go into one `--target` directory, as they would into one site-packages: AdapterHub's
files from PyPI (pip's cache after the first run), then a wheel built from a copy of this
tree (`--no-build-isolation`: the venv's setuptools, no network). About 15 s.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT
from test_import_graph import PYPROJECT

ADAPTERHUB = "adapters==1.3.0"
# import name -> folder in the tree: "ruvllm" -> "ruvllm", "ruvllm.adapters" -> "adapters", ...
PACKAGE_DIRS: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                           "--disable-pip-version-check", "--no-deps", *args],
                          capture_output=True, text=True, timeout=300)


def _tree_copy(dst: Path) -> None:
    """The files a wheel is built from; building from a copy leaves no build/ or egg-info
    in the checkout (an egg-info there would shadow the venv's metadata: cwd is first)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dst / name)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(ROOT / folder, dst / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*.py")):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def test_installs_as_one_package_beside_adapterhub(tmp_path):
    site = tmp_path / "site"
    got = _pip("--target", str(site), ADAPTERHUB)
    # PyPI is reachable wherever `make test` can set up its venv at all.
    assert got.returncode == 0, f"PyPI's {ADAPTERHUB} could not be fetched: {got.stderr[-300:]}"
    adapterhub = _digest(site / "adapters")

    src = tmp_path / "src"
    src.mkdir()
    _tree_copy(src)
    got = _pip("--no-build-isolation", "--no-index", "--upgrade", "--target", str(site), str(src))
    assert got.returncode == 0, got.stderr[-2000:]

    # The project's wheel brought exactly one top-level package, and left AdapterHub's alone.
    (dist,) = site.glob("ruvllm_serve-*.dist-info")
    files = [line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines()]
    top = {f.split("/")[0] for f in files if not f.startswith("..")}  # ../bin/ruvllm: the script
    assert top - {dist.name} == {"ruvllm"}
    assert _digest(site / "adapters") == adapterhub
    for package in PACKAGE_DIRS:
        assert (site.joinpath(*package.split(".")) / "__init__.py").is_file(), package

    # In one interpreter each name is its own: run from an empty directory, so the
    # checkout's folders are not on sys.path, with the venv's packages behind the target.
    # AdapterHub is located, not executed: 1.3.0 imports `HfFolder`, which the
    # huggingface_hub 1.x that vLLM's transformers 5 needs no longer has -- a conflict of
    # their pins that no naming can solve; what was a name clash is checked here.
    probe = (
        "import importlib.metadata as m, importlib.util\n"
        "import ruvllm.adapters.registry, ruvllm.router.ledger, ruvllm.cli.main\n"
        "print(importlib.util.find_spec('adapters').origin); print(m.version('adapters'))\n"
        "print(ruvllm.adapters.registry.__file__)\n"
        "print(m.entry_points(group='vllm.general_plugins')['ruvllm_xlora'].value)\n"
        "print(m.entry_points(group='console_scripts')['ruvllm'].value)\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=empty, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    hub_file, hub_version, ours, plugin, script = out.stdout.split()
    assert Path(hub_file) == site / "adapters" / "__init__.py" and hub_version == "1.3.0"
    assert Path(ours) == site / "ruvllm" / "adapters" / "registry.py"
    assert plugin == "ruvllm.adapters.xlora.plugin:register"
    assert script == "ruvllm.cli.main:main"
