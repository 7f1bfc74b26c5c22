"""Index forms (issue #19, items 5, 10, 17, 18): each form has one meaning, checked against a
hand-written loop over the positions it names, in every float dtype; the others are refused
when the edit is built."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hookfn import EditError, Site, SpecError, ablate, add, at, mean_ablate, resample_ablate

SITE = Site("blocks.0", call=0, kind="output", module=nn.Identity())
PROPERTY = settings(max_examples=60, deadline=None)
B, S, D = 2, 5, 4
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

seeds = st.integers(0, 2**31 - 1)
dtypes = st.sampled_from(DTYPES)


def _x(seed: int, dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(B, S, D, generator=torch.Generator().manual_seed(seed)).to(dtype)


# Every one-dimension form of "positions 1 and 3 of a dim of size 5", with the positions it
# names. Built fresh per call: the forms hold tensors.
def _forms_of(positions: list[int], size: int) -> list[tuple[str, Any]]:
    mask = [i in positions for i in range(size)]
    forms: list[tuple[str, Any]] = [
        ("list", list(positions)),
        ("long tensor", torch.tensor(positions)),
        ("int32 tensor", torch.tensor(positions, dtype=torch.int32)),
        ("numpy ints", [np.int64(p) for p in positions]),
        ("bool list", mask),
        ("bool tensor", torch.tensor(mask)),
        ("numpy bools", [np.bool_(m) for m in mask]),
    ]
    first, last = positions[0], positions[-1]
    if positions == list(range(first, last + 1)):  # consecutive: a range and a slice too
        forms += [("range", range(first, last + 1)), ("slice", slice(first, last + 1))]
    return forms


position_sets = st.lists(st.integers(0, S - 1), min_size=1, max_size=S, unique=True).map(sorted)


@PROPERTY
@given(seed=seeds, dtype=dtypes, positions=position_sets)
def test_at_each_one_dimension_form_selects_its_positions(
    seed: int, dtype: torch.dtype, positions: list[int]
) -> None:
    x = _x(seed, dtype)
    expected = x.clone()
    for p in positions:  # the reference: a loop over the positions
        expected[:, p, :] = x[:, p, :] + 1
    for name, index in _forms_of(positions, S):
        y = at(index, add(1.0))(x, SITE)
        assert torch.equal(y, expected), name


@PROPERTY
@given(seed=seeds, dtype=dtypes, p=st.integers(-S, S - 1))
def test_an_int_in_any_form_keeps_its_dimension(seed: int, dtype: torch.dtype, p: int) -> None:
    x = _x(seed, dtype)
    seen: list[tuple[int, ...]] = []

    def record(part: Tensor) -> Tensor:
        seen.append(tuple(part.shape))
        return part * 2

    expected = x.clone()
    expected[:, p % S, :] = x[:, p % S, :] * 2
    for index in (p, np.int64(p), np.int32(p), torch.tensor(p), torch.tensor(p, dtype=torch.int16)):
        assert torch.equal(at(index, record)(x, SITE), expected), repr(index)
    assert seen == [(B, 1, D)] * 5  # an int keeps the dim, in every form


@PROPERTY
@given(seed=seeds, dtype=dtypes, dim=st.sampled_from([0, 1, 2, -1, -2, -3]))
def test_at_none_means_everything(seed: int, dtype: torch.dtype, dim: int) -> None:
    x = _x(seed, dtype)
    inner = ablate(0, dim=1)
    expected = x.clone()
    expected[:, 0, :] = 0  # what ablate(0, dim=1) does on the whole activation
    assert torch.equal(at(None, inner)(x, SITE), expected)
    assert torch.equal(at(None, inner, dim=dim)(x, SITE), expected)
    assert at(None, inner) == at(None, inner, dim=dim)


@PROPERTY
@given(seed=seeds, dtype=dtypes, data=st.data())
def test_a_token_mask_selects_tokens(seed: int, dtype: torch.dtype, data: st.DataObject) -> None:
    x = _x(seed, dtype)
    flags = data.draw(st.lists(st.booleans(), min_size=B * S, max_size=B * S))
    mask = torch.tensor(flags).view(B, S)
    seen: list[tuple[int, ...]] = []

    def record(part: Tensor) -> Tensor:
        seen.append(tuple(part.shape))
        return -part

    expected = x.clone()
    for b in range(B):
        for s in range(S):
            if mask[b, s]:
                expected[b, s] = -x[b, s]
    assert torch.equal(at(mask, record)(x, SITE), expected)
    assert seen == [(sum(flags), D)]


@PROPERTY
@given(seed=seeds, rows=st.lists(st.integers(0, S - 1), min_size=B, max_size=B))
def test_an_index_expression_picks_one_position_per_row(seed: int, rows: list[int]) -> None:
    # What a 2-D long tensor of per-row positions was meant to do, written as an expression.
    x = _x(seed)
    expected = x.clone()
    for b, s in enumerate(rows):
        expected[b, s] = x[b, s] + 1
    index = (torch.arange(B)[:, None], torch.tensor(rows)[:, None])
    assert torch.equal(at(index, add(1.0))(x, SITE), expected)


@PROPERTY
@given(
    seed=seeds,
    dtype=dtypes,
    positions=st.lists(st.integers(0, D - 1), min_size=1, max_size=D, unique=True).map(sorted),
)
def test_ablations_read_each_form_the_same_way(
    seed: int, dtype: torch.dtype, positions: list[int]
) -> None:
    x = _x(seed, dtype)
    zeroed = x.clone()
    meaned = x.clone()
    for p in positions:
        zeroed[..., p] = 0
        meaned[..., p] = x[..., p].float().mean(0).to(dtype)
    forms = [*_forms_of(positions, D), ("tuple", tuple(positions))]
    for name, idx in forms:
        assert torch.equal(ablate(idx)(x, SITE), zeroed), name
        torch.testing.assert_close(mean_ablate(idx)(x, SITE), meaned, msg=name)
        assert torch.equal(resample_ablate(idx, perm=[0, 0])(x, SITE)[0], x[0]), name


REFUSED_AT: list[tuple[str, Any, dict[str, Any], str]] = [
    ("True", True, {}, "bool"),
    ("False", False, {}, "bool"),
    ("numpy True", np.bool_(True), {}, "bool"),
    ("0-d bool tensor", torch.tensor(True), {}, "bool tensor"),
    ("uint8 tensor", torch.tensor([1, 0, 1], dtype=torch.uint8), {}, "uint8"),
    ("2-D long", torch.tensor([[1], [3]]), {}, "no one meaning"),
    ("float", 1.0, {}, "cannot index"),
    ("float list", [1.0, 2.0], {}, "holds 1.0"),
    ("mixed list", [1, True], {}, "holds"),
    ("nested list", [[1], [2]], {}, "holds"),
    ("float tensor", torch.tensor([1.0]), {}, "not an index"),
    ("negative step", slice(None, None, -1), {}, "positive step"),
    ("float slice", slice(0.0, 2.0), {}, "not an int"),
    ("mask with dim", torch.ones(B, S, dtype=torch.bool), {"dim": 0}, "dim= does not apply"),
    ("tuple with dim", (slice(None), 1), {"dim": 1}, "dim= does not apply"),
    ("None in tuple", (None, 1), {}, "new axis"),
    ("bool in tuple", (True, 1), {}, "new axis"),
    ("uint8 in tuple", (torch.tensor([1], dtype=torch.uint8),), {}, "uint8"),
    ("float dim", [1], {"dim": 1.0}, "takes an int"),
    ("string", "all", {}, "cannot index"),
]


@pytest.mark.parametrize(
    ("name", "index", "kwargs", "fragment"), REFUSED_AT, ids=[r[0] for r in REFUSED_AT]
)
def test_forms_without_one_meaning_are_refused_when_built(
    name: str, index: Any, kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(SpecError, match=fragment):
        at(index, add(1.0), **kwargs)


@pytest.mark.parametrize(
    "idx",
    [
        True,
        np.bool_(False),
        torch.tensor([[1, 2]]),
        torch.ones(2, 2, dtype=torch.bool),
        slice(4, 0, -1),
        0.5,
        (1, 2.0),
    ],
    ids=repr,
)
@pytest.mark.parametrize("make", [ablate, mean_ablate, resample_ablate])
def test_ablations_refuse_the_same_forms(idx: Any, make: Any) -> None:
    with pytest.raises(SpecError):
        make(idx)


def test_at_refuses_a_position_named_twice() -> None:
    x = _x(0)
    with pytest.raises(EditError, match="twice"):
        at([1, -4], add(1.0))(x, SITE)  # -4 is 1 in a dim of size 5
    with pytest.raises(EditError, match="twice"):
        at([2, 2], add(1.0))(x, SITE)


def test_equal_meanings_are_equal_values() -> None:
    edit = add(1.0)
    assert at(torch.tensor([2]), edit) == at([2], edit)
    assert repr(at(torch.tensor([2]), edit)) == "at([2], add(1.0))"
    assert at(np.int64(3), edit) == at(3, edit) == at(torch.tensor(3), edit)
    assert ablate((1, 4)) == ablate([1, 4]) == ablate(torch.tensor([1, 4]))
    assert at([1], edit) == at([1], edit, dim=1)
    assert ablate(slice(0, 4, 1)) == ablate(slice(0, 4))
    # A mask and positions are different values, though True == 1 in Python.
    assert at([True, False, False, True], edit) != at([1, 0, 0, 1], edit)


def test_index_arguments_are_snapshots() -> None:
    positions = [1, 2]
    inner = [1]
    mask = torch.tensor([True, False, True, False])
    a, b, c = ablate(positions), at((slice(None), inner), add(1.0)), ablate(mask)
    before = [(repr(e), hash(e)) for e in (a, b, c)]
    positions.append(3)
    inner.append(2)
    mask[1] = True
    assert [(repr(e), hash(e)) for e in (a, b, c)] == before
    assert a == ablate([1, 2])
    assert b == at((slice(None), [1]), add(1.0))
    assert c == ablate(torch.tensor([True, False, True, False]))
