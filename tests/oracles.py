"""Slow, obviously-correct reference computations the patched models are compared against.

* :func:`shortened_forward` / :func:`shortened_generate`: the *unpatched* model fed an explicitly
  shortened input (placeholders of dropped tokens removed, the kept features passed as precomputed
  image features, positions either renumbered by the model or the original ones gathered).
* :func:`masked_run`: the *unpatched* model with extra pre-hooks that hide the dropped keys from
  layer K on through the attention mask (same positions, full-length sequence and cache).
* :func:`physically_shortened_run`: the *unpatched* model's own modules run layer by layer, one sample
  at a time (no padding, no vtprune code), the sequence physically shortened from layer K on: the
  oracle of stage D on hybrid models, whose Gated DeltaNet layers cannot hide a token by a mask.
"""
from __future__ import annotations

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function
from transformers.modeling_outputs import BaseModelOutputWithPooling


def _image_output(model, family: str, inputs):
    inner = model.model
    if family == "llava":
        return inner.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
    if family == "llava_next":
        return inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"], return_dict=True)
    if family == "llava_onevision":
        return inner.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                        batch_num_images=inputs.get("batch_num_images"), return_dict=True)
    return inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)


def _video_output(model, family: str, inputs):
    if family == "llava_onevision":
        return model.model.get_video_features(inputs["pixel_values_videos"], return_dict=True)
    return model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"], return_dict=True)


def image_features(model, family: str, inputs) -> list[torch.Tensor]:
    if inputs.get("pixel_values") is None:
        return []
    return list(_image_output(model, family, inputs).pooler_output)


def video_features(model, family: str, inputs) -> list[torch.Tensor]:
    """Per video, the features the model scatters into its video placeholders."""
    if inputs.get("pixel_values_videos") is None:
        return []
    return list(_video_output(model, family, inputs).pooler_output)


def visual_items(model, family: str, inputs) -> list[tuple[str, torch.Tensor, list[torch.Tensor] | None]]:
    """(modality, features, Qwen3-VL DeepStack rows per level or None) of every image, then every video,
    in request order."""
    items = []
    for modality, key, run in (("image", "pixel_values", _image_output), ("video", "pixel_values_videos", _video_output)):
        if inputs.get(key) is None:
            continue
        out = run(model, family, inputs)
        levels = getattr(out, "deepstack_features", None)  # Qwen3-VL only
        items += [(modality, f, None if levels is None else [lvl[i] for lvl in levels])
                  for i, f in enumerate(out.pooler_output)]
    return items


def full_positions(model, family: str, inputs) -> torch.Tensor:
    ids = inputs["input_ids"]
    if family.startswith("qwen"):
        extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
        pos, _ = model.model.get_rope_index(
            ids, inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"), attention_mask=inputs["attention_mask"], **extra,
        )
        return pos  # (3, B, L)
    mask = inputs["attention_mask"]
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def shortened_inputs(model, family: str, inputs, kept: list[torch.Tensor], *, positions: str):
    """Build the explicitly shortened batch: same prompts, only the kept image (and video) tokens.

    ``kept[i]``: indices (into item i's native tokens) of the tokens kept, in order; items are the
    images, then the videos, of the request (:func:`visual_items`); each modality fills its own
    placeholders in order, and Qwen3-VL's DeepStack levels keep the same rows as the features.
    Returns kwargs for ``model(...)`` / ``model.generate(...)``, left padded.
    """
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    tok = {"image": model.config.image_token_id, "video": getattr(model.config, "video_token_id", -1)}
    items = visual_items(model, family, inputs)
    pos = full_positions(model, family, inputs)
    rows = []
    queues = {m: [k for k, it in enumerate(items) if it[0] == m] for m in tok}
    taken = {m: 0 for m in tok}
    visual = torch.isin(ids, torch.tensor(list(tok.values()), dtype=ids.dtype))
    for b in range(ids.shape[0]):
        valid = torch.nonzero(mask[b]).flatten()
        keep_cols = []
        for m, t in tok.items():
            m_cols = valid[ids[b, valid] == t]
            start = 0
            while start < m_cols.numel():
                k = queues[m][taken[m]]
                n = items[k][1].shape[0]
                keep_cols.append(m_cols[start : start + n][kept[k]])
                start += n
                taken[m] += 1
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
    enc = {}
    for m in tok:
        sel = queues[m]
        if not sel:
            continue
        feats = [items[k][1][kept[k]] for k in sel]
        if items[sel[0]][2] is not None:  # the same rows of every DeepStack level
            from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

            levels = [[items[k][2][lvl][kept[k]] for k in sel] for lvl in range(len(items[sel[0]][2]))]
            enc[m] = BaseModelOutputWithDeepstackFeatures(pooler_output=feats, deepstack_features=levels)
        elif m == "video" and family == "llava_onevision":  # it scatters ``pooler_output.flatten(0, 1)``
            enc[m] = BaseModelOutputWithPooling(pooler_output=torch.cat(feats)[None])
        else:
            enc[m] = BaseModelOutputWithPooling(pooler_output=feats)
    out = {"input_ids": new_ids, "attention_mask": new_mask, "mm_encoder_outputs": enc}
    if positions == "original":
        out["position_ids"] = new_pos
    else:
        out["position_ids"] = (new_mask.long().cumsum(-1) - 1).masked_fill(new_mask == 0, 0)
    if family.startswith("qwen"):
        tt = torch.zeros_like(new_ids)
        tt[new_ids == tok["image"]] = 1
        tt[new_ids == tok["video"]] = 2
        out["mm_token_type_ids"] = tt
    return out


def set_features(short: dict, features: list[torch.Tensor]) -> None:
    """Put the features a patch produced (images, then videos) into a shortened batch, in place."""
    enc = short["mm_encoder_outputs"]
    k = 0
    for m in ("image", "video"):
        if m in enc:
            n = len(enc[m].pooler_output)
            enc[m].pooler_output = features[k : k + n]
            k += n


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


def _lm_inputs(model, inputs) -> dict:
    """The kwargs the unpatched model hands its language model at prefill (embeddings, positions)."""
    cap = {}
    lm = model.model.language_model
    hook = lm.register_forward_pre_hook(lambda m, a, k: cap.update(k), with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    return cap


def physically_shortened_run(model, inputs, layer: int | dict, keep: torch.Tensor | None, max_new_tokens: int,
                             *, replace: dict | None = None, observe=None):
    """Greedy generation with the sequence physically shortened from decoder layer ``layer`` on.

    ``keep`` (B, L) bool over the LLM input (the model's own input here) says which tokens enter
    layers >= ``layer``; several stages: ``layer = {layer: keep}`` (nested keeps) and ``keep=None``.
    Each sample runs alone without padding through the model's own decoder layers,
    rotary module, norm, head and cache; positions are the model's own M-RoPE positions of the full
    sequence (gathered at the kept tokens), new tokens continue after the largest one. Qwen3-VL's
    DeepStack features are added after the first layers at the visual tokens still present (a token
    whose state was replaced gets the row of its column).

    ``replace = {layer: fn}`` replaces hidden states at a stage (recycled tokens at their slots):
    ``fn(b, h (n, D), cols (n,))`` gets sample ``b``'s input of that layer *before* its cut and the
    LLM-input columns of its rows, and returns ``{column: (D,) state}`` for columns alive after the cut.
    ``observe(layer, b, h (n, D), cols (n,), (cos, sin))`` is called with the input each layer runs on
    (after its cut and replacements), so a staged oracle can read the run's own attention.
    Returns ``(last prompt logits (B, V) fp32, generated ids (B, max_new_tokens))``.
    """
    from transformers import DynamicCache

    lm = model.model.language_model
    cfg = lm.config
    stages = layer if isinstance(layer, dict) else {layer: keep}
    cap = _lm_inputs(model, inputs)
    embeds, pos = cap["inputs_embeds"], cap["position_ids"]
    if pos.shape[0] == 4:  # (text, t, h, w) rows: the rotary module takes the last three
        pos = pos[1:]
    mask = inputs["attention_mask"].bool()
    vis_all, levels = cap.get("visual_pos_masks"), cap.get("deepstack_visual_embeds") or []
    types = getattr(cfg, "layer_types", None) or ["full_attention"] * len(lm.layers)
    fn = ALL_MASK_ATTENTION_FUNCTIONS[cfg._attn_implementation]
    logits_out, gen_out = [], []
    with torch.no_grad():
        for b in range(embeds.shape[0]):
            valid = mask[b]
            h = embeds[b : b + 1, valid]
            if levels:  # this sample's DeepStack rows, in sequence order
                start = int(vis_all[:b].sum())
                vis = vis_all[b, valid]
                ds = [lvl[start : start + int(vis.sum())] for lvl in levels]
            p = pos[:, b : b + 1, valid]
            cos, sin = lm.rotary_emb(h, p)
            cache = DynamicCache(config=cfg)
            alive = valid.clone()  # LLM-input columns still present
            for i, dec in enumerate(lm.layers):
                fill = replace[i](b, h[0], torch.nonzero(alive).flatten()) if replace and i in replace else {}
                if i in stages:
                    sel = stages[i][b, alive]
                    assert bool(sel.any()), "every stage keeps some tokens"
                    alive[alive.clone()] = sel
                    h, cos, sin = h[:, sel], cos[:, sel], sin[:, sel]
                    if levels:
                        ds = [x[sel[vis]] for x in ds]
                        vis = vis[sel]
                if fill:
                    cols = torch.nonzero(alive).flatten().tolist()
                    h = h.clone()
                    for col, value in fill.items():
                        h[0, cols.index(int(col))] = value.to(h.dtype)
                if observe is not None:
                    observe(i, b, h[0], torch.nonzero(alive).flatten(), (cos, sin))
                n = h.shape[1]
                am = None
                if types[i] != "linear_attention":
                    am = fn(batch_size=1, q_length=n, kv_length=n, q_offset=0, kv_offset=0,
                            mask_function=causal_mask_function, attention_mask=torch.ones((1, n), dtype=torch.bool),
                            allow_is_causal_skip=False, dtype=h.dtype, config=cfg, device=h.device)
                h = dec(h, position_embeddings=(cos, sin), attention_mask=am, position_ids=None, cache=cache,
                        use_cache=True)
                if i < len(levels):
                    h = h.clone()
                    h[0, vis] = h[0, vis] + ds[i].to(h.dtype)
            logits = model.lm_head(lm.norm(h[:, -1:]))[:, -1].float()
            logits_out.append(logits[0])
            nxt = int(p.max()) + 1
            toks = [int(logits.argmax(-1))]
            for step in range(max_new_tokens - 1):
                h = lm.embed_tokens(torch.tensor([[toks[-1]]]))
                cos, sin = lm.rotary_emb(h, torch.full((3, 1, 1), nxt + step))
                for dec in lm.layers:
                    h = dec(h, position_embeddings=(cos, sin), attention_mask=None, position_ids=None, cache=cache,
                            use_cache=True)
                toks.append(int(model.lm_head(lm.norm(h))[0, -1].argmax()))
            gen_out.append(torch.tensor(toks))
    return torch.stack(logits_out), torch.stack(gen_out)


def stage_d_reference(model, family: str, inputs, layer: int, keep: torch.Tensor, max_new_tokens: int):
    """The slow reference of pruning inside the LLM from ``layer`` on, keeping ``keep`` (B, L) of the LLM
    input: the mask run (dropped keys hidden from ``layer`` on) for attention-only LLMs, the physically
    shortened run for hybrid ones (a Gated DeltaNet layer cannot hide a token by a mask). Returns
    ``(last prompt logits (B, V) fp32, generated ids (B, max_new_tokens))``."""
    from vtprune.testing import HYBRID_FAMILIES

    if family in HYBRID_FAMILIES:
        return physically_shortened_run(model, inputs, layer, keep, max_new_tokens)
    n = inputs["input_ids"].shape[1]
    with masked_run(model, layer, keep), torch.no_grad():
        logits = last_logits(model(**inputs).logits)
        gen = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)[:, n:]
    return logits, gen
