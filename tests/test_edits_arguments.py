"""Arguments refused with a hookfn error that names the argument and the fix (issue #19,
items 4, 8, 9, 14, 16, 17; issue #11, validation at the boundary), and the accepted forms
checked against the manual tensor operation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hookfn import (
    Capture,
    EditError,
    Hook,
    HookfnError,
    Site,
    SpecError,
    ablate,
    add,
    at,
    clamp,
    heads,
    mean_ablate,
    project_out,
    resample_ablate,
    run_with_hooks,
    scale,
    steer,
)

LAYER = "0"
SITE = Site(LAYER, call=0, kind="output", module=nn.Identity())
PROPERTY = settings(max_examples=50, deadline=None)
B, S, D = 2, 5, 8

seeds = st.integers(0, 2**31 - 1)


def _randn(seed: int, *shape: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _cache(t: Tensor) -> dict[str, Capture]:
    return {LAYER: Capture(LAYER, (t,))}


# -- item 16: the nineteen inputs, each a hookfn error naming the argument -------------------

# (id, make the edit, the fragment naming the argument, the error, the activation it runs on)
NINETEEN: list[tuple[str, Callable[[], Any], str, type[HookfnError], str]] = [
    (
        "mean cache tensor",
        lambda: mean_ablate(cache=torch.ones(2, 8)),
        "cache=",
        SpecError,
        "float",
    ),
    (
        "mean cache Capture",
        lambda: mean_ablate(cache=Capture(LAYER, (torch.ones(2, 8),))),
        "{'0': capture}",
        SpecError,
        "float",
    ),
    (
        "resample cache list",
        lambda: resample_ablate(cache=[torch.ones(2)]),
        "cache=",
        SpecError,
        "float",
    ),
    ("perm negative", lambda: resample_ablate(perm=[-1, 0, 1]), "perm=", SpecError, "float"),
    ("over (0, 0)", lambda: mean_ablate(over=(0, 0)), "over=(0, 0)", SpecError, "float"),
    ("over (0, -2)", lambda: mean_ablate(over=(0, -2)), "over=(0, -2)", EditError, "float"),
    ("ablate reversed", lambda: ablate(slice(None, None, -1)), "ablate(idx)", SpecError, "float"),
    ("at reversed", lambda: at(slice(None, None, -1), add(1.0)), "at(index", SpecError, "float"),
    ("which 1.5", lambda: heads(ablate(), n_heads=2, which=[1.5]), "which=", SpecError, "float"),
    ("at dim 1.0", lambda: at([0], add(1.0), dim=1.0), "dim=", SpecError, "float"),  # type: ignore[arg-type]
    ("ablate dim 1.0", lambda: ablate(0, dim=1.0), "dim=", SpecError, "float"),  # type: ignore[arg-type]
    ("add str", lambda: add("1"), "add(value)", SpecError, "float"),  # type: ignore[arg-type]
    ("add list", lambda: add([1.0] * 8), "torch.tensor", SpecError, "float"),  # type: ignore[arg-type]
    ("scale None", lambda: scale(None), "scale(factor)", SpecError, "float"),  # type: ignore[arg-type]
    ("steer None", lambda: steer(torch.ones(8), None), "alpha", SpecError, "float"),  # type: ignore[arg-type]
    ("steer ones(3)", lambda: steer(torch.ones(8), torch.ones(3)), "alpha", SpecError, "float"),
    ("mean_ablate ids", lambda: mean_ablate(), "mean_ablate", EditError, "ids"),
    ("project_out ids", lambda: project_out(torch.ones(8)), "project_out", EditError, "ids"),
]


class Tokens(nn.Module):
    """An embedding whose input (token ids) is edited with Hook(edit_input=...)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, D)

    def forward(self, ids: Tensor) -> Tensor:
        return self.embed(ids)


def _build_and_run(make: Callable[[], Any], on: str) -> None:
    edit = make()
    if on == "float":
        model: nn.Module = nn.Sequential(nn.Linear(D, D))
        run_with_hooks(model, _randn(0, B, D), {"0": edit})
    else:
        ids = torch.randint(0, 100, (B, S))
        run_with_hooks(Tokens(), ids, {"embed": Hook(edit_input=edit)})


@pytest.mark.parametrize(
    ("name", "make", "fragment", "error", "on"), NINETEEN, ids=[n[0] for n in NINETEEN]
)
def test_bad_inputs_raise_a_hookfn_error_out_of_run_with_hooks(
    name: str, make: Callable[[], Any], fragment: str, error: type[HookfnError], on: str
) -> None:
    with pytest.raises(error) as info:
        _build_and_run(make, on)
    assert fragment in str(info.value)


def test_numpy_integers_are_accepted_where_ints_are() -> None:
    x = _randn(0, B, S, D)
    edit = heads(scale(0.0), n_heads=4, which=np.int64(1))
    assert edit == heads(scale(0.0), n_heads=4, which=[1])
    expected = x.clone()
    expected[..., 2:4] = 0
    assert torch.equal(edit(x, SITE), expected)
    assert ablate(np.int32(3), dim=np.int64(-1)) == ablate(3)
    assert resample_ablate(perm=np.array([1, 0]).tolist()) == resample_ablate(perm=[1, 0])
    assert resample_ablate(perm=[np.int64(1), np.int64(0)]) == resample_ablate(perm=[1, 0])
    assert add(np.float32(0.5)) == add(0.5)


# -- item 17: accepted before, refused now ----------------------------------------------------

REFUSED: list[tuple[str, Callable[[], Any], str]] = [
    ("perm floats", lambda: resample_ablate(perm=[1.7, 0.2, 2.9]), "1.7"),
    ("perm float tensor", lambda: resample_ablate(perm=torch.tensor([1.0, 0.0])), "integer"),
    ("perm bools", lambda: resample_ablate(perm=[True, False]), "True"),
    ("perm empty", lambda: resample_ablate(perm=[]), "empty"),
    ("which True", lambda: heads(ablate(), n_heads=2, which=True), "True"),
    ("which [True]", lambda: heads(ablate(), n_heads=2, which=[True]), "True"),
    ("which duplicate", lambda: heads(ablate(), n_heads=2, which=[1, -1]), "twice"),
    ("which out of range", lambda: heads(ablate(), n_heads=4, which=[4]), "[0, 3]"),
    ("n_heads True", lambda: heads(ablate(), n_heads=True), "positive int"),
    ("seed str", lambda: resample_ablate(seed="abc"), "seed="),  # type: ignore[arg-type]
    ("seed float", lambda: resample_ablate(seed=1.5), "seed="),  # type: ignore[arg-type]
    ("seed None", lambda: resample_ablate(seed=None), "seed="),  # type: ignore[arg-type]
    ("seed negative", lambda: resample_ablate(seed=-1), "non-negative"),
    ("seed with perm", lambda: resample_ablate(perm=[1, 0], seed=1), "drop seed="),
    ("seed with cache", lambda: resample_ablate(cache=_cache(torch.ones(2)), seed=2), "drop seed="),
    ("at True", lambda: at(True, add(1.0)), "bool"),
    ("at False", lambda: at(False, add(1.0)), "bool"),
    ("over ()", lambda: mean_ablate(over=()), "no dimension"),
    ("over []", lambda: mean_ablate(over=[]), "no dimension"),
    ("over float", lambda: mean_ablate(over=0.0), "over="),  # type: ignore[arg-type]
    ("clamp nan", lambda: clamp(float("nan"), 1.0), "NaN"),
    ("clamp nan hi", lambda: clamp(hi=float("nan")), "NaN"),
    ("clamp nan tensor", lambda: clamp(lo=torch.tensor([0.0, float("nan")])), "NaN"),
    ("clamp lo > hi tensors", lambda: clamp(torch.ones(3), torch.zeros(3)), "above"),
    ("clamp lo > hi mixed", lambda: clamp(torch.tensor([0.0, 2.0]), 1.0), "above"),
    ("clamp shapes", lambda: clamp(torch.zeros(3), torch.ones(4)), "broadcast"),
    ("clamp complex", lambda: clamp(lo=1j), "real"),  # type: ignore[arg-type]
    ("steer nan alpha", lambda: steer(torch.ones(2), float("nan")), "NaN"),
    ("steer inf alpha", lambda: steer(torch.ones(2), float("inf")), "finite"),
    ("steer complex vector", lambda: steer(torch.ones(2, dtype=torch.complex64), 1.0), "real"),
    ("add bool tensor", lambda: add(torch.tensor([True])), "bool tensor"),
    ("add bool", lambda: add(True), "got bool"),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("name", "make", "fragment"), REFUSED, ids=[r[0] for r in REFUSED])
def test_invalid_arguments_are_refused_when_built(
    name: str, make: Callable[[], Any], fragment: str
) -> None:
    with pytest.raises(SpecError) as info:
        make()
    assert fragment in str(info.value)


# -- item 4: over names at least one dim, each once ---------------------------------------------


@PROPERTY
@given(seed=seeds, over=st.lists(st.integers(-3, 2), min_size=1, max_size=3))
def test_mean_ablate_averages_over_exactly_the_dims_named(seed: int, over: list[int]) -> None:
    x = _randn(seed, B, S, D)
    dims = [d % 3 for d in over]
    if len(set(over)) != len(over):
        with pytest.raises(SpecError):
            mean_ablate(over=over)
        return
    edit = mean_ablate(over=over)
    if len(set(dims)) != len(dims):  # (0, -3): one dim named twice, known once x's rank is
        with pytest.raises(EditError, match="twice"):
            edit(x, SITE)
        return
    expected = x.double()
    for d in sorted(set(dims)):  # the mean, one dim at a time
        expected = expected.sum(d, keepdim=True) / x.shape[d]
    torch.testing.assert_close(edit(x, SITE), expected.expand_as(x).float())


# -- item 9: a cache of another rank, or another size on a kept dim ---------------------------


@PROPERTY
@given(
    seed=seeds,
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple),
    over=st.sampled_from([0, 1, (0, 1)]),
)
def test_mean_ablate_from_a_cache_needs_the_same_rank_and_kept_dims(
    seed: int, shape: tuple[int, ...], over: Any
) -> None:
    x = _randn(seed, 3, 6)
    cached = _randn(seed + 1, *shape)
    dims = {over} if isinstance(over, int) else set(over)
    edit = mean_ablate(cache=_cache(cached), over=over)
    fits = (
        len(shape) == 2
        and all(shape[d] == x.shape[d] for d in range(2) if d not in dims)
        and all(d < len(shape) for d in dims)
    )
    if not fits:
        with pytest.raises(EditError):
            edit(x, SITE)
        return
    expected = torch.empty(3, 6)
    for i in range(3):
        for j in range(6):
            picked = [
                float(cached[a, b])
                for a in range(shape[0])
                for b in range(shape[1])
                if (0 in dims or a == i) and (1 in dims or b == j)
            ]
            expected[i, j] = sum(picked) / len(picked)
    torch.testing.assert_close(edit(x, SITE), expected)


# -- item 8: clamp's bounds ---------------------------------------------------------------------


@PROPERTY
@given(
    seed=seeds,
    lo=st.lists(st.floats(-2, 2, width=32), min_size=D, max_size=D),
    hi=st.lists(st.floats(-2, 2, width=32), min_size=D, max_size=D),
)
def test_clamp_with_tensor_bounds(seed: int, lo: list[float], hi: list[float]) -> None:
    x = _randn(seed, B, D)
    if any(a > b for a, b in zip(lo, hi, strict=True)):
        with pytest.raises(SpecError, match="above"):
            clamp(torch.tensor(lo), torch.tensor(hi))
        return
    y = clamp(torch.tensor(lo), torch.tensor(hi))(x, SITE)
    expected = [
        [min(max(float(v), a), b) for v, a, b in zip(row, lo, hi, strict=True)]
        for row in x.tolist()
    ]
    torch.testing.assert_close(y, torch.tensor(expected))


# -- item 14: steer's alpha -----------------------------------------------------------------------


@PROPERTY
@given(seed=seeds, shape=st.lists(st.integers(1, 3), min_size=0, max_size=4).map(tuple))
def test_steer_never_changes_the_shape(seed: int, shape: tuple[int, ...]) -> None:
    x = _randn(seed, B, S, D)
    v = _randn(seed + 1, D)
    alpha = _randn(seed + 2, *shape).abs() + 0.5
    if shape and shape[-1] != 1:
        with pytest.raises(SpecError, match="last dim of 1"):
            steer(v, alpha)
        return
    edit = steer(v, alpha)
    padded = (1,) * (3 - len(shape)) + shape
    if len(shape) > 3 or any(a not in (1, b) for a, b in zip(padded, (B, S, D), strict=False)):
        with pytest.raises(EditError, match="alpha"):
            edit(x, SITE)
        return
    y = edit(x, SITE)
    assert y.shape == x.shape
    unit = v / v.norm()
    expected = torch.empty_like(x)
    lengths = alpha.reshape(padded).expand(B, S, 1)
    for b in range(B):
        for s in range(S):
            expected[b, s] = x[b, s] + float(lengths[b, s, 0]) * unit
    torch.testing.assert_close(y, expected)


# -- items 16 and 17 as a property: any argument is built or refused with a SpecError, and a
# -- built edit runs or raises a hookfn error, never a raw torch or Python exception ----------

junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-10, 10),
    st.floats(allow_nan=True, allow_infinity=True),
    st.complex_numbers(max_magnitude=4),
    st.text(max_size=3),
    st.lists(st.one_of(st.integers(-10, 10), st.floats(-3, 3), st.booleans()), max_size=4),
    st.tuples(st.one_of(st.none(), st.integers(-3, 3), st.booleans(), st.just(...))),
    st.builds(
        slice,
        st.integers(-9, 9) | st.none(),
        st.integers(-9, 9) | st.none(),
        st.integers(-3, 3) | st.none(),
    ),
    st.sampled_from(
        [
            torch.tensor(1.5),
            torch.tensor([1, 0, 1], dtype=torch.uint8),
            torch.tensor([[1], [3]]),
            torch.ones(3),
            torch.ones(2, 3, dtype=torch.bool),
            torch.tensor([float("nan"), 1.0]),
            np.int64(2),
            np.float32(0.5),
            np.bool_(True),
            {"0": 1},
        ]
    ),
)
FACTORIES: list[Callable[[Any], Any]] = [
    add,
    scale,
    lambda a: steer(torch.ones(D), a),
    lambda a: clamp(a, 1.0),
    ablate,
    lambda a: ablate(0, dim=a),
    mean_ablate,
    lambda a: mean_ablate(over=a),
    lambda a: mean_ablate(cache=a),
    resample_ablate,
    lambda a: resample_ablate(perm=a),
    lambda a: resample_ablate(seed=a),
    lambda a: at(a, add(1.0)),
    lambda a: at([1], add(1.0), dim=a),
    lambda a: heads(ablate(), n_heads=4, which=a),
    lambda a: heads(ablate(), n_heads=a),
    project_out,
]


@settings(max_examples=300, deadline=None)
@given(
    make=st.sampled_from(FACTORIES),
    argument=junk,
    seed=seeds,
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.int64]),
)
def test_any_argument_gives_an_edit_or_a_hookfn_error(
    make: Callable[[Any], Any], argument: Any, seed: int, dtype: torch.dtype
) -> None:
    try:
        edit = make(argument)
    except SpecError:
        return
    x = (_randn(seed, B, S, D) * 10).to(dtype)
    try:
        y = edit(x, SITE)
    except HookfnError:
        return
    assert y.shape == x.shape
    assert y.dtype == x.dtype
