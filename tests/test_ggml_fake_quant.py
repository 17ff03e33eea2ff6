"""The reproduction of mistral.rs's ISQ rounding (benchmarks/ggml_fake_quant.py): which
type each weight gets, and ggml's rounding rules on hand-made blocks."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.ggml_fake_quant import fake_quantize, isq_plan, q8_activations, resolved_type

SMOLLM2_SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": (576, 576),
    "model.layers.0.self_attn.k_proj.weight": (192, 576),
    "model.layers.0.mlp.up_proj.weight": (1536, 576),
    "model.layers.0.mlp.down_proj.weight": (576, 1536),
    "lm_head.weight": (49152, 576),
}


def test_k_quants_fall_back_where_the_width_is_not_a_multiple_of_256():
    assert resolved_type("Q4K", 576) == "Q4_1"
    assert resolved_type("Q4K", 1536) == "Q4K"
    assert resolved_type("Q6K", 576) == "Q5_1"
    assert resolved_type("Q4_0", 576) == "Q4_0"
    assert resolved_type("Q4_0", 48) is None  # no block fits: the weight stays float32


def test_plan_keeps_a_tied_head_float32_and_promotes_an_untied_one():
    tied = {p.name: p.ggml_type for p in isq_plan("Q4_0", SMOLLM2_SHAPES, tied_head=True)}
    assert tied == {**{n: "Q4_0" for n in SMOLLM2_SHAPES if n != "lm_head.weight"},
                    "lm_head.weight": None}
    untied = {p.name: p.ggml_type for p in isq_plan("Q4_0", SMOLLM2_SHAPES, tied_head=False)}
    assert untied["lm_head.weight"] == "Q5_1"  # Q4_0 -> Q6K (sensitive) -> Q5_1 (width 576)
    q4k = {p.name: p.ggml_type for p in isq_plan("Q4K", SMOLLM2_SHAPES, tied_head=False)}
    assert q4k["model.layers.0.mlp.down_proj.weight"] == "Q4K"
    assert q4k["model.layers.0.mlp.up_proj.weight"] == "Q4_1"


def test_q4_0_scale_is_the_signed_extreme_over_minus_8():
    # Largest magnitude +8: d = 8 / -8 = -1, so +8 is exact and -8 clips to -7.
    block = np.array([[8.0, -8.0, 3.0, -3.0, 0.4, 0.6] + [0.0] * 26], dtype=np.float32)
    got = fake_quantize(block, "Q4_0")[0, :6]
    assert got.tolist() == [8.0, -7.0, 3.0, -3.0, 0.0, 1.0]
    # Largest magnitude negative: d = 1 and the grid is -8..7.
    assert fake_quantize(-block, "Q4_0")[0, :2].tolist() == [-8.0, 7.0]


def test_q8_0_weights_round_half_away_from_zero_on_a_127_step_grid():
    block = np.array([[127.0, 2.5, -2.5, 0.49] + [0.0] * 28], dtype=np.float32)
    assert fake_quantize(block, "Q8_0")[0, :4].tolist() == [127.0, 3.0, -3.0, 0.0]


def test_activations_round_per_block_of_32_with_an_f16_scale():
    x = torch.zeros(2, 64)
    x[0, :3] = torch.tensor([127.0, 2.5, -2.5])  # block 1: d = 1
    x[1, 32] = 0.1                               # block 4: d = 0.1 / 127, stored as f16
    out = q8_activations(x)
    assert out[0, :3].tolist() == [127.0, 3.0, -3.0]  # half away from zero, not to even
    assert torch.all(out[0, 32:] == 0)                 # an all-zero block stays zero
    d16 = float((torch.tensor(0.1) / 127).half())
    assert abs(float(out[1, 32]) - 127 * d16) < 1e-9


def test_q4k_reproduces_a_block_already_on_its_grid():
    # Every sub-block holds the levels 0..15 (scale 1, min 0): the 6-bit scale 63 and the
    # f16 super-scale 1/63 bring each value back within f16 rounding.
    row = np.tile(np.arange(16, dtype=np.float32), 16)[None, :]
    assert np.allclose(fake_quantize(row, "Q4K"), row, rtol=1e-3, atol=0)
