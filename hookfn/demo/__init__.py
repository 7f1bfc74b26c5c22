"""A tiny trained GPT-2-style model and the toy task it solves.

The package ships the weights of a :class:`TinyGPT` trained on a key-value
recall task (see :mod:`hookfn.demo.task`), so examples run offline on a real
trained model:

>>> from hookfn.demo import decode, encode, load_model
>>> model = load_model()
>>> logits = model(encode("a3 c7 b1 e7 g0 d2 | c")[None])
>>> decode(logits[0, -1].argmax())
'7'

The shipped model answers by moving the queried binding's value to the query
position in the attention of block 0 (``transformer.h.0.attn``). In a clean
versus corrupted comparison (:func:`make_patching_pair`), patching
``transformer.h.0.attn`` (or any later block output) at ``QUERY_POSITION``
restores the clean answer, and so does patching ``transformer.wte`` at the
corrupted position. Patching a block's output at the corrupted position does
not, because block 0 has already read that position.

The weights are produced by ``python -m hookfn.demo.train``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hookfn.demo.model import TinyGPT, TinyGPTConfig
from hookfn.demo.task import (
    BINDINGS,
    KEYS,
    N_PAIRS,
    QUERY_POSITION,
    SEP,
    SEQ_LEN,
    TOKEN_TO_ID,
    VALUES,
    VOCAB,
    PatchingPair,
    binding_id,
    decode,
    encode,
    make_batch,
    make_patching_pair,
)

__all__ = [
    "BINDINGS",
    "DEMO_CONFIG",
    "KEYS",
    "N_PAIRS",
    "QUERY_POSITION",
    "SEP",
    "SEQ_LEN",
    "TOKEN_TO_ID",
    "VALUES",
    "VOCAB",
    "WEIGHTS_PATH",
    "PatchingPair",
    "TinyGPT",
    "TinyGPTConfig",
    "binding_id",
    "decode",
    "encode",
    "load_model",
    "make_batch",
    "make_patching_pair",
]

DEMO_CONFIG = TinyGPTConfig(vocab_size=len(VOCAB), n_layer=2, n_head=4, d_model=64, n_ctx=SEQ_LEN)
"""Configuration of the shipped model."""

WEIGHTS_PATH = Path(__file__).with_name("tiny_gpt.pt")
"""Location of the shipped ``state_dict``."""


def load_model(path: str | Path | None = None) -> TinyGPT:
    """Load the trained demo model.

    Args:
        path: A ``state_dict`` saved by ``python -m hookfn.demo.train``;
            defaults to the weights shipped with the package.

    Returns:
        A :class:`TinyGPT` with ``DEMO_CONFIG``, on the CPU, in eval mode,
        with float32 parameters. Each call returns a new, independent model.
    """
    state_dict = torch.load(
        WEIGHTS_PATH if path is None else path, map_location="cpu", weights_only=True
    )
    model = TinyGPT(DEMO_CONFIG)
    model.load_state_dict({name: t.float() for name, t in state_dict.items()})
    model.eval()
    return model
