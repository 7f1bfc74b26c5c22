"""Train a tiny sparse autoencoder on the demo model's residual stream.

Run from the repository root::

    python -m hookfn.demo.train_sae [--out FOLDER]

It collects the output of block 0 (``transformer.h.0``, the residual stream after the
attention that moves the answer to the query position) over freshly sampled prompts, and
trains a `hookfn.sae.SparseAutoencoder` (ReLU, 256 latents) on it with an L1 penalty, in a
few seconds on one CPU thread. Seeds are fixed, so a run gives the same SAE each time on the
same machine. ``--out`` saves it in SAELens's layout (`hookfn.sae.load` reads it back).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from hookfn import run_with_hooks
from hookfn.demo import load_model
from hookfn.demo.task import make_batch
from hookfn.sae import SparseAutoencoder

__all__ = ["SITE", "main", "train_sae"]

SITE = "transformer.h.0"
"""The layer whose output the SAE reads: the residual stream after block 0."""


def train_sae(
    *,
    d_sae: int = 256,
    prompts: int = 2048,
    steps: int = 600,
    l1: float = 1.0,
    seed: int = 0,
) -> SparseAutoencoder:
    """A `SparseAutoencoder` trained on the output of ``transformer.h.0`` of the demo model.

    Args:
        d_sae: The number of latents.
        prompts: The prompts whose activations (every position) it trains on.
        steps: Adam steps, on batches of 512 activation vectors.
        l1: The weight of the L1 penalty on the latents.
        seed: Seeds the prompts, the initial weights and the batches.
    """
    model = load_model()
    generator = torch.Generator().manual_seed(seed)
    ids, _ = make_batch(prompts, generator)
    acts = _activations(model, ids)
    sae = SparseAutoencoder(acts.shape[-1], d_sae, generator=generator)
    with torch.no_grad():
        sae.b_dec.copy_(acts.median(0).values)
    optimizer = torch.optim.Adam(sae.parameters(), lr=3e-3)
    for _ in range(steps):
        batch = acts[torch.randint(len(acts), (512,), generator=generator)]
        z = sae.encode(batch)
        loss = (sae.decode(z) - batch).pow(2).sum(-1).mean() + l1 * z.abs().sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        with torch.no_grad():  # decoder rows of unit norm, so L1 cannot shrink them away
            sae.W_dec.div_(sae.W_dec.norm(dim=-1, keepdim=True))
    return sae.requires_grad_(False)


def _activations(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Block 0's output at every position of every prompt, as rows."""
    with torch.no_grad():
        _, caches = run_with_hooks(model, ids, [SITE], stop_early=True)
    acts = caches[SITE].output
    return acts.reshape(-1, acts.shape[-1])


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="save the SAE into this folder")
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    sae = train_sae(steps=args.steps)
    seconds = time.perf_counter() - start
    ids, _ = make_batch(512, torch.Generator().manual_seed(99))
    acts = _activations(load_model(), ids)
    with torch.no_grad():
        z = sae.encode(acts)
        explained = 1 - (sae.decode(z) - acts).pow(2).sum() / (acts - acts.mean(0)).pow(2).sum()
    print(
        f"trained in {seconds:.1f} s: variance explained {explained:.3f}, "
        f"{(z > 0).float().sum(-1).mean():.1f} latents active per vector (held-out prompts)"
    )
    if args.out:
        print("saved to", sae.save(args.out))


if __name__ == "__main__":
    main()
