"""`layers`: the hookable names of a model with what they produce, against raw hooks."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import make_tiny_gpt2, snapshot_hooks
from reference import raw_layer_calls
from torch import Tensor, nn

from hookfn import LayerInfo, LayerNotFoundError, LayerTable, layers


class Shared(nn.Module):
    """One Linear used twice, one never called, a tuple output and a dict output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 9)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.lstm = nn.LSTM(4, 6, batch_first=True)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.fc(self.fc(x))
        a, _ = self.attn(h, h, h)
        out, (hn, _) = self.lstm(a)
        return {"out": out, "last": hn}


class Tied(nn.Module):
    """The same Linear under two names: its parameters are counted once."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.a(x))  # type: ignore[no-any-return]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.GELU()))


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any]]] = {
    "mlp": (_mlp, lambda: torch.randn(3, 5)),
    "shared": (Shared, lambda: torch.randn(2, 7, 4)),
    "gpt2": (make_tiny_gpt2, lambda: torch.randint(0, 100, (2, 6))),
    "conv": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.MaxPool2d(2)),
        lambda: torch.randn(2, 3, 10, 10),
    ),
}


@pytest.mark.parametrize("kind", MODELS)
def test_layers_match_raw_hooks(kind: str) -> None:
    build, make_inputs = MODELS[kind]
    torch.manual_seed(0)
    model = build().eval()
    inputs = make_inputs()
    table = layers(model, inputs)
    ref = raw_layer_calls(model, inputs)
    assert [(i.name, i.type, i.calls) for i in table] == [(n, t, c) for n, t, _, c in ref]
    for info, (name, _, shapes, _) in zip(table, ref, strict=True):
        assert sorted(info.shapes) == sorted(shapes), name  # same tensors; primary first
        if shapes:
            assert info.shape == shapes[0] or info.shape in shapes, name


def test_details_of_shared_tuple_and_unused_layers() -> None:
    torch.manual_seed(0)
    table = layers(Shared(), torch.randn(2, 7, 4))
    by_name = {info.name: info for info in table}
    assert by_name["fc"].calls == 2
    assert by_name["fc"].shapes == ((2, 7, 4),)
    assert by_name["unused"].calls == 0
    assert by_name["unused"].shapes == ()
    assert by_name["unused"].shape is None
    assert by_name["unused"].params == 4 * 9 + 9
    assert by_name["attn"].shapes == ((2, 7, 4), (2, 7, 7))  # (output, averaged weights)
    assert by_name["lstm"].shapes == ((2, 7, 6), (1, 2, 6), (1, 2, 6))  # out, (h, c)
    assert by_name["lstm"].dtype == torch.float32
    assert by_name["attn.out_proj"].calls == 0  # MultiheadAttention uses its weights directly
    assert table.names == ["fc", "unused", "attn", "attn.out_proj", "lstm"]


def test_params_count_shared_parameters_once() -> None:
    # Named once: named_modules() lists a module under its first name only.
    table = layers(Tied(), torch.randn(2, 3))
    assert [(i.name, i.calls, i.params) for i in table] == [("a", 2, 12)]


def test_match_selects_a_subset_in_model_order() -> None:
    model = make_tiny_gpt2()
    table = layers(model, torch.randint(0, 100, (1, 4)), "transformer.h.*.mlp.c_*")
    assert table.names == [f"transformer.h.{i}.mlp.c_{p}" for i in (0, 1) for p in ("fc", "proj")]
    assert [i.shape for i in table] == [(1, 4, 128), (1, 4, 32)] * 2
    assert [i.type for i in table] == ["Conv1D"] * 4
    with pytest.raises(LayerNotFoundError, match=r"transformer\.h\.\*\.mlq"):
        layers(model, torch.randint(0, 100, (1, 4)), "transformer.h.*.mlq")


def test_leaves_nothing_behind() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.outputs: list[weakref.ref[Tensor]] = []

        def forward(self, x: Tensor) -> Tensor:
            out = self.fc(x)
            self.outputs.append(weakref.ref(out))
            return out

    torch.manual_seed(0)
    model = nn.Sequential(Probe(), nn.Dropout(0.5), nn.BatchNorm1d(4)).train()
    model[0].fc.weight.register_hook(lambda g: g)  # a tensor hook of the user's stays
    hooks = snapshot_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    rng = torch.get_rng_state()

    table = layers(model, x)
    gc.collect()

    assert [i.calls for i in table] == [1, 1, 1, 1]
    assert model[0].outputs[0]() is None  # no activation is kept alive
    assert snapshot_hooks(model) == hooks
    assert torch.equal(torch.get_rng_state(), rng)  # dropout drew, the state is restored
    for key, value in model.state_dict().items():  # batch-norm statistics put back
        assert torch.equal(value, state[key]), key
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    for info in table:
        assert not any(isinstance(v, Tensor) for v in (info.name, info.shapes, info.calls))


def test_forward_and_wrapped_model() -> None:
    model = make_tiny_gpt2()
    ids = torch.randint(0, 100, (1, 4))
    generate = layers(
        model, (ids,), "transformer.h.0", forward=lambda x: model.generate(x, max_new_tokens=3)
    )
    assert [(i.name, i.calls, i.shape) for i in generate] == [("transformer.h.0", 3, (1, 4, 32))]
    # A wrapper's prefix is optional in spec keys; globs report the names without it.
    wrapped = nn.DataParallel(_mlp())
    table = layers(wrapped, torch.randn(3, 5))
    assert table.names == ["0", "1", "2", "2.0", "2.1"]
    assert layers(wrapped, torch.randn(3, 5), "module.2.*").names == ["module.2.0", "module.2.1"]


def test_dtype_and_model_without_submodules() -> None:
    model = _mlp().to(torch.bfloat16)
    table = layers(model, torch.randn(3, 5, dtype=torch.bfloat16))
    assert {i.dtype for i in table} == {torch.bfloat16}
    assert layers(nn.Linear(2, 2), torch.randn(1, 2)) == []
    ids = layers(nn.Sequential(nn.Embedding(10, 3)), torch.tensor([[1, 2]]))
    assert ids[0].dtype == torch.float32


def test_table_text() -> None:
    torch.manual_seed(0)
    table = layers(Shared(), torch.randn(2, 7, 4))
    text = str(table)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "type", "output", "calls", "params"]
    assert len(lines) == len(table) + 1
    assert lines[2].split()[:2] == ["unused", "Linear"]
    assert "(not called)" in lines[2]
    assert lines[2].split()[-2:] == ["0", "45"]
    assert "(2, 7, 6), (1, 2, 6), (1, 2, 6)" in lines[-1]
    long = LayerInfo("x", "T", tuple((i,) for i in range(5)), torch.float32, 1, 1234567)
    assert str(LayerTable([long])).splitlines()[1].split("  ")[-1].strip() == "1,234,567"
    assert "+2 more" in str(long)
    assert isinstance(table, list)
    assert str(LayerTable()) == "name  type  output  calls  params"
