"""ISQ pure logic: config validation, cache keys, checkpoint byte accounting, the gate."""

from __future__ import annotations

import os
import json
import struct
from pathlib import Path

import pytest

from ruvllm.isq import checkpoint_bytes
from ruvllm.isq.job import IsqQualityError, cache_key, check_quality, gate_verdict, result_dir
from ruvllm import corpus
from ruvllm.config import AppConfig, ConfigError, IsqConfig


def app_with(isq: dict) -> AppConfig:
    return AppConfig.from_args({"quantized": [{"name": "q", "isq": isq}]})


@pytest.mark.parametrize("isq, field, words", [
    ({"method": "awq", "bits": 8}, "quantized.0.isq", "awq supports 4"),
    ({"method": "smoothquant", "bits": 4}, "quantized.0.isq", "smoothquant supports 8"),
    ({"method": "fp8", "group_size": 64}, "quantized.0.isq", "group_size"),
    ({"method": "rtn", "group_size": 50}, "quantized.0.isq", "multiple of 16"),
    ({"method": "rtn", "actorder": True}, "quantized.0.isq", "actorder"),
    ({"method": "rtn", "dampening_frac": 0.1}, "quantized.0.isq", "dampening_frac"),
    ({"method": "gptq", "dampening_frac": 1}, "quantized.0.isq.dampening_frac", "less than 1"),
    ({"method": "smoothquant", "symmetric": False}, "quantized.0.isq", "symmetric"),
    ({"method": "rtn", "bits": 8, "activation_bits": 8, "symmetric": False},
     "quantized.0.isq", "symmetric"),
    ({"method": "gptq", "activation_bits": 8}, "quantized.0.isq", "activation_bits"),
    ({"method": "gptq", "bits": 8, "activation_bits": 8, "group_size": 64},
     "quantized.0.isq", "group_size"),
    ({"method": "gptq", "calibration": {"source": "/nonexistent.txt"}},
     "quantized.0.isq.calibration", "does not exist"),
    ({"method": "gptq", "max_perplexity_increase": 0}, "quantized.0.isq.max_perplexity_increase",
     "greater than 0"),
    ({"method": "int3"}, "quantized.0.isq.method", "awq"),
    ({"method": "gptq", "bits": 8, "mixed_precision": {}}, "quantized.0.isq", "mixed_precision"),
    ({"method": "smoothquant", "mixed_precision": {}}, "quantized.0.isq", "mixed_precision"),
    ({"method": "gptq", "mixed_precision": {"fraction": 1}},
     "quantized.0.isq.mixed_precision.fraction", "less than 1"),
    ({"method": "gptq", "mixed_precision": {"bits": 4}},
     "quantized.0.isq.mixed_precision.bits", "8"),
])
def test_invalid_combinations_name_the_field(isq, field, words):
    with pytest.raises(ConfigError) as e:
        app_with(isq)
    line = next(ln for ln in str(e.value).splitlines() if ln.strip().startswith(field))
    assert words in line, str(e.value)


def test_defaults_per_method():
    assert IsqConfig(method="smoothquant").describe() == "smoothquant W8A8"
    assert IsqConfig(method="fp8").describe() == "fp8 W8A8"
    assert IsqConfig(method="gptq").describe() == "gptq W4A16 g128"
    assert IsqConfig(method="rtn", group_size=-1).resolved_group_size is None
    assert not IsqConfig(method="rtn").needs_calibration
    assert IsqConfig(method="awq").needs_calibration


def test_gptq_act_order_is_on_unless_turned_off():
    assert IsqConfig(method="gptq").job_params()["actorder"] == "static"
    assert IsqConfig(method="gptq", bits=8, activation_bits=8).job_params()["actorder"] == "static"
    assert IsqConfig(method="gptq", actorder=False).job_params()["actorder"] is None
    assert IsqConfig(method="rtn").job_params()["actorder"] is None
    assert IsqConfig(method="awq").job_params()["actorder"] is None


def test_weight_grid_and_dampening_keep_old_keys_unless_set():
    """The knobs enter the job's parameters (so the cache key) only when set: checkpoints
    built before they existed keep their keys."""
    assert not IsqConfig(method="gptq").symmetric_weights  # asymmetric at 4 bits
    assert not IsqConfig(method="rtn").symmetric_weights
    assert IsqConfig(method="gptq", bits=8).symmetric_weights
    assert not IsqConfig(method="awq").symmetric_weights
    assert IsqConfig(method="gptq", symmetric=False).job_params()["symmetric"] is False
    legacy = IsqConfig(method="gptq", symmetric=True).job_params()
    assert "symmetric" not in legacy and "dampening_frac" not in legacy
    assert "symmetric" not in IsqConfig(method="awq").job_params()
    assert "symmetric" not in IsqConfig(method="gptq", bits=8).job_params()
    assert IsqConfig(method="gptq", dampening_frac=0.1).job_params()["dampening_frac"] == 0.1
    keys = {cache_key("w" * 64, IsqConfig(method="gptq", **extra), [[1]])
            for extra in ({}, {"symmetric": True}, {"dampening_frac": 0.1})}
    assert len(keys) == 3


def test_variant_names_must_not_clash():
    with pytest.raises(ConfigError, match="unique"):
        AppConfig.from_args({"quantized": [{"name": "smollm2-135m-instruct",
                                            "isq": {"method": "rtn"}}]})


def test_cache_key_covers_weights_params_and_calibration(tmp_path):
    a = IsqConfig(method="gptq", group_size=64)
    calib = [[1, 2, 3], [4, 5, 6]]
    key = cache_key("w" * 64, a, calib)
    assert key == cache_key("w" * 64, IsqConfig(method="gptq", group_size=64), calib)
    assert key != cache_key("v" * 64, a, calib)
    assert key != cache_key("w" * 64, IsqConfig(method="gptq", group_size=128), calib)
    assert key != cache_key("w" * 64, a, [[1, 2, 3]])
    # The gate's threshold and held-out text are the deployment's, not the checkpoint's.
    assert key == cache_key("w" * 64, IsqConfig(method="gptq", group_size=64,
                                                max_perplexity_increase=0.01), calib)
    assert key == cache_key("w" * 64, IsqConfig(
        method="gptq", group_size=64, evaluation={"windows": 8, "seq_len": 128,
                                                  "out_of_distribution": False}), calib)
    d = result_dir(tmp_path, "m", a, key)
    assert d.parent == tmp_path / "isq" and d.name.startswith("m-gptq-w4a16-g64-")


def _write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    sizes = {"BF16": 2, "F32": 4, "I32": 4, "I8": 1}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def test_checkpoint_bytes_compare_linear_layers_and_the_whole(tmp_path):
    base, quant = tmp_path / "base", tmp_path / "quant"
    base.mkdir(), quant.mkdir()
    _write_safetensors(base / "model.safetensors", {
        "model.embed_tokens.weight": ("F32", [100, 64]),
        "model.layers.0.self_attn.q_proj.weight": ("F32", [64, 64]),
        "model.layers.0.mlp.down_proj.weight": ("F32", [64, 128]),
    })
    _write_safetensors(quant / "model.safetensors", {
        "model.embed_tokens.weight": ("BF16", [100, 64]),
        "model.layers.0.self_attn.q_proj.weight_packed": ("I32", [64, 8]),
        "model.layers.0.self_attn.q_proj.weight_scale": ("BF16", [64, 1]),
        "model.layers.0.mlp.down_proj.weight_packed": ("I32", [64, 16]),
        "model.layers.0.mlp.down_proj.weight_scale": ("BF16", [64, 2]),
    })
    b = checkpoint_bytes.compare(base, quant)
    assert b["base_bf16"] == 2 * (6400 + 4096 + 8192)  # counted at bf16, whatever is stored
    assert b["base_linear_bf16"] == 2 * (4096 + 8192)
    assert b["quantized_linear"] == 4 * 64 * 8 + 2 * 64 + 4 * 64 * 16 + 2 * 128
    assert b["quantized"] == b["quantized_linear"] + 2 * 6400
    assert b["linear_ratio"] == pytest.approx(b["quantized_linear"] / b["base_linear_bf16"])


def _report(*sets: tuple[str, float, float, bool]) -> dict:
    return {"evaluation": {"sets": [
        {"name": n, "description": f"the {n} text", "gated": g, "windows": 4, "seq_len": 64,
         "base_perplexity": b, "perplexity": q, "perplexity_increase": q / b - 1}
        for n, b, q, g in sets]}}


def test_quality_gate_names_the_failing_set_and_both_perplexities():
    isq = IsqConfig(method="rtn", max_perplexity_increase=0.1)
    check_quality(_report(("builtin", 10.0, 10.9, True)), isq)
    report = _report(("calibration-heldout", 10.0, 10.5, True), ("tickets.jsonl", 8.0, 10.0, True),
                     ("out-of-distribution", 10.0, 20.0, False))
    assert gate_verdict(report, isq) == {
        "max_perplexity_increase": 0.1, "gated_sets": ["calibration-heldout", "tickets.jsonl"],
        "passed": False, "failed_sets": ["tickets.jsonl"]}
    with pytest.raises(IsqQualityError) as e:
        check_quality(report, isq)
    message = str(e.value)
    assert "evaluation set tickets.jsonl" in message and "the tickets.jsonl text" in message
    assert "8.000" in message and "10.000" in message and "+25.00%" in message
    assert "max_perplexity_increase 0.1" in message
    # Passing sets and the reported-only out-of-distribution set are not blamed.
    assert "calibration-heldout" not in message and "out-of-distribution" not in message


def test_out_of_distribution_set_is_reported_not_gated():
    isq = IsqConfig(method="rtn", max_perplexity_increase=0.1)
    report = _report(("builtin", 10.0, 10.5, True), ("out-of-distribution", 10.0, 20.0, False))
    assert gate_verdict(report, isq)["passed"]
    check_quality(report, isq)


def test_evaluation_sources_default_to_the_calibration_files_held_out_part(tmp_path):
    text = tmp_path / "tickets.txt"
    text.write_text("one\n\ntwo\n\nthree")
    other = tmp_path / "eval.jsonl"
    other.write_text('{"text": "x"}\n')
    assert IsqConfig(method="gptq").evaluation_sources == ("builtin",)
    calibrated = IsqConfig(method="gptq", calibration={"source": str(text)})
    assert calibrated.evaluation_sources == ("calibration",) and calibrated.holds_out_calibration
    # RTN calibrates on nothing, so nothing is held out.
    assert IsqConfig(method="rtn", calibration={"source": str(text)}).evaluation_sources == (
        "builtin",)
    explicit = IsqConfig(method="gptq", calibration={"source": str(text)},
                         evaluation={"source": str(other)})
    assert explicit.evaluation_sources == (str(other),) and not explicit.holds_out_calibration
    both = IsqConfig(method="gptq", calibration={"source": str(text)},
                     evaluation={"source": ["calibration", "builtin"]})
    assert both.evaluation_sources == ("calibration", "builtin") and both.holds_out_calibration


@pytest.mark.parametrize("evaluation, calibration, field, words", [
    ({"source": "/nonexistent.jsonl"}, "builtin", "quantized.0.isq.evaluation", "does not exist"),
    ({"source": "calibration"}, "builtin", "quantized.0.isq", "calibration.source is builtin"),
    ({"source": "SAME"}, "SAME", "quantized.0.isq", "is the calibration file"),
    ({"source": ["builtin", "builtin"]}, "builtin", "quantized.0.isq.evaluation", "once"),
    ({"source": []}, "builtin", "quantized.0.isq.evaluation", "at least one"),
])
def test_invalid_evaluation_sources_name_the_field(tmp_path, evaluation, calibration, field,
                                                   words):
    text = tmp_path / "text.txt"
    text.write_text("a\n\nb")
    swap = lambda v: str(text) if v == "SAME" else v  # noqa: E731
    evaluation = {"source": swap(evaluation["source"])}
    with pytest.raises(ConfigError) as e:
        app_with({"method": "gptq", "calibration": {"source": swap(calibration)},
                  "evaluation": evaluation})
    line = next(ln for ln in str(e.value).splitlines() if ln.strip().startswith(field))
    assert words in line, str(e.value)


def test_holdout_split_is_every_fifth_document_and_disjoint():
    docs = tuple(f"doc {i}" for i in range(12))
    split = corpus.holdout_split(docs)
    assert split.eval == ("doc 4", "doc 9")
    assert set(split.train) | set(split.eval) == set(docs) and not set(split.train) & set(split.eval)
    assert corpus.holdout_split(docs) == split  # deterministic
    assert corpus.holdout_split(("a", "b", "c")).eval == ("c",)
    with pytest.raises(ValueError, match="at least two documents"):
        corpus.holdout_split(("only",))


def test_user_text_files_are_read_as_documents(tmp_path):
    txt, jsonl = tmp_path / "a.txt", tmp_path / "b.jsonl"
    txt.write_text("first para\nstill first\n\n\n\nsecond\n")
    jsonl.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert corpus.file_documents(txt) == ("first para\nstill first", "second")
    assert corpus.file_documents(jsonl) == ("one", "two")


def test_out_of_distribution_text_shares_no_line_with_the_corpus():
    def lines(texts) -> set[str]:
        return {ln.strip() for t in texts for ln in t.splitlines()
                if len(ln.strip()) >= 40 and sum(c.isalpha() for c in ln) >= 20}

    seen = set()
    for split in corpus.corpus().values():
        seen |= lines(split.train) | lines(split.eval)
    ood = corpus.out_of_distribution()
    assert len(lines(ood["reference"])) > 1000
    for texts in ood.values():
        assert not lines(texts) & seen


def test_weight_only_schemes_need_a_kernel_this_cpu_may_lack():
    from ruvllm.isq.serving import WNA16_OP, serving_problem

    assert serving_problem(IsqConfig(method="gptq"), on_gpu=True) is None
    problem = serving_problem(IsqConfig(method="gptq"), on_gpu=False)
    if problem is not None:  # an AVX2-only CPU: the message says what to use instead
        assert WNA16_OP in problem and "activation_bits: 8" in problem
    assert serving_problem(IsqConfig(method="rtn", bits=8, activation_bits=8),
                           on_gpu=False) is None


def test_calibration_windows_are_memoised_per_weights_tokenizer_and_settings(tmp_path, monkeypatch):
    import ruvllm.isq.job as job
    from ruvllm.config import CalibrationConfig

    calls = []

    def fake_windows(base_dir, calibration, holdout=False):
        calls.append(calibration.samples)
        return [[calibration.samples, 1, 2]]

    monkeypatch.setattr(job, "calibration_windows", fake_windows)
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_text("{}")
    cache = tmp_path / "cache"
    small, large = CalibrationConfig(samples=8), CalibrationConfig(samples=16)

    assert job.memoised_calibration_windows(base, small, "w1", cache) == [[8, 1, 2]]
    assert job.memoised_calibration_windows(base, small, "w1", cache) == [[8, 1, 2]]
    assert calls == [8]  # the second call read the memo
    job.memoised_calibration_windows(base, large, "w1", cache)
    job.memoised_calibration_windows(base, small, "w2", cache)
    (base / "tokenizer.json").write_text('{"changed": true}')
    job.memoised_calibration_windows(base, small, "w1", cache)
    job.memoised_calibration_windows(base, small, "w1", cache, holdout=True)
    assert calls == [8, 16, 8, 8, 8]



def test_toolkit_env_points_at_the_serving_env_running_the_job(tmp_path, monkeypatch):
    """The toolkit venv outlives the checkout that made it (a worktree, a fresh clone):
    each job repoints its .pth, or the toolkit would import a deleted environment's torch."""
    import site

    from ruvllm.isq.toolkit_env import _point_at_serving_env

    site_dir = tmp_path / "lib" / "python3.11" / "site-packages"
    site_dir.mkdir(parents=True)
    pth = site_dir / "ruvllm-serving-env.pth"
    pth.write_text("/gone/.venv/lib/python3.11/site-packages\n")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    _point_at_serving_env(tmp_path)
    assert pth.read_text().split() == [p for p in site.getsitepackages() if Path(p).is_dir()]


def test_toolkit_env_lists_the_serving_pythonpath_before_its_site_packages(tmp_path):
    """A serving env unpacked onto PYTHONPATH (the GPU machines' /tmp/site) must reach the
    worker, which runs without PYTHONPATH (isolated); in the serving interpreter's own
    order, each existing directory once, missing ones and empty entries dropped."""
    from ruvllm.isq.toolkit_env import serving_paths

    site_tree, project, site_packages = (tmp_path / n for n in ("site", "proj", "sp"))
    for d in (site_tree, project, site_packages):
        d.mkdir()
    pythonpath = os.pathsep.join([str(project), "", str(site_tree), "/nonexistent",
                                  str(project)])
    assert serving_paths(pythonpath, [str(site_packages), str(site_tree)]) == [
        str(project), str(site_tree), str(site_packages)]
    assert serving_paths(None, [str(site_packages)]) == [str(site_packages)]


def test_toolkit_env_pth_holds_pythonpath_entries_after_the_venvs_own(tmp_path, monkeypatch):
    """The .pth is read after the venv's site-packages, so its pinned compressed-tensors
    wins over an older one on the serving PYTHONPATH; the venv's own directory is never
    listed again."""
    import site

    from ruvllm.isq.toolkit_env import _point_at_serving_env

    site_dir = tmp_path / "venv" / "lib" / "python3.12" / "site-packages"
    site_dir.mkdir(parents=True)
    extra = tmp_path / "site"
    extra.mkdir()
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(extra), str(site_dir)]))
    _point_at_serving_env(tmp_path / "venv")
    listed = (site_dir / "ruvllm-serving-env.pth").read_text().split()
    assert listed == [str(extra)] + [p for p in site.getsitepackages() if Path(p).is_dir()]


def test_toolkit_pip_runs_without_pythonpath_but_with_the_callers_pip_settings():
    """PIP_NO_INDEX / PIP_FIND_LINKS (an offline wheelhouse) reach pip untouched; the
    PYTHONPATH that would shadow the venv's packages while pip resolves does not."""
    from ruvllm.isq.toolkit_env import pip_environment

    env = pip_environment({"PYTHONPATH": "/tmp/site", "PIP_NO_INDEX": "1",
                           "PIP_FIND_LINKS": "/wheels", "PATH": "/bin"})
    assert env == {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels", "PATH": "/bin"}


def test_toolkit_venv_borrows_the_serving_pip_and_needs_no_ensurepip(tmp_path):
    """Pythons without ensurepip (Debian's, the GPU image's) cannot make a venv with pip;
    with pip in the serving env the venv is made without one and borrows it via the .pth."""
    import subprocess

    from ruvllm.isq.toolkit_env import venv_command

    assert "--without-pip" in venv_command(tmp_path / "v", borrow_pip=True)
    assert "--without-pip" not in venv_command(tmp_path / "v", borrow_pip=False)
    venv = tmp_path / "v"
    subprocess.run(venv_command(venv, borrow_pip=True), check=True)
    from ruvllm.isq.toolkit_env import _point_at_serving_env

    _point_at_serving_env(venv)
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import sys, pip; print(sys.prefix); print(pip.__file__)"],
                         capture_output=True, text=True, check=True,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    prefix, pip_file = out.stdout.split()
    assert Path(prefix) == venv and not pip_file.startswith(str(venv))


def test_toolkit_worker_dies_with_the_job_that_started_it(tmp_path):
    """ray.cancel(force=True) SIGKILLs the job's process; its toolkit worker must not run on."""
    from conftest import ROOT
    import signal
    import subprocess
    import sys
    import time

    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        "from ruvllm.isq.job import die_with_parent\n"
        "child = subprocess.Popen(['sleep', '60'], preexec_fn=die_with_parent)\n"
        f"open({str(pid_file)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(60)\n")], cwd=ROOT)
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, "parent never started its child"
        time.sleep(0.1)
    child = int(pid_file.read_text())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # a zombie: dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} outlived its SIGKILLed parent")


def test_mixed_precision_is_in_the_key_and_needs_calibration(tmp_path):
    plain = IsqConfig(method="rtn", group_size=64)
    mixed = IsqConfig(method="rtn", group_size=64, mixed_precision={"fraction": 0.3})
    assert "mixed_precision" not in plain.job_params()  # existing checkpoints keep their keys
    assert mixed.needs_calibration and not plain.needs_calibration
    assert mixed.job_params()["mixed_precision"] == {"bits": 8, "fraction": 0.3,
                                                     "sensitivity_windows": 16}
    calib = [[1, 2, 3]]
    assert cache_key("w" * 64, mixed, calib) != cache_key("w" * 64, IsqConfig(
        method="rtn", group_size=64, mixed_precision={"fraction": 0.2}), calib)
    assert result_dir(tmp_path, "m", mixed, "k" * 64).name == "m-rtn-w4a16-g64-mixed8-kkkkkkkkkkkkkkkk"
    assert mixed.describe() == "rtn W4A16 g64 (0.3 of weights at 8 bits)"


def test_kept_layers_are_the_most_sensitive_per_weight_within_the_budget():
    from ruvllm.isq.sensitivity import choose_kept

    sizes = {"big": 60, "small": 10, "mid": 30, "dull": 10}
    sens = {"big": 120.0, "small": 50.0, "mid": 45.0, "dull": 1.0}  # per weight: 2, 5, 1.5, .1
    assert choose_kept(sens, sizes, 0.1) == ["small"]
    # "big" does not fit beside "small" in 45% of 110 weights; the next that fits does.
    assert choose_kept(sens, sizes, 0.45) == ["mid", "small"]
    assert choose_kept(sens, sizes, 0.65) == ["big", "small"]
    assert choose_kept(sens, sizes, 0.01) == []
    # Ties break by name, so a measurement always gives the same choice.
    assert choose_kept({"b": 1.0, "a": 1.0}, {"b": 1, "a": 1}, 0.5) == ["a"]


def test_rtn_error_is_zero_on_the_grid_and_bounded_by_half_a_step():
    import torch

    from ruvllm.isq.sensitivity import rtn_error

    torch.manual_seed(0)
    w = torch.randn(8, 128)
    err = rtn_error(w, 4, 64)
    step = w.reshape(8, 2, 64).abs().amax(-1, keepdim=True) / 7
    assert (err.reshape(8, 2, 64).abs() <= step / 2 + 1e-6).all()
    on_grid = torch.round(w.reshape(8, 2, 64) / step).clamp(-8, 7) * step
    assert rtn_error(on_grid.reshape(8, 128), 4, 64).abs().max() < 1e-5
    assert rtn_error(w, 8, 64).abs().max() < err.abs().max() / 8
