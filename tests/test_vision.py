"""hookfn on vision models: conv feature maps (NCHW), torchvision and timm models.

A hand-built CNN runs everywhere. torchvision and timm tests run where those packages import:
the torchvision wheels on PyPI are built against a CUDA torch, and beside the CPU build of
torch they fail at import ("operator torchvision::nms does not exist"); timm imports
torchvision. The tests skip with the reason then.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

import pytest
import torch
from conftest import snapshot_hooks
from reference import raw_backward, raw_run
from torch import Tensor, nn

from hookfn import Hook, ablate, add, layers, run_with_hooks


def _import_or_skip(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except (ImportError, RuntimeError) as error:  # RuntimeError: a build mismatch with torch
        pytest.skip(f"{name} cannot be imported here: {type(error).__name__}: {error}")


class Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)  # in place, as in torchvision's ResNets
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(h)) + x)  # type: ignore[no-any-return]


class TinyCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8))
        self.act = nn.ReLU(inplace=True)
        self.block1 = Residual(8)
        self.block2 = Residual(8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.block2(self.block1(self.act(self.stem(x))))
        return self.head(self.pool(h).flatten(1))  # type: ignore[no-any-return]


@pytest.fixture
def cnn() -> nn.Module:
    torch.manual_seed(0)
    model = TinyCNN()
    for module in model.modules():  # non-trivial batch-norm statistics
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.fixture
def images() -> Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


CNN_LAYERS = ["stem", "stem.0", "block1.conv1", "block1.bn2", "block1", "block2.conv2", "pool"]


def test_cnn_feature_maps_equal_raw_hooks(cnn: nn.Module, images: Tensor) -> None:
    ref_out, ref = raw_run(cnn, images, capture=CNN_LAYERS)
    with torch.no_grad():
        out, caches = run_with_hooks(cnn, images, CNN_LAYERS)
    assert torch.equal(out, ref_out)
    for name in CNN_LAYERS:
        assert torch.equal(caches[name].output, ref[name]), name
    assert caches["block1.conv1"].output.shape == (2, 8, 8, 8)  # N, C, H, W
    assert caches["pool"].output.shape == (2, 8, 1, 1)


def test_capture_before_an_in_place_relu_is_kept(cnn: nn.Module, images: Tensor) -> None:
    # bn1's output is rectified in place right after; the capture (a clone) keeps the
    # negative values, as the raw hook's clone does. clone=False sees the rectified tensor.
    _, ref = raw_run(cnn, images, capture=["block1.bn1"])
    assert bool((ref["block1.bn1"] < 0).any())
    with torch.no_grad():
        _, caches = run_with_hooks(cnn, images, ["block1.bn1"])
        _, shared = run_with_hooks(cnn, images, {"block1.bn1": Hook(clone=False)})
    assert torch.equal(caches["block1.bn1"].output, ref["block1.bn1"])
    assert torch.equal(shared["block1.bn1"].output, ref["block1.bn1"].clamp_min(0))


@pytest.mark.parametrize("channels", [[0], [1, 5], slice(0, 4)], ids=str)
def test_channel_ablation_in_nchw(cnn: nn.Module, images: Tensor, channels: Any) -> None:
    def by_hand(x: Tensor) -> Tensor:
        x = x.clone()
        x[:, channels] = 0.0
        return x

    ref_out, ref = raw_run(cnn, images, {"block1": by_hand}, ["block2"])
    with torch.no_grad():
        out, caches = run_with_hooks(
            cnn, images, {"block1": ablate(channels, dim=1), "block2": "capture"}
        )
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(caches["block2"].output, ref["block2"], rtol=0, atol=0)
    assert bool((caches["block1"].output[:, channels] == 0).all())


def test_spatial_and_per_channel_edits(cnn: nn.Module, images: Tensor) -> None:
    bias = torch.linspace(-1, 1, 8)[:, None, None]  # one value per channel, broadcast over H, W

    def top_left(x: Tensor) -> Tensor:
        mask = torch.zeros_like(x)
        mask[..., :4, :4] = 1.0
        return x * (1 - mask)

    ref_out, _ = raw_run(cnn, images, {"stem": lambda x: x + bias, "block2": top_left})
    with torch.no_grad():
        out, _ = run_with_hooks(cnn, images, {"stem": add(bias), "block2": top_left})
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)


def test_feature_map_gradients_equal_retain_grad(cnn: nn.Module, images: Tensor) -> None:
    # Grad-CAM's ingredients: a feature map and the gradient of a class score with respect
    # to it, here against autograd's retain_grad.
    ref = raw_backward(cnn, images, lambda out: out[:, 3].sum(), ["block2"])
    _, caches = run_with_hooks(
        cnn, images, {"block2": Hook(grad=True)}, backward=lambda out: out[:, 3].sum()
    )
    torch.testing.assert_close(caches["block2"].grad_output, ref.grads["block2"])
    torch.testing.assert_close(caches["block2"].output, ref.outputs["block2"])
    assert all(p.grad is None for p in cnn.parameters())


def test_layers_of_a_cnn(cnn: nn.Module, images: Tensor) -> None:
    table = layers(cnn, images)
    by_name = {info.name: info for info in table}
    assert by_name["stem.0"].shape == (2, 8, 8, 8)
    assert by_name["pool"].shape == (2, 8, 1, 1)
    assert by_name["head"].shape == (2, 5)
    assert by_name["block1.relu"].calls == 2  # one ReLU module, called twice per block
    assert by_name["stem.0"].params == 3 * 8 * 9 + 8


def test_training_mode_cnn_is_left_as_it_was(cnn: nn.Module, images: Tensor) -> None:
    cnn.train()
    hooks = snapshot_hooks(cnn)
    state = {k: v.clone() for k, v in cnn.state_dict().items()}
    ref_model = TinyCNN()
    ref_model.load_state_dict(state)
    ref_model.train()
    ref_out, _ = raw_run(ref_model, images)
    out, _ = run_with_hooks(cnn, images, {"block1": "capture"})
    # A training forward updates batch-norm statistics, as it does without hooks.
    torch.testing.assert_close(out, ref_out)
    for key, value in cnn.state_dict().items():
        torch.testing.assert_close(value, ref_model.state_dict()[key])
    assert snapshot_hooks(cnn) == hooks


# -- torchvision ----------------------------------------------------------------------------


def _torchvision_models() -> dict[str, tuple[Callable[[], nn.Module], list[str], str]]:
    tv = _import_or_skip("torchvision")
    return {
        "resnet18": (
            lambda: tv.models.resnet18(weights=None, num_classes=10),
            ["conv1", "layer1.0.conv1", "layer1.0", "layer2", "layer4.1.bn2", "avgpool"],
            "layer2.0",
        ),
        "vit": (
            lambda: tv.models.VisionTransformer(
                image_size=32,
                patch_size=8,
                num_layers=2,
                num_heads=2,
                hidden_dim=32,
                mlp_dim=64,
                num_classes=10,
            ),
            ["conv_proj", "encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.mlp"],
            "encoder.layers.encoder_layer_0",
        ),
    }


def _timm_models() -> dict[str, tuple[Callable[[], nn.Module], list[str], str]]:
    timm = _import_or_skip("timm")
    return {
        "resnet18": (
            lambda: timm.create_model("resnet18", pretrained=False, num_classes=10),
            ["conv1", "layer1.0", "layer3.1.conv2", "global_pool"],
            "layer1.0",
        ),
        "vit": (
            lambda: timm.create_model(
                "vit_tiny_patch16_224",
                pretrained=False,
                img_size=32,
                patch_size=8,
                depth=2,
                num_classes=10,
            ),
            ["patch_embed", "blocks.0", "blocks.1.attn", "blocks.1.mlp.fc1", "norm"],
            "blocks.0",
        ),
    }


LIBRARIES: dict[str, Callable[[], dict[str, tuple[Callable[[], nn.Module], list[str], str]]]] = {
    "torchvision": _torchvision_models,
    "timm": _timm_models,
}


@pytest.mark.parametrize("arch", ["resnet18", "vit"])
@pytest.mark.parametrize("library", LIBRARIES)
def test_library_models_captures_and_edits(library: str, arch: str) -> None:
    build, names, edited = LIBRARIES[library]()[arch]
    torch.manual_seed(0)
    model = build().eval()
    with torch.no_grad():
        for p in model.parameters():  # zero-initialized heads would hide every edit
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.1)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref_out, store = raw_run(model, x, capture=names)
    hooks = snapshot_hooks(model)
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, names)
    assert torch.equal(out, ref_out)
    for name in names:
        assert torch.equal(caches[name].output, store[name]), name

    ref_edit, _ = raw_run(model, x, {edited: lambda o: o * 0.5 + 1.0})
    with torch.no_grad():
        out, _ = run_with_hooks(model, x, {edited: lambda o: o * 0.5 + 1.0})
    torch.testing.assert_close(out, ref_edit, rtol=0, atol=0)
    assert not torch.allclose(out, ref_out)
    assert snapshot_hooks(model) == hooks

    table = {info.name: info for info in layers(model, x)}
    for name in names:
        assert table[name].shape == tuple(store[name].shape), name
