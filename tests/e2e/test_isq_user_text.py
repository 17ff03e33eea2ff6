"""ISQ on a user's own text, end to end with the real toolkit: a GPTQ job calibrated on a
small local file is gated on the file's held-out fifth, passes or fails on those numbers,
and measures a cached checkpoint again (without quantizing again) when the evaluation
sets change. Runs the job in-process (no Serve app): a tiny calibration keeps it short."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

BASE = "smollm2-135m-instruct"


def write_support_tickets(path: Path, count: int = 80) -> Path:
    """A seeded stand-in for a product's traffic: short support exchanges, one paragraph
    each (a .txt file's documents are its blank-line separated paragraphs)."""
    rng = random.Random(19)
    products = ("the Aurora kettle", "the Nimbus router", "the Tern e-bike", "the Quill pen")
    problems = ("stops after two minutes", "shows a blinking red light", "will not pair with "
                "my phone", "makes a clicking noise", "lost all its settings overnight")
    fixes = ("hold the reset button for ten seconds", "update the firmware from the app",
             "check that the cable is seated firmly", "send it back with the prepaid label")
    paragraphs = []
    for i in range(count):
        product, problem, fix = rng.choice(products), rng.choice(problems), rng.choice(fixes)
        paragraphs.append(
            f"Ticket {1000 + i}. Customer: Hello, {product} I bought last month {problem}. "
            f"What should I do?\nAgent: Sorry to hear that. Please {fix}, and tell us if "
            f"{product} still {problem} afterwards. Your case number is {rng.randrange(10**5)}.")
    path.write_text("\n\n".join(paragraphs) + "\n")
    return path


def test_job_calibrated_on_a_users_file_is_gated_on_its_held_out_part(base_model_path,
                                                                        tmp_path):
    from ruvllm.isq.job import IsqQualityError, cache_key, quantize, result_dir, weights_digest
    from ruvllm.isq.job import memoised_calibration_windows
    from ruvllm.config import IsqConfig, resolve_cache_dir

    cache = resolve_cache_dir(None)
    tickets = write_support_tickets(tmp_path / "tickets.txt")
    settings = {"method": "gptq", "bits": 4, "group_size": 64, "num_cpus": 0,
                "calibration": {"source": str(tickets), "samples": 8, "seq_len": 64},
                "evaluation": {"windows": 4, "seq_len": 128}}
    isq = IsqConfig.model_validate({**settings, "max_perplexity_increase": 10})
    weights = weights_digest(base_model_path)
    calibration = memoised_calibration_windows(base_model_path, isq.calibration, weights,
                                               cache, holdout=True)
    target = result_dir(cache, BASE, isq, cache_key(weights, isq, calibration))
    shutil.rmtree(target, ignore_errors=True)  # this test owns this key: build it afresh

    first = quantize(base_model_path, BASE, isq, cache)
    assert not first.reused and first.path == target
    report = first.report
    import torch

    assert (report["device"] == "cpu") == (not torch.cuda.is_available())  # where it ran
    assert report["calibration"]["windows"] == 8 and "every 5th document" in report[
        "calibration"]["held_out"]
    sets = {s["name"]: s for s in report["evaluation"]["sets"]}
    assert list(sets) == ["calibration-heldout", "out-of-distribution"]
    held = sets["calibration-heldout"]
    assert held["gated"] and not sets["out-of-distribution"]["gated"]
    assert held["windows"] == 4 and held["seq_len"] == 128
    assert str(tickets) in held["description"]
    assert held["perplexity_increase"] > 0  # 4-bit weights cost something on this text
    assert report["gate"] == {"max_perplexity_increase": 10, "gated_sets": ["calibration-heldout"],
                              "passed": True, "failed_sets": []}
    assert json.loads((target / "isq-report.json").read_text()) == report
    built_at = (target / "model.safetensors").stat().st_mtime_ns

    # The user's own threshold, just under the measured increase on their held-out text.
    strict = IsqConfig.model_validate(
        {**settings, "max_perplexity_increase": held["perplexity_increase"] * 0.9})
    with pytest.raises(IsqQualityError) as e:
        quantize(base_model_path, BASE, strict, cache)
    message = str(e.value)
    assert "evaluation set calibration-heldout" in message
    assert f"{held['base_perplexity']:.3f}" in message and f"{held['perplexity']:.3f}" in message
    assert "out-of-distribution" not in message
    on_disk = json.loads((target / "isq-report.json").read_text())
    assert on_disk["gate"]["failed_sets"] == ["calibration-heldout"]
    assert (target / "model.safetensors").stat().st_mtime_ns == built_at

    # Another evaluation set: same calibration, same checkpoint, measured again.
    wider = {**settings, "evaluation": {**settings["evaluation"],
                                        "source": ["calibration", "builtin"]}}
    again = quantize(base_model_path, BASE, IsqConfig.model_validate(
        {**wider, "max_perplexity_increase": 10}), cache)
    assert again.reused and again.path == target
    assert (target / "model.safetensors").stat().st_mtime_ns == built_at
    names = [s["name"] for s in again.report["evaluation"]["sets"]]
    assert names == ["calibration-heldout", "builtin", "out-of-distribution"]
    assert again.report["gate"]["gated_sets"] == ["calibration-heldout", "builtin"]
    rows = {s["name"]: s for s in again.report["evaluation"]["sets"]}
    assert rows["calibration-heldout"]["perplexity"] == pytest.approx(held["perplexity"])

    # Both sets are gated: a threshold between their increases fails exactly the worse one
    # (a checkpoint calibrated on tickets loses more on the corpus's text than on tickets).
    worse, better = sorted((r for r in rows.values() if r["gated"]),
                           key=lambda r: -r["perplexity_increase"])
    between = (worse["perplexity_increase"] + better["perplexity_increase"]) / 2
    with pytest.raises(IsqQualityError) as e:
        quantize(base_model_path, BASE, IsqConfig.model_validate(
            {**wider, "max_perplexity_increase": between}), cache)
    assert f"evaluation set {worse['name']} " in str(e.value)
    assert f"evaluation set {better['name']} " not in str(e.value)
    assert json.loads((target / "isq-report.json").read_text())["gate"]["failed_sets"] == [
        worse["name"]]
