"""`Hook`: the one frozen record every spec value is normalized into."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from typing_extensions import TypeAlias

from ._edits import Edit, EditLike, Function, as_edit
from ._errors import SpecError

__all__ = ["CAPTURE", "Hook", "SpecValue", "to_hook"]


@dataclass(frozen=True, slots=True)
class Hook:
    """What to do at one layer: what to capture, which edits to apply, capture options.

    Every spec value becomes a `Hook` once, before anything is registered. ``"capture"`` is
    ``Hook()``; an edit ``e`` is ``Hook(e)``; the DeepHook tuple
    ``(retain_output, retain_input, edit_fn)`` is
    ``Hook(edit_fn, output=retain_output, input=retain_input)``.

    Captures record the value *after* the edit at the same place, i.e. what the rest of the
    computation sees (for gradients: what flows on into the module).

    Args:
        edit: Edit of the module's primary output tensor.
        output: Capture the output.
        input: Capture the input (all positional and keyword arguments).
        grad: Capture the gradient with respect to the primary output tensor.
        grad_input: Capture the gradient with respect to the primary input tensor.
        edit_input: Edit of the primary input tensor, before the module runs.
        edit_grad: Edit of the gradient flowing back into the module's output.
        detach: Captured tensors are detached from the autograd graph.
        clone: Captured tensors are copies, safe from later in-place operations of the
            model. ``clone=False`` stores references: cheaper, but an in-place op that
            follows the module (``ReLU(inplace=True)``) changes what was captured.
        device: Move captured tensors to this device as they are taken (e.g. ``"cpu"``).
        dtype: Cast captured floating-point tensors to this dtype as they are taken.
        whole: The edits receive and return the whole structure instead of its primary
            tensor: ``edit`` the module's output as it returned it (a tuple, a
            ``ModelOutput``), ``edit_input`` an `Args` of every positional and keyword
            argument. Nothing checks what they return: it replaces the value as it is (a
            new batch size, another structure), and ``None`` keeps it.
        part: What a capture keeps of the primary tensor, taken before it is copied, so
            only the part is ever copied: an index (``x[part]``: ``(slice(None), -1)`` for
            the last position, a list or tensor of positions, a bool mask), or a function
            ``x -> tensor`` (a reduction such as ``lambda x: x.mean(1)``). The capture then
            holds that tensor in place of the whole output (or input).

    Examples:
        >>> from hookfn import Hook, add
        >>> Hook(add(1.0), input=True)
        Hook(edit=add(1.0), input=True)
    """

    edit: Edit | None = None
    output: bool = field(default=True, kw_only=True)
    input: bool = field(default=False, kw_only=True)
    grad: bool = field(default=False, kw_only=True)
    grad_input: bool = field(default=False, kw_only=True)
    edit_input: Edit | None = field(default=None, kw_only=True)
    edit_grad: Edit | None = field(default=None, kw_only=True)
    detach: bool = field(default=True, kw_only=True)
    clone: bool = field(default=True, kw_only=True)
    device: torch.device | None = field(default=None, kw_only=True)
    dtype: torch.dtype | None = field(default=None, kw_only=True)
    whole: bool = field(default=False, kw_only=True)
    part: Any = field(default=None, kw_only=True)
    # What the hook path does at this site, decided once here (see `hookfn._hooks`).
    edits_output: bool = field(default=False, init=False, repr=False, compare=False)
    after_output: bool = field(default=True, init=False, repr=False, compare=False)
    edits_input: bool = field(default=False, init=False, repr=False, compare=False)
    after_input: bool = field(default=False, init=False, repr=False, compare=False)
    records: bool = field(default=True, init=False, repr=False, compare=False)
    captures_only: bool = field(default=True, init=False, repr=False, compare=False)
    wants_grad: bool = field(default=False, init=False, repr=False, compare=False)
    plain_copy: bool = field(default=True, init=False, repr=False, compare=False)

    def __init__(
        self,
        edit: EditLike | None = None,
        *,
        output: bool = True,
        input: bool = False,
        grad: bool = False,
        grad_input: bool = False,
        edit_input: EditLike | None = None,
        edit_grad: EditLike | None = None,
        detach: bool = True,
        clone: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        whole: bool = False,
        part: Any = None,
    ) -> None:
        for flag_name, flag in (
            ("output", output),
            ("input", input),
            ("grad", grad),
            ("grad_input", grad_input),
            ("detach", detach),
            ("clone", clone),
            ("whole", whole),
        ):
            if not isinstance(flag, bool):
                raise SpecError(f"Hook({flag_name}=...) takes True or False, got {flag!r}.")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise SpecError(f"Hook(dtype=...) takes a torch.dtype, got {dtype!r}.")
        if device is not None:
            device = _device(device)
        setattr_ = object.__setattr__
        setattr_(self, "edit", None if edit is None else as_edit(edit, where="Hook(edit=...)"))
        setattr_(self, "output", output)
        setattr_(self, "input", input)
        setattr_(self, "grad", grad)
        setattr_(self, "grad_input", grad_input)
        setattr_(
            self,
            "edit_input",
            None if edit_input is None else as_edit(edit_input, where="Hook(edit_input=...)"),
        )
        setattr_(
            self,
            "edit_grad",
            None if edit_grad is None else as_edit(edit_grad, where="Hook(edit_grad=...)"),
        )
        setattr_(self, "detach", detach)
        setattr_(self, "clone", clone)
        setattr_(self, "device", device)
        setattr_(self, "dtype", dtype)
        if whole:
            for what, given in (("edit", self.edit), ("edit_input", self.edit_input)):
                if given is not None and not isinstance(given, Function):
                    raise SpecError(
                        f"Hook({what}={given!r}, whole=True): a whole-structure edit is a "
                        "plain function of the whole output (or Args); the edit combinators "
                        "take the primary tensor. Restrict the combinator to the tensor you "
                        "mean inside your function, or leave whole=False."
                    )
        setattr_(self, "whole", whole)
        if part is not None and not callable(part) and not _is_index(part):
            raise SpecError(
                f"Hook(part=...) takes an index (an int, a slice, a tuple of them, a list or "
                f"tensor of positions, a bool mask) or a function x -> tensor; got {part!r}."
            )
        setattr_(self, "part", part)
        self._set_roles()

    def _set_roles(self) -> None:
        setattr_ = object.__setattr__
        edits_output = self.edit is not None
        wants_grad = self.grad or self.edit_grad is not None
        setattr_(self, "edits_output", edits_output)
        setattr_(self, "after_output", self.output or wants_grad)
        setattr_(self, "edits_input", self.edit_input is not None)
        setattr_(self, "after_input", self.input or self.grad_input)
        setattr_(self, "records", self.output or self.input or self.grad_input or wants_grad)
        setattr_(self, "wants_grad", wants_grad)
        setattr_(
            self,
            "captures_only",
            self.output
            and not (self.input or self.grad_input or wants_grad)
            and not edits_output
            and self.edit_input is None
            and self.part is None,
        )
        setattr_(
            self,
            "plain_copy",
            self.detach and self.clone and self.device is None and self.dtype is None,
        )

    @classmethod
    def of_edit(cls, edit: Edit) -> Hook:
        """``Hook(edit)`` for an `Edit` already checked: made for each run of a spec whose
        value is an edit, so without the argument checks."""
        self = object.__new__(cls)
        for name, value in _PLAIN_FIELDS:
            object.__setattr__(self, name, value)
        object.__setattr__(self, "edit", edit)
        self._set_roles()
        return self

    def __repr__(self) -> str:
        parts = []
        if self.edit is not None:
            parts.append(f"edit={self.edit!r}")
        for name in _FIELDS:
            value = getattr(self, name)
            if value != _DEFAULTS[name]:
                parts.append(f"{name}={value!r}")
        return f"Hook({', '.join(parts)})"

    @property
    def captures_forward(self) -> bool:
        """Whether the hook records anything during the forward pass."""
        return self.output or self.input


_FIELDS = (
    "output",
    "input",
    "grad",
    "grad_input",
    "edit_input",
    "edit_grad",
    "detach",
    "clone",
    "device",
    "dtype",
    "whole",
    "part",
)
_DEFAULTS: dict[str, Any] = {
    "output": True,
    "input": False,
    "grad": False,
    "grad_input": False,
    "edit_input": None,
    "edit_grad": None,
    "detach": True,
    "clone": True,
    "device": None,
    "dtype": None,
    "whole": False,
    "part": None,
}

_PLAIN_FIELDS = (("edit", None), *_DEFAULTS.items())


def _is_index(part: object) -> bool:
    """Whether ``part`` is an index expression ``x[part]`` accepts (checked loosely here:
    whether it fits the activation is known only when the hook runs)."""
    if isinstance(part, tuple):
        return all(_is_index(p) for p in part)
    if isinstance(part, bool):
        return False
    return part is Ellipsis or part is None or isinstance(part, (int, slice, list, torch.Tensor))


def _device(device: object) -> torch.device:
    if not isinstance(device, (str, int, torch.device)) or isinstance(device, bool):
        raise SpecError(
            f"Hook(device=...) takes a torch.device, a string such as 'cpu' or 'cuda:0', or "
            f"a device index; got {device!r} ({type(device).__name__})."
        )
    try:
        return torch.device(device)
    except (RuntimeError, ValueError, TypeError) as error:
        raise SpecError(
            f"Hook(device={device!r}) is not a device torch knows ({error}); use e.g. 'cpu' "
            "or 'cuda:0'."
        ) from None


SpecValue: TypeAlias = Union[
    Hook, str, tuple[bool, bool, Union[Callable[..., Any], None]], EditLike
]
"""A spec value: a `Hook`, ``"capture"``, a DeepHook tuple, or an edit."""

CAPTURE = Hook()
"""The hook of ``"capture"``: the output, copied and detached."""

_ACCEPTED = (
    "accepted values: 'capture'; an edit such as add(1.0) or a callable f(x) / f(x, site); "
    "the DeepHook tuple (retain_output, retain_input, edit_fn or None); or "
    "Hook(edit, output=..., input=..., grad=..., ...)"
)


def to_hook(value: object, key: str) -> Hook:
    """Normalize one spec value into a `Hook`.

    Raises:
        SpecError: The value is none of the accepted forms; the message names the key.
    """
    if isinstance(value, Hook):
        return value
    if isinstance(value, str):
        if value == "capture":
            return CAPTURE
        raise SpecError(f"spec[{key!r}] = {value!r} is not understood; {_ACCEPTED}.")
    if isinstance(value, tuple):
        if (
            len(value) == 3
            and isinstance(value[0], bool)
            and isinstance(value[1], bool)
            and (value[2] is None or callable(value[2]))
        ):
            retain_output, retain_input, edit = value
            return Hook(edit, output=retain_output, input=retain_input)
        raise SpecError(
            f"spec[{key!r}] = {value!r}: a tuple must be the DeepHook triple "
            f"(retain_output: bool, retain_input: bool, edit_fn or None); {_ACCEPTED}."
        )
    if isinstance(value, Edit):
        return Hook.of_edit(value)
    if callable(value):
        return Hook(as_edit(value, where=f"spec[{key!r}]"))
    raise SpecError(f"spec[{key!r}] = {value!r} ({type(value).__name__}); {_ACCEPTED}.")
