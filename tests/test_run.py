"""`run_with_hooks` against raw ``register_forward_hook`` references and manual recomputation."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import torch
from reference import count_calls, raw_hooks, raw_inputs, raw_run
from torch import Tensor, nn

from hookfn import Args, CaptureError, Hook, SpecError, add, run_with_hooks


def _delta(shape: tuple[int, ...] = (32,), seed: int = 0) -> Tensor:
    # Random, so that LayerNorm cannot erase it as it would a constant.
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# -- GPT-2: captures and edits against raw hooks -----------------------------------------

GPT2_LAYERS = [
    "transformer.wte",
    "transformer.wpe",
    "transformer.h.0",
    "transformer.h.0.ln_1",
    "transformer.h.0.attn",
    "transformer.h.1.attn.c_attn",
    "transformer.h.1.mlp",
    "transformer.ln_f",
    "lm_head",
]


@pytest.mark.parametrize("layer", GPT2_LAYERS)
def test_gpt2_capture_matches_raw_hook(tiny_gpt2, gpt2_inputs, layer):
    ref_out, ref = raw_run(tiny_gpt2, gpt2_inputs, capture=[layer])
    with torch.no_grad():
        out, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, [layer])
    assert list(caches) == [layer]
    assert caches[layer].n_calls == 1
    assert torch.equal(caches[layer].output, ref[layer])
    assert torch.equal(out.logits, ref_out.logits)


EDIT_LAYERS = [
    "transformer.wpe",
    "transformer.h.0",
    "transformer.h.0.attn",
    "transformer.h.1.mlp",
    "transformer.h.1",
    "transformer.ln_f",
]


@pytest.mark.parametrize("layer", EDIT_LAYERS)
def test_gpt2_edit_matches_raw_hook(tiny_gpt2, gpt2_inputs, layer):
    delta = _delta()
    ref_out, ref = raw_run(tiny_gpt2, gpt2_inputs, {layer: lambda o: o + delta}, [layer])
    ref_logits = ref_out.logits
    with torch.no_grad():
        clean = tiny_gpt2(**gpt2_inputs).logits
        out, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, {layer: lambda x: x + delta})
    assert not torch.allclose(clean, ref_logits)  # the edit is visible downstream
    assert torch.equal(out.logits, ref_logits)
    assert torch.equal(caches[layer].output, ref[layer])  # the capture is the edited value


# -- nn.Sequential: manual recomputation --------------------------------------------------


def _mlp() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


SEQ_CASES = [
    # (spec, expected output, expected {layer: captured output}) as functions of (model, x)
    pytest.param(
        {"0": lambda h: h * 2},
        lambda m, x: m[2](torch.tanh(m[0](x) * 2)),
        lambda m, x: {"0": m[0](x) * 2},
        id="edit-first",
    ),
    pytest.param(
        {"1": "capture", "2": add(1.5)},
        lambda m, x: m[2](torch.tanh(m[0](x))) + 1.5,
        lambda m, x: {"1": torch.tanh(m[0](x)), "2": m[2](torch.tanh(m[0](x))) + 1.5},
        id="capture-and-edit",
    ),
    pytest.param(
        ["0", "1", "2"],
        lambda m, x: m(x),
        lambda m, x: {"0": m[0](x), "1": torch.tanh(m[0](x)), "2": m(x)},
        id="capture-all",
    ),
    pytest.param(
        {"0": Hook(lambda h: h.flip(-1), output=False)},
        lambda m, x: m[2](torch.tanh(m[0](x).flip(-1))),
        lambda m, x: {"0": None},
        id="edit-without-capture",
    ),
]


@pytest.mark.parametrize(("spec", "expected", "captured"), SEQ_CASES)
def test_sequential_against_manual(spec, expected, captured):
    model = _mlp()
    x = torch.randn(4, 5)
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, spec)
        want_out = expected(model, x)
        want = captured(model, x)
    assert torch.allclose(out, want_out, atol=1e-6)
    assert list(caches) == list(want)
    for name, value in want.items():
        if value is None:
            assert caches[name].n_calls == 0
            with pytest.raises(CaptureError):
                _ = caches[name].output
        else:
            assert torch.allclose(caches[name].output, value, atol=1e-6)


# -- input forms and forward= ----------------------------------------------------------------


class _Mapping(Mapping[str, Any]):
    """A mapping that is not a dict (like a transformers ``BatchEncoding``)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def _batch_encoding(data: dict[str, Any]) -> Any:
    from transformers import BatchEncoding

    return BatchEncoding(data)


INPUT_FORMS = [
    pytest.param(lambda ids, mask: ids, lambda m, ids, mask: m(ids), id="tensor"),
    pytest.param(lambda ids, mask: (ids,), lambda m, ids, mask: m(ids), id="tuple"),
    pytest.param(
        lambda ids, mask: {"input_ids": ids, "attention_mask": mask},
        lambda m, ids, mask: m(input_ids=ids, attention_mask=mask),
        id="dict",
    ),
    pytest.param(
        lambda ids, mask: _batch_encoding({"input_ids": ids, "attention_mask": mask}),
        lambda m, ids, mask: m(input_ids=ids, attention_mask=mask),
        id="BatchEncoding",
    ),
    pytest.param(
        lambda ids, mask: _Mapping({"input_ids": ids, "attention_mask": mask}),
        lambda m, ids, mask: m(input_ids=ids, attention_mask=mask),
        id="Mapping",
    ),
    pytest.param(
        lambda ids, mask: Args(ids, attention_mask=mask),
        lambda m, ids, mask: m(ids, attention_mask=mask),
        id="Args",
    ),
]


@pytest.mark.parametrize(("make_inputs", "call"), INPUT_FORMS)
def test_input_forms(tiny_gpt2, make_inputs, call):
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a mask that changes the result, so dropping it would be noticed
    with torch.no_grad(), raw_hooks(tiny_gpt2, capture=["transformer.h.1"]) as ref:
        ref_logits = call(tiny_gpt2, ids, mask).logits
    with torch.no_grad():
        out, caches = run_with_hooks(tiny_gpt2, make_inputs(ids, mask), ["transformer.h.1"])
    assert torch.equal(out.logits, ref_logits)
    (expected,) = ref["transformer.h.1"]
    assert torch.equal(caches["transformer.h.1"].output, expected)


def test_mask_matters_in_input_forms(tiny_gpt2):
    # Guards test_input_forms: with the mask it uses, leaving the mask out changes the logits.
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    with torch.no_grad():
        assert not torch.allclose(tiny_gpt2(ids).logits, tiny_gpt2(ids, attention_mask=mask).logits)


def test_tuple_and_args_forms_on_a_two_argument_model():
    class Bilinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 4)
            self.b = nn.Linear(2, 4)

        def forward(self, x: Tensor, y: Tensor, *, scale: float = 1.0) -> Tensor:
            return self.a(x) * self.b(y) * scale

    torch.manual_seed(0)
    model = Bilinear()
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    for inputs, scale in [((x, y), 1.0), (Args(x, y, scale=3.0), 3.0), (Args(x, y=y), 1.0)]:
        with torch.no_grad():
            out, caches = run_with_hooks(model, inputs, ["b"])
            assert torch.allclose(out, model.a(x) * model.b(y) * scale)
            assert torch.equal(caches["b"].output, model.b(y))


def test_forward_function(tiny_gpt2, gpt2_inputs):
    delta = _delta(seed=1)

    def last_logits(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return tiny_gpt2(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1]

    h0 = "transformer.h.0"
    with torch.no_grad():
        with raw_hooks(tiny_gpt2, {h0: lambda o: o + delta}, [h0]) as ref:
            want = last_logits(**gpt2_inputs)
        out, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, {h0: add(delta)}, forward=last_logits)
    assert out.shape == (2, 100)
    assert torch.equal(out, want)
    (expected,) = ref[h0]
    assert torch.equal(caches[h0].output, expected)


def test_forward_function_calling_the_model_several_times(tiny_gpt2, gpt2_inputs):
    # A generation-like loop: each step re-runs the model on a longer sequence.
    def greedy(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        for _ in range(3):
            logits = tiny_gpt2(input_ids=input_ids).logits
            input_ids = torch.cat([input_ids, logits[:, -1:].argmax(-1)], dim=1)
        return input_ids

    with torch.no_grad():
        with raw_hooks(tiny_gpt2, capture=["transformer.ln_f"]) as ref:
            want = greedy(**gpt2_inputs)
        out, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, ["transformer.ln_f"], forward=greedy)
    capture = caches["transformer.ln_f"]
    assert torch.equal(out, want)
    assert capture.n_calls == 3
    assert [o.shape[1] for o in capture.outputs] == [6, 7, 8]
    for got, expected in zip(capture.outputs, ref["transformer.ln_f"], strict=True):
        assert torch.equal(got, expected)


# -- stop_early ----------------------------------------------------------------------------------

STOP_CASES = [
    pytest.param(["transformer.h.0"], "transformer.h.1", id="block-output"),
    pytest.param(
        {"transformer.wpe": "capture", "transformer.h.0.mlp": Hook(input=True)},
        "transformer.h.1",
        id="two-sites-input-and-output",
    ),
    pytest.param(
        {"transformer.wpe": "capture", "transformer.h.0.mlp": Hook(output=False, input=True)},
        "transformer.h.0.mlp.c_fc",  # stops on the input, before the module runs
        id="two-sites-input-only",
    ),
    pytest.param(
        {"transformer.h.1": Hook(output=False, input=True)},
        "transformer.h.1.ln_1",  # stops before the block runs
        id="input-only",
    ),
    pytest.param({"transformer.h.0.attn": "capture"}, "transformer.h.0.ln_2", id="tuple-output"),
    pytest.param(
        {"transformer.h.0": add(_delta(seed=4)), "transformer.h.1.attn": "capture"},
        "transformer.h.1.mlp",
        id="after-an-edit",
    ),
]


@pytest.mark.parametrize(("spec", "later"), STOP_CASES)
def test_stop_early(tiny_gpt2, gpt2_inputs, spec, later):
    with torch.no_grad():
        full_out, full = run_with_hooks(tiny_gpt2, gpt2_inputs, spec)
        with (
            count_calls(tiny_gpt2.get_submodule(later)) as later_calls,
            count_calls(tiny_gpt2.lm_head) as head_calls,
        ):
            out, stopped = run_with_hooks(tiny_gpt2, gpt2_inputs, spec, stop_early=True)
    assert full_out is not None
    assert out is None
    assert later_calls == []  # later layers did not run
    assert head_calls == []
    assert list(stopped) == list(full)
    for name in full:
        assert stopped[name].n_calls == full[name].n_calls == 1
        for got, expected in [
            *zip(stopped[name].outputs, full[name].outputs, strict=True),
            *zip(stopped[name].inputs, full[name].inputs, strict=True),
        ]:
            assert torch.equal(got, expected)


def test_stop_early_captures_match_raw_hook(tiny_gpt2, gpt2_inputs):
    _, ref = raw_run(tiny_gpt2, gpt2_inputs, capture=["transformer.h.0.attn"])
    with torch.no_grad():
        out, caches = run_with_hooks(
            tiny_gpt2, gpt2_inputs, ["transformer.h.0.attn"], stop_early=True
        )
    assert out is None
    assert torch.equal(caches["transformer.h.0.attn"].output, ref["transformer.h.0.attn"])


def test_stop_early_runs_to_the_end_when_a_site_is_never_called():
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(3, 3)
            self.unused = nn.Linear(3, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.used(x) * 2

    model = WithUnused()
    x = torch.randn(2, 3)
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, ["used", "unused"], stop_early=True)
        assert torch.equal(out, model.used(x) * 2)
    assert caches["used"].n_calls == 1
    assert caches["unused"].n_calls == 0


def test_stop_early_and_backward_are_exclusive(tiny_gpt2, gpt2_inputs):
    with pytest.raises(SpecError, match="stop_early"):
        run_with_hooks(
            tiny_gpt2,
            gpt2_inputs,
            ["transformer.h.0"],
            stop_early=True,
            backward=lambda out: out.logits.sum(),
        )


# -- spec forms --------------------------------------------------------------------------------


def _names(model: nn.Module, pattern: str) -> list[str]:
    return [n for n, _ in model.named_modules() if n and re.fullmatch(pattern, n)]


SPEC_KEYS = [
    # (spec, regular expression the resulting names must be exactly the matches of)
    pytest.param(["transformer.h.*"], r"transformer\.h\.\d+", id="blocks-only"),
    pytest.param(["transformer.h.*.mlp"], r"transformer\.h\.\d+\.mlp", id="every-mlp"),
    pytest.param(["**"], r".+", id="double-star-everything"),
    pytest.param(["transformer.h.**"], r"transformer\.h\..+", id="double-star-below"),
    pytest.param(["**.c_proj"], r".*\.c_proj", id="double-star-suffix"),
    pytest.param(["transformer.h.?.attn"], r"transformer\.h\.\d\.attn", id="question-mark"),
    pytest.param(["transformer.h.[1].mlp"], r"transformer\.h\.1\.mlp", id="char-class"),
    pytest.param(["transformer.h.[!1]"], r"transformer\.h\.0", id="negated-char-class"),
    pytest.param("transformer.h.0", r"transformer\.h\.0", id="single-string"),
    pytest.param(("lm_head", "transformer.wte"), r"transformer\.wte|lm_head", id="tuple"),
    pytest.param(
        {"lm_head": "capture", "transformer.wte": "capture"},
        r"transformer\.wte|lm_head",
        id="mapping",
    ),
    pytest.param(
        {"transformer.h.*": "capture", "transformer.h.1.mlp": "capture"},
        r"transformer\.h\.\d+|transformer\.h\.1\.mlp",
        id="glob-plus-exact",
    ),
]


@pytest.mark.parametrize(("spec", "pattern"), SPEC_KEYS)
def test_spec_keys_resolve_to_model_order(tiny_gpt2, gpt2_inputs, spec, pattern):
    with torch.no_grad():
        _, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, spec)
    assert list(caches) == _names(tiny_gpt2, pattern)  # named_modules() order


def test_blocks_glob_excludes_submodules(tiny_gpt2, gpt2_inputs):
    with torch.no_grad():
        _, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, ["transformer.h.*"])
    assert list(caches) == ["transformer.h.0", "transformer.h.1"]


def test_result_order_is_model_order_not_spec_order(tiny_gpt2, gpt2_inputs):
    spec = {
        "lm_head": "capture",
        "transformer.h.1": "capture",
        "transformer.wte": "capture",
        "transformer.h.0.mlp": "capture",
    }
    with torch.no_grad():
        _, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, spec)
    assert list(caches) == ["transformer.wte", "transformer.h.0.mlp", "transformer.h.1", "lm_head"]


def test_module_objects_as_keys(tiny_gpt2, gpt2_inputs):
    delta = _delta(seed=2)
    mlp = tiny_gpt2.transformer.h[0].mlp
    name = "transformer.h.0.mlp"
    ref_out, ref = raw_run(tiny_gpt2, gpt2_inputs, {name: lambda o: o + delta}, [name])
    ref_logits = ref_out.logits
    with torch.no_grad():
        out, caches = run_with_hooks(
            tiny_gpt2, gpt2_inputs, {tiny_gpt2.lm_head: "capture", mlp: add(delta)}
        )
    assert list(caches) == ["transformer.h.0.mlp", "lm_head"]
    assert torch.equal(caches["transformer.h.0.mlp"].output, ref[name])
    assert torch.equal(out.logits, ref_logits)
    assert torch.equal(caches["lm_head"].output, ref_logits)


@pytest.mark.parametrize("exact_first", [True, False])
@pytest.mark.parametrize("by_object", [False, True])
def test_exact_key_overrides_glob(tiny_gpt2, gpt2_inputs, exact_first, by_object):
    delta = _delta(seed=3)
    block = tiny_gpt2.transformer.h[0]
    exact: Any = block if by_object else "transformer.h.0"
    items = [(exact, add(delta)), ("transformer.h.*", "capture")]
    spec = dict(items if exact_first else items[::-1])
    blocks = ["transformer.h.0", "transformer.h.1"]
    ref_out, ref = raw_run(tiny_gpt2, gpt2_inputs, {blocks[0]: lambda o: o + delta}, blocks)
    with torch.no_grad():
        out, caches = run_with_hooks(tiny_gpt2, gpt2_inputs, spec)
    assert list(caches) == blocks
    assert torch.equal(out.logits, ref_out.logits)
    assert torch.equal(caches["transformer.h.0"].output, ref["transformer.h.0"])
    assert torch.equal(caches["transformer.h.1"].output, ref["transformer.h.1"])


CLASHES = [
    pytest.param(
        lambda m: {"transformer.h.*": "capture", "transformer.*.0": add(1.0)}, id="two-globs"
    ),
    pytest.param(
        lambda m: {"transformer.h.0": "capture", m.transformer.h[0]: "capture"},
        id="name-and-object",
    ),
    pytest.param(lambda m: ["transformer.h.0", "transformer.h.0"], id="same-name-twice"),
    pytest.param(lambda m: {"**": "capture", "transformer.**": "capture"}, id="nested-globs"),
]


@pytest.mark.parametrize("make_spec", CLASHES)
def test_two_keys_on_one_module_is_an_error(tiny_gpt2, gpt2_inputs, make_spec):
    with pytest.raises(SpecError, match="named by two spec keys"):
        run_with_hooks(tiny_gpt2, gpt2_inputs, make_spec(tiny_gpt2))


# -- modules called several times; kwargs ---------------------------------------------------------


class SharedTwice(nn.Module):
    """Calls ``shared`` twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.inp = nn.Linear(4, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.shared(self.inp(x)))
        return self.out(self.shared(h))


def test_shared_module_records_every_call_in_order():
    model = SharedTwice()
    x = torch.randn(3, 4)
    with torch.no_grad(), raw_hooks(model, capture=["shared"]) as ref:
        want = model(x)
    store = ref["shared"]
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, {"shared": Hook(input=True)})
    capture = caches["shared"]
    assert torch.equal(out, want)
    assert capture.n_calls == 2
    assert len(capture.outputs) == len(store) == 2
    for got, expected in zip(capture.outputs, store, strict=True):
        assert torch.equal(got, expected)
    assert not torch.equal(capture.outputs[0], capture.outputs[1])
    with pytest.raises(CaptureError, match=r"2 times.*\.outputs\[i\]"):
        _ = capture.output
    with pytest.raises(CaptureError, match=r"2 times.*\.inputs\[i\]"):
        _ = capture.input
    with torch.no_grad():
        assert torch.equal(capture.inputs[0], model.inp(x))
        assert torch.equal(capture.inputs[1], torch.tanh(store[0]))


def test_edit_of_one_call_of_a_shared_module():
    model = SharedTwice()
    x = torch.randn(3, 4)
    delta = _delta((6,), seed=8)
    calls: list[int] = []

    def on_the_second_call(o: Tensor) -> Tensor:
        calls.append(1)
        return o + delta if len(calls) == 2 else o

    want, _ = raw_run(model, x, {"shared": on_the_second_call})
    assert len(calls) == 2
    seen: list[tuple[str, int, str, nn.Module]] = []

    def second_call_only(x: Tensor, site: Any) -> Tensor:
        seen.append((str(site), site.call, site.kind, site.module))
        return x + delta if site.call == 1 else x

    with torch.no_grad():
        out, caches = run_with_hooks(model, x, {"shared": second_call_only})
    assert torch.equal(out, want)
    assert seen == [
        ("shared", 0, "output", model.shared),
        ("shared", 1, "output", model.shared),
    ]
    assert caches["shared"].n_calls == 2


class Gated(nn.Module):
    def forward(self, x: Tensor, gate: Tensor | None = None, *, scale: float = 1.0) -> Tensor:
        return x * scale if gate is None else x * torch.sigmoid(gate) * scale


class CallsWithKwargs(nn.Module):
    def __init__(self, kwargs_only: bool) -> None:
        super().__init__()
        torch.manual_seed(9)
        self.lin = nn.Linear(4, 4)
        self.gated = Gated()
        self.kwargs_only = kwargs_only

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        h = self.lin(x)
        if self.kwargs_only:
            return self.gated(x=h, gate=gate, scale=2.0)
        return self.gated(h, gate=gate, scale=2.0)


@pytest.mark.parametrize("kwargs_only", [False, True])
def test_input_capture_of_args_and_kwargs(kwargs_only):
    model = CallsWithKwargs(kwargs_only)
    x, gate = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad(), raw_inputs(model, ["gated"]) as seen:
        want = model(x, gate)
    ((ref_args, ref_kwargs),) = seen["gated"]
    with torch.no_grad():
        out, caches = run_with_hooks(model, Args(x, gate=gate), {"gated": Hook(input=True)})
    raw = caches["gated"].raw_input
    assert torch.equal(out, want)
    assert len(raw.args) == len(ref_args)
    for got, expected in zip(raw.args, ref_args, strict=True):
        assert torch.equal(got, expected)
    assert list(raw.kwargs) == list(ref_kwargs)
    for key, value in ref_kwargs.items():
        if isinstance(value, Tensor):
            assert torch.equal(raw.kwargs[key], value)
        else:
            assert raw.kwargs[key] == value
    with torch.no_grad():
        assert torch.equal(caches["gated"].input, model.lin(x))  # first positional, else kwarg


@pytest.mark.parametrize("kwargs_only", [False, True])
def test_input_edit_of_args_and_kwargs(kwargs_only):
    model = CallsWithKwargs(kwargs_only)
    x, gate = torch.randn(3, 4), torch.randn(3, 4)
    delta = _delta((4,), seed=10)

    # the first positional argument, or (called with keywords only) the first keyword: x
    want, _ = raw_run(model, (x, gate), pre_edits={"gated": lambda h: h + delta})
    with torch.no_grad():
        out, caches = run_with_hooks(
            model, (x, gate), {"gated": Hook(edit_input=add(delta), input=True)}
        )
        assert torch.equal(out, want)
        assert torch.equal(caches["gated"].input, model.lin(x) + delta)


# -- validation at the boundary: a HookfnError before any hook is registered -------------


def _small() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def test_a_malformed_glob_is_a_spec_error() -> None:
    model = _small()
    with pytest.raises(SpecError, match="malformed"):
        run_with_hooks(model, torch.randn(1, 4), ["[z-a]"])
    assert not model[0]._forward_hooks


def test_an_inputs_mapping_with_other_keys_than_strings_is_a_spec_error() -> None:
    model = _small()
    with pytest.raises(SpecError, match="not a string"):
        run_with_hooks(model, {0: torch.randn(1, 4)}, {"0": add(1.0)})
    assert not model[0]._forward_hooks


def test_params_of_a_wrong_dtype_or_two_tensors_for_one_tied_weight(tiny_gpt2) -> None:
    ids = torch.randint(0, 50, (1, 4))
    weight = tiny_gpt2.transformer.wte.weight
    with pytest.raises(SpecError, match="dtype"):
        run_with_hooks(tiny_gpt2, ids, {}, params={"transformer.wte.weight": weight.long()})
    with pytest.raises(SpecError, match="tied"):
        run_with_hooks(
            tiny_gpt2,
            ids,
            {},
            params={"transformer.wte.weight": weight * 2, "lm_head.weight": weight * 3},
        )


def test_an_edit_at_a_module_the_run_never_called_is_reported() -> None:
    from hookfn import EditError, NotCalledWarning

    model = nn.ModuleDict({"used": nn.Linear(4, 4), "unused": nn.Linear(4, 4)})
    x = torch.randn(1, 4)
    with pytest.warns(NotCalledWarning, match="'unused'"):
        run_with_hooks(model, x, {"unused": add(1.0), "used": add(1.0)}, forward=model.used)
    with pytest.raises(EditError, match="'unused'"):
        run_with_hooks(model, x, {"unused": add(1.0)}, forward=model.used, strict=True)
    assert not model.unused._forward_hooks


def test_bad_forward_or_backward_arguments_are_spec_errors_before_the_forward() -> None:
    model = _small()
    with count_calls(model[0]) as calls:
        with pytest.raises(SpecError, match="backward="):
            run_with_hooks(model, torch.randn(1, 4), {"0": Hook(grad=True)}, backward=3)  # type: ignore[arg-type]
        with pytest.raises(SpecError, match="forward="):
            run_with_hooks(model, torch.randn(1, 4), ["0"], forward=3)  # type: ignore[arg-type]
        with pytest.raises(SpecError, match="stop_early"):
            run_with_hooks(model, torch.randn(1, 4), ["0"], stop_early="yes")  # type: ignore[arg-type]
    assert calls == []
    assert not model[0]._forward_hooks
