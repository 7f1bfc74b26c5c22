"""`Site`: the read-only description of where an edit runs."""

from __future__ import annotations

import weakref
from typing import Literal

from torch import nn
from typing_extensions import Self, TypeAlias

__all__ = ["Site", "SiteKind"]

SiteKind: TypeAlias = Literal["output", "input", "grad_output", "grad_input"]


_READ_ONLY = frozenset({"call", "kind", "module", "_module"})


class Site(str):
    """Where an edit runs: the layer name, which call of the module, and what is edited.

    A `Site` *is* the layer name (a `str` subclass), so a two-argument edit function written
    for the original DeepHook API, ``edit_fn(output, layer)``, receives the name it expects,
    while combinators can read the call index and the module.

    Attributes:
        name: The dotted layer name, as in the result dict.
        call: Which call of the module in this run (0 for the first).
        kind: What the edit receives: ``"output"``, ``"input"``, ``"grad_output"`` or
            ``"grad_input"``.
        module: The module itself (read it, never change it).

    ``call``, ``kind`` and ``module`` are read-only.

    Examples:
        >>> from torch import nn
        >>> site = Site("encoder.0", call=1, kind="output", module=nn.Identity())
        >>> site == "encoder.0", site.call, site.kind
        (True, 1, 'output')
    """

    call: int
    kind: SiteKind

    def __new__(cls, name: str, *, call: int, kind: SiteKind, module: nn.Module) -> Self:
        self = super().__new__(cls, name)
        set_ = object.__setattr__
        set_(self, "call", call)
        set_(self, "kind", kind)
        set_(self, "_module", module)
        return self

    @classmethod
    def _weak(cls, name: str, call: int, kind: SiteKind, module: nn.Module) -> Self:
        """A site that refers to its module weakly: kept with a plan between runs, it does
        not keep the model alive."""
        self = super().__new__(cls, name)
        set_ = object.__setattr__
        set_(self, "call", call)
        set_(self, "kind", kind)
        set_(self, "_module", weakref.ref(module))
        return self

    @property
    def module(self) -> nn.Module:
        """The module itself (read it, never change it)."""
        module = self.__dict__["_module"]
        return module if isinstance(module, nn.Module) else module()  # type: ignore[no-any-return]

    def __setattr__(self, name: str, value: object) -> None:
        if name in _READ_ONLY:
            raise AttributeError(f"Site.{name} is read-only")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if name in _READ_ONLY:
            raise AttributeError(f"Site.{name} is read-only")
        object.__delattr__(self, name)

    @property
    def name(self) -> str:
        """The layer name as a plain `str`."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Site({self.name!r}, call={self.call}, kind={self.kind!r})"

    def __reduce__(self) -> tuple[object, ...]:
        # Sites are descriptions, not state: pickle them as their name.
        return (str, (self.name,))
