"""Property-based tests (hypothesis): int8 quantize/dequantize round trips and config parsing."""

from __future__ import annotations

import dataclasses
import enum
import math
import string
import typing

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ftq_core.configs import build_config, coerce_value, config_to_dict
from ftq_core.errors import ConfigError
from ftq_plugins.int8.numerics import INT8_MAX, quantize_per_channel_symmetric, quantize_per_token_symmetric

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def float_tensors(draw, *, min_dims: int, max_dims: int, max_side: int = 24):
    """Finite tensors of any float dtype, with values from subnormal to huge (and exact zeros)."""
    dtype = draw(st.sampled_from(FLOAT_DTYPES))
    shape = tuple(draw(st.lists(st.integers(1, max_side), min_size=min_dims, max_size=max_dims)))
    limit = 6e4 if dtype is torch.float16 else 1e30
    magnitude = float(np.float32(draw(st.sampled_from([1e-30, 1e-6, 1.0, 1e3, limit]))))
    elements = st.floats(-magnitude, magnitude, allow_nan=False, allow_infinity=False, width=32)
    values = draw(arrays(np.float32, shape, elements=elements | st.just(0.0)))
    return torch.from_numpy(values).to(dtype)


def _assert_within_half_a_step(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    assert q.dtype is torch.int8 and scale.dtype is torch.float32
    assert int(q.abs().max()) <= INT8_MAX
    assert torch.isfinite(scale).all() and (scale > 0).all()
    exact = x.double()
    error = (exact - q.double() * scale.double()).abs()
    # half a step, plus float32 rounding of x / scale and of x itself (float64 inputs)
    bound = scale.double() * (0.5 + 1e-5) + exact.abs() * 2**-23
    assert (error <= bound).all(), float((error - bound).max())


@FAST
@given(float_tensors(min_dims=2, max_dims=2))
def test_per_channel_round_trip_is_within_half_a_step(weight):
    q, scale = quantize_per_channel_symmetric(weight)
    assert q.shape == weight.shape and scale.shape == (weight.shape[0],)
    _assert_within_half_a_step(weight, q, scale[:, None])


@FAST
@given(float_tensors(min_dims=1, max_dims=3))
def test_per_token_round_trip_is_within_half_a_step(x):
    q, scale = quantize_per_token_symmetric(x)
    assert q.shape == x.shape and scale.shape == (*x.shape[:-1], 1)
    _assert_within_half_a_step(x, q, scale)


@FAST
@given(float_tensors(min_dims=2, max_dims=2, max_side=8))
def test_per_channel_scale_uses_the_full_int8_range(weight):
    """The largest value of each non-zero row maps to ±127: no range is wasted."""
    q, _ = quantize_per_channel_symmetric(weight)
    rows = weight.float().abs().amax(dim=1) > 1e-12
    assert (q.abs().amax(dim=1)[rows] == INT8_MAX).all()


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ([[1.0, 2.0]], TypeError, "weight must be a torch.Tensor, got list"),
        (torch.ones(2, 3, dtype=torch.int8), TypeError, "weight must be a floating-point tensor .* got torch.int8"),
        (torch.ones(4), ValueError, r"weight must be 2-D \[out_features, in_features\], got shape \(4,\)"),
        (torch.ones(2, 3, 4), ValueError, r"got shape \(2, 3, 4\)"),
        (torch.ones(3, 0), ValueError, r"weight has no features to quantize \(last dimension 0"),
        (torch.tensor([[1.0, float("inf")]]), ValueError, r"weight holds 1 non-finite value\(s\)"),
        (torch.tensor([[1.0, float("nan")], [float("nan"), 0.0]]), ValueError, r"weight holds 2 non-finite"),
        (torch.tensor([[1e300, 1.0]], dtype=torch.float64), ValueError, "beyond the float32 range"),
    ],
)
def test_per_channel_refuses_invalid_input_clearly(value, error, message):
    with pytest.raises(error, match=message):
        quantize_per_channel_symmetric(value)


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (3.0, TypeError, "x must be a torch.Tensor, got float"),
        (torch.ones(2, 3, dtype=torch.int32), TypeError, "x must be a floating-point tensor"),
        (torch.ones(2, 3, dtype=torch.complex64), TypeError, "x must be a floating-point tensor"),
        (torch.tensor(1.0), ValueError, r"x must be at least 1-D \[\.\.\., features\], got shape \(\)"),
        (torch.ones(2, 0), ValueError, "x has no features to quantize"),
    ],
)
def test_per_token_refuses_invalid_input_clearly(value, error, message):
    with pytest.raises(error, match=message):
        quantize_per_token_symmetric(value)


@FAST
@given(st.integers(0, 5), st.integers(1, 16), st.sampled_from(FLOAT_DTYPES))
def test_per_token_handles_empty_batches_and_zero_rows(tokens, features, dtype):
    x = torch.zeros(tokens, features, dtype=dtype)
    q, scale = quantize_per_token_symmetric(x)
    assert q.shape == (tokens, features) and not q.any() and torch.isfinite(scale).all()


# -- config parsing ---------------------------------------------------------------------


def _config_classes() -> list[type]:
    from ftq_core.evaluation import EvalSettings
    from ftq_core.plugins import Plugins

    plugins = Plugins(load_entrypoints=False)
    classes = [EvalSettings]
    for kind in ("dataset", "trainer", "quantizer"):
        classes.extend(component.config_class for component in plugins.table(kind))
    return classes


CONFIG_CLASSES = _config_classes()

json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


def _field_types(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


ALL_FIELD_TYPES = sorted({repr(tp): tp for cls in CONFIG_CLASSES for tp in _field_types(cls).values()}.items())


@FAST
@given(st.sampled_from([tp for _, tp in ALL_FIELD_TYPES]), json_like | st.text())
def test_coerce_value_raises_only_value_error(tp, value):
    try:
        coerce_value(value, tp)
    except ValueError as exc:
        assert str(exc)


@FAST
@given(st.sampled_from(CONFIG_CLASSES), st.data())
def test_build_config_raises_only_config_error_on_any_mapping(cls, data):
    names = [f.name for f in dataclasses.fields(cls)]
    keys = st.sampled_from(names) | st.text(max_size=10) | st.integers() | st.none()
    mapping = data.draw(st.dictionaries(keys, json_like, max_size=6))
    try:
        config = build_config(cls, mapping, where="test")
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)
    else:
        assert isinstance(config, cls)


SECTION_KEYS = st.sampled_from(["name", "max_steps", "lr", "path", "block_size", "keep_float", "activation"]) | st.text(max_size=6)
RUN_KEYS = st.sampled_from(["model", "output_dir", "dataset", "trainer", "quantizer", "eval", "resume",
                            "calibration_batches", "evaluate_pretrained", "modle"]) | st.text(max_size=8) | st.integers()


@FAST
@given(st.dictionaries(RUN_KEYS, json_like | st.dictionaries(SECTION_KEYS, json_like, max_size=4), max_size=5))
def test_run_config_raises_only_config_error_on_any_mapping(mapping):
    from ftq_core.plugins import get_plugins
    from ftq_core.run_config import resolve, run_config_from_mapping

    try:
        resolve(run_config_from_mapping(mapping), get_plugins())
    except ConfigError as exc:
        assert exc.problems


@FAST
@given(st.sampled_from([float("inf"), float("-inf"), float("nan"), "inf", "nan", "-Infinity", 10**400]))
def test_non_finite_numbers_are_refused(value):
    from ftq_core.configs import CommandLineText

    with pytest.raises(ValueError, match="must be a finite number"):
        coerce_value(CommandLineText(value) if isinstance(value, str) else value, float)


SAFE_TEXT = st.text(string.ascii_letters + string.digits + "._*/", min_size=1, max_size=12).filter(
    lambda s: s.lower() not in ("none", "null", "true", "false", "yes", "no", "on", "off", "0", "1")
)


def _valid_value(tp):
    """A strategy of plain values of type ``tp`` that mostly pass range checks."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return st.none() | _valid_value(inner)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return st.sampled_from(list(tp))
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.integers(1, 10_000)
    if tp is float:
        return st.floats(1e-6, 1.0, exclude_max=True)
    if tp is str:
        return SAFE_TEXT
    if origin is tuple:
        return st.lists(SAFE_TEXT, max_size=3).map(tuple)
    raise AssertionError(f"no strategy for {tp}")


def _as_cli_string(value) -> str:
    """``value`` as ``--set`` gives it to the config builder: command-line text."""
    from ftq_core.configs import CommandLineText

    if isinstance(value, enum.Enum):
        return CommandLineText(value.value)
    if isinstance(value, (list, tuple)):
        return CommandLineText(",".join(value))
    if value is None:
        return CommandLineText("none")
    return CommandLineText(repr(value) if isinstance(value, float) else str(value))


@FAST
@given(st.sampled_from(CONFIG_CLASSES), st.data())
def test_valid_configs_round_trip_through_dicts_and_command_line_strings(cls, data):
    types_ = _field_types(cls)
    values = {name: data.draw(_valid_value(tp), label=name) for name, tp in types_.items()}
    try:
        config = build_config(cls, values, where="test")
    except ConfigError:
        assume(False)
    assert build_config(cls, config_to_dict(config), where="test") == config  # TOML/JSON shape
    as_strings = {name: _as_cli_string(value) for name, value in config_to_dict(config).items()}
    assert build_config(cls, as_strings, where="test") == config  # --set section.key=value shape
    for value in dataclasses.asdict(config).values():
        assert not (isinstance(value, float) and not math.isfinite(value))
