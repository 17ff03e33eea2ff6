"""mistral.rs's own X-LoRA (`Which.XLora`) on the peft X-LoRA fixture the vLLM plugin
serves, through the converter (adapters/xlora/mistralrs_export.py); no Ray.

What it shows about mistralrs 0.9.5: the converted checkpoint loads, and from a
one-token prompt mistral.rs decodes exactly peft's greedy tokens (every decode step is
one token per sequence), so the conversion is faithful. But any prompt longer than one
token fails in mistral.rs itself: its X-LoRA models pass one RoPE position per sequence
while its CPU rotary kernel takes one per token. That is why `xlora:` with backend
mistralrs stays refused at config time (core/config.py); when this test's last
assertion starts failing, an upgraded mistral.rs can prefill and the refusal can go.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e

# One-token prompts (SmolLM2's tokenizer: one id each) from the fixture's three domains.
PROMPTS = ("import", "{", "The")
TOKENS = 16


@pytest.fixture(scope="module")
def runner(xlora_checkpoint, base_model_path):
    from mistralrs import Architecture, ModelDType, Runner, Which

    from ruvllm.adapters.xlora.mistralrs_export import export_for_mistralrs
    from ruvllm.config import resolve_cache_dir

    # Cached by content beside the vLLM export (the base's lm_head copy is 0.6 GB).
    converted = export_for_mistralrs(xlora_checkpoint, base_model_path,
                                     resolve_cache_dir() / "xlora" / "mistralrs")
    return Runner(which=Which.XLora(
        xlora_model_id=str(converted.xlora_dir), order=str(converted.order_file),
        model_id=str(converted.base_dir), arch=Architecture.Llama, dtype=ModelDType.F32),
        max_seqs=4)


def _complete(runner, prompt: str) -> str:
    from mistralrs import CompletionRequest

    reply = runner.send_completion_request(CompletionRequest(
        prompt=prompt, model="default", max_tokens=TOKENS, temperature=0.0))
    return reply.choices[0].text


def _peft_greedy(xlora_checkpoint, base_model_path) -> dict[str, str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruvllm.adapters.xlora.fixture import load_peft_xlora

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    model.config.use_cache = False  # peft's X-LoRA recomputes the scaling pass each step
    model = load_peft_xlora(model, xlora_checkpoint).eval()
    out = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt)["input_ids"]
            assert len(ids) == 1, (prompt, ids)
            for _ in range(TOKENS):
                logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
                ids.append(int(logits[0, -1].argmax()))
            out[prompt] = tokenizer.decode(ids[1:])
    return out


@pytest.fixture(scope="module")
def peft_expected(xlora_checkpoint, base_model_path):
    # Before the Runner exists: its spinning rayon workers slowed peft here 219 s vs ~10 s.
    return _peft_greedy(xlora_checkpoint, base_model_path)


def test_converted_checkpoint_decodes_like_peft(peft_expected, runner):
    expected = peft_expected
    got = {prompt: _complete(runner, prompt) for prompt in PROMPTS}
    assert got == expected


def test_longer_prompts_fail_inside_mistralrs_0_9_5(runner):
    with pytest.raises(ValueError, match="RoPE positions length 1 does not match token count"):
        _complete(runner, "def fibonacci(n):")
