"""`splice`, `spliced` and `hookfn.sae`: modules put in place of an activation, whose parts
are sites. Every result is compared with plain PyTorch: raw forward hooks that apply the
SAE's formulas by hand, plain autograd, a one-run-per-cell loop."""

from __future__ import annotations

import copy
import pathlib
import pickle
import threading
import warnings

import pytest
import torch
from conftest import VOCAB, make_tiny_gpt2, snapshot_hooks
from reference import raw_run
from torch import Tensor, nn

import hookfn
from hookfn import (
    EditError,
    Hook,
    LayerNotFoundError,
    SpecError,
    TraceMultiple,
    ablate,
    add,
    at,
    patch_from,
    run_with_hooks,
    splice,
    spliced,
    steer,
)
from hookfn.sae import SparseAutoencoder, load

SITE = "transformer.h.0"
LATENTS = f"{SITE}.sae.latents"
WIDTH, D_SAE = 32, 96


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_tiny_gpt2()


@pytest.fixture(scope="module")
def ids() -> Tensor:
    return torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))


def make_sae(activation: str = "relu", seed: int = 0, **kwargs: object) -> SparseAutoencoder:
    generator = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(WIDTH, D_SAE, activation=activation, generator=generator, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():  # biases and thresholds away from zero, so every term counts
        for p in sae.parameters():
            if p.dim() == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
        if activation == "jumprelu":
            sae.threshold.sub_(0.05)  # some thresholds below zero: relu still applies
    return sae


# Hand-written SAE formulas (SAELens's conventions), independent of hookfn.sae.
def encode_by_hand(sae: SparseAutoencoder, x: Tensor) -> Tensor:
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    if sae.activation == "relu":
        return pre.clamp(min=0)
    if sae.activation == "jumprelu":
        return torch.where(pre > sae.threshold, pre.clamp(min=0), torch.zeros_like(pre))
    kept = torch.zeros_like(pre)
    values, indices = pre.sort(dim=-1, descending=True)
    k = sae.k
    assert k is not None
    return kept.scatter(-1, indices[..., :k], values[..., :k].clamp(min=0))


def decode_by_hand(sae: SparseAutoencoder, z: Tensor) -> Tensor:
    return torch.einsum("...s,sd->...d", z, sae.W_dec) + sae.b_dec


# -- the SAE class -----------------------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_sae_formulas_match_the_hand_written_ones(activation: str) -> None:
    sae = make_sae(activation, k=5) if activation == "topk" else make_sae(activation)
    x = torch.randn(3, 4, WIDTH)
    z = sae.encode(x)
    torch.testing.assert_close(z, encode_by_hand(sae, x))
    torch.testing.assert_close(sae.decode(z), decode_by_hand(sae, z))
    if activation == "topk":
        assert int((z != 0).sum(-1).max()) <= 5


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_sae_save_and_load_round_trip(tmp_path: object, activation: str) -> None:
    sae = make_sae(activation, k=3) if activation == "topk" else make_sae(activation)
    loaded = load(sae.save(tmp_path))  # type: ignore[arg-type]
    x = torch.randn(2, WIDTH)
    torch.testing.assert_close(loaded(x), decode_by_hand(sae, encode_by_hand(sae, x)))
    assert (loaded.activation, loaded.k) == (sae.activation, sae.k)


def test_load_reads_a_torch_tensor_file_safely(tmp_path: object) -> None:
    import pathlib

    folder = pathlib.Path(str(tmp_path))
    sae = make_sae("jumprelu")
    torch.save({k: v.detach() for k, v in sae.state_dict().items()}, folder / "w.pt")
    loaded = load(folder / "w.pt")
    assert loaded.activation == "jumprelu"  # told by the threshold
    x = torch.randn(2, WIDTH)
    torch.testing.assert_close(loaded.encode(x), encode_by_hand(sae, x))
    torch.save({"W_enc": torch.zeros(2, 2)}, folder / "bad.pt")
    with pytest.raises(SpecError, match="b_enc"):
        load(folder / "bad.pt")
    torch.save(nn.Linear(2, 2), folder / "module.pt")  # pickled code: refused
    with pytest.raises(SpecError, match="safely"):
        load(folder / "module.pt")
    with pytest.raises(SpecError, match="no such"):
        load(folder / "missing.pt")


DATA = pathlib.Path(__file__).parent / "data" / "saelens"


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_load_reads_saelens_saved_folders_and_computes_what_saelens_did(
    architecture: str,
) -> None:
    # Folders written by SAELens 6.54's `save_model`, with its own encode/decode of a random
    # input beside them (tests/data/saelens/README.md says how they were made).
    from safetensors.torch import load_file

    sae = load(DATA / architecture)
    expected = load_file(str(DATA / architecture / "expected.safetensors"))
    torch.testing.assert_close(sae.encode(expected["x"]), expected["latents"])
    torch.testing.assert_close(sae.decode(expected["latents"]), expected["reconstruction"])
    assert sae.activation == {"standard": "relu"}.get(architecture, architecture)


def test_load_refuses_saelens_options_it_does_not_compute(tmp_path: pathlib.Path) -> None:
    import json
    import shutil

    folder = tmp_path / "sae"
    shutil.copytree(DATA / "standard", folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["normalize_activations"] = "layer_norm"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="normalize_activations"):
        load(folder)


class HookPoint(nn.Identity):
    """What SAELens's SAEs call their hook points: identity modules."""


class SAELensStyle(nn.Module):
    """An SAE shaped like SAELens's: parameters, hook points as submodules, encode/decode."""

    def __init__(self, sae: SparseAutoencoder) -> None:
        super().__init__()
        self.W_enc, self.b_enc, self.W_dec, self.b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
        self.hook_sae_input = HookPoint()
        self.hook_sae_acts_pre = HookPoint()
        self.hook_sae_acts_post = HookPoint()
        self.hook_sae_recons = HookPoint()

    def encode(self, x: Tensor) -> Tensor:
        x = self.hook_sae_input(x - self.b_dec)
        return self.hook_sae_acts_post(
            torch.relu(self.hook_sae_acts_pre(x @ self.W_enc + self.b_enc))
        )

    def decode(self, z: Tensor) -> Tensor:
        return self.hook_sae_recons(z @ self.W_dec + self.b_dec)


def test_an_saelens_style_sae_object_splices_with_its_hook_points_as_sites(
    model: nn.Module, ids: Tensor
) -> None:
    sae = make_sae()
    style = SAELensStyle(sae)
    expected, _ = raw_run(model, ids, {SITE: lambda h: decode_by_hand(sae, encode_by_hand(sae, h))})
    pre = f"{SITE}.sae.hook_sae_acts_pre"
    with torch.no_grad():
        out, caches = run_with_hooks(model, ids, {SITE: splice(style), pre: "capture"})
    torch.testing.assert_close(out.logits, expected.logits)
    _, before = raw_run(model, ids, capture=[SITE])
    h = before[SITE]
    torch.testing.assert_close(caches[pre].output, (h - sae.b_dec) @ sae.W_enc + sae.b_enc)


def test_sae_arguments_are_checked() -> None:
    with pytest.raises(SpecError, match="k"):
        SparseAutoencoder(4, 8, activation="topk")
    with pytest.raises(SpecError, match="activation"):
        SparseAutoencoder(4, 8, activation="gelu")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="d_sae"):
        SparseAutoencoder(4, 0)


# -- splicing: output and captures ---------------------------------------------------------


@pytest.mark.parametrize("activation", ["relu", "topk", "jumprelu"])
def test_splice_without_error_equals_the_formulas_in_a_raw_hook(
    model: nn.Module, ids: Tensor, activation: str
) -> None:
    sae = make_sae(activation, k=7) if activation == "topk" else make_sae(activation)
    expected, raw = raw_run(
        model,
        ids,
        {SITE: lambda h: decode_by_hand(sae, encode_by_hand(sae, h))},
        capture=["transformer.h.1"],
    )
    with torch.no_grad():
        out, caches = run_with_hooks(
            model, ids, {SITE: splice(sae), LATENTS: "capture", "transformer.h.1": "capture"}
        )
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(caches["transformer.h.1"].output, raw["transformer.h.1"])
    _, before = raw_run(model, ids, capture=[SITE])
    torch.testing.assert_close(caches[LATENTS].output, encode_by_hand(sae, before[SITE]))


def test_splice_with_error_leaves_the_output_unchanged(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    plain, _ = raw_run(model, ids)
    for freeze in (False, True):
        with torch.no_grad():
            out, caches = run_with_hooks(
                model,
                ids,
                {
                    SITE: splice(sae, error=True, freeze_error=freeze),
                    f"{SITE}.sae.error": "capture",
                },
            )
        torch.testing.assert_close(out.logits, plain.logits, atol=1e-5, rtol=1e-5)
    _, before = raw_run(model, ids, capture=[SITE])
    h = before[SITE]
    torch.testing.assert_close(
        caches[f"{SITE}.sae.error"].output, h - decode_by_hand(sae, encode_by_hand(sae, h))
    )


def test_latent_ablation_and_steering_equal_manual_code(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    direction = torch.randn(D_SAE)
    latent_ids = [3, 17, 40]

    def by_hand(h: Tensor, change: str) -> Tensor:
        z = encode_by_hand(sae, h)
        error = h - decode_by_hand(sae, z)
        z = z.clone()
        if change == "ablate":
            z[..., latent_ids] = 0
        else:
            z = z + 2.5 * direction / direction.norm()
        return decode_by_hand(sae, z) + error

    for change, edit in (
        ("ablate", ablate().at(latent_ids, dim=-1)),
        ("steer", steer(direction, 2.5)),
    ):
        expected, _ = raw_run(model, ids, {SITE: lambda h, c=change: by_hand(h, c)})
        with torch.no_grad():
            out, _ = run_with_hooks(model, ids, {SITE: splice(sae, error=True), LATENTS: edit})
        torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_edits_at_the_reconstruction_and_the_error(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    delta = torch.randn(WIDTH)

    def by_hand(h: Tensor) -> Tensor:
        recon = decode_by_hand(sae, encode_by_hand(sae, h))
        return recon + delta  # the error ablated, the reconstruction moved

    expected, _ = raw_run(model, ids, {SITE: by_hand})
    spec = {
        SITE: splice(sae, error=True),
        f"{SITE}.sae.reconstruction": add(delta),
        f"{SITE}.sae.error": ablate(),
    }
    with torch.no_grad():
        out, _ = run_with_hooks(model, ids, spec)
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_patch_from_over_latents_equals_a_hand_written_patch(model: nn.Module) -> None:
    sae = make_sae()
    gen = torch.Generator().manual_seed(5)
    clean = torch.randint(0, VOCAB, (2, 7), generator=gen)
    corrupted = torch.randint(0, VOCAB, (2, 7), generator=gen)
    with torch.no_grad():
        _, clean_cache = run_with_hooks(model, clean, {SITE: splice(sae), LATENTS: "capture"})
        out, _ = run_with_hooks(
            model,
            corrupted,
            {
                SITE: splice(sae, error=True),
                LATENTS: patch_from(clean_cache).at((slice(None), 4, [1, 2, 50])),
            },
        )
    _, clean_h = raw_run(model, clean, capture=[SITE])
    z_clean = encode_by_hand(sae, clean_h[SITE])

    def by_hand(h: Tensor) -> Tensor:
        z = encode_by_hand(sae, h)
        error = h - decode_by_hand(sae, z)
        z = z.clone()
        z[:, 4, [1, 2, 50]] = z_clean[:, 4, [1, 2, 50]]
        return decode_by_hand(sae, z) + error

    expected, _ = raw_run(model, corrupted, {SITE: by_hand})
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)


def test_several_splices_in_one_run(model: nn.Module, ids: Tensor) -> None:
    first, second = make_sae(seed=1), make_sae(seed=2)
    expected, _ = raw_run(
        model,
        ids,
        {
            "transformer.h.0": lambda h: decode_by_hand(first, encode_by_hand(first, h)),
            "transformer.h.1": lambda h: decode_by_hand(second, encode_by_hand(second, h)),
        },
    )
    with torch.no_grad():
        out, caches = run_with_hooks(
            model,
            ids,
            {
                "transformer.h.0": splice(first),
                "transformer.h.1": splice(second),
                "transformer.h.*.sae.latents": "capture",
            },
        )
    torch.testing.assert_close(out.logits, expected.logits)
    assert list(caches) == [  # model order: each splice's parts right after its layer
        "transformer.h.0",
        "transformer.h.0.sae.latents",
        "transformer.h.1",
        "transformer.h.1.sae.latents",
    ]


# -- gradients ---------------------------------------------------------------------------


def _metric(out: object) -> Tensor:
    return out.logits[:, -1, :5].sum()  # type: ignore[attr-defined]


def test_gradient_of_latents_equals_autograd(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    # Plain autograd: the latents a leaf, the error term a constant.
    kept: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: object, out: Tensor) -> Tensor:
        z = encode_by_hand(sae, out).detach().requires_grad_(True)
        kept["z"] = z
        error = (out - decode_by_hand(sae, z)).detach()
        return decode_by_hand(sae, z) + error

    handle = model.get_submodule(SITE).register_forward_hook(hook)
    try:
        _metric(model(ids)).backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    for freeze in (False, True):
        _, caches = run_with_hooks(
            model,
            ids,
            {SITE: splice(sae, error=True, freeze_error=freeze), LATENTS: Hook(grad=True)},
            backward=_metric,
        )
        torch.testing.assert_close(caches[LATENTS].grad_output, kept["z"].grad)
    assert all(p.grad is None for p in model.parameters())


def test_error_term_gradients_reach_earlier_layers_as_documented(
    model: nn.Module, ids: Tensor
) -> None:
    sae = make_sae()
    embed = "transformer.wte"
    plain: dict[str, Tensor] = {}
    _, caches = run_with_hooks(model, ids, {embed: Hook(grad=True)}, backward=_metric)
    plain["grad"] = caches[embed].grad_output
    _, caches = run_with_hooks(
        model, ids, {SITE: splice(sae, error=True), embed: Hook(grad=True)}, backward=_metric
    )
    torch.testing.assert_close(caches[embed].grad_output, plain["grad"], atol=1e-5, rtol=1e-4)

    # Frozen: only through the SAE (plain autograd with a detached error).
    def hook(module: nn.Module, args: object, out: Tensor) -> Tensor:
        recon = decode_by_hand(sae, encode_by_hand(sae, out))
        return recon + (out - recon).detach()

    embeddings: dict[str, Tensor] = {}

    def keep(module: nn.Module, args: object, out: Tensor) -> None:
        out.retain_grad()
        embeddings["e"] = out

    handles = [
        model.get_submodule(SITE).register_forward_hook(hook),
        model.get_submodule(embed).register_forward_hook(keep),
    ]
    try:
        _metric(model(ids)).backward()
    finally:
        for handle in handles:
            handle.remove()
    model.zero_grad(set_to_none=True)
    _, caches = run_with_hooks(
        model,
        ids,
        {SITE: splice(sae, error=True, freeze_error=True), embed: Hook(grad=True)},
        backward=_metric,
    )
    torch.testing.assert_close(caches[embed].grad_output, embeddings["e"].grad)


def test_grad_with_respect_to_a_latent_edit_under_torch_func(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    mask = torch.ones_like(ids)

    def through_hookfn(delta: Tensor) -> Tensor:
        out, _ = run_with_hooks(
            eager,
            {"input_ids": ids, "attention_mask": mask},
            {SITE: splice(sae, error=True), LATENTS: add(delta)},
        )
        return _metric(out)

    def by_hand(delta: Tensor) -> Tensor:
        def hook(module: nn.Module, args: object, out: Tensor) -> Tensor:
            z = encode_by_hand(sae, out)
            return decode_by_hand(sae, z + delta) + (out - decode_by_hand(sae, z))

        handle = eager.get_submodule(SITE).register_forward_hook(hook)
        try:
            return _metric(eager(input_ids=ids, attention_mask=mask))
        finally:
            handle.remove()

    delta = 0.3 * torch.randn(D_SAE)
    grad = torch.func.grad(through_hookfn)(delta)
    leaf = delta.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(by_hand(leaf), [leaf])
    torch.testing.assert_close(grad, expected, atol=1e-5, rtol=1e-4)
    # vmap over a batch of latent edits: each row equals its own run.
    deltas = 0.3 * torch.randn(3, D_SAE)
    batched = torch.func.vmap(through_hookfn)(deltas)
    with torch.no_grad():
        rows = torch.stack([by_hand(d) for d in deltas])
    torch.testing.assert_close(batched, rows, atol=1e-5, rtol=1e-5)


# -- transcoders and forward-only modules ----------------------------------------------------


def test_transcoder_maps_the_input_to_the_output(model: nn.Module, ids: Tensor) -> None:
    mlp = "transformer.h.0.mlp"
    transcoder = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
    module = model.get_submodule(mlp)
    handle = module.register_forward_hook(lambda m, args, out: transcoder(args[0]))
    try:
        with torch.no_grad():
            expected = model(ids)
    finally:
        handle.remove()
    with torch.no_grad():
        out, caches = run_with_hooks(
            model, ids, {mlp: splice(transcoder, from_input=True), f"{mlp}.transcoder.1": "capture"}
        )
    torch.testing.assert_close(out.logits, expected.logits)
    assert caches[f"{mlp}.transcoder.1"].output.shape == (2, 7, 64)
    with torch.no_grad():
        kept, _ = run_with_hooks(model, ids, {mlp: splice(transcoder, from_input=True, error=True)})
    plain, _ = raw_run(model, ids)
    torch.testing.assert_close(kept.logits, plain.logits, atol=1e-5, rtol=1e-5)


def test_forward_only_module_with_error_and_an_edited_submodule(
    model: nn.Module, ids: Tensor
) -> None:
    autoencoder = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))

    def by_hand(h: Tensor) -> Tensor:
        hidden = autoencoder[1](autoencoder[0](h))
        hidden = hidden.clone()
        hidden[..., :8] = 0
        return autoencoder[2](hidden) + (h - autoencoder(h))

    expected, _ = raw_run(model, ids, {SITE: by_hand})
    with torch.no_grad():
        out, caches = run_with_hooks(
            model,
            ids,
            {
                SITE: splice(autoencoder, error=True),
                f"{SITE}.sae.1": ablate().at(slice(0, 8), dim=-1),
            },
        )
    torch.testing.assert_close(out.logits, expected.logits, atol=1e-5, rtol=1e-5)
    assert len(caches[f"{SITE}.sae.1"].outputs) == 1  # the clean pass is not recorded


# -- spliced(): nested runs, patching, call scope -------------------------------------------


def test_spliced_block_gives_nested_runs_the_latent_sites(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    with pytest.raises(LayerNotFoundError):
        run_with_hooks(model, ids, {LATENTS: "capture"})
    with torch.no_grad(), spliced(model, {SITE: sae}):
        out, caches = run_with_hooks(model, ids, [LATENTS])
        plain_inside = model(ids)
    assert list(caches) == [LATENTS]
    expected, _ = raw_run(model, ids, {SITE: lambda h: decode_by_hand(sae, encode_by_hand(sae, h))})
    torch.testing.assert_close(out.logits, expected.logits)
    torch.testing.assert_close(plain_inside.logits, expected.logits)
    with pytest.raises(LayerNotFoundError):  # gone with the block
        run_with_hooks(model, ids, {LATENTS: "capture"})


def test_activation_patching_sweeps_latents_like_a_loop(model: nn.Module) -> None:
    from hookfn.patching import activation_patching, each_index

    sae = make_sae()
    gen = torch.Generator().manual_seed(7)
    clean = torch.randint(0, VOCAB, (2, 6), generator=gen)
    corrupted = torch.randint(0, VOCAB, (2, 6), generator=gen)
    latent_ids = [0, 5, 9, 33]

    def metric(out: object) -> Tensor:
        return out.logits[:, -1, 0] - out.logits[:, -1, 1]  # type: ignore[attr-defined]

    with torch.no_grad(), spliced(model, {SITE: splice(sae, error=True)}):
        result = activation_patching(
            model, clean, corrupted, LATENTS, over=each_index(latent_ids), metric=metric
        )
    _, clean_h = raw_run(model, clean, capture=[SITE])
    z_clean = encode_by_hand(sae, clean_h[SITE])
    loop = []
    for i in latent_ids:

        def by_hand(h: Tensor, i: int = i) -> Tensor:
            z = encode_by_hand(sae, h)
            error = h - decode_by_hand(sae, z)
            z = z.clone()
            z[..., i] = z_clean[..., i]
            return decode_by_hand(sae, z) + error

        out, _ = raw_run(model, corrupted, {SITE: by_hand})
        loop.append(metric(out).mean())
    torch.testing.assert_close(result.values.reshape(-1), torch.stack(loop), atol=1e-5, rtol=1e-5)


def test_attribution_patching_over_latents_equals_autograd(model: nn.Module) -> None:
    from hookfn.patching import attribution_patching, each_index

    sae = make_sae()
    gen = torch.Generator().manual_seed(8)
    clean = torch.randint(0, VOCAB, (2, 6), generator=gen)
    corrupted = torch.randint(0, VOCAB, (2, 6), generator=gen)
    latent_ids = list(range(10))

    def metric(out: object) -> Tensor:
        return out.logits[:, -1, 0] - out.logits[:, -1, 1]  # type: ignore[attr-defined]

    with spliced(model, {SITE: splice(sae, error=True)}):
        result = attribution_patching(
            model, clean, corrupted, LATENTS, over=each_index(latent_ids), metric=metric
        )
    # By hand: d metric / d z on the corrupted run, times (z_clean - z_corrupted), summed
    # over positions, averaged over pairs, plus the corrupted baseline.
    _, clean_h = raw_run(model, clean, capture=[SITE])
    z_clean = encode_by_hand(sae, clean_h[SITE])
    kept: dict[str, Tensor] = {}

    def hook(module: nn.Module, args: object, out: Tensor) -> Tensor:
        z = encode_by_hand(sae, out).detach().requires_grad_(True)
        kept["z"] = z
        return decode_by_hand(sae, z) + (out - decode_by_hand(sae, z)).detach()

    handle = model.get_submodule(SITE).register_forward_hook(hook)
    try:
        value = metric(model(corrupted))
        value.sum().backward()
    finally:
        handle.remove()
    model.zero_grad(set_to_none=True)
    z = kept["z"]
    estimate = (z.grad * (z_clean - z.detach())).sum(1).mean(0)[latent_ids]  # type: ignore[operator]
    torch.testing.assert_close(
        result.values.reshape(-1), value.detach().mean() + estimate, atol=1e-5, rtol=1e-4
    )


def test_splice_is_call_scoped(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    plain, _ = raw_run(model, ids)
    seen: list[Tensor] = []
    started, finish = threading.Event(), threading.Event()

    def other_thread() -> None:
        started.wait()
        with torch.no_grad():
            seen.append(model(ids).logits)
        finish.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with torch.no_grad(), spliced(model, {SITE: sae}):
        started.set()
        finish.wait(30)
        inside = model(ids).logits
    thread.join()
    torch.testing.assert_close(seen[0], plain.logits)  # the other thread saw no splice
    assert not torch.allclose(inside, plain.logits)


# -- bad input -----------------------------------------------------------------------------


def test_bad_input_is_a_clear_error_and_leaves_nothing_behind(
    model: nn.Module, ids: Tensor
) -> None:
    before = snapshot_hooks(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    wrong_width = SparseAutoencoder(WIDTH + 1, 8)
    with pytest.raises(SpecError, match="float64"):  # the layer's parameters tell, at once
        run_with_hooks(model, ids, {SITE: splice(SparseAutoencoder(WIDTH, 8).double())})
    with pytest.raises(SpecError, match="meta"):
        run_with_hooks(model, ids, {SITE: splice(SparseAutoencoder(WIDTH, 8, device="meta"))})
    dropout = "transformer.h.0.mlp.dropout"  # no parameters: told by the activation
    with pytest.raises(EditError, match=rf"{dropout}.*float64"):
        run_with_hooks(model, ids, {dropout: splice(SparseAutoencoder(WIDTH, 8).double())})
    with pytest.raises(EditError, match="shape"):
        run_with_hooks(model, ids, {SITE: splice(nn.Linear(WIDTH, WIDTH + 2))})
    with pytest.raises(EditError, match=SITE):
        run_with_hooks(model, ids, {SITE: splice(wrong_width)})
    with pytest.raises(LayerNotFoundError, match=r"sae\.latents"):
        run_with_hooks(model, ids, {SITE: splice(make_sae()), f"{SITE}.sae.latent": "capture"})
    with pytest.raises(SpecError, match="one layer"):
        run_with_hooks(model, ids, {"transformer.h.*": splice(make_sae())})
    sae = splice(make_sae())
    with pytest.raises(SpecError, match="another layer"):
        run_with_hooks(model, ids, {"transformer.h.0": sae, "transformer.h.1": sae})
    with pytest.raises(SpecError, match="attribute 'attn'"):
        run_with_hooks(model, ids, {SITE: splice(make_sae(), name="attn")})
    with pytest.raises(SpecError):
        splice(make_sae(), error="yes")  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="dots"):
        splice(make_sae(), name="a.b")
    with pytest.raises(SpecError, match=r"nn\.Module"):
        splice(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(SpecError, match="latents"):
        splice(nn.ModuleDict({"latents": nn.Identity()}))
    assert snapshot_hooks(model) == before
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_a_transcoder_splice_inside_a_chain_is_refused(model: nn.Module, ids: Tensor) -> None:
    mlp = "transformer.h.0.mlp"
    with pytest.raises(EditError, match="itself"):
        run_with_hooks(
            model, ids, {mlp: splice(nn.Linear(WIDTH, WIDTH), from_input=True) >> add(1.0)}
        )


def test_splice_value_semantics() -> None:
    sae = make_sae()
    edit = splice(sae, error=True)
    assert repr(edit) == "splice(SparseAutoencoder, error=True)"
    assert repr(splice(sae, from_input=True)) == "splice(SparseAutoencoder, from_input=True)"
    assert edit == edit
    assert edit != splice(sae, error=True)
    copied = pickle.loads(pickle.dumps(edit))
    assert repr(copied) == repr(edit)
    x = torch.randn(2, WIDTH)
    torch.testing.assert_close(copied.spliced.module(x), sae(x))


def test_splice_in_a_trace_multiple_and_at(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with (
            torch.no_grad(),
            TraceMultiple(model, {SITE: splice(sae), LATENTS: (True, False, None)}) as tm,
        ):
            model(ids)
    _, before = raw_run(model, ids, capture=[SITE])
    torch.testing.assert_close(tm[LATENTS].output, encode_by_hand(sae, before[SITE]))
    # `at` restricts the splice to some positions.
    expected, _ = raw_run(
        model,
        ids,
        {
            SITE: lambda h: torch.cat(
                [h[:, :3], decode_by_hand(sae, encode_by_hand(sae, h[:, 3:]))], 1
            )
        },
    )
    with torch.no_grad():
        out, _ = run_with_hooks(model, ids, {SITE: at((slice(None), slice(3, None)), splice(sae))})
    torch.testing.assert_close(out.logits, expected.logits)
    assert hookfn.splice is splice


def test_kept_resolutions_and_splices(model: nn.Module, ids: Tensor) -> None:
    sae = make_sae()
    glob = "transformer.h.0.**"
    with torch.no_grad():
        _, outside = run_with_hooks(model, ids, [glob])  # resolved, and kept
        with spliced(model, {SITE: sae}):
            _, inside = run_with_hooks(model, ids, [glob])
            _, plain = run_with_hooks(model, ids, ["transformer.h.1"])
            _, again = run_with_hooks(model, ids, ["transformer.h.1"])
        _, after = run_with_hooks(model, ids, [glob])
    grafted = {f"{SITE}.sae.latents", f"{SITE}.sae.reconstruction", f"{SITE}.sae.error"}
    assert grafted <= set(inside)
    assert not grafted & set(outside)
    assert not grafted & set(after)
    torch.testing.assert_close(plain["transformer.h.1"].output, again["transformer.h.1"].output)


def test_a_second_splice_at_a_layer_or_a_module_at_two_layers_is_refused(
    model: nn.Module, ids: Tensor
) -> None:
    before = snapshot_hooks(model)
    autoencoder = nn.Sequential(nn.Linear(WIDTH, 64), nn.ReLU(), nn.Linear(64, WIDTH))
    with spliced(model, {SITE: make_sae(seed=1)}):
        with pytest.raises(SpecError, match="another splice named 'sae'"):
            run_with_hooks(model, ids, {SITE: splice(make_sae(seed=2))})
        _, caches = run_with_hooks(  # named apart, both are there
            model,
            ids,
            {SITE: splice(make_sae(seed=2), name="inner"), f"{SITE}.inner.latents": "capture"},
        )
    assert caches[f"{SITE}.inner.latents"].output.shape == (2, 7, D_SAE)
    with pytest.raises(SpecError, match="copy"):  # its submodules would be two layers' sites
        run_with_hooks(
            model,
            ids,
            {"transformer.h.0": splice(autoencoder), "transformer.h.1": splice(autoencoder)},
        )
    run_with_hooks(  # a copy at each layer is fine
        model,
        ids,
        {
            "transformer.h.0": splice(autoencoder),
            "transformer.h.1": splice(copy.deepcopy(autoencoder)),
        },
    )
    assert snapshot_hooks(model) == before
