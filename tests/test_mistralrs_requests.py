"""mistral.rs request planning and reply framing (pure logic, no engine): requests are
judged like vLLM judges them (same 4xx statuses and parameters), replies come back in
OpenAI's JSON and SSE shapes."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from ruvllm.deployments import vllm_compat
from ruvllm.deployments.mistralrs_engine import RequestError, SseFramer, openai_reply, plan_request

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def _plan(kind="chat", max_model_len=2048, prompt_tokens=30, **body):
    cls = vllm_compat.chat_request_cls() if kind == "chat" else vllm_compat.completion_request_cls()
    defaults = {"model": "m", "messages": FRANCE} if kind == "chat" else {"model": "m", "prompt": "hi"}
    request = cls.model_validate({**defaults, **body})
    return plan_request(kind, request, lambda k, p: prompt_tokens, max_model_len)


def test_chat_plan_maps_openai_fields_to_mistralrs_names():
    plan = _plan(max_tokens=24, temperature=0, top_p=0.9, stop="\n", ignore_eos=True,
                 stream=True, stream_options={"include_usage": True})
    assert plan.max_tokens == 24 and plan.stream and plan.include_usage
    assert plan.sampling["temperature"] == 0 and plan.sampling["top_p"] == 0.9
    assert plan.sampling["stop_seqs"] == ["\n"] and plan.sampling["ignore_eos"]
    assert plan.prompt == FRANCE


def test_max_tokens_defaults_to_the_rest_of_the_context_like_vllm():
    assert _plan(prompt_tokens=48, max_model_len=2048).max_tokens == 2000


@pytest.mark.parametrize("body,param", [
    ({"max_tokens": 100000}, "max_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logprobs": True}, "logprobs"),
])
def test_requests_vllm_would_refuse_get_400_naming_the_parameter(body, param):
    with pytest.raises(RequestError) as e:
        _plan(**body)
    assert e.value.status == 400 and e.value.param == param


def test_prompt_beyond_the_context_is_400():
    with pytest.raises(RequestError, match="maximum context length is 2048"):
        _plan(prompt_tokens=3000)
    with pytest.raises(RequestError, match="token ids"):
        _plan("completion", prompt=[1, 2, 3])


def _fake_chunk(text, finish=None, usage=None):
    return SimpleNamespace(usage=usage, choices=[SimpleNamespace(
        index=0, delta=SimpleNamespace(content=text), finish_reason=finish)])


def test_stream_is_openai_sse_with_role_first_usage_last_and_done():
    plan = _plan(stream=True, stream_options={"include_usage": True})
    framer = SseFramer(plan, "r1", "served")
    usage = SimpleNamespace(prompt_tokens=30, completion_tokens=2)
    events = framer.events(_fake_chunk("Par")) + framer.events(
        _fake_chunk("is", "stop", usage)) + framer.finish()
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in events)
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e[6:]) for e in events[:-1]]
    assert bodies[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(b["choices"][0]["delta"]["content"] for b in bodies if b["choices"]) == "Paris"
    assert bodies[-1]["choices"] == [] and bodies[-1]["usage"]["total_tokens"] == 32
    assert {b["object"] for b in bodies} == {"chat.completion.chunk"}
    assert {b["id"] for b in bodies} == {"chatcmpl-r1"}


def test_completion_reply_and_its_single_event_stream_agree():
    plan = _plan("completion", stream=True)
    result = SimpleNamespace(usage=SimpleNamespace(prompt_tokens=3, completion_tokens=2),
                             choices=[SimpleNamespace(index=0, text=" Paris.",
                                                      finish_reason="length")])
    reply = openai_reply(plan, result, "r2", "served")
    assert reply["object"] == "text_completion" and reply["usage"]["total_tokens"] == 5
    events = SseFramer.from_reply(plan, reply)
    assert json.loads(events[0][6:])["choices"][0]["text"] == " Paris."
    assert events[-1] == "data: [DONE]\n\n" and len(events) == 2  # no usage unless asked


def test_a_request_names_a_loaded_adapter_or_gets_404():
    from ruvllm.deployments.mistralrs_engine import MistralRsEngine
    from ruvllm.config import EngineConfig

    config = EngineConfig(backend="mistralrs", enable_lora=True)
    engine = MistralRsEngine(None, "m", config)
    engine._adapters.add("alpha")
    assert engine._adapter_of("m") is None and engine._adapter_of(None) is None
    assert engine._adapter_of("alpha") == "alpha"
    with pytest.raises(RequestError) as e:
        engine._adapter_of("beta")  # registered elsewhere, not loaded here
    assert e.value.status == 404 and e.value.param == "model"
    plan = _plan()
    plan.adapter = "alpha"
    pytest.importorskip("mistralrs")
    plan.mistral_request()  # mistral.rs takes `adapter=` (its getter is not exposed)
    assert engine._lora_limits() == (2 * EngineConfig().max_loras, EngineConfig().max_lora_rank)
    engine.shutdown()
