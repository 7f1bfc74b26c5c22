"""The exceptions hookfn raises: one base class, one subclass per distinct cause."""

from __future__ import annotations

__all__ = [
    "CaptureError",
    "EditError",
    "HookfnError",
    "LayerNotFoundError",
    "SpecError",
]


class HookfnError(Exception):
    """Base class of every error hookfn raises on purpose.

    A message names the layer, the shapes or types involved, and the fix.
    """


class LayerNotFoundError(HookfnError, LookupError):
    """A spec key names no module of the model (or a glob matches none)."""


class SpecError(HookfnError, TypeError):
    """A spec, a spec value or a run argument is not of an accepted form."""


class EditError(HookfnError, ValueError):
    """An edit returned something that cannot stand in for the value it edited."""


class CaptureError(HookfnError, LookupError):
    """A capture was asked for something it did not record."""
