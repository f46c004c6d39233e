"""Sweep cells of plain CLIP models (open_clip): image-text retrieval and zero-shot classification
against the vision encoder's FLOPs, through :mod:`vtprune.eval.clip_eval`.

A config model ``{name, open_clip: ARCH, path: WEIGHTS_FILE}`` (e.g. ``ViT-L-14-336-quickgelu`` with
the ``open_clip_pytorch_model.bin`` of ``timm/vit_large_patch14_clip_336.openai``) runs on the
``retrieval`` (Karpathy) and ``imagefolder`` benchmarks. A cell scores the whole gallery at once, so
it is the unit of resume (no per-sample predictions file); methods patch ``model.visual`` (stage V,
e.g. ``pitome`` with ``budget_param: ratio``).
"""
from __future__ import annotations

import logging
import time
from typing import Any

from ..store import ResultsStore
from .config import Cell, ModelEntry, SweepConfig

#: Benchmark loaders an open_clip model runs.
CLIP_LOADERS = ("retrieval", "karpathy", "imagefolder")

_PRECISION = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def clip_skeleton(entry: ModelEntry):
    """``model.visual`` of ``entry``'s architecture without weights (meta device), for validation."""
    import torch
    import open_clip

    logging.disable(logging.WARNING)  # "no pretrained weights loaded" is the point here
    try:
        with torch.device("meta"):
            model = open_clip.create_model(entry.open_clip, pretrained=None, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    return model.visual


def load_clip(entry: ModelEntry, path: str, device) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, preprocess)`` of ``entry`` with the weights file ``path``, on ``device``, eval mode."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        entry.open_clip, pretrained=str(path), precision=_PRECISION[entry.dtype], device=device)
    return model.eval(), open_clip.get_tokenizer(entry.open_clip), preprocess


def run_clip_cell(cell: Cell, loaded: tuple, bench, store: ResultsStore, cfg: SweepConfig, env: dict, device) -> None:
    """Score ``cell`` (retrieval or zero-shot) and store its record."""
    import torch

    from ..clip_eval import retrieval, zero_shot
    from .measure import relative_fields
    from .validate import patch_args

    model, tokenizer, preprocess = loaded
    spec, params = patch_args(cell)
    fn = retrieval if hasattr(bench, "texts") else zero_shot
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    out = fn(model, tokenizer, bench, spec, batch_size=cfg.batch_size, preprocess=preprocess, seed=cfg.seed, **params)
    ms = (time.perf_counter() - t0) * 1e3
    ident = cell.identity
    rec: dict[str, Any] = {k: ident[k] for k in ("model", "benchmark", "benchmark_loader", "method", "method_name",
                                                 "params", "budget_param", "budget")}
    score = {k: v for k, v in out.items() if k not in ("gflops", "tokens_out", "method")}
    rec.update(spec=cell.method.spec, n=len(bench.samples), status="ok", accuracy=score["primary"], score=score,
               vision_tflops=out["gflops"] / 1e3, projector_tflops=0.0, llm_prefill_tflops=None,
               total_prefill_tflops=out["gflops"] / 1e3, visual_tokens=out["tokens_out"] - 1,
               total_ms=ms / max(len(bench.samples), 1), prefill_ms=None)
    rec.update(relative_fields(rec, cell, store))
    if device.type == "cuda":
        rec["peak_mem_mib"], rec["peak_mem_kind"] = torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    else:
        rec["peak_mem_mib"], rec["peak_mem_kind"] = None, None
    rec["env"] = env
    store.put(cell.key, rec)
