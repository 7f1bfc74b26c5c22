"""What is patched: `Sites` (layer keys, output or input, head count) and the presets that
name the usual ones on transformers GPT-2 / Llama-style models and TransformerLens bridges."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Union

from torch import nn
from typing_extensions import TypeAlias

from hookfn import SpecError

__all__ = [
    "Kind",
    "Sites",
    "SitesLike",
    "as_sites",
    "attn_out",
    "block_stack",
    "head_out",
    "mlp_out",
    "n_heads_of",
    "resid_post",
    "resid_pre",
]

Kind: TypeAlias = Literal["output", "input"]


@dataclass(frozen=True, slots=True)
class Sites:
    """Layers to patch, what is patched there, and how many heads their last dim holds.

    A plain key (or list of keys) passed where `Sites` are expected means their outputs.

    Args:
        keys: Layer keys as `run_with_hooks` takes them: dotted names, globs
            (``"transformer.h.*"``), module objects.
        kind: ``"output"`` patches what the module returns (its primary tensor);
            ``"input"`` what it receives (its first argument), which changes what this
            module sees and nothing else.
        n_heads: The number of attention heads the last dim is the concatenation of, for
            `each_head`; found from the model's config when ``None``.

    Examples:
        >>> Sites("transformer.h.*", kind="input")
        Sites(keys=('transformer.h.*',), kind='input', n_heads=None)
    """

    keys: tuple[str | nn.Module, ...]
    kind: Kind
    n_heads: int | None

    def __init__(
        self,
        keys: str | nn.Module | Sequence[str | nn.Module],
        *,
        kind: Kind = "output",
        n_heads: int | None = None,
    ) -> None:
        items = (keys,) if isinstance(keys, (str, nn.Module)) else tuple(keys)
        if not items or not all(isinstance(k, (str, nn.Module)) for k in items):
            raise SpecError(
                f"Sites(keys=...) takes a layer key, a module or a list of them, got {keys!r}."
            )
        if kind not in ("output", "input"):
            raise SpecError(f"Sites(kind=...) is 'output' or 'input', got {kind!r}.")
        if n_heads is not None and (
            isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1
        ):
            raise SpecError(f"Sites(n_heads=...) takes a positive int, got {n_heads!r}.")
        object.__setattr__(self, "keys", items)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "n_heads", n_heads)


SitesLike: TypeAlias = Union[Sites, str, nn.Module, Sequence[Union[str, nn.Module]]]
"""`Sites`, or keys alone (their outputs)."""


def as_sites(value: object, where: str) -> Sites:
    """`Sites` from what a caller passed for ``where``."""
    if isinstance(value, Sites):
        return value
    if isinstance(value, (str, nn.Module)) or (
        isinstance(value, Sequence)
        and value
        and all(isinstance(v, (str, nn.Module)) for v in value)
    ):
        return Sites(value)  # type: ignore[arg-type]
    raise SpecError(
        f"{where} takes layer keys (a name, a glob such as 'transformer.h.*', a module, or a "
        f"list of them) or Sites(keys, kind='input'), got {value!r}."
    )


# -- the usual sites of transformer stacks ----------------------------------------------------


def block_stack(model: nn.Module) -> tuple[str, list[str]]:
    """The name of the model's stack of blocks and the blocks' names, in order.

    The stack is the longest `nn.ModuleList` whose children are all of one class (GPT-2's
    ``transformer.h``, Llama's ``model.layers``, TransformerLens' ``blocks``).

    Raises:
        SpecError: The model has no such list.
    """
    best: tuple[str, list[str]] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, [f"{name}.{i}" if name else str(i) for i in range(len(module))])
    if best is None:
        raise SpecError(
            f"{type(model).__name__} has no stack of blocks (an nn.ModuleList of one class) "
            "for the site presets to name; give the layer keys yourself, e.g. "
            "Sites('encoder.layers.*', kind='input')."
        )
    return best


def _is_bridge(model: nn.Module) -> bool:
    """A TransformerLens model: its blocks carry the hook point aliases."""
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.ModuleList) and hasattr(blocks[0], "hook_resid_pre")


def _child(model: nn.Module, block: str, options: tuple[str, ...], what: str) -> str:
    module = model.get_submodule(block)
    for option in options:
        try:
            module.get_submodule(option)
        except AttributeError:
            continue
        return option
    children = [name for name, _ in module.named_children()]
    raise SpecError(
        f"cannot find the {what} of block {block!r} (looked for {', '.join(options)}; its "
        f"children are {children}); give the layer keys yourself, e.g. "
        f"Sites('{block.rsplit('.', 1)[0]}.*.<{what}>')."
    )


_ATTENTION = ("attn", "self_attn", "attention", "self_attention")
_MLP = ("mlp", "feed_forward", "ffn")
_OUT_PROJECTION = ("c_proj", "o_proj", "out_proj", "dense", "o")


def _glob(model: nn.Module, tail: str) -> str:
    stack, _ = block_stack(model)
    return f"{stack}.*.{tail}" if tail else f"{stack}.*"


def resid_pre(model: nn.Module) -> Sites:
    """The residual stream entering each block: every block's input.

    Examples:
        >>> from hookfn.demo import load_model
        >>> resid_pre(load_model())
        Sites(keys=('transformer.h.*',), kind='input', n_heads=None)
    """
    if _is_bridge(model):
        return Sites(_bridge_keys(model, "hook_resid_pre"))
    return Sites(_glob(model, ""), kind="input")


def resid_post(model: nn.Module) -> Sites:
    """The residual stream leaving each block: every block's output.

    Examples:
        >>> from hookfn.demo import load_model
        >>> resid_post(load_model())
        Sites(keys=('transformer.h.*',), kind='output', n_heads=None)
    """
    if _is_bridge(model):
        return Sites(_bridge_keys(model, "hook_resid_post"))
    return Sites(_glob(model, ""))


def attn_out(model: nn.Module) -> Sites:
    """Each block's attention output (what is added to the residual stream).

    Examples:
        >>> from hookfn.demo import load_model
        >>> attn_out(load_model()).keys
        ('transformer.h.*.attn',)
    """
    if _is_bridge(model):
        return Sites(_bridge_keys(model, "hook_attn_out"))
    _, blocks = block_stack(model)
    return Sites(_glob(model, _child(model, blocks[0], _ATTENTION, "attention")))


def mlp_out(model: nn.Module) -> Sites:
    """Each block's MLP output.

    Examples:
        >>> from hookfn.demo import load_model
        >>> mlp_out(load_model()).keys
        ('transformer.h.*.mlp',)
    """
    if _is_bridge(model):
        return Sites(_bridge_keys(model, "hook_mlp_out"))
    _, blocks = block_stack(model)
    return Sites(_glob(model, _child(model, blocks[0], _MLP, "MLP")))


def head_out(model: nn.Module) -> Sites:
    """Each head's output before the attention output projection: the concatenated heads.

    That is the input of the output projection (GPT-2's ``attn.c_proj``, Llama's
    ``self_attn.o_proj``) or TransformerLens' ``attn.hook_z``, with the model's head count,
    ready for `each_head`.

    Examples:
        >>> from hookfn.demo import load_model
        >>> head_out(load_model())
        Sites(keys=('transformer.h.*.attn.c_proj',), kind='input', n_heads=4)
    """
    heads = n_heads_of(model)
    if _is_bridge(model):
        return Sites([f"blocks.{i}.attn.hook_z" for i in range(_n_blocks(model))], n_heads=heads)
    _, blocks = block_stack(model)
    attention = _child(model, blocks[0], _ATTENTION, "attention")
    projection = _child(
        model, f"{blocks[0]}.{attention}", _OUT_PROJECTION, "attention output projection"
    )
    return Sites(_glob(model, f"{attention}.{projection}"), kind="input", n_heads=heads)


def _n_blocks(model: nn.Module) -> int:
    blocks = getattr(model, "blocks", None)
    return len(blocks) if isinstance(blocks, nn.ModuleList) else 0


def _bridge_keys(model: nn.Module, hook: str) -> list[str]:
    # TransformerLens' names are attribute aliases of each block, exact keys (not globbable).
    return [f"blocks.{i}.{hook}" for i in range(_n_blocks(model))]


_HEAD_FIELDS = ("n_head", "num_attention_heads", "n_heads", "num_heads")


def n_heads_of(model: nn.Module) -> int | None:
    """The model's number of attention heads, from its config (``config`` or ``cfg``).

    Examples:
        >>> from hookfn.demo import load_model
        >>> n_heads_of(load_model())
        4
    """
    for holder in (getattr(model, "config", None), getattr(model, "cfg", None)):
        for field in _HEAD_FIELDS:
            value = getattr(holder, field, None)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None
