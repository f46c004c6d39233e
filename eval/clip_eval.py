"""Plain CLIP (open_clip) evaluation against vision-encoder FLOPs (issue #5).

Zero-shot classification from an ImageFolder benchmark (``load_benchmark("imagefolder", root)``) and
image-text retrieval from a Karpathy JSON (``load_benchmark("retrieval", path)``), with token merging
inside the open_clip ``VisionTransformer`` (stage V, e.g. ``"pitome"``)::

    import open_clip
    from vtprune.eval.clip_eval import zero_shot, retrieval, sweep_clip
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-16", pretrained=...)
    tok = open_clip.get_tokenizer("ViT-B-16")
    zero_shot(model, tok, bench, "pitome", ratio=0.9, preprocess=preprocess)
    sweep_clip(model, tok, bench, ["pitome:ratio=0.95", "pitome:ratio=0.9"])

``method="none"`` runs the unpatched tower. Any other method patches ``model.visual`` only while images are encoded (texts run unpatched) and is removed
afterwards. FLOPs are 2 x MACs of the ViT blocks that ran (the per-block token counts recorded by the
patch, ``stats.vision_tokens_per_layer``) plus the patch embedding; the cost of the merging itself,
layer norms, pooling and the projection are not counted (see :func:`vision_flops`).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import torch

import vtprune

__all__ = ["vision_flops", "vit_dims", "zero_shot", "retrieval", "sweep_clip", "default_preprocess"]


def vit_dims(visual) -> dict[str, int]:
    """Width ``C``, MLP width ``m``, patch size ``p``, depth, patch count and input channels of an
    open_clip ``VisionTransformer``, read from the model."""
    blocks = visual.transformer.resblocks
    mlp = blocks[0].mlp
    fc = getattr(mlp, "c_fc", None)
    if fc is None:  # any MLP: the first Linear's output width
        fc = next(m for m in mlp.modules() if isinstance(m, torch.nn.Linear))
    conv = visual.conv1
    kh, kw = conv.kernel_size
    gh, gw = visual.grid_size
    return dict(width=int(visual.transformer.width), mlp=int(fc.out_features), patch=int(kh), patch_w=int(kw),
                in_chans=int(conv.in_channels), layers=len(blocks), n_patches=int(gh * gw))


def vision_flops(visual, tokens_per_layer: Sequence[int]) -> float:
    """FLOPs (2 x MACs) of one image through the open_clip ViT: the blocks that ran plus the patch
    embedding.

    Per block with ``N`` tokens, width ``C``, MLP width ``m``: ``4 N C^2`` (q/k/v/out projections)
    ``+ 2 N^2 C`` (scores and weighted sum) ``+ 2 N C m`` (MLP) MACs; the patch embedding is
    ``n_patches * (3 p p) * C`` MACs. ``tokens_per_layer[l]`` is the token count entering block ``l``
    (CLS included); fewer entries than blocks means the remaining blocks did not run.
    """
    d = vit_dims(visual)
    c, m = d["width"], d["mlp"]
    if len(tokens_per_layer) > d["layers"]:
        raise ValueError(f"{len(tokens_per_layer)} token counts for a ViT with {d['layers']} blocks")
    macs = d["n_patches"] * d["in_chans"] * d["patch"] * d["patch_w"] * c
    for n in tokens_per_layer:
        n = int(n)
        macs += 4 * n * c * c + 2 * n * n * c + 2 * n * c * m
    return 2.0 * macs


def _full_schedule(visual) -> list[int]:
    d = vit_dims(visual)
    return [d["n_patches"] + 1] * d["layers"]


def default_preprocess(visual) -> Callable:
    """open_clip's eval transform for ``visual`` (its image size, mean and std)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2

    cfg = getattr(visual, "preprocess_cfg", None)
    if cfg:
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    return open_clip.image_transform(visual.image_size, is_train=False,
                                     mean=getattr(visual, "image_mean", None), std=getattr(visual, "image_std", None))


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _method_spec(method: Any, params: dict) -> str:
    name = method if isinstance(method, str) else type(method).__name__
    if not params:
        return name
    extra = ",".join(f"{k}={v}" for k, v in params.items())
    return f"{name}{',' if ':' in name else ':'}{extra}"


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    dev, feats = _device(model), []
    for i in range(0, len(texts), batch_size):
        f = model.encode_text(tokenizer(list(texts[i:i + batch_size])).to(dev))
        feats.append(torch.nn.functional.normalize(f.float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def _encode_images(model, samples, method, params, batch_size: int, preprocess, seed: int = 0):
    """Normalized image features of ``samples`` under ``method`` plus per-image FLOPs and output tokens
    (CLS included)."""
    visual = model.visual
    preprocess = preprocess or default_preprocess(visual)
    dev = _device(model)
    dtype = next(visual.parameters()).dtype
    full = _full_schedule(visual)
    feats, flops, tokens_out = [], [], []
    h = None if _is_none(method) else vtprune.patch(visual, method, seed=seed, **params)
    with (h if h is not None else contextlib.nullcontext()):
        for i in range(0, len(samples), batch_size):
            chunk = samples[i:i + batch_size]
            x = torch.stack([preprocess(s.load_image()) for s in chunk]).to(dev, dtype)
            if h is not None:
                h.stats.vision_tokens_per_layer = []
                h.stats.visual_tokens_per_image = []
            f = model.encode_image(x)
            feats.append(torch.nn.functional.normalize(f.float(), dim=-1))
            per_layer = list(h.stats.vision_tokens_per_layer) if h is not None else []
            per_layer = per_layer or [list(full)] * len(chunk)  # no stage-V policy ran: every token
            out = list(h.stats.visual_tokens_per_image) if h is not None else []
            out = [t + 1 for t in out] if out else [full[-1]] * len(chunk)  # +1: the CLS token
            if len(per_layer) != len(chunk) or len(out) != len(chunk):
                raise RuntimeError("the patch recorded token counts for a different number of images")
            flops += [vision_flops(visual, t) for t in per_layer]
            tokens_out += out
    return torch.cat(feats), flops, tokens_out


def _is_none(method: Any) -> bool:
    """``none``/``null`` keeps every token; its policy has no ``clip_vit`` support, so nothing is patched."""
    return isinstance(method, str) and method.strip().lower() in ("none", "null")


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def zero_shot(model, tokenizer, bench, method: Any = "none", template: str = "a photo of a {}.",
              batch_size: int = 16, *, preprocess: Callable | None = None, seed: int = 0, **params) -> dict:
    """Zero-shot classification of an ImageFolder benchmark.

    Class texts ``template.format(class)`` are encoded unpatched; images with ``model.visual`` patched
    by ``vtprune.patch(model.visual, method, **params)``. Scores are cosine similarities, scored by the
    benchmark (``bench.score_scores``). Returns ``top1``, ``top5`` (when there are >= 5 classes),
    ``primary``, ``n``, ``gflops`` (mean vision GFLOPs per image), ``tokens_out`` (mean tokens leaving
    the last block, CLS included), ``method`` (the spec).
    """
    text = _encode_texts(model, tokenizer, bench.class_prompts(template), batch_size)
    img, flops, toks = _encode_images(model, bench.samples, method, params, batch_size, preprocess, seed)
    sim = img @ text.T
    scores = {s.id: sim[i].tolist() for i, s in enumerate(bench.samples)}
    out = dict(bench.score_scores(scores))
    out.update(gflops=_mean(flops) / 1e9, tokens_out=_mean(toks), method=_method_spec(method, params))
    return out


def retrieval(model, tokenizer, bench, method: Any = "none", batch_size: int = 16, *,
              preprocess: Callable | None = None, seed: int = 0, **params) -> dict:
    """Image-text retrieval on a Karpathy benchmark: recall@1/5/10 both ways (``i2t_r{k}``,
    ``t2i_r{k}``, ``rsum``, ``mean_recall`` from ``bench.score_similarity``) plus ``gflops``,
    ``tokens_out`` and ``method`` as in :func:`zero_shot`."""
    text = _encode_texts(model, tokenizer, bench.texts, batch_size)
    img, flops, toks = _encode_images(model, bench.samples, method, params, batch_size, preprocess, seed)
    out = dict(bench.score_similarity((img @ text.T).numpy(force=True)))
    out.update(gflops=_mean(flops) / 1e9, tokens_out=_mean(toks), method=_method_spec(method, params))
    return out


def sweep_clip(model, tokenizer, bench, methods: Sequence[Any], **kw) -> list[dict]:
    """Run ``none`` plus every method (spec strings such as ``"pitome:ratio=0.9"``) on ``bench``
    (:func:`retrieval` if it has ``texts``, else :func:`zero_shot`; ``kw`` goes to that function).

    Each row adds ``relative`` (primary metric / none's; ``None`` when none scores 0) and
    ``flops_ratio`` (gflops / none's).
    """
    fn = retrieval if hasattr(bench, "texts") else zero_shot
    names = ["none"] + [m for m in methods if not (isinstance(m, str) and m.strip().lower() == "none")]
    rows = [fn(model, tokenizer, bench, m, **kw) for m in names]
    base = rows[0]
    for r in rows:
        r["relative"] = r["primary"] / base["primary"] if base["primary"] else None
        r["flops_ratio"] = r["gflops"] / base["gflops"] if base["gflops"] else None
    return rows
