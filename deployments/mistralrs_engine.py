"""The mistral.rs engine behind a replica (`engine.backend: mistralrs`): one `Runner`.

mistral.rs's Python API (0.9.5) is synchronous: a request blocks its calling thread
and a stream is an iterator whose `next()` blocks until the next token. Each request
therefore runs on a thread of this engine's own pool (sized to `max_num_seqs`, so the
engine's batch, not Python's default 6-thread executor, bounds concurrency); the Rust
side releases the GIL while it waits. Requests arrive as vLLM's own OpenAI request
models (parsed once by the ingress) and are judged with the same limits vLLM applies (context length, max_tokens,
sampling ranges), so a client gets the same 4xx bodies from either backend; replies are
rebuilt in OpenAI's JSON and SSE shapes.

Cancellation: when the client goes away the replica's generator is cancelled, the
stream's iterator is dropped as soon as its thread returns, and mistral.rs, finding
the receiving end of the sequence gone, stops that sequence (measured: the engine's
CPU use went from 1.07 to 0.00 cores; see tests/e2e/test_mistralrs_engine.py).

Stats: the API exposes no scheduler counters, so `running`/`waiting` are this engine's
own count of requests in flight, split at `max_num_seqs` (mistral.rs's `max_seqs`); and
KV capacity, which mistral.rs does not report on CPU (no PagedAttention there: each
sequence owns a contiguous cache that grows with it), is stood in for by
`max_num_seqs x max_model_len` tokens, the most it can hold, with `kv_usage` the
tokens of the requests in flight (prompt + max_tokens) over that.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from ruvllm.deployments.mistralrs_model import MistralRsModel
from ruvllm.deployments.protocol import EngineStats, ReplyHead, error_body
from ruvllm.config import EngineConfig

logger = logging.getLogger("ruvllm.engine")

_DONE = object()


class RequestError(Exception):
    """A request the engine will not run; carries the OpenAI status and message."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


@dataclass
class _InFlight:
    tokens: int


class MistralRsEngine:
    def __init__(self, model: MistralRsModel, served_name: str, config: EngineConfig,
                 threads: int | None = None) -> None:
        self._model = model
        self._served_name = served_name
        self._config = config
        self._threads = threads
        self._runner: Any = None
        self._tokenizer: Any = None
        self._max_model_len = 0
        self._pool = ThreadPoolExecutor(max_workers=config.max_num_seqs + 4,
                                        thread_name_prefix="mistralrs")
        self._inflight: dict[str, _InFlight] = {}
        self._adapters: set[str] = set()  # LoRA aliases loaded into the Runner
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self.startup_s = 0.0

    async def start(self) -> None:
        started = time.monotonic()
        if self._threads:
            # Rayon sizes its global pool from this on first use (inside the Runner).
            os.environ.setdefault("RAYON_NUM_THREADS", str(self._threads))
        self._runner = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._make_runner)
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(str(self._model.tokenizer_dir))
        engine_len = self._runner.max_sequence_length() or 0
        self._max_model_len = min(x for x in (self._config.max_model_len, engine_len) if x)
        self.startup_s = time.monotonic() - started
        logger.info("mistral.rs engine for %s up in %.1f s: %s, max_seqs %d, context %d",
                    self._served_name, self.startup_s, self._model.describe(),
                    self._config.max_num_seqs, self._max_model_len)

    def _make_runner(self) -> Any:
        from mistralrs import Runner

        # No `seed=`: mistral.rs 0.9.5 refuses it on CPU ("cannot seed the CPU rng").
        return Runner(which=self._model.which(self._lora_limits()),
                      max_seqs=self._config.max_num_seqs,
                      prefix_cache_n=self._config.mistralrs.prefix_cache_n,
                      in_situ_quant=self._model.in_situ)

    def _lora_limits(self) -> "tuple[int, int] | None":
        """(resident adapters, largest rank) for mistral.rs's LoRA runtime, or None
        without LoRA. The replica keeps at most `max_cpu_loras` (else `max_loras`)
        adapters loaded and evicts only idle ones; twice that leaves room for a replaced
        generation an in-flight request still holds."""
        c = self._config
        if not c.enable_lora:
            return None
        return 2 * (c.max_cpu_loras or c.max_loras), c.max_lora_rank

    # -- stats ---------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        with self._lock:
            count = len(self._inflight)
            tokens = sum(r.tokens for r in self._inflight.values())
        seqs = self._config.max_num_seqs
        capacity = seqs * self._max_model_len
        return EngineStats(
            running=min(count, seqs), waiting=max(0, count - seqs), unfinished=count,
            kv_usage=min(1.0, tokens / capacity) if capacity else 0.0,
            # One "block" per sequence slot: capacity = max_num_seqs x max_model_len.
            num_kv_blocks=seqs, block_size=self._max_model_len, max_num_seqs=seqs,
            max_model_len=self._max_model_len, updated_at=time.time(),
            extra={"backend": "mistralrs", "kv_capacity_is_stand_in": True})

    # -- requests ------------------------------------------------------------------------

    def chat(self, request: Any, request_id: str) -> AsyncIterator[ReplyHead | str]:
        return self._serve("chat", request, request_id)

    def completion(self, request: Any, request_id: str) -> AsyncIterator[ReplyHead | str]:
        return self._serve("completion", request, request_id)

    async def _serve(self, kind: str, request: Any,
                     request_id: str) -> AsyncIterator[ReplyHead | str]:
        try:
            plan = self._plan(kind, request)
        except RequestError as e:
            yield ReplyHead(e.status, error_body(e.status, e.message, param=e.param))
            return
        with self._lock:
            self._inflight[request_id] = _InFlight(plan.prompt_tokens + plan.max_tokens)
        streaming = plan.stream and plan.kind == "chat"
        try:
            if plan.stream and plan.kind == "completion":
                # mistral.rs 0.9.5's Python API streams chat only (CompletionRequest has
                # no stream mode, and a string `messages` still gets the chat template):
                # a streamed completion arrives as one text event, then usage and [DONE].
                head = await self._complete(plan, request_id)
                if head.status != 200:
                    yield head
                    return
                yield ReplyHead(200)
                for event in SseFramer.from_reply(plan, head.body):
                    yield event
            elif streaming:
                async for item in self._stream(plan, request_id):
                    yield item
            else:
                yield await self._complete(plan, request_id)
        finally:
            if not streaming:  # a stream leaves when mistral.rs lets go of it (_stream)
                self._release(request_id)

    def _release(self, request_id: str) -> None:
        with self._lock:
            self._inflight.pop(request_id, None)

    def _plan(self, kind: str, request: Any) -> "_Plan":
        plan = plan_request(kind, request, self._count_prompt, self._max_model_len)
        plan.adapter = self._adapter_of(request.model)
        return plan

    def _adapter_of(self, model: Any) -> str | None:
        """The LoRA alias a request names (its `model`), None for the served model."""
        if model in (None, self._served_name):
            return None
        if model in self._adapters:
            return model
        # The replica loads a request's adapter before the request reaches the engine:
        # a name not loaded here is one this engine does not serve (vLLM's 404).
        raise RequestError(404, f"The model `{model}` does not exist.", "model")

    def _count_prompt(self, kind: str, prompt: Any) -> int:
        if kind == "chat":
            ids = self._tokenizer.apply_chat_template(prompt, tokenize=True,
                                                      add_generation_prompt=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = self._tokenizer(prompt)["input_ids"]
        return len(ids)

    def _send(self, send: Any, request: Any) -> Any:
        # The Runner takes one call at a time: a second thread calling in while a call is
        # running gets "RuntimeError: Already borrowed" (measured). Chat sends return at
        # once with a stream, so holding this lock costs nothing for them.
        with self._send_lock:
            return send(request)

    async def _complete(self, plan: "_Plan", request_id: str) -> ReplyHead:
        try:
            if plan.kind == "chat":
                # Streamed underneath and gathered here, so that non-streamed chat runs
                # concurrently (see _send) and a disconnect stops it like a stream.
                result = await self._gather_chat(plan)
            else:
                # CompletionRequest blocks for the whole generation while it holds the
                # Runner, so completions run one at a time (README: limits).
                result = await asyncio.wrap_future(self._pool.submit(
                    self._send, self._runner.send_completion_request, plan.mistral_request()))
        except (ValueError, RuntimeError) as e:
            return _engine_error(e)
        return ReplyHead(200, openai_reply(plan, result, request_id, self._served_name))

    async def _gather_chat(self, plan: "_Plan") -> Any:
        request = dataclasses.replace(plan, stream=True).mistral_request()
        chunks = await asyncio.wrap_future(self._pool.submit(
            self._send, self._runner.send_chat_completion_request, request))
        texts: dict[int, list[str]] = {}
        finish: dict[int, str | None] = {}
        usage = None
        try:
            while True:
                chunk = await asyncio.wrap_future(self._pool.submit(next, chunks, _DONE))
                if chunk is _DONE:
                    break
                usage = chunk.usage or usage
                for c in chunk.choices:
                    texts.setdefault(c.index, []).append(c.delta.content or "")
                    finish[c.index] = c.finish_reason or finish.get(c.index)
        finally:
            del chunks
        return _Gathered(usage, [
            _GatheredChoice(i, "".join(parts), finish.get(i)) for i, parts in sorted(texts.items())])

    async def _stream(self, plan: "_Plan", request_id: str) -> AsyncIterator[ReplyHead | str]:
        pending: Any = None
        try:
            # concurrent.futures, not asyncio's: a cancelled await marks an asyncio future
            # done while its thread still runs; this one is done when the thread is.
            pending = self._pool.submit(self._send, self._runner.send_chat_completion_request,
                                        plan.mistral_request())
            try:
                chunks = await asyncio.wrap_future(pending)
            except (ValueError, RuntimeError) as e:
                yield _engine_error(e)
                return
            yield ReplyHead(200)
            framer = SseFramer(plan, request_id, self._served_name)
            try:
                while True:
                    pending = self._pool.submit(next, chunks, _DONE)
                    chunk = await asyncio.wrap_future(pending)
                    if chunk is _DONE:
                        break
                    for event in framer.events(chunk):
                        yield event
                for event in framer.finish():
                    yield event
            except (ValueError, RuntimeError) as e:
                # A failure mid-stream reaches the client as an error event, as vLLM's do.
                yield f"data: {json.dumps(error_body(500, f'mistral.rs: {e}'))}\n\n"
            finally:
                # The client may be gone. Dropping the last reference to the stream drops
                # its receiver, and mistral.rs stops the sequence at its next token.
                del chunks
        finally:
            # A cancelled request stays counted until the thread blocked in next() gets
            # its token and lets go of the stream, so the stats show the engine's view.
            if pending is not None and not pending.done():
                pending.add_done_callback(lambda _: self._release(request_id))
            else:
                self._release(request_id)

    # -- adapters: mistral.rs's dynamic LoRA runtime (`Which.Lora`, adapters=[]) ---------------

    async def load_adapter(self, name: str, path: str) -> None:
        """Load a peft LoRA directory under alias `name`; requests naming it run with it
        (`adapter=` per request), batched beside the base model's and other adapters'."""
        if self._lora_limits() is None:
            raise RuntimeError("engine.enable_lora is off for this mistral.rs engine")
        try:
            await asyncio.wrap_future(self._pool.submit(
                self._send, lambda _: self._runner.load_lora_adapter(name, path), None))
        except ValueError as e:  # mistralrs.LoraAdapterError (code: e.code)
            raise RuntimeError(f"mistral.rs could not load adapter {name!r}: "
                               f"{getattr(e, 'code', '')} {e}".strip()) from None
        self._adapters.add(name)

    async def unload_adapter(self, name: str) -> None:
        # Out of the request path first: a request for it now is a 404, not a race.
        self._adapters.discard(name)
        # In-flight requests keep the generation they started with (mistral.rs leases it).
        await asyncio.wrap_future(self._pool.submit(
            self._send, lambda _: self._runner.unload_lora_adapter(name), None))

    @property
    def is_dead(self) -> bool:
        # mistral.rs runs inside the replica's process: if it dies, the replica does.
        return False

    async def check_health(self) -> None:
        if self._runner is None:
            raise RuntimeError("mistral.rs runner is not started")

    def shutdown(self) -> None:
        self._runner = None
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class _GatheredChoice:
    index: int
    text: str
    finish_reason: str | None

    @property
    def message(self) -> Any:
        return _Message(self.text)


@dataclass
class _Message:
    content: str


@dataclass
class _Gathered:
    """A streamed chat reply gathered into the shape of mistral.rs's response."""

    usage: Any
    choices: list[_GatheredChoice]


def _engine_error(e: Exception) -> ReplyHead:
    # mistral.rs raises ValueError for requests it rejects; anything the checks above
    # let through is still the client's request, hence 400 like vLLM's validation.
    return ReplyHead(400, error_body(400, f"mistral.rs rejected the request: {e}"))


# -- request planning (pure, unit tested) ---------------------------------------------------


@dataclass
class _Plan:
    kind: str
    prompt: Any  # chat messages, or the completion's text
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    n: int
    sampling: dict[str, Any]
    model: str
    adapter: str | None = None  # a LoRA alias loaded into the Runner

    def mistral_request(self) -> Any:
        from mistralrs import ChatCompletionRequest, CompletionRequest

        extra = {"adapter": self.adapter} if self.adapter else {}
        if self.kind == "chat":
            return ChatCompletionRequest(messages=self.prompt, model=self.model,
                                         max_tokens=self.max_tokens, n_choices=self.n,
                                         stream=self.stream, **self.sampling, **extra)
        return CompletionRequest(prompt=self.prompt, model=self.model, max_tokens=self.max_tokens,
                                 n_choices=self.n, **self.sampling, **extra)


def plan_request(kind: str, request: Any, count_prompt: Callable[[str, Any], int],
                 max_model_len: int) -> _Plan:
    """Judge a parsed vLLM request the way vLLM does and translate it for mistral.rs.
    Raises RequestError with vLLM's status and (close to) its message."""
    if kind == "chat":
        prompt = [m if isinstance(m, dict) else m.model_dump(exclude_none=True)
                  for m in request.messages]
        for i, m in enumerate(prompt):
            if not isinstance(m.get("content", ""), (str, type(None))):
                raise RequestError(400, f"messages.{i}.content: backend mistralrs takes text "
                                   "content only", f"messages.{i}.content")
    else:
        prompt = request.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError(400, "prompt: backend mistralrs takes one text prompt "
                               "(not token ids or a batch)", "prompt")
    if getattr(request, "logprobs", None) or getattr(request, "prompt_logprobs", None):
        raise RequestError(400, "logprobs are not served by backend mistralrs", "logprobs")
    n = request.n or 1
    if n < 1:
        raise RequestError(400, "n must be at least 1", "n")
    max_tokens = getattr(request, "max_completion_tokens", None) or request.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise RequestError(400, f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
    prompt_tokens = count_prompt(kind, prompt)
    if prompt_tokens >= max_model_len:
        raise RequestError(400, f"This model's maximum context length is {max_model_len} "
                           f"tokens. However, your request has {prompt_tokens} input tokens. "
                           "Please reduce the length of the input messages.", "messages"
                           if kind == "chat" else "prompt")
    if max_tokens is None:
        max_tokens = max_model_len - prompt_tokens
    elif prompt_tokens + max_tokens > max_model_len:
        raise RequestError(400, f"This model's maximum context length is {max_model_len} "
                           f"tokens. However, you requested {prompt_tokens + max_tokens} "
                           f"tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                           "completion). Please reduce the length of the messages or "
                           "completion.", "max_tokens")
    sampling = _sampling(request)
    stream_options = getattr(request, "stream_options", None)
    return _Plan(kind=kind, prompt=prompt, prompt_tokens=prompt_tokens, max_tokens=max_tokens,
                 stream=bool(request.stream), n=n, sampling=sampling, model="default",
                 include_usage=bool(stream_options and stream_options.include_usage))


def _sampling(request: Any) -> dict[str, Any]:
    """vLLM's sampling checks (SamplingParams._verify_args), then mistral.rs's names."""
    t, top_p, top_k = request.temperature, request.top_p, getattr(request, "top_k", None)
    if t is not None and t < 0:
        raise RequestError(400, f"temperature must be non-negative, got {t}.", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(400, f"top_p must be in (0, 1], got {top_p}.", "top_p")
    if top_k is not None and top_k < -1:
        raise RequestError(400, f"top_k must be -1 (disable), or at least 1, got {top_k}.",
                           "top_k")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(request, name, None)
        if value is not None and not -2 <= value <= 2:
            raise RequestError(400, f"{name} must be in [-2, 2], got {value}.", name)
    rep = getattr(request, "repetition_penalty", None)
    if rep is not None and rep <= 0:
        raise RequestError(400, f"repetition_penalty must be greater than zero, got {rep}.",
                           "repetition_penalty")
    stop = request.stop
    out: dict[str, Any] = {
        "temperature": t, "top_p": top_p, "top_k": top_k if top_k and top_k > 0 else None,
        "presence_penalty": request.presence_penalty or None,
        "frequency_penalty": request.frequency_penalty or None,
        "repetition_penalty": rep if rep not in (None, 1.0) else None,
        "stop_seqs": [stop] if isinstance(stop, str) else (list(stop) or None) if stop else None,
        "min_p": getattr(request, "min_p", None) or None,
        "ignore_eos": bool(getattr(request, "ignore_eos", False)),
    }
    return out


# -- replies in OpenAI's shapes -----------------------------------------------------------


def _usage(u: Any) -> dict[str, int]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens}


def _finish(reason: str | None) -> str | None:
    # mistral.rs says "canceled"/"generated-image" in places; OpenAI clients know these.
    return {"eos": "stop", "stop": "stop", "length": "length"}.get(reason, reason)


def openai_reply(plan: _Plan, result: Any, request_id: str, served_name: str) -> dict[str, Any]:
    created = int(time.time())
    if plan.kind == "chat":
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.message.content},
                    "logprobs": None, "finish_reason": _finish(c.finish_reason)}
                   for c in result.choices]
        obj, rid = "chat.completion", f"chatcmpl-{request_id}"
    else:
        choices = [{"index": c.index, "text": c.text, "logprobs": None,
                    "finish_reason": _finish(c.finish_reason)} for c in result.choices]
        obj, rid = "text_completion", f"cmpl-{request_id}"
    usage = _usage(result.usage) if result.usage is not None else {
        "prompt_tokens": plan.prompt_tokens, "completion_tokens": 0,
        "total_tokens": plan.prompt_tokens}
    return {"id": rid, "object": obj, "created": created, "model": served_name,
            "choices": choices, "usage": usage}


class SseFramer:
    """Turns mistral.rs stream chunks into OpenAI's SSE events (`data: {...}\\n\\n`,
    ending with `data: [DONE]`), with the usage chunk when the client asked for it."""

    def __init__(self, plan: _Plan, request_id: str, served_name: str) -> None:
        self._plan = plan
        self._chat = plan.kind == "chat"
        self._id = f"{'chatcmpl' if self._chat else 'cmpl'}-{request_id}"
        self._created = int(time.time())
        self._model = served_name
        self._started: set[int] = set()
        self._usage: dict[str, int] | None = None
        self._completion_tokens = 0

    def _event(self, choices: list[dict[str, Any]], usage: Any = None) -> str:
        body = {"id": self._id, "object": "chat.completion.chunk" if self._chat
                else "text_completion", "created": self._created, "model": self._model,
                "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    def events(self, chunk: Any) -> list[str]:
        out = []
        if getattr(chunk, "usage", None) is not None:
            self._usage = _usage(chunk.usage)
        for c in chunk.choices:
            text = c.delta.content or ""
            finish = _finish(c.finish_reason)
            if self._chat:
                delta: dict[str, Any] = {"content": text}
                if c.index not in self._started:
                    self._started.add(c.index)
                    # OpenAI's first chunk carries the role.
                    out.append(self._event([{"index": c.index, "delta": {
                        "role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]))
                choice = {"index": c.index, "delta": delta, "logprobs": None,
                          "finish_reason": finish}
            else:
                choice = {"index": c.index, "text": text, "logprobs": None,
                          "finish_reason": finish}
            if text or finish:
                if text:
                    self._completion_tokens += 1
                out.append(self._event([choice]))
        return out

    @classmethod
    def from_reply(cls, plan: _Plan, reply: dict[str, Any]) -> list[str]:
        """A finished (non-streamed) completion reply as SSE events."""
        framer = cls(plan, reply["id"].split("-", 1)[1], reply["model"])
        framer._usage = reply["usage"]
        out = [framer._event([{"index": c["index"], "text": c["text"], "logprobs": None,
                               "finish_reason": c["finish_reason"]}])
               for c in reply["choices"]]
        return out + framer.finish()

    def finish(self) -> list[str]:
        out = []
        if self._plan.include_usage:
            usage = self._usage or {
                "prompt_tokens": self._plan.prompt_tokens,
                "completion_tokens": self._completion_tokens,
                "total_tokens": self._plan.prompt_tokens + self._completion_tokens}
            out.append(self._event([], usage))
        out.append("data: [DONE]\n\n")
        return out

