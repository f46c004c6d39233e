"""ScienceQA-IMG (the test problems that have an image).

Format (the official ``data/scienceqa`` release): ``problems.json`` = ``{pid: {"question": str,
"choices": [str, ...], "answer": int (index into choices), "hint": str, "image": "image.png" | null,
"subject": str, ...}}`` and ``pid_splits.json`` = ``{"train": [pid, ...], "val": [...], "test": [...]}``.
``path`` is the folder holding both (or ``problems.json`` itself, ``pid_splits.json`` alongside).
Images are ``<image_root>/<split>/<pid>/<image>``; ``image_root`` defaults to ``<dir>/images``.

Prompt (LLaVA's): ``Context: <hint>\\n<question>\\nA. ..\\nB. ..\\n`` + "Answer with the option's
letter from the given choices directly." (the context line only when the hint is non-empty).
Metric: choice accuracy after :func:`vtprune.eval.metrics.parse_choice_letter`
(unparsable = wrong); ``accuracy`` = ``primary``, plus ``by_subject``.
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path

from ..metrics import parse_choice_letter
from .base import (Benchmark, CHOICE_PROMPT, Layout, Need, Sample, as_folder, choice_letters, format_choices,
                   format_error, json_path, read_json, require_path)

#: The official file names of the data/scienceqa release and the image folder (images/<split>/<pid>/<file>).
PROBLEMS_FILE = "problems.json"
SPLITS_FILE = "pid_splits.json"
IMAGE_DIR = "images"
SOURCE = ("ScienceQA (github.com/lupantech/ScienceQA, data/scienceqa): problems.json and pid_splits.json, and the "
          "test images (test.zip from the project's data release) unpacked as images/test/<pid>/image.png")
EXPECTED_P = ('problems.json: {pid: {"question": str, "choices": [str, ...], "answer": int, '
              '"hint": str, "image": str|null, ...}}')
EXPECTED_S = 'pid_splits.json: {"train": [pid, ...], "val": [...], "test": [...]}'


class ScienceQA(Benchmark):
    name = "scienceqa_img"

    @classmethod
    def load(cls, path: str | os.PathLike, split: str = "test", image_only: bool = True,
             image_root: str | os.PathLike | None = None, **kw) -> "ScienceQA":
        p = require_path(path, "the ScienceQA folder holding problems.json and pid_splits.json")
        folder = p if p.is_dir() else p.parent
        pfile = p if p.is_file() else folder / PROBLEMS_FILE
        problems = read_json(pfile, EXPECTED_P)
        splits = read_json(folder / SPLITS_FILE, EXPECTED_S)
        if not isinstance(problems, dict):
            raise format_error(pfile, json_path(), "not an object", EXPECTED_P)
        if not isinstance(splits, dict) or not isinstance(splits.get(split), list):
            raise format_error(folder / SPLITS_FILE, json_path(split), "missing or not a list",
                               EXPECTED_S)
        root = Path(image_root) if image_root is not None else folder / IMAGE_DIR
        samples = []
        for pid in splits[split]:
            pid = str(pid)
            prob = problems.get(pid)
            if not isinstance(prob, dict):
                raise format_error(pfile, json_path(pid), "problem listed in pid_splits.json is missing",
                                   EXPECTED_P)
            choices = prob.get("choices")
            if not isinstance(choices, list) or not choices or len(choices) > 26:
                raise format_error(pfile, json_path(pid, "choices"), "missing or not a list of 1-26 options",
                                   EXPECTED_P)
            ans = prob.get("answer")
            if not isinstance(ans, int) or not 0 <= ans < len(choices):
                raise format_error(pfile, json_path(pid, "answer"), f"{ans!r} is not a valid choice index",
                                   EXPECTED_P)
            if not isinstance(prob.get("question"), str):
                raise format_error(pfile, json_path(pid, "question"), "missing or not a string", EXPECTED_P)
            image = prob.get("image")
            if image_only and not image:
                continue
            meta = {k: prob.get(k) for k in ("hint", "subject", "topic", "category", "skill", "grade")}
            meta["split"] = split
            samples.append(Sample(id=pid, image=str(root / split / pid / image) if image else None,
                                  question=prob["question"], answers=choice_letters(len(choices))[ans],
                                  choices=[str(c) for c in choices], meta=meta))
        return cls(samples, source=pfile, **kw)

    @classmethod
    def layout(cls, path, split: str = "test", image_root=None, **kw) -> Layout:
        folder, file = as_folder(path, (".json",))
        needs = (Need(file or folder / PROBLEMS_FILE, "file", "ScienceQA problems (JSON)"),
                 Need(folder / SPLITS_FILE, "file", "ScienceQA split lists (JSON)"),
                 Need(Path(image_root) / split if image_root is not None else folder / IMAGE_DIR / split, "dir",
                      f"ScienceQA {split} images (<pid>/image.png)"))
        return Layout(Path(path), needs, SOURCE)

    def prompt(self, sample: Sample) -> str:
        hint = (sample.meta.get("hint") or "").strip()
        ctx = f"Context: {hint}\n" if hint else ""
        return f"{ctx}{sample.question}\n{format_choices(sample.choices)}\n{CHOICE_PROMPT}"

    def _score(self, pairs):
        hits, by_subject = [], defaultdict(list)
        for s, pred in pairs:
            i = parse_choice_letter(pred, choices=s.choices)
            ok = float(i is not None and choice_letters(len(s.choices))[i] == s.answers)
            hits.append(ok)
            if s.meta.get("subject"):
                by_subject[s.meta["subject"]].append(ok)
        out: dict = {"accuracy": sum(hits) / len(hits),
                     "by_subject": {k: sum(v) / len(v) for k, v in sorted(by_subject.items())}}
        out["primary"] = out["accuracy"]
        return out
