"""Which Linear layers to keep at higher precision in a mixed-precision 4-bit job.

Sensitivity proxy: the Fisher-weighted rounding error of each layer,
sum(F * (W - RTN(W))^2), where F is the squared gradient of the language-model loss with
respect to W, summed over calibration windows (the empirical Fisher diagonal). It is the
second-order estimate of how much the loss rises when that layer alone is rounded to the
job's bits and group size (the sensitivity measure of SqueezeLLM and HAWQ-style mixed
precision), so it counts both how badly a layer rounds and how much the loss cares about
its weights. It costs one forward and backward pass per window, where quantizing each of
SmolLM2's 210 Linear layers alone and measuring perplexity would cost 210 evaluations.

Layers are chosen greedily by sensitivity per weight until `fraction` of the Linear
weights is kept: a kept layer costs bytes in proportion to its size, so a small, very
sensitive layer is worth more than a large, moderately sensitive one.

Runs inside the toolkit worker (torch only, no serving imports); `choose_kept` is pure.
"""

from __future__ import annotations

from typing import Iterable


def rtn_error(weight, bits: int, group_size: int | None, symmetric: bool = True):
    """W - Q(W) for round-to-nearest integer quantization per group of `group_size`
    input columns (per output channel when None)."""
    import torch

    w = weight.detach().float()
    rows, cols = w.shape
    g = group_size if group_size and cols % group_size == 0 else cols
    grouped = w.reshape(rows, cols // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = grouped.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / qmax
        q = torch.clamp(torch.round(grouped / scale), -qmax - 1, qmax) * scale
    else:
        lo = grouped.amin(dim=-1, keepdim=True)
        hi = grouped.amax(dim=-1, keepdim=True)
        scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=1e-12)
        zero = torch.round(-lo / scale)
        q = (torch.clamp(torch.round(grouped / scale) + zero, 0, 2 ** bits - 1) - zero) * scale
    return (grouped - q).reshape(rows, cols)


def decoder_linears(model) -> dict[str, object]:
    """The decoder blocks' Linear layers by module name (what the job quantizes; lm_head
    is never quantized)."""
    import torch

    return {name: m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name != "lm_head"
            and not name.endswith("lm_head")}


def fisher_sensitivity(model, windows: Iterable[list[int]], bits: int,
                       group_size: int | None, symmetric: bool = True) -> dict[str, float]:
    """Per decoder Linear layer: sum over its weights of F * (W - RTN(W))^2."""
    import torch

    linears = decoder_linears(model)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    for m in linears.values():
        m.weight.requires_grad_(True)
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32) for n, m in linears.items()}
    device = next(model.parameters()).device
    for ids in windows:
        x = torch.tensor([ids], device=device)
        model(input_ids=x, labels=x).loss.backward()
        for n, m in linears.items():
            fisher[n] += m.weight.grad.float() ** 2
            m.weight.grad = None
    for p, flag in flags:
        p.requires_grad_(flag)
    model.train(was_training)
    with torch.no_grad():
        return {n: float((fisher[n] * rtn_error(m.weight, bits, group_size, symmetric) ** 2)
                         .sum()) for n, m in linears.items()}


def choose_kept(sensitivity: dict[str, float], sizes: dict[str, int],
                fraction: float) -> list[str]:
    """The layers to keep at higher precision: most sensitive per weight first, skipping
    any that would take the kept weights past `fraction` of all of them. Deterministic
    (ties by name), so the same measurement gives the same checkpoint."""
    budget = fraction * sum(sizes.values())
    order = sorted(sensitivity, key=lambda n: (-sensitivity[n] / sizes[n], n))
    kept, used = [], 0
    for name in order:
        if used + sizes[name] <= budget:
            kept.append(name)
            used += sizes[name]
    return sorted(kept)
