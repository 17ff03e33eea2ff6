"""Property-based tests of adapter validation (hypothesis), with the real base checkpoint
and real peft adapters: whatever name, path, adapter_config.json or safetensors file a
client or an operator supplies, validation answers with an AdapterError (the HTTP status
the admin API returns) or with an adapter directory inside the allowed roots, never with
another exception (a 500 through the admin API, or a controller that fails to start).

Found by these tests and fixed: a NUL character or an over-long name in the path
(ValueError / OSError), a name with a trailing newline accepted, rank_pattern values that
are not ints or a rank_pattern that is not a mapping, a target_modules regex that does
not compile, target_modules entries that are not strings, a deeply nested config.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from ruvllm.adapters.base_model import BaseModelInfo
from ruvllm.adapters.registry import (NAME_PATTERN, AdapterError, AdapterRegistry, check_name,
                               resolve_inside_roots)

BASE_NAME = "smollm2-135m-instruct"
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def base(base_model_path) -> BaseModelInfo:
    return BaseModelInfo.from_checkpoint(
        base_model_path, {BASE_NAME, "HuggingFaceTB/SmolLM2-135M-Instruct"})


@pytest.fixture(scope="module")
def layout(tmp_path_factory, adapter_root) -> dict[str, Path]:
    """An allowed root with a real adapter, an escaping symlink, a symlink loop and a
    plain file; and, outside it, a real adapter the root must not reach."""
    top = tmp_path_factory.mktemp("fuzz")
    root, outside = top / "root", top / "outside"
    shutil.copytree(adapter_root / "alpha", root / "alpha")
    shutil.copytree(adapter_root / "alpha", outside / "alpha")
    os.symlink(outside, root / "sneaky")
    os.symlink(root / "loop", root / "loop")
    (root / "file").write_text("not a directory")
    return {"root": root.resolve(), "outside": outside.resolve()}


SEGMENTS = st.one_of(
    st.sampled_from(["..", ".", "", "alpha", "sneaky", "loop", "file", "~", "root",
                     "outside", "x" * 300, "\x00", "a\nb", " ", "%2e%2e", "\\.."]),
    st.text(max_size=12))


@st.composite
def paths(draw) -> str:
    segments = draw(st.lists(SEGMENTS, max_size=6))
    prefix = draw(st.sampled_from(["", "/", "./", "//", "~/"]))
    return prefix + "/".join(segments)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@FUZZ
@given(st.one_of(st.text(max_size=80), st.from_regex(NAME_PATTERN)))
def test_a_name_is_refused_with_400_or_409_or_is_a_plain_name(name):
    try:
        check_name(name, BASE_NAME)
    except AdapterError as e:
        assert e.status in (400, 409)
        return
    assert NAME_PATTERN.fullmatch(name) and len(name) <= 64
    assert not set(name) & set("/\\\x00\n\r") and ".." not in name and name != BASE_NAME


@FUZZ
@given(st.one_of(paths(), st.text(max_size=60)), st.booleans())
def test_a_path_never_resolves_outside_the_roots(layout, path, absolute):
    root = layout["root"]
    if absolute and not path.startswith("/"):
        path = f"{root}/{path}"
    try:
        resolved = resolve_inside_roots(path, [root])
    except AdapterError as e:
        assert e.status in (400, 403, 404)
        return
    assert _inside(resolved, root) and resolved.is_dir()
    assert not _inside(resolved, layout["outside"])


@FUZZ
@given(st.one_of(st.text(max_size=20), st.sampled_from(["alpha", "a.b", "A-1"])),
       st.one_of(paths(), st.sampled_from(["alpha", "sneaky/alpha", "file", "loop"])))
def test_registering_any_name_and_path_answers_an_adapter_error_or_a_spec_inside(
        layout, base, name, path):
    registry = AdapterRegistry(base, BASE_NAME, [layout["root"]], max_lora_rank=16)
    try:
        spec = registry.register(name, path)
    except AdapterError as e:
        event(f"refused {e.status}")
        assert e.status in (400, 403, 404, 409)
        return
    event("registered")
    assert _inside(Path(spec.path), layout["root"]) and spec.rank <= 16


JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                         st.floats(allow_nan=False), st.text(max_size=20))
JSON = st.recursive(JSON_SCALARS, lambda c: st.one_of(
    st.lists(c, max_size=4), st.dictionaries(st.text(max_size=8), c, max_size=4)),
    max_leaves=20)
CONFIG_VALUES = {
    "peft_type": st.one_of(st.sampled_from(["LORA", "lora", "IA3"]), JSON),
    "r": st.one_of(st.integers(-2, 40), st.sampled_from([True, 8.0, "8"]), JSON),
    "rank_pattern": st.one_of(st.dictionaries(st.sampled_from(["q_proj", "v_proj"]),
                                              st.one_of(st.integers(-1, 40), JSON)), JSON),
    "target_modules": st.one_of(
        st.lists(st.sampled_from(["q_proj", "v_proj", "k_proj", "nope"]), max_size=3),
        st.sampled_from([".*proj", "(", "q_proj|v_proj", "[", "a{99999999999}", ""]),
        JSON),
    "base_model_name_or_path": st.one_of(
        st.sampled_from(["HuggingFaceTB/SmolLM2-135M-Instruct", "other/model", ""]), JSON),
}


@st.composite
def adapter_configs(draw, real: dict):
    """The real adapter's config with some fields replaced or dropped (so many stay
    valid), or any JSON, or a file that is not JSON at all."""
    config = dict(real)
    for key in draw(st.lists(st.sampled_from(sorted(CONFIG_VALUES)), max_size=2, unique=True)):
        if draw(st.booleans()):
            config[key] = draw(CONFIG_VALUES[key])
        else:
            config.pop(key, None)
    return draw(st.one_of(*[st.just(config)] * 4, JSON,
                          st.sampled_from(["[" * 100_000, "\udcff{}"])))


REAL_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
               "target_modules": ["q_proj", "v_proj"],
               "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@FUZZ
@given(adapter_configs(REAL_CONFIG))
def test_any_adapter_config_is_refused_with_400_or_accepted_within_the_rank(
        tmp_path_factory, layout, base, config):
    directory = tmp_path_factory.mktemp("cfg", numbered=True)
    shutil.copy(layout["root"] / "alpha" / "adapter_model.safetensors", directory)
    text = config if isinstance(config, str) else json.dumps(config)
    # surrogateescape: "\udcff" is the byte 0xff, a file that is not UTF-8.
    (directory / "adapter_config.json").write_bytes(text.encode("utf-8", "surrogateescape"))
    registry = AdapterRegistry(base, BASE_NAME, [directory.parent], max_lora_rank=16)
    try:
        spec = registry.register("fuzzed", directory.name)
    except AdapterError as e:
        event("refused")
        assert e.status == 400
        return
    finally:
        shutil.rmtree(directory)
    event("accepted")
    assert 1 <= spec.rank <= 16 and spec.target_modules


@FUZZ
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.integers(0, 2**64 - 1), st.binary(max_size=200)).map(
                     lambda t: t[0].to_bytes(8, "little") + t[1]),
                 st.text(max_size=200).map(
                     lambda h: len(h.encode()).to_bytes(8, "little") + h.encode())))
def test_any_safetensors_file_is_refused_with_400(tmp_path_factory, layout, base, blob):
    directory = tmp_path_factory.mktemp("st", numbered=True)
    shutil.copy(layout["root"] / "alpha" / "adapter_config.json", directory)
    (directory / "adapter_model.safetensors").write_bytes(blob)
    registry = AdapterRegistry(base, BASE_NAME, [directory.parent], max_lora_rank=16)
    try:
        with pytest.raises(AdapterError) as e:
            registry.register("fuzzed", directory.name)
        assert e.value.status == 400
    finally:
        shutil.rmtree(directory)
