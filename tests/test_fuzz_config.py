"""Property-based tests of the config tree (hypothesis): whatever `cluster.yaml`'s args
hold, `AppConfig.from_args` answers with a config or a ConfigError naming fields, never
another exception; and a config it accepts survives the trip through JSON and YAML that
rendering the k8s serveConfigV2 takes, unchanged.

Two sources of trees: arbitrary nested dict/list/str/int/float/bool/None whose keys are
mostly the config's own field names (so the fuzzing reaches nested models), and the
shipped configs with leaves replaced (so many of the trees are valid). The budgets keep
both to a few seconds of CI.
"""

from __future__ import annotations

import copy
import typing
from typing import Any

import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from conftest import ROOT
from ruvllm.config import AppConfig, ConfigError

FUZZ = settings(max_examples=200, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _field_names(model: type[BaseModel], seen: set[type] | None = None) -> set[str]:
    """Every field name in the config tree, nested models included."""
    seen = seen if seen is not None else set()
    if model in seen:
        return set()
    seen.add(model)
    names = set(model.model_fields)
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel):
                names |= _field_names(tp, seen)
            stack.extend(typing.get_args(tp))
    return names


FIELD_NAMES = sorted(_field_names(AppConfig))
KEYS = st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=12))
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["builtin:smollm2-135m-instruct", "vllm", "mistralrs", "auto",
                     "float32", "gptq", "/tmp", "", "0", "1e400", "-1"]))
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4),
                               st.dictionaries(KEYS, children, max_size=5)),
    max_leaves=30)


def _typed(tp: Any) -> st.SearchStrategy:
    """Values shaped like annotation `tp` (models as dicts of their own fields), mixed
    with arbitrary trees, so the fuzzing reaches every nested model's validators."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return st.deferred(lambda: _model_dicts(tp))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is list and args:
        return st.lists(_typed(args[0]), max_size=2)
    if origin is dict and len(args) == 2:
        return st.dictionaries(_typed(args[0]), _typed(args[1]), max_size=2)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if args:  # unions, Annotated: any of the parts
        return st.one_of([_typed(a) for a in args if a is not type(Ellipsis)])
    by_type = {int: st.integers(0, 100_000), float: st.floats(0, 1e6) | SCALARS,
               bool: st.booleans(), str: st.text(max_size=20), type(None): st.none()}
    return by_type.get(tp, SCALARS)


def _model_dicts(model: type[BaseModel]) -> st.SearchStrategy:
    return st.fixed_dictionaries({}, optional={
        # Well-typed values (the other tests bring the junk): ranges and validators decide.
        name: _typed(field.annotation) if name != "name"
        else st.sampled_from(["m1", "m2", "ruvllm", "smollm2-135m-instruct"])
        for name, field in model.model_fields.items()})


def _accepts_or_config_error(args: Any) -> AppConfig | None:
    try:
        return AppConfig.from_args(args)
    except ConfigError as e:
        assert str(e).startswith("invalid ruvllm config:") or ":" in str(e)
        return None


def _round_trips(config: AppConfig) -> None:
    dumped = config.model_dump(mode="json")
    again = AppConfig.from_args(yaml.safe_load(yaml.safe_dump(dumped)))
    assert again == config
    assert again.model_dump(mode="json") == dumped


@FUZZ
@given(st.one_of(TREES, st.dictionaries(st.sampled_from(FIELD_NAMES), TREES, max_size=6)))
def test_any_args_tree_gives_a_config_or_a_config_error(args):
    config = _accepts_or_config_error(args)
    event("valid" if config is not None else "refused")
    if config is not None:
        _round_trips(config)


@FUZZ
@given(_model_dicts(AppConfig))
def test_schema_shaped_args_give_a_config_or_a_config_error(args):
    config = _accepts_or_config_error(args)
    event("valid" if config is not None else "refused")
    if config is not None:
        _round_trips(config)


def _shipped_args() -> list[dict[str, Any]]:
    out = []
    for name in ("cluster.yaml", "cluster-gpu.yaml"):
        doc = yaml.safe_load((ROOT / name).read_text())
        out += [app["args"] for app in doc["applications"] if app.get("args")]
    return out


SHIPPED = _shipped_args()


def _leaf_paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list):
        items = enumerate(tree)
    else:
        return [prefix]
    paths = [prefix]  # a whole subtree may be replaced too
    for key, value in items:
        paths += _leaf_paths(value, (*prefix, key))
    return paths


def _replace(tree: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    tree = copy.copy(tree)
    tree[path[0]] = _replace(tree[path[0]], path[1:], value)
    return tree


@st.composite
def mutated_shipped_args(draw) -> Any:
    args = draw(st.sampled_from(SHIPPED))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_leaf_paths(args)))
        args = _replace(args, path, draw(TREES))
    return args


@FUZZ
@given(mutated_shipped_args())
def test_shipped_configs_with_any_leaf_changed_validate_or_name_the_field(args):
    config = _accepts_or_config_error(args)
    event("valid" if config is not None else "refused")
    if config is not None:
        _round_trips(config)


def test_the_shipped_configs_round_trip():
    assert SHIPPED
    for args in SHIPPED:
        _round_trips(AppConfig.from_args(args))


def test_infinite_and_nan_numbers_are_refused():
    """Found by the round trip above: NaN (`.nan` in YAML) passed an unbounded field and
    no longer equals itself after the trip; inf passed every `ge` bound."""
    for args in ({"xlora": [{"name": "m", "checkpoint": "/x", "global_scaling_weight": ".nan"}]},
                 {"admission": {"queue_timeout_s": float("inf")}},
                 {"placement": {"demand_window_s": float("-inf")}}):
        args = yaml.safe_load(yaml.safe_dump(args).replace("'.nan'", ".nan"))
        try:
            AppConfig.from_args(args)
        except ConfigError as e:
            assert "finite" in str(e)
        else:
            raise AssertionError(f"accepted {args}")
