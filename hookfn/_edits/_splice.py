"""`splice`: a module (a sparse autoencoder, a transcoder) put in place of an activation,
whose parts are sites of the run it is in."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .._errors import EditError, SpecError
from .._gate import suspended
from .._site import Site
from ._base import Edit

__all__ = ["Splice", "SpliceFromInput", "Spliced", "splice"]

# The parts every spliced module has, besides the submodules of the module it holds.
_PARTS = ("latents", "reconstruction", "error")


class Spliced(nn.Module):
    """What a `splice` puts at a site: the module it holds, run on the site's activation,
    with its parts as submodules that runs can hook.

    Its submodules are ``latents`` (the code the module's ``encode`` returns, before
    ``decode`` reads it), ``reconstruction`` (what ``decode`` returns), ``error`` (the
    activation minus the reconstruction of the unedited latents; only with ``error=True``)
    and the held module's own submodules under their names. Each is an identity where the
    values pass, so an edit there changes what the rest of the splice computes.

    ``forward(source, target)`` returns the replacement of ``target``: the reconstruction of
    ``source`` (the activation itself, or a transcoder's input), plus ``target`` minus the
    reconstruction of the unedited latents with ``error=True``.
    """

    def __init__(self, module: nn.Module, *, error: bool, freeze_error: bool) -> None:
        super().__init__()
        self.latents = nn.Identity()
        self.reconstruction = nn.Identity()
        self.error = nn.Identity()
        for name, child in module.named_children():
            if name in _PARTS:
                raise SpecError(
                    f"splice({type(module).__name__}): the module has a submodule named "
                    f"{name!r}, which is the name of a part of every splice ({', '.join(_PARTS)}"
                    "); rename it."
                )
            self.add_module(name, child)
        # Held without registering it: its children are registered above, under their names.
        self.__dict__["held"] = module
        self.encodes = callable(getattr(module, "encode", None)) and callable(
            getattr(module, "decode", None)
        )
        self.error_term = error
        self.freeze_error = freeze_error

    @property
    def module(self) -> nn.Module:
        """The module the splice holds."""
        return self.__dict__["held"]  # type: ignore[no-any-return]

    def forward(self, source: Tensor, target: Tensor) -> Tensor:
        module: Any = self.module
        if self.encodes:
            codes = module.encode(source)
            edited = self.latents(codes)
            decoded = module.decode(edited)
            if self.error_term:
                if edited is codes:
                    clean = decoded
                else:
                    with torch.no_grad() if self.freeze_error else nullcontext():
                        clean = module.decode(codes)
        else:
            # A module that only has a forward: its latents are one of its submodules, so
            # the reconstruction of the unedited latents is a second call, with no run's
            # hooks acting.
            decoded = _primary(module(source))
            if self.error_term:
                with suspended(), torch.no_grad() if self.freeze_error else nullcontext():
                    clean = _primary(module(source))
        reconstruction = self.reconstruction(decoded)
        if not self.error_term:
            return reconstruction  # type: ignore[no-any-return]
        error = target - clean
        if self.freeze_error:
            error = error.detach()
        return reconstruction + self.error(error)  # type: ignore[no-any-return]

    def extra_repr(self) -> str:
        return f"error={self.error_term}, freeze_error={self.freeze_error}"


def _primary(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    raise EditError(
        f"the spliced module returned a {type(value).__name__}; a module without "
        "encode/decode must return the reconstruction (a tensor, or a tuple whose first item "
        "is one)."
    )


class Splice(Edit):
    """An activation replaced by a module's reconstruction of it (`splice` builds it)."""

    __slots__ = ("name", "spliced")

    reads_input: ClassVar[bool] = False

    def __init__(self, spliced: Spliced, name: str) -> None:
        self.spliced = spliced
        self.name = name

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        return self._run(x, x)

    def check_host(self, host: nn.Module, name: str) -> None:
        """Before the run: the module's parameters and the host's agree in dtype and
        device, where both have floating-point ones."""
        mine = _float_parameter(self.spliced.module)
        theirs = _float_parameter(host)
        if mine is None or theirs is None:
            return
        if mine.device != theirs.device or mine.dtype != theirs.dtype:
            raise SpecError(
                f"{self!r} at {name!r}: the spliced module's parameters are {mine.dtype} on "
                f"{mine.device}, the layer's are {theirs.dtype} on {theirs.device}; move it "
                f"with .to({theirs.device.type!r}, {theirs.dtype}) first."
            )

    def _run(self, source: Tensor, target: Tensor) -> Tensor:
        """The spliced module on ``source``, replacing ``target``; what does not fit (dtype,
        device, width, the result's shape) is an `EditError` before or instead of a raw one
        from inside the module."""
        module = self.spliced.module
        mine = _float_parameter(module)
        if mine is not None and (mine.device != source.device or mine.dtype != source.dtype):
            raise EditError(
                f"the spliced module's parameters are {mine.dtype} on {mine.device}, the "
                f"activation is {source.dtype} on {source.device}; move it with "
                f".to({source.device.type!r}, {source.dtype})."
            )
        d_in = getattr(module, "d_in", getattr(getattr(module, "cfg", None), "d_in", None))
        if isinstance(d_in, int) and source.dim() and source.shape[-1] != d_in:
            raise EditError(
                f"the spliced module reads vectors of width d_in={d_in}, the activation has "
                f"shape {tuple(source.shape)}; splice it where its width fits."
            )
        try:
            y = self.spliced(source, target)
        except RuntimeError as error:
            raise EditError(
                f"the spliced module failed on an activation of shape {tuple(source.shape)} "
                f"({source.dtype}): {error}"
            ) from error
        if not isinstance(y, Tensor) or y.shape != target.shape:
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise EditError(
                f"the spliced module's reconstruction has shape {shape}, the activation it "
                f"replaces {tuple(target.shape)}; splice it where its input and output width "
                "fit."
            )
        return y

    def __repr__(self) -> str:
        options = "".join(
            f", {key}={value!r}"
            for key, value, default in (
                ("error", self.spliced.error_term, False),
                ("freeze_error", self.spliced.freeze_error, False),
                ("from_input", self.reads_input, False),
                ("name", self.name, "transcoder" if self.reads_input else "sae"),
            )
            if value != default
        )
        return f"splice({type(self.spliced.module).__name__}{options})"

    def __eq__(self, other: object) -> bool:
        return self is other

    def __hash__(self) -> int:
        return id(self)

    def __reduce__(self) -> tuple[object, ...]:
        s = self.spliced
        return (
            _rebuild,
            (s.module, s.error_term, s.freeze_error, self.reads_input, self.name),
        )


class SpliceFromInput(Splice):
    """A module's output replaced by a transcoder's map of its input (``splice(...,
    from_input=True)``)."""

    __slots__ = ()

    reads_input: ClassVar[bool] = True

    def __call__(self, x: Tensor, site: Site) -> Tensor:
        raise EditError(
            "a splice with from_input=True reads the layer's input as well as its output: "
            "give it as the layer's edit itself, not inside a chain or at()."
        )

    def from_input(self, source: Tensor, x: Tensor, site: Site) -> Tensor:
        """The replacement of the output ``x``, mapped from the input ``source``."""
        return self._run(source, x)


def _float_parameter(module: nn.Module) -> Tensor | None:
    for parameter in module.parameters():
        if parameter.is_floating_point():
            return parameter
    return None


def _rebuild(
    module: nn.Module, error: bool, freeze_error: bool, from_input: bool, name: str
) -> Splice:
    return splice(module, error=error, freeze_error=freeze_error, from_input=from_input, name=name)


def splice(
    module: nn.Module,
    *,
    error: bool = False,
    freeze_error: bool = False,
    from_input: bool = False,
    name: str | None = None,
) -> Splice:
    """Put ``module`` in place of the activation: a sparse autoencoder, a transcoder.

    The edit replaces the site's output ``x`` with ``decode(encode(x))`` (a module with
    ``encode`` and ``decode`` methods, such as `hookfn.sae.SparseAutoencoder` or an SAELens
    ``SAE``), or with ``module(x)`` (a module that only has a forward). With
    ``from_input=True`` (a transcoder) the module reads the layer's *input* and its result
    replaces the layer's output.

    The spliced module's parts are sites of the run, named after the layer: at layer
    ``"transformer.h.1"``, ``"transformer.h.1.sae.latents"`` (what ``encode`` returns),
    ``"transformer.h.1.sae.reconstruction"``, ``"transformer.h.1.sae.error"`` and the
    module's own submodules (``"transformer.h.1.sae.encoder"``). Capture them, edit them with
    any edit (`ablate`, `steer`, `patch_from`, ...), take their gradients, sweep them with
    `hookfn.patching`: in the spec of the run that splices, or in runs nested inside it
    (`spliced`).

    Args:
        module: The module to splice in. Its parameters must have the activation's dtype
            and device.
        error: Add the error term: the result is the reconstruction plus ``x`` minus the
            reconstruction of the *unedited* latents, so the model's output is unchanged
            (to float rounding) until a latent is edited. The error is the site ``...error``.
        freeze_error: Detach the error term (as SAELens does): gradients reach the layers
            before the splice only through the module. By default the error carries
            gradients, so they are the unspliced model's (and a latent's gradient is the
            derivative through the reconstruction).
        from_input: The module maps the layer's input to a replacement of its output (a
            transcoder; the error is the layer's output minus that).
        name: The name of the splice under the layer: ``"sae"`` (``"transcoder"`` with
            ``from_input=True``).

    Raises:
        SpecError: ``module`` is not a module, or has a submodule named like a splice part.

    Examples:
        >>> import torch
        >>> from hookfn import run_with_hooks, splice
        >>> from hookfn.sae import SparseAutoencoder
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> sae = SparseAutoencoder(8, 32)
        >>> x = torch.randn(3, 4)
        >>> out, caches = run_with_hooks(
        ...     model, x, {"0": splice(sae, error=True), "0.sae.latents": "capture"})
        >>> torch.allclose(out, model(x), atol=1e-5), caches["0.sae.latents"].output.shape
        (True, torch.Size([3, 32]))
    """
    if not isinstance(module, nn.Module):
        raise SpecError(f"splice() takes an nn.Module, got {type(module).__name__}.")
    for flag, value in (
        ("error", error),
        ("freeze_error", freeze_error),
        ("from_input", from_input),
    ):
        if not isinstance(value, bool):
            raise SpecError(f"splice({flag}=...) takes True or False, got {value!r}.")
    if name is None:
        name = "transcoder" if from_input else "sae"
    if not isinstance(name, str) or not name.isidentifier():
        raise SpecError(f"splice(name=...) takes a name without dots, got {name!r}.")
    spliced = Spliced(module, error=error, freeze_error=freeze_error)
    return (SpliceFromInput if from_input else Splice)(spliced, name)
