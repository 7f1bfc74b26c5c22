"""The hookfn demo: look inside the shipped model, edit it, and localize its answer.

Run with ``python -m hookfn.demo`` (or ``make demo`` from a clone).
"""

from __future__ import annotations

import torch

from hookfn import Hook, Spec, ablate, layers, run_with_hooks, scale
from hookfn.demo import (
    QUERY_POSITION,
    SEQ_LEN,
    decode,
    load_model,
    make_batch,
    make_patching_pair,
)
from hookfn.patching import (
    activation_patching,
    agreement,
    attribution_patching,
    each_position,
    logit_diff,
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
    sites = ["transformer.wte", "transformer.h.*"]
    metric = logit_diff(pair.clean_targets, pair.corrupted_targets)
    exact = activation_patching(
        model, pair.clean_ids, pair.corrupted_ids, sites, over=each_position(), metric=metric
    )
    print(
        f"Clean and corrupted prompts differ only in the queried value (position "
        f"{pair.position}); logit difference clean {float(exact.clean):+.2f}, corrupted "
        f"{float(exact.corrupted):+.2f}."
    )
    print("Share of the clean answer restored by patching one output at one position:")
    restored = exact.normalized()
    print(_indent(restored.table(precision=2)))
    for name, row in zip(restored.labels[0], restored.values, strict=True):
        print(f"  after {name:18s} the answer is carried at position {int(row.argmax())}")
    print()

    print("== 6. Gradients: attribution patching, every cell from one backward pass ==")
    estimate = attribution_patching(
        model, pair.clean_ids, pair.corrupted_ids, sites, over=each_position(), metric=metric
    )
    integrated = attribution_patching(
        model,
        pair.clean_ids,
        pair.corrupted_ids,
        sites,
        over=each_position(),
        metric=metric,
        steps=16,
    )
    layer = 0
    print(f"  change of the logit difference when patching {exact.labels[0][layer]}:")
    print("  position                " + "".join(f"{p:>7d}" for p in range(SEQ_LEN)))
    for label, result in (
        ("first-order estimate", estimate),
        ("integrated, 16 steps", integrated),
        ("actual patch", exact),
    ):
        print(f"  {label:24s}" + "".join(f"{float(e):+7.2f}" for e in result.effect[layer]))
    print("  Agreement with exact patching over every cell:")
    for label, result in (("first-order", estimate), ("integrated", integrated)):
        report = agreement(result, exact, top_k=3, worst=0)
        print(
            f"    {label:12s} pearson {report.pearson:+.2f}  spearman {report.spearman:+.2f}  "
            f"top-3 overlap {report.top_k_overlap:.0%}"
        )
    print(
        "  The model saturates: the gradient at the corrupted run says little about a large "
        "change, and\n  averaging it along the path from corrupted to clean (integrated "
        "gradients) recovers the effect."
    )


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.splitlines())


if __name__ == "__main__":
    main()
