"""Resolving spec keys: errors and suggestions, bad keys and values, globs, wrapper prefixes."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from reference import raw_run
from torch import nn

from hookfn import HookfnError, LayerNotFoundError, SpecError, add, run_with_hooks
from hookfn._plan import plan

pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
)


def _first_suggestion(message: str) -> str:
    match = re.search(r"(?:closest names|names near it): '([^']*)'", message)
    assert match, message
    return match.group(1)


# -- unknown names ---------------------------------------------------------------------------

TYPOS = [
    ("transformer.h.O", "transformer.h.0"),  # capital O for zero
    ("transformer.h.o", "transformer.h.0"),
    ("transformer.h.l", "transformer.h.1"),  # lower-case L for one
    ("transformer.h.I", "transformer.h.1"),  # capital i for one
    ("transformer.h.0.mpl", "transformer.h.0.mlp"),
    ("transfomer.h.1.attn", "transformer.h.1.attn"),
    ("Transformer.H.1", "transformer.h.1"),
    ("transformer.h.1.attn.c_atn", "transformer.h.1.attn.c_attn"),
    ("lm_heads", "lm_head"),
    ("transformer.ln-f", "transformer.ln_f"),
]


@pytest.mark.parametrize(("key", "best"), TYPOS)
def test_unknown_name_suggests_the_closest_real_name_first(tiny_gpt2, key, best):
    names = {n for n, _ in tiny_gpt2.named_modules()}
    assert key not in names
    assert best in names
    with pytest.raises(LayerNotFoundError) as info:
        plan(tiny_gpt2, {key: "capture"})
    message = str(info.value)
    assert repr(key) in message
    assert _first_suggestion(message) == best
    assert "named_modules()" in message
    assert isinstance(info.value, LookupError)
    assert isinstance(info.value, HookfnError)


def test_suggestions_are_real_names_and_at_most_five(tiny_gpt2):
    with pytest.raises(LayerNotFoundError) as info:
        plan(tiny_gpt2, ["transformer.h.0.attn.c_prj"])
    listed = str(info.value).split("closest names:")[1].split(". Names come from")[0]
    suggested = re.findall(r"'([^']*)'", listed)
    names = {n for n, _ in tiny_gpt2.named_modules()}
    assert 1 <= len(suggested) <= 5
    assert set(suggested) <= names


def test_a_key_unlike_any_name_still_gets_top_level_suggestions(tiny_gpt2):
    with pytest.raises(LayerNotFoundError, match=r"closest names: 'transformer', 'lm_head'"):
        plan(tiny_gpt2, ["zzzzzz"])


@pytest.mark.parametrize(
    "glob",
    ["transformer.h.*.mlpp", "decoder.*", "transformer.h.[5]", "**.q_proj", "transformer.h.?0"],
)
def test_glob_matching_nothing_is_an_error(tiny_gpt2, glob):
    with pytest.raises(LayerNotFoundError, match="matches no layer") as info:
        plan(tiny_gpt2, {glob: "capture"})
    assert repr(glob) in str(info.value)


def test_module_object_not_in_the_model_is_an_error(tiny_gpt2):
    with pytest.raises(LayerNotFoundError, match="not part of the model"):
        plan(tiny_gpt2, [nn.Linear(2, 2)])


def test_a_parameter_path_is_not_a_layer(tiny_gpt2):
    with pytest.raises(LayerNotFoundError, match=r"'transformer\.h\.0\.attn\.c_attn'"):
        plan(tiny_gpt2, ["transformer.h.0.attn.c_attn.weight"])


# -- bad keys and specs ------------------------------------------------------------------------

BAD_KEYS = [3, None, 1.5, ("transformer", "h"), b"transformer"]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("as_list", [False, True])
def test_bad_key_type_is_a_spec_error(tiny_gpt2, key, as_list):
    spec: Any = [key] if as_list else {key: "capture"}
    with pytest.raises(SpecError, match="is not a layer name") as info:
        plan(tiny_gpt2, spec)
    assert repr(key) in str(info.value)


@pytest.mark.parametrize("spec", [3, None, 1.5, {"transformer.h.0"}.__iter__()])
def test_bad_spec_type_is_a_spec_error(tiny_gpt2, spec):
    with pytest.raises(SpecError, match="pass a mapping"):
        plan(tiny_gpt2, spec)


def test_model_must_be_a_module():
    with pytest.raises(SpecError, match=r"torch\.nn\.Module"):
        plan(lambda x: x, ["a"])  # type: ignore[arg-type]


# -- globs -----------------------------------------------------------------------------------------


def _plan_names(model: nn.Module, spec: Any) -> list[str]:
    return [p.name for p in plan(model, spec)]


GLOBS = [
    ("transformer.h.*", ["transformer.h.0", "transformer.h.1"]),
    ("transformer.h.*.attn", ["transformer.h.0.attn", "transformer.h.1.attn"]),
    ("transformer.h.1.*", [f"transformer.h.1.{c}" for c in ("ln_1", "attn", "ln_2", "mlp")]),
    ("*.h", ["transformer.h"]),
    ("*", ["transformer", "lm_head"]),
    ("transformer.w?e", ["transformer.wte", "transformer.wpe"]),
    ("transformer.w[p]e", ["transformer.wpe"]),
    ("transformer.h.[!0].mlp", ["transformer.h.1.mlp"]),
    ("transformer.h.[0-1].ln_[2]", ["transformer.h.0.ln_2", "transformer.h.1.ln_2"]),
    ("**.mlp.c_*", [f"transformer.h.{i}.mlp.c_{p}" for i in (0, 1) for p in ("fc", "proj")]),
    ("transformer.**.act", ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"]),
    ("**.h", ["transformer.h"]),
    ("ln_f", None),  # not a glob, not a top-level name -> error
]


@pytest.mark.parametrize(("glob", "expected"), GLOBS)
def test_glob_semantics(tiny_gpt2, glob, expected):
    if expected is None:
        with pytest.raises(LayerNotFoundError):
            plan(tiny_gpt2, [glob])
        return
    assert _plan_names(tiny_gpt2, [glob]) == expected


def test_double_star_matches_every_named_module_but_the_root(tiny_gpt2):
    names = [n for n, _ in tiny_gpt2.named_modules() if n]
    assert _plan_names(tiny_gpt2, ["**"]) == names


def test_a_replaced_submodule_is_resolved_afresh():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    first = plan(model, ["0"])[0].module
    model[0] = nn.Linear(2, 2)
    again = plan(model, ["0", "1"])
    assert again[0].module is model[0] is not first
    assert [p.name for p in again] == ["0", "1"]
    assert plan(model, [model[0]])[0].name == "0"


def test_alias_name_of_a_shared_module():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.Tanh(), shared)  # named_modules() lists "0" only
    x = torch.randn(2, 3)
    with torch.no_grad():
        _, caches = run_with_hooks(model, x, ["2"])
    assert list(caches) == ["2"]
    assert caches["2"].n_calls == 2


# -- wrapper prefixes: torch.compile (_orig_mod.) and DataParallel (module.) -------------------


@pytest.fixture(scope="module")
def compiled(tiny_gpt2: nn.Module) -> nn.Module:
    # Constructing the wrapper compiles nothing; these tests only resolve names.
    return torch.compile(tiny_gpt2)


PREFIX_CASES = [
    # (keys, expected names, expected module paths in the inner model)
    (["_orig_mod.transformer.h.0"], ["_orig_mod.transformer.h.0"], ["transformer.h.0"]),
    (["transformer.h.0"], ["transformer.h.0"], ["transformer.h.0"]),
    (
        ["_orig_mod.transformer.h.*"],
        ["_orig_mod.transformer.h.0", "_orig_mod.transformer.h.1"],
        ["transformer.h.0", "transformer.h.1"],
    ),
    (
        ["transformer.h.*.mlp", "_orig_mod.lm_head"],
        ["transformer.h.0.mlp", "transformer.h.1.mlp", "_orig_mod.lm_head"],
        ["transformer.h.0.mlp", "transformer.h.1.mlp", "lm_head"],
    ),
]


@pytest.mark.parametrize(("keys", "names", "paths"), PREFIX_CASES)
def test_compiled_model_names_both_ways(tiny_gpt2, compiled, keys, names, paths):
    planned = plan(compiled, keys)
    assert [p.name for p in planned] == names
    assert all(
        p.module is tiny_gpt2.get_submodule(path) for p, path in zip(planned, paths, strict=True)
    )


def test_compiled_model_module_object_and_errors(tiny_gpt2, compiled):
    planned = plan(compiled, [tiny_gpt2.transformer.h[1]])
    assert [p.name for p in planned] == ["transformer.h.1"]
    with pytest.raises(LayerNotFoundError) as info:
        plan(compiled, ["_orig_mod.transformer.h.O"])
    assert _first_suggestion(str(info.value)) == "_orig_mod.transformer.h.0"
    with pytest.raises(LayerNotFoundError) as info:
        plan(compiled, ["transformer.h.O"])
    assert _first_suggestion(str(info.value)) == "transformer.h.0"


def test_compile_of_data_parallel_accepts_every_partial_prefix(tiny_gpt2):
    wrapped = torch.compile(nn.DataParallel(tiny_gpt2))
    for key in [
        "_orig_mod.module.transformer.h.0",
        "module.transformer.h.0",
        "_orig_mod.transformer.h.0",
        "transformer.h.0",
    ]:
        (planned,) = plan(wrapped, [key])
        assert planned.name == key
        assert planned.module is tiny_gpt2.transformer.h[0]


@pytest.mark.parametrize(
    ("keys", "names"),
    [
        (
            ["module.transformer.h.0", "transformer.h.1"],
            ["module.transformer.h.0", "transformer.h.1"],
        ),
        (["module.transformer.h.*"], ["module.transformer.h.0", "module.transformer.h.1"]),
    ],
)
def test_data_parallel_runs_with_both_name_styles(tiny_gpt2, gpt2_inputs, keys, names):
    delta = torch.randn(32, generator=torch.Generator().manual_seed(0))
    wrapped = nn.DataParallel(tiny_gpt2)  # on CPU it runs the module directly
    blocks = ["transformer.h.0", "transformer.h.1"]
    ref_out, ref = raw_run(tiny_gpt2, gpt2_inputs, {blocks[0]: lambda o: o + delta}, blocks)
    want = ref_out.logits
    spec = {keys[0]: add(delta), **{k: "capture" for k in keys[1:]}}
    with torch.no_grad():
        out, caches = run_with_hooks(wrapped, gpt2_inputs, spec)
    assert list(caches) == names
    if keys[0].endswith("*"):  # the glob got the edit on both blocks: compare block 0 only
        assert caches[names[0]].output.shape == ref[blocks[0]].shape
        return
    assert torch.equal(out.logits, want)
    assert torch.equal(caches[names[0]].output, ref[blocks[0]])
    assert torch.equal(caches[names[1]].output, ref[blocks[1]])


def test_data_parallel_unknown_prefixed_name_suggests_prefixed_names(tiny_gpt2):
    with pytest.raises(LayerNotFoundError) as info:
        plan(nn.DataParallel(tiny_gpt2), ["module.transformer.h.l"])
    assert _first_suggestion(str(info.value)) == "module.transformer.h.1"


def test_prefix_on_an_unwrapped_model_is_not_stripped(tiny_gpt2):
    with pytest.raises(LayerNotFoundError):
        plan(tiny_gpt2, ["module.transformer.h.0"])


@pytest.mark.parametrize("wrapper", ["compile", "DataParallel", "compile-of-DataParallel"])
def test_every_name_a_wrapper_lists_resolves_to_that_module(tiny_gpt2, compiled, wrapper):
    model = {
        "compile": lambda: compiled,
        "DataParallel": lambda: nn.DataParallel(tiny_gpt2),
        "compile-of-DataParallel": lambda: torch.compile(nn.DataParallel(tiny_gpt2)),
    }[wrapper]()
    listed = [(n, m) for n, m in model.named_modules() if n]
    inner_root = [n for n, m in listed if m is tiny_gpt2]
    assert inner_root  # "_orig_mod" / "module": the wrapper's name for the model itself
    for name, module in listed:
        if isinstance(module, nn.DataParallel):
            continue  # "_orig_mod" of a compiled DataParallel: resolves to the model inside
        (planned,) = plan(model, [name])
        assert planned.name == name
        assert planned.module is module


def test_a_key_given_as_a_name_and_as_a_module_is_named_briefly() -> None:
    from hookfn import SpecError, run_with_hooks

    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(SpecError) as info:
        run_with_hooks(model, torch.randn(1, 2), {"0": "capture", model[0]: "capture"})
    assert "'0' and a Linear module object" in str(info.value)
    assert len(str(info.value)) < 200
