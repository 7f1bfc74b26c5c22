"""The hookfn demo: look inside the shipped model, edit it, and localize its answer.

Run with ``python -m hookfn.demo`` (or ``make demo`` from a clone).
"""

from __future__ import annotations

import torch

from hookfn import Hook, Spec, ablate, layers, patch_from, run_with_hooks, scale
from hookfn.demo import (
    QUERY_POSITION,
    SEQ_LEN,
    decode,
    load_model,
    make_batch,
    make_patching_pair,
)


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    return float((logits[:, QUERY_POSITION].argmax(-1) == targets).float().mean())


def main() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = load_model()
    n_layer = len(model.transformer.h)
    ids, targets = make_batch(512, generator)

    print("== 1. The model: a tiny transformer trained to recall a value bound to a key ==")
    prompt = ids[:1]
    logits = model(prompt)
    print(f"prompt  {decode(prompt[0])}   ->   answer {decode(logits[0, -1].argmax()[None])}")
    print(f"accuracy on 512 fresh prompts: {_accuracy(model(ids), targets):.1%}\n")

    print("== 2. What can be hooked: one dry run lists every layer and its output ==")
    print(layers(model, prompt, "transformer.**"))
    print()

    print("== 3. Capture: every block's output and the last attention's input, in one run ==")
    _, caches = run_with_hooks(
        model,
        prompt,
        {"transformer.h.*": "capture", f"transformer.h.{n_layer - 1}.attn": Hook(input=True)},
    )
    for name, capture in caches.items():
        shapes = f"output {tuple(capture.output.shape)}"
        if capture.raw_inputs:
            shapes += f", input {tuple(capture.input.shape)}"
        print(f"  {name:24s} {shapes}")
    print()

    print("== 4. Edit: knock out parts of the model for one call, and watch the accuracy ==")
    base = _accuracy(model(ids), targets)
    rows: list[tuple[str, Spec]] = [
        ("no edit", {}),
        *(
            (f"attention of block {i} scaled by 0", {f"transformer.h.{i}.attn": scale(0.0)})
            for i in range(n_layer)
        ),
        *(
            (f"MLP of block {i} scaled by 0", {f"transformer.h.{i}.mlp": scale(0.0)})
            for i in range(n_layer)
        ),
        ("16 of 64 residual features zeroed", {"transformer.h.0": ablate(slice(0, 16))}),
    ]
    for label, spec in rows:
        edited, _ = run_with_hooks(model, ids, spec)
        print(f"  {label:36s} accuracy {_accuracy(edited, targets):6.1%}")
    unchanged = model(ids)
    after = _accuracy(unchanged, targets)
    print(
        f"  (the model itself is untouched: accuracy {after:.1%} afterwards, {base:.1%} before)\n"
    )

    print("== 5. Activation patching: where does the answer travel? ==")
    pair = make_patching_pair(64, generator, pair_index=1)
    sites = ["transformer.wte", *(f"transformer.h.{i}" for i in range(n_layer))]
    clean_logits, clean = run_with_hooks(model, pair.clean_ids, sites)
    corrupted_logits = model(pair.corrupted_ids)

    def metric(logits: torch.Tensor) -> torch.Tensor:
        """Mean logit of the clean answer minus that of the corrupted answer."""
        last = logits[:, QUERY_POSITION]
        right = last.gather(1, pair.clean_targets[:, None])
        wrong = last.gather(1, pair.corrupted_targets[:, None])
        return (right - wrong).mean()

    def logit_diff(logits: torch.Tensor) -> float:
        return float(metric(logits).detach())

    clean_diff, corrupted_diff = logit_diff(clean_logits), logit_diff(corrupted_logits)
    print(
        f"Clean and corrupted prompts differ only in the queried value (position "
        f"{pair.position}); logit difference clean {clean_diff:+.2f}, corrupted "
        f"{corrupted_diff:+.2f}."
    )
    print("Share of the clean answer restored by patching one output at one position:")
    print("  " + " " * 18 + "".join(f"{p:>6d}" for p in range(SEQ_LEN)))
    restored = torch.zeros(len(sites), SEQ_LEN)
    for row, name in enumerate(sites):
        for position in range(SEQ_LEN):
            patched, _ = run_with_hooks(
                model, pair.corrupted_ids, {name: patch_from(clean).at(position)}
            )
            restored[row, position] = (logit_diff(patched) - corrupted_diff) / (
                clean_diff - corrupted_diff
            )
        print(f"  {name:18s}" + "".join(f"{float(r):6.0%}" for r in restored[row]))
    for row, name in enumerate(sites):
        print(f"  after {name:18s} the answer is carried at position {int(restored[row].argmax())}")
    print()

    print("== 6. Gradients: attribution patching, every position from one backward pass ==")
    layer = "transformer.wte"
    _, grads = run_with_hooks(model, pair.corrupted_ids, {layer: Hook(grad=True)}, backward=metric)
    difference = clean[layer].output - grads[layer].output
    estimate = (grads[layer].grad_output * difference).sum(-1).mean(0)
    actual = restored[0] * (clean_diff - corrupted_diff)
    print(f"  change of the logit difference when patching {layer}, per position:")
    print("  first-order estimate " + "".join(f"{float(e):+7.2f}" for e in estimate))
    print("  actual patch         " + "".join(f"{float(a):+7.2f}" for a in actual))
    print(
        f"  The estimate, a linearization, ranks position {int(estimate.abs().argmax())} first; "
        f"the actual patches, {SEQ_LEN} runs, rank position {int(actual.abs().argmax())} first."
    )


if __name__ == "__main__":
    main()
