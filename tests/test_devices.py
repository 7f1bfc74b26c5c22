"""Devices and dtypes: edit values follow the activation; captures move and cast as taken.

CPU tests run everywhere (bf16 and fp16 models run on CPU too); tests marked ``cuda`` need a
GPU and are skipped without one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_gpt2
from reference import raw_run
from torch import Tensor, nn

from hookfn import (
    Hook,
    add,
    layers,
    patch_from,
    project_out,
    replace,
    run_with_hooks,
    scale,
    steer,
)

no_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LOW = [torch.bfloat16, torch.float16]
D = 16


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, D), nn.GELU(), nn.Linear(D, D), nn.Linear(D, 4)).to(dtype)


VALUE = torch.linspace(-1.0, 1.0, D, dtype=torch.float64)  # float64 on purpose
# edit factory, and the same edit by hand on an activation ``x`` with ``v`` already cast
EDITS: dict[str, tuple[Callable[[Tensor], Any], Callable[[Tensor, Tensor], Tensor]]] = {
    "add": (add, lambda x, v: x + v),
    "scale": (scale, lambda x, v: x * v),
    "replace": (replace, lambda x, v: v.expand_as(x).clone()),
    # directions are normalized in their own precision, then cast (docs/edits.md)
    "steer": (lambda v: steer(v, 2.0), lambda x, v: x + 2.0 * _unit(x)),
    "project_out": (project_out, lambda x, v: x - (x @ _unit(x))[..., None] * _unit(x)),
}


def _unit(x: Tensor) -> Tensor:
    """``VALUE`` as a unit vector, normalized in float64 and then cast to ``x``'s dtype."""
    return F.normalize(VALUE, dim=-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, *LOW], ids=str)
@pytest.mark.parametrize("edit", EDITS)
def test_edit_values_are_cast_to_the_activation(edit: str, dtype: torch.dtype) -> None:
    model = _mlp(dtype)
    x = torch.randn(5, 8, dtype=dtype)
    factory, by_hand = EDITS[edit]
    ref_out, ref = raw_run(model, x, {"2": lambda a: by_hand(a, VALUE.to(a.dtype))}, ["2"])
    ref_act = ref["2"]
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, {"2": factory(VALUE)})
    assert caches["2"].output.dtype == out.dtype == dtype
    tol = {"rtol": 0, "atol": 0} if edit in ("add", "scale", "replace") else {}
    torch.testing.assert_close(caches["2"].output, ref_act, **tol)
    torch.testing.assert_close(out, ref_out, **tol)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_patch_from_a_float32_cache_into_a_low_precision_model(dtype: torch.dtype) -> None:
    model = _mlp(dtype)
    clean, corrupt = torch.randn(5, 8, dtype=dtype), torch.randn(5, 8, dtype=dtype)
    _, cache = run_with_hooks(model, clean, {"2": Hook(dtype=torch.float32)})
    assert cache["2"].output.dtype == torch.float32
    clean_out, ref = raw_run(model, clean, None, ["2"])
    clean_act = ref["2"]
    with torch.no_grad():
        out, caches = run_with_hooks(model, corrupt, {"2": patch_from(cache)})
    assert caches["2"].output.dtype == dtype
    torch.testing.assert_close(caches["2"].output, clean_act, rtol=0, atol=0)
    torch.testing.assert_close(out, clean_out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_gpt2_on_cpu(dtype: torch.dtype) -> None:
    # bf16 / fp16 models: captures keep the model's dtype, equal raw hooks, and an edit with
    # a float32 vector changes logits exactly as the raw hook with the cast vector does.
    model = make_tiny_gpt2().to(dtype)
    ids = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))
    vector = torch.randn(32)
    ref_out, ref = raw_run(
        model, ids, {"transformer.h.0": lambda a: a + vector.to(a.dtype)}, ["transformer.h.0"]
    )
    ref_act = ref["transformer.h.0"]
    with torch.no_grad():
        out, caches = run_with_hooks(
            model, ids, {"transformer.h.0": add(vector), "transformer.h.1.mlp": "capture"}
        )
    assert caches["transformer.h.0"].output.dtype == dtype
    assert caches["transformer.h.1.mlp"].output.dtype == dtype
    torch.testing.assert_close(caches["transformer.h.0"].output, ref_act, rtol=0, atol=0)
    torch.testing.assert_close(out.logits, ref_out.logits, rtol=0, atol=0)


CASTS = [
    (torch.float32, torch.float16),
    (torch.float32, torch.float64),
    (torch.bfloat16, torch.float32),
    (torch.float16, torch.float32),
]


@pytest.mark.parametrize(("model_dtype", "capture_dtype"), CASTS, ids=str)
def test_captures_are_cast_as_taken(model_dtype: torch.dtype, capture_dtype: torch.dtype) -> None:
    model = _mlp(model_dtype)
    x = torch.randn(5, 8, dtype=model_dtype)
    ref_out, ref = raw_run(model, x, None, ["1"])
    ref_act = ref["1"]
    hook = Hook(input=True, device="cpu", dtype=capture_dtype)
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, {"1": hook})
    capture = caches["1"]
    assert capture.output.dtype == capture.input.dtype == capture_dtype
    assert capture.output.device.type == "cpu"
    assert torch.equal(capture.output, ref_act.to(capture_dtype))
    assert out.dtype == model_dtype  # the model itself still runs in its own dtype
    assert torch.equal(out, ref_out)


def test_cast_leaves_integer_tensors_and_the_model_alone() -> None:
    model = make_tiny_gpt2()
    ids = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        out, caches = run_with_hooks(
            model, ids, {"transformer.wte": Hook(input=True, dtype=torch.float16)}
        )
        ref = model(ids)
    capture = caches["transformer.wte"]
    assert capture.input.dtype == torch.int64
    assert torch.equal(capture.input, ids)
    assert capture.output.dtype == torch.float16
    assert torch.equal(out.logits, ref.logits)


def test_captures_to_meta_keep_shape_and_dtype_only() -> None:
    model = _mlp(torch.bfloat16)
    _, caches = run_with_hooks(
        model, torch.randn(5, 8, dtype=torch.bfloat16), {"2": Hook(device="meta")}
    )
    capture = caches["2"].output
    assert (capture.device.type, capture.shape, capture.dtype) == ("meta", (5, D), torch.bfloat16)


def test_captures_are_not_views_of_the_activation_after_a_cast() -> None:
    # Casting already copies; with clone=False a same-dtype capture is the tensor itself.
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: Tensor) -> Tensor:
            h = self.fc(x)
            return h.mul_(0.0)

    model = InPlace()
    x = torch.randn(2, 4)
    with torch.no_grad():
        _, cast = run_with_hooks(model, x, {"fc": Hook(clone=False, dtype=torch.float64)})
        _, same = run_with_hooks(model, x, {"fc": Hook(clone=False)})
    ref = model.fc(x).double()
    torch.testing.assert_close(cast["fc"].output, ref)  # taken before the in-place zeroing
    assert bool((same["fc"].output == 0).all())  # a reference: it saw the in-place zeroing


# -- CUDA ---------------------------------------------------------------------------------


@pytest.mark.cuda
@no_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_cuda_low_precision_kernels(dtype: torch.dtype, attn: str) -> None:
    model = make_tiny_gpt2().to("cuda", dtype)
    model.set_attn_implementation(attn)
    ids = torch.randint(0, 100, (2, 6), device="cuda")
    vector = torch.randn(32, dtype=torch.float64)  # on the CPU, in float64
    ref_out, ref = raw_run(
        model, ids, {"transformer.h.0": lambda a: a + vector.to(a)}, ["transformer.h.0"]
    )
    ref_act = ref["transformer.h.0"]
    with torch.no_grad():
        out, caches = run_with_hooks(
            model,
            ids,
            {
                "transformer.h.0": Hook(add(vector)),
                "transformer.h.1.attn": Hook(device="cpu", dtype=torch.float32),
            },
        )
    assert caches["transformer.h.0"].output.device.type == "cuda"
    assert caches["transformer.h.0"].output.dtype == dtype
    torch.testing.assert_close(caches["transformer.h.0"].output, ref_act)
    torch.testing.assert_close(out.logits, ref_out.logits)
    attn_out = caches["transformer.h.1.attn"].output
    assert (attn_out.device.type, attn_out.dtype) == ("cpu", torch.float32)


@pytest.mark.cuda
@no_cuda
def test_cuda_multi_device_dispatch() -> None:
    accelerate = pytest.importorskip("accelerate")
    base = make_tiny_gpt2()
    ids = torch.randint(0, 100, (2, 6))
    steer_vector = torch.randn(32)
    ref_out, ref = raw_run(
        base, ids, {"transformer.h.0": lambda a: a + steer_vector}, ["transformer.h.0"]
    )
    ref_act = ref["transformer.h.0"]
    # The second half of the blocks on a second GPU when there is one, else offloaded to CPU
    # memory (accelerate then runs it on cuda:0, loading its weights for each forward).
    # lm_head shares its weight with wte: both stay on cuda:0.
    two = torch.cuda.device_count() > 1
    last: int | str = 1 if two else "cpu"
    runs_on = torch.device("cuda:1" if two else "cuda:0")
    device_map = {
        "transformer.wte": 0,
        "transformer.wpe": 0,
        "transformer.drop": 0,
        "transformer.h.0": 0,
        "transformer.h.1": last,
        "transformer.ln_f": last,
        "lm_head": 0,
    }
    model = accelerate.dispatch_model(copy.deepcopy(base), device_map=device_map)
    spec = {
        "transformer.h.0": add(steer_vector),  # a CPU vector, added on cuda:0
        "transformer.h.1": Hook(device="cpu"),
        "transformer.ln_f": "capture",
    }
    with torch.no_grad():
        out, caches = run_with_hooks(model, ids.to("cuda:0"), spec)
    assert caches["transformer.h.0"].output.device == torch.device("cuda:0")
    assert caches["transformer.h.1"].output.device.type == "cpu"
    assert caches["transformer.ln_f"].output.device == runs_on
    tol = {"rtol": 1e-4, "atol": 1e-4}  # GPU and CPU float32 kernels differ slightly
    torch.testing.assert_close(caches["transformer.h.0"].output.cpu(), ref_act, **tol)
    torch.testing.assert_close(out.logits.cpu(), ref_out.logits, **tol)
    table = layers(model, ids.to("cuda:0"), "transformer.h.*")
    assert [i.shape for i in table] == [(2, 6, 32), (2, 6, 32)]
