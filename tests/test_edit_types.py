"""Static types of the edit factories, checked by mypy (``mypy --strict tests/test_edit_types.py``).

``assert_type`` is a no-op at runtime, so pytest runs this file too: the calls below must at
least build their edits without error.
"""

from __future__ import annotations

import torch
from torch import Tensor
from typing_extensions import assert_type

from hookfn import (
    Capture,
    Chain,
    Edit,
    Function,
    Site,
    ablate,
    add,
    as_edit,
    at,
    chain,
    clamp,
    heads,
    identity,
    mean_ablate,
    patch_from,
    project_out,
    replace,
    resample_ablate,
    scale,
    steer,
)
from hookfn._edits import (
    Ablate,
    Add,
    At,
    Clamp,
    Heads,
    MeanAblate,
    PatchFrom,
    ProjectOut,
    Replace,
    ResampleAblate,
    Scale,
    Steer,
)


def double(x: Tensor) -> Tensor:
    return x * 2


def shift(x: Tensor, site: Site) -> Tensor:
    return x + site.call


def test_factories_return_precise_types() -> None:
    v = torch.ones(8)
    cache: dict[str, Capture] = {"fc": Capture("fc", (torch.ones(2, 8),))}
    assert_type(add(1.0), Add)
    assert_type(add(1), Add)
    assert_type(add(v), Add)
    assert_type(scale(0.5), Scale)
    assert_type(replace(v), Replace)
    assert_type(clamp(-1.0, 1.0), Clamp)
    assert_type(clamp(hi=v), Clamp)
    assert_type(ablate(17), Ablate)
    assert_type(ablate([1, 2], dim=1), Ablate)
    assert_type(ablate(slice(0, 4)), Ablate)
    assert_type(ablate(torch.tensor([True, False])), Ablate)
    assert_type(ablate(), Ablate)
    assert_type(mean_ablate(3, cache=cache, over=(0, 1)), MeanAblate)
    assert_type(resample_ablate(perm=[1, 0]), ResampleAblate)
    assert_type(resample_ablate(cache=cache, perm=torch.tensor([1, 0])), ResampleAblate)
    assert_type(patch_from(cache), PatchFrom)
    assert_type(project_out(v), ProjectOut)
    assert_type(steer(v, 4.0), Steer)
    assert_type(at([3, 4], add(1.0)), At)
    assert_type(at((Ellipsis, slice(0, 2)), double), At)
    assert_type(add(1.0).at([0]), At)
    assert_type(heads(ablate(), n_heads=4, which=[1]), Heads)
    assert_type(heads(double, n_heads=4), Heads)


def test_composition_types() -> None:
    assert_type(add(1.0) >> ablate(17), Chain)
    assert_type(add(1.0) >> double, Chain)
    assert_type(double >> add(1.0), Chain)
    assert_type(chain(add(1.0), shift, scale(2.0)), Chain)
    assert_type(identity(), Chain)
    assert_type(as_edit(double), Edit)
    assert isinstance(as_edit(double), Function)


def test_edits_are_called_with_a_site() -> None:
    site = Site("fc", call=0, kind="output", module=torch.nn.Identity())
    edit: Edit = add(1.0) >> ablate(0)
    assert_type(edit(torch.ones(2, 3), site), Tensor)
