"""Which Linear layers of the default model are most sensitive to 4-bit weights: the
measurement behind `precise_layers` (mixed precision, README "ISQ").

    python -m benchmarks.isq_sensitivity            # ~5 min on 2 cores

Round-to-nearest fake quantization in torch (symmetric int4, group 64, the same grid
compressed-tensors uses; no toolkit, no checkpoint written): every Linear at 4 bits, then
one group at a time lifted to 8 bits. A group's sensitivity is how much perplexity that
recovers, relative to the all-4-bit model, measured on calibration-side text (the
corpus's train splits), never on the held-out text the gate and the benchmark report.
Groups follow vLLM's fused layers (q/k/v together, gate/up together), by kind across all
blocks and by block across all kinds. Writes sensitivity.json and sensitivity.md under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.harness import MODEL, ROOT, log

KINDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
         "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}


def fake_quant(weight, bits: int, group: int):
    """Symmetric per-group round to nearest: scale = absmax / (2^(bits-1) - 1)."""
    import torch

    out, inp = weight.shape
    w = weight.reshape(out, inp // group, group)
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=-1, keepdim=True) / qmax).clamp(min=1e-8)
    return (torch.clamp(torch.round(w / scale), -qmax - 1, qmax) * scale).reshape(out, inp)


def perplexity(model, windows: list[list[int]]) -> float:
    import torch

    nll, n = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            nll += model(input_ids=x, labels=x).loss.item() * (len(ids) - 1)
            n += len(ids) - 1
    return math.exp(nll / n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "isq")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruvllm import corpus
    from ruvllm.model_store import prepare_builtin

    torch.manual_seed(0)
    base = prepare_builtin(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(base)
    per = -(-args.windows // len(corpus.DOMAINS))
    windows = [w for d in corpus.DOMAINS for w in corpus.token_windows(
        tokenizer, corpus.corpus()[d].train, args.seq_len, per, seed=23)]
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    linears = {n: m for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    original = {n: m.weight.data.clone() for n, m in linears.items()}
    four = {n: fake_quant(w, 4, args.group) for n, w in original.items()}
    eight = {n: fake_quant(w, 8, args.group) for n, w in original.items()}

    def measure(lifted: set[str]) -> float:
        for n, m in linears.items():
            m.weight.data.copy_(eight[n] if n in lifted else four[n])
        return perplexity(model, windows)

    started = time.monotonic()
    for n, m in linears.items():
        m.weight.data.copy_(original[n])
    base_ppl = perplexity(model, windows)
    all_four = measure(set())
    log(f"base {base_ppl:.3f}, all 4-bit {all_four:.3f}")
    blocks = sorted({int(n.split(".")[2]) for n in linears})
    groups: dict[str, set[str]] = {f"kind:{k}": {n for n in linears if n.rsplit(".", 1)[-1] in p}
                                   for k, p in KINDS.items()}
    groups.update({f"block:{b}": {n for n in linears if n.split(".")[2] == str(b)}
                   for b in blocks})
    total = sum(original[n].numel() for n in linears)
    rows = []
    for name, members in groups.items():
        ppl = measure(members)
        share = sum(original[n].numel() for n in members) / total
        rows.append({"group": name, "perplexity": ppl, "weight_share": share,
                     "recovered": (all_four - ppl) / (all_four - base_ppl),
                     "recovered_per_weight_share": (all_four - ppl) / (all_four - base_ppl) / share})
        log(f"{name}: {ppl:.3f} ({100 * rows[-1]['recovered']:.1f}% of the 4-bit loss "
            f"recovered, {100 * share:.1f}% of the weights)")
    result = {"measured": time.strftime("%Y-%m-%d %H:%M"), "model": MODEL,
              "text": f"{len(windows)} x {args.seq_len} tokens of the corpus's train splits",
              "group_size": args.group, "base_perplexity": base_ppl,
              "all_4bit_perplexity": all_four, "seconds": time.monotonic() - started,
              "groups": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(result, indent=2))
    ranked = sorted(rows, key=lambda r: -r["recovered_per_weight_share"])
    lines = ["# ISQ layer sensitivity", "",
             f"Measured {result['measured']}, {MODEL}, on {result['text']} (calibration side; "
             f"the held-out text is not used). RTN fake quantization, symmetric, group "
             f"{args.group}: base perplexity {base_ppl:.3f}, every Linear at 4 bits "
             f"{all_four:.3f}. Each row lifts one group to 8 bits.", "",
             "| group | perplexity | share of the 4-bit loss recovered | share of Linear "
             "weights | recovered per weight share |", "|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['perplexity']:.3f} | {100 * r['recovered']:.1f}% | "
              f"{100 * r['weight_share']:.1f}% | {r['recovered_per_weight_share']:.2f} |"
              for r in ranked]
    (args.out / "sensitivity.md").write_text("\n".join(lines) + "\n")
    log(f"report: {args.out / 'sensitivity.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
