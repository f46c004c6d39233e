"""Policy base classes: a method only says *which* tokens; the base classes own the invariants.

Three stages (``docs/architecture.md`` §2-3):

* :class:`VisionPolicy` (stage V) runs after chosen layers of a plain ViT and may shrink the sequence.
* :class:`TokenPolicy` (stage P) selects ``n_keep`` tokens of each image after the projector;
  :class:`MergePolicy` (stage P) returns ``n_keep`` new tokens with a representative index each.
* :class:`DecoderPolicy` (stage D) picks, at decoder layer ``K``, which visual positions survive.

The base classes enforce: text tokens are never dropped, the budget is per image, the kept count is
exact, indices are unique and sorted (unless a policy declares ``sorted_output = False``), newline
tokens of LLaVA-NeXT are always kept outside the budget. Methods never touch a model class.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, TypeVar

import torch
from torch import Tensor

STAGES = ("V", "P", "D")
POSITION_MODES = ("auto", "original", "renumber")
#: how a stage-P budget applies to a video: ranked over all frames, or each frame keeps its share
QUOTAS = ("video", "frame")
#: the VLM families of ``vtprune.adapters`` (``Adapter.family``); a policy supports all unless it narrows
FAMILIES = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_onevision1_5",
            "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
T = TypeVar("T")


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
        index_in_sample: index of the image within its sample (the key of per-image random draws, so
            that a sample gives the same draw alone or in a batch). Set by the patch.
        source: (n,) long, encoder-token index of each token (-1 for newlines), or None.
        placeholder_index: (n,) long, which of the image's placeholder slots each token fills, when the
            encoder already shortened the sequence (stage V); None: token ``i`` fills slot ``i``.
        n_placeholders: placeholder tokens of this image in ``input_ids``; None: ``n``.
        n_views: encoder views of this image (LLaVA-NeXT: base + crops).
        projector_tokens: tokens that went through the projector / merger; None: ``n``.
        vision_windows: Qwen2.5-VL: per vision block, the attention segment lengths of this image.
        modality: ``"image"``, ``"video"`` (views = frames; the item fills the model's video
            placeholders) or ``"frame"`` (one frame of a video handed alone, ``quota="frame"``).
        extra: adapter-private bookkeeping; policies never read it.
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
    index_in_sample: int = 0
    source: Tensor | None = None
    placeholder_index: Tensor | None = None
    n_placeholders: int | None = None
    n_views: int = 1
    projector_tokens: int | None = None
    vision_windows: list[list[int]] | None = None
    modality: str = "image"

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.candidate.sum())

    def candidate_index(self) -> Tensor:
        """(m,) long: the indices of the candidate tokens, ascending."""
        return torch.nonzero(self.candidate, as_tuple=False).flatten()

    def subset(self, order: Tensor, features: Tensor | None = None) -> "ImageTokens":
        """The tokens ``order`` (n_out,) long of this image, in that order (``features`` replaces theirs).

        Per-token tensors (features, layout, ``source``, ``placeholder_index`` and every signal whose
        first dim is ``n``) are gathered; per-view data is kept as is.
        """
        n = self.num_tokens

        def take(v):
            return v[order.to(v.device)] if torch.is_tensor(v) and v.dim() >= 1 and v.shape[0] == n else v

        return dataclasses.replace(
            self,
            features=features if features is not None else self.features[order.to(self.features.device)],
            candidate=self.candidate[order],
            view=self.view[order],
            grid=self.grid[order],
            signals={k: take(v) for k, v in self.signals.items()},
            extra={k: take(v) for k, v in self.extra.items()},
            source=None if self.source is None else self.source[order.to(self.source.device)],
            placeholder_index=None if self.placeholder_index is None else self.placeholder_index[order],
        )


@dataclass
class ViTInfo:
    """The vision tower of a request as a stage-V policy may plan with it (set by the adapter).

    Attributes:
        layers: depth of the tower (encoder layers / residual blocks).
        last_layer: 0-based index of the last layer that runs (LLaVA: the feature layer).
        tokens: tokens entering the first layer, CLS included.
        drop_cls: True when the tokens handed on exclude the CLS token.
    """

    layers: int
    last_layer: int
    tokens: int
    drop_cls: bool = True


@dataclass
class Context:
    """What a policy may know about the request besides its own image (one per request).

    Attributes:
        family: model family (one of :data:`FAMILIES`, or ``"clip_vit"``).
        seed: the patch seed; :meth:`rng` derives per-image generators from it.
        view_keys: stage V, models with a fixed token count per view: for each encoder view of the
            request, the index of its image within its sample (the key for :meth:`rng`), so that a
            sample gives the same draw alone or in a batch. None when unknown.
        vit: the vision tower (depth, last layer, tokens in, CLS dropped), set by the adapter before
            the first stage-V call; None outside stage V.
        attn_log_size: (V, N) ``log(size)`` of the current encoder tokens, published by a merging
            stage-V policy that wants proportional attention; the adapter adds it to the attention
            logits over the keys of the following encoder layers. None: no bias.

    ``rng(key)`` gives a generator seeded from the patch seed and ``key`` (e.g. the image's index
    within its sample). ``policy_state(policy, factory)`` holds a policy's per-request state.
    """

    family: str
    seed: int = 0
    view_keys: list[int] | None = None
    vit: ViTInfo | None = None
    attn_log_size: Tensor | None = None
    _states: list[tuple[Any, Any]] = field(default_factory=list, repr=False)

    def rng(self, key: int = 0) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * int(key)) % (2**63 - 1))

    def policy_state(self, policy: Any, factory: Callable[[], T]) -> T:
        """The per-request state of ``policy``: ``factory()`` on the first call in this request, the
        same object on every later call. It lives in this Context (one per request) and is dropped with
        it, so policies keep no state across requests and a batch never sees another request's."""
        for owner, state in self._states:
            if owner is policy:
                return state
        state = factory()
        self._states.append((policy, state))
        return state


def resolve_budget(keep: int | float, n: int, *, what: str = "visual tokens", clamp: bool = False) -> int:
    """Turn ``keep`` (an int count, or a float fraction in (0, 1]) into a token count for ``n`` tokens.

    Fractions use Python's ``round`` (half to even), at least 1 token. An int above ``n`` gives ``n``
    with ``clamp=True`` (an image of a dynamic-resolution model smaller than the budget keeps all its
    tokens), else a ``ValueError``. Raises ``ValueError`` naming the valid range when the budget is
    impossible.
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
        if clamp:
            return n
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
    """Base of all policies. Subclasses are dataclasses with typed fields (the method's knobs).

    Class data: ``name`` (registry key), ``description`` (one line for ``vtprune methods``),
    ``stage`` (``"V"``, ``"P"`` or ``"D"``), ``families`` (supported model families), ``renamed``.
    A method that can run at several stages takes the stage as its ``at`` field (``"random:at=D"``,
    ``"pitome:at=P"``).

    Optional hooks (declared here with their defaults; override what the method needs):
    :meth:`validate`, :meth:`required_signals`, :meth:`parts`, :attr:`sorted_output`.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    stage: ClassVar[str] = "P"
    families: ClassVar[tuple[str, ...]] = FAMILIES
    #: old parameter spellings -> their current names (the registry refuses the old ones, naming the new)
    renamed: ClassVar[dict[str, str]] = {}

    def validate(self, family: str, adapter: Any) -> None:
        """Check the policy's parameters for a model family; raise ``ValueError`` naming the fix.

        Called once by :func:`vtprune.patch` before anything is installed (the model stays unpatched
        on error). Subclasses call ``super().validate(family, adapter)`` first.
        """
        if family not in self.families:
            raise ValueError(
                f"method {self.name!r} does not support model family {family!r}; "
                f"supported families: {', '.join(self.families)}"
            )

    def required_signals(self, adapter: Any) -> dict[str, Any]:
        """Vision signals this policy needs, ``{name: spec}`` (e.g. ``{"vit_received@8": None}``); the
        adapter computes only those (kinds: ``vtprune/signals.py``). Called after :meth:`validate`."""
        return {}

    def parts(self) -> list["Policy"]:
        """The policies this one stands for (a multi-stage method expands into one per stage)."""
        return [self]

    @property
    def sorted_output(self) -> bool:
        """True (default): the hook layer emits the kept tokens of an image in ascending native order.

        False: the order the policy returns (stage P ``select``/stage V ``after_layer``) is the emission
        order; the kept tokens still occupy the sorted placeholder slots, so positions follow the slots
        and only the features' order changes (PiToMe ``order="reference"``, GlobalCom² score order).
        """
        return True

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
        keep: tokens kept per image (int) or fraction of the image's candidate tokens (float). A
            subclass may default it to None and give per-family defaults in ``default_keep``.
        positions: ``"auto"`` (the family's reference convention: LLaVA renumbers, Qwen keeps the
            original M-RoPE positions), ``"original"`` or ``"renumber"``.
        quota: videos only; ``keep`` is the budget of the whole video either way. ``"video"`` (None,
            the default): the policy gets the whole video (its views are the frames) and ranks the
            tokens of all frames jointly; a method defined on a view's grid keeps its own per-view
            rule. ``"frame"``: every frame is handed to the policy as an image of its own that keeps
            its share: a float ``keep`` is applied to each frame (the policy's own budget rule per
            frame), an int ``keep`` is split over the frames in proportion to their candidate tokens
            (largest remainder, at least one each). Images are one unit each, whatever the quota.

    An int ``keep`` larger than the model's fixed tokens per image (LLaVA-1.5) is a ``ValueError`` at
    ``patch()``. On dynamic-resolution models (LLaVA-NeXT, Qwen, DINOv2 towers) an image may have fewer
    candidates than an int ``keep``: that image keeps all its tokens (the budget is clamped), and the
    patch records it in ``PatchStats.budget_clamped``.
    """

    stage: ClassVar[str] = "P"
    #: per-family default budgets, used when ``keep`` is None (e.g. HiPrune's paper budgets)
    default_keep: ClassVar[dict[str, int | float]] = {}
    keep: int | float = 64
    positions: str = "auto"
    quota: str | None = None

    def keep_for(self, family: str) -> int | float:
        """``keep``, or the family's entry of ``default_keep`` when ``keep`` is None."""
        if self.keep is not None:
            return self.keep
        if family not in self.default_keep:
            raise ValueError(f"{self.name}: keep=None has no default for family {family!r}; pass keep=")
        return self.default_keep[family]

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        self.validate_keep(family, adapter)
        self.validate_positions(family, adapter)
        if self.quota is not None and self.quota not in QUOTAS:
            raise ValueError(f"{self.name}: quota={self.quota!r}; choose one of {QUOTAS} (how a video's budget applies)")

    def validate_keep(self, family: str, adapter: Any) -> None:
        """The budget's type and range; an int must fit a fixed-resolution model's tokens per image.
        Override when ``keep`` means something else (VisionZip: tokens per view)."""
        keep = self.keep_for(family)
        check_keep_value(keep)
        check_keep_for_model(keep, adapter)

    def validate_positions(self, family: str, adapter: Any) -> None:
        """``positions`` is one of ``POSITION_MODES`` and defined for the adapter's family."""
        if self.positions not in POSITION_MODES:
            raise ValueError(f"positions={self.positions!r}; choose one of {POSITION_MODES}")
        if self.positions == "auto":  # the family's own convention: always defined
            return
        modes = adapter.position_modes
        if self.positions not in modes:
            raise ValueError(
                f"{self.name}: positions={self.positions!r} is not defined for {family}; "
                f"use one of {('auto',) + tuple(modes)}"
            )

    def budget(self, image: ImageTokens) -> int:
        """Candidate tokens kept of ``image`` (an int ``keep`` above its candidates keeps them all)."""
        return resolve_budget(self.keep, image.num_candidates, clamp=True)

    def budget_clamped(self, image: ImageTokens, family: str) -> bool:
        """True when an int budget exceeds ``image``'s candidate tokens, so the image keeps them all
        (dynamic-resolution models; recorded in ``PatchStats.budget_clamped``)."""
        keep = self.keep_for(family)
        return isinstance(keep, int) and not isinstance(keep, bool) and keep > image.num_candidates

    def _with_keep(self, keep: int) -> "TokenPolicy":
        """A shallow copy whose budget is ``keep`` (the state resolved by :meth:`validate` is shared)."""
        out = copy.copy(self)
        out.keep = keep
        return out

    def run(self, image: ImageTokens, ctx: Context) -> tuple[Tensor, Tensor | None]:
        """:meth:`apply` on each quota unit of ``image`` (one per video frame with ``quota="frame"``,
        else the whole image), combined into one ``(order, features)`` over the image's tokens."""
        if self.quota != "frame" or image.modality != "video":
            return self.apply(image, ctx)
        view = image.view.cpu()
        frames = sorted(set(view[view >= 0].tolist()))
        index = [torch.nonzero(view == f).flatten() for f in frames]
        policies = [self] * len(frames)
        if isinstance(self.keep, int) and not isinstance(self.keep, bool):  # the video's count, shared out
            counts = [int(image.candidate.cpu()[i].sum()) for i in index]
            if self.keep < len(frames):
                raise ValueError(f"{self.name}: keep={self.keep} cannot give each of the {len(frames)} frames a "
                                 "token; use quota='video' or a larger keep")
            policies = [self._with_keep(k) for k in split_proportional(min(self.keep, sum(counts)), counts)]
        orders, feats, merged = [], [], False
        for f, idx, pol in zip(frames, index, policies):
            unit = frame_unit(image, idx, f)
            o, ft = pol.apply(unit, ctx)
            orders.append(idx[o])
            feats.append(unit.features[o.to(unit.features.device)] if ft is None else ft)
            merged |= ft is not None
        rest = torch.nonzero(image.view.cpu() < 0).flatten()  # newline tokens of no frame: always kept
        if bool(image.candidate.cpu()[rest].any()):
            raise RuntimeError("a video token outside every frame is a candidate")
        order = torch.cat(orders + [rest])
        if not merged:
            return order, None
        return order, torch.cat(feats + [image.features[rest.to(image.features.device)]])

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


def split_proportional(total: int, counts: list[int]) -> list[int]:
    """Split ``total`` proportionally to ``counts`` (largest remainder, ties to the first), at least 1
    each (so ``total`` must be >= ``len(counts)``)."""
    n = sum(counts)
    raw = [total * c / n for c in counts]
    base = [max(1, int(x)) for x in raw]
    rest = total - sum(base)
    order = sorted(range(len(counts)), key=lambda i: (-(raw[i] - int(raw[i])), i))
    for i in order:
        if rest <= 0:
            break
        base[i] += 1
        rest -= 1
    while rest < 0:
        i = max(range(len(base)), key=lambda j: base[j])
        base[i] -= 1
        rest += 1
    return base


def frame_unit(image: ImageTokens, index: Tensor, frame: int) -> ImageTokens:
    """The tokens ``index`` (all of frame ``frame``) of a video as a single-view image (view 0).

    Per-token tensors are gathered; per-view tensors (first dim = frames, e.g. ``vit_hidden`` (F, N,
    C)) are cut to the frame; ``index_in_sample`` becomes a per-frame key for seeded draws.
    """
    frames = len(image.grid_shapes)
    unit = image.subset(index)

    def per_view(v):
        return v[frame : frame + 1] if torch.is_tensor(v) and v.dim() == 3 and v.shape[0] == frames else v

    return dataclasses.replace(
        unit,
        view=torch.zeros(index.numel(), dtype=torch.long),
        grid_shapes=[image.grid_shapes[frame]],
        signals={k: per_view(v) for k, v in unit.signals.items()},
        index_in_sample=(image.index_in_sample + 1) * 100_003 + frame,
        n_views=1,
        modality="frame",
    )


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
    """Stage V: called after chosen layers of a plain ViT with the hidden states of all views.

    ``after_layer`` returns None (no change) or ``(x_new (V, N', C), sources (V, N') long)`` where
    ``sources`` gives, for each output token, the index of its representative input token (used to
    keep track of grid positions and placeholder slots). Class tokens, if present, must stay at index
    0. ``ctx.vit`` describes the tower; ``ctx.view_keys`` keys per-view random draws;
    ``ctx.policy_state`` holds per-request state; ``ctx.attn_log_size`` asks the adapter for
    proportional attention in the following layers. Set :attr:`sorted_output` False to keep the
    returned order instead of the representatives' native order.
    """

    stage: ClassVar[str] = "V"
    families: ClassVar[tuple[str, ...]] = ("llava",)
    #: True for a policy that only changes the tower's input (:meth:`input_grid`, e.g. ``downsample``):
    #: the tower then runs unchanged on the smaller image, so any tower that interpolates its position
    #: table takes it; False: :meth:`after_layer` runs between the layers (CLIP and DINOv2 towers)
    input_only: ClassVar[bool] = False

    def validate(self, family: str, adapter: Any) -> None:
        super().validate(family, adapter)
        if not self.input_only:
            adapter.check_stage_v()  # the tower can run layer by layer (LLaVA: CLIP, DINOv2)

    def input_grid(self, rows: int, cols: int, ctx: Context) -> tuple[int, int] | None:
        """Before the tower: the patch grid ``(rows', cols')`` a view whose native grid is ``rows x cols``
        runs at (None: unchanged, the default). The adapter then calls :meth:`resize` and
        :meth:`input_slots`."""
        return None

    def resize(self, pixel_values: Tensor, size: tuple[int, int]) -> Tensor:
        """(V, 3, H, W) preprocessed pixels -> (V, 3, h, w) with ``(h, w) = size`` (for :meth:`input_grid`)."""
        raise NotImplementedError(f"{type(self).__name__} declares an input grid but no resize")

    def input_slots(self, rows: int, cols: int, out: tuple[int, int]) -> Tensor:
        """(r*c,) long: for each patch of the ``out = (r, c)`` grid (raster order), the raster index of the
        native ``rows x cols`` patch whose placeholder it takes (for :meth:`input_grid`)."""
        raise NotImplementedError(f"{type(self).__name__} declares an input grid but no placeholder slots")

    def layers(self, num_layers: int) -> list[int]:  # pragma: no cover
        """0-based encoder layers after which :meth:`after_layer` is called."""
        raise NotImplementedError

    def after_layer(self, layer: int, x: Tensor, ctx: Context) -> tuple[Tensor, Tensor] | None:  # pragma: no cover
        """``x`` (V, N, C) output of encoder layer ``layer``; see the class docstring for the result."""
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
class DecoderSelection:
    """A stage-D selection with recycled tokens (``DecoderPolicy.select`` may return one instead of a tensor).

    Attributes:
        keep: (k,) long kept visual positions of the view (exactly the policy's budget).
        recycled: (m, D) hidden states of new tokens built from dropped ones (e.g. merged clusters).
        slots: (m,) long dropped visual positions of the view; recycled token j takes the identity of
            ``slots[j]``: its LLM-input index, image and position (unless positions are renumbered).
        after: (m,) long or None. None: recycled token j sits at its slot (sequence order). Otherwise it
            is emitted right after the view position ``after[j]`` (several after the same position keep
            their order in the list); with renumbered positions its position follows from that order.
    """

    keep: Tensor
    recycled: Tensor | None = None
    slots: Tensor | None = None
    after: Tensor | None = None


@dataclass
class RowAttention:
    """Attention of chosen query rows at one decoder layer, for ``DecoderPolicy.reduce_rows``.

    Attributes:
        probs: (B, H, R, L) fp32 head-wise probabilities of the rows over the current keys (causal and
            padding masks; recomputed from the layer's own norm, q/k and rotary tables).
        rows: (B, R) long current positions of the rows (0 where ``row_ok`` is False).
        row_ok: (B, R) bool, False on filler rows of samples with fewer rows.
        key_mask: (B, L) bool, False on padding.
        visual: (B, L) bool, visual tokens of the current sequence.
        rope_scores: callable returning (B, R, L): ``q.k / sqrt(hd)`` that the layer's rotary tables alone
            give all-ones queries and keys at these rows and keys (computed on demand).
    """

    probs: Tensor
    rows: Tensor
    row_ok: Tensor
    key_mask: Tensor
    visual: Tensor
    rope_scores: Any = None


@dataclass
class DecoderPolicy(Policy):
    """Stage D: drop visual tokens inside the LLM at prefill, from layer ``layer`` on (0-based).

    Attributes:
        layer: number of unpruned decoder layers; the sequence shrinks for layers >= ``layer``.
        keep: visual tokens kept (int count per sample, or a float fraction of the visual tokens).

    A method implements :meth:`select`; the optional hooks below have working defaults:
    :meth:`pruning_layers`, :meth:`signal_layers`, :meth:`budget`, :meth:`budget_view`,
    :meth:`position_handling` and :meth:`reduce_io` (needed only with the ``attn_io``/``mlp_io``
    signals). Selection happens once at prefill; decode steps reuse the shortened per-layer cache.
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
        """Visual tokens kept at ``layer`` out of the ``n_visual`` present (an int ``keep`` above
        ``n_visual`` keeps them all: dynamic-resolution images smaller than the budget)."""
        return resolve_budget(self.keep, n_visual, clamp=True)

    def budget_clamped(self, n_visual: int) -> bool:
        """True when an int ``keep`` exceeds the ``n_visual`` tokens present (all are kept)."""
        keep = self.keep
        return isinstance(keep, int) and not isinstance(keep, bool) and keep > n_visual

    def budget_view(self, view: "DecoderView", layer: int) -> int:
        """Visual tokens kept of one sample at ``layer``, from its whole view. Default:
        ``budget(n_visual, layer)``; override for data-dependent or per-image budgets."""
        return self.budget(int(view.visual.sum()), layer)

    def pruning_layers(self, num_layers: int) -> list[int]:
        """0-based decoder layers at whose input this policy prunes."""
        return [self.layer]

    def signal_layers(self, num_layers: int) -> dict[int, str | tuple[str, ...]]:
        """``{layer: kind or kinds}`` of decoder signals computed at that layer (kinds: the decoder
        signal registry in ``vtprune/signals.py``); the view gets them as ``"kind@layer"``."""
        return {}

    def position_handling(self, num_layers: int, family: str) -> dict[int, str]:
        """``{pruning layer: "original" | "renumber"}``. Default (empty): the survivors keep their
        original positions at every layer this policy prunes. ``"renumber"`` numbers them contiguously
        from that layer on (1-D positions only; see ``vtprune/decoder.py``)."""
        return {}

    def reduce_io(self, layer: int, kind: str, x_in: Tensor, x_out: Tensor, key_mask: Tensor,
                  visual: Tensor) -> Tensor:
        """Reduce a module's prefill (input, output) to (B, L) values, for the ``attn_io``/``mlp_io``
        signals of ``layer`` (only this reduction is kept, never the hidden tensors).

        ``x_in``/``x_out``: (B, L, D) input/output of the layer's ``self_attn`` or ``mlp``;
        ``key_mask``: (B, L) bool real tokens; ``visual``: (B, L) bool visual tokens.
        """
        raise NotImplementedError(f"{self.name} requests the {kind!r} signal but does not define reduce_io")

    def select(self, layer: int, view: DecoderView, ctx: Context) -> Tensor:  # pragma: no cover
        """Return the kept visual positions (long, indices into the current sequence), or a
        :class:`DecoderSelection` with recycled tokens."""
        raise NotImplementedError

    # Optional hooks of the policy-defined decoder signal kinds (vtprune/decoder.py); a policy that
    # requests such a kind implements the matching hook.
    def reduce_hidden(self, layer: int, hidden: Tensor, key_mask: Tensor, visual: Tensor) -> Tensor:  # pragma: no cover
        """Kind ``"hidden_reduce"``: (B, L) per-token values from the layer input ``hidden`` (B, L, D)."""
        raise NotImplementedError(f"{self.name} requests 'hidden_reduce' but does not define reduce_hidden")

    def query_rows(self, layer: int, aligned: dict[str, Tensor], key_mask: Tensor, visual: Tensor) -> Tensor:  # pragma: no cover
        """Kind ``"policy_rows"``: (B, L) bool, the query rows whose attention the policy reads.

        ``aligned``: the aligned signals computed so far, gathered to the current sequence.
        """
        raise NotImplementedError(f"{self.name} requests 'policy_rows' but does not define query_rows")

    def reduce_rows(self, layer: int, attention: RowAttention) -> Tensor:  # pragma: no cover
        """Kind ``"policy_rows"``: (B, L) per-key values from the rows' attention."""
        raise NotImplementedError(f"{self.name} requests 'policy_rows' but does not define reduce_rows")
