"""hookfn on TransformerLens 4.x: `TransformerBridge` hook points and a `HookedRootModule`.

References are TransformerLens' own ``run_with_cache`` and ``run_with_hooks``. Models are
random-weight tiny ones (``TransformerBridge.boot_native`` from a config dict).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import snapshot_hooks
from einops import rearrange
from torch import Tensor, nn

from hookfn import Hook, LayerNotFoundError, add, layers, run_with_hooks

transformer_lens = pytest.importorskip("transformer_lens")
pytest.importorskip("transformer_lens.model_bridge.sources")  # attaches boot_native

from transformer_lens import HookedRootModule  # noqa: E402
from transformer_lens.hook_points import HookPoint  # noqa: E402
from transformer_lens.model_bridge import TransformerBridge  # noqa: E402

N_LAYERS, N_HEADS, D_HEAD, D_MODEL, VOCAB = 2, 4, 8, 32, 50
CONFIG = {
    "n_layers": N_LAYERS,
    "d_model": D_MODEL,
    "n_ctx": 16,
    "d_head": D_HEAD,
    "n_heads": N_HEADS,
    "d_mlp": 64,
    "d_vocab": VOCAB,
    "act_fn": "gelu",
    "seed": 0,
}
# Hook points whose tensor TransformerLens reshapes to [batch, pos, head, d_head] for its own
# hooks; the module itself produces [batch, pos, d_model].
PER_HEAD = (
    "hook_q",
    "hook_k",
    "hook_v",
    "hook_z",
    "q.hook_out",
    "k.hook_out",
    "v.hook_out",
    "o.hook_in",
)


def _bridge() -> Any:
    return TransformerBridge.boot_native(CONFIG)


@pytest.fixture(scope="module")
def bridge() -> Any:
    return _bridge()


@pytest.fixture
def tokens() -> Tensor:
    return torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def _distinct_names(bridge: Any, names: list[str]) -> list[str]:
    # TransformerLens names some hook points twice (hook_resid_post is blocks.i.hook_out);
    # a spec names each module once.
    first: dict[int, str] = {}
    for name in names:
        first.setdefault(id(bridge.get_submodule(name)), name)
    return list(first.values())


def test_every_cached_hook_point_equals_run_with_cache(bridge: Any, tokens: Tensor) -> None:
    with torch.no_grad():
        ref_logits, cache = bridge.run_with_cache(tokens)
        names = _distinct_names(bridge, list(cache.keys()))
        logits, caches = run_with_hooks(bridge, tokens, names)
    assert len(names) > 50
    assert torch.equal(logits, ref_logits)
    for name in names:
        got, want = caches[name].output, cache[name]
        if name.endswith(PER_HEAD):
            got = rearrange(got, "b p (h d) -> b p h d", h=N_HEADS)
        assert torch.equal(got, want), name


@pytest.mark.parametrize(
    ("name", "shape"),
    [
        ("hook_embed", (2, 8, D_MODEL)),
        ("blocks.0.hook_resid_pre", (2, 8, D_MODEL)),
        ("blocks.0.hook_resid_post", (2, 8, D_MODEL)),
        ("blocks.1.hook_resid_mid", (2, 8, D_MODEL)),
        ("blocks.0.attn.hook_pattern", (2, N_HEADS, 8, 8)),
        ("blocks.1.attn.hook_attn_scores", (2, N_HEADS, 8, 8)),
        ("blocks.1.mlp.hook_post", (2, 8, 64)),
        ("blocks.0.ln1.hook_scale", (2, 8, 1)),
    ],
)
def test_hook_point_by_transformer_lens_name(
    bridge: Any, tokens: Tensor, name: str, shape: tuple[int, ...]
) -> None:
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens, names_filter=[name])
        _, caches = run_with_hooks(bridge, tokens, [name])
    assert list(caches) == [name]
    assert caches[name].output.shape == shape
    assert torch.equal(caches[name].output, cache[name])


@pytest.mark.parametrize("name", ["blocks.0.hook_resid_post", "blocks.1.hook_resid_mid"])
def test_edit_equals_transformer_lens_fwd_hook(bridge: Any, tokens: Tensor, name: str) -> None:
    steer = torch.randn(D_MODEL, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = bridge(tokens)
        ref = bridge.run_with_hooks(tokens, fwd_hooks=[(name, lambda act, hook: act + steer)])
        out, _ = run_with_hooks(bridge, tokens, {name: add(steer)})
    torch.testing.assert_close(out, ref)
    assert not torch.allclose(out, plain)


@pytest.mark.parametrize("head", [0, 3])
def test_head_ablation_on_hook_z_equals_transformer_lens(
    bridge: Any, tokens: Tensor, head: int
) -> None:
    def zero_head_tl(z: Tensor, hook: Any) -> Tensor:  # z: [batch, pos, head, d_head]
        z = z.clone()
        z[:, :, head] = 0.0
        return z

    def zero_head(x: Tensor) -> Tensor:  # the module's own layout: [batch, pos, d_model]
        keep = torch.ones(N_HEADS, D_HEAD, dtype=x.dtype)
        keep[head] = 0.0
        return x * keep.flatten()

    with torch.no_grad():
        ref = bridge.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", zero_head_tl)])
        out, _ = run_with_hooks(bridge, tokens, {"blocks.0.attn.hook_z": zero_head})
    torch.testing.assert_close(out, ref)


def test_globs_match_module_names_and_aliases_are_exact_keys(bridge: Any, tokens: Tensor) -> None:
    # Globs go over named_modules(), where TransformerLens' canonical names live
    # (blocks.i.hook_out); the alias blocks.i.hook_resid_post works as an exact key.
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
        _, by_glob = run_with_hooks(bridge, tokens, ["blocks.*.hook_out"])
        aliases = [f"blocks.{i}.hook_resid_post" for i in range(N_LAYERS)]
        _, by_alias = run_with_hooks(bridge, tokens, aliases)
    assert list(by_glob) == [f"blocks.{i}.hook_out" for i in range(N_LAYERS)]
    for i in range(N_LAYERS):
        want = cache[f"blocks.{i}.hook_resid_post"]
        assert torch.equal(by_glob[f"blocks.{i}.hook_out"].output, want)
        assert torch.equal(by_alias[f"blocks.{i}.hook_resid_post"].output, want)
    with pytest.raises(LayerNotFoundError, match="hook_resid_post"):
        run_with_hooks(bridge, tokens, ["blocks.*.hook_resid_post"])


def test_gradient_capture_equals_transformer_lens_backward_hook(
    bridge: Any, tokens: Tensor
) -> None:
    name = "blocks.0.hook_resid_post"
    grads: list[Tensor] = []
    bridge.add_hook(name, lambda grad, hook: grads.append(grad.detach().clone()), dir="bwd")
    try:
        bridge(tokens).logsumexp(-1).sum().backward()
    finally:
        bridge.reset_hooks()
        bridge.zero_grad(set_to_none=True)
    _, caches = run_with_hooks(
        bridge,
        tokens,
        {name: Hook(grad=True)},
        backward=lambda logits: logits.logsumexp(-1).sum(),
    )
    assert len(grads) == 1
    torch.testing.assert_close(caches[name].grad_output, grads[0])
    assert all(p.grad is None for p in bridge.parameters())


def test_transformer_lens_hooks_survive_and_keep_working(tokens: Tensor) -> None:
    bridge = _bridge()
    seen: list[Tensor] = []
    bridge.add_perma_hook("blocks.1.hook_resid_pre", lambda act, hook: seen.append(act.clone()))
    bridge.add_hook("blocks.0.hook_resid_post", lambda act, hook: act * 2.0)
    with torch.no_grad():
        ref = bridge(tokens)  # the bridge wires some hooks of its own on its first call
    assert len(seen) == 1
    before = snapshot_hooks(bridge)
    with torch.no_grad():
        out, caches = run_with_hooks(
            bridge,
            tokens,
            {"blocks.0.hook_resid_post": add(1.0), "blocks.1.hook_resid_pre": "capture"},
        )
    assert snapshot_hooks(bridge) == before
    assert len(seen) == 2
    # hookfn's edit comes first, TransformerLens' hook (x2) then sees it: (x + 1) * 2.
    torch.testing.assert_close(seen[1], caches["blocks.1.hook_resid_pre"].output)
    torch.testing.assert_close(seen[1], seen[0] + 2.0)
    assert not torch.allclose(out, ref)
    with torch.no_grad():
        assert torch.equal(bridge(tokens), ref)
    assert len(seen) == 3


class TinyHooked(HookedRootModule):
    """The TransformerLens pattern: HookPoints around a model's intermediate tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 16)
        self.hook_embed = HookPoint()
        self.layers = nn.ModuleList(nn.Linear(16, 16) for _ in range(2))
        self.hook_resid = nn.ModuleList(HookPoint() for _ in range(2))
        self.head = nn.Linear(16, 3)
        self.hook_logits = HookPoint()
        self.setup()

    def forward(self, x: Tensor) -> Tensor:
        h = self.hook_embed(self.embed(x))
        for layer, hook in zip(self.layers, self.hook_resid, strict=True):
            h = hook(h + torch.tanh(layer(h)))
        return self.hook_logits(self.head(h))  # type: ignore[no-any-return]


def test_hooked_root_module_names_captures_and_edits() -> None:
    torch.manual_seed(0)
    model = TinyHooked()
    x = torch.randn(4, 6)
    names = list(model.hook_dict)
    assert names == ["hook_embed", "hook_resid.0", "hook_resid.1", "hook_logits"]
    with torch.no_grad():
        ref_logits, cache = model.run_with_cache(x)
        logits, caches = run_with_hooks(model, x, names)
        assert torch.equal(logits, ref_logits)
        for name in names:
            assert torch.equal(caches[name].output, cache[name]), name

        double = [("hook_resid.0", lambda act, hook: act * 2.0)]
        ref = model.run_with_hooks(x, fwd_hooks=double)
        out, _ = run_with_hooks(model, x, {"hook_resid.0": lambda act: act * 2.0})
        torch.testing.assert_close(out, ref)
        _, by_glob = run_with_hooks(model, x, ["hook_resid.*"])
    assert list(by_glob) == ["hook_resid.0", "hook_resid.1"]


def test_layers_lists_hook_points_with_their_shapes(bridge: Any, tokens: Tensor) -> None:
    table = layers(bridge, tokens, "blocks.0.**")
    with torch.no_grad():
        _, cache = bridge.run_with_cache(tokens)
    by_name = {info.name: info for info in table}
    pattern = by_name["blocks.0._original_component.attn.hook_pattern"]
    assert pattern.type == "HookPoint"
    assert pattern.shape == tuple(cache["blocks.0.attn.hook_pattern"].shape)
    assert pattern.calls == 1
    assert by_name["blocks.0.hook_out"].shape == tuple(cache["blocks.0.hook_resid_post"].shape)
