# Device side, sourced from the repo root after `. .gpu/p2/device.sh; . .gpu/x1/setup.sh`
# ran earlier on this warm machine (/tmp/site, /tmp/site-ruvllm, PYTHONPATH, PATH ready):
# the ISQ toolkit venv (installed offline from the wheelhouse .gpu/isq0 [+ .gpu/isq1 if
# carried]) and compressed-tensors for vLLM. Sourced by run-isq.sh and run-all.sh.
# Output: $OUT/isq-toolkit-env.log.
# Self-contained on a warm machine: the exports of .gpu/p2/device.sh and x1/setup.sh again
# (a new call's shell has none of them), idempotently.
if [ ! -f /tmp/site/.complete ] || [ ! -f /tmp/site/.ruvllm ]; then
  echo "[run-isq] /tmp/site is not ready (device.sh / setup.sh did not run on this machine)"; return 1 2>/dev/null || exit 1
fi
case ":$PYTHONPATH:" in *:/tmp/site:*) ;; *) export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} PATH=/tmp/site/bin:$PATH;; esac
export VLLM_USE_FLASHINFER_SAMPLER=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 RAY_USAGE_STATS_ENABLED=0
case ":$PATH:" in *:/tmp/site-ruvllm/bin:*) ;; *) export PATH=/tmp/site-ruvllm/bin:$PATH;; esac
# vLLM 0.26 imports compressed-tensors (its pin: 0.17.0, which needs loguru) only to load a
# compressed-tensors checkpoint; /tmp/site has neither (stage.sh dropped them). Serving-side
# copies in /tmp/site-isq, behind /tmp/site; the toolkit venv's own 0.19.0 stays in front.
if [ ! -f /tmp/site-isq/.done ]; then
  python3 -m pip install -q --no-deps --no-index --no-compile --target /tmp/site-isq \
    .gpu/isq0/serving/compressed_tensors-0.17.0-py3-none-any.whl .gpu/isq0/loguru-0.7.3-py3-none-any.whl \
    && touch /tmp/site-isq/.done
fi
case ":$PYTHONPATH:" in *:/tmp/site-isq:*) ;; *) export PYTHONPATH=$PYTHONPATH:/tmp/site-isq;; esac
_links="$PWD/.gpu/isq0"; [ -d .gpu/isq1 ] && _links="$_links $PWD/.gpu/isq1"
export PIP_NO_INDEX=1 PIP_FIND_LINKS="$_links" PIP_DISABLE_PIP_VERSION_CHECK=1
export RUVLLM_GPU_RESULTS=$OUT
# setup.sh installed the tree of ITS call; install this call's tree (with the new test and
# isq code), else Ray workers import the old project from /tmp/site-ruvllm.
rm -rf /tmp/site-ruvllm.new
python3 -m pip install -q --no-deps --no-index --no-compile --no-build-isolation --target /tmp/site-ruvllm.new . \
  && rm -rf /tmp/site-ruvllm && mv /tmp/site-ruvllm.new /tmp/site-ruvllm \
  || echo "[run-isq] WARNING: could not install this tree; /tmp/site-ruvllm keeps setup.sh's"
case ":$PYTHONPATH:" in *:/tmp/site-ruvllm:*) ;; *) export PYTHONPATH=/tmp/site-ruvllm:$PYTHONPATH;; esac
grep -q "serving_paths" /tmp/site-ruvllm/ruvllm/isq/toolkit_env.py && echo "[run-isq] project installed: $(ls /tmp/site-ruvllm | tr '\n' ' ')" \
  || echo "[run-isq] WARNING: /tmp/site-ruvllm holds an OLD isq (no serving_paths): Ray runs old code"
python3 -c "from ruvllm.model_store import prepare_builtin; print('[run-isq] model', prepare_builtin('smollm2-135m-instruct'))"
nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv,noheader
python3 -m pip --version
python3 - <<'PY'
import importlib.metadata as m
for n in ("pip", "torch", "transformers", "accelerate", "huggingface-hub", "pyarrow", "pandas", "fsspec",
          "xxhash", "numpy", "pillow", "requests", "tqdm", "pyyaml", "psutil", "nvidia-ml-py", "py-cpuinfo",
          "pydantic", "dill", "compressed-tensors", "loguru", "vllm"):
    try: print(f"[run-isq] {n} {m.version(n)}")
    except m.PackageNotFoundError: print(f"[run-isq] {n} MISSING")
PY
# The image's own consistency, as pip sees it: the toolkit's resolve re-checks torch's pins.
python3 -m pip check 2>&1 | grep -iE "torch|nvidia|triton|datasets|fsspec|pyarrow" | head -20
# Build the toolkit venv here, outside Ray, so a pip failure shows in this log verbatim;
# the job then finds it ready (same interpreter, same cache key).
timeout 100 python3 -u - 2>&1 <<'PY' | tee $OUT/isq-toolkit-env.log
import json, os, subprocess, time
from ruvllm.config import resolve_cache_dir
from ruvllm.isq import toolkit_env as te
t, cache = time.monotonic(), resolve_cache_dir(None)
try:
    py = te.toolkit_python(cache)
except subprocess.CalledProcessError as e:
    # Device-only fallback: pip's resolve also re-checks the image's torch pins (nvidia-*),
    # which may not hold in this image. Install the toolkit's own wheels without deps.
    print(f"[run-isq] toolkit resolve FAILED ({e}); fallback: --no-deps install", flush=True)
    from ruvllm.atomic_dir import build_once
    def build(tmp):
        import torch
        subprocess.run(te.venv_command(tmp, True), check=True)
        te._point_at_serving_env(tmp)
        subprocess.run([str(tmp / "bin" / "python"), "-m", "pip", "install", "--no-deps",
                        "--progress-bar", "off", "llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "datasets==5.0.1",
                        "multiprocess==0.70.19", "loguru==0.7.3", "auto-round==0.15.1",
                        "fsspec==2026.4.0"], env=te.pip_environment(os.environ), check=True)
        (tmp / te.MARKER).write_text(json.dumps({"requirements": te.TOOLKIT_REQUIREMENTS,
                                                 "torch": torch.__version__, "no_deps": True}))
    build_once(te.env_dir(cache), te.MARKER, build)
    te._point_at_serving_env(te.env_dir(cache))
    py = te.env_dir(cache) / "bin" / "python"
print(f"[run-isq] toolkit env ready in {time.monotonic() - t:.0f} s: {py}")
print(subprocess.run([str(py), "-I", "-c", "import llmcompressor, compressed_tensors, transformers, torch, datasets; "
    "print('[run-isq] toolkit sees', llmcompressor.__version__, compressed_tensors.__version__, "
    "transformers.__version__, torch.__version__, datasets.__version__, torch.cuda.is_available(), compressed_tensors.__file__)"],
    capture_output=True, text=True))  # isolated (-I: no PYTHONPATH), as run_worker runs the worker
PY
