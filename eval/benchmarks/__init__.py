"""Benchmark loaders (local files in their official formats; nothing is downloaded).

``load_benchmark(name, path, **kw)`` returns a :class:`Benchmark`; ``BENCHMARKS`` maps each name
(and alias) to its class. See each module's docstring for the accepted file layout;
``BENCHMARKS[name].layout(path, **options)`` declares the files and folders the loader reads and where the
official release comes from (:class:`Layout`), the source of a sweep's download instructions.

=============  ===========================  =====================================================
name           class                        path
=============  ===========================  =====================================================
pope           :class:`POPE`                split JSONL file(s) or their folder
mme            :class:`MME`                 MME_Benchmark_release_version folder or <task>.txt
gqa            :class:`GQA`                 testdev_balanced_questions.json (or its folder)
textvqa        :class:`TextVQA`             TextVQA_0.5.1_val.json (or its folder)
vqav2          :class:`VQAv2`               questions JSON (+ annotations=) or their folder
scienceqa_img  :class:`ScienceQA`           folder with problems.json + pid_splits.json
mmbench        :class:`MMBench`             MMBench TSV (circular=True for circular eval)
embedded       :class:`JSONLBenchmark`      JSONL of {id, image, question, answer, type, ...}
imagefolder    :class:`ImageFolderClassification`  root/<class>/<image>
retrieval      :class:`KarpathyRetrieval`   Karpathy dataset_*.json
=============  ===========================  =====================================================
"""
from __future__ import annotations

import os
from typing import Any

from .base import (Base64Image, Benchmark, BenchmarkFormatError, CHOICE_PROMPT, Layout, Need, SHORT_ANSWER_PROMPT,
                   Sample, open_image)
from .classification import ImageFolderClassification
from .embedded import JSONLBenchmark
from .gqa import GQA
from .mmbench import MMBench
from .mme import MME
from .pope import POPE
from .retrieval import KarpathyRetrieval
from .scienceqa import ScienceQA
from .textvqa import TextVQA
from .vqav2 import VQAv2

BENCHMARKS: dict[str, type[Benchmark]] = {
    "pope": POPE,
    "mme": MME,
    "gqa": GQA,
    "textvqa": TextVQA,
    "vqav2": VQAv2,
    "scienceqa_img": ScienceQA,
    "scienceqa": ScienceQA,
    "sqa": ScienceQA,
    "mmbench": MMBench,
    "embedded": JSONLBenchmark,
    "jsonl": JSONLBenchmark,
    "imagefolder": ImageFolderClassification,
    "retrieval": KarpathyRetrieval,
    "karpathy": KarpathyRetrieval,
}


def load_benchmark(name: str, path: str | os.PathLike, **kw: Any) -> Benchmark:
    """Load benchmark ``name`` (a key of :data:`BENCHMARKS`, case-insensitive) from local ``path``.

    Keyword arguments go to the loader (``image_root=``, ``splits=``, ``circular=``, ...). Raises
    :class:`BenchmarkFormatError` for missing/malformed files, ``KeyError`` for an unknown name.
    """
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    return BENCHMARKS[key].load(path, **kw)


__all__ = ["BENCHMARKS", "load_benchmark", "Benchmark", "BenchmarkFormatError", "Sample", "Base64Image",
           "open_image", "Layout", "Need", "SHORT_ANSWER_PROMPT", "CHOICE_PROMPT", "POPE", "MME", "GQA", "TextVQA", "VQAv2",
           "ScienceQA", "MMBench", "JSONLBenchmark", "ImageFolderClassification", "KarpathyRetrieval"]
