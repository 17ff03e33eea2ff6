"""LoRA adapters on the mistral.rs engine (`engine.backend: mistralrs`, `enable_lora`):
a real Runner with mistral.rs's dynamic LoRA runtime, no Ray. Adapters are loaded and
unloaded while it runs (what the replica's slots and the admin API drive) and a request
naming one (`model`) gets that adapter's output: peft's greedy tokens for it, also when
requests for different adapters and the base share one batch.

The prompt matters: on "What is the capital of France?" the fixture adapters (rank 8 on
q_proj/v_proj) do not move peft's own greedy answer either ("The capital of France is
Paris." for the base, alpha and beta alike, measured), so identical outputs there say
nothing about mistral.rs. On the prompt below peft gives three different continuations."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.e2e

ADAPTERS = ("alpha", "beta")
MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
TOKENS = 12


def chat_request(body: dict):
    """The body as the ingress hands it to an engine: parsed once into vLLM's model."""
    from ruvllm.deployments import vllm_compat
    from ruvllm.deployments.client_error import parse_request

    return parse_request(vllm_compat.chat_request_cls(), body)


@pytest.fixture(scope="module")
def engine(base_model_path):
    from ruvllm.deployments.mistralrs_engine import MistralRsEngine
    from ruvllm.deployments.mistralrs_model import MistralRsModel
    from ruvllm.config import EngineConfig

    config = EngineConfig(backend="mistralrs", max_num_seqs=4, max_loras=2, max_lora_rank=8,
                          enable_lora=True)
    engine = MistralRsEngine(MistralRsModel(base_model_path, base_model_path), "m", config,
                             threads=2)
    asyncio.run(engine.start())
    yield engine
    engine.shutdown()


def _chat(engine, model: str, request_id: str):
    async def run():
        return [item async for item in engine.chat(chat_request(
            {"model": model, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
             "messages": MESSAGES}), request_id)]

    (head,) = asyncio.run(run())
    return head


def _text(head) -> str:
    assert head.status == 200, head.body
    return head.body["choices"][0]["message"]["content"]


def _peft_greedy(base_model_path, adapter_dir) -> str:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_model_path))
    model = AutoModelForCausalLM.from_pretrained(str(base_model_path), dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    start = len(ids)
    with torch.no_grad():
        for _ in range(TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return tokenizer.decode(ids[start:], skip_special_tokens=True)


def test_request_naming_an_adapter_gets_its_output(engine, adapter_root, base_model_path):
    for name in ADAPTERS:
        asyncio.run(engine.load_adapter(name, str(adapter_root / name)))
    texts = {name: _text(_chat(engine, name, f"r-{name}")) for name in ("m", *ADAPTERS)}
    assert len(set(texts.values())) == 3, texts  # base, alpha, beta: three outputs
    for name in ADAPTERS:
        assert texts[name] == _peft_greedy(base_model_path, adapter_root / name), name

    async def together():
        async def one(model, i):
            return [x async for x in engine.chat(chat_request(
                {"model": model, "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True,
                 "messages": MESSAGES}), f"b-{model}-{i}")][0]
        return await asyncio.gather(*(one(m, i) for i in range(2) for m in texts))

    # The same answers when base and adapter requests run in one mistral.rs batch.
    heads = asyncio.run(together())
    assert [_text(h) for h in heads] == [texts[m] for _ in range(2) for m in texts]


def test_unloaded_or_unknown_adapter_is_404_and_a_bad_one_fails_its_load(engine, tmp_path):
    asyncio.run(engine.unload_adapter("alpha"))
    head = _chat(engine, "alpha", "r-gone")
    assert head.status == 404 and head.body["error"]["param"] == "model", head.body
    assert _chat(engine, "nope", "r-nope").status == 404
    with pytest.raises(RuntimeError, match="could not load adapter 'broken'"):
        asyncio.run(engine.load_adapter("broken", str(tmp_path)))  # no adapter files
    assert _chat(engine, "beta", "r-beta").status == 200  # the engine keeps serving
