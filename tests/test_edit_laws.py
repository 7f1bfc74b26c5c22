"""The laws edits obey, checked with hypothesis on random edits and random tensors.

- ``>>`` is associative, as values and as functions; ``identity()`` is neutral on both sides;
  ``chain(a, b)`` is ``b(a(x))``, the steps done by hand.
- ``ablate``, ``clamp``, ``project_out``, ``replace``, ``mean_ablate``, ``patch_from`` are
  idempotent.
- ``add(a) >> add(b) == add(a + b)``, ``scale(a) >> scale(b) == scale(a * b)``,
  ``steer(v, a) >> steer(v, b) == steer(v, a + b)`` numerically.
- ``at(i, a) >> at(i, b) == at(i, a >> b)``; ``at(i, identity())`` changes nothing.
- Patching a tensor from its own cache changes nothing, restricted or not.
- No edit mutates its input, and every edit keeps the shape.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
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
SHAPE = (B, S, D)
LAYER = "blocks.0"
SITE = Site(LAYER, call=0, kind="output", module=nn.Identity())
LAWS = settings(max_examples=50, deadline=None)


def _tensor(seed: int, shape: tuple[int, ...] = SHAPE) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


seeds = st.integers(0, 2**31 - 1)
tensors = seeds.map(_tensor)
vectors = seeds.map(lambda s: _tensor(s, (D,)))
scalars = st.floats(-3, 3, allow_nan=False, width=32)
features = st.integers(-D, D - 1)
positions = st.lists(st.integers(0, S - 1), min_size=1, max_size=S, unique=True)
feature_index = st.one_of(
    features,
    st.lists(features, min_size=1, max_size=4),
    st.builds(slice, st.integers(0, D - 1), st.integers(1, D)),
    st.lists(st.booleans(), min_size=D, max_size=D),
    # The other forms of the same meanings: numpy and 0-d tensor ints, 1-D tensors.
    features.map(np.int64),
    features.map(torch.tensor),
    st.lists(features, min_size=1, max_size=4).map(torch.tensor),
    st.lists(st.booleans(), min_size=D, max_size=D).map(torch.tensor),
)
dims_and_index = st.one_of(
    st.tuples(feature_index, st.just(-1)),
    st.tuples(st.integers(0, S - 1), st.just(1)),
    st.tuples(st.integers(0, B - 1), st.just(0)),
)
# Inside at(positions, ...) the edit sees [B, len(positions), D]: index features or the batch.
dims_and_index_of_a_part = st.one_of(
    st.tuples(feature_index, st.just(-1)),
    st.tuples(st.integers(0, B - 1), st.just(0)),
)
caches = tensors.map(lambda t: {LAYER: Capture(LAYER, (t,))})


def leaf_edits_indexing(
    index: st.SearchStrategy[tuple[Any, int]],
) -> st.SearchStrategy[Edit]:
    return st.one_of(
        st.builds(add, st.one_of(scalars, vectors)),
        st.builds(scale, st.one_of(scalars, vectors)),
        st.builds(replace, st.one_of(scalars, vectors)),
        st.builds(clamp, scalars.map(lambda v: -abs(v)), scalars.map(abs)),
        index.map(lambda p: ablate(p[0], dim=p[1])),
        index.map(lambda p: mean_ablate(p[0], dim=p[1])),
        st.builds(lambda c, i: mean_ablate(i, cache=c, over=(0, 1)), caches, feature_index),
        st.builds(lambda i, seed: resample_ablate(i, seed=seed), feature_index, seeds),
        st.builds(lambda c: resample_ablate(cache=c), caches),
        st.builds(patch_from, caches),
        st.builds(project_out, vectors),
        st.builds(steer, vectors, scalars),
    )


leaf_edits = leaf_edits_indexing(dims_and_index)
part_edits = leaf_edits_indexing(dims_and_index_of_a_part)


# Per-head edits get [..., heads, D / N_HEADS]: keep to those that act elementwise or on the
# batch there, so that vectors of length D are not handed to them.
head_safe = st.one_of(
    st.builds(add, scalars),
    st.builds(scale, scalars),
    st.builds(clamp, scalars.map(lambda v: -abs(v)), scalars.map(abs)),
    st.builds(ablate, st.integers(0, D // N_HEADS - 1)),
    st.builds(mean_ablate),
    st.builds(patch_from, caches),
)
edits: st.SearchStrategy[Edit] = st.one_of(
    leaf_edits,
    st.builds(lambda p, e: at(p, e), positions, part_edits),
    st.builds(
        lambda w, e: heads(e, n_heads=N_HEADS, which=w),
        st.lists(st.integers(0, N_HEADS - 1), min_size=1, max_size=N_HEADS, unique=True),
        head_safe,
    ),
)


def _same(a: Tensor, b: Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@LAWS
@given(a=edits, b=edits, c=edits)
def test_rshift_is_associative_as_values(a: Edit, b: Edit, c: Edit) -> None:
    assert (a >> b) >> c == a >> (b >> c)
    assert chain(a, b, c) == (a >> b) >> c
    assert repr((a >> b) >> c) == repr(a >> (b >> c))


@LAWS
@given(a=edits, b=edits, c=edits, x=tensors)
def test_rshift_is_associative_as_functions(a: Edit, b: Edit, c: Edit, x: Tensor) -> None:
    assert torch.equal(((a >> b) >> c)(x, SITE), (a >> (b >> c))(x, SITE))


@LAWS
@given(a=edits, b=edits, x=tensors)
def test_chain_is_the_steps_done_by_hand(a: Edit, b: Edit, x: Tensor) -> None:
    assert torch.equal(chain(a, b)(x, SITE), b(a(x, SITE), SITE))


@LAWS
@given(a=edits, x=tensors)
def test_identity_is_neutral_on_both_sides(a: Edit, x: Tensor) -> None:
    assert identity() >> a == a >> identity() == chain(a)
    assert torch.equal((identity() >> a)(x, SITE), a(x, SITE))
    assert torch.equal((a >> identity())(x, SITE), a(x, SITE))
    assert torch.equal(identity()(x, SITE), x)


@LAWS
@given(p=dims_and_index, x=tensors)
def test_ablate_is_idempotent(p: tuple[Any, int], x: Tensor) -> None:
    once = ablate(p[0], dim=p[1])
    assert torch.equal((once >> once)(x, SITE), once(x, SITE))


@LAWS
@given(p=dims_and_index, x=tensors)
def test_ablate_zeroes_exactly_the_selected_entries(p: tuple[Any, int], x: Tensor) -> None:
    idx, dim = p
    expected = x.clone()
    selector: list[Any] = [slice(None)] * x.dim()
    selector[dim] = idx
    expected[tuple(selector)] = 0.0
    assert torch.equal(ablate(idx, dim=dim)(x, SITE), expected)


@LAWS
@given(a=st.one_of(scalars, vectors), b=st.one_of(scalars, vectors), x=tensors)
def test_add_then_add_is_add_of_the_sum(a: Any, b: Any, x: Tensor) -> None:
    _same((add(a) >> add(b))(x, SITE), add(a + b)(x, SITE))


@LAWS
@given(a=st.one_of(scalars, vectors), b=st.one_of(scalars, vectors), x=tensors)
def test_scale_then_scale_is_scale_of_the_product(a: Any, b: Any, x: Tensor) -> None:
    _same((scale(a) >> scale(b))(x, SITE), scale(a * b)(x, SITE))


@LAWS
@given(v=vectors, a=scalars, b=scalars, x=tensors)
def test_steer_is_additive(v: Tensor, a: float, b: float, x: Tensor) -> None:
    _same((steer(v, a) >> steer(v, b))(x, SITE), steer(v, a + b)(x, SITE))


@LAWS
@given(
    edit=st.one_of(
        st.builds(clamp, scalars.map(lambda v: -abs(v)), scalars.map(abs)),
        st.builds(project_out, vectors),
        st.builds(replace, st.one_of(scalars, vectors)),
        # Idempotent when the entries replaced are not along a dimension averaged over.
        feature_index.map(mean_ablate),
        st.integers(0, S - 1).map(lambda i: mean_ablate(i, dim=1)),
        st.builds(patch_from, caches),
    ),
    x=tensors,
)
def test_idempotent_edits(edit: Edit, x: Tensor) -> None:
    _same((edit >> edit)(x, SITE), edit(x, SITE))


@LAWS
@given(v=vectors, x=tensors)
def test_project_out_leaves_no_component_along_the_direction(v: Tensor, x: Tensor) -> None:
    y = project_out(v)(x, SITE)
    torch.testing.assert_close(y @ v, torch.zeros(B, S), atol=1e-5, rtol=0)
    torch.testing.assert_close(x - y, torch.outer((x @ v).reshape(-1), v).reshape(SHAPE) / v.dot(v))


@LAWS
@given(p=positions, a=part_edits, b=part_edits, x=tensors)
def test_at_distributes_over_chains(p: list[int], a: Edit, b: Edit, x: Tensor) -> None:
    _same((at(p, a) >> at(p, b))(x, SITE), at(p, a >> b)(x, SITE))


@LAWS
@given(p=positions, a=part_edits, x=tensors)
def test_at_changes_only_the_selected_positions(p: list[int], a: Edit, x: Tensor) -> None:
    y = at(p, a)(x, SITE)
    others = [s for s in range(S) if s not in p]
    assert torch.equal(y[:, others], x[:, others])
    assert torch.equal(at(p, identity())(x, SITE), x)


@LAWS
@given(
    x=tensors,
    restrict=st.one_of(
        st.just(lambda e: e),
        positions.map(lambda p: lambda e: at(p, e)),
        st.lists(st.integers(0, N_HEADS - 1), min_size=1, unique=True).map(
            lambda w: lambda e: heads(e, n_heads=N_HEADS, which=w)
        ),
        st.integers(0, B - 1).map(lambda b: lambda e: at([b], e, dim=0)),
    ),
    make=st.sampled_from(
        [patch_from, lambda c: resample_ablate(cache=c), lambda c: resample_ablate(1, cache=c)]
    ),
)
def test_patching_from_its_own_cache_changes_nothing(x: Tensor, restrict: Any, make: Any) -> None:
    own = {LAYER: Capture(LAYER, (x.clone(),))}
    assert torch.equal(restrict(make(own))(x, SITE), x)


@LAWS
@given(edit=edits, x=tensors)
def test_no_edit_mutates_its_input_and_every_edit_keeps_the_shape(edit: Edit, x: Tensor) -> None:
    before = x.clone()
    y = edit(x, SITE)
    assert torch.equal(x, before)
    assert y.shape == x.shape


@LAWS
@given(edit=edits)
def test_pickled_edits_are_equal_and_hash_equal(edit: Edit) -> None:
    twin = pickle.loads(pickle.dumps(edit))
    assert twin == edit
    assert hash(twin) == hash(edit)
