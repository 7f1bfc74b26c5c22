"""Shared test fixtures: a tiny seeded GPT-2, its inputs, and a snapshot of hook dictionaries.

Fixtures:
    tiny_gpt2: a 2-layer GPT-2 LM (``n_embd=32``, 4 heads, vocabulary 100, 32 positions) with
        seeded random weights, in eval mode. Session-scoped and shared: never change it.
    gpt2_inputs: ``{"input_ids": (2, 6) int64, "attention_mask": ones}`` for it, seeded.
    hook_snapshot: the `snapshot_hooks` function below.
    make_gpt2: the `make_tiny_gpt2` function below (for a model of a test's own).

Helpers (``from conftest import ...``, or through the fixtures above):
    make_tiny_gpt2(n_layer=2, seed=0): a fresh model, for tests that need their own.
    snapshot_hooks(model): every hook dictionary of every module (and the global ones), as
        plain data; two snapshots compare equal exactly when the same hooks are registered
        in the same order.
    HOOK_DICTS: the names of the per-module hook dictionaries that snapshots cover.
"""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
from torch import nn

os.environ.setdefault("OMP_NUM_THREADS", "1")

HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_always_called",
)

_GLOBAL_HOOK_DICTS = (
    "_global_forward_hooks",
    "_global_forward_hooks_with_kwargs",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
    "_global_forward_hooks_always_called",
)

VOCAB = 100


def make_tiny_gpt2(n_layer: int = 2, seed: int = 0) -> nn.Module:
    """A transformers GPT-2 LM with seeded random weights, in eval mode."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=32,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def snapshot_hooks(model: nn.Module) -> dict[str, list[tuple[Any, ...]]]:
    """Every hook dictionary of every module of ``model`` and the global ones, as plain data.

    Keys are ``"<module name>:<dict name>"`` (``"<global>:<dict name>"`` for torch's global
    hooks); values list ``(handle id, hook object)`` in order, so a snapshot taken after a run
    equals one taken before exactly when nothing was left registered, removed or reordered.
    """
    import torch.nn.modules.module as module_lib

    snapshot: dict[str, list[tuple[Any, ...]]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr in HOOK_DICTS:
            hooks = getattr(module, attr)
            snapshot[f"{name}:{attr}"] = [(key, value) for key, value in hooks.items()]
    for attr in _GLOBAL_HOOK_DICTS:
        hooks = getattr(module_lib, attr, {})
        snapshot[f"<global>:{attr}"] = [(key, value) for key, value in hooks.items()]
    return snapshot


@pytest.fixture(scope="session")
def tiny_gpt2() -> nn.Module:
    return make_tiny_gpt2()


@pytest.fixture
def gpt2_inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (2, 6), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def hook_snapshot() -> Any:
    return snapshot_hooks


@pytest.fixture
def make_gpt2() -> Any:
    return make_tiny_gpt2
