"""`Capture`: the immutable record of what one layer saw during a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor

from ._errors import CaptureError

__all__ = [
    "Args",
    "Capture",
    "primary",
]


class Args:
    """Positional and keyword arguments: of one call of a module, or for calling a model.

    ``run_with_hooks(model, Args(ids, attention_mask=mask), spec)`` calls
    ``model(ids, attention_mask=mask)``; a capture's ``.raw_input`` is an `Args` too.

    Examples:
        >>> a = Args(1, 2, scale=3)
        >>> a.args, dict(a.kwargs)
        ((1, 2), {'scale': 3})
    """

    __slots__ = ("args", "kwargs")
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]

    def __init__(self, /, *args: Any, **kwargs: Any) -> None:
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", kwargs)

    @classmethod
    def _of(cls, args: tuple[Any, ...], kwargs: Mapping[str, Any] | None) -> Args:
        """``Args(*args, **kwargs)`` from a hook's arguments, without unpacking them."""
        self = object.__new__(cls)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "kwargs", {} if kwargs is None else kwargs)
        return self

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Args is immutable")

    def __eq__(self, other: object) -> bool:
        # Tensors compare by value (torch.equal), so two calls with equal inputs are equal.
        if not isinstance(other, Args):
            return NotImplemented
        return (
            _tree_equal(self.args, other.args)
            and self.kwargs.keys() == other.kwargs.keys()
            and all(_tree_equal(v, other.kwargs[k]) for k, v in self.kwargs.items())
        )

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt through the constructor (the default would set the slots one by one), so
        # that captures can be pickled, deep-copied and saved with torch.save.
        return (_rebuild_args, (self.args, dict(self.kwargs)))

    def __repr__(self) -> str:
        items = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"Args({', '.join(items)})"


def _rebuild_args(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Args:
    return Args(*args, **kwargs)


def _tree_equal(a: object, b: object) -> bool:
    """Structural equality in which tensors compare by shape, dtype, device and value."""
    if a is b:
        return True
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if x is y:
            continue
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            if not (
                isinstance(x, Tensor)
                and isinstance(y, Tensor)
                and x.shape == y.shape
                and x.dtype == y.dtype
                and x.device == y.device
                and torch.equal(x, y)
            ):
                return False
            continue
        if isinstance(x, Args) and isinstance(y, Args):
            if x != y:
                return False
            continue
        try:
            if not bool(x == y):
                return False
        except (TypeError, ValueError, RuntimeError):
            return False
    return True


def primary(value: object) -> Tensor | None:
    """The *primary tensor* of a module's output or input: the one rule for structures.

    - a tensor is its own primary tensor;
    - a tuple or list: its first element, if that is a tensor (attention modules return
      ``(out, weights)``);
    - a mapping or a transformers ``ModelOutput``: its first value, if that is a tensor
      (``last_hidden_state``, ``logits``);
    - `Args`: the first positional argument, else the first keyword argument, by the same
      rule.

    Captures expose the primary tensor as ``.output`` / ``.input`` and edits receive it; the
    whole structure stays reachable as ``.raw_output`` / ``.raw_input``.

    Examples:
        >>> import torch
        >>> out = torch.ones(2, 3)
        >>> primary((out, None)) is out, primary(out) is out
        (True, True)
    """
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)):
        first = value[0] if value else None
        return first if isinstance(first, Tensor) else None
    if isinstance(value, Args):
        if value.args:
            return primary(value.args[0])
        for item in value.kwargs.values():
            return primary(item)
        return None
    if isinstance(value, Mapping):
        for item in value.values():
            return item if isinstance(item, Tensor) else None
    return None


def _one(name: str, what: str, values: tuple[Any, ...], plural: str, hint: str) -> Any:
    if len(values) == 1:
        return values[0]
    if not values:
        raise CaptureError(f"layer {name!r} recorded no {what}: {_op_hint(name, hint)}")
    raise CaptureError(
        f"layer {name!r} was called {len(values)} times in this run, so its {what} is "
        f"ambiguous; use .{plural}[i] for call i (e.g. .{plural}[-1] for the last) or "
        f"torch.stack(capture.{plural})."
    )


def _primary_of(name: str, what: str, value: object) -> Tensor:
    tensor = primary(value)
    if tensor is None:
        raise CaptureError(
            f"the {what} of layer {name!r} is a {type(value).__name__} with no primary "
            f"tensor; read .raw_{what} for the whole value."
        )
    return tensor


class Capture:
    """What one layer recorded during a run: one entry per call of the module.

    A capture is an immutable value and a pytree node, so it can be returned through
    `torch.func` transforms. The singular accessors (``.output``, ``.input``,
    ``.grad_output``, ``.grad_input``) give the primary tensor of the only call and raise a
    `CaptureError` when the module ran more or fewer than once; the plural ones give every
    call in order. Two captures are equal when they hold the same name and structure and
    their tensors are equal (`torch.equal`); like the tensors they hold, they are not
    hashable.

    Args:
        name: The layer name.
        raw_outputs: What the module returned in each call (after the edit, if any).
        raw_inputs: The arguments of each call (after the input edit, if any).
        grad_outputs: The gradient with respect to each call's primary output tensor.
        grad_inputs: The gradient with respect to each call's primary input tensor.

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
        >>> _, caches = run_with_hooks(model, torch.randn(2, 4), ["0"])
        >>> caches["0"].output.shape, caches["0"].n_calls
        (torch.Size([2, 3]), 1)
    """

    # A plain class whose fields are read-only properties over private slots, not a frozen
    # dataclass: every run makes one per hooked layer, and a frozen dataclass can only set
    # its fields through object.__setattr__, which costs several times these assignments.
    __slots__ = ("_grad_inputs", "_grad_outputs", "_layout", "_name", "_raw_inputs", "_raw_outputs")

    def __init__(
        self,
        name: str,
        raw_outputs: tuple[Any, ...] = (),
        raw_inputs: tuple[Args, ...] = (),
        grad_outputs: tuple[Tensor | None, ...] = (),
        grad_inputs: tuple[Tensor | None, ...] = (),
    ) -> None:
        self._name = name
        self._raw_outputs = raw_outputs
        self._raw_inputs = raw_inputs
        self._grad_outputs = grad_outputs
        self._grad_inputs = grad_inputs
        # Which leaves are pytree children, for a capture rebuilt by `_unflatten` (see there).
        self._layout: Any = None

    @property
    def name(self) -> str:
        """The layer name."""
        return self._name

    @property
    def raw_outputs(self) -> tuple[Any, ...]:
        """What the module returned in each call (after the edit, if any)."""
        return self._raw_outputs

    @property
    def raw_inputs(self) -> tuple[Args, ...]:
        """The arguments of each call (after the input edit, if any)."""
        return self._raw_inputs

    @property
    def grad_outputs(self) -> tuple[Tensor | None, ...]:
        """The gradient with respect to each call's primary output tensor."""
        return self._grad_outputs

    @property
    def grad_inputs(self) -> tuple[Tensor | None, ...]:
        """The gradient with respect to each call's primary input tensor."""
        return self._grad_inputs

    __hash__ = None  # type: ignore[assignment]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Capture):
            return NotImplemented
        return (
            self.name == other.name
            and _tree_equal(self.raw_outputs, other.raw_outputs)
            and len(self.raw_inputs) == len(other.raw_inputs)
            and all(a == b for a, b in zip(self.raw_inputs, other.raw_inputs, strict=True))
            and _tree_equal(self.grad_outputs, other.grad_outputs)
            and _tree_equal(self.grad_inputs, other.grad_inputs)
        )

    @property
    def n_calls(self) -> int:
        """How many calls of the module were recorded."""
        return max(len(self.raw_outputs), len(self.raw_inputs))

    @property
    def raw_output(self) -> Any:
        """The whole output of the only call, as the module returned it."""
        return _one(self.name, "output", self.raw_outputs, "raw_outputs", _NO_OUTPUT)

    @property
    def outputs(self) -> tuple[Tensor, ...]:
        """The primary output tensor of every call, in call order."""
        return tuple(_primary_of(self.name, "output", v) for v in self.raw_outputs)

    @property
    def output(self) -> Tensor:
        """The primary output tensor of the only call (see `primary`)."""
        raw = self._only("output", self.raw_outputs, "outputs", _NO_OUTPUT)
        return _primary_of(self.name, "output", raw)

    @property
    def prompt_output(self) -> Tensor:
        """The primary output tensor of the first call: the prompt (prefill) forward of a
        ``model.generate`` run (docs/generation.md)."""
        return self._calls("output", self.raw_outputs, _NO_OUTPUT)[0]

    @property
    def step_outputs(self) -> tuple[Tensor, ...]:
        """The primary output tensors of every call after the first: one per generated
        token fed through the model in a ``model.generate`` run (docs/generation.md)."""
        return self._calls("output", self.raw_outputs, _NO_OUTPUT)[1:]

    def joined_output(self, dim: int = 1) -> Tensor:
        """Every call's primary output tensor joined along ``dim`` (the sequence dimension
        of a ``[batch, seq, ...]`` activation by default).

        For ``model.generate`` with the KV cache (the prompt, then one token per call) this
        is the activation over the whole generated text but its last token, as one forward
        without the cache computes it (docs/generation.md).

        Raises:
            CaptureError: no call was recorded; the calls do not fit together along ``dim``;
                or the calls overlap: each one runs the whole sequence so far, as
                ``generate(use_cache=False)`` does (read ``.outputs[-1]`` then).
        """
        return self._joined("output", self.raw_outputs, dim, _NO_OUTPUT)

    def joined_input(self, dim: int = 1) -> Tensor:
        """Every call's primary input tensor joined along ``dim``; see `joined_output`."""
        return self._joined("input", self.raw_inputs, dim, _NO_INPUT)

    @property
    def raw_input(self) -> Args:
        """The positional and keyword arguments of the only call."""
        return _one(self.name, "input", self.raw_inputs, "raw_inputs", _NO_INPUT)  # type: ignore[no-any-return]

    @property
    def inputs(self) -> tuple[Tensor, ...]:
        """The primary input tensor of every call, in call order."""
        return tuple(_primary_of(self.name, "input", v) for v in self.raw_inputs)

    @property
    def input(self) -> Tensor:
        """The primary input tensor of the only call: its first argument."""
        raw = self._only("input", self.raw_inputs, "inputs", _NO_INPUT)
        return _primary_of(self.name, "input", raw)

    @property
    def grad_output(self) -> Tensor:
        """The gradient with respect to the primary output of the only call."""
        grad = _one(self.name, "grad_output", self.grad_outputs, "grad_outputs", _NO_GRAD)
        if grad is None:
            raise CaptureError(f"layer {self.name!r}: {_NO_GRAD}")
        return grad  # type: ignore[no-any-return]

    @property
    def grad_input(self) -> Tensor:
        """The gradient with respect to the primary input of the only call."""
        grad = _one(self.name, "grad_input", self.grad_inputs, "grad_inputs", _NO_GRAD)
        if grad is None:
            raise CaptureError(f"layer {self.name!r}: {_NO_GRAD}")
        return grad  # type: ignore[no-any-return]

    def _only(self, what: str, values: tuple[Any, ...], plural: str, hint: str) -> Any:
        """The only call's value, or a `CaptureError` whose hint fits the calls' shapes."""
        if len(values) <= 1:
            return _one(self.name, what, values, plural, hint)
        shapes = [None if (t := primary(v)) is None else tuple(t.shape) for v in values]
        if all(shape == shapes[0] for shape in shapes):
            how = f"torch.stack(capture.{plural}) for all of them"
        else:
            how = (
                f"capture.joined_{what}() for the calls joined along the sequence dimension "
                f"(generate with the KV cache: prompt_{what} and then step_{what}s), as they "
                "have different shapes"
            )
        raise CaptureError(
            f"layer {self.name!r} was called {len(values)} times in this run, so its {what} "
            f"is ambiguous; use .{plural}[i] for call i (e.g. .{plural}[-1] for the last) or "
            f"{how}."
        )

    def _calls(self, what: str, values: tuple[Any, ...], hint: str) -> tuple[Tensor, ...]:
        if not values:
            raise CaptureError(
                f"layer {self.name!r} recorded no {what}: {_op_hint(self.name, hint)}"
            )
        return tuple(_primary_of(self.name, what, v) for v in values)

    def _joined(self, what: str, values: tuple[Any, ...], dim: int, hint: str) -> Tensor:
        tensors = self._calls(what, values, hint)
        first = tensors[0]
        if not -first.dim() <= dim < first.dim():
            raise CaptureError(
                f"layer {self.name!r}: the {what} has shape {tuple(first.shape)}, which has "
                f"no dimension {dim} to join along; pass dim=."
            )
        sizes = [t.shape[dim] for t in tensors]
        growing = all(sizes[i + 1] == sizes[i] + 1 for i in range(len(sizes) - 1))
        if len(sizes) > 1 and sizes[1] > 1 and growing:
            raise CaptureError(
                f"layer {self.name!r}: the {len(sizes)} calls overlap (sizes {sizes} along "
                f"dimension {dim}): each runs the whole sequence so far, as generate without "
                f"the KV cache does, so .{what}s[-1] already holds the joined sequence."
            )
        d = dim % first.dim()
        rest = [tuple(s for i, s in enumerate(t.shape) if i != d) for t in tensors]
        if any(r != rest[0] or t.dim() != first.dim() for r, t in zip(rest, tensors, strict=True)):
            raise CaptureError(
                f"layer {self.name!r}: the calls' {what}s have shapes "
                f"{[tuple(t.shape) for t in tensors]}, which do not fit together along "
                f"dimension {dim}."
            )
        return torch.cat(tensors, dim=dim)

    def __repr__(self) -> str:
        parts = [repr(self.name), f"calls={self.n_calls}"]
        for what, values in (("output", self.raw_outputs), ("input", self.raw_inputs)):
            if len(values) == 1:
                parts.append(f"{what}={_describe(values[0])}")
            elif values:
                # Every call, runs of equal descriptions counted: [(2, 5, 32), (2, 1, 32) x5]
                runs: list[list[Any]] = []
                for value in values:
                    text = _describe(value)
                    if runs and runs[-1][0] == text:
                        runs[-1][1] += 1
                    else:
                        runs.append([text, 1])
                shown = ", ".join(t if n == 1 else f"{t} x{n}" for t, n in runs)
                parts.append(f"{what}s=[{shown}]")
        if any(g is not None for g in self.grad_outputs):
            parts.append("grad_output")
        if any(g is not None for g in self.grad_inputs):
            parts.append("grad_input")
        return f"Capture({', '.join(parts)})"


_NO_OUTPUT = (
    "either its output was not captured (pass retain_output=True / Hook(output=True)) or the "
    "module was not called during the run."
)
_NO_INPUT = (
    "either its input was not captured (pass retain_input=True / Hook(input=True)) or the "
    "module was not called during the run."
)


def _op_hint(name: str, hint: str) -> str:
    if ":" not in name:
        return hint
    return (
        f"{hint} An op site records the calls its module makes itself: list them with "
        "hookfn.layers(model, inputs, ops=True) (':q', ':k', ':v' and ':pattern' read an "
        "attention's scaled_dot_product_attention or softmax call)."
    )


_NO_GRAD = (
    "no gradient was recorded; ask for it with Hook(grad=True) and run a backward pass "
    "through the layer's output (e.g. run_with_hooks(..., backward=metric))."
)


def _describe(value: object) -> str:
    tensor = primary(value)
    if tensor is None:
        return type(value).__name__
    text = f"{tuple(tensor.shape)}"
    return text if isinstance(value, Tensor) else f"{type(value).__name__}[{text}, ...]"


class _TensorSlot:
    """Marks where a tensor goes back when a flattened `Capture` is rebuilt."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<tensor>"


_TENSOR_SLOT = _TensorSlot()


def _flatten(capture: Capture) -> tuple[list[Any], tuple[Any, ...]]:
    # Only tensors are children. Everything else a capture holds (a ``None`` weight slot of an
    # attention output, absent gradients, keyword flags, cache objects) travels in the
    # context, because torch.func transforms (vmap, grad's aux) accept tensor leaves only.
    # A capture rebuilt from children of another kind (pytree utilities unflatten with
    # placeholders, e.g. vmap's out_dims) keeps the layout it was rebuilt with.
    fields = (capture.raw_outputs, capture.raw_inputs, capture.grad_outputs, capture.grad_inputs)
    leaves, spec = pytree.tree_flatten(fields)
    layout = capture._layout
    if layout is not None and layout[0] == spec:
        is_child = layout[1]
    else:
        is_child = tuple(isinstance(leaf, Tensor) for leaf in leaves)
    pairs = list(zip(leaves, is_child, strict=True))
    children = [leaf for leaf, child in pairs if child]
    others = tuple(_TENSOR_SLOT if child else leaf for leaf, child in pairs)
    return children, (capture.name, spec, others)


def _unflatten(children: Any, context: Any) -> Capture:
    name, spec, others = context
    values = iter(children)
    leaves = [next(values) if leaf is _TENSOR_SLOT else leaf for leaf in others]
    raw_outputs, raw_inputs, grad_outputs, grad_inputs = pytree.tree_unflatten(leaves, spec)
    capture = Capture(
        name, tuple(raw_outputs), tuple(raw_inputs), tuple(grad_outputs), tuple(grad_inputs)
    )
    capture._layout = (spec, tuple(o is _TENSOR_SLOT for o in others))
    return capture


def _flatten_inputs(inputs: Args) -> tuple[list[Any], None]:
    return [inputs.args, dict(inputs.kwargs)], None


def _unflatten_inputs(children: Any, context: Any) -> Args:
    args, kwargs = children
    return Args(*args, **kwargs)


pytree.register_pytree_node(Capture, _flatten, _unflatten, serialized_type_name="hookfn.Capture")
pytree.register_pytree_node(
    Args, _flatten_inputs, _unflatten_inputs, serialized_type_name="hookfn.Args"
)
