"""X-LoRA quality and speed on the fixture checkpoint (`ruvllm xlora-fixture`).

    python -m benchmarks.xlora_bench          # ~15 min on 2 cores, after the fixture exists

Quality: held-out perplexity (the corpus's eval splits, never seen in training) per
domain and on text that switches domain mid-window, for the base model, each expert
alone and the X-LoRA mixture, computed with peft's reference implementation.

Speed, in one run on the same engine settings (vLLM-CPU, float32, eager: the X-LoRA model
runs eagerly, so every peer does too): decode tokens/s for the base model, the base model
with one plain LoRA adapter, X-LoRA granular and X-LoRA non-granular; and the
classifier's time per token.

Writes report.json, report.md and report.png under --out.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.harness import MODEL, ROOT, log

SPEED_PROMPTS = 16


def perplexities(base: Path, xlora: Path, windows: int, seq_len: int) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ruvllm.adapters.xlora.fixture import load_peft_xlora
    from ruvllm.corpus import DOMAINS, corpus, mixed_windows, token_windows

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    sets = {d: token_windows(tokenizer, corpus()[d].eval, seq_len, windows, seed=7) for d in DOMAINS}
    sets["mixed"] = mixed_windows(tokenizer, "eval", seq_len, windows, seed=7)
    experts = json.loads((xlora / "adapter_config.json").read_text())["adapters"]
    fixture = json.loads((xlora / "fixture.json").read_text())

    def ppl(model) -> dict[str, float]:
        out = {}
        with torch.no_grad():
            for name, ws in sets.items():
                losses = [model(input_ids=torch.tensor([w]), labels=torch.tensor([w]),
                                use_cache=False).loss.item() for w in ws]
                out[name] = math.exp(sum(losses) / len(losses))
        return out

    def fresh():
        m = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        m.config.use_cache = False
        return m.eval()

    results = {"base": ppl(fresh())}
    log(f"perplexity base: {results['base']}")
    for name in experts:
        domain = fixture["experts"][name]["domain"]
        results[f"expert {name} ({domain})"] = ppl(PeftModel.from_pretrained(fresh(), str(xlora / name)))
        log(f"perplexity expert {name}: {results[f'expert {name} ({domain})']}")
    results["X-LoRA"] = ppl(load_peft_xlora(fresh(), xlora))
    log(f"perplexity X-LoRA: {results['X-LoRA']}")
    return {"sets": {k: len(v) for k, v in sets.items()}, "seq_len": seq_len, "ppl": results}


SPEED_SCRIPT = r'''
import json, os, sys, time
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest
    model, lora, n, tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    eager = sys.argv[5] == "eager"
    kwargs = dict(enable_lora=True, max_lora_rank=8, max_loras=1) if lora else {}
    llm = LLM(model=model, dtype="float32", enforce_eager=eager, max_model_len=512,
              enable_prefix_caching=False, seed=0, **kwargs)
    prompts = [f"Write a short story about the number {i}." for i in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    request = LoRARequest("expert", 1, lora) if lora else None
    llm.generate(prompts[:2], SamplingParams(max_tokens=4), lora_request=request)  # warm up
    started = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=request)
    elapsed = time.perf_counter() - started
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    print("RESULT " + json.dumps({"tokens": generated, "seconds": elapsed}))
'''


def speed(base: Path, xlora: Path, tokens: int, out: Path,
          only: set[str] | None = None) -> dict:
    from ruvllm.adapters.xlora.checkpoint import export_for_vllm

    import tempfile

    script = Path(tempfile.mkdtemp(prefix="xlora-bench-")) / "speed_run.py"
    script.write_text(SPEED_SCRIPT)
    exported = xlora.parent / "exported"  # the cache, beside the fixture
    targets = {
        "base": (base, "", "eager"),
        "single LoRA": (base, str(xlora / "0"), "eager"),  # the python expert
        "X-LoRA granular": (export_for_vllm(xlora, base, exported, {}), "", "eager"),
        "X-LoRA non-granular": (export_for_vllm(xlora, base, exported, {"non_granular": True}),
                                "", "eager"),
        # Not a peer for the targets (X-LoRA cannot be compiled yet): what a base-model
        # deployment gets from vLLM's compiled mode on the same machine.
        "base (compiled)": (base, "", "compiled"),
    }
    if only:
        targets = {k: v for k, v in targets.items() if k in only | {"base"}}
    results = {}
    for name, (model, lora, mode) in targets.items():
        log(f"speed: {name}")
        run = subprocess.run([sys.executable, str(script), str(model), lora, str(SPEED_PROMPTS),
                              str(tokens), mode], capture_output=True, text=True, cwd=ROOT)
        line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{name} failed:\n{run.stderr[-3000:]}")
        r = json.loads(line[7:])
        r["tok_per_s"] = r["tokens"] / r["seconds"]
        results[name] = r
        log(f"speed: {name}: {r['tok_per_s']:.1f} tok/s")
    base_rate = results["base"]["tok_per_s"]
    for r in results.values():
        r["ratio_vs_base"] = r["tok_per_s"] / base_rate
    return results


def classifier_time(base: Path, xlora: Path) -> dict:
    import torch
    from safetensors import safe_open

    from ruvllm.adapters.xlora.checkpoint import export_for_vllm
    from ruvllm.adapters.xlora.vllm_model import XLoraClassifier

    model_dir = export_for_vllm(xlora, base, xlora.parent / "exported", {})
    config = json.loads((model_dir / "config.json").read_text())
    classifier = XLoraClassifier(config["hidden_size"], config["xlora"]).eval()
    with safe_open(str(model_dir / "xlora.safetensors"), framework="pt") as f:
        state = {k[len("xlora.classifier."):]: f.get_tensor(k)
                 for k in f.keys() if k.startswith("xlora.classifier.")}
    classifier.layers.load_state_dict(state)
    out = {}
    with torch.no_grad():
        for tokens in (1, 16, 64):
            x = torch.randn(tokens, config["hidden_size"])
            for _ in range(20):
                classifier(x)
            started = time.perf_counter()
            reps = 500
            for _ in range(reps):
                classifier(x)
            per_call = (time.perf_counter() - started) / reps
            out[str(tokens)] = {"us_per_token": per_call / tokens * 1e6, "us_per_call": per_call * 1e6}
    return out


def write_report(out: Path, result: dict) -> None:
    (out / "report.json").write_text(json.dumps(result, indent=2))
    q = result["quality"]["ppl"]
    sets = list(next(iter(q.values())).keys())
    experts = [k for k in q if k.startswith("expert")]
    lines = ["# X-LoRA quality and speed", "",
             f"Measured {result['date']} on 2 CPU cores; fixture {result['fixture']}.",
             "Sections measured: " + ", ".join(f"{k} {v}" for k, v in
                                             result["sections_measured"].items()) + ".", "",
             "## Held-out perplexity (lower is better)", "",
             "| model | " + " | ".join(sets) + " |", "|---" * (len(sets) + 1) + "|"]
    for name, row in q.items():
        lines.append(f"| {name} | " + " | ".join(f"{row[s]:.2f}" for s in sets) + " |")
    lines.append("")
    checks = []
    for s in sets:
        best = min(q[e][s] for e in experts)
        ratio = q["X-LoRA"][s] / best
        if s == "mixed":
            checks.append(f"- mixed: X-LoRA {q['X-LoRA'][s]:.2f} vs best single expert {best:.2f} "
                          f"({'better' if q['X-LoRA'][s] < best else 'NOT better'}; target: better "
                          "than every single expert)")
        else:
            checks.append(f"- {s}: X-LoRA / best expert = {ratio:.3f} (target <= 1.05)")
    lines += checks + ["", "## Decode speed (vLLM-CPU, float32, same run; eager unless marked compiled)", "",
                       f"{SPEED_PROMPTS} prompts x {result['tokens']} tokens, greedy.", "",
                       "| model | tokens/s | vs base |", "|---|---|---|"]
    for name, r in result["speed"].items():
        lines.append(f"| {name} | {r['tok_per_s']:.1f} | {r['ratio_vs_base']:.2f}x |")
    lines += ["", "Targets: granular >= 0.5x base, non-granular >= 0.8x base (eager peers; "
              "`base (compiled)` shows what vLLM's compiled mode gives the base model here).", "",
              "## Classifier time", "", "| tokens per call | us per token | us per call |",
              "|---|---|---|"]
    for t, c in result["classifier"].items():
        lines.append(f"| {t} | {c['us_per_token']:.1f} | {c['us_per_call']:.1f} |")
    lines += ["", "Target: < 1 ms (1000 us) per token.", "", "![X-LoRA](report.png)", ""]
    (out / "report.md").write_text("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(q)
    for i, (name, row) in enumerate(q.items()):
        axes[0].bar([j + i * width for j in range(len(sets))], [row[s] for s in sets], width, label=name)
    axes[0].set_xticks([j + 0.4 for j in range(len(sets))], sets)
    axes[0].set_title("held-out perplexity")
    axes[0].legend(fontsize=7)
    names = list(result["speed"])
    axes[1].bar(names, [result["speed"][n]["tok_per_s"] for n in names], color="tab:blue")
    axes[1].set_title("decode tokens/s")
    axes[1].tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    fig.savefig(out / "report.png", dpi=110)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "xlora")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=192)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--speed-models", default="",
                        help="comma-separated subset of the speed rows (base always runs); "
                        "the result goes to --out/speed-repeat.json, the report is kept")
    parser.add_argument("--sections", default="quality,speed,classifier",
                        help="what to measure; the others are kept from --out/report.json")
    args = parser.parse_args()
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"quality", "speed", "classifier"}
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}")
    args.out.mkdir(parents=True, exist_ok=True)

    from ruvllm.adapters.xlora.fixture import build_fixture
    from ruvllm.model_store import prepare_builtin

    base = prepare_builtin(MODEL)
    xlora = build_fixture(base)
    previous = args.out / "report.json"
    result = json.loads(previous.read_text()) if previous.is_file() else {}
    if set(result.get("sections_measured", {})) | sections < {"quality", "speed", "classifier"}:
        parser.error(f"{previous} lacks sections that this run does not measure")
    result.update(fixture=str(xlora), tokens=args.tokens)
    measured = result.setdefault("sections_measured", {})
    if "quality" in sections:
        result["quality"] = perplexities(base, xlora, args.windows, args.seq_len)
    if args.speed_models:
        only = {m.strip() for m in args.speed_models.split(",")}
        repeat = speed(base, xlora, args.tokens, args.out, only)
        repeat_file = args.out / "speed-repeat.json"
        runs = json.loads(repeat_file.read_text()) if repeat_file.is_file() else []
        runs.append({"date": time.strftime("%Y-%m-%d %H:%M"), "speed": repeat})
        repeat_file.write_text(json.dumps(runs, indent=2))
        for name, r in repeat.items():
            print(f"{name}: {r['tok_per_s']:.1f} tok/s, {r['ratio_vs_base']:.3f}x base")
        return 0
    if "speed" in sections:
        result["speed"] = speed(base, xlora, args.tokens, args.out)
    if "classifier" in sections:
        result["classifier"] = classifier_time(base, xlora)
    for section in sections:
        measured[section] = time.strftime("%Y-%m-%d %H:%M")
    result["date"] = max(measured.values())
    write_report(args.out, result)
    print((args.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
