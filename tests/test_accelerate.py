"""hookfn on models that accelerate offloads or dispatches (CPU only).

accelerate moves weights in and out around each forward by wrapping ``module.forward``; it
does not rename modules. The reference is the same model without offloading, hooked with raw
``register_forward_hook``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_tiny_gpt2, snapshot_hooks
from reference import raw_backward, raw_run
from torch import Tensor, nn

from hookfn import Hook, add, layers, run_with_hooks

accelerate = pytest.importorskip("accelerate")

BLOCKS = ["transformer.h.0", "transformer.h.1"]
CAPTURED = [*BLOCKS, "transformer.h.0.attn", "transformer.h.1.mlp", "transformer.ln_f"]
CPU = torch.device("cpu")


def _cpu_offload(model: nn.Module, tmp_path: Path) -> nn.Module:
    return accelerate.cpu_offload(model, execution_device=CPU)  # type: ignore[no-any-return]


def _disk_offload(model: nn.Module, tmp_path: Path) -> nn.Module:
    return accelerate.disk_offload(  # type: ignore[no-any-return]
        model, offload_dir=str(tmp_path), execution_device=CPU
    )


def _dispatch_cpu_and_disk(model: nn.Module, tmp_path: Path) -> nn.Module:
    device_map = {
        "transformer.wte": "cpu",
        "transformer.wpe": "cpu",
        "transformer.drop": "cpu",
        "transformer.h.0": "cpu",
        "transformer.h.1": "disk",
        "transformer.ln_f": "cpu",
        "lm_head": "cpu",
    }
    return accelerate.dispatch_model(  # type: ignore[no-any-return]
        model, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path)
    )


def _dispatch_cpu_hooks(model: nn.Module, tmp_path: Path) -> nn.Module:
    device_map = {"transformer": "cpu", "lm_head": "cpu"}
    return accelerate.dispatch_model(  # type: ignore[no-any-return]
        model, device_map=device_map, main_device="cpu", force_hooks=True
    )


OFFLOADS: dict[str, Callable[[nn.Module, Path], nn.Module]] = {
    "cpu_offload": _cpu_offload,
    "disk_offload": _disk_offload,
    "dispatch_cpu_disk": _dispatch_cpu_and_disk,
    "dispatch_force_hooks": _dispatch_cpu_hooks,
}
# Where the weights of transformer.h.1's MLP live outside its forward.
RESTING_DEVICE = {
    "cpu_offload": "meta",
    "disk_offload": "meta",
    "dispatch_cpu_disk": "meta",
    "dispatch_force_hooks": "cpu",
}


@pytest.fixture(scope="module")
def base() -> nn.Module:
    return make_tiny_gpt2()


@pytest.fixture
def ids() -> Tensor:
    return torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(1))


def _offloaded(base: nn.Module, kind: str, tmp_path: Path) -> nn.Module:
    model = OFFLOADS[kind](copy.deepcopy(base), tmp_path)
    weight = model.get_submodule("transformer.h.1.mlp.c_fc").weight
    assert weight.device.type == RESTING_DEVICE[kind]
    return model


@pytest.mark.parametrize("kind", OFFLOADS)
def test_names_unchanged(base: nn.Module, kind: str, tmp_path: Path) -> None:
    model = _offloaded(base, kind, tmp_path)
    assert [n for n, _ in model.named_modules()] == [n for n, _ in base.named_modules()]


@pytest.mark.parametrize("kind", OFFLOADS)
def test_captures_equal_the_model_without_offloading(
    base: nn.Module, kind: str, ids: Tensor, tmp_path: Path
) -> None:
    ref_out, ref = raw_run(base, ids, capture=CAPTURED)
    ref_logits = ref_out.logits
    model = _offloaded(base, kind, tmp_path)
    with torch.no_grad():
        out, caches = run_with_hooks(model, ids, CAPTURED)
    torch.testing.assert_close(out.logits, ref_logits, rtol=0, atol=0)
    for name in CAPTURED:
        torch.testing.assert_close(caches[name].output, ref[name], rtol=0, atol=0)


@pytest.mark.parametrize("kind", OFFLOADS)
def test_edits_reach_later_layers(base: nn.Module, kind: str, ids: Tensor, tmp_path: Path) -> None:
    steer = torch.randn(32, generator=torch.Generator().manual_seed(2))
    ref_out, ref = raw_run(base, ids, {"transformer.h.0": lambda x: x + steer}, CAPTURED)
    ref_logits, plain_logits = ref_out.logits, raw_run(base, ids)[0].logits
    model = _offloaded(base, kind, tmp_path)
    spec = {name: "capture" for name in CAPTURED} | {"transformer.h.0": add(steer)}
    with torch.no_grad():
        out, caches = run_with_hooks(model, ids, spec)
    torch.testing.assert_close(out.logits, ref_logits)
    for name in CAPTURED:
        torch.testing.assert_close(caches[name].output, ref[name])
    assert not torch.allclose(out.logits, plain_logits)


@pytest.mark.parametrize("kind", OFFLOADS)
def test_hooks_run_while_weights_rest_offloaded(
    base: nn.Module, kind: str, ids: Tensor, tmp_path: Path
) -> None:
    # accelerate loads a module's weights around its own forward only; in a forward hook of
    # an offloaded module they are back on the meta device. hookfn's hooks never read them.
    model = _offloaded(base, kind, tmp_path)
    devices: list[str] = []

    def spy(x: Tensor, site: Any) -> Tensor:
        devices.append(site.module.c_fc.weight.device.type)
        return x

    with torch.no_grad():
        run_with_hooks(model, ids, {"transformer.h.1.mlp": Hook(spy, input=True, grad=False)})
    assert devices == [RESTING_DEVICE[kind]]


@pytest.mark.parametrize("kind", OFFLOADS)
def test_accelerate_hooks_survive(base: nn.Module, kind: str, ids: Tensor, tmp_path: Path) -> None:
    model = _offloaded(base, kind, tmp_path)
    wrapped = {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
    assert wrapped
    before = snapshot_hooks(model)
    ref_logits = raw_run(base, ids)[0].logits

    def fail(x: Tensor) -> Tensor:
        raise RuntimeError("edit failed")

    with torch.no_grad():
        run_with_hooks(model, ids, {"transformer.h.0": add(1.0), "transformer.h.1.mlp": "capture"})
        with pytest.raises(RuntimeError, match="edit failed"):
            run_with_hooks(model, ids, {"transformer.h.1.mlp.c_fc": fail})
        with pytest.raises(RuntimeError, match="edit failed"):
            run_with_hooks(model, ids, {"transformer.h.1.mlp.c_fc": Hook(edit_input=fail)})
    assert snapshot_hooks(model) == before
    after = {name: m._hf_hook for name, m in model.named_modules() if hasattr(m, "_hf_hook")}
    assert after == wrapped
    weight = model.get_submodule("transformer.h.1.mlp.c_fc").weight
    assert weight.device.type == RESTING_DEVICE[kind]
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref_logits, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["cpu_offload", "dispatch_cpu_disk"])
def test_gradient_capture_through_offloaded_model(
    base: nn.Module, kind: str, ids: Tensor, tmp_path: Path
) -> None:
    reference = raw_backward(
        base, ids, lambda out: out.logits.logsumexp(-1).sum(), ["transformer.h.0"]
    )

    model = _offloaded(base, kind, tmp_path)
    _, caches = run_with_hooks(
        model,
        ids,
        {"transformer.h.0": Hook(grad=True)},
        backward=lambda out: out.logits.logsumexp(-1).sum(),
    )
    torch.testing.assert_close(
        caches["transformer.h.0"].grad_output, reference.grads["transformer.h.0"]
    )


@pytest.mark.parametrize("kind", OFFLOADS)
def test_layers_on_offloaded_model(base: nn.Module, kind: str, ids: Tensor, tmp_path: Path) -> None:
    model = _offloaded(base, kind, tmp_path)
    table = layers(model, ids)
    expected = layers(base, ids)  # checked against raw hooks in test_discover.py
    assert [(i.name, i.shapes, i.calls, i.params) for i in table] == [
        (i.name, i.shapes, i.calls, i.params) for i in expected
    ]
