"""Prompt pairs: the model inputs of each side, their rows, positions and labels.

Inputs are taken as `run_with_hooks` takes them (a tensor, a tuple, a mapping such as a
``BatchEncoding``, `Args`); the *primary* tensor (the first argument: token ids) gives the
number of prompt pairs (dim 0) and of positions (dim 1). Every tensor whose dim 0 is the pair
count is per-pair, and is repeated when cells are stacked along the batch dimension.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import Tensor
from typing_extensions import TypeAlias

from hookfn import Args, SpecError, primary

__all__ = [
    "Align",
    "Prompts",
    "alignment",
    "position_labels",
    "prompts",
]

Align: TypeAlias = Union[str, Mapping[int, int], Sequence[int], None]
"""How base positions map to source positions: ``None`` (the same), ``"end"``, a mapping."""

_MASK = "attention_mask"


@dataclass(frozen=True, slots=True, eq=False)
class Prompts:
    """One side of the prompt pairs, ready to be run.

    Attributes:
        args: The model call.
        n: The number of prompt pairs.
        seq: The number of positions (dim 1 of the primary tensor), or ``None``.
        last: ``[n]``: each prompt's last real position (the last attention-mask 1).
        ids: The primary tensor.
    """

    args: Args
    n: int
    seq: int | None
    last: Tensor
    ids: Tensor

    def rows(self, pair_of_row: Tensor) -> Args:
        """The call with row ``r`` being prompt ``pair_of_row[r]``."""
        return _map_args(self.args, lambda t: t[pair_of_row] if self._per_pair(t) else t)

    def tail(self, start: int, pair_of_row: Tensor) -> Args:
        """The call on positions ``start..`` only (the attention mask stays whole), by row."""

        def cut(t: Tensor, name: str | None) -> Tensor:
            if not self._per_pair(t):
                return t
            t = t[pair_of_row]
            if name != _MASK and t.dim() >= 2 and t.shape[1] == self.seq:
                return t[:, start:]
            return t

        args = tuple(cut(a, None) if isinstance(a, Tensor) else a for a in self.args.args)
        kwargs = {k: cut(v, k) if isinstance(v, Tensor) else v for k, v in self.args.kwargs.items()}
        return Args(*args, **kwargs)

    def with_kwargs(self, **extra: Any) -> Args:
        """The call with keyword arguments added."""
        return Args(*self.args.args, **{**self.args.kwargs, **extra})

    def _per_pair(self, t: Tensor) -> bool:
        return t.dim() >= 1 and t.shape[0] == self.n


def _map_args(args: Args, fn: Any) -> Args:
    return Args(
        *(fn(a) if isinstance(a, Tensor) else a for a in args.args),
        **{k: fn(v) if isinstance(v, Tensor) else v for k, v in args.kwargs.items()},
    )


def as_args(inputs: object) -> Args:
    """``inputs`` as `Args`, by `run_with_hooks`' rule."""
    if isinstance(inputs, Args):
        return inputs
    if isinstance(inputs, tuple):
        return Args(*inputs)
    if isinstance(inputs, Mapping):
        return Args(**inputs)
    return Args(inputs)


def prompts(inputs: object, where: str) -> Prompts:
    """Read one side of the prompt pairs.

    Raises:
        SpecError: There is no primary tensor, or it has no batch dim.
    """
    args = as_args(inputs)
    ids = primary(args)
    if ids is None or ids.dim() == 0:
        raise SpecError(
            f"{where}: the inputs {type(inputs).__name__} hold no batched tensor as their first "
            "argument; pass token ids [pairs, seq], a mapping with input_ids first, or "
            "Args(ids, ...)."
        )
    n = ids.shape[0]
    seq = ids.shape[1] if ids.dim() >= 2 else None
    mask = args.kwargs.get(_MASK)
    if seq is not None and isinstance(mask, Tensor) and mask.shape == ids.shape[:2]:
        # The last 1 of each row: right padding and left padding alike.
        flipped = mask.flip(-1).to(torch.long).argmax(-1)
        last = (seq - 1 - flipped).cpu()
    else:
        last = torch.full((n,), (seq or 1) - 1, dtype=torch.long)
    return Prompts(args, n, seq, last, ids)


def alignment(
    base: Prompts, source: Prompts, align: Align, names: tuple[str, str]
) -> Tensor | None:
    """``[base seq]``: the source position of each base position (``-1``: none).

    ``names`` are the base and source sides' names, for the message.

    ``None`` when the positions are the same on both sides.

    Raises:
        SpecError: The prompts differ in shape and ``align`` does not say how to match them,
            or ``align`` is malformed.
    """
    if align is None:
        if base.ids.shape != source.ids.shape:
            raise SpecError(
                f"the {names[0]} prompts have shape {tuple(base.ids.shape)} and the {names[1]} "
                f"prompts {tuple(source.ids.shape)}; patching needs the positions matched: "
                "pad them to one length, or pass align='end' (match positions counted from "
                "the end) or align={corrupted_position: clean_position, ...}."
            )
        return None
    if base.seq is None or source.seq is None:
        raise SpecError("align= needs prompts with positions (token ids of shape [pairs, seq]).")
    if align == "end":
        offset = source.seq - base.seq
        positions = torch.arange(base.seq) + offset
    elif isinstance(align, str):
        raise SpecError(f"align= takes 'end', a mapping or a list, got {align!r}.")
    else:
        items = align.items() if isinstance(align, Mapping) else enumerate(align)
        positions = torch.full((base.seq,), -1, dtype=torch.long)
        for b, s in items:
            if s is None or s == -1:
                continue
            if not (-base.seq <= b < base.seq and -source.seq <= s < source.seq):
                raise SpecError(
                    f"align= maps position {b} to {s}, outside the prompts' {base.seq} (base) "
                    f"and {source.seq} (source) positions."
                )
            positions[b % base.seq] = s % source.seq
    positions[(positions < 0) | (positions >= source.seq)] = -1
    if bool((positions == torch.arange(base.seq)).all()) and base.seq == source.seq:
        return None
    return positions


def position_labels(base: Prompts, tokens: object) -> tuple[str, ...]:
    """A label per base position: the position, with its token of the first prompt when
    ``tokens`` (a tokenizer, or one string per position) is given.

    Raises:
        SpecError: ``tokens`` is neither.
    """
    if base.seq is None:
        return ()
    if tokens is None:
        return tuple(str(p) for p in range(base.seq))
    if isinstance(tokens, Sequence) and not isinstance(tokens, str):
        if len(tokens) != base.seq or not all(isinstance(t, str) for t in tokens):
            raise SpecError(
                f"tokens= as a list needs one string per position ({base.seq}), got "
                f"{len(tokens)} items."
            )
        words = list(tokens)
    elif hasattr(tokens, "convert_ids_to_tokens"):
        words = [str(w) for w in tokens.convert_ids_to_tokens(base.ids[0].tolist())]
    elif hasattr(tokens, "decode"):
        words = [str(tokens.decode([int(i)])) for i in base.ids[0].tolist()]
    else:
        raise SpecError(
            f"tokens= takes a tokenizer or a list of strings (one per position), got "
            f"{type(tokens).__name__}."
        )
    return tuple(f"{p} {w}" for p, w in enumerate(words))
