"""Errors that name the real cause: a missing capture, bracket indexing, a cache of another
model (the fingerprint check), a patch of another width or of other inputs."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.utils._pytree as pytree
from conftest import make_tiny_gpt2
from reference import raw_run
from torch import nn

from hookfn import (
    CaptureError,
    EditError,
    LayerNotFoundError,
    SpecError,
    patch_from,
    run_with_hooks,
)


def _mlp(width: int = 4, hidden: int = 8, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, hidden), nn.ReLU(), nn.Linear(hidden, width), nn.Tanh())


def test_a_missing_layer_in_the_captures_names_the_closest() -> None:
    model = _mlp()
    _, caches = run_with_hooks(model, torch.randn(2, 3), ["0", "2"])
    with pytest.raises(CaptureError, match=r"no capture of layer '1'.*\['0', '2'\]") as info:
        caches["1"]
    assert isinstance(info.value, LookupError)
    with pytest.raises(LookupError, match="closest: '2'"):
        caches["22"]
    assert caches.get("1") is None  # the dict methods behave as a dict's
    assert dict(caches) == caches


def test_a_bracket_index_is_reported_as_one(tiny_gpt2: nn.Module) -> None:
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(LayerNotFoundError, match=r"indexes with brackets.*'transformer\.h\.1'"):
        run_with_hooks(tiny_gpt2, ids, ["transformer.h[1]"])
    with pytest.raises(LayerNotFoundError) as info:
        run_with_hooks(tiny_gpt2, ids, ["transformer.h[1].mlp"])
    assert "the glob" not in str(info.value)
    assert "'transformer.h.1.mlp'" in str(info.value)
    # A bracket that is a real glob character class still works as one.
    _, caches = run_with_hooks(tiny_gpt2, ids, ["transformer.h.[01]"])
    assert list(caches) == ["transformer.h.0", "transformer.h.1"]


def test_a_patch_of_another_width_names_the_model() -> None:
    x = torch.randn(2, 3)
    _, cache = run_with_hooks(_mlp(width=4), x, ["2"])
    with pytest.raises(EditError, match="feature widths differ, so the cache comes from another"):
        run_with_hooks(_mlp(width=5), x, {"2": patch_from(dict(cache))})
    # Another batch size is the inputs' doing, and is named so.
    with pytest.raises(EditError, match="same batch size"):
        run_with_hooks(_mlp(width=4), torch.randn(3, 3), {"2": patch_from(cache)})


def test_a_cache_of_another_model_is_refused_even_when_shapes_agree() -> None:
    x = torch.randn(2, 3)
    source = _mlp(hidden=8)
    _, cache = run_with_hooks(source, x, ["2"])
    other = _mlp(hidden=6)  # layer "2" outputs the same shape, from other parameters
    with pytest.raises(SpecError, match=r"another model.*'weight': \(4, 8\) vs \(4, 6\)"):
        run_with_hooks(other, x, {"2": patch_from(cache)})
    # The escape hatch: a plain dict patches across models on purpose (raw-hook reference).
    out, _ = run_with_hooks(other, x, {"2": patch_from(dict(cache))})
    expected, _ = raw_run(other, x, {"2": lambda h: cache["2"].output})
    torch.testing.assert_close(out, expected)


def test_the_same_architecture_with_other_weights_is_accepted() -> None:
    # Patching between two checkpoints of one architecture is a real use (base vs tuned).
    x = torch.randn(2, 3)
    _, cache = run_with_hooks(_mlp(seed=0), x, ["2"])
    tuned = _mlp(seed=1)
    out, _ = run_with_hooks(tuned, x, {"2": patch_from(cache)})
    expected, _ = raw_run(tuned, x, {"2": lambda h: cache["2"].output})
    torch.testing.assert_close(out, expected)


def test_a_gpt2_cache_on_a_gpt2_of_another_width_is_refused() -> None:
    ids = torch.randint(0, 100, (2, 5))
    source = make_tiny_gpt2()  # (the check needs the source model alive)
    _, cache = run_with_hooks(source, ids, ["transformer.h.0"])
    other = make_tiny_gpt2()
    other.transformer.h[0].mlp.c_fc = type(other.transformer.h[0].mlp.c_fc)(64, 32)
    other.transformer.h[0].mlp.c_proj = type(other.transformer.h[0].mlp.c_proj)(32, 64)
    with pytest.raises(SpecError, match=r"'mlp\.c_fc\.weight'"):
        run_with_hooks(other, ids, {"transformer.h.0": patch_from(cache)})


def test_captures_keep_no_model_alive_and_survive_pytree() -> None:
    model = _mlp()
    _, cache = run_with_hooks(model, torch.randn(2, 3), ["0", "2"])
    leaves, spec = pytree.tree_flatten(cache)
    rebuilt = pytree.tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(cache)
    assert list(rebuilt) == ["0", "2"]
    torch.testing.assert_close(rebuilt["2"].output, cache["2"].output)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
    # With the source gone there is nothing to compare: the patch proceeds.
    out, _ = run_with_hooks(_mlp(hidden=6), torch.randn(2, 3), {"2": patch_from(cache)})
    assert out.shape == (2, 4)


def test_a_trace_multiples_captures_know_their_model_too() -> None:
    from hookfn import TraceMultiple

    x = torch.randn(2, 3)
    source = _mlp(hidden=8)
    with TraceMultiple(source, ["2"]) as tm:
        source(x)
    with pytest.raises(SpecError, match="another model"):
        run_with_hooks(_mlp(hidden=6), x, {"2": patch_from(tm.captures())})
    with pytest.raises(CaptureError, match="closest: '2'"):
        tm.captures()["22"]
