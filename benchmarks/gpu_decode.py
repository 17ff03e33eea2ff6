"""Decode speed on one GPU, every row in the same run (issue 14, benchmarks b and c).

    python -m benchmarks.gpu_decode [--rows xlora,quant] [--model-dir /tmp/llama8b-random]

(b) X-LoRA: the default model in bf16 — base with CUDA graphs (as users run it), X-LoRA
    granular and non-granular under CUDA graphs (as replicas serve them) and non-granular
    eager (as served before) — on the X-LoRA fixture (`ruvllm xlora-fixture`).
(c) Quantized 8B: the Llama-3-8B-shaped random model of `benchmarks.gpu_stack_vs_vllm` in
    bf16, with vLLM's FP8 (weights quantized at load, W8A8 on Hopper), and W4A16: by
    default a GPTQ-format checkpoint of the same shape whose 4-bit weights are random
    (`--w4a16-dir random`; vLLM serves it with its Marlin-family kernels), or any W4A16
    checkpoint directory. Decode speed depends on the shapes and the kernel, not on the
    values, so random 4-bit weights measure what a real quantization of the 8B would; the
    quality of ISQ's W4A16 is measured on the default model (tests/gpu/test_isq_gpu.py).
    Then the same checkpoint on each other 4-bit kernel vLLM has on CUDA
    (`w4a16_kernel_rows`; `--only` picks rows by name).

Each row is its own process (one engine, its memory freed after): 32 prompt tokens, then
`--tokens` generated tokens (ignore_eos) for a batch of 1 and of 64 (`--batches` sweeps
other sizes: where a 4-bit kernel stops paying is a matter of concurrency); decode tok/s is
the generated tokens over the wall time after a warm-up. Writes report.{json,md,png} under
--out.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.harness import ROOT, log

ROW_SCRIPT = r'''
import json, statistics, sys, time
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    spec = json.loads(sys.argv[1])
    llm = LLM(model=spec["model"], dtype=spec.get("dtype", "bfloat16"), enforce_eager=spec["eager"],
              quantization=spec.get("quantization"), max_model_len=1024, seed=0,
              gpu_memory_utilization=0.85, enable_prefix_caching=False, max_num_seqs=256)
    result = {}
    for batch in spec["batches"]:
        prompts = [{"prompt_token_ids": [(7 * i + j) % 5000 + 100 for j in range(32)]}
                   for i in range(batch)]
        params = SamplingParams(temperature=0.0, max_tokens=spec["tokens"], ignore_eos=True)
        llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True))  # warm up
        # Repeats, median reported: one 256-token run of the launch-bound default model
        # moved 20,197-25,560 tok/s at batch 64 between two runs of one H200 lease.
        runs = []
        for _ in range(spec.get("repeats", 1)):
            started = time.perf_counter()
            outs = llm.generate(prompts, params)
            elapsed = time.perf_counter() - started
            tokens = sum(len(o.outputs[0].token_ids) for o in outs)
            runs.append(tokens / elapsed)
        # The lower middle run of an even count, as benchmark a's median_run.
        result[str(batch)] = {"tokens": tokens, "tok_per_s": statistics.median_low(runs),
                              "runs_tok_per_s": runs}
    print("RESULT " + json.dumps(result), flush=True)
'''


def run_script(name: str, spec: dict, script: Path) -> tuple[dict, str]:
    """One row's script in a process of its own (one engine each): the JSON of its
    `RESULT ` line, and all it printed."""
    log(f"{name}: starting")
    run = subprocess.run([sys.executable, str(script), json.dumps(spec)],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **spec.get("env", {})})
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name} failed:\n{run.stderr[-3000:]}")
    return json.loads(line[7:]), run.stdout + run.stderr


def loaded_gib(output: str) -> float | None:
    """The weights' size in GPU memory as vLLM logs it ("Model loading took 14.99 GiB and
    ..." in 0.26, "... GiB memory and ..." in 0.32). Not the checkpoint's: FP8 quantized at
    load reads a bf16 checkpoint and keeps half of it."""
    found = re.search(r"Model loading took ([\d.]+) GiB", output)
    return float(found.group(1)) if found else None


def run_row(name: str, spec: dict, script: Path) -> dict:
    started = time.monotonic()
    result, output = run_script(name, spec, script)
    # Which GEMM kernels vLLM picked for the quantized rows (it logs its choice).
    result["kernels"] = sorted({m.strip() for m in re.findall(
        r"Using (\w+(?:LinearKernel|Kernel|kernel)\w*)", output)})
    if loaded := loaded_gib(output):
        result["loaded_gib"] = loaded
    log(f"{name}: " + ", ".join(f"batch {b} {result[b]['tok_per_s']:.0f} tok/s"
                                for b in map(str, spec["batches"]))
        + f" ({time.monotonic() - started:.0f} s with start-up) {result['kernels']}")
    return result


def xlora_rows(tokens: int) -> dict[str, dict]:
    from ruvllm.adapters.xlora.checkpoint import export_for_vllm
    from ruvllm.adapters.xlora.fixture import build_fixture
    from ruvllm.model_store import prepare_builtin

    base = prepare_builtin("smollm2-135m-instruct")
    xlora = build_fixture(base)
    exported = xlora.parent / "exported"
    common = {"tokens": tokens, "batches": [1, 64], "repeats": 5}
    granular = str(export_for_vllm(xlora, base, exported, {}))
    non_granular = str(export_for_vllm(xlora, base, exported, {"non_granular": True}))
    # As replicas serve them (deployments/replica.py): both modes under CUDA graphs; their
    # outputs under graphs are the GPU parity test's to vouch for (tests/gpu:
    # test_xlora_model_matches_peft_...). Non-granular eager is how it was served before
    # 2026-12-01, kept as its peer.
    return {
        "base (CUDA graphs)": {"model": str(base), "eager": False, **common},
        "X-LoRA granular (CUDA graphs; as served)": {"model": granular, "eager": False, **common},
        "X-LoRA non-granular (CUDA graphs; as served)": {"model": non_granular, "eager": False,
                                                         **common},
        "X-LoRA non-granular (eager)": {"model": non_granular, "eager": True, **common},
    }


def build_random_gptq(path: Path, like: Path, group_size: int = 128, lm_head: bool = False) -> Path:
    """A GPTQ-format (4-bit, symmetric, group 128, no act-order) checkpoint of `like`'s
    Llama shape, every linear layer's packed weights random; embeddings, norms and the LM
    head stay bf16 as GPTQ leaves them, or with `lm_head` the head is 4-bit too (GPTQ's
    `lm_head: true`, which vLLM loads into its quantized ParallelLMHead)."""
    if (path / ".ready").exists():
        return path
    import torch
    from safetensors.torch import save_file

    from benchmarks.gpu_stack_vs_vllm import copy_tokenizer

    config = json.loads((like / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
              "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (hidden, inter), "mlp.up_proj": (hidden, inter),
              "mlp.down_proj": (inter, hidden)}  # (in_features, out_features)
    path.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)

    def packed(rows: int, cols: int) -> torch.Tensor:
        return torch.randint(-2**31, 2**31 - 1, (rows, cols), dtype=torch.int32, device=device,
                             generator=gen).cpu()

    def bf16(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, device=device, generator=gen) * std).to(torch.bfloat16).cpu()

    def quantized(prefix: str, k: int, n: int) -> dict[str, torch.Tensor]:
        return {f"{prefix}.qweight": packed(k // 8, n),
                # Symmetric GPTQ stores zero point 8 as 7 in every nibble; Marlin ignores it.
                f"{prefix}.qzeros": torch.full((k // group_size, n // 8), 0x77777777, dtype=torch.int32),
                f"{prefix}.scales": torch.full((k // group_size, n), 0.002, dtype=torch.float16),
                f"{prefix}.g_idx": torch.arange(k, dtype=torch.int32) // group_size}

    for layer in range(config["num_hidden_layers"]):
        tensors = {f"model.layers.{layer}.input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                   f"model.layers.{layer}.post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
        for name, (k, n) in shapes.items():
            tensors.update(quantized(f"model.layers.{layer}.{name}", k, n))
        save_file(tensors, str(path / f"layer-{layer:02d}.safetensors"), metadata={"format": "pt"})
    head = (quantized("lm_head", hidden, config["vocab_size"]) if lm_head
            else {"lm_head.weight": bf16(config["vocab_size"], hidden)})
    save_file({"model.embed_tokens.weight": bf16(config["vocab_size"], hidden),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), **head},
              str(path / "embeddings.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                     "desc_act": False, "sym": True, "checkpoint_format": "gptq",
                                     "lm_head": lm_head}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    copy_tokenizer(like, path)
    (path / ".ready").write_text("ok")
    return path


def quant_rows(model_dir: Path, w4a16_dir: str | None, tokens: int) -> dict[str, dict]:
    from benchmarks.gpu_stack_vs_vllm import build_random_llama
    from ruvllm.model_store import prepare_builtin

    build_random_llama(model_dir, prepare_builtin("smollm2-135m-instruct"))
    common = {"tokens": tokens, "batches": [1, 64], "eager": False}
    rows = {"8B bf16": {"model": str(model_dir), **common},
            "8B FP8 (W8A8, quantized at load)": {"model": str(model_dir), "quantization": "fp8",
                                                 **common}}
    if w4a16_dir == "random":
        gptq = str(build_random_gptq(model_dir.with_name(model_dir.name + "-gptq"), model_dir))
        rows["8B W4A16 (GPTQ, random 4-bit weights)"] = {"model": gptq, **common}
        head4 = model_dir.with_name(model_dir.name + "-gptq-head4")
        rows.update(w4a16_kernel_rows(str(model_dir), gptq, common, gptq_4bit_head=lambda: str(
            build_random_gptq(head4, model_dir, lm_head=True))))
    elif w4a16_dir:
        rows["8B W4A16"] = {"model": w4a16_dir, **common}
    return rows


def w4a16_kernel_rows(model: str, gptq: str, common: dict,
                      gptq_4bit_head: Callable[[], str] | None = None) -> dict[str, dict]:
    """The same W4A16 checkpoint on each 4-bit kernel vLLM 0.26 has for it on CUDA, chosen
    by disabling the ones it prefers (`VLLM_DISABLED_KERNELS`), in bf16 and in fp16
    activations (GPTQ's own dtype; ExLlama's kernel takes fp16 only), with an fp16 base as
    the fp16 rows' own peer. Profiled on 2026-12-01, Marlin's 4-bit GEMMs at batch 1 read
    their weights at 1.57 TB/s in bf16, 41% of the bandwidth bf16's GEMMs reach: the W4A16
    miss. Marlin was written for fp16 first; whether its bf16 path is the slower one, and
    whether another kernel does better, is what these rows measure (12-02: ExLlama 1.58x
    at batch 1, the best, but 0.49x at batch 64; 15:56, across batch 1-256: Humming the
    fastest W4A16 kernel at every size, 1.56x at batch 1 and 1.22x at 64, in fp16 no
    faster)."""
    # As a replica picks it (engine.w4a16_kernel): every kernel vLLM would try first off.
    from ruvllm.deployments.vllm_engine import w4a16_kernel_env as up_to

    fp16 = {**common, "dtype": "float16"}
    return {
        "8B W4A16 Marlin (bf16)": {"model": gptq, **common, "env": up_to("marlin")},
        "8B W4A16 Marlin (fp16)": {"model": gptq, **fp16, "env": up_to("marlin")},
        "8B fp16": {"model": model, **fp16},
        "8B W4A16 ExLlama (fp16)": {"model": gptq, **fp16, "env": up_to("exllama")},
        "8B W4A16 Triton (bf16)": {"model": gptq, **common, "env": up_to("tritonw4a16")},
        # Humming compiles its kernels on the device (NVRTC, the image's CUDA toolkit);
        # its wheel comes in extras.sh's x0.
        "8B W4A16 Humming (bf16)": {"model": gptq, **common, "env": up_to("humming")},
        "8B W4A16 Humming (fp16)": {"model": gptq, **fp16, "env": up_to("humming")},
    } | ({
        # The bf16 head takes 0.25 ms of each batch-1 step (profile, 12-01), where a Humming
        # step is 3.2 ms: the step with the head in 4 bits too, as the model of
        # 0.28x the bytes has it. Its checkpoint is built only when the row runs.
        "8B W4A16 Humming (bf16; 4-bit LM head)": {"model": gptq_4bit_head, **common,
                                                   "env": up_to("humming")},
    } if gptq_4bit_head else {})


def weight_bytes(model: str) -> int:
    return sum(p.stat().st_size for p in Path(model).glob("*.safetensors"))


PEERS = {"xlora": "base (CUDA graphs)", "quant": "8B bf16"}


def batch_sizes(rows: dict) -> list[str]:
    """Every batch size some row measured, smallest first (the keys of a row's results)."""
    return sorted({b for r in rows.values() for b in r if b.isdigit()}, key=int)


def row_cells(row: dict, peer: dict, batches: list[str]) -> list[str]:
    """A row's table cells: tok/s (with its runs' spread) and the ratio to the peer's, per
    batch size; then the checkpoint's weight size and its ratio, the weights' size once
    loaded on the GPU (as vLLM logs it), and the GEMM kernels vLLM chose."""
    cells = []
    for b in batches:
        if b not in row:
            cells += ["—", "—"]
            continue
        runs = row[b].get("runs_tok_per_s") or []
        spread = f" ({min(runs):.0f}-{max(runs):.0f})" if len(runs) > 1 else ""
        ratio = f"{row[b]['tok_per_s'] / peer[b]['tok_per_s']:.2f}x" if b in peer else "—"
        cells += [f"{row[b]['tok_per_s']:.0f}{spread}", ratio]
    size, peer_size = row.get("weight_bytes", 0), peer.get("weight_bytes") or 0
    loaded = row.get("loaded_gib")
    return cells + [f"{size / 2**30:.2f}", f"{size / peer_size:.2f}x" if peer_size else "—",
                    f"{loaded:.2f}" if loaded else "—", ", ".join(row.get("kernels", [])) or "—"]


def write_report(out: Path, result: dict) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=2))
    lines = ["# Decode speed on a GPU", "",
             f"Measured {result['date']} on **{result['gpu']}**, vLLM {result['vllm']}, bf16 "
             "unless a row names fp16, "
             f"one engine start per row; {result['tokens']} generated tokens per sequence after "
             "32 prompt tokens; where a row lists runs, its figure is their median.", ""]
    for section, title in (("xlora", "X-LoRA vs base (default model)"),
                           ("quant", "Quantized 8B vs bf16")):
        rows, peer = result["rows"].get(section), PEERS[section]
        if not rows:
            continue
        batches = batch_sizes(rows)
        lines += [f"## {title}", "", f"Peer: {peer}.", "",
                  "| row | " + "".join(f"batch {b} tok/s | vs peer | " for b in batches)
                  + "checkpoint GiB | vs peer | loaded GiB | kernels |",
                  "|---" * (2 * len(batches) + 5) + "|"]
        for name, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | failed: {r['error']} |" + " |" * (2 * len(batches) + 3))
                continue
            lines.append(f"| {name} | " + " | ".join(row_cells(r, rows.get(peer, {}), batches)) + " |")
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += ["Targets (issue 14): X-LoRA granular >= 0.5x and non-granular >= 0.8x the base "
              "(with CUDA graphs) at batch 64; W4A16 >= 1.8x and FP8 >= 1.3x bf16 at batch 1.",
              "", "![decode speed](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, result)


def plot_sweep(ax, rows: dict, batches: list[str], peer: str, gpu: str) -> None:
    for name, r in rows.items():
        sizes = [b for b in batches if b in r and b in rows.get(peer, {})]
        ax.plot([int(b) for b in sizes],
                [r[b]["tok_per_s"] / rows[peer][b]["tok_per_s"] for b in sizes], marker="o", label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(b) for b in batches], batches)
    ax.set_xlabel("batch (sequences decoding together)")
    ax.set_ylabel(f"decode tok/s vs {peer}")
    ax.set_title(f"decode speed vs {peer} ({gpu})")
    ax.legend(fontsize=7)


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = [s for s in ("xlora", "quant") if result["rows"].get(s)]
    fig, axes = plt.subplots(1, len(sections), figsize=(7 * len(sections), 4), squeeze=False)
    for ax, section in zip(axes[0], sections):
        rows = {n: r for n, r in result["rows"][section].items() if "error" not in r}
        batches = batch_sizes(rows)
        if len(batches) > 2:  # a sweep: where each kernel crosses its peer
            plot_sweep(ax, rows, batches, PEERS[section], result["gpu"])
            continue
        names = list(rows)
        width = 0.8 / len(batches)
        for i, b in enumerate(batches):
            ax.bar([j + i * width for j in range(len(names))],
                   [rows[n].get(b, {}).get("tok_per_s", 0) for n in names], width, label=f"batch {b}")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=15, fontsize=8)
        ax.set_yscale("log")
        ax.set_title(f"decode tok/s ({result['gpu']})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def row_names(only: str) -> set[str]:
    """--only's row names: comma-separated, where a comma inside a name's parentheses
    ("8B FP8 (W8A8, quantized at load)") belongs to the name."""
    return {n.strip() for n in re.split(r",(?![^()]*\))", only) if n.strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="xlora,quant")
    parser.add_argument("--only", default="",
                        help="comma-separated row names to run (default: every row of --rows)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/llama8b-random"))
    parser.add_argument("--w4a16-dir", default="random",
                        help="'random' (a GPTQ checkpoint with random 4-bit weights), a W4A16 "
                             "checkpoint directory, or '' for no W4A16 row")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_decode")
    parser.add_argument("--batches", default="",
                        help="batch sizes for every row, e.g. 1,8,32,64,128,256 (default: each "
                             "row's own, 1 and 64); the report plots each row against its peer")
    parser.add_argument("--repeats", type=int, default=0,
                        help="runs per batch size, median reported (default: each row's own)")
    parser.add_argument("--rewrite-report", action="store_true",
                        help="re-render report.md/.png from report.json (e.g. after adding notes)")
    args = parser.parse_args()
    if args.rewrite_report:
        write_report(args.out, json.loads((args.out / "report.json").read_text()))
        return 0

    import vllm

    from benchmarks.gpu_stack_vs_vllm import gpu_name

    args.out.mkdir(parents=True, exist_ok=True)
    script = Path(tempfile.mkdtemp(prefix="gpu-decode-")) / "row.py"
    script.write_text(ROW_SCRIPT)
    sections = {"xlora": lambda: xlora_rows(args.tokens),
                "quant": lambda: quant_rows(args.model_dir, args.w4a16_dir, args.tokens)}
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": gpu_name(),
              "vllm": vllm.__version__, "tokens": args.tokens, "rows": {}}
    wanted = row_names(args.only)
    plan = {section: sections[section]() for section in args.rows.split(",")}
    if unknown := wanted - {name for rows in plan.values() for name in rows}:
        parser.error(f"--only names no row: {sorted(unknown)}")
    overrides = ({"batches": [int(b) for b in args.batches.split(",")]} if args.batches else {}) \
        | ({"repeats": args.repeats} if args.repeats else {})
    for section, rows in plan.items():
        result["rows"][section] = {}
        for name, spec in rows.items():
            if wanted and name not in wanted:
                continue
            spec = {**spec, **overrides}
            if callable(spec["model"]):  # a checkpoint built only for the row that runs it
                spec["model"] = spec["model"]()
            try:
                row = run_row(name, spec, script)
            except RuntimeError as e:  # one row failing (an X-LoRA mode, a kernel) is a finding
                log(str(e))
                row = {"error": str(e).splitlines()[-1][:300]}
            row["weight_bytes"] = weight_bytes(spec["model"])
            result["rows"][section][name] = row
            write_report(args.out, result)  # partial results survive a later failure
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
