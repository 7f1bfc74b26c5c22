"""Metrics: what a patched run is scored by, one value per prompt pair.

Built-in metrics read the logits at each prompt's last real position (the last 1 of its
attention mask), so padded batches score the right token, and a sweep only computes the
logits it reads. Any callable ``metric(output) -> Tensor[pairs]`` works too; it gets the
model's output for the prompt pairs of one cell, as the model returned it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from typing_extensions import TypeAlias

from hookfn import HookfnError, SpecError, primary

__all__ = [
    "KLToClean",
    "LogitDiff",
    "Metric",
    "MetricLike",
    "Probability",
    "Rows",
    "Scorer",
    "kl_to_clean",
    "logit_diff",
    "probability",
]

Tokens: TypeAlias = Union[int, Sequence[int], Tensor]


class Metric:
    """Base class of the built-in metrics: a function of the last real position's logits."""

    __slots__ = ()
    needs_clean = False

    def check(self, n: int) -> None:
        """Raise a `SpecError` if the metric cannot score ``n`` prompt pairs."""

    def score(self, logits: Tensor, pair: Tensor, clean: Tensor | None) -> Tensor:
        """``[rows]`` from ``logits [rows, vocab]``, the pair of each row, and the clean
        run's log-probabilities ``[pairs, vocab]`` (for metrics that need them)."""
        raise NotImplementedError


def _tokens(tokens: Tokens, where: str) -> Tensor:
    if isinstance(tokens, bool):
        raise SpecError(f"{where} takes token ids, got {tokens!r}.")
    try:
        t = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError):
        raise SpecError(
            f"{where} takes a token id or one per prompt pair, got {tokens!r}."
        ) from None
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() > 1:
        raise SpecError(
            f"{where} takes an int token id or a 1-D integer tensor of one id per prompt "
            f"pair, got dtype {t.dtype} and shape {tuple(t.shape)}."
        )
    return t.to(torch.long).reshape(-1)


def _check_count(t: Tensor, n: int, where: str) -> None:
    if t.numel() not in (1, n):
        raise SpecError(
            f"{where} has {t.numel()} token ids for {n} prompt pairs; give one id, or one per pair."
        )


def _per_row(t: Tensor, pair: Tensor) -> Tensor:
    t = t.to(pair.device)
    return t.expand(int(pair.numel())) if t.numel() == 1 else t[pair]


@dataclass(frozen=True, slots=True, eq=False)
class LogitDiff(Metric):
    """Logit of the right answer minus the wrong one (see `logit_diff`)."""

    correct: Tensor
    wrong: Tensor

    def check(self, n: int) -> None:
        _check_count(self.correct, n, "logit_diff(correct=...)")
        _check_count(self.wrong, n, "logit_diff(wrong=...)")

    def score(self, logits: Tensor, pair: Tensor, clean: Tensor | None) -> Tensor:
        right = logits.gather(-1, _per_row(self.correct, pair)[:, None])
        wrong = logits.gather(-1, _per_row(self.wrong, pair)[:, None])
        return (right - wrong)[:, 0]

    def __repr__(self) -> str:
        return f"logit_diff({_show(self.correct)}, {_show(self.wrong)})"


def logit_diff(correct: Tokens, wrong: Tokens) -> LogitDiff:
    """Logit difference between the right and the wrong answer at the last real position.

    Args:
        correct: The answer's token id, or one per prompt pair.
        wrong: The competing answer's token id, or one per prompt pair.

    Examples:
        >>> logit_diff(3, 5)
        logit_diff(3, 5)
    """
    return LogitDiff(
        _tokens(correct, "logit_diff(correct=...)"), _tokens(wrong, "logit_diff(wrong=...)")
    )


@dataclass(frozen=True, slots=True, eq=False)
class Probability(Metric):
    """The probability of a token (see `probability`)."""

    token: Tensor

    def check(self, n: int) -> None:
        _check_count(self.token, n, "probability(token=...)")

    def score(self, logits: Tensor, pair: Tensor, clean: Tensor | None) -> Tensor:
        probs = logits.float().softmax(-1)
        return probs.gather(-1, _per_row(self.token, pair)[:, None])[:, 0].to(logits.dtype)

    def __repr__(self) -> str:
        return f"probability({_show(self.token)})"


def probability(token: Tokens) -> Probability:
    """The probability the model gives ``token`` at the last real position.

    Examples:
        >>> probability([3, 4]).token
        tensor([3, 4])
    """
    return Probability(_tokens(token, "probability(token=...)"))


@dataclass(frozen=True, slots=True, eq=False)
class KLToClean(Metric):
    """KL divergence from the clean run's next-token distribution (see `kl_to_clean`)."""

    needs_clean = True

    def score(self, logits: Tensor, pair: Tensor, clean: Tensor | None) -> Tensor:
        assert clean is not None
        reference = clean.to(logits.device)[pair]
        logprobs = logits.float().log_softmax(-1)
        return (reference.exp() * (reference - logprobs)).sum(-1).to(logits.dtype)

    def __repr__(self) -> str:
        return "kl_to_clean()"


def kl_to_clean() -> KLToClean:
    """``KL(clean || patched)`` of the next-token distributions at the last real position.

    0 for the clean run; lower is closer to clean.

    Examples:
        >>> kl_to_clean()
        kl_to_clean()
    """
    return KLToClean()


def _show(t: Tensor) -> str:
    return str(int(t)) if t.numel() == 1 else str(t.tolist())


MetricLike: TypeAlias = Union[Metric, Callable[[Any], Tensor]]
"""A built-in metric, or a callable ``metric(output) -> Tensor[pairs]``."""


@dataclass(frozen=True, slots=True)
class Rows:
    """Which prompt pair each row of a batched run is, and where its metric reads.

    Rows are cell-major: row ``c * n + i`` is prompt pair ``i`` of the chunk's cell ``c``.

    Attributes:
        n: The number of prompt pairs.
        pair: ``[rows]``: the prompt pair of each row.
        index: ``[rows]``: each row's last real position in the output's dim 1.
        prefix: For a run on positions ``start..`` only: the base run's primary output at the
            positions before, ``[n, start, ...]``, put back in front for callable metrics.
    """

    n: int
    pair: Tensor
    index: Tensor
    prefix: Tensor | None = None


@dataclass(frozen=True, slots=True)
class Scorer:
    """A metric, ready to score batched outputs: ``[rows]`` per call."""

    metric: Metric | None
    fn: Callable[[Any], Tensor] | None
    name: str

    @property
    def builtin(self) -> bool:
        return self.metric is not None

    def __call__(self, output: Any, rows: Rows, clean: Tensor | None) -> Tensor:
        if self.metric is not None:
            logits = _primary(output)
            at = torch.arange(logits.shape[0], device=logits.device)
            last = logits[at, rows.index.to(logits.device)]
            return self.metric.score(last, rows.pair.to(logits.device), clean)
        assert self.fn is not None
        n, total = rows.n, int(rows.pair.numel())
        values = []
        for start in range(0, total, n):
            part = _slice_rows(output, start, start + n, total)
            if rows.prefix is not None:
                part = _with_primary(part, torch.cat([rows.prefix, _primary(part)], dim=1))
            values.append(check_value(self.fn(part), n, self.name))
        return torch.cat(values)


def as_scorer(metric: object, n: int) -> Scorer:
    """A `Scorer` for ``metric``, checked against ``n`` prompt pairs (before any forward).

    Raises:
        SpecError: ``metric`` is not a metric, or its token ids do not fit ``n`` pairs.
    """
    if isinstance(metric, Metric):
        metric.check(n)
        return Scorer(metric, None, repr(metric))
    if callable(metric):
        return Scorer(None, metric, getattr(metric, "__name__", type(metric).__name__))
    raise SpecError(
        f"metric= takes logit_diff(...), probability(...), kl_to_clean() or a callable "
        f"metric(output) -> Tensor[pairs], got {type(metric).__name__}."
    )


def check_value(value: object, n: int, name: str) -> Tensor:
    """A callable metric's value as ``[n]``.

    Raises:
        HookfnError: It is not a tensor of one value per prompt pair.
    """
    if isinstance(value, Tensor) and value.is_floating_point():
        if value.shape == (n,):
            return value
        if value.dim() == 0 and n == 1:
            return value.reshape(1)
    shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
    raise HookfnError(
        f"the metric {name} returned {shape}; a metric returns one float per prompt pair, a "
        f"tensor of shape [{n}] (e.g. logits[:, -1, right] - logits[:, -1, wrong], without "
        ".mean() or .sum(): cells are scored in batches of prompt pairs)."
    )


def _primary(output: Any) -> Tensor:
    tensor = primary(output)
    if tensor is None:
        raise HookfnError(
            f"the model returned {type(output).__name__}, with no primary tensor of logits for "
            "the built-in metric; pass a callable metric(output) -> Tensor[pairs]."
        )
    return tensor


def _slice_rows(output: Any, start: int, stop: int, total: int) -> Any:
    def cut(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() >= 1 and leaf.shape[0] == total:
            return leaf[start:stop]
        return leaf

    return pytree.tree_map(cut, output)


def _with_primary(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    if isinstance(value, (tuple, list)):
        return type(value)([new, *value[1:]])
    key = next(iter(value))
    value[key] = new  # a fresh structure from _slice_rows: ours to change
    return value
