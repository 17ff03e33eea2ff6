"""In-situ quantization jobs: calibrate and quantize a base checkpoint before the
replicas that serve it start.

A job's result is a compressed-tensors checkpoint under
`<cache>/isq/<model>-<method>-w<bits>[-g<group>]-<key>`, where the key hashes the base
weights, the method and its parameters, the calibration windows and the toolkit's
versions: a second deployment with the same settings reuses it without recomputing,
and one that differs in anything that changes the weights gets its own. The directory
is built under a lock in a temporary sibling and renamed into place (ruvllm.atomic_dir),
so a concurrent job for the same key waits for the first and a crash leaves nothing a
replica could load. `isq-report.json` beside the weights records the method, sizes,
times and held-out perplexities; the quality gate reads it on every use, since the
threshold is the deployment's and not part of the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ruvllm.atomic_dir import build_once, write_text_atomic
from ruvllm.config import CalibrationConfig, EvaluationConfig, IsqConfig
from isq import checkpoint_bytes
from isq.toolkit_env import TOOLKIT_REQUIREMENTS, toolkit_python

REPORT = "isq-report.json"
RECIPE_REVISIONS = {"gptq": 2}

Progress = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(f"[ruvllm isq] {msg}", file=sys.stderr, flush=True)


class IsqQualityError(RuntimeError):
    """The quantized model lost more quality than the deployment allows."""


@dataclass(frozen=True)
class IsqResult:
    path: Path
    report: dict[str, Any]
    reused: bool


# -- inputs ------------------------------------------------------------------------------

def calibration_windows(base_dir: Path, calibration: CalibrationConfig) -> list[list[int]]:
    """Token windows to calibrate on: the corpus's train splits in equal shares, or the
    configured local text file (.txt, or .jsonl with a `text` field per line)."""
    from transformers import AutoTokenizer

    from ruvllm import corpus

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    if calibration.source == "builtin":
        per_domain = -(-calibration.samples // len(corpus.DOMAINS))
        parts = [corpus.token_windows(tokenizer, corpus.corpus()[d].train,
                                      calibration.seq_len, per_domain, seed=11)
                 for d in corpus.DOMAINS]
        interleaved = [w for group in zip(*parts) for w in group]
        return interleaved[:calibration.samples]
    path = Path(calibration.source).expanduser()
    if path.suffix == ".jsonl":
        texts = tuple(json.loads(line)["text"] for line in path.read_text().splitlines()
                      if line.strip())
    else:
        texts = tuple(t for t in path.read_text().split("\n\n") if t.strip())
    return corpus.token_windows(tokenizer, texts, calibration.seq_len, calibration.samples)


def memoised_calibration_windows(base_dir: Path, calibration: CalibrationConfig,
                                 weights_sha256: str, cache_dir: Path) -> list[list[int]]:
    """calibration_windows, kept under the cache: building the corpus and tokenizing it
    takes ~14 s here, which every app build would otherwise pay per calibrated variant
    just to compute the cache key. The memo is keyed by everything the windows depend on:
    the weights, the tokenizer files, the settings, the corpus code or the local file."""
    from ruvllm import corpus

    def stamp(path: Path) -> list:
        return [path.name, path.stat().st_size, path.stat().st_mtime_ns]

    ident: dict[str, Any] = {
        "weights": weights_sha256, "settings": calibration.model_dump(),
        "tokenizer": [stamp(f) for f in sorted(base_dir.glob("tokenizer*"))]}
    if calibration.source == "builtin":
        ident["corpus"] = hashlib.sha256(Path(corpus.__file__).read_bytes()).hexdigest()
    else:
        ident["file"] = stamp(Path(calibration.source).expanduser())
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    memo = cache_dir / "isq" / "calibration" / f"{digest}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    windows = calibration_windows(base_dir, calibration)
    write_text_atomic(memo, json.dumps(windows))
    return windows


def heldout_windows(base_dir: Path, evaluation: EvaluationConfig) -> list[list[int]]:
    from transformers import AutoTokenizer

    from ruvllm import corpus

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    per_domain = -(-evaluation.windows // len(corpus.DOMAINS))
    parts = [corpus.token_windows(tokenizer, corpus.corpus()[d].eval, evaluation.seq_len,
                                  per_domain, seed=5) for d in corpus.DOMAINS]
    return [w for group in zip(*parts) for w in group][:evaluation.windows]


def weights_digest(base_dir: Path) -> str:
    """sha256 over the checkpoint's weight files, memoised beside them by size and mtime
    (hashing half a gigabyte takes seconds; a deployment should not pay that each start)."""
    files = sorted(base_dir.glob("*.safetensors")) + sorted(base_dir.glob("*.bin"))
    if not files:
        raise FileNotFoundError(f"no weight files in {base_dir}")
    stamp = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    memo = base_dir / ".ruvllm-weights-sha256.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["stamp"] == stamp:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    h = hashlib.sha256()
    for f in files:
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
    digest = h.hexdigest()
    try:
        write_text_atomic(memo, json.dumps({"stamp": stamp, "sha256": digest}))
    except OSError:
        pass  # a read-only model directory: hash again next time
    return digest


def cache_key(weights_sha256: str, isq: IsqConfig, calibration: list[list[int]] | None) -> str:
    payload = {
        "weights": weights_sha256,
        "params": isq.job_params(),
        "calibration": hashlib.sha256(json.dumps(calibration).encode()).hexdigest()
        if calibration is not None else None,
        "toolkit": TOOLKIT_REQUIREMENTS,
    }
    # Bumped when the worker's recipe for a method changes the weights it writes for the
    # same parameters (gptq 2: W8A8 honours actorder instead of always using static).
    revision = RECIPE_REVISIONS.get(isq.method)
    if revision:
        payload["recipe"] = revision
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def result_dir(cache_dir: Path, model_name: str, isq: IsqConfig, key: str) -> Path:
    group = f"-g{isq.resolved_group_size}" if isq.resolved_group_size else ""
    scheme = f"w{isq.bits}a{isq.activation_bits}"
    return cache_dir / "isq" / f"{model_name}-{isq.method}-{scheme}{group}-{key[:16]}"


# -- the job -----------------------------------------------------------------------------

def quantize(base_dir: Path, model_name: str, isq: IsqConfig, cache_dir: Path,
             progress: Progress = _stderr) -> IsqResult:
    """Return the quantized checkpoint for these settings, building it if needed, and
    apply the quality gate (IsqQualityError names both perplexities)."""
    base_dir = Path(base_dir)
    progress(f"{isq.describe()}: hashing the base weights and preparing calibration data")
    weights = weights_digest(base_dir)
    calibration = (memoised_calibration_windows(base_dir, isq.calibration, weights, cache_dir)
                   if isq.needs_calibration else None)
    key = cache_key(weights, isq, calibration)
    target = result_dir(cache_dir, model_name, isq, key)

    def build(tmp: Path) -> None:
        started = time.monotonic()
        python = toolkit_python(cache_dir, progress)
        heldout = heldout_windows(base_dir, isq.evaluation)
        # The base model's perplexity on this text is the same for every job: kept once.
        base_ppl_file = cache_dir / "isq" / "base-perplexity" / (
            f"{weights[:16]}-{hashlib.sha256(json.dumps(heldout).encode()).hexdigest()[:16]}.json")
        base_ppl = (json.loads(base_ppl_file.read_text())["perplexity"]
                    if base_ppl_file.is_file() else None)
        with tempfile.TemporaryDirectory(prefix="ruvllm-isq-") as work:
            work_dir = Path(work)
            (work_dir / "calibration.json").write_text(json.dumps(calibration or []))
            (work_dir / "heldout.json").write_text(json.dumps(heldout))
            spec = {**isq.job_params(), "base_dir": str(base_dir), "out_dir": str(tmp),
                    "calibration_file": str(work_dir / "calibration.json"),
                    "heldout_file": str(work_dir / "heldout.json"),
                    "base_perplexity": base_ppl, "threads": isq.threads}
            (work_dir / "spec.json").write_text(json.dumps(spec))
            run_worker(python, work_dir / "spec.json", progress)
        metrics = json.loads((tmp / "isq-metrics.json").read_text())
        if base_ppl is None:
            write_text_atomic(base_ppl_file,
                              json.dumps({"perplexity": metrics["base_perplexity"]}))
        report = {
            "model": model_name, "base_dir": str(base_dir), "key": key,
            **isq.job_params(),
            "calibration": {"source": isq.calibration.source,
                            "windows": len(calibration) if calibration else 0,
                            "seq_len": isq.calibration.seq_len if calibration else 0},
            "heldout": isq.evaluation.model_dump(),
            "base_perplexity": metrics["base_perplexity"],
            "perplexity": metrics["perplexity"],
            "perplexity_increase": metrics["perplexity"] / metrics["base_perplexity"] - 1,
            "quantize_seconds": metrics["quantize_seconds"],
            "job_seconds": time.monotonic() - started,
            "bytes": checkpoint_bytes.compare(base_dir, tmp),
            "toolkit": list(TOOLKIT_REQUIREMENTS),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=2))

    progress(f"{isq.describe()}: cache key {key[:16]} -> {target}")
    built = build_once(target, REPORT, build)
    report = json.loads((target / REPORT).read_text())
    progress(f"{isq.describe()}: {'built' if built else 'reused cached result'}; perplexity "
             f"{report['perplexity']:.3f} vs base {report['base_perplexity']:.3f} "
             f"({100 * report['perplexity_increase']:+.2f}%)")
    check_quality(report, isq)
    return IsqResult(path=target, report=report, reused=not built)


def check_quality(report: dict[str, Any], isq: IsqConfig) -> None:
    increase = report["perplexity_increase"]
    if increase > isq.max_perplexity_increase:
        raise IsqQualityError(
            f"isq quality gate: {isq.describe()} raised held-out perplexity from "
            f"{report['base_perplexity']:.3f} to {report['perplexity']:.3f} "
            f"({100 * increase:+.2f}%), more than max_perplexity_increase "
            f"{isq.max_perplexity_increase:g} ({100 * isq.max_perplexity_increase:+.2f}%); "
            "the deployment will not start on this model")


def run_worker(python: Path, spec: Path, progress: Progress) -> None:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent),
               TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([str(python), "-m", "isq.worker", str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    last_bar = 0.0
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip().rsplit("\r", 1)[-1]
        tail = (tail + [line])[-40:]
        # The worker's own lines always; the toolkit's progress bars every 10 s.
        is_bar = "it/s]" in line or "s/it]" in line
        if line.startswith("[isq") or (is_bar and (time.monotonic() - last_bar > 10
                                                   or "100%|" in line)):
            progress(line)
            last_bar = time.monotonic() if is_bar else last_bar
    if proc.wait() != 0:
        raise RuntimeError("quantization job failed (exit %d):\n%s" % (proc.returncode,
                                                                       "\n".join(tail)))


# -- as a Ray task -----------------------------------------------------------------------

def quantize_on_ray(base_dir: Path, model_name: str, isq: IsqConfig, cache_dir: Path,
                    use_gpu: bool = False, progress: Progress = _stderr) -> IsqResult:
    """Run `quantize` as a Ray task (on a GPU node when the deployment's replicas use GPUs)
    and wait for it. Its progress lines reach the driver's log through Ray's log stream."""
    import ray

    task = ray.remote(quantize).options(
        num_cpus=isq.num_cpus, num_gpus=1 if use_gpu else 0, max_retries=0,
        name=f"isq:{model_name}:{isq.method}-w{isq.bits}")
    progress(f"{isq.describe()}: running as a Ray task")
    ref = task.remote(Path(base_dir), model_name, isq, Path(cache_dir))
    try:
        return ray.get(ref, timeout=isq.timeout_s)
    except ray.exceptions.GetTimeoutError:
        ray.cancel(ref, force=True)
        raise TimeoutError(f"isq job {isq.describe()} did not finish within timeout_s "
                           f"{isq.timeout_s:g} (is a node with {isq.num_cpus:g} free CPUs "
                           "available?)") from None
    except ray.exceptions.RayTaskError as e:
        # Re-raise the job's own exception (quality gate, toolkit failure) unwrapped.
        raise e.as_instanceof_cause() from None
