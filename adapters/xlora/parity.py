"""Parity of the vLLM X-LoRA model with peft's XLoraModel on the same checkpoint.

    python -m ruvllm.adapters.xlora.parity --xlora DIR --base DIR [--prompts 5 --tokens 32]

Greedy-decodes each prompt with vLLM (float32 on CPU by default; `--dtype bfloat16` on a
GPU, prefix caching on) and scores vLLM's tokens with peft in the same dtype and device.
peft needs `use_cache=False`: its scaling pass runs over the whole sequence, which is what
the dual KV cache must reproduce; one forward over prompt + answer gives every step's
logits (both passes are causal), where a step-by-step loop took 0.7 s a token on 2 cores.
It prints a JSON report: the greedy tokens of both and the log-probability of every chosen
token under both. Runs in its own process because vLLM spawns workers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    '{"id": 17, "name": "vega-kernel", "city": "Oslo", "tags": [',
    "The module provides a simple way to manage temporary files, and",
    "import json\n\ndata = {\"user\": \"u42\", \"level\": 3}\nprint(json.dumps(",
    "Return a new list containing all items from the iterable in ascending order. A custom",
    "class Point:\n    def __init__(self, x, y):\n",
]


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _progress(phase: str, started: float) -> None:
    """A line on stderr per phase, with the GPU's free memory: what a failed run's kept
    stderr needs to show where it stopped (a GPU run of 12-02 exited without a report)."""
    line = f"[parity] {phase} (+{time.monotonic() - started:.0f} s"
    if _on_gpu():
        # Through NVML, not torch.cuda: a CUDA context made here, before vLLM starts its
        # engine, would change how vLLM starts its workers (spawn instead of fork).
        from vllm.third_party import pynvml

        pynvml.nvmlInit()
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
        index = int(first) if first.isdigit() else 0  # a UUID there: the first card
        memory = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        line += f", GPU memory free {memory.free / 2**30:.1f} of {memory.total / 2**30:.1f} GiB"
    print(line + ")", file=sys.stderr, flush=True)


def vllm_side(model_dir: Path, prompt_ids: list[list[int]], tokens: int,
              dtype: str = "float32", cuda_graphs: bool = False,
              prefix_caching: bool = True) -> list[dict]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # CPU attention needs blocks of 32; on a GPU, a small share of its memory is plenty.
    device_args = {"gpu_memory_utilization": 0.3} if _on_gpu() else {"block_size": 32}
    llm = LLM(model=str(model_dir), dtype=dtype, enforce_eager=not cuda_graphs,
              enable_prefix_caching=prefix_caching, max_model_len=512, seed=0, **device_args)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=1, ignore_eos=True)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids], params)
    result = [{"tokens": list(o.outputs[0].token_ids),
               "logprobs": [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                           o.outputs[0].token_ids)]}
              for o in outputs]
    if prefix_caching:  # non-granular mode serves without it (deployments/replica.py)
        # Again, continuing each answer part-way: the new prompt spans at least one full
        # block (32 tokens) that the first run cached, in both KV caches, so it is a hit.
        cut = [min(tokens - 1, max(tokens // 2, 40 - len(ids))) for ids in prompt_ids]
        resumed = [ids + r["tokens"][:k] for ids, r, k in zip(prompt_ids, result, cut)]
        again = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in resumed],
                             [SamplingParams(temperature=0.0, max_tokens=tokens - k,
                                             ignore_eos=True) for k in cut])
        for r, out2, k in zip(result, again, cut):
            r["tokens_prefix_cached"] = r["tokens"][:k] + list(out2.outputs[0].token_ids)
            r["prefix_cached_prompt_tokens"] = int(out2.num_cached_tokens or 0)
    del llm
    return result


def peft_side(xlora_dir: Path, base_dir: Path, prompt_ids: list[list[int]], tokens: int,
              forced: list[list[int]], dtype: str = "float32",
              non_granular: bool = False) -> list[dict]:
    """peft's logprobs along vLLM's token path (so one early divergence cannot hide
    later agreement), peft's own greedy choices on that path, and at each step how far
    vLLM's token is below peft's best (0 where they agree; small where bf16 rounding
    flipped a near-tie). peft has no non-granular mode; for it, the classifier's output
    at every position from the prompt's last token on is replaced by its output there,
    which is that mode's definition (mistral.rs's `tgt_non_granular_index`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ruvllm.adapters.xlora.fixture import load_peft_xlora

    device = "cuda" if _on_gpu() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=getattr(torch, dtype))
    model.config.use_cache = False
    model = load_peft_xlora(model.to(device), xlora_dir).eval()
    prompt_end = [0]

    def hold_prompt_end(_module, _inputs, scalings):  # [batch, tokens, modules, experts]
        first = prompt_end[0]
        return torch.cat([scalings[:, :first], scalings[:, first:first + 1].expand_as(
            scalings[:, first:])], dim=1)

    if non_granular:
        model.base_model.internal_xlora_classifier.register_forward_hook(hold_prompt_end)
    result = []
    with torch.no_grad():
        for ids, path in zip(prompt_ids, forced):
            # One forward over prompt + path: each position's scalings come from the
            # scaling pass over the tokens up to it (causal attention, a per-token
            # classifier), so position t's logits are what a step-by-step, cache-free
            # decode computes at step t, in one pass instead of `tokens` of them.
            prompt_end[0] = len(ids) - 1
            seq = torch.tensor([list(ids) + path[:-1]], device=device)
            logits = model(input_ids=seq, use_cache=False).logits[0, len(ids) - 1:]
            lp = torch.log_softmax(logits.float(), dim=-1)
            chosen = torch.tensor(path, device=device)
            taken = lp.gather(1, chosen[:, None])[:, 0]
            result.append({"tokens": lp.argmax(dim=-1).tolist(), "logprobs": taken.tolist(),
                           "margins": (lp.max(dim=-1).values - taken).tolist()})
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--xlora", type=Path, required=True, help="peft X-LoRA checkpoint")
    parser.add_argument("--base", type=Path, required=True, help="base model checkpoint")
    parser.add_argument("--prompts", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="vLLM side with torch.compile and CUDA graphs, as GPU replicas run")
    parser.add_argument("--non-granular", action="store_true",
                        help="the mixture in non-granular mode (served without prefix caching)")
    args = parser.parse_args()
    started = time.monotonic()

    from transformers import AutoTokenizer

    from ruvllm.adapters.xlora.checkpoint import export_for_vllm

    tokenizer = AutoTokenizer.from_pretrained(str(args.base))
    prompt_ids = [tokenizer(p)["input_ids"] for p in PROMPTS[:args.prompts]]
    model_dir = export_for_vllm(args.xlora, args.base, args.xlora.parent / "exported",
                                {"non_granular": True} if args.non_granular else None)
    _progress("vLLM side", started)
    ours = vllm_side(model_dir, prompt_ids, args.tokens, args.dtype, args.cuda_graphs,
                     prefix_caching=not args.non_granular)
    _progress("peft side", started)
    ref = peft_side(args.xlora, args.base, prompt_ids, args.tokens, [o["tokens"] for o in ours],
                    args.dtype, args.non_granular)
    _progress("compared", started)
    report = []
    for o, r in zip(ours, ref):
        diffs = [abs(a - b) for a, b in zip(o["logprobs"], r["logprobs"])]
        row = {"vllm_tokens": o["tokens"], "peft_tokens": r["tokens"],
               "identical_greedy": o["tokens"] == r["tokens"],
               # Where the two parted: how much likelier peft found its own token.
               "max_disagreement_margin": max(r["margins"]),
               "max_abs_logprob_diff": max(diffs), "text": tokenizer.decode(o["tokens"])}
        if "tokens_prefix_cached" in o:
            row.update({"prefix_cached_tokens": o["tokens_prefix_cached"],
                        "identical_with_prefix_cache": o["tokens"] == o["tokens_prefix_cached"],
                        "prefix_cached_prompt_tokens": o["prefix_cached_prompt_tokens"]})
        report.append(row)
    text = json.dumps({"dtype": args.dtype, "device": "cuda" if _on_gpu() else "cpu",
                       "cuda_graphs": args.cuda_graphs, "non_granular": args.non_granular,
                       "prompts": report,
                       "max_abs_logprob_diff": max(p["max_abs_logprob_diff"] for p in report)},
                      indent=2)
    if args.out:
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
