"""Held-out perplexity of mistral.rs's ISQ variants, measured as the ISQ quality gate
measures the llmcompressor jobs, so that both sit in one comparison.

    nice -n 10 flock /tmp/ruvllm-heavy.lock .venv/bin/python -m benchmarks.mistralrs_isq_quality

mistral.rs's API gives log-probabilities of generated tokens only, so the weights and
activation rounding it serves are reproduced in torch (benchmarks/ggml_fake_quant.py, which
says what mistral.rs quantizes and how, from its source) and scored there:

1. Reproduction check, per ISQ type: bare mistral.rs (its `Runner`, ISQ at load, float32
   otherwise, as a deployment runs it) answers a few chat prompts greedily with the
   log-probability of every generated token; the reproduction scores the same prompt and
   answer tokens. Reported: generated tokens where the reproduction's argmax is mistral.rs's
   token, and the largest |log-prob difference| of those tokens. Float32 mistral.rs against
   float32 transformers is the control (how close two engines get with no quantization);
   two other readings of the source (weights rounded but not the activations; the tied
   lm_head quantized as an untied one would be) show how far off a wrong reproduction is.
2. Perplexity: the gate's evaluation sets with their defaults (`ruvllm.isq.job.
   evaluation_sets`: the corpus's eval splits, 32 x 512 tokens, gated; Python's licence
   and language reference, 32 x 512, reported) and the gate's own code
   (`ruvllm.isq.worker.perplexity`), for the base and each type, in one run; the verdict
   against the shipped gate threshold (`IsqConfig.max_perplexity_increase`'s default).

Writes isq_quality.json and isq_quality.md under --out (benchmarks/results/backends).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.ggml_fake_quant import apply_plan, isq_plan, linear_shapes

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "backends"
QUESTIONS = (
    "What is the capital of France?",
    "Explain in two sentences why the sky is blue.",
    "Write a short Python function that reverses a string.",
    "List three uses of a volcano's heat for people living nearby.",
)


def log(msg: str) -> None:
    print(f"[isq-quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def load_model(base: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()


def reproduction(base: Path, isq_type: str | None, reading: str = "source"):
    """The torch model for one reading of mistral.rs's ISQ (see the module docstring)."""
    model = load_model(base)
    if isq_type is None:
        return model, {}
    tied = bool(model.config.tie_word_embeddings)
    plan = isq_plan(isq_type, linear_shapes(model), tied,
                    head_quantized=reading in ("head-quantized", "tied-quantized"))
    counts = apply_plan(model, plan, activations=reading != "weights-only")
    if reading == "tied-quantized":  # the embedding looks its rows up in the rounded head
        model.get_input_embeddings().weight = model.get_output_embeddings().weight
    return model, counts


# -- 1. reproduction check -----------------------------------------------------------------


def mistralrs_answers(base: Path, isq_type: str | None, tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of bare mistral.rs with each generated token's id and log-prob."""
    from mistralrs import ChatCompletionRequest, Runner

    from ruvllm.deployments.mistralrs_model import MistralRsModel

    runner = Runner(which=MistralRsModel(base, base, in_situ=isq_type).which(), max_seqs=4,
                    in_situ_quant=isq_type)
    out = []
    for question in QUESTIONS:
        response = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": question}],
            max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=True,
            top_logprobs=1))
        content = response.choices[0].logprobs.content
        if any(abs(c.top_logprobs[0].logprob - c.logprob) > 1e-6 for c in content):
            raise RuntimeError("a greedy token is not mistral.rs's top-1 token")
        out.append({"question": question, "prompt_tokens": response.usage.prompt_tokens,
                    "text": response.choices[0].message.content,
                    "ids": [c.top_logprobs[0].token for c in content],
                    "logprobs": [c.logprob for c in content]})
    del runner
    return out


def score_answers(model, tokenizer, answers: list[dict[str, Any]]) -> dict[str, Any]:
    """The reproduction's argmax and log-prob at each of mistral.rs's generated tokens."""
    import torch

    agree = total = 0
    diffs = []
    for a in answers:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": a["question"]}], add_generation_prompt=True,
            tokenize=True, return_dict=False)
        if len(prompt) != a["prompt_tokens"]:
            raise RuntimeError(f"prompt of {len(prompt)} tokens here, {a['prompt_tokens']} "
                               "in mistral.rs: the chat templates differ")
        ids = torch.tensor([prompt + a["ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        for i, (tok, lp) in enumerate(zip(a["ids"], a["logprobs"])):
            row = logp[len(prompt) - 1 + i]
            agree += int(row.argmax()) == tok
            total += 1
            diffs.append(abs(float(row[tok]) - lp))
    return {"tokens": total, "argmax_agree": agree, "abs_logprob_diffs": diffs,
            "max_abs_logprob_diff": max(diffs), "mean_abs_logprob_diff": sum(diffs) / len(diffs)}


READINGS = ("source", "weights-only", "head-quantized", "tied-quantized")


def reproduction_check(base: Path, types: list[str], tokens: int,
                       readings: tuple[str, ...] = READINGS) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    result: dict[str, Any] = {"prompts": len(QUESTIONS), "tokens_per_prompt": tokens}
    for isq_type in [None, *types]:
        name = isq_type or "F32"
        t = time.monotonic()
        answers = mistralrs_answers(base, isq_type, tokens)
        log(f"mistral.rs {name}: {len(answers)} answers in {time.monotonic() - t:.0f} s; "
            f"first: {answers[0]['text']!r}")
        rows = {}
        for reading in ["source"] if isq_type is None else readings:
            model, _ = reproduction(base, isq_type, reading)
            rows[reading] = score_answers(model, tokenizer, answers)
            log(f"  reproduction {name} ({reading}): argmax agrees on "
                f"{rows[reading]['argmax_agree']}/{rows[reading]['tokens']} tokens, max "
                f"|log-prob diff| {rows[reading]['max_abs_logprob_diff']:.4f}")
            del model
        result[name] = {"answers": answers, "readings": rows,
                        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    return result


# -- 2. perplexity -----------------------------------------------------------------------


def gate_base_perplexity(windows: list[list[int]]) -> float | None:
    """The base model's perplexity on exactly these windows as the ISQ gate recorded it
    (isq/job.py keeps it per weights and windows digest), if a gate run did."""
    from ruvllm.model_store import builtin_dir

    digest = hashlib.sha256(json.dumps(windows).encode()).hexdigest()[:16]
    cache = builtin_dir("smollm2-135m-instruct").parent.parent / "isq" / "base-perplexity"
    found = sorted(cache.glob(f"*-{digest}.json"))
    return json.loads(found[0].read_text())["perplexity"] if found else None


def perplexities(base: Path, variants: list[tuple[str, str]],
                 progress=lambda partial: None) -> dict[str, Any]:
    """Perplexity of each (ISQ type, reading) on the gate's sets, and the gate's verdict."""
    from ruvllm.config import IsqConfig
    from ruvllm.isq.job import evaluation_sets
    from ruvllm.isq.worker import perplexity

    config = IsqConfig(in_situ=variants[0][0])  # evaluation settings: the gate's defaults
    sets = evaluation_sets(base, config)
    limit = config.max_perplexity_increase
    result = {"max_perplexity_increase": limit,
              "sets": {s.name: s.description for s in sets}, "rows": {}}
    rows = result["rows"]
    known = {s.name: gate_base_perplexity(s.windows) for s in sets}
    if all(known.values()):  # the same windows the gate measured: its base figures
        rows["base"] = {"type": None, "reading": "the ISQ gate's cached base perplexity "
                        "on the identical windows", "weights_by_type": {}, "sets": {
                            s.name: {"perplexity": known[s.name], "gated": s.gated,
                                     "windows": len(s.windows),
                                     "seq_len": len(s.windows[0])} for s in sets}}
    for isq_type, reading in ([] if "base" in rows else [(None, "source")]) + variants:
        name = isq_type or "base"
        name += f" ({reading})" if reading != "source" else ""
        model, counts = reproduction(base, isq_type, reading)
        row: dict[str, Any] = {"type": isq_type, "reading": reading,
                               "weights_by_type": counts, "sets": {}}
        for s in sets:
            t = time.monotonic()
            ppl = perplexity(model, s.windows, f"{name} {s.name}")
            row["sets"][s.name] = {"perplexity": ppl, "gated": s.gated,
                                   "windows": len(s.windows), "seq_len": len(s.windows[0]),
                                   "seconds": time.monotonic() - t}
            log(f"{name} {s.name}: perplexity {ppl:.3f} ({time.monotonic() - t:.0f} s)")
        row["measured"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        rows[name] = row
        del model
        for r in rows.values():
            for set_name, s in r["sets"].items():
                s["increase"] = s["perplexity"] / rows["base"]["sets"][set_name]["perplexity"] - 1
            r["gate_passed"] = all(s["increase"] <= limit for s in r["sets"].values()
                                   if s["gated"])
        progress(result)  # a run stopped part way keeps the rows it finished
    return result


# -- report ------------------------------------------------------------------------------


def timed(measure) -> dict[str, Any]:
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
    result = measure()
    result["measured"] = f"{started}-{time.strftime('%H:%M UTC', time.gmtime())}"
    return result


def write_report(out: Path, data: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "isq_quality.json").write_text(json.dumps(data, indent=2))
    ppl = data.get("perplexity")
    lines = ["# mistral.rs ISQ: held-out perplexity", "",
             f"On {data['cpus']} CPU cores; SmolLM2-135M-Instruct; mistral.rs 0.9.5 (PyPI); "
             "`python -m benchmarks.mistralrs_isq_quality` (method: its docstring).", ""]
    if ppl:
        limit = ppl["max_perplexity_increase"]
        names = list(next(iter(ppl["rows"].values()))["sets"])
        lines += [f"Gate: held-out perplexity at most {1 + limit:g}x the base's on every "
                  f"gated set (`isq.max_perplexity_increase` default {limit:g}).", "",
                  "| model | weights by type (millions) | "
                  + " | ".join(f"{n} ppl | {n} increase" for n in names) + " | gate | measured |",
                  "|---|---|" + "---|---|" * len(names) + "---|---|"]
        for name, row in ppl["rows"].items():
            types = ", ".join(f"{t} {n / 1e6:.1f}" for t, n in row["weights_by_type"].items())
            cells = " | ".join(f"{row['sets'][n]['perplexity']:.3f} | "
                               f"{100 * row['sets'][n]['increase']:+.2f}%" for n in names)
            verdict = "—" if name == "base" else ("passes" if row["gate_passed"] else "fails")
            lines.append(f"| {name} | {types or 'all float32'} | {cells} | {verdict} | "
                         f"{row.get('measured', ppl['measured'])} |")
        lines += ["", "Sets: " + "; ".join(f"`{n}`: {d}" for n, d in ppl["sets"].items())
                  + " (only the first is gated).", ""]
    check = data.get("reproduction_check")
    if check:
        lines += [f"Reproduction check: {check['prompts']} chat prompts x "
                  f"{check['tokens_per_prompt']} greedy tokens from bare mistral.rs, scored "
                  "by the torch reproduction (argmax agreement and |log-prob difference| "
                  "at mistral.rs's tokens):", "",
                  "| mistral.rs | reproduction | argmax agrees | max abs log-prob diff | "
                  "mean abs log-prob diff | measured |", "|---|---|---|---|---|---|"]
        for name, entry in check.items():
            if not isinstance(entry, dict) or "readings" not in entry:
                continue
            for reading, r in entry["readings"].items():
                lines.append(f"| {name} | {reading} | {r['argmax_agree']}/{r['tokens']} | "
                             f"{r['max_abs_logprob_diff']:.4f} | "
                             f"{r['mean_abs_logprob_diff']:.4f} | "
                             f"{entry.get('measured', check['measured'])} |")
        lines += ["", "Readings: `source` is what mistral.rs's source at 9e92262 says "
                  "(ggml_fake_quant's docstring; the tied lm_head stays float32); "
                  "`weights-only` leaves out candle's Q8 rounding of matmul inputs; "
                  "`head-quantized` also quantizes the tied lm_head as an untied one "
                  "(promoted: Q4_0 and Q4K -> Q6K -> Q5_1 at width 576, Q8_0 -> Q8_0), "
                  "the embedding staying float32; `tied-quantized` as `head-quantized` with "
                  "the embedding looking its rows up in the same rounded matrix."]
    lines += ["", "The base row is the ISQ gate's cached measurement on byte-identical windows "
              "(found by their digest; the figures of benchmarks/results/isq/report.md). "
              "Reading the results (which lm_head, how close the reproduction is, why Q4K "
              "is nearly lossless here): why-4bit.md section 7."]
    (out / "isq_quality.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--types", default="Q4_0,Q8_0")
    parser.add_argument("--tokens", type=int, default=32,
                        help="greedy tokens per prompt in the reproduction check")
    parser.add_argument("--readings", default=",".join(READINGS))
    parser.add_argument("--ppl", default="Q4_0,Q4_0:head-quantized,Q8_0,Q4K",
                        help="TYPE[:READING],... whose perplexity is measured (readings: "
                             "see --readings; default source)")
    parser.add_argument("--skip-check", action="store_true")
    parser.add_argument("--skip-perplexity", action="store_true")
    args = parser.parse_args()
    import torch

    from ruvllm.model_store import prepare_builtin

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    base = prepare_builtin("smollm2-135m-instruct")
    types = args.types.split(",")
    data: dict[str, Any] = {"types": types, "cpus": len(os.sched_getaffinity(0))}
    saved = args.out / "isq_quality.json"
    if saved.is_file():  # a part skipped now keeps its last measurement (and its date)
        old = json.loads(saved.read_text())
        data.update({k: old[k] for k in ("reproduction_check", "perplexity") if k in old})
    if not args.skip_check:
        check = timed(lambda: reproduction_check(
            base, types, args.tokens, tuple(args.readings.split(","))))
        # Types not checked now keep their last check (each entry says when).
        data["reproduction_check"] = {**data.get("reproduction_check", {}), **check}
    if not args.skip_perplexity:
        started = time.strftime("%Y-%m-%d %H:%M", time.gmtime())

        kept = (data.get("perplexity") or {}).get("rows", {})

        def progress(partial: dict[str, Any]) -> None:
            # Rows not measured now keep their last measurement (each says when).
            partial["rows"] = {**kept, **partial["rows"]}
            partial["measured"] = f"{started}-{time.strftime('%H:%M UTC', time.gmtime())}"
            write_report(args.out, {**data, "perplexity": partial})

        variants = [tuple((v + ":source").split(":")[:2]) for v in args.ppl.split(",")]
        data["perplexity"] = timed(lambda: perplexities(base, variants, progress))
        data["perplexity"]["rows"] = {**kept, **data["perplexity"]["rows"]}
    write_report(args.out, data)
    log(f"report in {args.out / 'isq_quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
