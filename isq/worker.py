"""The quantization job's body, run by the toolkit environment's interpreter as a file
(`python -I isq/worker.py SPEC.json`: `run_worker` in isq/job.py, see isq/toolkit_env.py).
It imports only torch, transformers and llmcompressor, never the serving stack, because
those live in different environments.

SPEC names the base checkpoint, the output directory, the method and its parameters,
and files of pre-tokenized calibration windows and of each evaluation set's windows. The
worker writes a compressed-tensors checkpoint (which vLLM loads natively) and a metrics
file with the perplexities of the base and the quantized model on every set; given an
existing checkpoint instead of an output directory it only evaluates.
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


def weight_scheme(bits: int, group_size: int | None, symmetric: bool,
                  kept: list[str] = (), kept_bits: int = 8, kept_symmetric: bool = True):
    """One scheme for every Linear layer, and `kept_bits` for the layers named in `kept`
    (compressed-tensors gives an exact module name precedence over the class "Linear")."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    def args(b: int, sym: bool) -> QuantizationArgs:
        return QuantizationArgs(
            num_bits=b, type="int", symmetric=sym,
            strategy="group" if group_size else "channel", group_size=group_size)

    groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=args(bits, symmetric))}
    if kept and kept_bits < 16:
        groups["group_1"] = QuantizationScheme(targets=list(kept),
                                               weights=args(kept_bits, kept_symmetric))
    return groups


def recipe(spec: dict, kept: list[str] = ()):
    """llmcompressor modifiers for the spec; `kept` layers (mixed precision) are quantized
    to spec["mixed_precision"]["bits"] instead, or left out (bfloat16) at 16."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    method, bits, group = spec["method"], spec["bits"], spec["group_size"]
    kept_bits = (spec.get("mixed_precision") or {}).get("bits", 8)
    ignore = ["lm_head"] + (list(kept) if kept_bits == 16 else [])
    mixed = {"kept": list(kept), "kept_bits": kept_bits}
    symmetric = spec["symmetric"]
    # Kept 8-bit layers stay on the grid they had before `symmetric` existed.
    mixed["kept_symmetric"] = method != "awq" or symmetric
    gptq_options = {"actorder": spec.get("actorder"),
                    **({"dampening_frac": spec["dampening_frac"]}
                       if spec.get("dampening_frac") else {})}
    if spec.get("activation_bits") == 8 and method == "rtn":
        # int8 per-channel weights, dynamic per-token int8 activations.
        return QuantizationModifier(scheme="W8A8", targets=["Linear"], ignore=ignore)
    if spec.get("activation_bits") == 8 and method == "gptq":
        return GPTQModifier(scheme="W8A8", targets=["Linear"], ignore=ignore, **gptq_options)
    if method == "rtn":
        return QuantizationModifier(config_groups=weight_scheme(bits, group, symmetric, **mixed),
                                    ignore=ignore)
    if method == "gptq":
        return GPTQModifier(config_groups=weight_scheme(bits, group, symmetric, **mixed),
                            ignore=ignore, **gptq_options)
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier

        # AWQ's published recipe: asymmetric weights, scales searched per layer group.
        return [AWQModifier(duo_scaling=True),
                QuantizationModifier(config_groups=weight_scheme(bits, group, symmetric, **mixed),
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


def deterministic(threads: int) -> None:
    """Same inputs, same bytes: fixed seeds, torch's deterministic kernels where it has
    them, and a fixed thread count (float sums reduce in a thread-dependent order, so the
    thread count is part of what a checkpoint's bytes depend on; the report records it)."""
    import random

    import numpy
    import torch

    # cuBLAS is deterministic only with a fixed workspace (must be set before CUDA starts).
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(0)
    numpy.random.seed(0)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(threads)


def evaluate(model, eval_sets: list[dict], what: str) -> dict[str, float]:
    out = {}
    for s in eval_sets:
        windows = json.loads(Path(s["windows_file"]).read_text())
        t = time.monotonic()
        out[s["name"]] = perplexity(model, windows, f"{what} {s['name']}")
        log(f"{what} perplexity {out[s['name']]:.3f} on {s['name']} ({len(windows)} windows, "
            f"{time.monotonic() - t:.0f} s)")
    return out


def keep_sensitive(model, spec: dict, calibration: list[list[int]], metrics: dict) -> list[str]:
    """Measure each Linear layer's sensitivity on the first calibration windows and pick
    the layers mixed precision keeps at higher precision (isq/sensitivity.py); records
    the measurement and the choice in `metrics`."""
    # The worker runs isolated in the toolkit venv (python -I), where ruvllm is not
    # importable: load its sibling module by path (it needs torch only).
    import importlib.util

    found = importlib.util.spec_from_file_location(
        "isq_sensitivity", Path(__file__).with_name("sensitivity.py"))
    sensitivity = importlib.util.module_from_spec(found)
    found.loader.exec_module(sensitivity)
    choose_kept, decoder_linears, fisher_sensitivity = (
        sensitivity.choose_kept, sensitivity.decoder_linears, sensitivity.fisher_sensitivity)

    mp = spec["mixed_precision"]
    windows = calibration[:mp["sensitivity_windows"]]
    t = time.monotonic()
    sens = fisher_sensitivity(model, windows, spec["bits"], spec["group_size"],
                              spec["symmetric"])
    sizes = {n: m.weight.numel() for n, m in decoder_linears(model).items()}
    kept = choose_kept(sens, sizes, mp["fraction"])
    seconds = time.monotonic() - t
    log(f"sensitivity on {len(windows)} windows in {seconds:.0f} s; keeping {len(kept)} of "
        f"{len(sizes)} Linear layers ({sum(sizes[n] for n in kept) / sum(sizes.values()):.3f} "
        f"of their weights) at {mp['bits']} bits")
    metrics["mixed_precision"] = {
        "proxy": "Fisher-weighted RTN error sum(grad^2 * (W - RTN(W))^2), "
                 f"{len(windows)} calibration windows",
        "seconds": seconds, "kept": kept,
        "kept_weight_fraction": sum(sizes[n] for n in kept) / sum(sizes.values()),
        "sensitivity": {n: sens[n] for n in sorted(sens, key=sens.get, reverse=True)}}
    return kept


def quantize_into(model, spec: dict, out: Path, metrics: dict) -> float:
    """Quantize `model` in place with the spec's recipe and save it to `out`; seconds."""
    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer

    calibration = json.loads(Path(spec["calibration_file"]).read_text())
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
    kept = keep_sensitive(model, spec, calibration, metrics) if spec.get("mixed_precision") else []
    oneshot(model=model, recipe=recipe(spec, kept), **kwargs)
    seconds = time.monotonic() - t
    log(f"quantized in {seconds:.0f} s; saving")
    model.to(getattr(torch, spec.get("save_dtype", "bfloat16")))
    model.save_pretrained(out, save_compressed=True)
    AutoTokenizer.from_pretrained(spec["base_dir"]).save_pretrained(out)
    for extra in ("chat_template.jinja", "generation_config.json"):
        src = Path(spec["base_dir"]) / extra
        if src.is_file() and not (out / extra).exists():
            (out / extra).write_bytes(src.read_bytes())
    return seconds


def main(spec_path: str) -> None:
    """Quantize into out_dir and evaluate it, or (quantized_dir set) only evaluate."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    threads = int(spec.get("threads") or os.cpu_count() or 1)
    deterministic(threads)
    # Calibrate in float32 (bfloat16 matmuls are many times slower on CPUs without
    # AMX); the checkpoint is saved in the serving dtype, whose bytes the report compares.
    work_dtype = torch.bfloat16 if _cuda() else torch.float32
    eval_sets = spec["eval_sets"]
    metrics: dict = {"threads": threads,
                     "device": torch.cuda.get_device_name() if _cuda() else "cpu",
                     "sets": {s["name"]: {"base_perplexity": s["base_perplexity"]}
                              for s in eval_sets}}
    unknown = [s for s in eval_sets if s["base_perplexity"] is None]
    model = None
    if unknown or not spec.get("quantized_dir"):
        log(f"loading {spec['base_dir']}")
        model = load(spec["base_dir"], work_dtype)
        for name, ppl in evaluate(model, unknown, "base").items():
            metrics["sets"][name]["base_perplexity"] = ppl
    if spec.get("quantized_dir"):
        quantized_dir = Path(spec["quantized_dir"])
        metrics["quantize_seconds"] = None
    else:
        quantized_dir = Path(spec["out_dir"])
        metrics["quantize_seconds"] = quantize_into(model, spec, quantized_dir, metrics)
    del model

    t = time.monotonic()
    quantized = load(str(quantized_dir), work_dtype)  # decompressed by compressed-tensors
    for name, ppl in evaluate(quantized, eval_sets, "quantized").items():
        metrics["sets"][name]["perplexity"] = ppl
    metrics["eval_seconds"] = time.monotonic() - t
    Path(spec["metrics_file"]).write_text(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
