"""Reading a cache of an earlier run: `patch_from`, and the lookup that cache-reading edits
share."""

from __future__ import annotations

import difflib
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.utils._pytree as pytree
from torch import Tensor, nn

from .._capture import Capture, primary
from .._errors import CaptureError, EditError, SpecError
from .._site import Site
from ._arguments import cache_arg
from ._base import Cache, ValueEdit, call_repr
from ._checks import like_x
from ._parts import through_views, whole_shape


class Captures(dict[str, Capture]):
    """The ``{layer: Capture}`` dict a run returns: a dict that also notes the module each
    capture came from (by weak reference: it keeps no model alive), so that `patch_from` can
    tell a cache of another model. A missing layer is a `CaptureError` (a ``LookupError``)
    that lists the closest names. ``dict(captures)`` is a plain dict without the modules."""

    modules: dict[str, weakref.ref[nn.Module]]
    _checked: dict[tuple[str, int], bool]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        dict.__init__(self, *args, **kwargs)  # (not super(): one is made per run)
        self.modules = {}
        self._checked = {}

    @classmethod
    def of(cls, captures: dict[str, Capture], modules: Iterable[tuple[str, nn.Module]]) -> Captures:
        result = cls(captures)
        result.modules = {name: weakref.ref(module) for name, module in modules}
        return result

    def __missing__(self, name: str) -> Capture:
        names = list(self)
        close = difflib.get_close_matches(str(name), names, n=3, cutoff=0.5)
        hint = f"; closest: {', '.join(map(repr, close))}" if close else ""
        more = " ..." if len(names) > 6 else ""
        raise CaptureError(
            f"no capture of layer {name!r}{hint}. The run captured {len(names)} layer(s): "
            f"{names[:6]}{more}. Name {name!r} in the spec to capture it."
        )


def _flatten_captures(captures: Captures) -> tuple[list[Any], Any]:
    return list(captures.values()), (list(captures), captures.modules)


def _unflatten_captures(values: Iterable[Any], context: Any) -> Captures:
    names, modules = context
    result = Captures(zip(names, values, strict=True))
    result.modules = modules
    return result


pytree.register_pytree_node(
    Captures, _flatten_captures, _unflatten_captures, serialized_type_name="hookfn.Captures"
)


def fingerprint(module: nn.Module) -> tuple[str, tuple[tuple[str, tuple[int, ...]], ...]]:
    """What tells one model's module from another's: its class, and its parameters' names
    and shapes."""
    shapes = tuple((name, tuple(p.shape)) for name, p in module.named_parameters())
    return type(module).__qualname__, shapes


def check_same_model(cache: Cache, site: Site) -> None:
    """Raise if ``cache`` (a `Captures` that knows its modules) was recorded on a module
    other than the one at ``site`` that differs in class or parameter names and shapes."""
    modules = getattr(cache, "modules", None)
    if not modules:
        return
    name = str.__str__(site)
    ref = modules.get(name)
    source = None if ref is None else ref()
    target = getattr(site, "module", None)
    if source is None or target is None or source is target:
        return
    checked: dict[tuple[str, int], bool] = cache._checked  # type: ignore[attr-defined]
    key = (name, id(target))
    same = checked.get(key)
    if same is None:
        same = checked[key] = fingerprint(source) == fingerprint(target)
    if not same:
        theirs, ours = fingerprint(source), fingerprint(target)
        pairs = zip(theirs[1], ours[1], strict=False)
        differ = next(
            (f"{a[0]!r}: {a[1]} vs {b[1]}" for a, b in pairs if a != b),
            f"{len(theirs[1])} vs {len(ours[1])} parameters",
        )
        raise SpecError(
            f"the cache was recorded on another model: its layer {name!r} is a {theirs[0]} "
            f"whose parameters differ from this model's {ours[0]} ({differ}). Patch from a "
            "cache of this model; to patch across models on purpose, pass "
            "patch_from(dict(cache))."
        )


def cached_part(cache: Cache, site: Site) -> Tensor:
    """The tensor recorded at ``site`` (same layer, call and kind) in ``cache``; the
    message of a missing one names the layer, since that is what is missing."""
    name = str.__str__(site)
    kind = str(getattr(site, "kind", "output"))
    call = int(getattr(site, "call", 0))
    capture = cache.get(name)
    if capture is None:
        names = list(cache)
        close = difflib.get_close_matches(name, names, n=3)
        hint = f" (closest: {', '.join(map(repr, close))})" if close else ""
        raise EditError(
            f"the cache has no layer {name!r}{hint}; it has "
            f"{len(names)} layer(s): {names[:6]}. Capture {name!r} in the run that made the "
            f"cache, e.g. run_with_hooks(model, clean_inputs, [{name!r}, ...])."
        )
    records: tuple[Any, ...]
    if kind == "output":
        records = capture.raw_outputs
    elif kind == "input":
        records = capture.raw_inputs
    elif kind == "grad_output":
        records = capture.grad_outputs
    else:
        records = capture.grad_inputs
    if call >= len(records):
        raise EditError(
            f"the cache recorded {len(records)} {kind}(s) of layer "
            f"{name!r}, but this is call {call}. Record the {kind} in the run that made the "
            f"cache ({_HOW[kind]}), with the same calls of the module as this run."
        )
    tensor = primary(records[call])
    if tensor is None:
        raise EditError(
            f"the cached {kind} of layer {name!r} (call {call}) has no "
            f"tensor ({type(records[call]).__name__}); {_HOW[kind]}."
        )
    return tensor


_HOW = {
    "output": "capture it: 'capture' or Hook(output=True)",
    "input": "capture it with Hook(input=True)",
    "grad_output": "capture it with Hook(grad=True) and backward=...",
    "grad_input": "capture it with Hook(grad_input=True) and backward=...",
}


@dataclass(frozen=True, slots=True, eq=False)
class PatchFrom(ValueEdit):
    """The activation recorded at the same layer and call in a cache (see `patch_from`)."""

    cache: Cache

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        check_same_model(self.cache, site)
        source = cached_part(self.cache, site)
        whole = whole_shape(site, x)
        if source.shape != whole and (source.dim() != len(whole) or source.shape[-1] != whole[-1]):
            raise EditError(
                f"the cached activation has shape {tuple(source.shape)}, but this run's has "
                f"shape {tuple(whole)}: the feature widths differ, so the cache comes from "
                "another model (or another layer). Patch from a cache this model recorded: "
                "run_with_hooks(model, clean_inputs, [...])."
            )
        # The part the edit is given (inside `at`/`heads`), then a copy of it alone: the model
        # may change the patched tensor in place, never the cache. Runs of other shapes (prompts
        # of other lengths) patch the part both have: ``.at((slice(None), 2))``, ``.at(-1)``.
        part = (
            through_views(site, source) if source.shape == whole else _shared_part(site, x, source)
        )
        if part is None:
            raise EditError(
                f"the cached activation has shape {tuple(source.shape)}, but this run's has "
                f"shape {tuple(whole)}; patch from a run on inputs of the same shape (same "
                "batch size and sequence length), or restrict the patch to positions both "
                "runs have: patch_from(cache).at((slice(None), position))."
            )
        if part.dtype is x.dtype and part.device == x.device:
            return part.clone()
        return like_x(part, x, "cached activation")  # converted: a copy

    def __repr__(self) -> str:
        return call_repr("patch_from", (self.cache,))


def _shared_part(site: Site, x: Tensor, source: Tensor) -> Tensor | None:
    """The part of a cached activation of another shape that the edit's index takes, where
    it fits the part of this run's the edit was given; None where there is none."""
    if not getattr(site, "_views", ()):
        return None
    try:
        part = through_views(site, source)
    except (IndexError, RuntimeError, ValueError):
        return None
    return part if part.shape == x.shape else None


def patch_from(cache: Cache) -> PatchFrom:
    """Replace the activation by the one recorded at the same layer in an earlier run.

    ``cache`` is the ``{layer: Capture}`` dict `run_with_hooks` returned; the recorded tensor
    is looked up by the site's layer name and call index (a module called several times is
    patched call by call), and by what is edited (output, input or gradient). Restrict the
    patch to positions, a token mask or heads by composition:
    ``patch_from(clean).at([3, 4])``, ``heads(patch_from(clean), n_heads=12, which=[5])``.
    Laws: patching a run from its own cache changes nothing; idempotent.

    The dict is copied when the edit is built (the captures in it are immutable): putting
    another capture into the caller's dict later does not change the edit.

    Raises:
        SpecError: ``cache`` is not a ``{layer: Capture}`` dict.
        EditError: (when applied) the cache lacks the layer or the call, or the recorded
            shape differs from the activation's, or it holds another kind of number.
        SpecError: (when applied) the cache that `run_with_hooks` returned was recorded on a
            module of another class or with other parameter names or shapes than the one
            patched (a cache of another model). ``patch_from(dict(cache))`` skips the check.

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> clean, corrupt = torch.randn(3, 4), torch.randn(3, 4)
        >>> clean_out, cache = run_with_hooks(model, clean, ["0"])
        >>> out, _ = run_with_hooks(model, corrupt, {"0": patch_from(cache)})
        >>> torch.allclose(out, clean_out)
        True
    """
    copied = cache_arg(cache, "patch_from(cache)")
    modules = getattr(cache, "modules", None) if isinstance(cache, Captures) else None
    if modules:
        copied = Captures(copied)
        copied.modules = dict(modules)
    return PatchFrom(copied)
