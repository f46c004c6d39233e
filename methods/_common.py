"""Small helpers shared by the methods (not a policy; registers nothing).

They read only tensors, :class:`~vtprune.policy.ImageTokens` data and the adapter's config / layer
counts, so that every method computes scores in the same precision, breaks top-k ties the same way
and maps the per-image token layout and its layer defaults the same way.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from vtprune.policy import DecoderView, ImageTokens, resolve_budget, split_proportional  # noqa: F401  (re-exported)

LLAVA_FAMILIES = ("llava", "llava_next")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
#: families whose vision tower is a plain ViT reached through ``adapter.vit_layers()`` (CLIP, SigLIP,
#: DINOv2; ``vision_feature_layer`` names the feature layer)
PLAIN_VIT_FAMILIES = LLAVA_FAMILIES + ("llava_onevision",)
#: families whose vision tower is a packed native-resolution ViT reached through ``adapter.vit_blocks()``
#: (no CLS token offered; 2x2 merged tokens)
PACKED_VIT_FAMILIES = QWEN_FAMILIES + ("llava_onevision1_5",)
#: families whose LLM takes 1-D positions (renumbered by default, as LLaVA), not M-RoPE
ONE_D_POSITION_FAMILIES = PLAIN_VIT_FAMILIES + ("llava_onevision1_5",)


def score_dtype(t: Tensor, dtype: torch.dtype | None = None) -> torch.dtype:
    """The dtype scores are computed in: fp32 by default, a wider input dtype (fp64) is kept;
    ``dtype`` overrides."""
    if dtype is not None:
        return dtype
    return torch.promote_types(t.dtype, torch.float32)


def stable_topk(scores: Tensor, k: int, candidates: Tensor | None = None) -> Tensor:
    """The ``k`` largest scores, ordered by (score descending, index ascending).

    Without ``candidates``: ``scores`` (..., N) -> (..., min(k, N)) long indices along the last dim.
    With ``candidates`` (M,) ascending long positions into ``scores`` (N,): only those compete ->
    (min(k, M),) long positions. Ties always go to the lowest index; sort the result for a kept set
    in ascending order.
    """
    if candidates is None:
        return torch.argsort(scores, dim=-1, descending=True, stable=True)[..., : max(int(k), 0)]
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    order = torch.argsort(scores[candidates], descending=True, stable=True)
    return candidates[order[:k]]


def first_argmax(scores: Tensor) -> int:
    """Index of the largest entry of a 1-D tensor, the lowest index on ties (``-inf`` entries never win
    over a finite one); ``ValueError`` on an empty tensor or NaN."""
    if scores.numel() == 0:
        raise ValueError("empty scores")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return int((scores == scores.max()).nonzero()[0, 0])


class ViewGrid(NamedTuple):
    """The candidate tokens of one view on that view's own raster grid.

    view: view number (0 = base / only view; LLaVA-NeXT 1.. = crops; Qwen = temporal slice).
    index: (m,) token indices into the image (ascending, candidates only).
    local: (m,) raster index of each token on the view's grid of ``rows * cols`` positions.
    rows, cols: the grid shape (a LLaVA-NeXT crop: the base view's grid, e.g. 24 x 24).
    """

    view: int
    index: Tensor
    local: Tensor
    rows: int
    cols: int

    @property
    def size(self) -> int:
        return self.rows * self.cols

    def valid(self) -> Tensor:
        """(rows*cols,) bool: grid positions present among the candidates (native NeXT: unpadded)."""
        v = torch.zeros(self.size, dtype=torch.bool)
        v[self.local] = True
        return v

    def scatter(self, values: Tensor, fill: float = 0.0) -> Tensor:
        """(m,) per-token values -> (rows*cols,) on the grid (``fill`` at absent positions)."""
        out = torch.full((self.size,), fill, dtype=values.dtype, device=values.device)
        out[self.local.to(values.device)] = values
        return out

    def tokens_of(self, local: Tensor) -> Tensor:
        """Grid positions -> token indices into the image (positions must be present)."""
        lut = torch.full((self.size,), -1, dtype=torch.long)
        lut[self.local] = self.index
        out = lut[local.long().cpu()]
        if (out < 0).any():
            raise RuntimeError("selected a grid position that has no candidate token")
        return out


def view_grids(image: ImageTokens, family: str, *, method: str) -> list[ViewGrid]:
    """Split an image's candidate tokens into views with view-local raster indices.

    LLaVA-1.5 / Qwen: ``grid`` is already view-local (Qwen: per temporal slice) and ``grid_shapes[v]``
    is its shape. LLaVA-NeXT crops: ``grid`` is on the unpadded global crop grid; a crop's own
    (row, col) is the global one modulo the base view's grid (every crop is a full ViT view).
    Raises ``ValueError`` if a candidate has no grid position (e.g. a CLS feature kept by
    ``vision_feature_select_strategy="full"``).
    """
    cand = image.candidate_index()
    grid = image.grid.cpu()[cand]
    if bool((grid < 0).any()):
        raise ValueError(
            f"{method} needs every visual token on a patch grid; this model feeds tokens without a grid "
            "position (e.g. the CLS token with vision_feature_select_strategy='full'); use 'default'"
        )
    views = image.view.cpu()[cand]
    out = []
    for v in sorted(set(views.tolist())):
        sel = views == v
        idx = cand[sel]
        g = grid[sel]
        rows, cols = image.grid_shapes[0] if family == "llava_next" else image.grid_shapes[v]
        local = (g[:, 0] % rows) * cols + (g[:, 1] % cols)
        out.append(ViewGrid(int(v), idx, local, int(rows), int(cols)))
    return out


def per_view_budget(keep: int | float, n_view: int) -> int:
    """Tokens kept in a view of ``n_view`` candidates when the budget is per view (VisPruner, CDPruner):
    an int ``keep`` is a count capped at ``n_view``, a float a fraction of ``n_view`` (Python rounding,
    at least 1)."""
    if isinstance(keep, int) and not isinstance(keep, bool):
        return min(int(keep), n_view)
    return resolve_budget(keep, n_view)


class PerViewBudget:
    """Mixin for a :class:`~vtprune.policy.TokenPolicy` whose ``keep`` is **per view** (the reference's
    ``visual_token_num``; LLaVA-1.5 and Qwen images have one view, LLaVA-NeXT base + crops): the image's
    budget is the sum of :func:`per_view_budget` over its views. The policy sets ``self._family`` in
    ``validate``."""

    def view_budgets(self, image: ImageTokens) -> list[tuple[ViewGrid, int]]:
        """Each view of ``image`` with the tokens it keeps."""
        grids = view_grids(image, self._family, method=self.name)
        return [(g, per_view_budget(self.keep, g.index.numel())) for g in grids]

    def budget(self, image: ImageTokens) -> int:
        return sum(n for _, n in self.view_budgets(image))

    def budget_clamped(self, image: ImageTokens, family: str) -> bool:
        """True when an int ``keep`` exceeds some view's candidate tokens (that view keeps them all)."""
        keep = self.keep
        return (isinstance(keep, int) and not isinstance(keep, bool)
                and any(keep > g.index.numel() for g, _ in self.view_budgets(image)))


def scaled_default_layer(default_1based: int, ref_depth: int, depth: int) -> int:
    """A paper's 1-based layer default mapped to a tower of ``depth`` layers (0-based result).

    On the reference depth the default is used as is; on another depth it keeps its relative depth:
    ``max(1, round(default * depth / ref_depth))`` (1-based, Python rounding), e.g. 9 of 24 -> 1 of 3,
    16 of 32 -> 2 of 4.
    """
    if depth == ref_depth:
        return default_1based - 1
    return max(1, min(depth, round(default_1based * depth / ref_depth))) - 1


def llava_feature_layer(adapter: Any, method: str, knob: str) -> int:
    """0-based index of the vision layer whose **output** LLaVA feeds to the projector.

    ``vision_feature_layer`` indexes ``hidden_states`` (entry 0 = embeddings, entry i = output of layer
    i - 1): -2 -> layer n - 2 (22 of 24), a positive i -> layer i - 1. Lists (multi-layer features) and
    0 have no single layer: ``ValueError`` asking for ``knob``.
    """
    fl = adapter.config.vision_feature_layer
    n = len(adapter.vit_layers())
    if isinstance(fl, bool) or not isinstance(fl, int) or fl == 0 or not -n <= fl <= n:
        raise ValueError(
            f"{method}: cannot derive a vision layer from vision_feature_layer={fl!r}; pass {knob}= explicitly"
        )
    return fl - 1 if fl > 0 else n + fl


def resolve_layer(layer: int, depth: int, *, method: str, knob: str, one_based: bool = False) -> int:
    """Validate a user layer index (0-based, negative allowed; or 1-based) -> 0-based index."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise ValueError(f"{method}: {knob} must be an int, got {layer!r}")
    if one_based:
        if not 1 <= layer <= depth:
            raise ValueError(f"{method}: {knob}={layer} (1-based) must be in 1..{depth} for this {depth}-layer tower")
        return layer - 1
    if not -depth <= layer < depth:
        raise ValueError(
            f"{method}: {knob}={layer} (0-based, negative from the end) must be in {-depth}..{depth - 1} "
            f"for this {depth}-layer tower"
        )
    return layer % depth


def check_choice(method: str, knob: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{method}: {knob}={value!r}; choose one of {', '.join(map(repr, choices))}")


def parse_tuple(value: Any, *, method: str, knob: str, cast: Callable = int) -> tuple:
    """A tuple knob from a tuple/list, a single number, or a spec string ``"8/16/24"`` (also ``;``, ``|``)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[/;|\s]+", value.strip()) if p]
        try:
            return tuple(cast(p) for p in parts)
        except ValueError:
            raise ValueError(f"{method}: {knob}={value!r}; use numbers separated by '/' (e.g. 2/6/15)") from None
    if isinstance(value, (int, float)):
        return (cast(value),)
    return tuple(cast(v) for v in value)


def view_images(view: DecoderView) -> tuple[Tensor, list[tuple[Tensor, int]]]:
    """A stage-D view's visual positions ``vis`` (ascending) and, per image, ``(members, n0)``: the
    positions into ``vis`` of its tokens and its token count at the LLM input (needs the
    ``image_tokens_in`` signal of layer 0)."""
    vis = torch.nonzero(view.visual).flatten()
    ids = view.image_id[vis]
    n0 = view.signals["image_tokens_in@0"][vis]
    out = []
    for k in torch.unique(ids).tolist():
        members = torch.nonzero(ids == k).flatten()
        out.append((members, int(n0[members[0]])))
    return vis, out


def check_decoder_positions(method: str, positions: str, family: str) -> None:
    """A stage-D ``positions`` knob: one of auto/original/renumber; ``"renumber"`` only with 1-D positions."""
    check_choice(method, "positions", positions, ("auto", "original", "renumber"))
    if positions == "renumber" and family not in ONE_D_POSITION_FAMILIES:
        raise ValueError(
            f"{method}: positions='renumber' is defined for LLaVA-style 1-D positions "
            f"({', '.join(ONE_D_POSITION_FAMILIES)}); {family!r} uses 3-D M-RoPE positions: "
            "use positions='original' or 'auto'"
        )
