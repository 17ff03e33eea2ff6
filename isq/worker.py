"""The quantization job's body, run by the toolkit environment's interpreter
(`python -m isq.worker SPEC.json`, see isq/toolkit_env.py). It imports only torch,
transformers and llmcompressor, never the serving stack, because those live in
different environments.

SPEC names the base checkpoint, the output directory, the method and its parameters,
and files of pre-tokenized calibration and held-out windows. The worker writes a
compressed-tensors checkpoint (which vLLM loads natively) and `isq-metrics.json` with
the perplexities of the base and the quantized model on the held-out windows.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[isq {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def weight_scheme(bits: int, group_size: int | None, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(
        num_bits=bits, type="int", symmetric=symmetric,
        strategy="group" if group_size else "channel", group_size=group_size)
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def recipe(spec: dict):
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    method, bits, group = spec["method"], spec["bits"], spec["group_size"]
    ignore = ["lm_head"]
    if spec.get("activation_bits") == 8 and method == "rtn":
        # int8 per-channel weights, dynamic per-token int8 activations.
        return QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)
    if spec.get("activation_bits") == 8 and method == "gptq":
        return GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore,
                            actorder=spec.get("actorder"))
    if method == "rtn":
        return QuantizationModifier(config_groups=weight_scheme(bits, group, True), ignore=ignore)
    if method == "gptq":
        return GPTQModifier(config_groups=weight_scheme(bits, group, True), ignore=ignore,
                            actorder=spec.get("actorder"))
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ's published recipe: asymmetric weights, scales searched per layer group.
        return [AWQModifier(duo_scaling=True),
                QuantizationModifier(config_groups=weight_scheme(bits, group, False),
                                     ignore=ignore)]
    if method == "smoothquant":
        from llmcompressor.modifiers.smoothquant import SmoothQuantModifier

        # int8 weights and dynamic per-token int8 activations (W8A8).
        return [SmoothQuantModifier(smoothing_strength=0.8),
                GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)]
    if method == "fp8":
        return QuantizationModifier(scheme="FP8_DYNAMIC", targets=["Linear"], ignore=ignore)
    raise ValueError(f"unknown method {method!r}")


def needs_calibration(method: str) -> bool:
    return method in ("gptq", "awq", "smoothquant")


def allow_awq_on_cpu() -> None:
    """llmcompressor's AWQ pins its activation cache (`Tensor.pin_memory()`) to speed up
    host-to-GPU copies; without an NVIDIA driver that raises. Pinning only helps a GPU,
    so on a machine without CUDA it becomes a no-op. Nothing changes where CUDA exists."""
    import torch
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.cuda.is_available():
        IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def perplexity(model, windows: list[list[int]], what: str) -> float:
    import torch

    total_nll, total_tokens = 0.0, 0
    device = next(model.parameters()).device
    started = last = time.monotonic()
    with torch.no_grad():
        for i, ids in enumerate(windows, 1):
            if time.monotonic() - last > 15:
                last = time.monotonic()
                log(f"{what} perplexity: {i - 1}/{len(windows)} windows "
                    f"({last - started:.0f} s)")
            x = torch.tensor([ids], device=device)
            out = model(input_ids=x, labels=x)
            n = len(ids) - 1
            total_nll += out.loss.float().item() * n
            total_tokens += n
    return math.exp(total_nll / total_tokens)


def load(path: str, dtype):
    from transformers import AutoModelForCausalLM

    device = "cuda" if _cuda() else "cpu"
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(spec_path: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(int(spec.get("threads") or os.cpu_count() or 1))
    out = Path(spec["out_dir"])
    calibration = json.loads(Path(spec["calibration_file"]).read_text())
    heldout = json.loads(Path(spec["heldout_file"]).read_text())
    # Calibrate in float32 (bfloat16 matmuls are many times slower on CPUs without
    # AMX); the checkpoint is saved in the serving dtype, whose bytes the report compares.
    work_dtype = torch.bfloat16 if _cuda() else torch.float32
    save_dtype = getattr(torch, spec.get("save_dtype", "bfloat16"))

    metrics: dict = {}
    base_ppl = spec.get("base_perplexity")
    log(f"loading {spec['base_dir']}")
    model = load(spec["base_dir"], work_dtype)
    if base_ppl is None:
        t = time.monotonic()
        base_ppl = perplexity(model, heldout, "base")
        log(f"base perplexity {base_ppl:.3f} on {len(heldout)} held-out windows "
            f"({time.monotonic() - t:.0f} s)")
    metrics["base_perplexity"] = base_ppl

    from llmcompressor import oneshot

    if spec["method"] == "awq":
        allow_awq_on_cpu()
    kwargs = {}
    if needs_calibration(spec["method"]):
        ds = Dataset.from_dict({"input_ids": calibration,
                                "attention_mask": [[1] * len(w) for w in calibration]})
        kwargs = dict(dataset=ds, num_calibration_samples=len(calibration),
                      max_seq_length=max(len(w) for w in calibration),
                      shuffle_calibration_samples=False)
        log(f"calibrating {spec['method']} W{spec['bits']} on {len(calibration)} windows "
            f"x {kwargs['max_seq_length']} tokens")
    else:
        log(f"quantizing {spec['method']} W{spec['bits']} (no calibration data needed)")
    t = time.monotonic()
    oneshot(model=model, recipe=recipe(spec), **kwargs)
    metrics["quantize_seconds"] = time.monotonic() - t
    log(f"quantized in {metrics['quantize_seconds']:.0f} s; saving")
    model.to(save_dtype)
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(spec["base_dir"]).save_pretrained(out)
    for extra in ("chat_template.jinja", "generation_config.json"):
        src = Path(spec["base_dir"]) / extra
        if src.is_file() and not (out / extra).exists():
            (out / extra).write_bytes(src.read_bytes())
    del model

    t = time.monotonic()
    quantized = load(str(out), work_dtype)  # decompressed by compressed-tensors
    metrics["perplexity"] = perplexity(quantized, heldout, "quantized")
    metrics["eval_seconds"] = time.monotonic() - t
    log(f"quantized perplexity {metrics['perplexity']:.3f} (base {base_ppl:.3f}, "
        f"{100 * (metrics['perplexity'] / base_ppl - 1):+.2f}%)")
    (out / "isq-metrics.json").write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
