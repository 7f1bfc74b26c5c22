"""Fuzzing specs, layer names and edit results: a right answer or a `HookfnError`, nothing else.

Hypothesis draws specs mixing real names, globs, module objects and garbage keys with
captures, edits, hook records and garbage values, and edits returning anything at all. Each
outcome must be either the result of a hand-written forward pass with the same edits, or a
`HookfnError` (a user's own exception from inside an edit passes through unchanged). Never
an ``AttributeError``/``TypeError``/``RuntimeError`` from deep inside, never a silently
wrong result.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from hookfn import EditError, Hook, HookfnError, add, run_with_hooks

FUZZ = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,  # the same cases on every run and machine
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


class Block(nn.Module):
    """Returns a tuple ``(h, aux)``, like an attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.tanh(self.fc(h))
        return y, y.mean()


class Top2(nn.Module):
    """Returns a ``torch.return_types.topk`` (a tuple subclass with ``.values``)."""

    def forward(self, h: Tensor) -> Any:
        return torch.topk(h, 2, dim=-1)


class Net(nn.Module):
    """Outputs of every structured kind: tensor, tuple, return_types, and a dict at the top."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(6, 8)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.pick = Top2()
        self.head = nn.Linear(2, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.inp(x)
        for block in self.blocks:
            h, _ = block(h)
        top = self.pick(h)
        return {"logits": self.head(top.values), "index": top.indices}


NET = Net().eval()
X = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
NAMES = [name for name, _ in NET.named_modules()]  # "" is the model itself
CALLED = [n for n in NAMES if n != "blocks"]  # a ModuleList is never called


def reference(
    x: Tensor, edits: dict[str, Callable[[Tensor], Tensor]]
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The forward pass by hand: (model output, each layer's primary output, primary input)."""
    outs: dict[str, Tensor] = {}
    ins: dict[str, Tensor] = {"": x, "inp": x}

    def at(name: str, value: Tensor) -> Tensor:
        if name in edits:
            value = edits[name](value)
        outs[name] = value
        return value

    with torch.no_grad():
        h = at("inp", F.linear(x, NET.inp.weight, NET.inp.bias))
        for i, block in enumerate(NET.blocks):
            ins[f"blocks.{i}"] = ins[f"blocks.{i}.fc"] = h
            fc = at(f"blocks.{i}.fc", F.linear(h, block.fc.weight, block.fc.bias))
            h = at(f"blocks.{i}", torch.tanh(fc))
        ins["pick"] = h
        top = torch.topk(h, 2, dim=-1)
        values = at("pick", top.values)
        ins["head"] = values
        logits = at("", at("head", F.linear(values, NET.head.weight, NET.head.bias)))
    return {"logits": logits, "index": top.indices}, outs, ins


# -- keys --------------------------------------------------------------------------------

# Globs with the names they match, written out by hand ('*' one segment, '**' any).
GLOBS: dict[str, list[str]] = {
    "*": ["inp", "blocks", "pick", "head"],
    "blocks.*": ["blocks.0", "blocks.1"],
    "blocks.*.fc": ["blocks.0.fc", "blocks.1.fc"],
    "**.fc": ["blocks.0.fc", "blocks.1.fc"],
    "blocks.?": ["blocks.0", "blocks.1"],
    "[ip]*": ["inp", "pick"],
    "**": [n for n in NAMES if n],
}


@dataclass(frozen=True)
class Key:
    """A spec key and what it should resolve to (``None``: no layer, an error)."""

    key: Any
    names: tuple[str, ...] | None
    explicit: bool = True


def _module_key(name: str) -> Key:
    return Key(NET.get_submodule(name), (name,))


keys = st.one_of(
    st.sampled_from(NAMES).map(lambda n: Key(n, (n,))),
    st.sampled_from(sorted(GLOBS)).map(lambda g: Key(g, tuple(GLOBS[g]), explicit=False)),
    st.sampled_from(NAMES).map(_module_key),
    st.sampled_from(["inp.", ".inp", "blocks.2", "_orig_mod.inp", "module.head", "h.0", "*.x"]).map(
        lambda k: Key(k, None)
    ),
    st.text(alphabet="abcdefhiklnoprst.*?[]!0123", max_size=8).map(
        lambda k: (
            Key(k, (k,) if k in NAMES else None, explicit=True)
            if not any(c in k for c in "*?[")
            else Key(k, "glob")
        )  # type: ignore[arg-type]
    ),
    st.sampled_from([0, None, 1.5, b"inp", ("inp",), nn.Linear(2, 2)]).map(lambda k: Key(k, None)),
)


# -- values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Value:
    """A spec value, with its meaning for the reference (``None``: not accepted)."""

    value: Any
    edit: Callable[[Tensor], Tensor] | None = None
    output: bool = True
    input: bool = False
    dtype: torch.dtype | None = None
    valid: bool = True


def _scale(k: float) -> Callable[[Tensor], Tensor]:
    return lambda t: t * k


def _with_site(t: Tensor, site: Any) -> Tensor:
    return t - float(site.call + 1)


def _arity3(t: Tensor, site: Any, extra: Any) -> Tensor:
    return t


finite = st.floats(-3, 3, allow_nan=False, width=32)

values = st.one_of(
    st.just(Value("capture")),
    finite.map(lambda c: Value(add(c), edit=lambda t, c=c: t + c)),
    finite.map(lambda k: Value(_scale(k), edit=_scale(k))),
    st.just(Value(_with_site, edit=lambda t: t - 1.0)),
    st.just(Value(lambda t: None)),
    st.builds(
        lambda o, i, k: Value(
            (o, i, None if k is None else _scale(k)), None if k is None else _scale(k), o, i
        ),
        st.booleans(),
        st.booleans(),
        st.none() | finite,
    ),
    st.builds(
        lambda o, i, clone, dt, k: Value(
            Hook(None if k is None else _scale(k), output=o, input=i, clone=clone, dtype=dt),
            None if k is None else _scale(k),
            o,
            i,
            dt,
        ),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.sampled_from([None, torch.float64, torch.float16]),
        st.none() | finite,
    ),
    st.sampled_from(
        [
            3,
            "nope",
            "Capture",
            None,
            [1],
            {"edit": 1},
            (1, 0, None),
            (True,),
            (True, False, "x"),
            lambda: 0,
            _arity3,
            object(),
            torch.tensor(1.0),
            Hook,
        ]
    ).map(lambda v: Value(v, valid=False)),
)


def expected_plan(entries: list[tuple[Key, Value]]) -> dict[str, Value] | None:
    """What a valid spec means by hand: {layer: value}; ``None`` if it must be refused."""
    chosen: dict[str, tuple[Value, bool]] = {}
    for key, value in entries:
        if not value.valid or key.names is None or key.names == "glob":
            return None
        for name in key.names:
            if name in chosen:
                _, explicit = chosen[name]
                if explicit == key.explicit:
                    return None  # two keys of the same kind name one layer
                if explicit:
                    continue  # an exact name wins over a glob
            chosen[name] = (value, key.explicit)
    return {name: value for name, (value, _) in chosen.items()}


@FUZZ
@given(st.lists(st.tuples(keys, values), min_size=1, max_size=4))
def test_fuzzed_specs(entries: list[tuple[Key, Value]]) -> None:
    spec: dict[Any, Any] = {}
    for key, value in entries:
        if isinstance(key.key, (list, dict)):
            continue
        try:
            spec[key.key] = value.value
        except TypeError:  # an unhashable key cannot even be put in a dict
            return
    kept = [(k, v) for k, v in entries if spec.get(k.key, object()) is v.value]
    # (a later duplicate key replaced an earlier one in the dict: keep what the dict holds)
    kept = list({id(k.key): (k, v) for k, v in kept}.values())
    plan = expected_plan(kept)
    try:
        out, caches = run_with_hooks(NET, X, spec)
    except HookfnError as error:
        event(f"refused: {type(error).__name__}")  # (--hypothesis-show-statistics)
        if plan is None:
            return
        raise
    except Exception as error:
        raise AssertionError(f"{type(error).__name__} escaped for spec {spec!r}") from error
    event("accepted")
    if plan is None:
        # Globs the test does not spell out (random text) may match layers; anything else
        # refused by hand must have been refused by hookfn.
        assert any(k.names == "glob" for k, _ in kept), f"accepted {spec!r}"
        return
    edits = {name: v.edit for name, v in plan.items() if v.edit is not None}
    want, outs, ins = reference(X, edits)
    torch.testing.assert_close(out["logits"], want["logits"])
    assert torch.equal(out["index"], want["index"])
    assert sorted(caches) == sorted(plan)
    for name, value in plan.items():
        capture = caches[name]
        if name not in CALLED:
            assert capture.n_calls == 0
            continue
        if value.output:
            got = capture.output
            expect = outs[name] if value.dtype is None else outs[name].to(value.dtype)
            assert got.dtype == expect.dtype
            torch.testing.assert_close(got, expect)
        if value.input:
            expect_in = ins[name] if value.dtype is None else ins[name].to(value.dtype)
            torch.testing.assert_close(capture.input, expect_in)


# -- edit results ------------------------------------------------------------------------

NAN = float("nan")


class UserBug(Exception):
    """An edit's own exception: it must pass through untouched."""


def _bug(x: Tensor) -> Tensor:
    raise UserBug("inside the user's edit")


# kind -> (edit, what the model then sees by hand, or None when an EditError is due)
RESULTS: dict[str, tuple[Callable[[Tensor], Any], Callable[[Tensor], Tensor] | None]] = {
    "same": (lambda x: x, lambda x: x),
    "none": (lambda x: None, lambda x: x),
    "scaled": (lambda x: x * 2, lambda x: x * 2),
    "float64": (lambda x: x.double() * 2, lambda x: x * 2),
    "float16": (lambda x: x.half(), lambda x: x.half().float()),
    "bfloat16": (lambda x: x.bfloat16(), lambda x: x.bfloat16().float()),
    "expanded": (lambda x: x[:1].expand_as(x), lambda x: x[:1].expand_as(x)),
    "noncontiguous": (lambda x: x.t().contiguous().t(), lambda x: x),
    "nan": (lambda x: torch.full_like(x, NAN), lambda x: torch.full_like(x, NAN)),
    "parameter": (lambda x: nn.Parameter(x * 3), lambda x: x * 3),
    "requires_grad": (lambda x: (x * 1).requires_grad_(), lambda x: x),
    "int64": (lambda x: x.long(), None),
    "bool": (lambda x: x > 0, None),
    "complex": (lambda x: torch.complex(x, x), None),
    "meta": (lambda x: torch.empty_like(x, device="meta"), None),
    "narrower": (lambda x: x[..., :1], None),
    "scalar_tensor": (lambda x: torch.tensor(1.0), None),
    "flattened": (lambda x: x.reshape(-1), None),
    "float": (lambda x: 1.0, None),
    "int": (lambda x: 0, None),
    "list": (lambda x: x.tolist(), None),
    "tuple": (lambda x: (x, x), None),
    "dict": (lambda x: {"x": x}, None),
    "string": (lambda x: "x", None),
    "numpy": (lambda x: x.detach().numpy(), None),
    "module": (lambda x: nn.Identity(), None),
}

SITES = ["inp", "blocks.0", "blocks.1.fc", "pick", "head", ""]


@FUZZ
@given(
    st.sampled_from(sorted(RESULTS)),
    st.sampled_from(SITES),
    st.sampled_from(["output", "input"]),
    st.integers(1, 4),
)
def test_fuzzed_edit_results(kind: str, site: str, where: str, batch: int) -> None:
    edit, effect = RESULTS[kind]
    x = X[:batch].clone()
    hook = Hook(edit) if where == "output" else Hook(edit_input=edit, output=True)
    if effect is None:
        event("refused: EditError")
        # Refused, with a message that names the layer.
        with pytest.raises(EditError, match=re.escape(repr(site))):
            _run_or_explain(x, site, hook, f"{kind} at {site} ({where})")
        return
    out, caches = _run_or_explain(x, site, hook, f"{kind} at {site} ({where})")
    event("accepted")
    assert effect is not None, f"{kind} at {site} ({where}) was accepted"
    if where == "output":
        want, outs, _ = reference(x, {site: effect})
    else:
        want, outs, _ = reference(_input_edited(x, site, effect), _input_edits(x, site, effect))
    _assert_same(out["logits"], want["logits"])
    _assert_same(caches[site].output, outs[site])


def _input_edits(
    x: Tensor, site: str, effect: Callable[[Tensor], Tensor]
) -> dict[str, Callable[[Tensor], Tensor]]:
    """An input edit of a layer is an output edit of what feeds it (by hand)."""
    feeds = {
        "blocks.0": "inp",
        "blocks.1.fc": "blocks.0",
        "pick": "blocks.1",
        "head": "pick",
    }
    return {feeds[site]: effect} if site in feeds else {}


def _input_edited(x: Tensor, site: str, effect: Callable[[Tensor], Tensor]) -> Tensor:
    return effect(x) if site in ("", "inp") else x


def _run_or_explain(x: Tensor, site: str, hook: Hook, case: str) -> tuple[Any, Any]:
    """Run; any exception other than a `HookfnError` fails the test, naming the case."""
    try:
        return run_with_hooks(NET, x, {site: hook})
    except HookfnError:
        raise
    except Exception as error:
        raise AssertionError(f"{case}: {type(error).__name__}: {error}") from error


def _assert_same(got: Tensor, want: Tensor) -> None:
    assert got.dtype == want.dtype
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("site", SITES)
@pytest.mark.parametrize("where", ["output", "input"])
def test_user_exception_from_an_edit_passes_through(site: str, where: str) -> None:
    hook = Hook(_bug) if where == "output" else Hook(edit_input=_bug)
    with pytest.raises(UserBug):
        run_with_hooks(NET, X, {site: hook})
