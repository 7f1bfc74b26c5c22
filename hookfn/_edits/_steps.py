"""Step-aware edits: apply an edit on some calls of a module only (`on_prompt`,
`on_generated`, `on_calls`, `from_step`, `when`).

In a run of ``model.generate`` with the KV cache, each hooked module is called once per
forward: call 0 is the prompt (prefill), call ``k >= 1`` feeds the ``k``-th generated token.
``site.call`` is that index, so these combinators select steps by it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor

from .._errors import SpecError
from .._site import Site
from ._arguments import int_like, is_bool
from ._base import Edit, EditLike, ValueEdit, as_edit


@dataclass(frozen=True, slots=True, eq=False)
class OnCalls(ValueEdit):
    """An edit applied on chosen calls of the module only (see `on_calls`, `on_prompt`,
    `on_generated`, `from_step`): on call ``i`` when ``i`` is in ``calls``, or when
    ``calls`` is ``None`` and ``i >= start``. On other calls ``x`` is returned unchanged."""

    edit: Edit
    calls: frozenset[int] | None
    start: int

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        call = site.call
        if (call in self.calls) if self.calls is not None else call >= self.start:
            return self.edit(x, site)
        return x

    def __repr__(self) -> str:
        if self.calls is None:
            if self.start == 1:
                return f"on_generated({self.edit!r})"
            return f"from_step({self.start}, {self.edit!r})"
        if self.calls == frozenset({0}):
            return f"on_prompt({self.edit!r})"
        return f"on_calls({sorted(self.calls)!r}, {self.edit!r})"


@dataclass(frozen=True, slots=True, eq=False)
class When(ValueEdit):
    """An edit applied where ``predicate(site)`` is true (see `when`)."""

    predicate: Callable[[Site], bool]
    edit: Edit

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return self.edit(x, site) if self.predicate(site) else x

    def __repr__(self) -> str:
        return f"when({_name(self.predicate)}, {self.edit!r})"


def _call_index(value: object, where: str) -> int:
    index = int_like(value)
    if index is None or index < 0:
        raise SpecError(f"{where}: a call index is an int >= 0, got {value!r}.")
    return index


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def on_prompt(edit: EditLike) -> OnCalls:
    """Apply ``edit`` on the first call of the module only: the prompt (prefill) forward of
    ``model.generate``; the generated steps are left unchanged.

    Examples:
        >>> import torch
        >>> from hookfn import add
        >>> edit = on_prompt(add(1.0))
        >>> prompt = Site("h.0", call=0, kind="output", module=torch.nn.Identity())
        >>> step = Site("h.0", call=1, kind="output", module=torch.nn.Identity())
        >>> edit(torch.zeros(1), prompt), edit(torch.zeros(1), step)
        (tensor([1.]), tensor([0.]))
    """
    return OnCalls(as_edit(edit, where="on_prompt(edit)"), frozenset({0}), 0)


def on_generated(edit: EditLike) -> OnCalls:
    """Apply ``edit`` on every call after the first: the generated steps of
    ``model.generate`` (with the KV cache), not the prompt. Equal to ``from_step(1, edit)``.
    """
    return OnCalls(as_edit(edit, where="on_generated(edit)"), None, 1)


def from_step(step: int, edit: EditLike) -> OnCalls:
    """Apply ``edit`` on call ``step`` of the module and every later one.

    With the KV cache, call ``k >= 1`` of ``model.generate`` feeds the ``k``-th generated
    token and computes the logits of token ``k + 1``; so ``from_step(k, edit)`` leaves the
    first ``k`` generated tokens as they were, and changes what follows. ``from_step(0, e)``
    applies ``e`` on every call.

    Raises:
        SpecError: ``step`` is not an int >= 0.

    Examples:
        >>> from hookfn import steer
        >>> import torch
        >>> from_step(3, steer(torch.ones(4), 2.0))
        from_step(3, steer(tensor(shape=(4,), dtype=torch.float32), alpha=2.0))
    """
    start = _call_index(step, "from_step(step, edit)")
    return OnCalls(as_edit(edit, where="from_step(step, edit)"), None, start)


def on_calls(calls: int | Iterable[int], edit: EditLike) -> OnCalls:
    """Apply ``edit`` on the listed calls of the module only (0 is the first call: the
    prompt of ``model.generate``).

    Raises:
        SpecError: ``calls`` is empty, or holds something that is not an int >= 0.

    Examples:
        >>> from hookfn import add
        >>> on_calls([2, 0], add(1.0))
        on_calls([0, 2], add(1.0))
    """
    where = "on_calls(calls, edit)"
    if is_bool(calls) or int_like(calls) is not None:
        items: list[object] = [calls]
    elif isinstance(calls, Iterable) and not isinstance(calls, (str, bytes, Tensor)):
        items = list(calls)
    else:
        raise SpecError(f"{where}: calls is an int or a list of ints, got {calls!r}.")
    if not items:
        raise SpecError(f"{where}: calls=[] names no call.")
    chosen = frozenset(_call_index(item, where) for item in items)
    return OnCalls(as_edit(edit, where=where), chosen, 0)


def when(predicate: Callable[[Site], bool], edit: EditLike) -> When:
    """Apply ``edit`` where ``predicate(site)`` is true (``site.call``, ``site.kind``,
    ``site.name``), elsewhere leave ``x`` unchanged.

    The edit prints with the predicate's name and pickles when the predicate does: a
    function defined at module level does, a ``lambda`` or a nested function does not (use
    `on_calls` / `from_step` for call indices: they always pickle).

    Raises:
        SpecError: ``predicate`` is not callable.

    Examples:
        >>> import torch
        >>> from hookfn import add
        >>> def even(site):
        ...     return site.call % 2 == 0
        >>> when(even, add(1.0))
        when(even, add(1.0))
    """
    if not callable(predicate) or isinstance(predicate, Edit):
        raise SpecError(f"when(predicate, edit): predicate(site) -> bool, got {predicate!r}.")
    return When(predicate, as_edit(edit, where="when(predicate, edit)"))
