"""Does the mixed-precision sensitivity proxy rank layers the way perplexity does?

    python -m benchmarks.isq_sensitivity          # ~10 min on 2 cores

isq/sensitivity.py ranks the decoder's Linear layers by their Fisher-weighted 4-bit
rounding error (one forward and backward pass per calibration window). The direct measure
it stands in for is the loss increase from rounding each layer alone, one evaluation per
layer (210 on SmolLM2-135M). This bench measures that directly for a spread of layers
(every 10th in the proxy's order), reports the rank correlation, and compares the proxy's
choice of layers to keep at 8 bits with two naive choices of the same size (random
layers; the MLP down projections, often called the sensitive ones) on a whole-model RTN
W4 g64 fake quantization, held-out and out-of-distribution. In-process with the serving
environment's transformers (no toolkit job); RTN rounding as in isq/sensitivity.py.

Writes sensitivity.json and sensitivity.md under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

from benchmarks.harness import MODEL, ROOT, log


def loss(model, windows: list[list[int]]) -> float:
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            total += model(input_ids=x, labels=x).loss.item() * (len(ids) - 1)
            tokens += len(ids) - 1
    return total / tokens


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for i, j in enumerate(order):
            r[j] = i
        return r

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensitivity-windows", type=int, default=16)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-seq-len", type=int, default=256)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "isq")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from isq.job import evaluation_sets, memoised_calibration_windows, weights_digest
    from isq.sensitivity import choose_kept, decoder_linears, fisher_sensitivity, rtn_error
    from ruvllm.config import CalibrationConfig, IsqConfig, resolve_cache_dir
    from ruvllm.model_store import prepare_builtin

    torch.manual_seed(0)
    base = prepare_builtin(MODEL)
    cache = resolve_cache_dir(None)
    calib = memoised_calibration_windows(base, CalibrationConfig(), weights_digest(base), cache)
    isq = IsqConfig.model_validate({"method": "rtn", "evaluation": {
        "windows": args.eval_windows, "seq_len": args.eval_seq_len}})
    sets = {s.name: s.windows for s in evaluation_sets(base, isq)}
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    linears = decoder_linears(model)
    sizes = {n: m.weight.numel() for n, m in linears.items()}

    t = time.monotonic()
    sens = fisher_sensitivity(model, calib[:args.sensitivity_windows], 4, 64)
    proxy_seconds = time.monotonic() - t
    log(f"proxy: {len(sens)} layers in {proxy_seconds:.0f} s")
    base_loss = {name: loss(model, w) for name, w in sets.items()}

    def with_rounded(names, what):
        saved = {n: linears[n].weight.data.clone() for n in names}
        with torch.no_grad():
            for n in names:
                linears[n].weight -= rtn_error(linears[n].weight, 4, 64).to(
                    linears[n].weight.dtype)
        try:
            return what()
        finally:
            for n, w in saved.items():
                linears[n].weight.data.copy_(w)

    order = sorted(sens, key=sens.get, reverse=True)
    probe = order[::10]
    t = time.monotonic()
    alone = {}
    for i, n in enumerate(probe, 1):
        alone[n] = with_rounded([n], lambda: loss(model, sets["builtin"])) - base_loss["builtin"]
        log(f"[{i}/{len(probe)}] {n}: proxy {sens[n]:.3g}, loss +{alone[n]:.5f}")
    direct_seconds = time.monotonic() - t
    rho = spearman([sens[n] for n in probe], [alone[n] for n in probe])

    kept = choose_kept(sens, sizes, args.fraction)
    rng = random.Random(0)
    shuffled = sorted(sizes)
    rng.shuffle(shuffled)
    random_kept, used = [], 0
    for n in shuffled:
        if used + sizes[n] <= args.fraction * sum(sizes.values()):
            random_kept.append(n)
            used += sizes[n]
    choices = {"none kept (all 4-bit)": [], "proxy's choice": kept,
               "random layers": random_kept,
               "every down_proj": [n for n in sizes if n.endswith("down_proj")]}
    rows = {}
    for label, keep in choices.items():
        rounded = [n for n in sizes if n not in set(keep)]
        ppl = with_rounded(rounded, lambda: {name: math.exp(loss(model, w))
                                             for name, w in sets.items()})
        rows[label] = {"kept_weight_fraction": sum(sizes[n] for n in keep) / sum(sizes.values()),
                       "kept_layers": len(keep),
                       **{f"{name}_increase": ppl[name] / math.exp(base_loss[name]) - 1
                          for name in sets}}
        log(f"{label}: {rows[label]}")
    result = {"measured": time.strftime("%Y-%m-%d %H:%M"), "model": MODEL,
              "proxy_seconds": proxy_seconds, "direct_seconds_per_layer":
              direct_seconds / len(probe), "sensitivity_windows": args.sensitivity_windows,
              "eval": f"{args.eval_windows} x {args.eval_seq_len} tokens per set",
              "spearman": rho, "probe": {n: {"proxy": sens[n], "loss_increase": alone[n]}
                                         for n in probe}, "choices": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sensitivity.json").write_text(json.dumps(result, indent=2))
    write_report(args.out, result)
    return 0


def write_report(out: Path, r: dict) -> None:
    lines = ["# Mixed-precision sensitivity proxy vs direct measurement", "",
             f"Measured {r['measured']} on 2 CPU cores, {r['model']}, RTN W4 g64 fake "
             f"quantization (float32), evaluation {r['eval']}.", "",
             f"Proxy (Fisher-weighted rounding error, {r['sensitivity_windows']} calibration "
             f"windows x 256 tokens): all 210 layers in {r['proxy_seconds']:.0f} s. Direct "
             f"(loss increase from rounding one layer alone): "
             f"{r['direct_seconds_per_layer']:.0f} s per layer, "
             f"{210 * r['direct_seconds_per_layer'] / 60:.0f} min for all 210.", "",
             f"Spearman rank correlation over {len(r['probe'])} layers (every 10th in the "
             f"proxy's order): **{r['spearman']:.2f}**.", "",
             "| layer | proxy | loss increase, rounded alone |", "|---|---|---|"]
    for n, v in r["probe"].items():
        lines.append(f"| {n} | {v['proxy']:.3g} | {v['loss_increase']:+.5f} |")
    lines += ["", "Whole model at 4 bits except the kept layers (8 bits would be ~lossless; "
              "here they stay in float32, so the comparison isolates which layers are kept):",
              "", "| kept | layers | share of Linear weights | " +
              " | ".join(k.replace("_increase", "") for k in next(iter(r["choices"].values()))
                         if k.endswith("_increase")) + " |",
              "|---|---|---|" + "---|" * sum(k.endswith("_increase")
                                              for k in next(iter(r["choices"].values())))]
    for label, row in r["choices"].items():
        lines.append(f"| {label} | {row['kept_layers']} | {row['kept_weight_fraction']:.3f} | " +
                     " | ".join(f"{100 * v:+.2f}%" for k, v in row.items()
                                if k.endswith("_increase")) + " |")
    (out / "sensitivity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
