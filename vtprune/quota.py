"""How a stage-P budget is spread over the frames of a video (``TokenPolicy.quota``).

A video reaches a stage-P policy as one item whose views are its frames (Qwen: temporal patches of
``temporal_patch_size`` frames, each its own ``grid_shapes`` entry). ``keep`` is per item: an int is
the tokens kept for the whole video, a float the fraction of its tokens.

* ``quota="video"`` (default): the policy gets the whole video and its whole budget, exactly like an
  image with several views: a method that ranks tokens (random, ToDRE, PiToMe-post, FastV in the LLM)
  ranks all frames jointly, so a busy frame may keep more than a static one; a method defined on a
  view's grid (pool, HiPrune, VisionZip) keeps its own per-view rule.
* ``quota="frame"``: every frame is handed to the policy as an image of its own with its share of the
  video's budget: a float ``keep`` is that fraction of every frame (the policy's own budget rule applied
  to the frame); an int ``keep`` (tokens for the whole video) is split over the frames in proportion to
  their candidate tokens by largest remainder, at least one token each.

Images (and single-frame videos) are not affected by ``quota``.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import Tensor

from .policy import Context, ImageTokens, TokenPolicy


def split_budget(total: int, counts: list[int]) -> list[int]:
    """Split ``total`` over parts of ``counts`` candidates: proportional, largest remainder (ties to the
    earlier part), at least 1 and at most ``counts[i]`` each. ``ValueError`` if impossible."""
    if not counts:
        return []
    if not len(counts) <= total <= sum(counts):
        raise ValueError(
            f"cannot keep {total} tokens of {sum(counts)} over {len(counts)} frames with at least one per frame; "
            "use quota='video' or a larger budget"
        )
    n = sum(counts)
    raw = [total * c / n for c in counts]
    out = [min(c, max(1, int(x))) for x, c in zip(raw, counts)]
    rest = total - sum(out)
    order = sorted(range(len(counts)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    while rest > 0:
        progressed = False
        for i in order:
            if rest > 0 and out[i] < counts[i]:
                out[i] += 1
                rest -= 1
                progressed = True
        if not progressed:  # pragma: no cover - excluded by the range check above
            break
    while rest < 0:
        i = max(range(len(out)), key=lambda j: (out[j], -j))
        out[i] -= 1
        rest += 1
    return out


def frame_indices(image: ImageTokens) -> list[Tensor]:
    """Token indices (ascending) of each frame of a video item; one entry for anything else."""
    if image.modality != "video":
        return [torch.arange(image.num_tokens)]
    view = image.view.cpu()
    return [torch.nonzero(view == f).flatten() for f in sorted(set(view.tolist()))]


def frame_item(image: ImageTokens, index: Tensor, frame: int) -> ImageTokens:
    """Frame ``frame`` (tokens ``index``) of a video item as an image of its own (one view)."""
    sub = image.subset(index)
    return dataclasses.replace(
        sub,
        view=torch.zeros(index.numel(), dtype=image.view.dtype),
        grid_shapes=[image.grid_shapes[frame]],
        # a distinct, batch-independent key per frame for per-image random draws
        index_in_sample=(image.index_in_sample + 1) * 100_003 + frame,
    )


def _with_keep(policy: TokenPolicy, keep: int) -> TokenPolicy:
    """A shallow copy of ``policy`` whose budget is ``keep`` tokens (its resolved state is shared)."""
    out = copy.copy(policy)
    out.keep = keep
    return out


def apply_with_quota(policy: TokenPolicy, image: ImageTokens, ctx: Context) -> tuple[Tensor, Tensor | None]:
    """``policy.apply(image, ctx)``, per frame with ``policy.quota == "frame"`` on a video item.

    Returns ``(order, features)`` as :meth:`TokenPolicy.apply`: indices into ``image`` tokens and the
    merged features (None for a pure selection).
    """
    frames = frame_indices(image)
    if policy.quota != "frame" or len(frames) < 2:
        return policy.apply(image, ctx)
    keep = policy.keep
    if isinstance(keep, int) and not isinstance(keep, bool):  # tokens for the whole video: split
        counts = [int(image.candidate[f].sum()) for f in frames]
        per_frame = [_with_keep(policy, share) for share in split_budget(min(keep, sum(counts)), counts)]
    else:  # a fraction of every frame
        per_frame = [policy] * len(frames)
    orders, feats = [], []
    for idx, pol in zip(frames, per_frame):
        sub = frame_item(image, idx, int(image.view[idx[0]]))
        o, f = pol.apply(sub, ctx)
        orders.append(idx[o])
        feats.append(f if f is not None else None)
    order = torch.cat(orders)
    if all(f is None for f in feats):
        return order, None
    merged = [f if f is not None else image.features[o.to(image.features.device)] for f, o in zip(feats, orders)]
    return order, torch.cat(merged)
