"""Model preparation: builtin checkpoints appear atomically and are reused."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from ruvllm.atomic_dir import write_text_atomic
from ruvllm.model_store import MANIFEST, prepare_builtin, resolve_model

NAME = "smollm2-135m-instruct"


def fake_convert(calls: list[str], fail: bool = False, delay: float = 0.0):
    def convert(builtin, out_dir: Path, progress) -> None:
        calls.append(str(out_dir))
        (out_dir / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
        time.sleep(delay)
        if fail:
            raise RuntimeError("conversion crashed half-way")
        (out_dir / "model.safetensors").write_bytes(b"weights")
    return convert


def test_failed_preparation_leaves_nothing_a_replica_could_load(tmp_path):
    with pytest.raises(RuntimeError, match="half-way"):
        prepare_builtin(NAME, tmp_path, convert=fake_convert([], fail=True))
    models = tmp_path / "models"
    assert not (models / NAME).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []


def test_prepared_model_is_reused_without_rebuilding(tmp_path):
    calls: list[str] = []
    first = prepare_builtin(NAME, tmp_path, convert=fake_convert(calls))
    second = prepare_builtin(NAME, tmp_path, convert=fake_convert(calls))
    assert first == second and (first / MANIFEST).is_file()
    assert len(calls) == 1
    prepare_builtin(NAME, tmp_path, convert=fake_convert(calls), force=True)
    assert len(calls) == 2


def test_concurrent_preparations_build_once(tmp_path):
    calls: list[str] = []
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        prepare_builtin(NAME, tmp_path, convert=fake_convert(calls, delay=0.5), progress=lambda m: None)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(set(results)) == 1


def test_resolve_model_accepts_checkpoint_dirs_and_rejects_others(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path / "ckpt")) == tmp_path / "ckpt"
    with pytest.raises(KeyError):
        resolve_model("builtin:nope", tmp_path)


def test_real_builtin_checkpoint_is_a_llama_with_chat_template():
    # Prepared by `make test` before pytest runs (the README's test command).
    path = prepare_builtin(NAME)
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert (path / "chat_template.jinja").is_file() or "chat_template" in (
        path / "tokenizer_config.json").read_text()


def test_write_text_atomic_replaces_whole_and_leaves_no_temp_files(tmp_path, monkeypatch):
    target = tmp_path / "memo" / "x.json"
    write_text_atomic(target, "first")
    write_text_atomic(target, "second")
    assert target.read_text() == "second"

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("ruvllm.atomic_dir.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_text_atomic(target, "third")
    assert target.read_text() == "second"  # a failed write leaves the old file whole
    assert [p.name for p in target.parent.iterdir()] == ["x.json"]


def test_write_text_atomic_syncs_the_data_before_the_rename(tmp_path, monkeypatch):
    import os

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr("ruvllm.atomic_dir.os.fsync",
                        lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr("ruvllm.atomic_dir.os.replace",
                        lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    write_text_atomic(tmp_path / "x.json", "data")
    # The file's data, then the rename, then the directory entry the rename wrote.
    assert events == ["fsync", "replace", "fsync"]


def test_build_once_syncs_every_file_before_publishing(tmp_path, monkeypatch):
    import os

    from ruvllm.atomic_dir import build_once

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr("ruvllm.atomic_dir.os.fsync", fsync)

    def build(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "weights.bin").write_bytes(b"w" * 1000)
        (tmp / "sub" / "config.json").write_text("{}")
        (tmp / "DONE").write_text("")
        synced.clear()

    def rename(self, target):
        published.extend(synced)  # what was on disk when the rename happened
        return real_rename(self, target)

    published: list[str] = []
    real_rename = Path.rename
    monkeypatch.setattr(Path, "rename", rename)
    assert build_once(tmp_path / "model", "DONE", build)
    names = {Path(p).name for p in published}
    assert {"weights.bin", "config.json", "DONE", "sub"} <= names
    assert Path(synced[-1]) == tmp_path  # and the directory entry of the rename


def test_build_once_removes_what_a_killed_builder_left_and_spares_other_targets(tmp_path):
    from ruvllm.atomic_dir import build_once

    target = tmp_path / "model"
    left = tmp_path / ".model.k1ll3d_x"  # a SIGKILLed builder's mkdtemp
    (left / "weights").mkdir(parents=True)
    other = tmp_path / ".model.v2.abcd1234"  # another target's ("model.v2") build in flight
    other.mkdir()
    assert build_once(target, "done", lambda tmp: (tmp / "done").write_text("ok"))
    assert (target / "done").is_file()
    assert not left.exists()
    assert other.exists()
