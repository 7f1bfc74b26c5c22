"""The resolved spec kept between runs: it never outlives the model, never goes stale.

A run with the same keys as an earlier one reuses that run's resolution. Each test changes
the model between two runs in a way that must be seen, and compares the second run with
raw ``register_forward_hook`` hooks on the model as it is then.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch
from reference import raw_hooks, raw_run
from torch import Tensor, nn

from hookfn import (
    CompileError,
    Hook,
    LayerNotFoundError,
    Trace,
    TraceMultiple,
    _plan,
    add,
    patch_from,
    run_with_hooks,
)


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 6), nn.Sequential(nn.Linear(6, 6), nn.Tanh()), nn.Linear(6, 3)
    ).eval()


def raw_outputs(model: nn.Module, x: Tensor, names: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
    """The reference: plain forward hooks storing clones."""
    with raw_hooks(model, capture=names) as store:
        out = model(x)
    return out, {name: values[0] for name, values in store.items()}


NAMES = ["0", "1.0", "1.1", "2"]


def assert_matches_raw(model: nn.Module, x: Tensor, spec: Any) -> None:
    out, caches = run_with_hooks(model, x, spec)
    ref_out, ref = raw_outputs(model, x, NAMES)
    torch.testing.assert_close(out, ref_out)
    assert list(caches) == NAMES
    for name in NAMES:
        torch.testing.assert_close(caches[name].output, ref[name])


RUNS: dict[str, Callable[[nn.Module, Tensor], object]] = {
    "names": lambda m, x: run_with_hooks(m, x, NAMES),
    "edit": lambda m, x: run_with_hooks(m, x, {"1.0": add(torch.ones(6)), "2": "capture"}),
    "glob": lambda m, x: run_with_hooks(m, x, ["**"]),
    "module key": lambda m, x: run_with_hooks(m, x, {m[1]: "capture"}),  # type: ignore[index]
    "root": lambda m, x: run_with_hooks(m, x, [""]),
    "Trace": lambda m, x: Trace(m, "1.0").__enter__().__exit__(None, None, None),
    "TraceMultiple": lambda m, x: TraceMultiple(m, NAMES).__enter__().__exit__(None, None, None),
}


@pytest.mark.parametrize("run", list(RUNS))
def test_a_hooked_model_is_freed_when_dropped(run: str) -> None:
    model = make_net()
    x = torch.randn(2, 6)
    RUNS[run](model, x)
    RUNS[run](model, x)  # the second run takes the kept resolution where there is one
    ref, key = weakref.ref(model), id(model)
    del model
    gc.collect()
    assert ref() is None, "the model is still referenced after the runs"
    assert key not in _plan._KEPT, "the freed model's index was kept"


def test_the_same_keys_run_twice_match_raw_hooks_both_times() -> None:
    model, x = make_net(), torch.randn(2, 6)
    assert_matches_raw(model, x, NAMES)
    assert tuple(NAMES) in kept(model)
    assert_matches_raw(model, x, NAMES)


def test_a_replaced_layer_is_hooked_in_the_next_run() -> None:
    model, x = make_net(), torch.randn(2, 6)
    run_with_hooks(model, x, NAMES)
    model[2] = nn.Linear(6, 3)
    assert_matches_raw(model, x, NAMES)
    _, caches = run_with_hooks(model, x, ["2"])
    torch.testing.assert_close(caches["2"].output, model[2](model[1](model[0](x))))


def test_a_replaced_parent_is_followed_in_the_next_run() -> None:
    model, x = make_net(), torch.randn(2, 6)
    run_with_hooks(model, x, NAMES)
    model[1] = nn.Sequential(nn.Linear(6, 6), nn.ReLU())
    assert_matches_raw(model, x, NAMES)


def test_a_removed_layer_is_reported_in_the_next_run() -> None:
    from hookfn import LayerNotFoundError

    model, x = make_net(), torch.randn(2, 6)
    run_with_hooks(model, x, NAMES)
    model[1] = nn.Linear(6, 6)  # "1.0" and "1.1" no longer exist
    with pytest.raises(LayerNotFoundError, match=r"1\.0"):
        run_with_hooks(model, x, NAMES)


def test_new_values_for_the_same_keys_are_used() -> None:
    model, x = make_net(), torch.randn(2, 6)
    for scale in (1.0, -2.0, 0.5):
        delta = torch.randn(6) * scale
        out, _ = run_with_hooks(model, x, {"0": add(delta), "2": Hook(output=False)})
        with torch.no_grad():
            expected = model[2](model[1](model[0](x) + delta))
        torch.testing.assert_close(out, expected)


def test_a_site_that_records_nothing_has_an_empty_capture_in_every_run() -> None:
    # Its capture is one value, kept with the resolution: it must stay empty and named,
    # while the sites beside it record this run's values, and a gradient asked for at an
    # edit-only site is still recorded.
    model, x = make_net(), torch.randn(2, 6)
    for _ in range(3):
        delta = torch.randn(6)
        spec = {"0": Hook(add(delta), output=False), "1.0": "capture", "2": Hook(output=False)}
        _, caches = run_with_hooks(model, x, spec)
        with torch.no_grad():
            want = raw_run(model, x, {"0": lambda h, d=delta: h + d}, capture=["1.0"])[1]
        for name in ("0", "2"):
            capture = caches[name]
            assert (capture.name, capture.n_calls) == (name, 0)
            assert (capture.raw_outputs, capture.grad_outputs) == ((), ())
        torch.testing.assert_close(caches["1.0"].output, want["1.0"])
    _, caches = run_with_hooks(
        model, x, {"0": Hook(add(delta), output=False, grad=True)}, backward=lambda y: y.sum()
    )
    reference = model[0](x).detach().requires_grad_()
    model[2](model[1](reference + delta)).sum().backward()
    assert caches["0"].n_calls == 0
    torch.testing.assert_close(caches["0"].grad_outputs[0], reference.grad)


def test_a_layer_compiled_in_place_after_a_run_is_refused() -> None:
    model, x = make_net(), torch.randn(2, 6)
    run_with_hooks(model, x, NAMES)
    model[1].compile(backend="eager")
    with pytest.raises(CompileError, match="'1'"):
        run_with_hooks(model, x, NAMES)


def test_the_kept_resolutions_are_bounded() -> None:
    model = nn.Sequential(*[nn.Linear(2, 2) for _ in range(20)])
    x = torch.randn(1, 2)
    for i in range(20):
        for j in range(20):
            if i != j:
                _, caches = run_with_hooks(model, x, [str(i), str(j)])
                assert list(caches) == sorted([str(i), str(j)], key=int)
    assert 0 < len(kept(model)) <= 256
    assert ("19", "18") in kept(model)  # the latest is kept


def test_sites_given_to_edits_are_right_in_every_run_and_call() -> None:
    """Sites are kept between runs of one spec: each run still counts its calls from 0,
    also past the calls whose sites are kept, and names the module of that run."""
    shared = nn.Linear(4, 4)
    model = nn.Sequential(*[shared] * 70)  # one module called 70 times
    x = torch.randn(1, 4)
    seen: list[tuple[str, int, str, nn.Module]] = []

    def record(t: Tensor, site: Any) -> Tensor:
        seen.append((str(site), site.call, site.kind, site.module))
        return t

    for _ in range(2):
        seen.clear()
        run_with_hooks(model, x, {"0": Hook(record, edit_input=record)})
        assert [call for _, call, kind, _ in seen if kind == "output"] == list(range(70))
        assert [call for _, call, kind, _ in seen if kind == "input"] == list(range(70))
        assert all(name == "0" and module is shared for name, _, _, module in seen)
    model[0] = nn.Linear(4, 4)  # a new module under the same name
    seen.clear()
    run_with_hooks(model, x, {"0": Hook(record)})
    assert [module for *_, module in seen] == [model[0]]


def test_a_glob_sees_modules_added_removed_or_swapped_between_runs() -> None:
    model, x = make_net(), torch.randn(2, 6)

    def check(glob: str) -> None:
        names = [n for n, _ in model.named_modules() if n and n.count(".") == glob.count(".")]
        out, caches = run_with_hooks(model, x, [glob])
        ref_out, ref = raw_outputs(model, x, names)
        torch.testing.assert_close(out, ref_out)
        assert list(caches) == names
        for name in names:
            torch.testing.assert_close(caches[name].output, ref[name])

    check("*")
    check("*")
    model.append(nn.Linear(3, 3))  # a new top-level layer: "3"
    check("*")
    check("1.*")
    model[1].append(nn.Linear(6, 6))  # a new match deeper down: "1.2"
    check("1.*")
    model[1][0] = nn.Linear(6, 6)  # a swapped match
    check("1.*")
    del model[1][2]
    check("1.*")


def test_a_glob_edit_acts_on_every_match_with_this_runs_value() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    x = torch.randn(2, 4)
    for _ in range(3):
        delta = torch.randn(4)
        out, caches = run_with_hooks(model, x, {"*": add(delta)})
        h = x
        with torch.no_grad():
            for layer in model:
                h = layer(h) + delta
                assert torch.allclose(caches[str(list(model).index(layer))].output, h)
        torch.testing.assert_close(out, h)


def kept(model: nn.Module) -> dict[tuple[object, ...], object]:
    """The resolutions kept for ``model``, by tuple of keys."""
    entry = _plan._KEPT.get(id(model))
    return {} if entry is None else dict(entry[1])


# -- a kept resolution follows the live module tree --------------------------------------


def test_del_on_a_sequential_hooks_the_layer_the_name_means_now() -> None:
    model, x = make_net(), torch.randn(2, 6)
    model = nn.Sequential(*model, nn.Linear(3, 3))
    run_with_hooks(model, x, ["1", "3"])
    del model[0]  # renumbers: "1" is now the old "2", and "3" no longer exists
    with pytest.raises(LayerNotFoundError, match="'3'"):
        run_with_hooks(model, torch.randn(2, 6), ["1", "3"])
    x = torch.randn(2, 6)
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, ["1", "2"])
    ref_out, ref = raw_run(model, x, capture=["1", "2"])
    torch.testing.assert_close(out, ref_out)
    for name in ("1", "2"):
        torch.testing.assert_close(caches[name].output, ref[name])


def test_del_on_a_transformers_module_list_hooks_the_layer_the_name_means_now() -> None:
    from conftest import make_tiny_gpt2

    model = make_tiny_gpt2(n_layer=3).eval()
    ids = torch.randint(0, 50, (1, 5))
    names = ["transformer.h.0", "transformer.h.1"]
    run_with_hooks(model, ids, names)
    del model.transformer.h[0]
    with torch.no_grad():
        _, caches = run_with_hooks(model, ids, names)
    _ref_out, ref = raw_run(model, ids, capture=names)
    for name in names:
        torch.testing.assert_close(caches[name].output, ref[name], rtol=0, atol=0)
        assert caches[name].output.data_ptr() != ref[name].data_ptr()


def test_replacing_one_parent_of_a_module_registered_under_two_names() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(nn.Sequential(shared), nn.Sequential(shared)).eval()
    x = torch.randn(2, 4)
    run_with_hooks(model, x, {"1.0": add(torch.randn(4))})
    model[1] = nn.Sequential(nn.Linear(4, 4))  # "1.0" is another module now
    delta = torch.randn(4)
    with torch.no_grad():
        out, caches = run_with_hooks(model, x, {"1.0": add(delta)})
    ref_out, ref = raw_run(model, x, {"1.0": lambda h: h + delta}, capture=["1.0"])
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(caches["1.0"].output, ref["1.0"])
    assert shared._forward_hooks == {}
    assert model[1][0]._forward_hooks == {}


def test_reinserted_children_come_back_in_the_new_model_order() -> None:
    model = nn.Sequential()
    model.add_module("a", nn.Linear(4, 4))
    model.add_module("b", nn.Linear(4, 4))
    x = torch.randn(2, 4)

    def forward_b_then_a(inputs: Tensor) -> Tensor:
        return model.b(model.a(inputs))

    _, first = run_with_hooks(model, x, ["a", "b"], forward=forward_b_then_a)
    assert list(first) == ["a", "b"]
    a = model.a
    del model.a
    model.add_module("a", a)  # now after "b" in named_modules()
    assert [n for n, _ in model.named_modules()][1:] == ["b", "a"]
    _, again = run_with_hooks(model, x, ["a", "b"], forward=forward_b_then_a)
    assert list(again) == ["b", "a"]


def test_a_model_whose_submodule_refers_back_to_it_is_freed() -> None:
    model, x = make_net(), torch.randn(2, 6)
    # A user's hook that closes over the model: a reference from a submodule to the root.
    model[0].register_forward_hook(lambda m, a, o, model=model: None)
    for _ in range(2):
        run_with_hooks(model, x, {"0": add(1.0), "1.*": "capture"})
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None


def test_a_kept_resolution_holds_no_spec_values() -> None:
    model, x = make_net(), torch.randn(2, 6)
    big = torch.randn(6)
    cache_out, cache = run_with_hooks(model, x, ["0"])
    refs = [weakref.ref(big), weakref.ref(cache["0"].output)]
    edit = add(big) >> patch_from(cache).at(0)
    run_with_hooks(model, x, {"0": edit, "2": "capture"})
    assert ("0", "2") in kept(model)
    del big, cache, edit, cache_out
    gc.collect()
    assert all(r() is None for r in refs), "a finished run's edit values are still held"


# -- kept resolutions: the cases a check could miss ---------------------------------------


class _WithProperty(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))

    @property
    def first(self) -> nn.Module:
        return self.layers[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # type: ignore[no-any-return]


def test_a_name_through_a_property_is_resolved_again_on_every_run() -> None:
    model, x = _WithProperty(), torch.randn(2, 4)
    run_with_hooks(model, x, ["first"])
    model.layers[0] = nn.Sequential(model.layers[0], nn.Tanh())  # the old layer stays alive
    with torch.no_grad():
        _, caches = run_with_hooks(model, x, ["first"])
        torch.testing.assert_close(caches["first"].output, model.first(x))
    assert ("first",) not in kept(model)


class _TwoOrThree(nn.Module):
    """Calls ``a``, ``b``, and ``extra`` where it is not None (a slot that may be empty)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.register_module("extra", None)  # a registered slot, empty for now

    def forward(self, x: Tensor) -> Tensor:
        h = self.b(self.a(x))
        extra = self._modules["extra"]
        return h if extra is None else extra(h)  # type: ignore[no-any-return]


def test_a_glob_sees_a_child_slot_that_was_none_and_is_filled() -> None:
    model, x = _TwoOrThree(), torch.randn(2, 4)
    assert list(run_with_hooks(model, x, ["*"])[1]) == ["a", "b"]
    model.extra = nn.Tanh()
    with torch.no_grad():
        _, caches = run_with_hooks(model, x, ["*"])
    assert list(caches) == ["a", "b", "extra"]
    torch.testing.assert_close(caches["extra"].output, model(x))


def test_an_attribute_shadowing_a_registered_child_is_seen() -> None:
    model, x = _TwoOrThree(), torch.randn(2, 4)
    delta = torch.randn(4)
    run_with_hooks(model, x, {"a": add(delta)})
    other = nn.Linear(4, 4)
    object.__setattr__(model, "a", other)  # what forward's self.a and get_submodule find
    with torch.no_grad():
        out, _ = run_with_hooks(model, x, {"a": add(delta)})
    ref, _ = raw_run(model, x, {"a": lambda h: h + delta})
    torch.testing.assert_close(out, ref)
