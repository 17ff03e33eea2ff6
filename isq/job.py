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
times, and the perplexities of base and quantized model on every evaluation set; the
quality gate reads it on every use, since the threshold and the held-out text are the
deployment's and not part of the key (neither changes the weights). When the evaluation
sets differ from the ones the report measured, the job measures the cached checkpoint on
them (memoised per key and sets) instead of quantizing again.
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
from ruvllm.isq import checkpoint_bytes
from ruvllm.corpus import HOLDOUT_EVERY
from ruvllm.isq.toolkit_env import TOOLKIT_REQUIREMENTS, toolkit_python

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

@dataclass(frozen=True)
class EvalSet:
    """Held-out windows the quantized model is measured on; `gated` sets decide the gate."""

    name: str
    description: str
    windows: list[list[int]]
    gated: bool


def calibration_windows(base_dir: Path, calibration: CalibrationConfig,
                        holdout: bool = False) -> list[list[int]]:
    """Token windows to calibrate on: the corpus's train splits in equal shares, or the
    configured local text file (.txt, or .jsonl with a `text` field per line), less its
    held-out documents when `holdout` (corpus.holdout_split)."""
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
    texts = corpus.file_documents(Path(calibration.source))
    if holdout:
        texts = corpus.holdout_split(texts).train
    return corpus.token_windows(tokenizer, texts, calibration.seq_len, calibration.samples)


def evaluation_sets(base_dir: Path, isq: IsqConfig) -> list[EvalSet]:
    """The gated sets `isq.evaluation_sources` names, then the generic out-of-distribution
    set (reported only). A file gives up to `windows` windows; one too small for even one
    is an error that says so."""
    from transformers import AutoTokenizer

    from ruvllm import corpus

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ev = isq.evaluation
    sets = []
    for source in isq.evaluation_sources:
        if source == "builtin":
            per_domain = -(-ev.windows // len(corpus.DOMAINS))
            parts = [corpus.token_windows(tokenizer, corpus.corpus()[d].eval, ev.seq_len,
                                          per_domain, seed=5) for d in corpus.DOMAINS]
            windows = [w for group in zip(*parts) for w in group][:ev.windows]
            sets.append(EvalSet("builtin", "the corpus's eval splits (Python, JSON, prose)",
                                windows, True))
            continue
        if source == "calibration":
            name = "calibration-heldout"
            description = (f"every {corpus.HOLDOUT_EVERY}th document of "
                           f"{isq.calibration.source}, not used for calibration")
            texts = corpus.holdout_split(corpus.file_documents(Path(isq.calibration.source))).eval
        else:
            name, description = source, f"the file {source}"
            texts = corpus.file_documents(Path(source))
        windows = corpus.available_windows(tokenizer, texts, ev.seq_len, ev.windows, seed=5)
        if not windows:
            raise ValueError(f"evaluation set {name} ({description}) has fewer than "
                             f"evaluation.seq_len {ev.seq_len} tokens; give more text or a "
                             "smaller seq_len")
        sets.append(EvalSet(name, description, windows, True))
    if ev.out_of_distribution:
        sets.append(EvalSet("out-of-distribution", corpus.OUT_OF_DISTRIBUTION,
                            corpus.out_of_distribution_windows(tokenizer, ev.seq_len,
                                                               ev.windows), False))
    return sets


def _memoised(cache_dir: Path, kind: str, ident: dict[str, Any], compute: Callable[[], Any]):
    """`compute()`, kept as JSON under the cache by a digest of everything it depends on."""
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]
    memo = cache_dir / "isq" / kind / f"{digest}.json"
    try:
        return json.loads(memo.read_text())
    except (OSError, ValueError):
        pass
    value = compute()
    write_text_atomic(memo, json.dumps(value))
    return value


def _stamp(path: Path) -> list:
    return [str(path), path.stat().st_size, path.stat().st_mtime_ns]


def _inputs_ident(base_dir: Path, weights_sha256: str, sources: list[str]) -> dict[str, Any]:
    """What tokenized windows depend on besides settings: the weights, the tokenizer
    files, the corpus code or the local files."""
    from ruvllm import corpus

    ident: dict[str, Any] = {
        "weights": weights_sha256,
        "tokenizer": [_stamp(f)[1:] for f in sorted(base_dir.glob("tokenizer*"))]}
    if any(s == "builtin" for s in sources):
        ident["corpus"] = hashlib.sha256(Path(corpus.__file__).read_bytes()).hexdigest()
    ident["files"] = [_stamp(Path(s).expanduser()) for s in sources if s != "builtin"]
    return ident


def memoised_calibration_windows(base_dir: Path, calibration: CalibrationConfig,
                                 weights_sha256: str, cache_dir: Path,
                                 holdout: bool = False) -> list[list[int]]:
    """calibration_windows, kept under the cache: building the corpus and tokenizing it
    takes ~14 s here, which every app build would otherwise pay per calibrated variant
    just to compute the cache key. The memo is keyed by everything the windows depend on:
    the weights, the tokenizer files, the settings, the corpus code or the local file."""
    ident = {**_inputs_ident(base_dir, weights_sha256, [calibration.source]),
             "settings": calibration.model_dump(), "holdout": holdout}
    return _memoised(cache_dir, "calibration", ident,
                     lambda: calibration_windows(base_dir, calibration, holdout))


def memoised_evaluation_sets(base_dir: Path, isq: IsqConfig, weights_sha256: str,
                             cache_dir: Path) -> list[EvalSet]:
    sources = [isq.calibration.source if s == "calibration" else s
               for s in isq.evaluation_sources]
    ident = {**_inputs_ident(base_dir, weights_sha256, sources + ["builtin"]),
             "settings": isq.evaluation.model_dump(), "sources": list(isq.evaluation_sources)}
    sets = _memoised(cache_dir, "evaluation-windows", ident,
                     lambda: [vars(s) for s in evaluation_sets(base_dir, isq)])
    return [EvalSet(**s) for s in sets]


def evaluation_digest(sets: list[EvalSet]) -> str:
    return hashlib.sha256(json.dumps([vars(s) for s in sets]).encode()).hexdigest()


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
    mixed = f"-mixed{isq.mixed_precision.bits}" if isq.mixed_precision else ""
    return cache_dir / "isq" / f"{model_name}-{isq.method}-{scheme}{group}{mixed}-{key[:16]}"


# -- the job -----------------------------------------------------------------------------

def quantize(base_dir: Path, model_name: str, isq: IsqConfig, cache_dir: Path,
             progress: Progress = _stderr) -> IsqResult:
    """Return the quantized checkpoint for these settings, building it if needed, measure
    it on the configured evaluation sets (again only when they changed) and apply the
    quality gate (IsqQualityError names the failing set and both its perplexities)."""
    base_dir = Path(base_dir)
    progress(f"{isq.describe()}: hashing the base weights and preparing calibration and "
             "evaluation data")
    weights = weights_digest(base_dir)
    calibration = (memoised_calibration_windows(base_dir, isq.calibration, weights, cache_dir,
                                                isq.holds_out_calibration)
                   if isq.needs_calibration else None)
    sets = memoised_evaluation_sets(base_dir, isq, weights, cache_dir)
    digest = evaluation_digest(sets)
    key = cache_key(weights, isq, calibration)
    target = result_dir(cache_dir, model_name, isq, key)

    def build(tmp: Path) -> None:
        started = time.monotonic()
        python = toolkit_python(cache_dir, progress)
        metrics = run_job(python, base_dir, isq, sets, weights, cache_dir, progress,
                          calibration=calibration, out_dir=tmp)
        report = {
            "model": model_name, "base_dir": str(base_dir), "key": key,
            **isq.job_params(),
            "calibration": {"source": isq.calibration.source,
                            "windows": len(calibration) if calibration else 0,
                            "seq_len": isq.calibration.seq_len if calibration else 0,
                            "held_out": (f"every {HOLDOUT_EVERY}th document kept out for "
                                         "the evaluation set calibration-heldout")
                            if calibration and isq.holds_out_calibration else None},
            "evaluation": evaluation_report(sets, digest, metrics),
            "quantize_seconds": metrics["quantize_seconds"],
            # The settings, and what the sensitivity measurement kept at higher precision.
            "mixed_precision": ({**isq.mixed_precision.model_dump(),
                                 **metrics["mixed_precision"]}
                                if isq.mixed_precision else None),
            "threads": metrics.get("threads"),
            "device": metrics.get("device"),  # where the job quantized: cpu or the GPU's name
            "job_seconds": time.monotonic() - started,
            "bytes": checkpoint_bytes.compare(base_dir, tmp),
            "toolkit": list(TOOLKIT_REQUIREMENTS),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (tmp / REPORT).write_text(json.dumps(report, indent=2))

    progress(f"{isq.describe()}: cache key {key[:16]} -> {target}")
    built = build_once(target, REPORT, build)
    report = json.loads((target / REPORT).read_text())
    if report.get("evaluation", {}).get("digest") != digest:
        # Same weights, other held-out text: measure again, never re-quantize.
        report["evaluation"] = _memoised(
            cache_dir, "evaluation", {"key": key, "built": report["created"], "digest": digest},
            lambda: evaluation_report(sets, digest, run_job(
                toolkit_python(cache_dir, progress), base_dir, isq, sets, weights,
                cache_dir, progress, quantized_dir=target)))
    report.update(_headline(report["evaluation"]))
    report["gate"] = gate_verdict(report, isq)
    if report != json.loads((target / REPORT).read_text()):
        # The report beside the weights shows the evaluation and verdict of its last use.
        write_text_atomic(target / REPORT, json.dumps(report, indent=2))
    progress(f"{isq.describe()}: {'built' if built else 'reused cached result'}; " + "; ".join(
        f"{s['name']}{'' if s['gated'] else ' (not gated)'}: perplexity {s['perplexity']:.3f} "
        f"vs base {s['base_perplexity']:.3f} ({100 * s['perplexity_increase']:+.2f}%)"
        for s in report["evaluation"]["sets"]))
    check_quality(report, isq)
    return IsqResult(path=target, report=report, reused=not built)


def run_job(python: Path, base_dir: Path, isq: IsqConfig, sets: list[EvalSet], weights: str,
            cache_dir: Path, progress: Progress, calibration: list[list[int]] | None = None,
            out_dir: Path | None = None, quantized_dir: Path | None = None) -> dict[str, Any]:
    """One worker run: quantize into `out_dir` and evaluate, or only evaluate the checkpoint
    in `quantized_dir`. The base model's perplexity on a set is the same for every job, so
    it is kept once per weights and windows."""
    def base_file(s: EvalSet) -> Path:
        windows = hashlib.sha256(json.dumps(s.windows).encode()).hexdigest()[:16]
        return cache_dir / "isq" / "base-perplexity" / f"{weights[:16]}-{windows}.json"

    with tempfile.TemporaryDirectory(prefix="ruvllm-isq-") as work:
        work_dir = Path(work)
        (work_dir / "calibration.json").write_text(json.dumps(calibration or []))
        eval_specs = []
        for i, s in enumerate(sets):
            (work_dir / f"eval-{i}.json").write_text(json.dumps(s.windows))
            known = base_file(s)
            eval_specs.append({"name": s.name, "windows_file": str(work_dir / f"eval-{i}.json"),
                               "base_perplexity": json.loads(known.read_text())["perplexity"]
                               if known.is_file() else None})
        # The resolved grid always: job_params() names it only where it differs from the
        # grid a job had before `symmetric` existed (cache keys).
        spec = {**isq.job_params(), "symmetric": isq.symmetric_weights,
                "base_dir": str(base_dir),
                "out_dir": str(out_dir) if out_dir else None,
                "quantized_dir": str(quantized_dir) if quantized_dir else None,
                "metrics_file": str(work_dir / "metrics.json"),
                "calibration_file": str(work_dir / "calibration.json"),
                "eval_sets": eval_specs, "threads": isq.threads}
        (work_dir / "spec.json").write_text(json.dumps(spec))
        run_worker(python, work_dir / "spec.json", progress)
        metrics = json.loads((work_dir / "metrics.json").read_text())
    for s, spec_entry in zip(sets, eval_specs):
        if spec_entry["base_perplexity"] is None:
            write_text_atomic(base_file(s), json.dumps(
                {"perplexity": metrics["sets"][s.name]["base_perplexity"]}))
    return metrics


def evaluation_report(sets: list[EvalSet], digest: str, metrics: dict[str, Any]) -> dict:
    rows = []
    for s in sets:
        m = metrics["sets"][s.name]
        rows.append({"name": s.name, "description": s.description, "gated": s.gated,
                     "windows": len(s.windows), "seq_len": len(s.windows[0]),
                     "base_perplexity": m["base_perplexity"], "perplexity": m["perplexity"],
                     "perplexity_increase": m["perplexity"] / m["base_perplexity"] - 1})
    return {"digest": digest, "sets": rows, "eval_seconds": metrics.get("eval_seconds")}


def _headline(evaluation: dict[str, Any]) -> dict[str, float]:
    """The first gated set's figures at the top level, for readers of one number."""
    first = next(s for s in evaluation["sets"] if s["gated"])
    return {k: first[k] for k in ("base_perplexity", "perplexity", "perplexity_increase")}


def gate_verdict(report: dict[str, Any], isq: IsqConfig) -> dict[str, Any]:
    failed = [s["name"] for s in report["evaluation"]["sets"]
              if s["gated"] and s["perplexity_increase"] > isq.max_perplexity_increase]
    return {"max_perplexity_increase": isq.max_perplexity_increase,
            "gated_sets": [s["name"] for s in report["evaluation"]["sets"] if s["gated"]],
            "passed": not failed, "failed_sets": failed}


def check_quality(report: dict[str, Any], isq: IsqConfig) -> None:
    verdict = gate_verdict(report, isq)
    if verdict["passed"]:
        return
    sets = {s["name"]: s for s in report["evaluation"]["sets"]}
    what = "; ".join(
        f"on evaluation set {name} ({sets[name]['description']}, {sets[name]['windows']} x "
        f"{sets[name]['seq_len']} tokens) from {sets[name]['base_perplexity']:.3f} to "
        f"{sets[name]['perplexity']:.3f} ({100 * sets[name]['perplexity_increase']:+.2f}%)"
        for name in verdict["failed_sets"])
    raise IsqQualityError(
        f"isq quality gate: {isq.describe()} raised held-out perplexity {what}, more than "
        f"max_perplexity_increase {isq.max_perplexity_increase:g} "
        f"({100 * isq.max_perplexity_increase:+.2f}%); the deployment will not start on "
        "this model")


def die_with_parent() -> None:
    """`preexec_fn` for the toolkit worker: the kernel sends it SIGKILL when the process that
    started it dies. A job past `timeout_s` is cancelled with `ray.cancel(force=True)`, a
    SIGKILL no `finally` sees: without this the worker ran on, orphaned, holding a GPU or
    the cores (issue 16). Linux only (PR_SET_PDEATHSIG); elsewhere a no-op."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_worker(python: Path, spec: Path, progress: Progress) -> None:
    # The worker runs as a file in isolated mode (-I: no PYTHONPATH, no script directory on
    # sys.path): it needs nothing of the project, whose packages are importable only where
    # it is installed (the serving interpreter), never in the toolkit's venv, and the
    # serving side's PYTHONPATH would shadow the toolkit's packages there.
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    worker = Path(__file__).resolve().with_name("worker.py")
    proc = subprocess.Popen([str(python), "-I", str(worker), str(spec)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=die_with_parent)
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
