"""`attribution_patching` against manual autograd (raw hooks, ``retain_grad``), integrated
gradients against a hand-written interpolation loop and against exact patching, and the
`agreement` report against statistics computed by hand."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from test_patching_reference import gpt2, primary_of, prompt_pair, raw_hook, record
from torch import Tensor, nn

from hookfn.demo import load_model, make_patching_pair
from hookfn.patching import (
    PatchingResult,
    Sites,
    activation_patching,
    agreement,
    attn_out,
    attribution_patching,
    each_head,
    each_position,
    head_out,
    logit_diff,
    resid_pre,
)

SEQ = 8


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return gpt2(n_layer=3)


def _metric(output: Any) -> Tensor:
    logits = primary_of(output)[:, -1]
    return logits[:, 3] - logits[:, 5]


def manual_gradient(
    model: nn.Module, base: Tensor, name: str, kind: str, metric: Callable[[Any], Tensor]
) -> Tensor:
    """d sum(metric) / d (the activation the module returns or receives), by plain autograd."""
    kept: list[Tensor] = []

    def fresh(x: Tensor) -> Tensor:
        y = x * 1.0  # a node of its own: the gradient through this module alone
        y.retain_grad()
        kept.append(y)
        return y

    with raw_hook(model.get_submodule(name), kind, fresh):
        metric(model(base)).sum().backward()
    model.zero_grad(set_to_none=True)
    grad = kept[0].grad
    assert grad is not None
    return grad


def _cell_sums(values: Tensor, indices: list[Any]) -> Tensor:
    """``[cells, pairs]``: each index's sum of ``values`` per pair."""
    sums = []
    for index in indices:
        mask = torch.zeros_like(values, dtype=torch.bool)
        mask[index] = True
        sums.append((values * mask).flatten(1).sum(1))
    return torch.stack(sums)


POSITIONS = [(slice(None), p) for p in range(SEQ)]
HEADS = [(..., slice(h * 8, (h + 1) * 8)) for h in range(4)]


@pytest.mark.parametrize(
    ("sites", "kind", "tail", "over", "indices"),
    [
        (resid_pre, "input", "", each_position(), POSITIONS),
        (attn_out, "output", ".attn", each_position(), POSITIONS),
        (head_out, "input", ".attn.c_proj", each_head(), HEADS),
    ],
)
@pytest.mark.parametrize("mode", ["denoise", "noise"])
def test_equals_gradient_times_difference(
    model: nn.Module, sites: Any, kind: str, tail: str, over: Any, indices: Any, mode: str
) -> None:
    clean, corrupted = prompt_pair(n=2, at=(2, 6))
    base, source = (corrupted, clean) if mode == "denoise" else (clean, corrupted)
    result = attribution_patching(
        model,
        clean,
        corrupted,
        sites(model),
        over=over,
        metric=logit_diff(3, 5),
        mode=mode,
        per_pair=True,
    )
    for layer in range(3):
        name = f"transformer.h.{layer}{tail}"
        grad = manual_gradient(model, base, name, kind, _metric)
        difference = record(model, lambda m: m(source), name, kind) - record(
            model, lambda m: m(base), name, kind
        )
        want = _cell_sums(grad * difference, indices).T  # [pairs, cells]
        torch.testing.assert_close(result.effect[:, layer], want, atol=1e-5, rtol=1e-4)
    assert result.effect.abs().max() > 1e-3


def test_constant_number_of_passes(model: nn.Module) -> None:
    clean, corrupted = prompt_pair(n=2, at=(3,))
    forwards: list[int] = []
    backwards: list[int] = []
    handles = [
        model.register_forward_pre_hook(lambda m, a: forwards.append(1)),  # type: ignore[func-returns-value]
        model.lm_head.register_full_backward_hook(lambda m, gi, go: backwards.append(1)),  # type: ignore[func-returns-value]
    ]
    try:
        for sites, over in [
            (resid_pre(model), each_position()),
            (head_out(model), (each_position(), each_head())),
        ]:
            forwards.clear()
            backwards.clear()
            attribution_patching(model, clean, corrupted, sites, over=over, metric=logit_diff(3, 5))
            assert (len(forwards), len(backwards)) == (2, 1)
    finally:
        for handle in handles:
            handle.remove()


def manual_integrated_gradients(
    model: nn.Module, base: Tensor, source: Tensor, name: str, kind: str, steps: int
) -> Tensor:
    """The mean gradient along ``base + j/steps * (source - base)``, one run per step."""
    start = record(model, lambda m: m(base), name, kind)
    end = record(model, lambda m: m(source), name, kind)
    total = torch.zeros_like(start)
    for j in range(steps):
        point = (start + j / steps * (end - start)).requires_grad_()

        def put(x: Tensor, point: Tensor = point) -> Tensor:
            return point

        with raw_hook(model.get_submodule(name), kind, put):
            _metric(model(base)).sum().backward()
        assert point.grad is not None
        total += point.grad
    model.zero_grad(set_to_none=True)
    return total / steps * (end - start)


@pytest.mark.parametrize("kind", ["input", "output"])
def test_integrated_gradients_equal_a_hand_written_loop(model: nn.Module, kind: str) -> None:
    clean, corrupted = prompt_pair(n=2, at=(2,))
    sites = Sites("transformer.h.*", kind=kind)  # type: ignore[arg-type]
    result = attribution_patching(
        model,
        clean,
        corrupted,
        sites,
        over=each_position(),
        metric=logit_diff(3, 5),
        steps=5,
        per_pair=True,
        batch_size=6,
    )
    for layer in range(3):
        name = f"transformer.h.{layer}"
        product = manual_integrated_gradients(model, corrupted, clean, name, kind, 5)
        want = _cell_sums(product, POSITIONS).T
        torch.testing.assert_close(result.effect[:, layer], want, atol=1e-5, rtol=1e-4)


def test_one_step_is_plain_attribution_patching(model: nn.Module) -> None:
    clean, corrupted = prompt_pair(at=(2,))
    kwargs: dict[str, Any] = {"over": each_position(), "metric": logit_diff(3, 5)}
    plain = attribution_patching(model, clean, corrupted, resid_pre(model), **kwargs)
    one = attribution_patching(model, clean, corrupted, resid_pre(model), steps=1, **kwargs)
    assert torch.equal(plain.values, one.values)
    assert plain.method == "attribution patching"


class Separable(nn.Module):
    """A model whose metric is a sum over positions of a nonlinear function of each position's
    activation at ``hidden`` (and linear in it through ``linear``)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(3, 6)
        self.hidden = nn.Linear(6, 6)
        self.act = nn.Tanh()
        self.head = nn.Linear(6, 1)
        self.linear = nn.Linear(6, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.hidden(self.embed(x))
        return self.head(self.act(2.0 * h)).sum((1, 2)) + self.linear(h).sum((1, 2))


def test_integrated_gradients_converge_to_exact_patching() -> None:
    model = Separable().eval()
    g = torch.Generator().manual_seed(1)
    clean, corrupted = torch.randn(3, 5, 3, generator=g), torch.randn(3, 5, 3, generator=g)
    metric: Callable[[Tensor], Tensor] = lambda out: out  # noqa: E731
    kwargs: dict[str, Any] = {"over": each_position(), "metric": metric, "per_pair": True}
    exact = activation_patching(model, clean, corrupted, "hidden", **kwargs)
    errors = []
    for steps in (1, 4, 16, 64):
        estimate = attribution_patching(model, clean, corrupted, "hidden", steps=steps, **kwargs)
        errors.append(float((estimate.effect - exact.effect).abs().max()))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < errors[0] / 30
    assert errors[-1] < 0.02 * float(exact.effect.abs().max())

    # Where the metric is linear in the patched activation, one step is already exact.
    linear = lambda out: out  # noqa: E731
    for steps in (1, 8):
        estimate = attribution_patching(
            model,
            clean,
            corrupted,
            "head",
            steps=steps,
            over=each_position(),
            metric=linear,
            per_pair=True,
        )
        exact_head = activation_patching(
            model, clean, corrupted, "head", over=each_position(), metric=linear, per_pair=True
        )
        torch.testing.assert_close(estimate.effect, exact_head.effect, atol=1e-5, rtol=1e-5)


def test_integrated_gradients_recover_the_saturated_demo_model() -> None:
    model = load_model()
    pair = make_patching_pair(16, torch.Generator().manual_seed(0), pair_index=1)
    metric = logit_diff(pair.clean_targets, pair.corrupted_targets)
    args = (model, pair.clean_ids, pair.corrupted_ids, "transformer.wte")
    exact = activation_patching(*args, over=each_position(), metric=metric)
    plain = attribution_patching(*args, over=each_position(), metric=metric)
    integrated = attribution_patching(*args, over=each_position(), metric=metric, steps=16)
    actual = float(exact.effect[0, 1])
    assert actual > 10
    assert abs(float(plain.effect[0, 1]) - actual) > 0.5 * actual
    assert abs(float(integrated.effect[0, 1]) - actual) < 0.05 * actual


def _result(values: list[float]) -> PatchingResult:
    labels = tuple(f"c{i}" for i in range(len(values)))
    return PatchingResult(
        torch.tensor(values),
        ("site",),
        (labels,),
        torch.tensor(1.0),
        torch.tensor(0.0),
        "denoise",
        "test",
        "metric",
    )


def test_agreement_statistics_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(40, generator=g, dtype=torch.float64)
    estimate = exact + 0.5 * torch.randn(40, generator=g, dtype=torch.float64)
    estimate[[3, 7]] = estimate[[7, 3]]  # some rank changes
    report = agreement(_result(estimate.tolist()), _result(exact.tolist()), top_k=5, worst=3)
    pearson = float(torch.corrcoef(torch.stack([estimate, exact]))[0, 1])
    ranks = lambda t: t.argsort().argsort().double()  # noqa: E731  (no ties here)
    spearman = float(torch.corrcoef(torch.stack([ranks(estimate), ranks(exact)]))[0, 1])
    assert report.pearson == pytest.approx(pearson, abs=1e-6)
    assert report.spearman == pytest.approx(spearman, abs=1e-6)
    top_estimate = set(estimate.abs().topk(5).indices.tolist())
    top_exact = set(exact.abs().topk(5).indices.tolist())
    assert report.top_k_overlap == len(top_estimate & top_exact) / 5
    worst = (estimate - exact).abs().argsort(descending=True)[:3].tolist()
    assert [d.cell for d in report.disagreements] == [f"c{i}" for i in worst]
    assert report.disagreements[0].exact == pytest.approx(float(exact[worst[0]]))
    text = str(report)
    assert "pearson" in text
    assert f"c{worst[0]}" in text


def test_agreement_needs_the_same_cells() -> None:
    from hookfn import SpecError

    with pytest.raises(SpecError, match="different cells"):
        agreement(_result([1.0, 2.0]), _result([1.0, 2.0, 3.0]))
