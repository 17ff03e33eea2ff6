"""Where a batch-1 decode step's time goes on one GPU: bf16 against W4A16 on the 8B shape.

    python -m benchmarks.gpu_decode_profile [--out DIR] [--rows bf16,w4a16-marlin,...]

Issue 14 asks W4A16 for 1.8x bf16's decode at batch 1; gpu_decode measured 1.55x on Marlin
(H200, 2026-11-30 15:13). This explains the figure instead of guessing: each row is one
process with vLLM's engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so torch's profiler
records the model's CUDA kernels, under CUDA graphs as served. Per row:

- wall time per step: batch 1, 32 prompt tokens, `--tokens` generated, median of 3 runs,
  without the profiler;
- GPU kernel time per step by kind (4-bit GEMM, 16-bit GEMM, attention, the rest), from one
  profiled run, and the rest of the step (wall minus kernels): the GPU waiting on the host;
- each GEMM kind's bytes of weights read per step (from the checkpoint's tensors) over its
  time: the bandwidth it reaches, against the GPU's peak.

Models: `benchmarks.gpu_stack_vs_vllm`'s random Llama-3-8B and `benchmarks.gpu_decode`'s
random GPTQ checkpoint of it (speed depends on shapes and kernels, not values). Writes
report.{json,md} under --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.harness import ROOT, log

ROW_SCRIPT = r'''
import json, os, statistics, sys, time
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in this process: profiled
if __name__ == "__main__":
    import torch
    from vllm import LLM, SamplingParams
    spec = json.loads(sys.argv[1])
    os.environ.update(spec.get("env", {}))
    on_gpu = torch.cuda.is_available()
    llm = LLM(model=spec["model"], dtype=spec["dtype"], enforce_eager=spec["eager"],
              max_model_len=1024, seed=0, enable_prefix_caching=False, max_num_seqs=8,
              **({"gpu_memory_utilization": 0.85} if on_gpu else {}))
    prompt = [{"prompt_token_ids": [(7 * j) % 5000 + 100 for j in range(32)]}]
    params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
    llm.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True))  # warm up
    walls = []
    for _ in range(3):
        started = time.perf_counter()
        llm.generate(prompt, params)
        walls.append((time.perf_counter() - started) / spec["tokens"])
    from torch.profiler import ProfilerActivity, profile
    kind = ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU
    with profile(activities=[kind]) as prof:
        llm.generate(prompt, params)
    if on_gpu:
        torch.cuda.synchronize()
    kernels = {}
    for event in prof.key_averages():
        own = (event.self_device_time_total if on_gpu else event.self_cpu_time_total)
        if own > 0 and (not on_gpu or event.device_type == torch.autograd.DeviceType.CUDA):
            kernels[event.key] = {"us": own, "count": event.count}
    print("RESULT " + json.dumps({"wall_s_per_step": statistics.median(walls),
                                  "walls": walls, "kernels": kernels,
                                  "device": "cuda" if on_gpu else "cpu"}), flush=True)
'''

# Kernel names, by what they do (vLLM 0.26 on Hopper: Marlin/Machete for 4-bit weights,
# cuBLAS/CUTLASS/nvjet for 16-bit GEMMs, FlashAttention for attention), first match wins:
# attention before the 16-bit GEMMs, because FlashAttention 3's kernels are CUTLASS ones
# (`cutlass::device_kernel<flash::...FlashAttnFwdSm90...>`).
KINDS = (("4-bit GEMM", re.compile(r"marlin|machete", re.I)),
         ("attention", re.compile(r"flash|attn|attention|paged|reshape_and_cache", re.I)),
         ("16-bit GEMM", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|cublas|sm90_", re.I)))


def kind_of(kernel: str) -> str:
    return next((name for name, pattern in KINDS if pattern.search(kernel)), "rest")


def weight_bytes(model: Path) -> dict[str, int]:
    """Bytes read per decode step by each GEMM kind: every linear layer's stored tensors
    (4-bit packed weights with their scales, or 16-bit weights) and the LM head; the
    embedding table is not read whole (one row per token)."""
    from safetensors import safe_open

    sizes = {"4-bit GEMM": 0, "16-bit GEMM": 0}
    for file in model.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if "embed_tokens" in key or "norm" in key:
                    continue
                t = f.get_slice(key)
                n = 1
                for d in t.get_shape():
                    n *= d
                nbytes = n * {"BF16": 2, "F16": 2, "F32": 4, "I32": 4}.get(t.get_dtype(), 2)
                quantized = key.rsplit(".", 1)[-1] in ("qweight", "qzeros", "scales", "g_idx")
                sizes["4-bit GEMM" if quantized else "16-bit GEMM"] += nbytes
    return sizes


def summarize(raw: dict, tokens: int, weights: dict[str, int]) -> dict:
    step_ms = raw["wall_s_per_step"] * 1e3
    by_kind: dict[str, float] = {}
    for name, k in raw["kernels"].items():
        by_kind[kind_of(name)] = by_kind.get(kind_of(name), 0.0) + k["us"] / 1e3 / tokens
    busy = sum(by_kind.values())
    top = sorted(raw["kernels"].items(), key=lambda kv: -kv[1]["us"])[:8]
    return {"step_ms": step_ms, "runs_step_ms": [w * 1e3 for w in raw["walls"]],
            "kernel_ms": by_kind, "busy_ms": busy, "host_wait_ms": step_ms - busy,
            "gb_per_s": {k: weights[k] / 1e9 / (by_kind[k] / 1e3)
                         for k in weights if weights[k] and by_kind.get(k)},
            "weight_gb": {k: v / 1e9 for k, v in weights.items()},
            "top_kernels": [{"name": n[:90], "ms_per_step": k["us"] / 1e3 / tokens,
                             "calls_per_step": k["count"] / tokens} for n, k in top],
            # Every kernel by its full name, so that a later reading can sort them anew.
            "kernels": {n: {"kind": kind_of(n), "ms_per_step": k["us"] / 1e3 / tokens,
                            "calls_per_step": k["count"] / tokens}
                        for n, k in raw["kernels"].items()},
            "device": raw["device"]}


def run_row(name: str, spec: dict, script: Path) -> dict:
    from benchmarks.gpu_decode import run_script

    started = time.monotonic()
    raw, _ = run_script(name, spec, script)
    row = summarize(raw, spec["tokens"], weight_bytes(Path(spec["model"])))
    log(f"{name}: {row['step_ms']:.2f} ms/step, kernels {row['busy_ms']:.2f} ms "
        f"({time.monotonic() - started:.0f} s with start-up)")
    return row


def rows(model_dir: Path, tokens: int, dtype: str) -> dict[str, dict]:
    from benchmarks.gpu_decode import build_random_gptq
    from benchmarks.gpu_stack_vs_vllm import build_random_llama
    from ruvllm.model_store import prepare_builtin

    build_random_llama(model_dir, prepare_builtin("smollm2-135m-instruct"))
    gptq = str(build_random_gptq(model_dir.with_name(model_dir.name + "-gptq"), model_dir))
    common = {"tokens": tokens, "dtype": dtype, "eager": False}
    return {
        "bf16": {"model": str(model_dir), **common},
        "w4a16-marlin": {"model": gptq, "env": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"},
                         **common},
        "w4a16-machete": {"model": gptq, **common},
        "bf16-eager": {"model": str(model_dir), **common, "eager": True},
        "w4a16-marlin-eager": {"model": gptq, "env": {"VLLM_DISABLED_KERNELS":
                                                      "MacheteLinearKernel"},
                               **common, "eager": True},
    }


def write_report(out: Path, result: dict) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=2))
    rows_ = result["rows"]
    peer = rows_.get("bf16", {}).get("step_ms")
    lines = [f"# Where a batch-1 decode step's time goes ({result['gpu']})", "",
             f"Measured {result['date']} on **{result['gpu']}**, vLLM {result['vllm']}, "
             f"batch 1, 32 prompt tokens, {result['tokens']} generated; step time the median "
             "of 3 unprofiled runs, kernel times from one profiled run (torch profiler).", "",
             "| row | step ms | tok/s vs bf16 | GPU kernels ms | 4-bit GEMM ms | 16-bit GEMM "
             "ms | attention ms | rest ms | host wait ms | 4-bit GB/s | 16-bit GB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows_.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * 9)
            continue
        k, bw = r["kernel_ms"], r["gb_per_s"]
        lines.append("| " + " | ".join([
            name, f"{r['step_ms']:.2f}", f"{peer / r['step_ms']:.2f}x" if peer else "—",
            f"{r['busy_ms']:.2f}", *(f"{k.get(c, 0):.2f}" for c in
                                     ("4-bit GEMM", "16-bit GEMM", "attention", "rest")),
            f"{r['host_wait_ms']:.2f}",
            *(f"{bw[c]:.0f}" if c in bw else "—" for c in ("4-bit GEMM", "16-bit GEMM"))]) + " |")
    for name, r in rows_.items():
        if "top_kernels" in r:
            lines += ["", f"Top kernels, {name}:", "", "| kernel | ms/step | calls/step |",
                      "|---|---|---|"]
            lines += [f"| `{t['name']}` | {t['ms_per_step']:.3f} | {t['calls_per_step']:.0f} |"
                      for t in r["top_kernels"]]
    (out / "report.md").write_text("\n".join(lines + ["", "![step time](report.png)"]) + "\n")
    plot(out, result)


def plot(out: Path, result: dict) -> None:
    """One stacked bar per row: the step's kernel time by kind, then the host's wait."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows_ = {n: r for n, r in result["rows"].items() if "error" not in r}
    fig, ax = plt.subplots(figsize=(8, 4))
    bottom = [0.0] * len(rows_)
    for part in ("4-bit GEMM", "16-bit GEMM", "attention", "rest", "host wait"):
        heights = [max(0.0, r["host_wait_ms"]) if part == "host wait"
                   else r["kernel_ms"].get(part, 0.0) for r in rows_.values()]
        ax.bar(list(rows_), heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("ms per decode step (batch 1)")
    ax.set_title(f"decode step by kernel kind ({result['gpu']})")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b-random"))
    parser.add_argument("--model", type=Path, default=None,
                        help="profile this checkpoint alone (e.g. the default model on CPU)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "gpu_decode" / "profile")
    args = parser.parse_args()

    import vllm

    from benchmarks.gpu_stack_vs_vllm import gpu_name

    args.out.mkdir(parents=True, exist_ok=True)
    script = Path(tempfile.mkdtemp(prefix="gpu-profile-")) / "row.py"
    script.write_text(ROW_SCRIPT)
    specs = ({"model": {"model": str(args.model), "tokens": args.tokens, "dtype": args.dtype,
                        "eager": True}} if args.model
             else rows(args.model_dir, args.tokens, args.dtype))
    wanted = {n for n in args.rows.split(",") if n}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu_name(),
              "vllm": vllm.__version__, "tokens": args.tokens, "rows": {}}
    for name, spec in specs.items():
        if wanted and name not in wanted:
            continue
        try:
            result["rows"][name] = run_row(name, spec, script)
        except RuntimeError as e:  # one kernel failing is a finding, not the end of the run
            log(str(e))
            result["rows"][name] = {"error": str(e).splitlines()[-1][:300]}
        write_report(args.out, result)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
