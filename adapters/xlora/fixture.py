"""Build a small real X-LoRA checkpoint on CPU: three LoRA experts trained with peft on
clearly different text domains (Python source, JSON records, English prose; see
`ruvllm.corpus`) and an X-LoRA classifier trained over them, saved in peft's format.

    ruvllm xlora-fixture            # prints the checkpoint directory; cached afterwards

The result is cached under `<cache>/xlora/<spec hash>` and written atomically, like the
builtin model, so tests and benchmarks share one build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ruvllm.atomic_dir import build_once
from ruvllm.config import resolve_cache_dir
from ruvllm.corpus import DOMAINS, corpus, mixed_windows, token_windows

Progress = Callable[[str], None]


@dataclass(frozen=True)
class FixtureSpec:
    targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")
    rank: int = 8
    alpha: int = 16
    # Sized for 2 CPU cores: a step of 4 x 64 tokens through all 30 layers takes ~2 s,
    # so the whole build is ~5 minutes (seq 128 doubles it; bf16 autocast is 25x slower).
    seq_len: int = 64
    batch: int = 4
    expert_steps: int = 30
    expert_lr: float = 2e-3
    classifier_steps: int = 50
    classifier_lr: float = 3e-3
    xlora_depth: int = 2
    xlora_size: int = 128
    eval_windows: int = 4
    seed: int = 0
    version: int = 2

    @property
    def key(self) -> str:
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _log(msg: str) -> None:
    print(f"[ruvllm xlora] {msg}", file=sys.stderr, flush=True)


def fixture_dir(spec: FixtureSpec = FixtureSpec(), cache_dir: Path | str | None = None) -> Path:
    return resolve_cache_dir(cache_dir) / "xlora" / f"fixture-{spec.key}"


def build_fixture(base_path: Path | str, spec: FixtureSpec = FixtureSpec(),
                  cache_dir: Path | str | None = None, progress: Progress = _log) -> Path:
    """The X-LoRA checkpoint for `spec` (one expert sub-directory per domain)."""
    target = fixture_dir(spec, cache_dir)

    def build(tmp: Path) -> None:
        report = _train(Path(base_path), spec, tmp, progress)
        (tmp / "fixture.json").write_text(json.dumps(report, indent=2))

    if not build_once(target, "fixture.json", build):
        return target
    progress(f"X-LoRA fixture ready at {target}")
    return target


def save_xlora(xlora_model, out: Path) -> None:
    """Write the X-LoRA config and classifier at the top of `out` (the experts are already
    in its sub-directories), in the layout peft's `PeftModel.from_pretrained(...,
    adapters=...)` loads. Not `save_pretrained`: peft 0.21.2 writes the whole model into
    each expert's directory and drops the classifier's layer indices from its keys
    ("layers.0.weight" becomes "layers.weight"), so the result does not load."""
    from safetensors.torch import save_file

    config = xlora_model.peft_config["default"]
    config.save_pretrained(str(out))
    # peft records the experts by the paths they were loaded from; store them relative.
    config_path = out / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["adapters"] = {name: name for name in saved.get("adapters", {})}
    config_path.write_text(json.dumps(saved, indent=2))
    classifier = {k: v.detach().cpu().contiguous() for k, v in xlora_model.state_dict().items()
                  if "internal_xlora_classifier" in k}
    if not classifier:
        raise RuntimeError("the X-LoRA model has no classifier weights")
    save_file(classifier, str(out / "adapter_model.safetensors"))


def _train(base_path: Path, spec: FixtureSpec, out: Path, progress: Progress) -> dict:
    import torch
    from peft import LoraConfig, XLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(spec.seed)
    started = time.monotonic()
    # Seconds on a GPU instead of minutes on CPU cores; the same steps and data either way.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = AutoTokenizer.from_pretrained(str(base_path))
    splits = corpus()
    data = {d: token_windows(tokenizer, splits[d].train, spec.seq_len,
                             spec.batch * max(spec.expert_steps, spec.classifier_steps), spec.seed)
            for d in DOMAINS}
    held_out = {d: token_windows(tokenizer, splits[d].eval, spec.seq_len, spec.eval_windows,
                                 spec.seed) for d in DOMAINS}
    report: dict = {"spec": dataclasses.asdict(spec), "experts": {}, "domains": list(DOMAINS)}

    def eval_loss(model, domain: str) -> float:
        with torch.no_grad():
            ids = torch.tensor(held_out[domain], device=device)
            return round(model(input_ids=ids, labels=ids).loss.item(), 4)

    def run(model, params, batches, lr: float, label: str) -> list[float]:
        optimizer = torch.optim.AdamW(params, lr=lr)
        losses = []
        model.train()
        for step, batch in enumerate(batches):
            ids = torch.tensor(batch, device=device)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(round(loss.item(), 4))
            if step % 10 == 0 or step == len(batches) - 1:
                progress(f"{label}: step {step + 1}/{len(batches)} loss {losses[-1]:.3f} "
                         f"({time.monotonic() - started:.0f} s)")
        model.eval()
        return losses

    # Experts are saved as plain LoRA adapters named "0", "1", ...: peft's X-LoRA loader
    # names them so internally and `set_adapter` fails on any other names.
    for index, domain in enumerate(DOMAINS):
        name = str(index)
        model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).to(device)
        config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0,
                            target_modules=list(spec.targets), task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, config)
        before = eval_loss(peft_model, domain)  # B starts at zero: the base model's loss
        windows = data[domain]
        batches = [windows[i * spec.batch:(i + 1) * spec.batch] for i in range(spec.expert_steps)]
        losses = run(peft_model, [p for p in peft_model.parameters() if p.requires_grad],
                     batches, spec.expert_lr, f"expert {index} ({domain})")
        peft_model.save_pretrained(str(out / name))
        report["experts"][name] = {"domain": domain, "first_loss": losses[0],
                                   "last_loss": losses[-1], "held_out_loss_base": before,
                                   "held_out_loss_trained": eval_loss(peft_model, domain)}
        progress(f"expert {index} ({domain}): held-out loss {before:.3f} -> "
                 f"{report['experts'][name]['held_out_loss_trained']:.3f}")

    model = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32).to(device)
    model.config.use_cache = False  # peft's X-LoRA recomputes the scaling pass each step
    xlora_config = XLoraConfig(
        task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
        adapters={str(i): str(out / str(i)) for i in range(len(DOMAINS))},
        xlora_depth=spec.xlora_depth, xlora_size=spec.xlora_size, xlora_dropout_p=0.0,
        enable_softmax=True, layerwise_scalings=False)
    xlora_model = get_peft_model(model, xlora_config)
    # Classifier batches: whole windows from one domain, and windows switching domains.
    rng = random.Random(spec.seed + 1)
    mixed = mixed_windows(tokenizer, "train", spec.seq_len, spec.batch * spec.classifier_steps,
                          spec.seed)
    batches = []
    for step in range(spec.classifier_steps):
        batch = []
        for j in range(spec.batch):
            k = step * spec.batch + j
            batch.append(mixed[k] if rng.random() < 0.34 else data[rng.choice(DOMAINS)][k])
        batches.append(batch)
    losses = run(xlora_model, [p for p in xlora_model.parameters() if p.requires_grad],
                 batches, spec.classifier_lr, "X-LoRA classifier")
    save_xlora(xlora_model, out)
    report["classifier"] = {"first_loss": losses[0], "last_loss": losses[-1]}
    report["seconds"] = round(time.monotonic() - started, 1)
    report["base_model"] = str(base_path)
    return report


def load_peft_xlora(model, xlora_dir: Path | str):
    """peft's `XLoraModel` for a checkpoint in this layout (the reference implementation
    parity tests and benchmarks compare against). The config names its experts relative
    to the checkpoint; peft resolves them against the working directory, so they are
    made absolute first."""
    from peft import PeftConfig, PeftModel

    xlora_dir = Path(xlora_dir)
    config = PeftConfig.from_pretrained(str(xlora_dir))
    config.adapters = {name: str(xlora_dir / path) for name, path in config.adapters.items()}
    return PeftModel.from_pretrained(model, str(xlora_dir), config=config)
