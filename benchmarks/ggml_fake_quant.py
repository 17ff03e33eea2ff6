"""The weights and activations mistral.rs computes with under ISQ on a CPU, reproduced in
torch so that the ISQ quality gate's perplexity code can measure them (mistral.rs's API
returns log-probabilities of generated tokens only, never of a prompt).

What mistral.rs 0.9.5 does (source read at EricLBuehler/mistral.rs master 9e92262, the
code the wheel was built from, and the candle it pins, huggingface/candle 35d7ae7):

- Which tensors: `LlamaLoader::isq_layer_regexes` (pipeline/loaders/normal_loaders.rs):
  every decoder Linear (q, k, v, o, gate, up, down) and `lm_head`. The token embedding is
  not matched, and with tied embeddings (SmolLM2) `lm_head` is the embedding's own f32
  layer (`models/llama.rs`: `lm_head = wte.clone()`, `layers.rs`
  `embedding_with_legacy_tied_uqff` quantizes it only when `model.embed_tokens.weight`
  matches an ISQ predicate): so neither is quantized. (`promote_for_sensitive_tensor`,
  Q4_0 -> Q6K for `lm_head`, applies to untied models.) `TIED_HEAD_QUANTIZED` says which.
  The 0.9.5 wheel is newer than that source, and its log-probabilities agree better with a
  tied head quantized as an untied one would be (benchmarks/results/backends/
  isq_quality.md), so the benchmark measures both readings.
- Which type: the requested one when the input width k is a multiple of its block, else
  `get_fallback` (mistralrs-quant/src/utils/isq.rs): Q4K -> Q4_1, Q6K -> Q5_1, ...
- How weights round: candle's `BlockQ*::from_float` (quantized/k_quants.rs), the ggml
  reference quantizers, which the `gguf` package implements bit for bit in numpy.
- How activations round: on a CPU candle's quantized matmul quantizes each input row to
  the weight type's `VecDotType` before the integer dot products (`k_quants::matmul`):
  Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1 (both: per 32 values, d = amax/127 stored as
  f16, q = round(x/d)). The AVX2 kernels compute the same sums. (Q8_1's extra sum term
  is stored in f16; its rounding, ~2^-11 of the min term, is not reproduced.) A Q4K
  weight on this AVX2 CPU goes through candle's repacked x86 tiles instead
  (`repack_x86::select`: k % 256 == 0 and n % 16 == 0; Q8_0 is repacked only with
  AVX-512 VNNI), whose input is Q8K: per 256 values, scale 1 / (-127 / signed extreme).
- Q4K weights: candle's own port (make_qkx1_quants, 5 refinements, 6-bit sub-block scales
  and mins), ported below since the gguf package has no Q4_K quantizer; its float sums run
  in numpy's order, not Rust's, so a value on a rounding edge may land one step apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = {"Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q8_0": 32, "Q8_1": 32,
         "Q2K": 256, "Q3K": 256, "Q4K": 256, "Q5K": 256, "Q6K": 256, "Q8K": 256}
FALLBACK = {"Q2K": "Q4_0", "Q3K": "Q4_0", "Q4K": "Q4_1", "Q5K": "Q5_0", "Q6K": "Q5_1",
            "Q8K": "Q8_1"}
PROMOTED = {"Q2K": "Q6K", "Q3K": "Q6K", "Q4K": "Q6K", "Q4_0": "Q6K", "Q4_1": "Q6K",
            "Q5K": "Q8_0", "Q6K": "Q8_0", "Q8K": "Q8_0", "Q5_0": "Q8_0", "Q5_1": "Q8_0",
            "Q8_0": "Q8_0", "Q8_1": "Q8_0"}
# The activation format each weight type's dot product takes (k_quants.rs VecDotType).
VEC_DOT = {"Q4_0": "Q8_0", "Q5_0": "Q8_0", "Q8_0": "Q8_0", "Q4_1": "Q8_1", "Q5_1": "Q8_1",
           "Q4K": "Q8K"}
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                   "down_proj")
# mistral.rs quantizes a tied lm_head only through the embedding, which no ISQ predicate
# matches (module docstring); validated against the engine's own log-probabilities.
TIED_HEAD_QUANTIZED = False


def resolved_type(requested: str, k: int) -> str | None:
    """The ggml type mistral.rs stores a weight of input width `k` in, or None (kept f32)."""
    ty = requested
    while k % BLOCK[ty]:
        ty = FALLBACK.get(ty)
        if ty is None:
            return None
    return ty


@dataclass(frozen=True)
class TensorPlan:
    name: str
    ggml_type: str | None  # None: stays float32


def isq_plan(requested: str, shapes: dict[str, tuple[int, int]], tied_head: bool,
             head_quantized: bool = TIED_HEAD_QUANTIZED) -> list[TensorPlan]:
    """Each Linear weight of a Llama checkpoint (name -> (out, in)) and its ISQ type."""
    plan = []
    for name, (_, k) in shapes.items():
        if name.startswith("lm_head"):
            if tied_head and not head_quantized:
                plan.append(TensorPlan(name, None))
                continue
            plan.append(TensorPlan(name, resolved_type(PROMOTED.get(requested, requested), k)))
        elif name.rsplit(".", 2)[-2] in DECODER_LINEARS:
            plan.append(TensorPlan(name, resolved_type(requested, k)))
    return plan


def fake_quantize(weight: np.ndarray, ggml_type: str) -> np.ndarray:
    """Round a float32 (out, in) weight to `ggml_type` and back, as candle stores it."""
    from gguf import GGMLQuantizationType, quants

    if ggml_type == "Q4K":  # the gguf package has no Q4_K quantizer
        return q4k_fake_quantize(weight)

    qtype = GGMLQuantizationType[ggml_type.replace("K", "_K") if ggml_type.endswith("K")
                                 else ggml_type]
    weight = np.ascontiguousarray(weight, dtype=np.float32)
    return quants.dequantize(quants.quantize(weight, qtype), qtype).reshape(weight.shape)


def _round(x: np.ndarray) -> np.ndarray:
    """Rust's f32::round: half away from zero."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _qkx1(x: np.ndarray, nmax: int = 15, ntry: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """candle's make_qkx1_quants (utils.rs) on every row of x at once: (scale, -min)."""
    lo, hi = x.min(axis=1), x.max(axis=1)
    flat = hi == lo
    mn = np.minimum(lo, 0).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.float32(nmax) / (hi - mn)
        scale = 1 / iscale
    levels = np.zeros(x.shape, dtype=np.float32)
    active = ~flat
    for _ in range(ntry):
        if not active.any():
            break
        rows = np.flatnonzero(active)
        xr, mr = x[rows], mn[rows][:, None]
        li = np.clip(_round(iscale[rows][:, None] * (xr - mr)), 0, nmax).astype(np.float32)
        changed = (li != levels[rows]).any(axis=1)
        levels[rows] = li
        new_scale = ((xr - mr) * li).sum(axis=1) / (li * li).sum(axis=1)
        new_min = np.minimum((xr - new_scale[:, None] * li).sum(axis=1) / x.shape[1], 0)
        scale[rows], mn[rows], iscale[rows] = new_scale, new_min, 1 / new_scale
        active[rows] = changed
    return np.where(flat, 0, scale).astype(np.float32), np.where(flat, 0, -mn).astype(np.float32)


def q4k_fake_quantize(weight: np.ndarray) -> np.ndarray:
    """candle's BlockQ4K::from_float then to_float: super-blocks of 256, eight sub-blocks
    of 32 with a 6-bit scale and min each, f16 super-scales."""
    w = np.ascontiguousarray(weight, dtype=np.float32)
    sub = w.reshape(-1, 8, 32)
    scales, mins = (v.reshape(-1, 8) for v in _qkx1(sub.reshape(-1, 32)))
    max_scale, max_min = np.maximum(scales.max(axis=1), 0), np.maximum(mins.max(axis=1), 0)
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, np.float32(63) / max_scale, 0).astype(np.float32)
        inv_min = np.where(max_min > 0, np.float32(63) / max_min, 0).astype(np.float32)
    ls = np.minimum(_round(inv_scale[:, None] * scales), 63)
    lm = np.minimum(_round(inv_min[:, None] * mins), 63)
    d = (max_scale / np.float32(63)).astype(np.float16).astype(np.float32)
    dmin = (max_min / np.float32(63)).astype(np.float16).astype(np.float32)
    dj = (d[:, None] * ls).astype(np.float32)[..., None]
    mj = (dmin[:, None] * lm).astype(np.float32)[..., None]
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(dj != 0, np.clip(_round((sub + mj) / dj), 0, 15), 0)
    return (dj * q - mj).astype(np.float32).reshape(w.shape)


def q8k_activations(x):
    """A torch tensor rounded as candle's BlockQ8K::from_float (the repacked x86 Q4K
    matmul's input): blocks of 256, iscale = -127 / (signed extreme), d = 1 / iscale."""
    import torch

    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // 256, 256).float()
    extreme = torch.gather(blocks, -1, blocks.abs().argmax(dim=-1, keepdim=True))
    iscale = torch.where(extreme != 0, -127 / extreme, torch.zeros_like(extreme))
    scaled = iscale * blocks
    q = (torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)).clamp(-128, 127)
    d = torch.where(iscale != 0, 1 / iscale, torch.zeros_like(iscale))
    return (q * d).reshape(shape).to(x.dtype)


def q8_activations(x):
    """A torch tensor rounded as candle's Q8_0/Q8_1 `from_float` rounds matmul inputs:
    blocks of 32 along the last axis, d = amax/127 (f32, stored as f16), q = round(x/d)
    half away from zero (Rust's f32::round), value q * f16(d)."""
    import torch

    shape = x.shape
    blocks = x.reshape(*shape[:-1], shape[-1] // 32, 32).float()
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    scaled = blocks * inv
    q = torch.sign(scaled) * torch.floor(scaled.abs() + 0.5)
    return (q * d.half().float()).reshape(shape).to(x.dtype)


def apply_plan(model, plan: list[TensorPlan], activations: bool = True) -> dict[str, int]:
    """Replace the planned weights of a transformers Llama by their ggml rounding (a tied
    lm_head is untied first), and round their inputs as candle does when `activations`.
    Returns the number of weights per ggml type (float32 included)."""
    import torch

    modules = dict(model.named_modules())
    counts: dict[str, int] = {}
    for entry in plan:
        module = modules[entry.name.removesuffix(".weight")]
        counts[entry.ggml_type or "F32"] = (counts.get(entry.ggml_type or "F32", 0)
                                            + module.weight.numel())
        if entry.ggml_type is None:
            continue
        rounded = fake_quantize(module.weight.detach().cpu().numpy(), entry.ggml_type)
        module.weight = torch.nn.Parameter(torch.from_numpy(rounded), requires_grad=False)
        if activations:
            rounding = {"Q8_0": q8_activations, "Q8_1": q8_activations,
                        "Q8K": q8k_activations}[VEC_DOT[entry.ggml_type]]
            module.register_forward_pre_hook(lambda _m, args, r=rounding: (r(args[0]),))
    return counts


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    import torch

    return {f"{name}.weight": tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)}
