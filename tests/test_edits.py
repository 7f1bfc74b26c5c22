"""Edit combinators against manual tensor operations, under torch.func, and end to end on GPT-2.

Every combinator is checked against the same operation written out by hand with plain tensor
ops (never against hookfn's own output), on random tensors, then under ``torch.func.grad``
(against autograd of the manual op) and ``torch.func.vmap`` (against a loop of the manual
op), and through ``run_with_hooks`` on a GPT-2 against a raw ``register_forward_hook``.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from reference import raw_hooks
from torch import Tensor, nn

from hookfn import (
    Capture,
    Edit,
    EditError,
    Hook,
    Site,
    SpecError,
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
    run_with_hooks,
    scale,
    steer,
)

LAYER = "blocks.0"
B, S, D, N_HEADS = 2, 5, 8, 4  # activations are [batch, seq, d]; d splits into 4 heads of 2


def _randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


X = _randn(B, S, D, seed=0)
OTHER = _randn(B, S, D, seed=1)  # another run's activation at LAYER
REFERENCE = _randn(6, S, D, seed=2)  # a bigger reference batch, for means
VEC = _randn(D, seed=3)
HEAD_VEC = _randn(D // N_HEADS, seed=4)
TOKEN_MASK = torch.tensor([[True, False, False, True, False], [False, True, False, False, True]])
CACHE = {LAYER: Capture(LAYER, (OTHER,))}
REFERENCE_CACHE = {LAYER: Capture(LAYER, (REFERENCE,))}
SNAPSHOT = {name: t.clone() for name, t in globals().items() if isinstance(t, Tensor)}


def _site(name: str = LAYER, call: int = 0, kind: Any = "output") -> Site:
    return Site(name, call=call, kind=kind, module=nn.Identity())


SITE = _site()


def double(x: Tensor) -> Tensor:
    """A module-level function: picklable, unlike a lambda."""
    return x * 2


def shift_by_name_length(x: Tensor, site: Site) -> Tensor:
    return x + len(site.name)


# -- manual references: plain tensor code, written independently of hookfn ------------------


def m_set_feature(x: Tensor, idx: Any, value: float) -> Tensor:
    y = x.clone()
    y[..., idx] = value
    return y


def m_mean_feature(x: Tensor, idx: int) -> Tensor:
    y = x.clone()
    y[..., idx] = x[..., idx].mean(dim=0)
    return y


def m_project_out(x: Tensor, d: Tensor) -> Tensor:
    projector = torch.eye(d.numel()) - torch.outer(d, d) / d.dot(d)
    return x @ projector


def m_at_positions(x: Tensor, positions: list[int], fn: Callable[[Tensor], Tensor]) -> Tensor:
    y = x.clone()
    for p in positions:
        y[:, p, :] = fn(x[:, p, :])
    return y


def m_at_tokens(x: Tensor, mask: Tensor, feature: int) -> Tensor:
    y = x.clone()
    for b in range(mask.shape[0]):
        for s in range(mask.shape[1]):
            if mask[b, s]:
                y[b, s, feature] = 0.0
    return y


def m_heads(x: Tensor, which: list[int], fn: Callable[[Tensor, int], Tensor]) -> Tensor:
    d_head = x.shape[-1] // N_HEADS
    y = x.clone()
    for h in which:
        cols = slice(h * d_head, (h + 1) * d_head)
        y[..., cols] = fn(x[..., cols], h)
    return y


def m_resample_feature(x: Tensor, rows: list[int], feature: int) -> Tensor:
    y = x.clone()
    for i, r in enumerate(rows):
        y[i, :, feature] = x[r, :, feature]
    return y


# (id, edit, manual reference). Every combinator appears with each form of argument it takes.
CASES: list[tuple[str, Edit, Callable[[Tensor], Tensor]]] = [
    ("add-scalar", add(1.5), lambda x: x + 1.5),
    ("add-tensor", add(VEC), lambda x: x + VEC),
    ("add-int", add(2), lambda x: x + 2.0),
    ("scale-scalar", scale(0.5), lambda x: x * 0.5),
    ("scale-tensor", scale(VEC), lambda x: x * VEC),
    ("replace-scalar", replace(0.25), lambda x: torch.full((B, S, D), 0.25)),
    ("replace-tensor", replace(VEC), lambda x: VEC.repeat(B, S, 1)),
    (
        "clamp-both",
        clamp(-0.5, 0.5),
        lambda x: torch.minimum(torch.maximum(x, torch.tensor(-0.5)), torch.tensor(0.5)),
    ),
    ("clamp-lo", clamp(lo=0.0), torch.relu),
    ("clamp-hi-tensor", clamp(hi=VEC), lambda x: torch.minimum(x, VEC)),
    ("ablate-int", ablate(3), lambda x: m_set_feature(x, 3, 0.0)),
    ("ablate-negative", ablate(-1), lambda x: m_set_feature(x, D - 1, 0.0)),
    ("ablate-list", ablate([1, 4]), lambda x: m_set_feature(x, [1, 4], 0.0)),
    ("ablate-tuple", ablate((1, 4)), lambda x: m_set_feature(x, [1, 4], 0.0)),
    ("ablate-slice", ablate(slice(2, 5)), lambda x: m_set_feature(x, slice(2, 5), 0.0)),
    (
        "ablate-bool-mask",
        ablate([True, False] * 4),
        lambda x: m_set_feature(x, [0, 2, 4, 6], 0.0),
    ),
    ("ablate-tensor", ablate(torch.tensor([0, 7])), lambda x: m_set_feature(x, [0, 7], 0.0)),
    ("ablate-all", ablate(), lambda x: torch.zeros(B, S, D)),
    ("ablate-dim0", ablate([1], dim=0), lambda x: torch.cat([x[:1], torch.zeros(1, S, D)])),
    (
        "ablate-dim1",
        ablate(2, dim=1),
        lambda x: torch.cat([x[:, :2], torch.zeros(B, 1, D), x[:, 3:]], dim=1),
    ),
    ("mean_ablate-all", mean_ablate(), lambda x: x.sum(0, keepdim=True).repeat(B, 1, 1) / B),
    ("mean_ablate-feature", mean_ablate(3), lambda x: m_mean_feature(x, 3)),
    (
        "mean_ablate-cache",
        mean_ablate(cache=REFERENCE_CACHE),
        lambda x: REFERENCE.mean(0).repeat(B, 1, 1),
    ),
    (
        "mean_ablate-cache-over-positions",
        mean_ablate(2, cache=REFERENCE_CACHE, over=(0, 1)),
        lambda x: m_set_feature(x, 2, float(REFERENCE[..., 2].mean())),
    ),
    ("resample-perm", resample_ablate(perm=[1, 0]), lambda x: torch.stack([x[1], x[0]])),
    (
        "resample-feature",
        resample_ablate(5, perm=[1, 0]),
        lambda x: m_resample_feature(x, [1, 0], 5),
    ),
    ("resample-cache", resample_ablate(cache=CACHE), lambda x: OTHER.clone()),
    (
        "resample-cache-perm",
        resample_ablate(cache=REFERENCE_CACHE, perm=[5, 2]),
        lambda x: torch.stack([REFERENCE[5], REFERENCE[2]]),
    ),
    ("patch_from", patch_from(CACHE), lambda x: OTHER.clone()),
    ("project_out", project_out(VEC), lambda x: m_project_out(x, VEC)),
    ("steer", steer(VEC, 2.0), lambda x: x + 2.0 * VEC / VEC.norm()),
    ("steer-negative", steer(VEC * 10, -1.0), lambda x: x - VEC / VEC.norm()),
    ("project_out-zero", project_out(torch.zeros(D)), lambda x: x.clone()),
    ("steer-zero", steer(torch.zeros(D), 3.0), lambda x: x.clone()),
    (
        "project_out-per-position",
        project_out(_randn(S, D, seed=5)),
        lambda x: torch.stack(
            [m_project_out(x[:, s], _randn(S, D, seed=5)[s]) for s in range(S)], dim=1
        ),
    ),
    ("at-positions", at([1, 3], add(1.0)), lambda x: m_at_positions(x, [1, 3], lambda p: p + 1)),
    ("at-int", at(2, scale(0.0)), lambda x: m_at_positions(x, [2], lambda p: p * 0)),
    (
        "at-slice",
        at(slice(3, None), add(1.0)),
        lambda x: m_at_positions(x, [3, 4], lambda p: p + 1),
    ),
    ("at-method", add(1.0).at([-1]), lambda x: m_at_positions(x, [4], lambda p: p + 1)),
    ("at-token-mask", at(TOKEN_MASK, ablate(0)), lambda x: m_at_tokens(x, TOKEN_MASK, 0)),
    (
        "at-index-expression",
        at((slice(None), slice(0, 2), 3), scale(2.0)),
        lambda x: torch.where((torch.arange(S)[:, None] < 2) & (torch.arange(D) == 3), x * 2, x),
    ),
    ("at-dim0", at([1], add(1.0), dim=0), lambda x: torch.cat([x[:1], x[1:] + 1])),
    (
        "at-patch",
        patch_from(CACHE).at([0, 4]),
        lambda x: torch.stack([OTHER[:, s] if s in (0, 4) else x[:, s] for s in range(S)], dim=1),
    ),
    (
        "at-mean-cache",
        at([1], mean_ablate(cache=REFERENCE_CACHE)),
        lambda x: torch.stack(
            [REFERENCE[:, 1].mean(0).expand(B, D) if s == 1 else x[:, s] for s in range(S)], dim=1
        ),
    ),
    (
        "heads-scale",
        heads(scale(0.0), n_heads=N_HEADS, which=[1]),
        lambda x: m_heads(x, [1], lambda c, h: c * 0),
    ),
    (
        "heads-int",
        heads(add(1.0), n_heads=N_HEADS, which=2),
        lambda x: m_heads(x, [2], lambda c, h: c + 1),
    ),
    (
        "heads-all-steer",
        heads(steer(HEAD_VEC, 1.0), n_heads=N_HEADS),
        lambda x: m_heads(x, [0, 1, 2, 3], lambda c, h: c + HEAD_VEC / HEAD_VEC.norm()),
    ),
    (
        "heads-unordered",
        heads(scale(2.0), n_heads=N_HEADS, which=[3, -4]),
        lambda x: m_heads(x, [0, 3], lambda c, h: c * 2),
    ),
    (
        "heads-patch",
        heads(patch_from(CACHE), n_heads=N_HEADS, which=[0, 3]),
        lambda x: m_heads(x, [0, 3], lambda c, h: OTHER[..., 2 * h : 2 * h + 2]),
    ),
    (
        "heads-at",
        heads(at([2], ablate()), n_heads=N_HEADS, which=[1]),
        lambda x: m_heads(x, [1], lambda c, h: m_at_positions(c, [2], lambda p: p * 0)),
    ),
    ("chain", add(1.0) >> scale(2.0), lambda x: (x + 1) * 2),
    (
        "chain-function",
        chain(ablate(0), project_out(VEC)),
        lambda x: m_project_out(m_set_feature(x, 0, 0.0), VEC),
    ),
    ("identity", identity(), lambda x: x.clone()),
    ("lambda-after", add(1.0) >> (lambda x: x * 2), lambda x: (x + 1) * 2),
    ("lambda-before", (lambda x: x * 2) >> add(1.0), lambda x: x * 2 + 1),
    (
        "site-function",
        as_edit(shift_by_name_length) >> scale(0.5),
        lambda x: (x + len(LAYER)) * 0.5,
    ),
    ("at-lambda", at([0], double), lambda x: m_at_positions(x, [0], lambda p: p * 2)),
]

IDS = [c[0] for c in CASES]
EDITS = [c[1] for c in CASES]


@pytest.fixture(autouse=True)
def _module_tensors_unchanged() -> Iterator[None]:
    yield
    for name, value in SNAPSHOT.items():
        assert torch.equal(globals()[name], value), f"{name} was changed in place"


@pytest.mark.parametrize(("name", "edit", "manual"), CASES, ids=IDS)
def test_edit_matches_manual_op(name: str, edit: Edit, manual: Callable[[Tensor], Tensor]) -> None:
    x = _randn(B, S, D, seed=10)
    expected = manual(x)
    got = edit(x, SITE)
    assert got.shape == x.shape
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("edit", EDITS, ids=IDS)
def test_edit_never_mutates_its_input(edit: Edit) -> None:
    x = _randn(B, S, D, seed=11)
    before = x.clone()
    edit(x, SITE)
    assert torch.equal(x, before)


@pytest.mark.parametrize("edit", EDITS, ids=IDS)
def test_edit_returns_a_new_tensor(edit: Edit) -> None:
    # The model may change an edit's result in place; that must never reach the input or a
    # cache. (identity returns x itself by design: it changes nothing.)
    x = _randn(B, S, D, seed=12)
    y = edit(x, SITE)
    if edit == identity():
        assert y is x
        return
    y.add_(1.0)
    assert torch.equal(x, _randn(B, S, D, seed=12))


@pytest.mark.parametrize(("name", "edit", "manual"), CASES, ids=IDS)
def test_edit_under_func_grad(name: str, edit: Edit, manual: Callable[[Tensor], Tensor]) -> None:
    weights = _randn(B, S, D, seed=13)
    x = _randn(B, S, D, seed=14)
    got = torch.func.grad(lambda t: (edit(t, SITE) * weights).sum())(x)
    leaf = x.clone().requires_grad_(True)
    out = manual(leaf)
    if out.requires_grad:
        (expected,) = torch.autograd.grad((out * weights).sum(), leaf)
    else:
        expected = torch.zeros_like(x)  # the result does not depend on x
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize(("name", "edit", "manual"), CASES, ids=IDS)
def test_edit_under_func_vmap(name: str, edit: Edit, manual: Callable[[Tensor], Tensor]) -> None:
    xs = _randn(3, B, S, D, seed=15)  # vmap over a leading dim: each call sees [B, S, D]
    got = torch.func.vmap(lambda t: edit(t, SITE))(xs)
    expected = torch.stack([manual(x) for x in xs])
    torch.testing.assert_close(got, expected)


def test_vmap_over_edit_arguments() -> None:
    # The value is batched and the activation is not: at() writes out of place then.
    x = _randn(B, S, D, seed=16)
    values = _randn(3, D, seed=17)
    got = torch.func.vmap(lambda v: at([2], replace(v))(x, SITE))(values)
    for i in range(3):
        expected = x.clone()
        expected[:, 2] = values[i]
        torch.testing.assert_close(got[i], expected)
    # Batched cached tensors (a mean per vmapped reference run), unbatched activation.
    references = _randn(3, 4, S, D, seed=21)
    got = torch.func.vmap(lambda r: mean_ablate(3, cache={LAYER: Capture(LAYER, (r,))})(x, SITE))(
        references
    )
    for i in range(3):
        expected = x.clone()
        expected[..., 3] = references[i][..., 3].mean(0)
        torch.testing.assert_close(got[i], expected)
    alphas = torch.tensor([0.0, 1.0, -2.0])
    got = torch.func.vmap(lambda a: steer(VEC, a)(x, SITE))(alphas)
    for i in range(3):
        torch.testing.assert_close(got[i], x + alphas[i] * VEC / VEC.norm())


def test_grad_with_respect_to_edit_arguments() -> None:
    # d/dv sum(w * (x + v)) = sum of w over all but the last dim.
    x, w = _randn(B, S, D, seed=18), _randn(B, S, D, seed=19)
    got = torch.func.grad(lambda v: (add(v)(x, SITE) * w).sum())(torch.zeros(D))
    torch.testing.assert_close(got, w.sum(dim=(0, 1)))
    got = torch.func.grad(lambda a: (steer(VEC, a)(x, SITE) * w).sum())(torch.tensor(1.0))
    torch.testing.assert_close(got, (w * VEC / VEC.norm()).sum())


# -- resample_ablate without perm: a random derangement ---------------------------------------


@pytest.mark.parametrize("batch", [2, 3, 7])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_resample_ablate_draws_other_inputs(batch: int, seed: int) -> None:
    x = torch.arange(batch, dtype=torch.float32)[:, None, None].expand(batch, S, D)
    y = resample_ablate(seed=seed)(x, SITE)
    rows = y[:, 0, 0].long().tolist()
    assert sorted(rows) == list(range(batch))  # a permutation of the batch ...
    assert all(r != i for i, r in enumerate(rows))  # ... in which every input gets another's
    assert torch.equal(y, x[rows])
    assert torch.equal(resample_ablate(seed=seed)(x, SITE), y)  # the same seed, the same rows


def test_resample_ablate_seeds_differ() -> None:
    x = torch.arange(7, dtype=torch.float32)[:, None].expand(7, D)
    draws = {tuple(resample_ablate(seed=s)(x, SITE)[:, 0].tolist()) for s in range(6)}
    assert len(draws) > 1


# -- repr, equality, hashing, pickling --------------------------------------------------------

REPRS = [
    (add(1.0) >> ablate(17), "add(1.0) >> ablate(17)"),
    (scale(2), "scale(2)"),
    (replace(0.0), "replace(0.0)"),
    (clamp(-1.0, 1.0), "clamp(-1.0, 1.0)"),
    (clamp(lo=0.0), "clamp(lo=0.0)"),
    (clamp(hi=3), "clamp(hi=3)"),
    (ablate([1, 2], dim=1), "ablate([1, 2], dim=1)"),
    (ablate(slice(0, 4)), "ablate(slice(0, 4))"),
    (ablate(), "ablate()"),
    (mean_ablate(), "mean_ablate()"),
    (mean_ablate(3, over=(0, 1)), "mean_ablate(3, over=(0, 1))"),
    (mean_ablate(cache=CACHE), "mean_ablate(cache=<cache: 'blocks.0'>)"),
    (resample_ablate(), "resample_ablate(seed=0)"),
    (resample_ablate(2, perm=torch.tensor([1, 0])), "resample_ablate(2, perm=[1, 0])"),
    (patch_from(CACHE), "patch_from(<cache: 'blocks.0'>)"),
    (
        patch_from({"a": CACHE[LAYER], "b": CACHE[LAYER], "c": CACHE[LAYER]}),
        "patch_from(<cache: 'a', 'b', +1>)",
    ),
    (project_out(torch.ones(8)), "project_out(tensor(shape=(8,), dtype=torch.float32))"),
    (steer(torch.ones(8), 4.0), "steer(tensor(shape=(8,), dtype=torch.float32), alpha=4.0)"),
    (add(torch.tensor(2.0)), "add(tensor(2))"),
    (at([3, 4], add(1.0)), "at([3, 4], add(1.0))"),
    (ablate(17).at(-1), "at(-1, ablate(17))"),
    (at(0, add(1.0), dim=0), "at(0, add(1.0), dim=0)"),
    (at((Ellipsis, slice(0, 2)), scale(0.0)), "at((..., slice(0, 2)), scale(0.0))"),
    (at([1], add(1.0) >> scale(2.0)), "at([1], add(1.0) >> scale(2.0))"),
    (heads(ablate(), n_heads=12, which=[3, 5]), "heads(ablate(), n_heads=12, which=[3, 5])"),
    (heads(scale(0.0), n_heads=12), "heads(scale(0.0), n_heads=12)"),
    (identity(), "identity()"),
    (add(1.0) >> double, "add(1.0) >> Function(double)"),
]


@pytest.mark.parametrize(("edit", "text"), REPRS, ids=[t for _, t in REPRS])
def test_repr_reads_like_the_expression(edit: Edit, text: str) -> None:
    assert repr(edit) == text


EQUAL = [
    (add(1.0), add(1.0)),
    (add(1.0), add(1)),
    (add(torch.ones(3)), add(torch.ones(3))),
    (scale(2.0) >> ablate(3), chain(scale(2.0), ablate(3))),
    (ablate([1, 2]), ablate([1, 2])),
    (patch_from(CACHE), patch_from({LAYER: Capture(LAYER, (OTHER.clone(),))})),
    (at([1], add(1.0)), add(1.0).at([1])),
    (heads(ablate(0), n_heads=4, which=1), heads(ablate(0), n_heads=4, which=[1])),
    (steer(torch.ones(4), 1.0), steer(torch.ones(4), 1.0)),
    (as_edit(double), as_edit(double)),
]
DIFFERENT = [
    (add(1.0), add(2.0)),
    (add(1.0), scale(1.0)),
    (add(torch.ones(3)), add(torch.ones(4))),
    (add(torch.ones(3)), add(torch.zeros(3))),
    (ablate(1), ablate(1, dim=0)),
    (ablate([1, 2]), ablate([2, 1])),
    (clamp(lo=0.0), clamp(hi=0.0)),
    (patch_from(CACHE), patch_from(REFERENCE_CACHE)),
    (at([1], add(1.0)), at([2], add(1.0))),
    (at([1], add(1.0)), at([1], add(1.0), dim=0)),
    (heads(ablate(0), n_heads=4), heads(ablate(0), n_heads=2)),
    (add(1.0) >> scale(2.0), scale(2.0) >> add(1.0)),
    (resample_ablate(seed=0), resample_ablate(seed=1)),
    (mean_ablate(), mean_ablate(over=1)),
]


@pytest.mark.parametrize(("a", "b"), EQUAL, ids=[repr(a) for a, _ in EQUAL])
def test_equal_arguments_give_equal_edits(a: Edit, b: Edit) -> None:
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1


@pytest.mark.parametrize(("a", "b"), DIFFERENT, ids=[f"{a!r} vs {b!r}" for a, b in DIFFERENT])
def test_different_arguments_give_different_edits(a: Edit, b: Edit) -> None:
    assert a != b


@pytest.mark.parametrize("edit", [e for e in EDITS if "lambda" not in repr(e)], ids=repr)
def test_pickle_round_trip(edit: Edit) -> None:
    restored = pickle.loads(pickle.dumps(edit))
    assert restored == edit
    assert repr(restored) == repr(edit)
    x = _randn(B, S, D, seed=20)
    torch.testing.assert_close(restored(x, SITE), edit(x, SITE), rtol=0, atol=0)


def test_lambdas_do_not_pickle_but_module_functions_do() -> None:
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(add(1.0) >> (lambda x: x * 2))
    restored = pickle.loads(pickle.dumps(add(1.0) >> double))
    assert restored == add(1.0) >> double


def test_a_list_argument_is_copied() -> None:
    positions = [1, 2]
    edit = ablate(positions)
    positions.append(3)
    assert edit == ablate([1, 2])
    x = torch.ones(1, D)
    assert edit(x, SITE)[0, 3] == 1.0


# -- validation: EditError naming the layer, the shapes and the fix ---------------------------

MULTI_CALL_CACHE = {LAYER: Capture(LAYER, (OTHER, OTHER))}
ERRORS = [
    (add(torch.ones(3)), (B, S, D), ["(3,)", "(2, 5, 8)", "broadcast"]),
    # broadcasts, but to a larger shape than the activation's
    (add(torch.ones(B, 1, D)), (1, S, D), ["(2, 1, 8)", "(1, 5, 8)", "broadcast"]),
    (add(torch.ones(1, D)), (D,), ["(1, 8)", "(8,)", "broadcast"]),
    (scale(torch.ones(S + 1, D)), (B, S, D), ["(6, 8)", "(2, 5, 8)"]),
    (replace(torch.ones(4)), (B, S, D), ["value", "(4,)", "(2, 5, 8)"]),
    (clamp(hi=torch.ones(3)), (B, S, D), ["upper bound", "(3,)"]),
    (ablate(8), (B, S, D), ["index 8", "(2, 5, 8)", "[-8, 7]"]),
    (ablate(0, dim=3), (B, S, D), ["dim=3", "(2, 5, 8)", "3 dimensions"]),
    (ablate([True, False]), (B, S, D), ["bool mask of length 8"]),
    (mean_ablate(over=4), (B, S, D), ["dim=4", "(2, 5, 8)"]),
    (
        mean_ablate(cache={LAYER: Capture(LAYER, (torch.ones(3, S + 2, D),))}),
        (B, S, D),
        ["(3, 7, 8)", "(2, 5, 8)", "over="],
    ),
    (resample_ablate(perm=[0, 1, 2]), (B, S, D), ["perm", "one per row of the batch (2)"]),
    (resample_ablate(perm=[0, 5]), (B, S, D), ["perm", "[0, 1]"]),
    (resample_ablate(), (1, S, D), ["at least 2", "cache="]),
    (resample_ablate(cache=REFERENCE_CACHE), (B, S, D), ["(6, 5, 8)", "(2, 5, 8)", "perm="]),
    (
        patch_from({"blocks.1": Capture("blocks.1", (OTHER,))}),
        (B, S, D),
        ["no layer 'blocks.0'", "'blocks.1'", "run_with_hooks"],
    ),
    (patch_from(CACHE), (B, S + 1, D), ["(2, 5, 8)", "(2, 6, 8)", "same shape"]),
    (patch_from({LAYER: Capture(LAYER, ())}), (B, S, D), ["recorded 0 output(s)", "capture it"]),
    (project_out(torch.ones(5)), (B, S, D), ["direction", "(5,)", "(2, 5, 8)", "last dimension"]),
    (steer(torch.ones(3), 1.0), (B, S, D), ["vector", "(3,)", "(2, 5, 8)"]),
    (at([7], add(1.0)), (B, S, D), ["[7]", "(2, 5, 8)"]),
    (at(9, add(1.0)), (B, S, D), ["index 9", "(2, 5, 8)", "[-5, 4]"]),
    (ablate(torch.tensor([8])), (B, S, D), ["does not fit dimension -1", "(2, 5, 8)"]),
    (at([1], lambda x: x[..., :1]), (B, S, D), ["inner edit", "(2, 1, 8)", "(2, 1, 1)"]),
    (heads(ablate(), n_heads=3), (B, S, D), ["(2, 5, 8)", "3 heads"]),
    (heads(lambda x: x.sum(-1), n_heads=4), (B, S, D), ["inner edit", "(2, 5, 4, 2)"]),
]


@pytest.mark.parametrize(
    ("edit", "shape", "fragments"), ERRORS, ids=[repr(e) for e, _, _ in ERRORS]
)
def test_bad_shapes_raise_edit_error(
    edit: Edit, shape: tuple[int, ...], fragments: list[str]
) -> None:
    with pytest.raises(EditError) as info:
        edit(torch.zeros(shape), SITE)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_patch_from_names_the_call_of_a_module_called_again() -> None:
    with pytest.raises(EditError, match=r"recorded 2 output\(s\).*this is call 2"):
        patch_from(MULTI_CALL_CACHE)(torch.zeros(B, S, D), _site(call=2))


def test_patch_from_reads_the_kind_it_edits() -> None:
    from hookfn import Args

    capture = Capture(LAYER, raw_outputs=(OTHER,), raw_inputs=(Args(REFERENCE[:B]),))
    cache = {LAYER: capture}
    x = torch.zeros(B, S, D)
    assert torch.equal(patch_from(cache)(x, _site(kind="input")), REFERENCE[:B])
    assert torch.equal(patch_from(cache)(x, _site(kind="output")), OTHER)
    with pytest.raises(EditError, match="grad"):
        patch_from(cache)(x, _site(kind="grad_output"))


BAD_ARGUMENTS: list[Callable[[], object]] = [
    lambda: clamp(),
    lambda: clamp(2.0, 1.0),
    lambda: patch_from(OTHER),  # type: ignore[arg-type]
    lambda: project_out(1.0),  # type: ignore[arg-type]
    lambda: steer(torch.tensor(1.0), 1.0),
    lambda: heads(ablate(), n_heads=0),
    lambda: heads(ablate(), n_heads=4, which=[]),
    lambda: at([1], 3),  # type: ignore[arg-type]
    lambda: heads(ablate(), n_heads=4, which=[4]),  # checked when built (was when applied)
]


@pytest.mark.parametrize("make", BAD_ARGUMENTS)
def test_bad_arguments_raise_spec_error(make: Callable[[], object]) -> None:
    with pytest.raises(SpecError):
        make()


# -- end to end on GPT-2, against a raw register_forward_hook doing the manual op -------------

GPT_D = 32
GPT_VEC = _randn(GPT_D, seed=30)


def _gpt_feature(x: Tensor, idx: int, value: float) -> Tensor:
    y = x.clone()
    y[..., idx] = value
    return y


GPT_CASES: list[tuple[str, Any, Callable[[Tensor], Tensor]]] = [
    ("add", add(0.5), lambda x: x + 0.5),
    ("add-tensor", add(GPT_VEC), lambda x: x + GPT_VEC),
    ("scale", scale(0.5), lambda x: x * 0.5),
    ("replace", replace(GPT_VEC), lambda x: GPT_VEC.expand_as(x).clone()),
    ("clamp", clamp(-0.02, 0.02), lambda x: x.clamp(-0.02, 0.02)),
    ("ablate", ablate(17), lambda x: _gpt_feature(x, 17, 0.0)),
    ("mean_ablate", mean_ablate(), lambda x: x.mean(0, keepdim=True).expand_as(x).clone()),
    ("resample_ablate", resample_ablate(perm=[1, 0]), lambda x: x.flip(0)),
    ("project_out", project_out(GPT_VEC), lambda x: m_project_out(x, GPT_VEC)),
    ("steer", steer(GPT_VEC, 3.0), lambda x: x + 3.0 * GPT_VEC / GPT_VEC.norm()),
    ("at", add(1.0).at([0, 5]), lambda x: m_at_positions(x, [0, 5], lambda p: p + 1)),
    ("chain", add(1.0) >> ablate(17), lambda x: _gpt_feature(x + 1, 17, 0.0)),
    ("lambda", add(1) >> (lambda x: x * 2), lambda x: (x + 1) * 2),
]


@pytest.mark.parametrize(
    ("layer", "kind"), [("transformer.h.0", "output"), ("transformer.h.1.mlp", "output")]
)
@pytest.mark.parametrize(("name", "edit", "manual"), GPT_CASES, ids=[c[0] for c in GPT_CASES])
def test_gpt2_edit_matches_raw_hook(
    tiny_gpt2: nn.Module,
    gpt2_inputs: dict[str, Tensor],
    layer: str,
    kind: str,
    name: str,
    edit: Any,
    manual: Callable[[Tensor], Tensor],
) -> None:
    with torch.no_grad(), raw_hooks(tiny_gpt2, {layer: manual}):
        expected = tiny_gpt2(**gpt2_inputs).logits
    with torch.no_grad():
        out, _ = run_with_hooks(tiny_gpt2, gpt2_inputs, {layer: edit})
    torch.testing.assert_close(out.logits, expected)
    with torch.no_grad():
        plain = tiny_gpt2(**gpt2_inputs).logits
    assert not torch.allclose(plain, expected)  # the edit does something here


def test_gpt2_heads_on_the_attention_projection_input(
    tiny_gpt2: nn.Module, gpt2_inputs: dict[str, Tensor]
) -> None:
    # The input of attn.c_proj is the concatenation of the 4 heads (8 features each).
    layer = "transformer.h.0.attn.c_proj"
    edit = heads(scale(0.0), n_heads=4, which=[1]) >> heads(
        steer(GPT_VEC[:8], 2.0), n_heads=4, which=3
    )

    def manual(x: Tensor) -> Tensor:
        y = x.clone()
        y[..., 8:16] = 0.0
        y[..., 24:32] = x[..., 24:32] + 2.0 * GPT_VEC[:8] / GPT_VEC[:8].norm()
        return y

    with torch.no_grad(), raw_hooks(tiny_gpt2, pre_edits={layer: manual}):
        expected = tiny_gpt2(**gpt2_inputs).logits
    with torch.no_grad():
        out, _ = run_with_hooks(tiny_gpt2, gpt2_inputs, {layer: Hook(edit_input=edit)})
    torch.testing.assert_close(out.logits, expected)


def test_gpt2_ablate_under_func_grad(tiny_gpt2: nn.Module, gpt2_inputs: dict[str, Tensor]) -> None:
    # The gradient of the logits' sum with respect to a steering vector added at block 0,
    # through run_with_hooks under torch.func.grad, against autograd with a raw hook.
    def metric(v: Tensor) -> Tensor:
        out, _ = run_with_hooks(tiny_gpt2, gpt2_inputs, {"transformer.h.0": add(v) >> ablate(3)})
        return out.logits.pow(2).mean()

    got = torch.func.grad(metric)(torch.zeros(GPT_D))
    v = torch.zeros(GPT_D, requires_grad=True)
    with raw_hooks(tiny_gpt2, {"transformer.h.0": lambda x: _gpt_feature(x + v, 3, 0.0)}):
        loss = tiny_gpt2(**gpt2_inputs).logits.pow(2).mean()
    (expected,) = torch.autograd.grad(loss, v)
    torch.testing.assert_close(got, expected)
    assert got[3] == 0.0
    assert got.abs().sum() > 0


# -- patching on GPT-2 ----------------------------------------------------------------------

BLOCKS = ["transformer.h.0", "transformer.h.1"]


@pytest.fixture
def clean_and_corrupt(
    gpt2_inputs: dict[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    corrupt_ids = gpt2_inputs["input_ids"].clone()
    corrupt_ids[:, 2] = (corrupt_ids[:, 2] + 1) % 100  # one token changed, at position 2
    return gpt2_inputs, {**gpt2_inputs, "input_ids": corrupt_ids}


@pytest.mark.parametrize(
    "edit",
    [
        patch_from,
        lambda c: patch_from(c).at([0, 3]),
        lambda c: heads(patch_from(c), n_heads=4, which=[2]),
        lambda c: resample_ablate(5, cache=c),
        lambda c: at(torch.tensor([[True, False] * 3, [False, True] * 3]), patch_from(c)),
    ],
    ids=["whole", "positions", "heads", "resample-features", "token-mask"],
)
@pytest.mark.parametrize("layer", [*BLOCKS, "transformer.h.0.attn", "transformer.h.1.mlp"])
def test_gpt2_patch_from_own_cache_changes_nothing(
    tiny_gpt2: nn.Module, gpt2_inputs: dict[str, Tensor], layer: str, edit: Callable[[Any], Edit]
) -> None:
    with torch.no_grad():
        expected = tiny_gpt2(**gpt2_inputs).logits
        _, cache = run_with_hooks(tiny_gpt2, gpt2_inputs, [layer])
        out, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, {layer: edit(cache)})
    assert torch.equal(out.logits, expected)
    assert torch.equal(caches[layer].output, cache[layer].output)


@pytest.mark.parametrize("layer", BLOCKS)
def test_gpt2_patching_a_block_from_the_clean_run_restores_the_clean_logits(
    tiny_gpt2: nn.Module, clean_and_corrupt: tuple[dict[str, Tensor], dict[str, Tensor]], layer: str
) -> None:
    clean, corrupt = clean_and_corrupt
    with torch.no_grad():
        clean_logits = tiny_gpt2(**clean).logits
        corrupt_logits = tiny_gpt2(**corrupt).logits
        _, cache = run_with_hooks(tiny_gpt2, clean, BLOCKS)
        patched, _ = run_with_hooks(tiny_gpt2, corrupt, {layer: patch_from(cache)})
    assert not torch.allclose(corrupt_logits, clean_logits)
    torch.testing.assert_close(patched.logits, clean_logits)


def test_gpt2_patching_positions_from_the_corrupted_one_on_restores_the_clean_logits(
    tiny_gpt2: nn.Module, clean_and_corrupt: tuple[dict[str, Tensor], dict[str, Tensor]]
) -> None:
    # The corruption is at position 2; with causal attention, block 0's output differs at
    # positions 2.. only. Patching those restores the clean logits; patching fewer does not.
    clean, corrupt = clean_and_corrupt
    with torch.no_grad():
        clean_logits = tiny_gpt2(**clean).logits
        _, cache = run_with_hooks(tiny_gpt2, clean, ["transformer.h.0"])
        restored, _ = run_with_hooks(
            tiny_gpt2, corrupt, {"transformer.h.0": patch_from(cache).at(slice(2, None))}
        )
        partial, _ = run_with_hooks(
            tiny_gpt2, corrupt, {"transformer.h.0": patch_from(cache).at([2, 3])}
        )
    torch.testing.assert_close(restored.logits, clean_logits)
    torch.testing.assert_close(partial.logits[:, :4], clean_logits[:, :4])
    assert not torch.allclose(partial.logits[:, 4:], clean_logits[:, 4:])


def test_gpt2_patch_from_a_cache_of_another_shape_is_an_edit_error(
    tiny_gpt2: nn.Module, gpt2_inputs: dict[str, Tensor], hook_snapshot: Any
) -> None:
    before = hook_snapshot(tiny_gpt2)
    with torch.no_grad():
        _, cache = run_with_hooks(tiny_gpt2, gpt2_inputs["input_ids"][:, :4], ["transformer.h.0"])
        with pytest.raises(
            EditError, match=re.escape("(2, 4, 32)") + ".*" + re.escape("(2, 6, 32)")
        ):
            run_with_hooks(tiny_gpt2, gpt2_inputs, {"transformer.h.0": patch_from(cache)})
        with pytest.raises(EditError, match=re.escape("no layer 'transformer.h.1'")):
            run_with_hooks(tiny_gpt2, gpt2_inputs, {"transformer.h.1": patch_from(cache)})
    assert hook_snapshot(tiny_gpt2) == before


@pytest.mark.parametrize(
    ("index", "source_index"),
    [((slice(None), 2), (slice(None), 2)), ((slice(None), -1), (slice(None), -1))],
    ids=["position-2", "last-position"],
)
def test_gpt2_patch_from_a_prompt_of_another_length_at_a_shared_position(
    tiny_gpt2: nn.Module, hook_snapshot: Any, index: Any, source_index: Any
) -> None:
    before = hook_snapshot(tiny_gpt2)
    generator = torch.Generator().manual_seed(4)
    short = torch.randint(0, 100, (2, 4), generator=generator)
    long = torch.randint(0, 100, (2, 7), generator=generator)
    layer = "transformer.h.0"
    with torch.no_grad():
        _, cache = run_with_hooks(tiny_gpt2, short, [layer])
        out, _ = run_with_hooks(tiny_gpt2, long, {layer: patch_from(cache).at(index)})
        source = cache[layer].output

        def by_hand(h: Tensor) -> Tensor:
            h = h.clone()
            h[index] = source[source_index]
            return h

        with raw_hooks(tiny_gpt2, {layer: by_hand}):
            expected = tiny_gpt2(long).logits
    torch.testing.assert_close(out.logits, expected)
    with torch.no_grad(), pytest.raises(EditError, match="positions both runs have"):
        run_with_hooks(tiny_gpt2, long, {layer: patch_from(cache).at((slice(None), slice(2, 6)))})
    assert hook_snapshot(tiny_gpt2) == before


class Twice(nn.Module):
    """Calls one layer twice: its hook sees call 0, then call 1."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.lin(torch.tanh(self.lin(x))))


def test_patch_from_a_module_called_twice_patches_call_by_call() -> None:
    torch.manual_seed(0)
    model = Twice()
    clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        first = model.lin(clean)
        second = model.lin(torch.tanh(first))
        _, cache = run_with_hooks(model, clean, ["lin"])
        seen: list[int] = []

        def record_call(x: Tensor, site: Site) -> None:
            seen.append(site.call)

        out, caches = run_with_hooks(model, corrupt, {"lin": patch_from(cache) >> record_call})
    assert seen == [0, 1]
    torch.testing.assert_close(caches["lin"].outputs[0], first)
    torch.testing.assert_close(caches["lin"].outputs[1], second)
    torch.testing.assert_close(out, torch.tanh(second))


def test_mean_ablate_from_a_reference_run(
    tiny_gpt2: nn.Module, gpt2_inputs: dict[str, Tensor]
) -> None:
    layer = "transformer.h.1.mlp"
    reference_ids = torch.randint(0, 100, (5, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, reference = run_with_hooks(tiny_gpt2, reference_ids, [layer])
        mean = reference[layer].output.mean(0)

        def manual(x: Tensor) -> Tensor:
            y = x.clone()
            y[..., 4] = mean[:, 4]
            return y

        with raw_hooks(tiny_gpt2, {layer: manual}):
            expected = tiny_gpt2(**gpt2_inputs).logits
        out, _ = run_with_hooks(tiny_gpt2, gpt2_inputs, {layer: mean_ablate(4, cache=reference)})
    torch.testing.assert_close(out.logits, expected)


# -- devices and dtypes: edit arguments follow the activation ---------------------------------

DEVICE_CASES = [c for c in CASES if not c[0].startswith(("lambda", "site-function", "at-lambda"))]


@pytest.mark.parametrize(("name", "edit", "manual"), DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_edit_arguments_follow_the_activation_dtype(
    name: str, edit: Edit, manual: Callable[[Tensor], Tensor]
) -> None:
    x = _randn(B, S, D, seed=22).to(torch.float64)
    got = edit(x, SITE)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, manual(x.float()).double(), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "edit", "manual"), DEVICE_CASES, ids=[c[0] for c in DEVICE_CASES])
def test_edit_arguments_follow_the_activation_device(
    name: str, edit: Edit, manual: Callable[[Tensor], Tensor]
) -> None:
    # Edit arguments, index tensors and caches live on the CPU; the activation on the GPU.
    x = _randn(B, S, D, seed=23)
    got = edit(x.cuda(), SITE)
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), manual(x), rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bad_index_on_the_gpu_is_an_edit_error_not_a_device_assert() -> None:
    x = torch.zeros(B, S, D, device="cuda")
    for edit in (ablate(torch.tensor([8])), ablate([9]), resample_ablate(perm=[0, 7])):
        with pytest.raises(EditError):
            edit(x, SITE)
    assert torch.equal(ablate(torch.tensor([1]))(x + 1, SITE).cpu()[..., 1], torch.zeros(B, S))


@pytest.mark.parametrize(
    "edit",
    [
        patch_from(CACHE),
        patch_from(CACHE).at(2),
        patch_from(CACHE).at([0, 4]),
        heads(patch_from(CACHE), n_heads=N_HEADS, which=[1]),
    ],
    ids=repr,
)
def test_a_patch_never_aliases_the_cache(edit: Edit) -> None:
    # The model may change the patched activation in place; the cache must not follow.
    x = _randn(B, S, D, seed=18)
    y = edit(x, SITE)
    y.mul_(0.0).add_(7.0)
    assert torch.equal(OTHER, SNAPSHOT["OTHER"])
    assert not torch.equal(y, x)


def _f_pos_only(x, /, site):  # type: ignore[no-untyped-def]
    return x


def _f_kw_only(x, *, scale):  # type: ignore[no-untyped-def]
    return x * scale


def _f_kw_default(x, *, scale=2.0):  # type: ignore[no-untyped-def]
    return x * scale


def _f_var(*args):  # type: ignore[no-untyped-def]
    return args[0]


def _f_var_kw(x, *rest, k, j=1, **options):  # type: ignore[no-untyped-def]
    return x


def _f_defaults(x, y, z=1, w=2):  # type: ignore[no-untyped-def]
    return x


def _f_none():  # type: ignore[no-untyped-def]
    return None


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x,
        lambda x, site: x,
        lambda x, site=None: x,
        _f_pos_only,
        _f_kw_only,
        _f_kw_default,
        _f_var,
        _f_var_kw,
        _f_defaults,
        _f_none,
        double,
    ],
)
def test_a_plain_functions_parameters_match_inspect(fn: Callable[..., Any]) -> None:
    """Plain functions are read off their code object; the reference is inspect.signature."""
    import inspect

    from hookfn._edits._base import _parameters

    kinds = {
        inspect.Parameter.POSITIONAL_ONLY: "positional",
        inspect.Parameter.POSITIONAL_OR_KEYWORD: "positional",
        inspect.Parameter.VAR_POSITIONAL: "var",
        inspect.Parameter.KEYWORD_ONLY: "keyword",
    }
    expected = [
        (
            kinds[p.kind],
            p.name if p.kind is not inspect.Parameter.VAR_POSITIONAL else "*",
            p.default is inspect.Parameter.empty and p.kind is not inspect.Parameter.VAR_POSITIONAL,
        )
        for p in inspect.signature(fn).parameters.values()
        if p.kind in kinds
    ]
    assert _parameters(fn) == expected
