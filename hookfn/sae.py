"""Sparse autoencoders to splice into a model (`hookfn.splice`), with SAELens's conventions.

`SparseAutoencoder` holds ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae,
d_in]``, ``b_dec [d_in]`` (and ``threshold [d_sae]`` for JumpReLU), and computes::

    pre = (x - b_dec) @ W_enc + b_enc      # (x @ W_enc + b_enc without apply_b_dec_to_input)
    relu:     z = relu(pre)
    topk:     z = relu(pre) on the k largest entries of pre, 0 elsewhere
    jumprelu: z = relu(pre) * (pre > threshold)
    decode(z) = z @ W_dec + b_dec

`load` reads SAELens's saved layout (a folder with ``cfg.json`` and
``sae_weights.safetensors``) or a single weights file, safely: tensors only, never pickled
code. An SAELens ``SAE`` object splices in as it is (it has ``encode`` and ``decode``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from ._errors import SpecError

__all__ = ["SparseAutoencoder", "load"]

Activation = Literal["relu", "topk", "jumprelu"]


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder with SAELens's parameter names and formulas (see the module).

    Args:
        d_in: The width of the activation it reads.
        d_sae: The number of latents.
        activation: ``"relu"``, ``"topk"`` (with ``k``) or ``"jumprelu"``.
        k: The latents kept by ``"topk"``.
        apply_b_dec_to_input: Subtract ``b_dec`` from the input before encoding.
        generator: The random generator of the initial weights (decoder rows of unit norm,
            the encoder their transpose, biases zero, thresholds ``0.0``).

    Examples:
        >>> import torch
        >>> sae = SparseAutoencoder(8, 32, activation="topk", k=4)
        >>> z = sae.encode(torch.randn(2, 8))
        >>> z.shape, int((z != 0).sum(-1).max()) <= 4
        (torch.Size([2, 32]), True)
    """

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        activation: Activation = "relu",
        k: int | None = None,
        apply_b_dec_to_input: bool = True,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for label, size in (("d_in", d_in), ("d_sae", d_sae)):
            if not isinstance(size, int) or isinstance(size, bool) or size < 1:
                raise SpecError(
                    f"SparseAutoencoder({label}=...) takes a positive int, got {size!r}."
                )
        if activation not in ("relu", "topk", "jumprelu"):
            raise SpecError(
                f"SparseAutoencoder(activation=...) takes 'relu', 'topk' or 'jumprelu', got "
                f"{activation!r}."
            )
        if activation == "topk" and not (isinstance(k, int) and 0 < k <= d_sae):
            raise SpecError(
                f"SparseAutoencoder(activation='topk') needs k, an int in [1, d_sae={d_sae}]; "
                f"got k={k!r}."
            )
        self.d_in, self.d_sae = d_in, d_sae
        self.activation: Activation = activation
        self.k = k
        self.apply_b_dec_to_input = apply_b_dec_to_input
        w_dec = torch.randn(d_sae, d_in, generator=generator, dtype=torch.float32)
        w_dec = w_dec / w_dec.norm(dim=-1, keepdim=True)
        options = {"dtype": dtype, "device": device}
        self.W_enc = nn.Parameter(w_dec.T.contiguous().to(**options))  # type: ignore[arg-type]
        self.b_enc = nn.Parameter(torch.zeros(d_sae, **options))  # type: ignore[arg-type]
        self.W_dec = nn.Parameter(w_dec.to(**options))  # type: ignore[arg-type]
        self.b_dec = nn.Parameter(torch.zeros(d_in, **options))  # type: ignore[arg-type]
        if activation == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, **options))  # type: ignore[arg-type]

    def encode_pre(self, x: Tensor) -> Tensor:
        """The latents before the activation function."""
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: Tensor) -> Tensor:
        """The latents of ``x`` (``[..., d_in]`` -> ``[..., d_sae]``)."""
        pre = self.encode_pre(x)
        if self.activation == "relu":
            return torch.relu(pre)
        if self.activation == "jumprelu":
            return torch.relu(pre) * (pre > self.threshold)
        top = pre.topk(self.k, dim=-1)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))

    def decode(self, z: Tensor) -> Tensor:
        """The reconstruction of latents ``z`` (``[..., d_sae]`` -> ``[..., d_in]``)."""
        return z @ self.W_dec + self.b_dec

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def config(self) -> dict[str, object]:
        """The configuration `load` reads back (SAELens's ``cfg.json`` fields)."""
        cfg: dict[str, object] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "architecture": {"relu": "standard"}.get(self.activation, self.activation),
            "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "dtype": str(self.W_enc.dtype).removeprefix("torch."),
        }
        if self.k is not None:
            cfg["k"] = self.k
        return cfg

    def save(self, folder: str | Path) -> Path:
        """Write ``cfg.json`` and ``sae_weights.safetensors`` (SAELens's layout; needs the
        ``safetensors`` package) into ``folder``; returns the folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "cfg.json").write_text(json.dumps(self.config(), indent=2))
        tensors = {name: p.detach().contiguous() for name, p in self.named_parameters()}
        save_file(tensors, str(folder / "sae_weights.safetensors"))
        return folder

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.k is not None else ""
        return f"d_in={self.d_in}, d_sae={self.d_sae}, activation={self.activation!r}{k}"


_ARCHITECTURES: dict[str, Activation] = {
    "standard": "relu",
    "relu": "relu",
    "topk": "topk",
    "jumprelu": "jumprelu",
}


def load(path: str | Path, *, device: torch.device | str | None = None) -> SparseAutoencoder:
    """A `SparseAutoencoder` from local files, read safely (tensors only, no pickled code).

    ``path`` is a folder in SAELens's layout (``cfg.json`` with ``d_in``, ``d_sae``,
    ``architecture``, and optionally ``k``, ``apply_b_dec_to_input``; the weights in
    ``sae_weights.safetensors``), or one weights file (``.safetensors``, or a tensor dict saved
    with ``torch.save`` as ``.pt``/``.pth``), whose shapes give the sizes (and ``threshold``
    the JumpReLU architecture; give a folder with ``cfg.json`` for TopK).

    Raises:
        SpecError: The files are missing, or do not hold the parameters of an SAE.

    Examples:
        >>> import tempfile
        >>> from hookfn.sae import SparseAutoencoder, load
        >>> sae = SparseAutoencoder(8, 32, activation="topk", k=4)
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     loaded = load(sae.save(folder))
        >>> loaded
        SparseAutoencoder(d_in=8, d_sae=32, activation='topk', k=4)
    """
    path = Path(path)
    cfg: dict[str, object] = {}
    if path.is_dir():
        if (path / "cfg.json").is_file():
            cfg = json.loads((path / "cfg.json").read_text())
        found = [
            path / n for n in ("sae_weights.safetensors", "sae_weights.pt") if (path / n).is_file()
        ]
        if not found:
            raise SpecError(f"load({str(path)!r}): the folder has no sae_weights.safetensors.")
        path = found[0]
    if not path.is_file():
        raise SpecError(f"load({str(path)!r}): no such file or folder.")
    tensors = _read(path)
    missing = [n for n in ("W_enc", "b_enc", "W_dec", "b_dec") if n not in tensors]
    if missing:
        raise SpecError(
            f"load({str(path)!r}): the file has no {', '.join(missing)} (it holds "
            f"{sorted(tensors)}); an SAE's weights are W_enc, b_enc, W_dec, b_dec."
        )
    d_in, d_sae = tensors["W_enc"].shape
    architecture = str(
        cfg.get("architecture", "jumprelu" if "threshold" in tensors else "standard")
    )
    if architecture not in _ARCHITECTURES:
        raise SpecError(
            f"load({str(path)!r}): architecture {architecture!r} is not one of "
            f"{sorted(_ARCHITECTURES)}."
        )
    unsupported = {
        key: cfg[key]
        for key, plain in (
            ("normalize_activations", "none"),
            ("reshape_activations", "none"),
            ("rescale_acts_by_decoder_norm", False),
        )
        if cfg.get(key, plain) != plain
    }
    if unsupported:
        raise SpecError(
            f"load({str(path)!r}): {unsupported} is not supported by SparseAutoencoder; "
            "splice the SAELens SAE object itself (splice(sae) takes any module with encode "
            "and decode)."
        )
    k = cfg.get("k")
    sae = SparseAutoencoder(
        int(d_in),
        int(d_sae),
        activation=_ARCHITECTURES[architecture],
        k=int(k) if isinstance(k, (int, float)) else None,
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        dtype=tensors["W_enc"].dtype,
    )
    try:
        sae.load_state_dict(tensors)
    except RuntimeError as error:
        raise SpecError(f"load({str(path)!r}): the weights do not fit an SAE: {error}") from None
    return sae.to(device) if device is not None else sae


def _read(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SpecError(
                f"load({str(path)!r}) needs the safetensors package: pip install safetensors."
            ) from None
        return load_file(str(path))
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # (an unpickling error names what the file holds)
        raise SpecError(
            f"load({str(path)!r}): not a tensor file torch reads safely: {error}"
        ) from None
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise SpecError(f"load({str(path)!r}): the file holds no dict of tensors.")
    return loaded
