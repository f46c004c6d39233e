"""Policy base classes: a method only says *which* tokens; the base classes own the invariants.

Three stages (ARCHITECTURE.md §2):

* :class:`VisionPolicy` (stage V) runs after chosen layers of a plain ViT and may shrink the sequence.
* :class:`TokenPolicy` (stage P) selects ``n_keep`` tokens of each image after the projector;
  :class:`MergePolicy` (stage P) returns ``n_keep`` new tokens with a representative index each.
* :class:`DecoderPolicy` (stage D) picks, at decoder layer ``K``, which visual positions survive.

The base classes enforce: text tokens are never dropped, the budget is per image, the kept count is
exact, indices are unique and sorted (unless a policy declares ``sorted_output = False``), newline
tokens of LLaVA-NeXT are always kept outside the budget. Methods never touch a model class.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

STAGES = ("V", "P", "D")
POSITION_MODES = ("auto", "original", "renumber")


@dataclass
class ImageTokens:
    """The visual tokens of one image as the LLM would receive them (native layout).

    Shapes: ``n`` tokens of width ``D``.

    Attributes:
        features: (n, D) projected features in LLM order.
        candidate: (n,) bool, True for tokens a policy may drop; False for tokens always kept and not
            counted in the budget (LLaVA-NeXT ``image_newline`` tokens).
        view: (n,) long, view index (0 = base view / only view, 1.. = AnyRes crops), -1 for newlines.
        grid: (n, 2) long, (row, col) of the token on its view's token grid (crops: the unpadded global
            crop grid), -1 for newlines or merged tokens without a grid position.
        grid_shapes: per view, (rows, cols) of its token grid.
        signals: per-token evidence requested by the policies, each a tensor whose first dim is n
            (e.g. ``"vit_received@8"`` (n,)), plus per-view entries under other names.
        image_index: index of the image in the request (all samples flattened).
        sample_index: index of the sample the image belongs to.
        extra: adapter bookkeeping (e.g. ``source``: (n,) encoder-token index of each token).
    """

    features: Tensor
    candidate: Tensor
    view: Tensor
    grid: Tensor
    grid_shapes: list[tuple[int, int]]
    signals: dict[str, Any] = field(default_factory=dict)
    image_index: int = 0
    sample_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.candidate.sum())

    def candidate_index(self) -> Tensor:
        """(m,) long: the indices of the candidate tokens, ascending."""
        return torch.nonzero(self.candidate, as_tuple=False).flatten()


@dataclass
class Context:
    """What a policy may know about the request besides its own image.

    ``rng(key)`` gives a generator seeded from the patch seed and ``key`` (e.g. the image's index
    within its sample), so that stochastic policies give the same draw for a sample whether it runs
    alone or in a batch.
    """

    family: str
    extra: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def rng(self, key: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * int(key)) % (2**63 - 1))


def resolve_budget(keep: int | float, n: int, *, what: str = "visual tokens") -> int:
    """Turn ``keep`` (an int count, or a float fraction in (0, 1]) into a token count for ``n`` tokens.

    Fractions use Python's ``round`` (half to even), at least 1 token. Raises ``ValueError`` naming the
    valid range when the budget is impossible.
    """
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise ValueError(f"keep must be an int (tokens per image) or a float in (0, 1]; got {keep!r}")
    if isinstance(keep, float):
        if not (0.0 < keep <= 1.0) or math.isnan(keep):
            raise ValueError(
                f"keep={keep} is a fraction outside (0, 1]; use a float in (0, 1] or an int count "
                f"of {what} to keep per image (1..{n})"
            )
        return max(1, min(n, round(keep * n)))
    if keep <= 0:
        raise ValueError(f"keep={keep} must be positive: use an int in 1..{n} or a float in (0, 1]")
    if keep > n:
        raise ValueError(
            f"keep={keep} is larger than the {n} {what} of this image; use an int in 1..{n} "
            "or a float fraction in (0, 1]"
        )
    return int(keep)


def check_keep_value(keep: int | float) -> None:
    """Validate the type/range of ``keep`` independently of any image (raises ``ValueError``)."""
    resolve_budget(keep, 10**9)


def check_keep_for_model(keep: int | float | None, adapter: Any) -> None:
    """An int ``keep`` must not exceed the model's fixed visual tokens per image (when it has one)."""
    n = adapter.nominal_visual_tokens()
    if n is not None and isinstance(keep, int) and not isinstance(keep, bool) and keep > n:
        raise ValueError(
            f"keep={keep} is larger than the {n} visual tokens per image of this model; "
            f"use an int in 1..{n} or a float fraction in (0, 1]"
        )


@dataclass
class Policy:
    """Base of all policies. Subclasses are dataclasses with typed fields (the method's knobs)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stage: ClassVar[str] = "P"
    families: ClassVar[tuple[str, ...]] = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe",
                                           "qwen3_5", "qwen3_5_moe")

    def validate(self, family: str, adapter: Any) -> None:
        """Check the policy's parameters for a model family; raise ``ValueError`` naming the fix."""
        if family not in self.families:
            raise ValueError(
                f"method {self.name!r} does not support model family {family!r}; "
                f"supported families: {', '.join(self.families)}"
            )

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        """Signals this policy needs, ``{name: spec}``; the adapter computes only those."""
        return {}

    def parts(self) -> list["Policy"]:
        """The policies this one stands for (a multi-stage method expands into one per stage)."""
        return [self]

    def params(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def spec(self) -> str:
        """The spec string of this policy; ``registry.parse_spec`` reads it back (lists as ``a|b|c``)."""
        def fmt(v):
            return "|".join(str(x) for x in v) if isinstance(v, (tuple, list)) else str(v)

        inner = ",".join(f"{k}={fmt(v)}" for k, v in self.params().items() if v is not None)
        return f"{self.name}:{inner}" if inner else self.name


@dataclass
class TokenPolicy(Policy):
    """Stage P selection: return the indices of the tokens to keep, per image.

    Attributes:
        keep: tokens kept per image (int) or fraction of the image's candidate tokens (float).
        positions: ``"auto"`` (the family's reference convention: LLaVA renumbers, Qwen keeps the
            original M-RoPE positions), ``"original"`` or ``"renumber"``.
        quota: how a video's budget is spread over its frames: ``"video"`` (the whole video at once,
            ranked jointly) or ``"frame"`` (each frame an image of its own with its share); see
            :mod:`vtprune.quota`. Images are not affected.
    """

    stage: ClassVar[str] = "P"
    #: False: the policy's returned order is the emission order (the kept tokens still occupy the
    #: sorted placeholder slots; positions follow the slots). May be set per instance.
    sorted_output: ClassVar[bool] = True
    keep: int | float = 64
    positions: str = "auto"
    quota: str = "video"

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_keep_value(self.keep)
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions={self.positions!r}; choose one of {POSITION_MODES}")
        if self.quota not in ("video", "frame"):
            raise ValueError(f"{self.name}: quota={self.quota!r}; choose 'video' (budget shared by the frames, "
                             "ranked jointly) or 'frame' (each frame keeps its share)")
        modes = getattr(adapter, "position_modes", POSITION_MODES)
        if self.positions != "auto" and self.positions not in modes:
            raise ValueError(
                f"{self.name}: positions={self.positions!r} is not defined for {family}; "
                f"use one of {('auto',) + tuple(modes)}"
            )
        check_keep_for_model(self.keep, adapter)

    def budget(self, image: ImageTokens) -> int:
        return resolve_budget(self.keep, image.num_candidates)

    def select(self, image: ImageTokens, n_keep: int, ctx: Context) -> Tensor:  # pragma: no cover
        """Return (n_keep,) long indices into ``image`` tokens; each must be a candidate."""
        raise NotImplementedError

    def apply(self, image: ImageTokens, ctx: Context) -> tuple[Tensor, Tensor | None]:
        """Run the policy and enforce the invariants.

        Returns ``(order, features)``: ``order`` (n_out,) long indices into the image tokens giving the
        output order (newlines included), and ``features`` None for a pure selection.
        """
        n_keep = self.budget(image)
        idx = torch.as_tensor(self.select(image, n_keep, ctx), dtype=torch.long).flatten().cpu()
        _check_selection(self.name, idx, image, n_keep)
        keep = image.candidate.clone().cpu().logical_not_()  # non-candidates always kept
        keep[idx] = True
        slots = torch.nonzero(keep).flatten()
        if self.sorted_output:
            return slots, None
        # declared order: the chosen candidates fill the candidate slots in the policy's order,
        # non-candidates (newlines) stay at their native slots
        order = slots.clone()
        order[image.candidate.cpu()[slots]] = idx
        return order, None


def _check_selection(name: str, idx: Tensor, image: ImageTokens, n_keep: int) -> None:
    if idx.numel() != n_keep:
        raise RuntimeError(f"policy {name!r} returned {idx.numel()} tokens, expected exactly {n_keep}")
    if idx.numel() and (idx.min() < 0 or idx.max() >= image.num_tokens):
        raise RuntimeError(f"policy {name!r} returned an index outside 0..{image.num_tokens - 1}")
    if torch.unique(idx).numel() != idx.numel():
        raise RuntimeError(f"policy {name!r} returned duplicate indices")
    if not bool(image.candidate.cpu()[idx].all()):
        raise RuntimeError(f"policy {name!r} selected a non-candidate (always-kept) token")


@dataclass
class MergePolicy(TokenPolicy):
    """Stage P merging: return ``n_keep`` new token features and one representative index each.

    The representative (a candidate token index) gives the output token its place in the sequence
    and, where positions are kept, its position.
    """

    def merge(self, image: ImageTokens, n_keep: int, ctx: Context) -> tuple[Tensor, Tensor]:  # pragma: no cover
        """Return ``(features (n_keep, D), representatives (n_keep,) long)``; representatives unique."""
        raise NotImplementedError

    def apply(self, image: ImageTokens, ctx: Context) -> tuple[Tensor, Tensor | None]:
        n_keep = self.budget(image)
        feats, reps = self.merge(image, n_keep, ctx)
        reps = torch.as_tensor(reps, dtype=torch.long).flatten().cpu()
        _check_selection(self.name, reps, image, n_keep)
        if feats.shape[0] != n_keep:
            raise RuntimeError(f"policy {self.name!r} returned {feats.shape[0]} merged tokens, expected {n_keep}")
        keep = image.candidate.clone().cpu().logical_not_()
        keep[reps] = True
        order = torch.nonzero(keep).flatten()
        out = image.features.new_empty((order.numel(), image.features.shape[-1]))
        # place merged features at their representatives' slots, non-candidates unchanged
        slot = torch.full((image.num_tokens,), -1, dtype=torch.long)
        slot[order] = torch.arange(order.numel())
        out[:] = image.features[order]
        out[slot[reps]] = feats.to(out.dtype)
        return order, out


@dataclass
class VisionPolicy(Policy):
    """Stage V: called after vision-encoder layer ``l`` with the hidden states of all views.

    ``after_layer`` returns None (no change) or ``(x_new (V, N', C), sources (V, N') long)`` where
    ``sources`` gives, for each output token, the index of its representative input token (used to
    keep track of grid positions). Class tokens, if present, must stay at index 0.
    """

    stage: ClassVar[str] = "V"
    families: ClassVar[tuple[str, ...]] = ("llava",)

    def layers(self, num_layers: int) -> list[int]:  # pragma: no cover
        raise NotImplementedError

    def after_layer(self, layer: int, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor] | None:  # pragma: no cover
        raise NotImplementedError


@dataclass
class DecoderView:
    """What a stage-D policy sees of one sample at the layer where it prunes.

    Attributes:
        hidden: (L, D) hidden states entering the layer (padding removed).
        visual: (L,) bool, True at visual-token positions (of the current, possibly shortened sequence).
        image_id: (L,) long, image index within the sample for visual tokens, -1 elsewhere.
        signals: requested evidence, e.g. ``"last_row"``: (L,) head-mean attention of the last prompt
            token over the current keys at the signal layer.
        original_index: (L,) long, position of each token in the sample's unpruned LLM input.
    """

    hidden: Tensor
    visual: Tensor
    image_id: Tensor
    signals: dict[str, Any]
    original_index: Tensor


@dataclass
class DecoderPolicy(Policy):
    """Stage D: drop visual tokens inside the LLM at prefill, from layer ``layer`` on (0-based).

    Attributes:
        layer: number of unpruned decoder layers; the sequence shrinks for layers >= ``layer``.
        keep: visual tokens kept (int count per sample, or a float fraction of the visual tokens).
    """

    stage: ClassVar[str] = "D"
    layer: int = 2
    keep: int | float = 0.5

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        check_keep_value(self.keep)
        n_layers = adapter.num_llm_layers()
        for layer in self.pruning_layers(n_layers):
            if not (0 < layer < n_layers):
                raise ValueError(
                    f"{self.name}: layer={layer} must be in 1..{n_layers - 1} for this {n_layers}-layer LLM"
                )
        check_keep_for_model(self.keep, adapter)

    def budget(self, n_visual: int, layer: int) -> int:
        """Visual tokens kept at ``layer`` out of the ``n_visual`` present."""
        return resolve_budget(self.keep, n_visual)

    def pruning_layers(self, num_layers: int) -> list[int]:
        """0-based decoder layers at whose input this policy prunes."""
        return [self.layer]

    def signal_layers(self, num_layers: int) -> dict[int, str]:
        """``{layer: signal kind}`` computed in a pre-hook of that layer (kinds: see decoder.py)."""
        return {}

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:  # pragma: no cover
        """Return the kept visual positions (long, indices into the current sequence)."""
        raise NotImplementedError
