"""Plain functions as edits and the result check (issue #11): how a callable is called, what
it may return, and `check_result`, against a raw forward hook and plain tensor code."""

from __future__ import annotations

import functools
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hookfn import EditError, Site, add, as_edit, at, heads, run_with_hooks, scale
from hookfn._edits import Function, check_result

SITE = Site("fc", call=1, kind="output", module=nn.Identity())
X = torch.arange(6.0).view(2, 3)
GLOBAL = torch.ones(2, 3)  # a tensor a function hands out while the module keeps it
KEPT: list[Tensor] = []


def negate_maybe(h: Tensor, negate: bool = False) -> Tensor:
    return -h if negate else h + 1


def with_site(x: Tensor, site: Site) -> Tensor:
    return x + site.call


def with_optional_site(x: Tensor, site: Site | None = None) -> Tensor:
    return x + (0 if site is None else site.call)


def with_layer(x: Tensor, layer: str = "") -> Tensor:
    return x + len(layer)


def two_required(x: Tensor, other: Any) -> Tensor:
    return x + other.call


def var_args(*args: Any) -> Tensor:
    assert len(args) == 1
    return args[0] + 1


def keyword_only(x: Tensor, *, by: float = 3.0) -> Tensor:
    return x + by


class Callable2:
    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return x + site.call


@pytest.mark.parametrize(
    ("fn", "takes_site", "expected"),
    [
        (negate_maybe, False, X + 1),  # the site must not land in `negate`
        (with_site, True, X + 1),
        (with_optional_site, True, X + 1),  # named site: passed
        (with_layer, True, X + 2),  # named layer: passed (the site is the name "fc")
        (two_required, True, X + 1),  # a required second parameter: passed
        (var_args, False, X + 1),
        (keyword_only, False, X + 3),
        (lambda x: x * 2, False, X * 2),
        (lambda x, site: x + site.call, True, X + 1),
        (lambda x, scale=2.0: x * scale, False, X * 2),
        (Callable2(), True, X + 1),
        (functools.partial(with_site, site=SITE), False, X + 1),
        (torch.relu, False, X),  # a builtin without a signature: f(x)
        (functools.partial(torch.roll, shifts=1, dims=1), False, X.roll(1, 1)),
    ],
    ids=lambda v: getattr(v, "__name__", None) or type(v).__name__,
)
def test_how_a_callable_is_called(fn: Any, takes_site: bool, expected: Tensor) -> None:
    edit = as_edit(fn)
    assert isinstance(edit, Function)
    assert edit.takes_site is takes_site
    torch.testing.assert_close(edit(X, SITE), expected)


def test_dropout_is_called_with_x_alone() -> None:
    edit = as_edit(F.dropout)  # (input, p=0.5, training=True, inplace=False)
    assert not edit.takes_site
    y = edit(torch.ones(1000), SITE)
    assert set(y.unique().tolist()) <= {0.0, 2.0}  # dropped at p=0.5 and rescaled by 2


def test_a_builtin_missing_arguments_is_an_edit_error() -> None:
    edit = as_edit(torch.roll)  # no readable signature: called as torch.roll(x)
    with pytest.raises(EditError, match=r"called as f\(x\).*lambda x: .*roll\(x, \.\.\.\)"):
        edit(X, SITE)


# -- results that alias memory someone else owns are copied -----------------------------------

PARAMETER = nn.Parameter(torch.ones(2, 3))


def _returns_global(x: Tensor) -> Tensor:
    return GLOBAL


def _returns_kept(x: Tensor) -> Tensor:
    y = x * 3
    KEPT.append(y)
    return y


ALIASING = [
    ("view of x", lambda x: x[:, :]),
    ("x.view", lambda x: x.view(2, 3)),
    ("expand of a vector", lambda x: GLOBAL[0].expand_as(x)),
    ("detach", lambda x: x.detach()),
    ("data", lambda x: x.data),
    ("parameter", lambda x: PARAMETER),
    ("leaf requiring grad", lambda x: torch.ones(2, 3, requires_grad=True)),
    ("global", _returns_global),
    ("kept elsewhere", _returns_kept),
]


@pytest.mark.parametrize(("name", "fn"), ALIASING, ids=[a[0] for a in ALIASING])
def test_a_result_that_aliases_memory_is_copied(name: str, fn: Any) -> None:
    x = X.clone()
    owners = [x, GLOBAL, PARAMETER, *KEPT]
    expected = fn(x).detach().clone()
    KEPT.clear()
    y = as_edit(fn)(x, SITE)
    owners.extend(KEPT)
    torch.testing.assert_close(y, expected)
    assert y._base is None
    assert not (y.is_leaf and y.requires_grad)
    ptr = y.untyped_storage().data_ptr()
    assert all(ptr != o.untyped_storage().data_ptr() for o in owners), name
    KEPT.clear()


def test_a_fresh_result_is_handed_on_as_it_is() -> None:
    seen: list[int] = []

    def fresh(x: Tensor) -> Tensor:
        y = x * 2
        seen.append(id(y))
        return y

    y = as_edit(fresh)(X, SITE)
    assert id(y) == seen[0]  # not copied


class AddInPlaceAfter(nn.Module):
    """A layer followed by an in-place op, as many models have (ReLU(inplace=True))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        h.add_(100.0)
        return h


def test_the_model_writing_in_place_never_reaches_what_the_function_returned() -> None:
    model = AddInPlaceAfter()
    vector = torch.ones(3)
    before = (GLOBAL.clone(), vector.clone(), PARAMETER.detach().clone())
    with torch.no_grad():
        for fn in (_returns_global, lambda x: vector.expand_as(x), lambda x: PARAMETER):
            out, _ = run_with_hooks(model, torch.zeros(2, 3), {"fc": fn})
            torch.testing.assert_close(out, before[0] + 100.0)
    assert torch.equal(GLOBAL, before[0])
    assert torch.equal(vector, before[1])
    assert torch.equal(PARAMETER.detach(), before[2])


@pytest.mark.parametrize(
    "fn",
    [
        lambda x: x.mul_(0),
        lambda x: [x.add_(1), None][1],
        lambda x: [x[0].zero_(), x * 2][1],  # through a view of x
        lambda x, site: x.clamp_(0, 1),
    ],
    ids=["mul_", "add_ then None", "view zero_", "clamp_ with site"],
)
def test_a_function_that_changes_x_in_place_is_an_edit_error(fn: Any) -> None:
    with pytest.raises(EditError, match="in place"):
        as_edit(fn)(X.clone(), SITE)


def test_in_place_inside_at_and_heads_is_caught_too() -> None:
    x = torch.randn(2, 3, 4)
    with pytest.raises(EditError, match="in place"):
        at([1], lambda p: p.mul_(2))(x, SITE)
    with pytest.raises(EditError, match="in place"):
        heads(lambda p: p.neg_(), n_heads=2)(x, SITE)


def test_under_inference_mode_and_torch_func() -> None:
    with torch.inference_mode():
        x = torch.ones(2, 3)
        assert torch.equal(as_edit(lambda t: t * 2)(x, SITE), x * 2)
    xs = torch.randn(4, 2, 3)
    got = torch.func.vmap(lambda t: as_edit(lambda u: u[:, :] * 2)(t, SITE))(xs)
    torch.testing.assert_close(got, xs * 2)
    grad = torch.func.grad(lambda t: as_edit(lambda u: u.detach() + u)(t, SITE).sum())(X)
    torch.testing.assert_close(grad, torch.ones_like(X))


# -- check_result --------------------------------------------------------------------------------


def test_check_result_passes_the_common_case_as_it_is() -> None:
    x, y = torch.zeros(2, 3), torch.ones(2, 3)
    assert check_result(x, y) is y
    assert check_result(x, None) is x
    assert check_result(x, x) is x


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        (torch.zeros(2, dtype=torch.float16), torch.ones(2, dtype=torch.float64), torch.float16),
        (torch.zeros(2, dtype=torch.bfloat16), torch.ones(2), torch.bfloat16),
        (
            torch.zeros(2, dtype=torch.complex64),
            torch.ones(2, dtype=torch.complex128),
            torch.complex64,
        ),
    ],
)
def test_check_result_casts_within_a_kind(x: Tensor, y: Tensor, expected: torch.dtype) -> None:
    got = check_result(x, y)
    assert got.dtype == expected
    assert torch.equal(got.to(y.dtype), y)


REFUSED = [
    ("int for float", torch.zeros(2), torch.ones(2, dtype=torch.int64), "dtype torch.int64"),
    ("bool for float", torch.zeros(2), torch.ones(2, dtype=torch.bool), "dtype torch.bool"),
    ("complex for float", torch.zeros(2), torch.ones(2, dtype=torch.complex64), "complex64"),
    ("float for int", torch.zeros(2, dtype=torch.int64), torch.ones(2), "float32"),
    (
        "int32 for int64",
        torch.zeros(2, dtype=torch.int64),
        torch.ones(2, dtype=torch.int32),
        "int32",
    ),
    ("shape", torch.zeros(2, 3), torch.ones(3), "shape (3,)"),
    ("device", torch.zeros(2), torch.ones(2, device="meta"), "meta"),
    ("not a tensor", torch.zeros(2), [1.0, 2.0], "list"),
]


@pytest.mark.parametrize(("name", "x", "y", "fragment"), REFUSED, ids=[r[0] for r in REFUSED])
def test_check_result_refuses_what_cannot_stand_in(
    name: str, x: Tensor, y: Any, fragment: str
) -> None:
    with pytest.raises(EditError) as info:
        check_result(x, y)
    message = str(info.value)
    assert fragment in message
    assert "layer" not in message  # short: the engine adds where it ran, once


def test_inner_results_are_checked_as_top_level_ones_are() -> None:
    x = torch.randn(2, 3)
    with pytest.raises(EditError, match=r"inner edit.*torch\.bool"):
        at([0], lambda t: t > 0, dim=0)(x, SITE)
    with pytest.raises(EditError, match=r"inner edit.*complex64"):
        at([0], lambda t: t * 1j, dim=0)(x, SITE)
    with pytest.raises(EditError, match=r"inner edit.*int64"):
        heads(lambda t: t.long(), n_heads=3)(x, SITE)
    # A float of another precision is cast back, as at the top level.
    y = at([0], lambda t: t.double() + 1, dim=0)(x, SITE)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y[0], x[0] + 1)
    torch.testing.assert_close(y[1], x[1])


def test_error_messages_are_short() -> None:
    # No layer name, no call index: the hook engine adds them once, where it catches them.
    for edit, x in [
        (add(torch.ones(4)), torch.zeros(2, 3)),
        (scale(0.5), torch.zeros(2, dtype=torch.int64)),
        (at([5], add(1.0)), torch.zeros(2, 3)),
    ]:
        with pytest.raises(EditError) as info:
            edit(x, Site("some.layer.name", call=3, kind="output", module=nn.Identity()))
        assert "some.layer.name" not in str(info.value)
        assert "call 3" not in str(info.value)


RESULT_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.bool,
    torch.complex64,
]


@settings(max_examples=60, deadline=None)
@given(
    x_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    result_dtype=st.sampled_from(RESULT_DTYPES),
    where=st.sampled_from(["at", "heads", "top"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_results_kind_is_checked_the_same_inside_at_and_heads(
    x_dtype: torch.dtype, result_dtype: torch.dtype, where: str, seed: int
) -> None:
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(seed)).to(x_dtype)

    def to_dtype(t: Tensor) -> Tensor:
        return (t * 3).to(result_dtype)

    edit: Any = {
        "at": at([1], to_dtype),
        "heads": heads(to_dtype, n_heads=2, which=[0]),
        "top": as_edit(to_dtype),
    }[where]
    if not result_dtype.is_floating_point:  # another kind of number: refused everywhere
        with pytest.raises(EditError, match=str(result_dtype)):
            check_result(x, edit(x, SITE))
        return
    y = check_result(x, edit(x, SITE))
    # The reference: the part written out by hand, the result cast back to x's dtype.
    expected = x.clone()
    if where == "at":
        expected[:, 1:2] = (x[:, 1:2] * 3).to(result_dtype).to(x_dtype)
    elif where == "heads":
        expected[..., 0:2] = (x[..., 0:2] * 3).to(result_dtype).to(x_dtype)
    else:
        expected = (x * 3).to(result_dtype).to(x_dtype)
    assert y.dtype == x_dtype
    assert torch.equal(y, expected)
