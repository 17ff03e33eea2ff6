"""The GEMMs of one 8B decode step, bf16 against PyTorch's own 4-bit kernel, outside vLLM
(issue 14: W4A16 at batch 1).

    python -m benchmarks.gpu_int4_gemm [--batches 1,8,32] [--inner-k-tiles 2,4,8] [--out DIR]

Why: profiled on an H200 (12-01, `gpu_decode/profile/`), the W4A16 miss at batch 1 is the
4-bit GEMMs' bandwidth: Marlin reads its weights at 1.57 TB/s where cuBLAS's bf16 GEMVs reach
3.79, and every 4-bit kernel vLLM 0.26 has on CUDA tops out at 1.56-1.58x bf16 end to end
(`gpu_decode/sweep-1202/`, `kernels-1202/`); 1.8x needs the 4-bit GEMMs at >= 2.1 TB/s.
PyTorch ships one more 4-bit kernel, tinygemm (`aten._weight_int4pack_mm`: int4, group 128,
bf16 scales and zeros; gpt-fast's and torchao's int4 weight-only path, written for batch-1
decode). This measures whether it reads 4-bit weights fast enough before anything is built
on it.

Method: the linear layers of a Llama-3-8B step (32 layers of qkv 4096->6144, o 4096->4096,
gate_up 4096->28672, down 14336->4096; then the LM head 4096->128256), every layer with its
own weights so none is read from L2, one CUDA graph per scheme and part, replayed; the time
is the median replay by CUDA events. The report gives ms per step, the bytes the weights
take, GB/s, the ratio to bf16 in the same run, and at batch 1 the end-to-end step it
implies: these GEMMs plus the step's non-GEMM time in the profile (attention, norms,
sampling, host), marked as a projection. Before any timing, tinygemm's product on each shape
is checked against its dequantized weights in fp32; a setting that fails reports no speed.
Without a GPU the same script runs on the CPU twins of torch's int4 ops (a dry run the unit
tests use on small shapes; its times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from benchmarks.harness import ROOT, log

HIDDEN, KV, INTER, VOCAB, LAYERS, GROUP = 4096, 1024, 14336, 128256, 32, 128
# (in_features, out_features) of one decoder layer's GEMMs, fused as vLLM runs them.
LAYER_SHAPES = {"qkv": (HIDDEN, HIDDEN + 2 * KV), "o": (HIDDEN, HIDDEN),
                "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN)}
HEAD_SHAPE = (HIDDEN, VOCAB)
PROFILE = ROOT / "benchmarks" / "results" / "gpu_decode" / "profile" / "report.json"
BF16 = "bf16 (cuBLAS)"
MAX_CHECK_ERROR = 2e-2  # bf16 rounding of the product is ~4e-3; a wrong layout gives ~1


def pack_nibbles(q, high_first: bool = True):
    """[N, K] ints in 0..15 -> [N, K/2] uint8, two per byte: the input
    `_convert_weight_to_int4pack` takes on CUDA since torch 2.5 (torchao puts the even k in
    the high nibble; `high_first=False` is the other order, tried if that one fails)."""
    import torch

    even, odd = q[:, ::2], q[:, 1::2]
    return ((even << 4 | odd) if high_first else (odd << 4 | even)).to(torch.uint8)


def to_int4pack(q, inner_k_tiles: int, high_first: bool = True):
    """tinygemm's packed weight of q ([N, K] ints in 0..15), on q's device."""
    import torch

    if q.is_cuda:
        return torch._convert_weight_to_int4pack(pack_nibbles(q, high_first).contiguous(),
                                                 inner_k_tiles)
    return torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), inner_k_tiles)


def int4_mm(x, packed, scales_and_zeros):
    import torch

    if x.is_cuda:
        return torch._weight_int4pack_mm(x, packed, GROUP, scales_and_zeros)
    return torch._weight_int4pack_mm_for_cpu(x, packed, GROUP, scales_and_zeros)


def dequantized(q, scales_and_zeros):
    """tinygemm's weight in fp32: (q - 8) * scale + zero per group of GROUP input features;
    scales_and_zeros is [K / GROUP, N, 2]."""
    scale = scales_and_zeros[..., 0].float().repeat_interleave(GROUP, 0).T
    zero = scales_and_zeros[..., 1].float().repeat_interleave(GROUP, 0).T
    return (q.float() - 8) * scale + zero


def random_scales_and_zeros(k: int, n: int, device: str, gen):
    """bf16 scales and zeros that give weights of about bf16's random init (std 0.02)."""
    import torch

    scales = torch.full((k // GROUP, n), 0.02 / 4.6, device=device)  # 0..15 uniform: std 4.6
    zeros = torch.randn(k // GROUP, n, device=device, generator=gen) * 0.002
    return torch.stack([scales, zeros], -1).to(torch.bfloat16).contiguous()


def check_int4(k: int, n: int, inner_k_tiles: int, device: str, high_first: bool = True,
               batch: int = 4) -> float:
    """tinygemm's largest |error| against the dequantized weight's product, relative to the
    largest |product|."""
    import torch

    gen = torch.Generator(device=device).manual_seed(1)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, device=device, generator=gen)
    sz = random_scales_and_zeros(k, n, device, gen)
    x = torch.randn(batch, k, device=device, generator=gen).to(torch.bfloat16)
    got = int4_mm(x, to_int4pack(q, inner_k_tiles, high_first), sz).float()
    want = x.float() @ dequantized(q, sz).T
    return float((got - want).abs().max() / want.abs().max())


def checked_layout(inner_k_tiles: int, device: str) -> tuple[bool | None, dict[str, float]]:
    """The nibble order under which tinygemm computes every shape right (None if neither),
    and each shape's error under it."""
    shapes = {**LAYER_SHAPES, "head": HEAD_SHAPE}
    for high_first in (True, False):
        errors = {name: check_int4(k, n, inner_k_tiles, device, high_first)
                  for name, (k, n) in shapes.items()}
        if max(errors.values()) <= MAX_CHECK_ERROR:
            return high_first, errors
    return None, errors


def replay_ms(calls: list, device: str, repeats: int = 50) -> float:
    """Median time of one replay of a CUDA graph of `calls`, by CUDA events; on a CPU (a
    dry run of the whole script, as the unit tests do) of the calls in turn."""
    import torch

    if device != "cuda":
        times = []
        for _ in range(min(repeats, 3)):
            started = time.perf_counter()
            for call in calls:
                call()
            times.append((time.perf_counter() - started) * 1e3)
        return statistics.median(times)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS picks its kernels
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bf16_weights(gen, layers: int, device: str) -> dict[str, list]:
    """(in_features, weight) per GEMM: the layer stack and the head, random bf16."""
    import torch

    def weight(k: int, n: int):
        return (torch.randn(n, k, device=device, generator=gen) * 0.02).to(torch.bfloat16)

    return {"stack": [(k, weight(k, n)) for _ in range(layers) for k, n in LAYER_SHAPES.values()],
            "head": [(HEAD_SHAPE[0], weight(*HEAD_SHAPE))]}


def int4_weights(gen, layers: int, inner_k_tiles: int, device: str) -> dict[str, list]:
    """The same in tinygemm's layout: random bits of the packed shape and dtype (any bits
    are some 4-bit weights) with random scales and zeros."""
    import torch

    packed_like = {(k, n): to_int4pack(torch.zeros(n, k, dtype=torch.int32, device=device),
                                       inner_k_tiles)
                   for k, n in [*LAYER_SHAPES.values(), HEAD_SHAPE]}

    def weight(k: int, n: int):
        like = packed_like[(k, n)]
        bits = torch.iinfo(like.dtype)
        packed = torch.randint(bits.min, bits.max, like.shape, dtype=like.dtype, device=device,
                               generator=gen)
        return packed, random_scales_and_zeros(k, n, device, gen)

    return {"stack": [(k, weight(k, n)) for _ in range(layers) for k, n in LAYER_SHAPES.values()],
            "head": [(HEAD_SHAPE[0], weight(*HEAD_SHAPE))]}


def nbytes(weights: list) -> int:
    return sum(t.numel() * t.element_size() for _, w in weights
               for t in (w if isinstance(w, tuple) else (w,)))


def time_parts(weights: dict[str, list], batches: list[int], gen, device: str) -> dict:
    """ms per step of each part at each batch size, and each part's weight bytes."""
    import torch
    import torch.nn.functional as F

    row = {part: {"bytes": nbytes(ws)} for part, ws in weights.items()}
    for b in batches:
        x = {k: torch.randn(b, k, device=device, generator=gen).to(torch.bfloat16)
             for k in (HIDDEN, INTER)}
        for part, ws in weights.items():
            calls = [(lambda k=k, w=w: int4_mm(x[k], *w)) if isinstance(w, tuple)
                     else (lambda k=k, w=w: F.linear(x[k], w)) for k, w in ws]
            row[part][str(b)] = replay_ms(calls, device)
    return row


def non_gemm_ms(profile: Path = PROFILE) -> float | None:
    """The bf16 batch-1 step's time outside its GEMMs in the committed profile."""
    if not profile.exists():
        return None
    bf16 = json.loads(profile.read_text())["rows"]["bf16"]
    return bf16["step_ms"] - bf16["kernel_ms"]["16-bit GEMM"]


def combined(rows: dict) -> dict[str, dict]:
    """The schemes as a model would run them: each 4-bit setting with a 4-bit head and with
    a bf16 head (GPTQ checkpoints keep the head in bf16), next to bf16."""
    out = {BF16: {"stack": rows[BF16]["stack"], "head": rows[BF16]["head"]}}
    for name, r in rows.items():
        if name == BF16 or "error" in r:
            continue
        out[f"{name}, 4-bit head"] = {"stack": r["stack"], "head": r["head"]}
        out[f"{name}, bf16 head"] = {"stack": r["stack"], "head": rows[BF16]["head"]}
    return out


def table(result: dict) -> list[str]:
    batches = [str(b) for b in result["batches"]]
    schemes, other = combined(result["rows"]), result.get("non_gemm_ms")
    peer = schemes[BF16]

    def ms(s: dict, b: str) -> float:
        return s["stack"][b] + s["head"][b]

    lines = ["| scheme | " + "".join(f"batch {b} GEMM ms | vs bf16 | " for b in batches)
             + "weights GiB | batch 1 GB/s | projected batch-1 step ms | vs bf16 |",
             "|---" * (2 * len(batches) + 5) + "|"]
    for name, s in schemes.items():
        cells = []
        for b in batches:
            cells += [f"{ms(s, b):.3f}", f"{ms(peer, b) / ms(s, b):.2f}x"]
        size = s["stack"]["bytes"] + s["head"]["bytes"]
        cells += [f"{size / 2**30:.2f}", f"{size / ms(s, '1') / 1e6:.0f}" if "1" in batches else "—"]
        if other is not None and "1" in batches:
            cells += [f"{ms(s, '1') + other:.3f}", f"{(ms(peer, '1') + other) / (ms(s, '1') + other):.2f}x"]
        else:
            cells += ["—", "—"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for name, r in result["rows"].items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error']} |" + " |" * (2 * len(batches) + 3))
    return lines


def write_report(out: Path, result: dict) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=2))
    other = result.get("non_gemm_ms")
    lines = ["# 4-bit GEMMs of an 8B decode step, outside vLLM", "",
             f"Measured {result['date']} on **{result['gpu']}**, torch {result['torch']}: the "
             f"linear layers of {result['layers']} Llama-3-8B layers and the LM head, one CUDA "
             "graph per scheme and part, median of 50 replays; tinygemm is "
             "`aten._weight_int4pack_mm` (int4, group 128, bf16 scales and zeros).", "",
             *table(result), "",
             "Projected step: the GEMMs plus "
             + (f"{other:.3f} ms outside them (the bf16 batch-1 step in `gpu_decode/profile/`: "
                "attention, norms, sampling, host), not a measured decode."
                if other is not None else "nothing: no profile was found."), ""]
    checks = result.get("checks", {})
    if checks:
        lines += ["Checks (largest |error| against the dequantized product, relative):", ""]
        lines += [f"- {name}: " + ", ".join(f"{s} {e:.1e}" for s, e in c["errors"].items())
                  + f" (nibble order: {c['layout']})" for name, c in checks.items()]
        lines.append("")
    if result.get("notes"):
        lines += ["## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    lines += ["Target (issue 14): W4A16 decode >= 1.8x bf16 at batch 1.", "",
              "![GEMM time](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot(out, result)


def plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = [str(b) for b in result["batches"]]
    schemes = combined(result["rows"])
    peer = schemes[BF16]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in schemes.items():
        ax.plot([int(b) for b in batches],
                [(peer["stack"][b] + peer["head"][b]) / (s["stack"][b] + s["head"][b]) for b in batches],
                marker="o", label=name)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([int(b) for b in batches], batches)
    ax.set_xlabel("batch (rows in each GEMM)")
    ax.set_ylabel("step's GEMMs: speed vs bf16")
    ax.set_title(f"8B decode step's GEMMs vs bf16 ({result['gpu']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def measure(args) -> dict:
    import torch

    from benchmarks.gpu_stack_vs_vllm import gpu_name

    batches = [int(b) for b in args.batches.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(0)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "gpu": gpu_name() if device == "cuda" else "CPU (a dry run: no GPU here)",
              "torch": torch.__version__, "layers": args.layers, "batches": batches,
              "non_gemm_ms": non_gemm_ms(), "rows": {}, "checks": {}}
    weights = bf16_weights(gen, args.layers, device)
    result["rows"][BF16] = time_parts(weights, batches, gen, device)
    log(f"{BF16}: {result['rows'][BF16]}")
    del weights
    for tiles in (int(t) for t in args.inner_k_tiles.split(",")):
        name = f"tinygemm int4 g128 (inner k tiles {tiles})"
        if device == "cuda":
            torch.cuda.empty_cache()
        try:
            high_first, errors = checked_layout(tiles, device)
            result["checks"][name] = {"layout": {True: "even k high", False: "even k low",
                                                 None: "none computes right"}[high_first],
                                      "errors": errors}
            if high_first is None:
                raise ValueError(f"product off by up to {max(errors.values()):.2f} (relative)")
            result["rows"][name] = time_parts(int4_weights(gen, args.layers, tiles, device),
                                              batches, gen, device)
        except (RuntimeError, ValueError) as e:  # a kernel or setting this torch lacks
            result["rows"][name] = {"error": str(e).splitlines()[0][:200]}
        log(f"{name}: {result['rows'][name]}")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--inner-k-tiles", default="2,4,8",
                        help="tinygemm's K tiling (gpt-fast uses 8)")
    parser.add_argument("--layers", type=int, default=LAYERS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks" / "results" / "gpu_int4_gemm")
    parser.add_argument("--rewrite-report", action="store_true",
                        help="re-render report.md/.png from report.json (e.g. after adding notes)")
    args = parser.parse_args()
    if args.rewrite_report:
        write_report(args.out, json.loads((args.out / "report.json").read_text()))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    write_report(args.out, result)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
