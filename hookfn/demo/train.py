"""Train the demo model and save its weights.

Run from the repository root::

    python -m hookfn.demo.train

Training uses fixed seeds and two CPU threads and takes well under a minute
on a laptop CPU. Every batch is freshly sampled, and accuracy is reported on
held-out prompts drawn from a separately seeded generator. The weights are
saved as a float32 ``state_dict`` (load it with
``torch.load(path, weights_only=True)`` or :func:`hookfn.demo.load_model`).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from hookfn.demo import DEMO_CONFIG, WEIGHTS_PATH
from hookfn.demo.model import TinyGPT
from hookfn.demo.task import QUERY_POSITION, make_batch

__all__ = ["evaluate", "main", "train"]


@torch.no_grad()
def evaluate(model: TinyGPT, n: int, generator: torch.Generator) -> float:
    """Fraction of freshly sampled prompts the model answers correctly.

    Args:
        model: The model to score.
        n: Number of prompts.
        generator: Source of the prompts.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    was_training = model.training
    model.eval()
    input_ids, targets = make_batch(n, generator)
    predictions = model(input_ids)[:, QUERY_POSITION].argmax(dim=-1)
    model.train(was_training)
    return float((predictions == targets).float().mean())


def train(
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    log_every: int = 250,
) -> TinyGPT:
    """Train a fresh :class:`TinyGPT` with ``DEMO_CONFIG`` on the recall task.

    Uses AdamW with a linear warm-up followed by cosine decay, and a
    cross-entropy loss on the answer position only.

    Args:
        steps: Number of optimisation steps.
        batch_size: Prompts per step.
        lr: Peak learning rate.
        seed: Seed for initialisation and training data.
        log_every: Print the loss every this many steps (0 disables logging).

    Returns:
        The trained model, in eval mode.
    """
    torch.manual_seed(seed)
    model = TinyGPT(DEMO_CONFIG)
    model.train()
    data = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    for step in range(steps):
        input_ids, targets = make_batch(batch_size, data)
        logits = model(input_ids)[:, QUERY_POSITION]
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            accuracy = float((logits.argmax(dim=-1) == targets).float().mean())
            print(f"step {step:5d}  loss {loss.item():.4f}  batch accuracy {accuracy:.3f}")
    model.eval()
    return model


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point: train, report held-out accuracy, save weights.

    Args:
        argv: Command-line arguments; ``None`` reads ``sys.argv``.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=WEIGHTS_PATH)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = train(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    elapsed = time.perf_counter() - start

    held_out = torch.Generator().manual_seed(10_000 + args.seed)
    accuracy = evaluate(model, 10_000, held_out)
    torch.save(model.state_dict(), args.out)
    size_kb = args.out.stat().st_size / 1024
    print(f"trained {args.steps} steps in {elapsed:.1f}s")
    print(f"held-out accuracy: {accuracy:.4f} (10000 prompts)")
    print(f"saved {args.out} ({size_kb:.0f} KiB)")


if __name__ == "__main__":
    main()
