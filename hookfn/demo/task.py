"""Synthetic key-value recall task solved by the demo model.

A prompt lists ``N_PAIRS`` bindings with distinct keys, then a separator, then
a query key; the answer is the digit bound to the query::

    a3 c7 b1 e7 g0 d2 | c   ->   7

Keys are the letters ``a``-``h`` and values the digits ``0``-``9`` (values may
repeat). Each binding such as ``c7`` is a single token, so the vocabulary has
one token per key (used for queries), one per digit (used for answers), the
separator ``|`` and one token per (key, value) pair. Every prompt has exactly
``SEQ_LEN`` tokens and the model predicts the answer at the last position
(``QUERY_POSITION``).

Solving the task requires moving information between positions: the query
position has to find the binding with the matching key and read its value.
That makes it a natural playground for activation patching:
:func:`make_patching_pair` builds clean/corrupted prompts that differ only in
the value of the queried binding, so the two prompts have different answers,
and patching the right activation from the clean run into the corrupted run
restores the clean answer.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "BINDINGS",
    "KEYS",
    "N_PAIRS",
    "QUERY_POSITION",
    "SEP",
    "SEQ_LEN",
    "TOKEN_TO_ID",
    "VALUES",
    "VOCAB",
    "PatchingPair",
    "binding_id",
    "decode",
    "encode",
    "make_batch",
    "make_patching_pair",
]

KEYS: tuple[str, ...] = tuple("abcdefgh")
"""Key tokens; a prompt ends with one of them as the query."""
VALUES: tuple[str, ...] = tuple("0123456789")
"""Value (digit) tokens; the answer is one of them."""
SEP: str = "|"
"""Separator between the bindings and the query key."""
BINDINGS: tuple[str, ...] = tuple(key + value for key in KEYS for value in VALUES)
"""Binding tokens, one per (key, value) pair: ``"a0"``, ``"a1"``, ..., ``"h9"``."""
VOCAB: tuple[str, ...] = (*KEYS, *VALUES, SEP, *BINDINGS)
"""All tokens; a token's id is its index in this tuple."""
TOKEN_TO_ID: dict[str, int] = {token: i for i, token in enumerate(VOCAB)}
"""Map from token to token id."""

N_PAIRS: int = 6
"""Number of bindings per prompt."""
SEQ_LEN: int = N_PAIRS + 2
"""Tokens per prompt: the bindings, the separator and the query key."""
QUERY_POSITION: int = SEQ_LEN - 1
"""Position of the query key, where the model predicts the answer."""

_KEY_IDS = torch.tensor([TOKEN_TO_ID[key] for key in KEYS])
_VALUE_IDS = torch.tensor([TOKEN_TO_ID[value] for value in VALUES])
_FIRST_BINDING_ID = TOKEN_TO_ID[BINDINGS[0]]
_TOKEN_PATTERN = re.compile(r"\s*([a-h][0-9]|[a-h]|[0-9]|\|)")


def encode(text: str) -> torch.Tensor:
    """Turn a prompt into token ids.

    A key letter directly followed by a digit is one binding token (``"c7"``);
    a lone letter is a key, a lone digit a value. Whitespace only separates
    tokens, so ``"a3 c7 | c"`` and ``"a3c7|c"`` encode identically, while
    ``"a 3"`` is a key followed by a digit.

    Args:
        text: The prompt, e.g. ``"a3 c7 b1 e7 g0 d2 | c"``.

    Returns:
        A one-dimensional ``LongTensor`` of token ids.

    Raises:
        ValueError: If ``text`` contains anything that is not a token.
    """
    ids: list[int] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        match = _TOKEN_PATTERN.match(stripped, pos)
        if match is None:
            bad = stripped[pos:].lstrip()[:1]
            raise ValueError(f"unknown token starting at {bad!r} in {text!r}")
        ids.append(TOKEN_TO_ID[match.group(1)])
        pos = match.end()
    return torch.tensor(ids, dtype=torch.long)


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    """Turn token ids back into a space-separated string.

    Args:
        ids: A single token id (0-d tensor) or a one-dimensional sequence of
            token ids.

    Returns:
        The tokens joined by spaces, e.g. ``"a3 c7 | c"``; ``encode`` inverts it.

    Raises:
        ValueError: If ``ids`` has more than one dimension or holds an id
            outside the vocabulary.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 1:
            raise ValueError(f"decode expects at most one dimension, got shape {tuple(ids.shape)}")
        values: list[int] = [int(i) for i in ids.reshape(-1).tolist()]
    else:
        values = [int(i) for i in ids]
    for i in values:
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"token id {i} is outside the vocabulary of size {len(VOCAB)}")
    return " ".join(VOCAB[i] for i in values)


def binding_id(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Token ids of bindings from key and value indices.

    Args:
        key: Indices into ``KEYS`` (not token ids).
        value: Indices into ``VALUES`` (not token ids), broadcastable with ``key``.

    Returns:
        The token ids of the bindings ``KEYS[key] + VALUES[value]``.
    """
    return _FIRST_BINDING_ID + key * len(VALUES) + value


def _sample(
    n: int, query_slot: torch.Tensor, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample prompts whose query asks for binding ``query_slot[i]``.

    Returns:
        ``(input_ids, keys, values)``: prompts of shape ``[n, SEQ_LEN]`` and
        the key and value indices of the bindings, each ``[n, N_PAIRS]``.
    """
    keys = torch.rand(n, len(KEYS), generator=generator).argsort(dim=1)[:, :N_PAIRS]
    values = torch.randint(len(VALUES), (n, N_PAIRS), generator=generator)
    input_ids = torch.empty(n, SEQ_LEN, dtype=torch.long)
    input_ids[:, :N_PAIRS] = binding_id(keys, values)
    input_ids[:, N_PAIRS] = TOKEN_TO_ID[SEP]
    input_ids[:, QUERY_POSITION] = _KEY_IDS[keys.gather(1, query_slot[:, None]).squeeze(1)]
    return input_ids, keys, values


def make_batch(
    n: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample a batch of prompts with their answers.

    Args:
        n: Number of prompts.
        generator: Source of randomness; ``None`` uses torch's global one.

    Returns:
        ``(input_ids, targets)``: prompts as a ``LongTensor`` of shape
        ``[n, SEQ_LEN]`` and the answers' token ids (ids in ``VOCAB``, not
        digits) as a ``LongTensor`` of shape ``[n]``. The model is right when
        ``logits[:, QUERY_POSITION].argmax(-1) == targets``.
    """
    query_slot = torch.randint(N_PAIRS, (n,), generator=generator)
    input_ids, _, values = _sample(n, query_slot, generator)
    targets = _VALUE_IDS[values.gather(1, query_slot[:, None]).squeeze(1)]
    return input_ids, targets


@dataclass(frozen=True)
class PatchingPair:
    """Clean and corrupted prompts that differ in exactly one token.

    Attributes:
        clean_ids: Clean prompts, shape ``[n, SEQ_LEN]``.
        corrupted_ids: Corrupted prompts, shape ``[n, SEQ_LEN]``; equal to
            ``clean_ids`` except at ``position``, where the queried binding
            has a different value (``c7`` becomes, say, ``c2``).
        clean_targets: Answer token ids of the clean prompts, shape ``[n]``.
        corrupted_targets: Answer token ids of the corrupted prompts, shape
            ``[n]``; always different from ``clean_targets``.
        position: Sequence position of the changed binding (the same for
            every prompt of the batch).
    """

    clean_ids: torch.Tensor
    corrupted_ids: torch.Tensor
    clean_targets: torch.Tensor
    corrupted_targets: torch.Tensor
    position: int


def make_patching_pair(
    n: int = 1,
    generator: torch.Generator | None = None,
    *,
    pair_index: int | None = None,
) -> PatchingPair:
    """Build clean/corrupted prompts for activation patching.

    Every prompt queries binding ``pair_index``; the corrupted prompt
    changes the value of that binding and nothing else, so its answer changes
    too. Patching the activations that carry the queried value from the clean
    run into the corrupted run makes the model give the clean answer.

    Args:
        n: Number of prompt pairs.
        generator: Source of randomness; ``None`` uses torch's global one.
        pair_index: Which binding is queried and corrupted, in
            ``range(N_PAIRS)``; it is also the binding's sequence position.
            Sampled once for the whole batch when ``None``.

    Returns:
        The prompts, their answers and the corrupted position.

    Raises:
        ValueError: If ``pair_index`` is out of range.
    """
    if pair_index is None:
        pair_index = int(torch.randint(N_PAIRS, (), generator=generator))
    if not 0 <= pair_index < N_PAIRS:
        raise ValueError(f"pair_index must be in range({N_PAIRS}), got {pair_index}")
    position = pair_index
    query_slot = torch.full((n,), position, dtype=torch.long)
    clean_ids, keys, values = _sample(n, query_slot, generator)
    clean_value = values[:, position]
    # Shift the digit by 1..9 (mod 10) so the corrupted value always differs.
    shift = torch.randint(1, len(VALUES), (n,), generator=generator)
    corrupted_value = (clean_value + shift) % len(VALUES)
    corrupted_ids = clean_ids.clone()
    corrupted_ids[:, position] = binding_id(keys[:, position], corrupted_value)
    return PatchingPair(
        clean_ids=clean_ids,
        corrupted_ids=corrupted_ids,
        clean_targets=_VALUE_IDS[clean_value],
        corrupted_targets=_VALUE_IDS[corrupted_value],
        position=position,
    )
