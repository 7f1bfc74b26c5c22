"""Activation-patching experiments: exact sweeps, attribution patching, path patching.

``activation_patching(model, clean, corrupted, sites, over=..., metric=...)`` patches each
part of each site from one run into the other and scores the result, many cells per forward
and with exact reuse of what a patch cannot change; `attribution_patching` estimates the same
grid from two forwards and one backward; `path_patching` patches a sender's effect along its
path to chosen receivers only. Each returns a `PatchingResult`: labelled values, the clean
and corrupted baselines, a text table and a heatmap.

Modules, in the order data flows through them: `_sites` (what is patched), `_grid` (what it
is cut into), `_prompts` (the prompt pairs), `_metrics`, `_baseline` (the two runs every
experiment starts from), `_batches` (cells per forward), `_layers` (the batch that grows where
cells join), `_exact`, `_attribution`, `_paths`, `_result`.
"""

from __future__ import annotations

from ._attribution import attribution_patching
from ._exact import activation_patching
from ._grid import Axis, each_head, each_index, each_position
from ._metrics import Metric, MetricLike, kl_to_clean, logit_diff, probability
from ._paths import path_patching
from ._result import Agreement, Disagreement, PatchingResult, agreement
from ._sites import Sites, SitesLike, attn_out, head_out, mlp_out, resid_post, resid_pre

__all__ = [
    "Agreement",
    "Axis",
    "Disagreement",
    "Metric",
    "MetricLike",
    "PatchingResult",
    "Sites",
    "SitesLike",
    "activation_patching",
    "agreement",
    "attribution_patching",
    "attn_out",
    "each_head",
    "each_index",
    "each_position",
    "head_out",
    "kl_to_clean",
    "logit_diff",
    "mlp_out",
    "path_patching",
    "probability",
    "resid_post",
    "resid_pre",
]
