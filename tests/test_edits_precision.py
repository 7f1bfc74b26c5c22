"""Edits on half precision, extreme magnitudes and integer activations (issue #19, items 1, 2,
3, 6, 15), against references written out by hand: norms from `math.hypot` (which scales,
so it neither overflows nor underflows), sums of Python ints, the IEEE rules of plain torch
ops.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hookfn import (
    EditError,
    Hook,
    SpecError,
    add,
    at,
    clamp,
    heads,
    mean_ablate,
    project_out,
    replace,
    run_with_hooks,
    scale,
    steer,
)
from hookfn import Site as _Site

SITE = _Site("blocks.0", call=0, kind="output", module=nn.Identity())
PROPERTY = settings(max_examples=60, deadline=None)
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
D = 8

seeds = st.integers(0, 2**31 - 1)
float_dtypes = st.sampled_from(FLOATS)
half_dtypes = st.sampled_from([torch.float16, torch.bfloat16])


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _unit_reference(d: Tensor) -> list[float]:
    """d / |d| in Python floats; |d| from math.hypot, exact to rounding at any magnitude."""
    values = [float(v) for v in d.double().tolist()]
    norm = math.hypot(*values)
    return [v / norm for v in values]


def _tolerance(dtype: torch.dtype) -> float:
    return {torch.float16: 4e-3, torch.bfloat16: 3e-2}.get(dtype, 1e-5)


# -- item 1: a zero direction leaves x unchanged, in every float dtype ------------------------


@PROPERTY
@given(seed=seeds, dtype=float_dtypes, direction_dtype=float_dtypes, alpha=st.floats(-5, 5))
def test_a_zero_direction_leaves_x_unchanged(
    seed: int, dtype: torch.dtype, direction_dtype: torch.dtype, alpha: float
) -> None:
    x = _randn(seed, 2, 3, D, dtype=dtype)
    zero = torch.zeros(D, dtype=direction_dtype)
    for edit in (project_out(zero), steer(zero, alpha)):
        y = edit(x, SITE)
        assert y.dtype == dtype
        assert torch.equal(y, x), edit  # exactly x: no NaN, no change


# -- items 2 and 3: normalized in float32 at least, scaled first, then cast -------------------

magnitudes = st.sampled_from([1e-30, 1e-12, 1e-8, 1e-4, 1.0, 1e4, 1e5, 1e12, 1e19, 1e30])


@PROPERTY
@given(seed=seeds, dtype=float_dtypes, magnitude=magnitudes, alpha=st.floats(0.5, 4))
def test_steer_adds_length_alpha_whatever_the_directions_magnitude(
    seed: int, dtype: torch.dtype, magnitude: float, alpha: float
) -> None:
    d = _randn(seed, D) * magnitude  # float32, finite at every magnitude above
    x = torch.zeros(2, D, dtype=dtype)
    y = steer(d, alpha)(x, SITE)
    expected = torch.tensor([alpha * u for u in _unit_reference(d)]).expand(2, D)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(
        y.double(), expected.double(), rtol=_tolerance(dtype), atol=_tolerance(dtype) * alpha
    )


@PROPERTY
@given(seed=seeds, dtype=float_dtypes, magnitude=magnitudes)
def test_project_out_removes_the_component_whatever_the_directions_magnitude(
    seed: int, dtype: torch.dtype, magnitude: float
) -> None:
    d = _randn(seed, D) * magnitude
    x = _randn(seed + 1, 3, D, dtype=dtype)
    y = project_out(d)(x, SITE)
    u = torch.tensor(_unit_reference(d), dtype=torch.float64)
    x64 = x.double()
    expected = x64 - torch.outer(x64 @ u, u)
    assert y.dtype == dtype
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=4 * _tolerance(dtype))
    assert (y.double() @ u).abs().max() < 8 * _tolerance(dtype)


@pytest.mark.parametrize(
    ("entries", "dtype"),
    [
        ([5e-13, 0.0], torch.float64),  # under the old 1e-12 clamp: steer added 0.5
        ([1e-300, -1e-300], torch.float64),  # squares underflow to 0
        ([1e200, 1e200], torch.float64),  # squares overflow to inf
        ([2e19, 0.0], torch.float32),  # norm over sqrt(float32 max)
        ([3e38, 3e38], torch.float32),  # the norm itself over float32 max
        ([1e-44, 0.0], torch.float32),  # subnormal
        ([6e-8, 6e-8], torch.float16),  # a float16 direction: subnormal entries
        ([6e4, 6e4], torch.float16),  # a float16 direction whose norm overflows float16
    ],
)
def test_tiny_and_huge_directions_are_normalized(entries: list[float], dtype: torch.dtype) -> None:
    d = torch.tensor(entries, dtype=dtype)
    expected = _unit_reference(d)
    x = torch.zeros(1, 2, dtype=torch.float64)
    y = steer(d, 1.0)(x, SITE)
    torch.testing.assert_close(y[0], torch.tensor(expected, dtype=torch.float64), atol=1e-3, rtol=0)
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    y = project_out(d)(x, SITE)
    u = torch.tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(y, x - (x @ u) * u, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
@pytest.mark.parametrize("make", [project_out, lambda d: steer(d, 1.0)], ids=["project", "steer"])
def test_a_direction_that_cannot_be_normalized_is_refused(bad: float, make: Any) -> None:
    with pytest.raises(SpecError, match="inf or NaN"):
        make(torch.tensor([1.0, bad]))


def test_directions_still_work_under_vmap_and_grad() -> None:
    # The build-time check skips values that torch.func wraps; the normalization has no
    # data-dependent branch.
    ds = _randn(1, 3, D) * torch.tensor([1e-20, 1.0, 1e20])[:, None]
    x = _randn(2, 2, D)
    got = torch.func.vmap(lambda d: steer(d, 2.0)(x, SITE))(ds)
    for i in range(3):
        expected = torch.tensor(_unit_reference(ds[i]), dtype=torch.float32) * 2.0
        torch.testing.assert_close(got[i], x + expected)
    grad = torch.func.grad(lambda d: project_out(d)(x, SITE).sum())(ds[1])
    assert torch.isfinite(grad).all()


# -- item 6: integer activations, one rule for numbers and tensors ---------------------------

whole_or_not = st.one_of(
    st.integers(-50, 50).map(float), st.floats(-50, 50, allow_nan=False, width=32)
)


def _ids(seed: int) -> Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(seed))


@PROPERTY
@given(seed=seeds, value=whole_or_not, form=st.sampled_from(["number", "0-d", "1-d", "row"]))
def test_integer_activations_take_whole_values_in_either_form(
    seed: int, value: float, form: str
) -> None:
    ids = _ids(seed)
    operand: Any = {
        "number": value,
        "0-d": torch.tensor(value),
        "1-d": torch.tensor([value]),
        "row": torch.full((6,), value),
    }[form]
    whole = float(value).is_integer()
    for make, manual in [
        (add, lambda v: [[i + v for i in row] for row in ids.tolist()]),
        (scale, lambda v: [[i * v for i in row] for row in ids.tolist()]),
        (replace, lambda v: [[v for _ in row] for row in ids.tolist()]),
        (lambda v: clamp(lo=v), lambda v: [[max(i, v) for i in row] for row in ids.tolist()]),
    ]:
        edit = make(operand)
        if not whole:
            with pytest.raises(EditError, match="whole numbers"):
                edit(ids, SITE)
            continue
        y = edit(ids, SITE)
        assert y.dtype == torch.int64
        assert y.tolist() == manual(int(value)), edit


@PROPERTY
@given(seed=seeds, factor=whole_or_not)
def test_inside_at_an_integer_activation_follows_the_same_rule(seed: int, factor: float) -> None:
    ids = _ids(seed)
    for edit in (at([1], scale(factor)), at([1], scale(torch.tensor(factor)))):
        if not float(factor).is_integer():
            with pytest.raises(EditError):
                edit(ids, SITE)
            continue
        expected = ids.tolist()
        for row in expected:
            row[1] = row[1] * int(factor)
        assert edit(ids, SITE).tolist() == expected


def test_integer_values_out_of_the_activations_range_are_refused() -> None:
    ids = torch.tensor([[1, 2]], dtype=torch.int32)
    with pytest.raises(EditError, match="whole numbers"):
        add(2**40)(ids, SITE)
    with pytest.raises(EditError, match="whole numbers"):
        add(torch.tensor([2**40, 0]))(ids, SITE)
    assert add(torch.tensor([2, 3]))(ids, SITE).tolist() == [[3, 5]]


def test_bool_and_complex_operands_and_activations() -> None:
    mask = torch.tensor([[True, False]])
    for edit in (add(1), scale(2), clamp(lo=0)):
        with pytest.raises(EditError, match="bool activation"):
            edit(mask, SITE)
    assert replace(1)(mask, SITE).tolist() == [[True, True]]
    with pytest.raises(EditError, match="whole numbers"):
        replace(2)(mask, SITE)
    x = torch.ones(2, 2)
    with pytest.raises(EditError, match="complex"):
        add(1j)(x, SITE)
    with pytest.raises(EditError, match="complex"):
        add(torch.ones(2, dtype=torch.complex64))(x, SITE)
    z = torch.ones(2, dtype=torch.complex64)
    assert torch.equal(add(1j)(z, SITE), z + 1j)


@pytest.mark.parametrize(
    "edit",
    [mean_ablate(), project_out(torch.ones(6)), steer(torch.ones(6), 1.0)],
    ids=repr,
)
def test_float_only_edits_refuse_token_ids_through_run_with_hooks(edit: Any) -> None:
    model = nn.Sequential(nn.Embedding(100, 6))
    with pytest.raises(EditError, match="floating-point activation"):
        run_with_hooks(model, _ids(0), {"0": Hook(edit_input=edit)})


def test_token_ids_edited_through_run_with_hooks() -> None:
    embedding = nn.Embedding(100, 6)
    model = nn.Sequential(embedding)
    ids = _ids(1) % 90
    out, _ = run_with_hooks(model, ids, {"0": Hook(edit_input=add(torch.tensor(3.0)))})
    torch.testing.assert_close(out, embedding(ids + 3))


# -- item 15: scale(0) zeroes everything, inf and NaN included -----------------------------

specials = st.sampled_from([0.0, -0.0, 1.0, -2.5, 6e4, float("inf"), float("-inf"), float("nan")])


@PROPERTY
@given(
    values=st.lists(specials, min_size=1, max_size=8),
    dtype=float_dtypes,
    zero=st.sampled_from([0, 0.0, -0.0]),
)
def test_scale_zero_zeroes_every_entry(
    values: list[float], dtype: torch.dtype, zero: float
) -> None:
    x = torch.tensor(values, dtype=dtype)
    y = scale(zero)(x, SITE)
    assert y.dtype == dtype
    assert (y == 0).all()  # -0.0 == 0 too; never NaN
    grad = torch.func.grad(lambda t: scale(zero)(t, SITE).sum())(x.double())
    assert torch.equal(grad, torch.zeros_like(grad))


@PROPERTY
@given(
    values=st.lists(specials, min_size=D, max_size=D),
    factors=st.lists(st.sampled_from([0.0, 1.0, 2.0]), min_size=D, max_size=D),
)
def test_a_tensor_factor_multiplies_as_torch_does(
    values: list[float], factors: list[float]
) -> None:
    # The documented choice: x * factor, IEEE (inf * 0 is NaN), so d/dfactor stays x.
    x, f = torch.tensor(values), torch.tensor(factors)
    expected = torch.tensor([v * g for v, g in zip(values, factors, strict=True)])
    torch.testing.assert_close(scale(f)(x, SITE), expected, equal_nan=True)


# -- half precision: every elementwise edit against the same torch op in that dtype -----------


@PROPERTY
@given(seed=seeds, dtype=half_dtypes, number=st.floats(-4, 4, allow_nan=False, width=16))
def test_elementwise_edits_in_half_precision(seed: int, dtype: torch.dtype, number: float) -> None:
    x = _randn(seed, 2, 3, D, dtype=dtype)
    v = _randn(seed + 1, D)  # float32 operands, cast to the activation's dtype
    lo, hi = -abs(number), abs(number)
    cases = [
        (add(number), x + number),
        (add(v), x + v.to(dtype)),
        (scale(v), x * v.to(dtype)),
        (replace(v), v.to(dtype).expand_as(x)),
        (clamp(lo, hi), torch.clamp(x, lo, hi)),
        (clamp(hi=v), torch.minimum(x, v.to(dtype))),
        (
            heads(scale(2.0), n_heads=4, which=[1]),
            torch.cat([x[..., :2], x[..., 2:4] * 2, x[..., 4:]], -1),
        ),
    ]
    for edit, expected in cases:
        y = edit(x, SITE)
        assert y.dtype == dtype, edit
        assert torch.equal(y, expected), edit
