"""MME (14 yes/no subtasks; two questions per image).

Accepted layouts under ``path`` (the official ``MME_Benchmark_release_version`` folder or the
eval-tool style):

1. ``<task>/questions_answers_YN/<stem>.txt`` with images in ``<task>/images/<stem>.<ext>``
   (artwork, celebrity, landmark, posters, scene);
2. ``<task>/<stem>.txt`` next to ``<task>/<stem>.<ext>`` (the other subtasks);
   each ``.txt`` holds one ``question<TAB>answer`` line per question (answer Yes/No);
3. flat ``<task>.txt`` files (or ``path`` itself a ``.txt``) of ``image<TAB>question<TAB>answer``
   lines (an optional 4th column, e.g. a prediction, is ignored); images in ``<image_root>/<task>/``,
   default the first existing of ``<dir>/<task>/images``, ``<dir>/<task>``, ``<dir>/images``.

Only the 14 official subtask names are read from a folder (``tasks=`` overrides). Sample ids are
``"<task>/<image>/<k>"`` (k = question index for that image).

Metrics (official eval_tool): per subtask ``acc``, ``acc_plus`` (an image counts when all its
questions are right) and ``score = 100*acc + 100*acc_plus``; ``perception`` = sum over the 10
perception subtasks present, ``cognition`` = sum over the 4 cognition subtasks present, ``total`` =
both; ``primary`` = ``total``. Scores are on the official point scale (max 2000 / 800).
"""
from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from ..metrics import mme_scores
from .base import (Benchmark, Layout, Need, Sample, SHORT_ANSWER_PROMPT, format_error, index_images, pick_dir,
                   require_path)

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
              "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
TASKS = PERCEPTION + COGNITION
SOURCE = ("MME (github.com/BradyFU/Awesome-Multimodal-Large-Language-Models, branch Evaluation): the "
          "MME_Benchmark_release_version folder the authors send on request, unpacked; point the path at it "
          "(one sub-folder per subtask)")
EXPECTED_QA = "one 'question<TAB>Yes|No' line per question"
EXPECTED_FLAT = "one 'image<TAB>question<TAB>Yes|No' line per question"


def _read_lines(f: Path, expected: str):
    try:
        text = f.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise format_error(f, None, f"not UTF-8 text ({exc})", expected) from exc
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line.rstrip("\r\n")


def _answer(f: Path, n: int, raw: str, expected: str) -> str:
    a = raw.strip()
    if a.lower() not in ("yes", "no"):
        raise format_error(f, f"line {n}", f"answer {raw!r} is not Yes/No", expected)
    return a


class MME(Benchmark):
    name = "mme"

    @classmethod
    def load(cls, path: str | os.PathLike, image_root: str | os.PathLike | None = None,
             tasks: Sequence[str] | None = None, **kw) -> "MME":
        p = require_path(path, "the MME folder (one folder per subtask) or a <task>.txt file")
        wanted = tuple(tasks) if tasks is not None else TASKS
        samples: list[Sample] = []
        if p.is_file():
            samples += cls._flat(p, p.stem, p.parent, image_root)
        else:
            flat = [p / f"{t}.txt" for t in wanted if (p / f"{t}.txt").is_file()]
            dirs = [p / t for t in wanted if (p / t).is_dir()]
            for f in flat:
                samples += cls._flat(f, f.stem, p, image_root)
            for d in dirs:
                if (p / f"{d.name}.txt").is_file():
                    continue  # the flat file describes this task; the folder only holds its images
                samples += cls._folder(d, image_root)
            if not flat and not dirs:
                raise format_error(p, None, "no MME subtask found",
                                   f"subfolders or <task>.txt files named among {list(wanted)}")
        return cls(samples, source=p, **kw)

    @classmethod
    def layout(cls, path, image_root=None, tasks: Sequence[str] | None = None, **kw) -> Layout:
        p = Path(path)
        if p.suffix.lower() == ".txt":
            return Layout(p, (Need(p, "file", "MME subtask file (image<TAB>question<TAB>answer lines)"),), SOURCE)
        needs = tuple(Need(p / t, "dir", f"MME subtask {t} (questions and images)", (p / f"{t}.txt",))
                      for t in (tasks or TASKS))
        return Layout(p, needs, SOURCE)

    @staticmethod
    def _flat(f: Path, task: str, base: Path, image_root) -> list[Sample]:
        root = (Path(image_root) / task if image_root is not None
                else pick_dir([base / task / "images", base / task, base / "images"]))
        out = []
        count: dict[str, int] = defaultdict(int)
        for n, line in _read_lines(f, EXPECTED_FLAT):
            cols = line.split("\t")
            if len(cols) < 3:
                raise format_error(f, f"line {n}", f"{len(cols)} tab-separated field(s)", EXPECTED_FLAT)
            img, q = cols[0].strip(), cols[1].strip()
            ans = _answer(f, n, cols[2], EXPECTED_FLAT)
            k = count[img]
            count[img] += 1
            out.append(Sample(id=f"{task}/{img}/{k}", image=str(root / img), question=q, answers=ans,
                              meta={"task": task, "image_name": img, "file": str(f), "line": n}))
        return out

    @staticmethod
    def _folder(d: Path, image_root) -> list[Sample]:
        task = d.name
        qa = d / "questions_answers_YN"
        if qa.is_dir():
            txt_dir = qa
            img_dir = Path(image_root) / task if image_root is not None else pick_dir([d / "images", d])
        else:
            txt_dir = d
            img_dir = Path(image_root) / task if image_root is not None else d
        txts = sorted(f for f in txt_dir.iterdir() if f.suffix.lower() == ".txt")
        if not txts:
            raise format_error(d, None, "no question files",
                               "<task>/questions_answers_YN/<stem>.txt or <task>/<stem>.txt")
        images = index_images(img_dir)
        out = []
        for f in txts:
            if f.stem not in images:
                raise format_error(f, None, f"no image named {f.stem}.* in {img_dir}",
                                   "an image with the same stem as each question file")
            img = images[f.stem]
            k = 0
            for n, line in _read_lines(f, EXPECTED_QA):
                cols = line.split("\t")
                if len(cols) < 2:
                    raise format_error(f, f"line {n}", "no TAB between question and answer", EXPECTED_QA)
                ans = _answer(f, n, cols[1], EXPECTED_QA)
                out.append(Sample(id=f"{task}/{img}/{k}", image=str(img_dir / img),
                                  question=cols[0].strip(), answers=ans,
                                  meta={"task": task, "image_name": img, "file": str(f), "line": n}))
                k += 1
        return out

    def prompt(self, sample: Sample) -> str:
        return f"{sample.question}\n{SHORT_ANSWER_PROMPT}"

    def _score(self, pairs):
        by_task: dict[str, list] = defaultdict(list)
        for s, pred in pairs:
            by_task[s.meta["task"]].append((s.meta["image_name"], s.answers, pred))
        out: dict = {"tasks": {t: mme_scores(items) for t, items in sorted(by_task.items())}}
        out["perception"] = sum(v["score"] for t, v in out["tasks"].items() if t in PERCEPTION)
        out["cognition"] = sum(v["score"] for t, v in out["tasks"].items() if t in COGNITION)
        out["total"] = out["perception"] + out["cognition"]
        n_q = sum(v["n_questions"] for v in out["tasks"].values())
        out["acc"] = sum(v["acc"] * v["n_questions"] for v in out["tasks"].values()) / n_q
        out["primary"] = out["total"]
        return out
