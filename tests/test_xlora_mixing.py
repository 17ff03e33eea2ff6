"""The stacked two-GEMM expert mixing equals peft's per-expert X-LoRA layer math,
including top-k and top-k softmax (pure tensor check against peft's own code)."""

from __future__ import annotations

import types

import pytest
import torch
from peft.tuners.xlora.layer import XLoraLayer

from ruvllm.adapters.xlora.vllm_model import ExpertGroup, XLoraMixer

E, R, IN, OUT, T, MODULES = 3, 4, 16, 12, 7, 5


@pytest.mark.parametrize("top_k,softmax_topk,layerwise,global_weight", [
    (None, False, False, 1.0),
    (None, False, True, 0.7),
    (2, False, True, 1.0),
    (2, True, True, 1.3),
    (1, True, False, 1.0),
])
def test_stacked_mixing_matches_peft(top_k, softmax_topk, layerwise, global_weight):
    torch.manual_seed(0)
    x = torch.randn(T, IN)
    a = [torch.randn(R, IN) for _ in range(E)]
    b = [torch.randn(OUT, R) for _ in range(E)]
    scales = torch.tensor([2.0, 0.5, 1.0])
    scalings = torch.softmax(torch.randn(T, MODULES, E), dim=-1)  # [T, modules, E]
    module = 3

    # peft: XLoraLayer.get_maybe_topk_scalings on [batch, seq, modules, E], then a loop.
    config = types.SimpleNamespace(top_k_lora=top_k, enable_softmax_topk=softmax_topk,
                                   global_scaling_weight=global_weight)
    peft_self = types.SimpleNamespace(config=config, layer_number=module)
    peft_scalings = scalings if layerwise else scalings[:, :1].expand(T, MODULES, E)
    s = XLoraLayer.get_maybe_topk_scalings(peft_self, peft_scalings.unsqueeze(0))[0]
    expected = sum((x * s[:, e:e + 1]) @ a[e].t() @ b[e].t() * scales[e] * global_weight
                   for e in range(E))

    spec = {"top_k_lora": top_k, "enable_softmax_topk": softmax_topk,
            "global_scaling_weight": global_weight, "layerwise_scalings": layerwise, "rank": R}
    ours_scalings = scalings if layerwise else scalings[:, :1]
    w = XLoraMixer(spec, scales).weights(ours_scalings, module)
    a_cat, b_cat = torch.cat(a, dim=0), torch.cat(b, dim=1)
    got = ((x @ a_cat.t()) * w.repeat_interleave(R, dim=-1)) @ b_cat.t()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layerwise", [True, False])
def test_group_weights_line_up_with_stacked_modules(layerwise):
    """mixer.group(expanded, first, count) is the per-module weights of `count` consecutive
    modules, each repeated per rank, side by side: the layout of those modules' stacked A
    output."""
    torch.manual_seed(1)
    spec = {"top_k_lora": 2, "enable_softmax_topk": True, "global_scaling_weight": 0.9,
            "layerwise_scalings": layerwise, "rank": R}
    mixer = XLoraMixer(spec, torch.tensor([2.0, 0.5, 1.0]))
    scalings = torch.softmax(torch.randn(T, MODULES if layerwise else 1, E), dim=-1)
    expanded = mixer.expand(scalings)
    for first, count in ((0, 3), (3, 1), (2, 2)):
        expected = torch.cat([mixer.weights(scalings, m).repeat_interleave(R, dim=-1)
                              for m in range(first, first + count)], dim=-1)
        torch.testing.assert_close(mixer.group(expanded, first, count), expected)
    assert mixer.expand(None) is None
    assert mixer.group(None, 0, 3) is None


def test_expert_group_equals_its_members_side_by_side():
    """One fused group (q/k/v with k not adapted) loaded from per-module A/B tensors gives
    each adapted member's mixed delta in that member's columns of the fused output, and
    zero in the unadapted member's."""
    torch.manual_seed(2)
    dims = {"q_proj": (12, IN), "k_proj": (4, IN), "v_proj": (4, IN)}
    adapted = ("q_proj", "v_proj")
    group = ExpertGroup(("q_proj", "k_proj", "v_proj"), adapted, dims, E * R,
                        first_module=0, dtype=torch.float32)
    x = torch.randn(T, IN)
    weights = {t: torch.rand(T, E * R) for t in adapted}
    expected = []
    for t in ("q_proj", "k_proj", "v_proj"):
        if t not in adapted:
            expected.append(torch.zeros(T, dims[t][0]))
            continue
        a, b = torch.randn(E * R, IN), torch.randn(dims[t][0], E * R)
        group.load(t, "A", a)
        group.load(t, "B", b)
        expected.append(((x @ a.t()) * weights[t]) @ b.t())
    out = torch.zeros(T, 20)
    out.addmm_((x @ group.a.t()) * torch.cat([weights[t] for t in adapted], dim=-1),
               group.b.t())
    torch.testing.assert_close(out, torch.cat(expected, dim=-1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q_proj.A: shape"):
        group.load("q_proj", "A", torch.zeros(E * R, IN + 1))
