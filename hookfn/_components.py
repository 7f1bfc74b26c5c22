"""Component names: TransformerLens's names for the parts of a transformer block
(``blocks.3.hook_resid_pre``, ``blocks.3.attn.hook_z``, ``blocks.3.attn.hook_pattern``, ...)
on an unmodified transformers model, through a small table per architecture.

Each component is a probe (see `hookfn._ops`): a value at a module's input or output (split
into heads for ``hook_z``), or an argument or the pattern of the attention's
``scaled_dot_product_attention``. A run creates the probes its keys name, and only those.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from ._errors import LayerNotFoundError, SpecError
from ._keys import Names, glob_regex, is_glob, submodule, unwrap
from ._ops import Insert, Operand, Pattern, Probe

__all__ = [
    "Architecture",
    "component_grafts",
    "components",
    "looks_like_component",
    "register_components",
]


@dataclass(frozen=True)
class Component:
    """Where one component is, relative to its block: ``(where, module path, heads)``.

    ``where`` is ``"input"`` or ``"output"`` (of the module at ``path``, ``""`` for the block),
    or ``"q"``, ``"k"``, ``"v"``, ``"pattern"`` (of the attention at ``path``). ``heads`` is
    the config attribute that gives the head count, for values split into heads.
    """

    where: str
    path: str
    heads: str | None = None


@dataclass(frozen=True)
class Architecture:
    """The blocks of one kind of model, and where each component is in a block."""

    blocks: str  # the ModuleList of blocks, e.g. "h" (found under any prefix)
    table: Mapping[str, Component]


def _standard(
    attn: str, mlp: str, ln_2: str | None, out: str, hidden: Component
) -> dict[str, Component]:
    table = {
        "hook_resid_pre": Component("input", ""),
        "hook_resid_post": Component("output", ""),
        "hook_attn_out": Component("output", attn),
        "hook_mlp_out": Component("output", mlp),
        "mlp.hook_post": hidden,
        "attn.hook_z": Component("input", f"{attn}.{out}", "num_attention_heads"),
        "attn.hook_q": Component("q", attn),
        "attn.hook_k": Component("k", attn),
        "attn.hook_v": Component("v", attn),
        "attn.hook_pattern": Component("pattern", attn),
    }
    if ln_2 is not None:
        table["hook_resid_mid"] = Component("input", ln_2)
    return table


_LLAMA = Architecture(
    "layers",
    _standard(
        "self_attn",
        "mlp",
        "post_attention_layernorm",
        "o_proj",
        Component("input", "mlp.down_proj"),
    ),
)

ARCHITECTURES: dict[str, Architecture] = {
    "gpt2": Architecture(
        "h", _standard("attn", "mlp", "ln_2", "c_proj", Component("output", "mlp.act"))
    ),
    "gpt_neox": Architecture(
        "layers",
        _standard("attention", "mlp", None, "dense", Component("input", "mlp.dense_4h_to_h")),
    ),
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "bert": Architecture(
        "encoder.layer",
        {
            "hook_resid_pre": Component("input", ""),
            "hook_resid_mid": Component("output", "attention"),
            "hook_resid_post": Component("output", ""),
            "hook_attn_out": Component("output", "attention.output.dense"),
            "hook_mlp_out": Component("output", "output.dense"),
            "mlp.hook_post": Component("output", "intermediate"),
            "attn.hook_z": Component("input", "attention.output.dense", "num_attention_heads"),
            "attn.hook_q": Component("q", "attention.self"),
            "attn.hook_k": Component("k", "attention.self"),
            "attn.hook_v": Component("v", "attention.self"),
            "attn.hook_pattern": Component("pattern", "attention.self"),
        },
    ),
}


def register_components(model_type: str, blocks: str, table: Mapping[str, tuple[Any, ...]]) -> None:
    """Teach hookfn the component names of another architecture.

    Args:
        model_type: The ``model.config.model_type`` of the architecture (e.g. ``"gptj"``).
        blocks: The name of its ``ModuleList`` of blocks, as it ends (``"h"``, ``"layers"``).
        table: Component name -> ``(where, module path in the block[, config attribute of the
            head count])``; ``where`` is ``"input"``/``"output"`` of that module (``""`` is the
            block), or ``"q"``/``"k"``/``"v"``/``"pattern"`` of the attention module whose
            ``scaled_dot_product_attention`` call it reads.

    Examples:
        >>> register_components("gptj", "h", {"hook_resid_pre": ("input", ""),
        ...                                   "attn.hook_pattern": ("pattern", "attn")})
    """
    parsed = {}
    for name, entry in table.items():
        if not isinstance(entry, tuple) or not 2 <= len(entry) <= 3:
            raise SpecError(f"register_components: table[{name!r}] is (where, path[, heads]).")
        if entry[0] not in ("input", "output", "q", "k", "v", "pattern"):
            raise SpecError(
                f"register_components: table[{name!r}] where={entry[0]!r}; use 'input', "
                "'output', 'q', 'k', 'v' or 'pattern'."
            )
        parsed[name] = Component(*entry)
    ARCHITECTURES[model_type] = Architecture(blocks, parsed)


def components_of_types() -> list[str]:
    """The ``model_type`` values whose component names hookfn knows."""
    return sorted(ARCHITECTURES)


def looks_like_component(key: str) -> bool:
    """Whether a key is written as a component name (its first segment is ``blocks``)."""
    first = key.split(".", 1)[0]
    return first == "blocks" or (
        is_glob(first) and glob_regex(first).fullmatch("blocks") is not None
    )


def _model_type(inner: nn.Module) -> str | None:
    config = getattr(inner, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type if isinstance(model_type, str) else None


def _blocks(names: Names, architecture: Architecture) -> tuple[str, nn.Module] | None:
    for name in names.names:
        if name == architecture.blocks or name.endswith("." + architecture.blocks):
            module = names.module(name)
            if isinstance(module, nn.ModuleList):
                return name, module
    return None


def components(model: nn.Module) -> dict[str, str]:
    """The component names of ``model`` (an architecture hookfn knows), each with where it
    is: ``{"blocks.0.hook_resid_pre": "input of transformer.h.0", ...}``.

    Raises:
        LayerNotFoundError: hookfn knows no component names for this architecture.
    """
    inner, _ = unwrap(model)
    names = Names(inner)
    architecture, base, blocks = _architecture(inner, names, "components(model)")
    table: dict[str, str] = {}
    for i in range(len(blocks)):
        block = f"{base}.{i}"
        for component, where in architecture.table.items():
            path = f"{block}.{where.path}" if where.path else block
            split = ", split into heads" if where.heads else ""
            what = (
                where.where
                if where.where in ("input", "output")
                else f"{where.where} of the attention in"
            )
            table[f"blocks.{i}.{component}"] = f"{what} {path}{split}"
    return table


def _architecture(
    inner: nn.Module, names: Names, key: str
) -> tuple[Architecture, str, nn.ModuleList]:
    model_type = _model_type(inner)
    architecture = ARCHITECTURES.get(model_type or "")
    found = _blocks(names, architecture) if architecture is not None else None
    if architecture is None or found is None:
        raise LayerNotFoundError(
            f"{key!r} is a component name, but hookfn knows no component names for "
            f"{type(inner).__name__} (model_type {model_type!r}; known: "
            f"{', '.join(components_of_types())}). Name the module instead (hookfn.layers(model, "
            "inputs) lists them), or add the architecture with "
            "hookfn.register_components(model_type, blocks, table)."
        )
    return architecture, found[0], found[1]  # type: ignore[return-value]


def component_grafts(
    inner: nn.Module, names: Names, key: str
) -> list[tuple[nn.Module, str, nn.Module]]:
    """The probes a component key names, as grafts ``(host, "/" + name, probe)`` (the name
    is the whole site name, see `Names`; ``"<"`` for a value at the host's input)."""
    wanted = glob_regex(key) if is_glob(key) else None
    if wanted is not None and ARCHITECTURES.get(_model_type(inner) or "") is None:
        return []  # a glob that may mean modules: resolved (or reported) as one
    architecture, base, blocks = _architecture(inner, names, key)
    config = getattr(inner, "config", None)
    grafts: list[tuple[nn.Module, str, nn.Module]] = []
    for i in range(len(blocks)):
        for component, where in architecture.table.items():
            name = f"blocks.{i}.{component}"
            if (wanted.fullmatch(name) is None) if wanted is not None else name != key:
                continue
            path = f"{base}.{i}.{where.path}" if where.path else f"{base}.{i}"
            host = submodule(inner, path)
            if host is None:
                continue
            probe: Probe
            if where.where in ("q", "k", "v"):
                probe = Operand(where.where)
            elif where.where == "pattern":
                probe = Pattern()
            else:
                heads = getattr(config, where.heads) if where.heads else None
                probe = Insert(where.where, heads)
            mark = "<" if where.where == "input" else "/"
            grafts.append((host, mark + name, probe))
    if not grafts and wanted is None:
        raise LayerNotFoundError(
            f"no component {key!r} in {type(inner).__name__}; its components are "
            f"blocks.0..{len(blocks) - 1} with {', '.join(sorted(architecture.table))}."
        )
    return grafts
