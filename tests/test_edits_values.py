"""Edits as values (issue #19, items 11, 12, 13, 18): equality, hash, pickle, ``>>`` and
``identity`` over every combinator, NaN-holding ones included; snapshots of what an edit
holds; results that share no memory; reprs; the uniform derangement."""

from __future__ import annotations

import itertools
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hookfn import (
    Capture,
    Edit,
    Site,
    ablate,
    add,
    as_edit,
    at,
    chain,
    clamp,
    heads,
    identity,
    mean_ablate,
    patch_from,
    project_out,
    replace,
    resample_ablate,
    scale,
    steer,
)

B, S, D, N_HEADS = 3, 4, 8, 4
LAYER = "blocks.0"
SITE = Site(LAYER, call=0, kind="output", module=nn.Identity())
LAWS = settings(max_examples=60, deadline=None)
NAN = float("nan")


def _tensor(seed: int, *shape: int) -> Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def double(x: Tensor) -> Tensor:
    return x * 2


def shift(x: Tensor, site: Site) -> Tensor:
    return x + site.call


seeds = st.integers(0, 2**31 - 1)
vectors = seeds.map(lambda s: _tensor(s, D))
with_nan = st.one_of(
    st.just(torch.tensor([NAN] * D)),
    seeds.map(lambda s: torch.where(_tensor(s, D) > 0, NAN, _tensor(s, D))),
)
numbers = st.one_of(st.floats(-3, 3, allow_nan=False), st.just(NAN), st.integers(-3, 3))
operands = st.one_of(numbers, vectors, with_nan, seeds.map(lambda s: _tensor(s, S, D)))
caches = st.one_of(
    seeds.map(lambda s: {LAYER: Capture(LAYER, (_tensor(s, B, S, D),))}),
    st.just({LAYER: Capture(LAYER, (torch.full((B, S, D), NAN),))}),
)
feature_index = st.one_of(
    st.integers(-D, D - 1),
    st.lists(st.integers(0, D - 1), min_size=1, max_size=3),
    st.builds(slice, st.integers(0, D - 1), st.integers(1, D)),
    st.lists(st.booleans(), min_size=D, max_size=D),
    st.lists(st.booleans(), min_size=D, max_size=D).map(torch.tensor),
    st.lists(st.integers(0, D - 1), min_size=1, max_size=3).map(torch.tensor),
)
leaf_edits: st.SearchStrategy[Edit] = st.one_of(
    st.builds(add, operands),
    st.builds(scale, operands),
    st.builds(replace, operands),
    st.builds(clamp, st.floats(-3, 0), st.floats(0, 3)),
    st.builds(clamp, st.none(), vectors),
    st.builds(ablate, st.one_of(st.none(), feature_index)),
    st.builds(lambda i: mean_ablate(i), feature_index),
    st.builds(lambda c, i: mean_ablate(i, cache=c, over=(0, 1)), caches, feature_index),
    st.builds(lambda i, seed: resample_ablate(i, seed=seed), feature_index, st.integers(0, 99)),
    st.builds(lambda c: resample_ablate(cache=c, perm=[2, 0, 1]), caches),
    st.builds(patch_from, caches),
    st.builds(project_out, vectors),
    st.builds(steer, vectors, st.floats(-3, 3)),
    st.sampled_from([as_edit(double), as_edit(shift), identity()]),
)
positions = st.lists(st.integers(0, S - 1), min_size=1, max_size=S, unique=True)
all_edits: st.SearchStrategy[Edit] = st.one_of(
    leaf_edits,
    st.builds(lambda p, e: at(p, e, dim=0), st.just([2, 0, 1]), leaf_edits),
    st.builds(
        lambda p, e: at(p, e), positions, st.builds(add, st.one_of(numbers, vectors, with_nan))
    ),
    st.builds(lambda e: at(None, e), leaf_edits),
    st.builds(
        lambda w, e: heads(e, n_heads=N_HEADS, which=w),
        st.lists(st.integers(-N_HEADS, N_HEADS - 1), min_size=1, max_size=1),
        st.builds(scale, numbers),
    ),
    st.builds(lambda a, b: a >> b, leaf_edits, leaf_edits),
)


# -- item 11: equal values behave the same; equal to their pickled copies ---------------------


@LAWS
@given(edit=all_edits)
def test_an_edit_equals_itself_and_its_pickled_copy(edit: Edit) -> None:
    assert edit == edit
    twin = pickle.loads(pickle.dumps(edit))
    assert twin == edit
    assert hash(twin) == hash(edit)
    assert repr(twin) == repr(edit)
    x = _tensor(7, B, S, D)
    torch.testing.assert_close(twin(x, SITE), edit(x, SITE), equal_nan=True, rtol=0, atol=0)


# Pairs of edits built from different forms of the same arguments: equal values, which must
# then act the same (and hash the same).
EQUAL_FORMS: list[tuple[Edit, Edit]] = [
    (at([1, 0, 2, 3], add(1.0)), at(torch.tensor([1, 0, 2, 3]), add(1.0))),
    (at([True, False, True, False], add(1.0)), at([np.bool_(v) for v in (1, 0, 1, 0)], add(1.0))),
    (at(2, scale(0.0)), at(np.int64(2), scale(0.0))),
    (at(2, scale(0.0)), at(torch.tensor(2), scale(0.0))),
    (at([1], scale(2.0)), at([1], scale(2.0), dim=1)),
    (at(None, ablate(0)), at(None, ablate(0), dim=0)),
    (ablate((1, 4)), ablate(torch.tensor([1, 4], dtype=torch.int32))),
    (ablate(slice(0, 4, 1)), ablate(slice(np.int64(0), 4))),
    (add(1), add(1.0)),
    (add(NAN), add(float("nan"))),
    (add(torch.tensor([NAN] * D)), add(torch.full((D,), NAN))),
    (scale(np.float32(0.5)), scale(0.5)),
    (heads(scale(0.0), n_heads=N_HEADS, which=-1), heads(scale(0.0), n_heads=N_HEADS, which=3)),
    (
        heads(scale(0.0), n_heads=N_HEADS, which=np.int64(1)),
        heads(scale(0.0), n_heads=4, which=[1]),
    ),
    (mean_ablate(over=0), mean_ablate(over=[np.int64(0)])),
    (resample_ablate(seed=3), resample_ablate(seed=np.int64(3))),
    (resample_ablate(perm=[2, 0, 1]), resample_ablate(perm=torch.tensor([2, 0, 1]))),
    (chain(add(1.0)), add(1.0)),
    (identity() >> ablate(3) >> identity(), ablate(3)),
]


@pytest.mark.parametrize(("a", "b"), EQUAL_FORMS, ids=[repr(a) for a, _ in EQUAL_FORMS])
def test_equal_edits_act_the_same(a: Edit, b: Edit) -> None:
    assert a == b
    assert b == a
    assert hash(a) == hash(b)
    x = _tensor(8, B, S, D)
    torch.testing.assert_close(a(x, SITE), b(x, SITE), equal_nan=True, rtol=0, atol=0)


def test_edits_that_act_differently_are_not_equal() -> None:
    assert at([True, False, False, True], add(1.0)) != at([1, 0, 0, 1], add(1.0))
    assert resample_ablate(seed=1) != resample_ablate(seed=2)
    x = torch.arange(6.0).view(6, 1)
    # A seeded edit draws the same rows on every call.
    edit = resample_ablate(seed=5)
    assert torch.equal(edit(x, SITE), edit(x, SITE))


# -- item 12: identity is neutral, as values and as functions ---------------------------------


@LAWS
@given(a=all_edits, b=all_edits, c=all_edits)
def test_composition_laws_over_every_combinator(a: Edit, b: Edit, c: Edit) -> None:
    assert identity() >> a == a == a >> identity()
    assert chain(a) == a
    assert hash(chain(a)) == hash(a)
    assert len({a, chain(a), identity() >> a}) == 1
    assert (a >> b) >> c == a >> (b >> c) == chain(a, b, c)
    assert hash((a >> b) >> c) == hash(chain(a, b, c))
    x = _tensor(9, B, S, D)
    once = a(x, SITE)
    torch.testing.assert_close((identity() >> a)(x, SITE), once, equal_nan=True, rtol=0, atol=0)


@LAWS
@given(x=seeds.map(lambda s: _tensor(s, B, S, D)), p=positions, w=st.integers(0, N_HEADS - 1))
def test_identity_returns_x_itself_wherever_it_sits(x: Tensor, p: list[int], w: int) -> None:
    for edit in (
        identity(),
        chain(),
        identity() >> identity(),
        at(p, identity()),
        at(None, identity()),
        heads(identity(), n_heads=N_HEADS),
        heads(identity(), n_heads=N_HEADS, which=[w]),
        as_edit(lambda t: None),
        as_edit(lambda t: t),
        heads(at(p, as_edit(lambda t: t)), n_heads=N_HEADS),
    ):
        assert edit(x, SITE) is x, edit


def _storages(value: object) -> set[int]:
    """The data pointers of the storages of every tensor ``value`` holds."""
    if isinstance(value, Tensor):
        return {value.untyped_storage().data_ptr()}
    if isinstance(value, Capture):
        return set().union(*(_storages(t) for t in value.raw_outputs))
    if isinstance(value, dict):
        return set().union(set(), *(_storages(v) for v in value.values()))
    if isinstance(value, (list, tuple)):
        return set().union(set(), *(_storages(v) for v in value))
    if isinstance(value, Edit) and hasattr(value, "__dataclass_fields__"):
        return set().union(
            set(), *(_storages(getattr(value, f)) for f in value.__dataclass_fields__)
        )
    return set()


@LAWS
@given(edit=all_edits, seed=seeds)
def test_a_result_is_x_itself_or_shares_no_memory(edit: Edit, seed: int) -> None:
    x = _tensor(seed, B, S, D)
    y = edit(x, SITE)
    if y is x:
        return
    held = _storages(edit) | {x.untyped_storage().data_ptr()}
    assert y.untyped_storage().data_ptr() not in held, edit


# -- item 13: what an edit holds is a snapshot ------------------------------------------------


def test_reassigning_a_cache_entry_does_not_change_the_edit() -> None:
    for make in (
        patch_from,
        lambda c: mean_ablate(cache=c),
        lambda c: resample_ablate(cache=c),
    ):
        cache = {LAYER: Capture(LAYER, (torch.ones(B, S, D),))}
        edit = make(cache)
        before = (hash(edit), repr(edit))
        cache[LAYER] = Capture(LAYER, (torch.zeros(B, S, D),))
        cache["other"] = Capture("other", (torch.zeros(1),))
        assert (hash(edit), repr(edit)) == before
        assert torch.equal(edit(torch.zeros(B, S, D), SITE), torch.ones(B, S, D))


def test_list_arguments_are_snapshots() -> None:
    over, perm, which = [0, 1], [1, 0, 2], [1, 2]
    edits = (
        mean_ablate(over=over),
        resample_ablate(perm=perm),
        heads(ablate(), n_heads=4, which=which),
    )
    before = [(hash(e), repr(e)) for e in edits]
    over.append(2)
    perm.append(0)
    which.append(3)
    assert [(hash(e), repr(e)) for e in edits] == before


def test_a_tensor_argument_is_held_by_reference() -> None:
    # The documented choice: a tensor changed in place (a steering vector trained by an
    # optimizer) changes the edit that holds it; the hash (shape, dtype) does not change.
    v = torch.zeros(D)
    edit = add(v)
    before = hash(edit)
    v += 1
    assert hash(edit) == before
    assert torch.equal(edit(torch.zeros(2, D), SITE), torch.ones(2, D))


# -- item 18: reprs and the permutation -------------------------------------------------------


def test_reprs_tell_values_apart() -> None:
    assert repr(add(torch.tensor([0.5]))) == "add(tensor([0.5]))"
    assert repr(add(torch.tensor(0.5))) == "add(tensor(0.5))"
    assert repr(add(torch.tensor(2))) == "add(tensor(2, dtype=torch.int64))"
    assert repr(at(torch.tensor([2]), add(1.0))) == "at([2], add(1.0))"
    assert repr(at(torch.tensor(2), add(1.0))) == "at(2, add(1.0))"
    assert repr(heads(scale(0.0), n_heads=4, which=-1)) == "heads(scale(0.0), n_heads=4, which=[3])"
    assert repr(at(None, add(1.0))) == "at(None, add(1.0))"
    assert repr(identity() >> add(1.0)) == "add(1.0)"


def _derangements(n: int) -> list[tuple[int, ...]]:
    return [p for p in itertools.permutations(range(n)) if all(p[i] != i for i in range(n))]


def test_the_seeded_permutation_is_uniform_among_derangements() -> None:
    n, draws = 4, 4500
    x = torch.arange(float(n)).view(n, 1)
    counts = Counter(
        tuple(int(v) for v in resample_ablate(seed=seed)(x, SITE)[:, 0]) for seed in range(draws)
    )
    everything = _derangements(n)  # 9 of them, 3 of which are two swaps such as (1, 0, 3, 2)
    assert set(counts) == set(everything)
    assert (1, 0, 3, 2) in counts
    expected = draws / len(everything)  # 500; standard deviation about 21
    assert all(abs(c - expected) < 110 for c in counts.values()), counts


def test_every_row_gets_another_rows_values() -> None:
    for n in (2, 3, 5, 8):
        x = torch.arange(float(n)).view(n, 1)
        for seed in range(20):
            rows = [int(v) for v in resample_ablate(seed=seed)(x, SITE)[:, 0]]
            assert sorted(rows) == list(range(n))
            assert all(r != i for i, r in enumerate(rows))


@LAWS
@given(
    positions=st.lists(st.integers(0, S - 1), min_size=1, max_size=S, unique=True),
    extra=st.integers(0, S - 1),
    seed=seeds,
)
def test_changing_what_an_edit_was_given_changes_nothing(
    positions: list[int], extra: int, seed: int
) -> None:
    x = _tensor(seed, B, S, D)
    cache = {LAYER: Capture(LAYER, (_tensor(seed + 1, B, S, D),))}
    nested = [list(positions)]
    flat = list(positions)
    edits = [
        at(flat, add(1.0)),
        at((slice(None), nested[0]), scale(2.0)),
        ablate(list(flat), dim=1),
        patch_from(cache).at(flat),
        mean_ablate(cache=cache, over=[0]),
        resample_ablate(cache=cache, perm=[B - 1 - i for i in range(B)]),
    ]
    before = [(repr(e), hash(e), e(x, SITE)) for e in edits]
    flat.append(extra)
    nested[0].append(extra)
    cache[LAYER] = Capture(LAYER, (torch.zeros(B, S, D),))
    for edit, (text, key, result) in zip(edits, before, strict=True):
        assert (repr(edit), hash(edit)) == (text, key)
        assert torch.equal(edit(x, SITE), result), edit
