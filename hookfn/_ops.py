"""Sites inside a module's forward: torch functions it calls, and values no submodule returns.

A *probe* is a small module grafted into the model for a run (see `hookfn._keys.Names`):
hooks, captures and edits act on it like on any module, and something the run sets up calls
it at the right point of the forward:

- `OpSite`: a torch function called inside a module (``"transformer.h.0.attn:softmax"``, the
  second call ``":matmul.1"``). While the module runs, in the run's context, a
  `torch.overrides.TorchFunctionMode` routes the chosen calls through the probe, whose
  input is the function's arguments and whose output is its result.
- `Pattern`: the attention pattern. ``F.scaled_dot_product_attention`` computes none, so its
  call is replaced by the same attention written out, the softmax weights passing through
  the probe (an edit there changes what the values are averaged with); in an attention that
  computes its own softmax, the first softmax's result passes through it.
- `Operand`: an argument of ``scaled_dot_product_attention`` (``q``, ``k``, ``v``, after any
  rotary embedding), passed through the probe before the attention runs.
- `Insert`: a value at the input or output of a module, passed through a probe (the
  component names of `hookfn._components`), optionally split into heads and merged back.

`Interceptor` holds the probes of one host module for one run: its hooks on the host enter
and leave the function mode (and call the insertion probes) only where the run is active.
"""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._capture import Args, primary
from ._errors import EditError, SpecError
from ._gate import ACTIVE, BEFORE_STOP, DEFERRAL, HOOK_KEYS
from ._values import replace_primary

__all__ = [
    "LIVE",
    "PROBES",
    "unwind",
    "Insert",
    "Interceptor",
    "OpSite",
    "Operand",
    "Pattern",
    "Probe",
    "op_name",
    "parse_op",
]

# Names users write for functions torch reports under another name.
_ALIASES = {"sdpa": "scaled_dot_product_attention"}


def op_name(func: Callable[..., Any]) -> str:
    """The name an op site uses for a torch function: ``softmax`` for ``torch.softmax``,
    ``F.softmax`` and ``Tensor.softmax``; ``matmul`` for ``@`` too."""
    name = getattr(func, "__name__", "")
    return name[2:-2] if name.startswith("__") and name.endswith("__") else name


def parse_op(text: str, key: str) -> tuple[str, int | None]:
    """``"softmax"`` -> ("softmax", None); ``"matmul.1"`` -> ("matmul", 1)."""
    name, _, index = text.partition(".")
    if name.startswith("__") and name.endswith("__"):  # (``__matmul__`` is ``matmul``)
        name = name[2:-2]
    name = _ALIASES.get(name, name)
    if not name.isidentifier() or (index and not index.isdigit()):
        raise SpecError(
            f"op site {key!r}: after ':' comes a torch function's name, and optionally which "
            "of its calls inside one call of the module (from 0): 'softmax', 'matmul.1', "
            "'scaled_dot_product_attention' (or 'sdpa')."
        )
    return name, int(index) if index else None


class Probe(nn.Module):
    """A value passing through a site: the identity, hooked by the runs that name it."""

    def forward(self, x: Any) -> Any:
        return x


class OpSite(nn.Module):
    """Calls of one torch function inside a module (every call, or the ``index``-th of each
    call of the module). Its input is the call's arguments, its output the result."""

    def __init__(self, op: str, index: int | None) -> None:
        super().__init__()
        self.op = op
        self.index = index
        self._func = threading.local()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._func.value(*args, **kwargs)

    def through(self, func: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self._func.value = func
        return self(*args, **kwargs)

    def extra_repr(self) -> str:
        return self.op if self.index is None else f"{self.op}.{self.index}"


class Pattern(Probe):
    """The attention pattern: softmax weights ``[batch, heads, query, key]``."""


class Operand(Probe):
    """``q``, ``k`` or ``v``: an argument of ``scaled_dot_product_attention``
    (``[batch, heads, positions, head width]``)."""

    def __init__(self, which: str) -> None:
        super().__init__()
        self.which = which

    def extra_repr(self) -> str:
        return self.which


class Insert(Probe):
    """A value at a module's input or output (``where``), split into ``heads`` heads on the
    last dim for the probe (``[batch, positions, heads, head width]``) where given."""

    def __init__(self, where: str, heads: int | None = None) -> None:
        super().__init__()
        self.where = where
        self.heads = heads

    def extra_repr(self) -> str:
        return self.where + (f", heads={self.heads}" if self.heads else "")

    def through(self, x: Tensor) -> Tensor:
        if self.heads is None:
            return self(x)  # type: ignore[no-any-return]
        if x.shape[-1] % self.heads:
            raise EditError(
                f"the value is {tuple(x.shape)}: its last dim does not split into "
                f"{self.heads} heads."
            )
        y: Tensor = self(rearrange(x, "... (h d) -> ... h d", h=self.heads))
        return rearrange(y, "... h d -> ... (h d)")


_SDPA = "scaled_dot_product_attention"
_NO_KEY = 0  # (hookfn's hook keys are negative)

PROBES = (OpSite, Probe)
"""The kinds of grafted modules an `Interceptor` calls."""

LIVE = [0]
"""How many interceptors are registered now: where none is, no function mode of an op site
can be on any stack, and runs skip looking (see `unwind`)."""


def explicit_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    pattern: Callable[[Tensor], Tensor],
) -> Tensor:
    """``F.scaled_dot_product_attention`` written out, its softmax weights passed through
    ``pattern`` (which may edit them) before they weigh the values."""
    n_query, n_key = query.size(-2), key.size(-2)
    if scale is None:
        scale = 1.0 / math.sqrt(query.size(-1))
    if enable_gqa and key.size(-3) != query.size(-3):
        groups = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = (query @ key.transpose(-2, -1)) * scale
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()  # (the mask and the softmax in float32, as eager attention)
    blocked = None  # True where a query may not see a key (broadcasts with the scores)
    if is_causal:
        blocked = ~torch.ones(n_query, n_key, dtype=torch.bool, device=query.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            masked = ~attn_mask
        else:
            scores = scores + attn_mask.to(scores.dtype)
            masked = torch.isneginf(attn_mask)
        blocked = masked if blocked is None else masked | blocked
    if blocked is None:
        weights = torch.softmax(scores, dim=-1)
    else:
        # A query that may see no key (left padding) gets zero weights, as in the fused
        # attention (a softmax over only -inf would be NaN, in its gradient too).
        empty = blocked.all(dim=-1, keepdim=True)
        scores = scores.masked_fill(blocked, float("-inf")).masked_fill(empty, 0.0)
        weights = torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
    weights = weights.to(value.dtype)
    weights = pattern(weights)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    bound = dict(zip(_SDPA_ARGS, args, strict=False))
    bound.update(kwargs)
    return bound


_CALL_IMPL = nn.Module._call_impl.__code__


def _called_by(host: nn.Module) -> bool:
    """Whether the torch function being called is called by ``host``'s forward itself, not
    inside one of its submodules (the innermost module call on the stack is ``host``'s)."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _CALL_IMPL:
            return frame.f_locals.get("self") is host
        frame = frame.f_back
    return False


def unwind(depth: int) -> None:
    """Leave the function modes of op sites above ``depth`` on this thread's stack: those of
    forwards that a `BaseException` (a ``stop_early`` stop, an interrupt) cut short, which
    PyTorch's always-called hooks do not see."""
    while torch._C._len_torch_function_stack() > depth:
        top = torch._C._get_function_stack_at(torch._C._len_torch_function_stack() - 1)
        if not isinstance(top, _Mode):
            return  # (someone else's: left as it is)
        top.__exit__(None, None, None)  # type: ignore[no-untyped-call]
        stack = getattr(top.interceptor._modes, "stack", None)
        if stack and top in stack:
            stack.remove(top)


BEFORE_STOP.append(unwind)


class _Mode(TorchFunctionMode):
    """The function mode of one call of a host module: routes the calls of the ops its
    interceptor watches through their probes."""

    def __init__(self, interceptor: Interceptor) -> None:
        super().__init__()
        self.interceptor = interceptor
        self.counts: dict[str, int] = {}

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        name = op_name(func)
        interceptor = self.interceptor
        if (
            name not in interceptor.watched
            or interceptor._modes.stack[-1] is not self  # (a call of the host inside it)
            or not _called_by(interceptor.host)
        ):
            return func(*args, **kwargs)
        call = self.counts.get(name, 0)
        self.counts[name] = call + 1
        DEFERRAL.depth += 1
        try:
            return interceptor.route(name, call, func, args, kwargs)
        finally:
            DEFERRAL.depth -= 1


class Interceptor:
    """The op sites and probes of one host module for one run (see the module docstring)."""

    def __init__(self, host: nn.Module, token: object) -> None:
        self.host = host
        self.token = token
        self.ops: list[OpSite] = []
        self.patterns: list[Pattern] = []
        self.operands: list[Operand] = []
        self.inputs: list[Insert] = []
        self.outputs: list[Insert] = []
        self.watched: set[str] = set()
        self.keys: list[tuple[dict[int, Any], int]] = []
        self._modes = threading.local()

    def add(self, probe: nn.Module) -> None:
        if isinstance(probe, OpSite):
            self.ops.append(probe)
            self.watched.add(probe.op)
        elif isinstance(probe, Pattern):
            self.patterns.append(probe)
            self.watched.update((_SDPA, "softmax"))
        elif isinstance(probe, Operand):
            self.operands.append(probe)
            self.watched.add(_SDPA)
        elif isinstance(probe, Insert):
            (self.inputs if probe.where == "input" else self.outputs).append(probe)

    # -- registration (the caller holds `hookfn._gate.REGISTRY`) --------------------------

    def register(self) -> None:
        host = self.host
        LIVE[0] += 1
        self.keys.append((host._forward_hooks, _NO_KEY))  # (undone by `remove` with LIVE)
        if self.inputs:  # the values at the input: before the module's other pre-hooks
            key = next(HOOK_KEYS)
            self.keys.append((host._forward_pre_hooks, key))
            host._forward_pre_hooks_with_kwargs[key] = True
            host._forward_pre_hooks[key] = self._insert_inputs
            _first(host._forward_pre_hooks, key)
        if self.watched:  # the mode: after them, so that only the forward's calls count
            key = next(HOOK_KEYS)
            self.keys.append((host._forward_pre_hooks, key))
            host._forward_pre_hooks[key] = self._enter
        if self.watched or self.outputs:  # left before the module's other forward hooks
            key = next(HOOK_KEYS)
            self.keys.append((host._forward_hooks, key))
            host._forward_hooks_always_called[key] = True
            host._forward_hooks[key] = self._leave
            _first(host._forward_hooks, key)

    def remove(self) -> None:
        host = self.host
        while self.keys:
            hooks, key = self.keys[-1]
            if key == _NO_KEY:
                LIVE[0] -= 1
            else:
                hooks.pop(key, None)
                host._forward_pre_hooks_with_kwargs.pop(key, None)
                host._forward_hooks_always_called.pop(key, None)
            self.keys.pop()
        self._modes.stack = []  # (modes of cut-short forwards: see `unwind`)

    # -- the hooks ---------------------------------------------------------------------

    def _enter(self, module: nn.Module, args: Any) -> None:
        stack = getattr(self._modes, "stack", None)
        if stack is None:
            stack = self._modes.stack = []
        mode = _Mode(self) if self.token in ACTIVE.get() else None
        stack.append(mode)
        if mode is not None:
            mode.__enter__()  # type: ignore[no-untyped-call]

    def _insert_inputs(self, module: nn.Module, args: Any, kwargs: Any = None) -> Any:
        if self.token not in ACTIVE.get():
            return None
        value = Args._of(args, kwargs or {})
        x = primary(value)
        if x is None:
            return None
        for probe in self.inputs:
            x = probe.through(x)
        new = replace_primary(value, x)
        return new.args, new.kwargs

    def _leave(self, module: nn.Module, args: Any, output: Any) -> Any:
        if self.watched:
            stack = getattr(self._modes, "stack", None)
            mode = stack.pop() if stack else None
            if mode is not None:
                mode.__exit__(None, None, None)
            if DEFERRAL.stops and not DEFERRAL.depth:  # a stop_early stop from an op site
                stop, depth = DEFERRAL.stops.pop()
                DEFERRAL.stops.clear()
                unwind(depth)
                raise stop
        if not (self.outputs and self.token in ACTIVE.get()):
            return None
        x = primary(output)
        if x is None:
            return None
        for probe in self.outputs:
            x = probe.through(x)
        return replace_primary(output, x)

    # -- what the function mode calls -----------------------------------------------------

    def route(
        self, name: str, call: int, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> Any:
        if name == _SDPA and (self.operands or self.patterns):
            bound = _sdpa_arguments(args, kwargs)
            self._as_heads(bound)
            for probe in self.operands:
                field = {"q": "query", "k": "key", "v": "value"}[probe.which]
                bound[field] = probe(bound[field])
            if self.patterns:
                func = lambda **kw: explicit_attention(**kw, pattern=self._pattern)  # noqa: E731
            args, kwargs = (), bound
        elif name == "softmax" and self.patterns and call == 0:
            return self._pattern(self._through_ops(name, call, func, args, kwargs))
        return self._through_ops(name, call, func, args, kwargs)

    def _as_heads(self, bound: dict[str, Any]) -> None:
        """The arguments of a grouped-query attention in one layout, whatever transformers
        chose for the call: the query of every head ``[batch, heads, L, d]``, the keys and
        values of the key/value heads ``[batch, kv heads, S, d]`` (``enable_gqa``).

        transformers passes the keys and values repeated to every head for longer queries
        with a mask, packs a one-token query into the key/value heads (``[batch, kv heads,
        groups, d]``, and its mask alike), or passes ``enable_gqa``; the three compute the
        same as this layout, which the sites see in every step."""
        groups = getattr(self.host, "num_key_value_groups", 1)
        heads = getattr(getattr(self.host, "config", None), "num_attention_heads", None)
        query, key = bound["query"], bound["key"]
        if not (isinstance(groups, int) and groups > 1 and isinstance(heads, int)):
            return
        if query.dim() != 4 or key.dim() != 4 or heads % groups:
            return
        if bound.get("enable_gqa", False):
            return
        kv_heads = heads // groups
        if query.size(1) == kv_heads and key.size(1) == kv_heads and query.size(2) == groups:
            batch, _, _, width = query.shape  # packed: one token of every head
            bound["query"] = query.reshape(batch, heads, 1, width)
            mask = bound.get("attn_mask")
            if isinstance(mask, Tensor) and mask.dim() == 4 and mask.size(1) == kv_heads > 1:
                bound["attn_mask"] = mask.reshape(mask.size(0), heads, 1, mask.size(-1))
        elif query.size(1) == heads and key.size(1) == heads:  # repeated to every head
            bound["key"] = key[:, ::groups]
            bound["value"] = bound["value"][:, ::groups]
        else:
            return
        bound["enable_gqa"] = True

    def _pattern(self, weights: Tensor) -> Tensor:
        for probe in self.patterns:  # (several keys may name the same pattern)
            weights = probe(weights)
        return weights

    def _through_ops(
        self, name: str, call: int, func: Callable[..., Any], args: Any, kwargs: dict[str, Any]
    ) -> Any:
        for site in self.ops:
            if site.op == name and (site.index is None or site.index == call):
                inner = func
                func = lambda *a, _s=site, _f=inner, **k: _s.through(_f, a, k)  # noqa: E731
        return func(*args, **kwargs)


def _first(hooks: dict[int, Any], key: int) -> None:
    """Move ``key`` to the front of a hook dict (it runs before the module's other hooks)."""
    if len(hooks) > 1:
        value = hooks.pop(key)
        rest = list(hooks.items())
        hooks.clear()
        hooks[key] = value
        hooks.update(rest)
