"""Slow, obviously-correct reference computations the patched models are compared against.

* :func:`shortened_forward` / :func:`shortened_generate`: the *unpatched* model fed an explicitly
  shortened input (placeholders of dropped tokens removed, the kept features passed as precomputed
  image features, positions either renumbered by the model or the original ones gathered).
* :func:`masked_run`: the *unpatched* model with extra pre-hooks that hide the dropped keys from
  layer K on through the attention mask (same positions, full-length sequence and cache).
"""
from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_outputs import BaseModelOutputWithPooling


def image_features(model, family: str, inputs) -> list[torch.Tensor]:
    inner = model.model
    if family == "llava":
        out = inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    elif family == "llava_next":
        out = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    elif family == "llava_onevision":
        if inputs.get("pixel_values") is None:
            return []
        out = inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                       batch_num_images=inputs.get("batch_num_images"), return_dict=True)
    else:
        out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
    return list(out.pooler_output)


def video_features(model, family: str, inputs) -> list[torch.Tensor]:
    """Per video, the features the model scatters into its video placeholders (LLaVA-OneVision)."""
    if inputs.get("pixel_values_videos") is None:
        return []
    if family == "llava_onevision":
        return list(model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True).pooler_output)
    out = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)
    return list(out.pooler_output)


def visual_items(model, family: str, inputs) -> list[tuple[str, int, torch.Tensor]]:
    """(modality, placeholder id, features) of every image, then every video, in request order."""
    cfg = model.config
    items = [("image", cfg.image_token_id, f) for f in image_features(model, family, inputs)]
    items += [("video", cfg.video_token_id, f) for f in video_features(model, family, inputs)]
    return items


def full_positions(model, family: str, inputs) -> torch.Tensor:
    ids = inputs["input_ids"]
    if family.startswith("qwen"):
        pos, _ = model.model.get_rope_index(
            ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"], attention_mask=inputs["attention_mask"]
        )
        return pos  # (3, B, L)
    mask = inputs["attention_mask"]
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def shortened_inputs(model, family: str, inputs, kept: list[torch.Tensor], *, positions: str):
    """Build the explicitly shortened batch: same prompts, only the kept image (and video) tokens.

    ``kept[i]``: indices (into item i's native tokens) of the tokens kept, in order; items are the
    images, then the videos, of the request (:func:`visual_items`).
    Returns kwargs for ``model(...)`` / ``model.generate(...)``, left padded.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    items = visual_items(model, family, inputs)
    pos = full_positions(model, family, inputs)
    rows, feats_out = [], {"image": [], "video": []}
    queues = {m: [k for k, it in enumerate(items) if it[0] == m] for m in ("image", "video")}
    visual = torch.zeros_like(ids, dtype=torch.bool)
    for b in range(ids.shape[0]):
        valid = torch.nonzero(mask[b]).flatten()
        keep_cols = []
        for modality in ("image", "video"):
            token_id = model.config.image_token_id if modality == "image" else getattr(model.config, "video_token_id", -1)
            visual[b] |= ids[b] == token_id
            img_cols = valid[ids[b, valid] == token_id]
            start = 0
            while start < img_cols.numel():
                k = queues[modality].pop(0)
                n = items[k][2].shape[0]
                keep_cols.append(img_cols[start : start + n][kept[k]])
                feats_out[modality].append(items[k][2][kept[k]])
                start += n
        text_cols = valid[~visual[b, valid]]
        cols = torch.sort(torch.cat([text_cols] + keep_cols)).values
        rows.append(cols)
    width = max(r.numel() for r in rows)
    pad = int(ids[mask == 0][0]) if (mask == 0).any() else 0
    new_ids = torch.full((ids.shape[0], width), pad, dtype=ids.dtype)
    new_mask = torch.zeros((ids.shape[0], width), dtype=mask.dtype)
    new_pos = torch.zeros((*pos.shape[:-2], ids.shape[0], width), dtype=pos.dtype)
    for b, cols in enumerate(rows):
        s = width - cols.numel()
        new_ids[b, s:] = ids[b, cols]
        new_mask[b, s:] = 1
        new_pos[..., b, s:] = pos[..., b, cols]
    mm = {}
    if feats_out["image"]:
        mm["image"] = BaseModelOutputWithPooling(pooler_output=feats_out["image"])
    if feats_out["video"]:
        vid = feats_out["video"]  # LLaVA-OneVision scatters ``pooler_output.flatten(0, 1)``, the others a list
        mm["video"] = BaseModelOutputWithPooling(pooler_output=torch.cat(vid)[None] if family == "llava_onevision" else vid)
    out = {"input_ids": new_ids, "attention_mask": new_mask, "mm_encoder_outputs": mm}
    if positions == "original":
        out["position_ids"] = new_pos
    else:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
    if family.startswith("qwen"):
        tt = torch.zeros_like(new_ids)
        tt[new_ids == model.config.image_token_id] = 1
        out["mm_token_type_ids"] = tt
    return out


def last_logits(out_logits: torch.Tensor) -> torch.Tensor:
    return out_logits[:, -1].float()


class masked_run:
    """Context manager: from layer K on, hide keys ``~keep`` (B, L) of the prefill via the mask.

    ``keep`` is over the LLM input of the prefill; generated tokens are always visible.
    """

    def __init__(self, model, layer: int, keep: torch.Tensor):
        self.model, self.layer, self.keep = model, layer, keep.bool()
        self.handles = []

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        q = hidden.shape[1]
        cache = kwargs.get("cache")
        past = cache.get_seq_length(module.self_attn.layer_idx) if cache is not None else 0
        kv = past + q
        b, L = self.keep.shape
        keymask = torch.ones((b, kv), dtype=torch.bool)
        keymask[:, :L] = self.keep
        cfg = self.model.model.language_model.config
        fn = ALL_MASK_ATTENTION_FUNCTIONS[cfg._attn_implementation]
        kwargs["attention_mask"] = fn(
            batch_size=b, q_length=q, kv_length=kv, q_offset=kv - q, kv_offset=0,
            mask_function=causal_mask_function, attention_mask=keymask, allow_is_causal_skip=False,
            dtype=hidden.dtype, config=cfg, device=hidden.device,
        )
        return args, kwargs

    def __enter__(self):
        for i, layer in enumerate(self.model.model.language_model.layers):
            if i >= self.layer:
                self.handles.append(layer.register_forward_pre_hook(self._hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
