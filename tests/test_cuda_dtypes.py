"""Half precision on CUDA: edits and patches in bf16 / fp16 models equal raw hooks doing the cast.

Edit values given in float32 or float64 (on the CPU or the GPU) are cast to the activation's
dtype and device, as docs/edits.md says; a cache captured in float32 patches a bf16 / fp16
run with the activation cast back. The reference is a raw ``register_forward_hook`` doing
that cast by hand, on the same CUDA model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_tiny_gpt2
from torch import Tensor, nn

from hookfn import Hook, ablate, add, patch_from, run_with_hooks, scale

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LOW = [torch.bfloat16, torch.float16]
SITE = "transformer.h.1"
VALUE = torch.linspace(-1.0, 1.0, 32, dtype=torch.float64)


def _raw(model: nn.Module, ids: Tensor, fn: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """Logits and the edited activation, with a raw hook replacing SITE's output by fn(out)."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, args: Any, out: Any) -> Any:
        first = out if isinstance(out, Tensor) else out[0]
        new = fn(first)
        seen.append(new.detach().clone())
        return new if isinstance(out, Tensor) else (new, *out[1:])

    handle = model.get_submodule(SITE).register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = model(ids).logits
    finally:
        handle.remove()
    return logits, seen[0]


# edit, and the same by hand on an activation x
EDITS: dict[str, tuple[Any, Callable[[Tensor], Tensor]]] = {
    "add float64 on the CPU": (add(VALUE), lambda x: x + VALUE.to(x)),
    "add float32 on the GPU": (
        add(VALUE.float().cuda()) if torch.cuda.is_available() else None,
        lambda x: x + VALUE.float().to(x),
    ),
    "scale float64 on the CPU": (scale(VALUE), lambda x: x * VALUE.to(x)),
    "ablate": (ablate(5), lambda x: x.index_fill(-1, torch.tensor([5], device=x.device), 0)),
}


@pytest.fixture
def ids() -> Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1)).cuda()


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("edit", EDITS)
def test_edit_values_are_cast_on_cuda(edit: str, dtype: torch.dtype, ids: Tensor) -> None:
    model = make_tiny_gpt2().to("cuda", dtype)
    value, by_hand = EDITS[edit]
    ref_logits, ref_act = _raw(model, ids, by_hand)
    with torch.no_grad():
        out, caches = run_with_hooks(model, ids, {SITE: value})
    capture = caches[SITE].output
    assert (capture.device, capture.dtype) == (ids.device, dtype)
    torch.testing.assert_close(capture, ref_act, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_patch_from_a_float32_cache_on_cuda(dtype: torch.dtype, ids: Tensor) -> None:
    model = make_tiny_gpt2().to("cuda", dtype)
    clean = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(2)).cuda()
    _, cache = run_with_hooks(model, clean, {SITE: Hook(dtype=torch.float32)})
    assert cache[SITE].output.dtype == torch.float32
    _, clean_act = _raw(model, clean, lambda x: x)
    ref_logits, _ = _raw(model, ids, lambda x: clean_act)
    with torch.no_grad():
        out, caches = run_with_hooks(model, ids, {SITE: patch_from(cache).at([2, 3])})
        whole, _ = run_with_hooks(model, ids, {SITE: patch_from(cache)})
    torch.testing.assert_close(whole.logits, ref_logits, rtol=0, atol=0)
    partly_logits, partly = _raw(
        model, ids, lambda x: torch.cat([x[:, :2], clean_act[:, 2:4], x[:, 4:]], dim=1)
    )
    assert caches[SITE].output.dtype == dtype
    torch.testing.assert_close(caches[SITE].output, partly, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, partly_logits, rtol=0, atol=0)
