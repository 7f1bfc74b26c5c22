"""`activation_patching` against TransformerLens' own `transformer_lens.patching` functions,
on a `TransformerBridge`: the bridge itself, and a transformers GPT-2 of the same weights."""

from __future__ import annotations

import contextlib
import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_patching_reference import gpt2, prompt_pair
from torch import Tensor, nn

from hookfn.patching import (
    activation_patching,
    each_head,
    each_position,
    head_out,
    logit_diff,
    mlp_out,
    resid_pre,
)

pytest.importorskip("transformer_lens")
pytest.importorskip("transformer_lens.model_bridge.sources")

from transformer_lens import patching


@pytest.fixture(scope="module")
def models() -> tuple[nn.Module, Any]:
    """A transformers GPT-2 and a TransformerBridge around a copy of it (same weights)."""
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module

    model = gpt2(n_layer=3)
    inner = copy.deepcopy(model)
    bridge = build_bridge_from_module(inner, "GPT2LMHeadModel", hf_config=inner.config).eval()
    return model, bridge


def _tl_metric(logits: Tensor) -> Tensor:
    last = logits[:, -1]
    return (last[:, 3] - last[:, 5]).mean()


def _tl(fn: Callable[..., Tensor], bridge: Any, clean: Tensor, corrupted: Tensor) -> Tensor:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(clean)
        # TransformerLens draws a progress bar per sweep: keep it out of the test output.
        with contextlib.redirect_stderr(io.StringIO()):
            return fn(bridge, corrupted, cache, _tl_metric)


CASES = {
    "resid_pre": (patching.get_act_patch_resid_pre, resid_pre, each_position()),
    "attn head out": (patching.get_act_patch_attn_head_out_all_pos, head_out, each_head()),
    "mlp_out": (patching.get_act_patch_mlp_out, mlp_out, each_position()),
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_transformer_lens_on_its_bridge(models: tuple[nn.Module, Any], case: str) -> None:
    _, bridge = models
    tl_fn, sites, over = CASES[case]
    clean, corrupted = prompt_pair(n=2, at=(2, 5))
    want = _tl(tl_fn, bridge, clean, corrupted)
    got = activation_patching(
        bridge, clean, corrupted, sites(bridge), over=over, metric=logit_diff(3, 5)
    )
    assert got.values.shape == want.shape
    torch.testing.assert_close(got.values, want.float(), atol=1e-5, rtol=0)
    assert want.max() - want.min() > 1e-3


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_model_equals_transformer_lens_on_the_same_weights(
    models: tuple[nn.Module, Any], case: str
) -> None:
    model, bridge = models
    tl_fn, sites, over = CASES[case]
    clean, corrupted = prompt_pair(n=2, at=(2, 5))
    want = _tl(tl_fn, bridge, clean, corrupted)
    got = activation_patching(
        model, clean, corrupted, sites(model), over=over, metric=logit_diff(3, 5)
    )
    torch.testing.assert_close(got.values, want.float(), atol=1e-5, rtol=0)
