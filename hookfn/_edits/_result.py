"""`check_result`: what an edit returned, checked to stand in for what it edited."""

from __future__ import annotations

from torch import Tensor

from .._errors import EditError


def check_result(x: Tensor, y: object) -> Tensor:
    """``y``, an edit's result, checked (and cast) to stand in for ``x``, what it edited.

    ``None`` means "unchanged" and gives ``x``. A tensor of ``x``'s shape, device and dtype is
    returned as it is; a floating-point (or complex) result of another precision is cast to
    ``x``'s dtype (the next layer expects the dtype it produced). Anything else is almost
    surely a bug that would fail deep inside the next layer, or silently change what it
    computes: an `EditError`. The hook engine calls this on every edit's result, and `at` /
    `heads` on their inner edit's.

    Raises:
        EditError: ``y`` is not a tensor, or has another shape or device, or another kind of
            number (an int, bool or complex result for a float activation, ...).

    Examples:
        >>> import torch
        >>> x = torch.zeros(2, dtype=torch.float16)
        >>> check_result(x, None) is x
        True
        >>> check_result(x, torch.ones(2, dtype=torch.float64))
        tensor([1., 1.], dtype=torch.float16)
        >>> check_result(x, x > 0)
        Traceback (most recent call last):
        ...
        hookfn._errors.EditError: the edit returned dtype torch.bool for a tensor of dtype ...
    """
    # The common case in a few attribute reads: each call of an edited module pays for it.
    if type(y) is Tensor and y.dtype is x.dtype and y.is_same_size(x) and y.device == x.device:
        return y
    return _checked(x, y)


def _checked(x: Tensor, y: object) -> Tensor:
    if y is None:
        return x
    if not isinstance(y, Tensor):
        raise EditError(
            f"the edit returned a {type(y).__name__}; an edit returns a tensor of the shape "
            f"it was given, {tuple(x.shape)}, or None for 'unchanged'."
        )
    if y.shape != x.shape:
        raise EditError(
            f"the edit returned shape {tuple(y.shape)} for a tensor of shape "
            f"{tuple(x.shape)}; an edit must keep the shape (broadcast inside it)."
        )
    if y.device != x.device:
        raise EditError(
            f"the edit returned a tensor on {y.device} for one on {x.device}; make the "
            "edit's tensors on x.device (add() and the other combinators move theirs)."
        )
    if y.dtype is x.dtype:
        return y  # a tensor subclass
    if (x.is_floating_point() and y.is_floating_point()) or (x.is_complex() and y.is_complex()):
        return y.to(x.dtype)
    raise EditError(
        f"the edit returned dtype {y.dtype} for a tensor of dtype {x.dtype}; an edit keeps "
        "the kind of number (a floating-point result is cast back, other dtypes must "
        f"match): return y.to({x.dtype}) if that conversion is what you mean."
    )
