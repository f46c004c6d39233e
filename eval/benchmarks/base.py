"""Common types of the benchmark loaders: :class:`Sample`, :class:`Benchmark`, :class:`BenchmarkFormatError`.

Every loader reads LOCAL files in the benchmark's official format (nothing is ever downloaded) and
returns a :class:`Benchmark` whose ``samples`` are :class:`Sample` records. Images stay on disk (or
base64 in the TSV) until :meth:`Sample.load_image` is called.

Conventions shared by all benchmarks:

- ``Benchmark.prompt(sample)`` is the text-only user prompt (question plus the benchmark's usual
  answer-format instruction); where the image token goes is the model adapter's business.
- ``Benchmark.score(predictions)`` takes ``{sample_id: generated_text}`` and returns a flat-ish dict of
  the official metric(s) plus ``primary`` (the headline number), ``n`` (samples scored),
  ``n_missing`` (samples without a prediction, counted wrong) and ``n_extra`` (prediction ids that are
  not samples of this benchmark, ignored). Accuracies are fractions in [0, 1], except MME (official
  point scale).
- ``Benchmark.subset(limit=, shard=, num_shards=)`` returns a copy restricted to the first ``limit``
  samples, then to every ``num_shards``-th sample starting at ``shard`` (data-parallel shards).
- ``Benchmark.layout(path, **options)`` (classmethod) declares the files and folders the loader reads
  under ``path`` and where the official release comes from (:class:`Layout`), so that a sweep can say
  what to download and where to put it before it loads anything.
"""
from __future__ import annotations

import base64
import binascii
import copy
import glob
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."
CHOICE_PROMPT = "Answer with the option's letter from the given choices directly."
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class BenchmarkFormatError(ValueError):
    """A benchmark file is missing or malformed; the message names the file, where, and the format."""


def format_error(file: str | os.PathLike, where: str | None, problem: str,
                 expected: str | None = None) -> BenchmarkFormatError:
    """Build a :class:`BenchmarkFormatError`: ``"<file>: <where>: <problem>. Expected: <expected>"``.

    ``where`` is e.g. ``"line 3"``, ``'JSON path $["data"][4].answers'`` or ``"TSV row 7"``.
    """
    msg = f"{os.fspath(file)}"
    if where:
        msg += f": {where}"
    msg += f": {problem}"
    if expected:
        msg += f". Expected: {expected}"
    return BenchmarkFormatError(msg)


# ----------------------------------------------------------------------------------------------------
# File layouts (what a loader reads; the single source of the download instructions)


@dataclass(frozen=True)
class Need:
    """One file or folder a loader reads.

    ``path`` is the canonical location (the one to create); ``alternatives`` are other paths or glob
    patterns the loader also accepts. ``kind`` is ``"file"`` or ``"dir"``.
    """

    path: Path
    kind: str
    what: str
    alternatives: tuple = ()

    def present(self) -> bool:
        for cand in (self.path, *self.alternatives):
            c = os.fspath(cand)
            hits = glob.glob(c) if glob.has_magic(c) else [c]
            if any(os.path.isfile(h) if self.kind == "file" else os.path.isdir(h) for h in hits):
                return True
        return False


@dataclass(frozen=True)
class Layout:
    """The files and folders a loader reads under ``root`` (``needs``) and where the official release
    comes from (``source``: one or two sentences naming the project page and the file names)."""

    root: Path
    needs: tuple
    source: str

    def missing(self) -> list[Need]:
        return [n for n in self.needs if not n.present()]


def as_folder(path: str | os.PathLike, file_suffixes: Sequence[str] = (".json", ".jsonl", ".tsv", ".txt")) -> tuple[Path, Path | None]:
    """``(folder, file)`` for a loader path that may be a folder or one file in it: an existing file,
    or a missing path ending in one of ``file_suffixes``, is a file; anything else a folder."""
    p = Path(path)
    if p.is_file() or (not p.exists() and p.suffix.lower() in file_suffixes):
        return p.parent, p
    return p, None


# ----------------------------------------------------------------------------------------------------
# Images


@dataclass(frozen=True)
class Base64Image:
    """A picklable lazy loader for a base64-encoded image (e.g. a cell of an MMBench TSV).

    Calling it decodes and returns a ``PIL.Image``; ``source`` names the file/row for error messages.
    """

    data: str
    source: str = "<base64>"

    def __call__(self):
        from PIL import Image

        try:
            raw = base64.b64decode(self.data, validate=False)
            img = Image.open(io.BytesIO(raw))
            img.load()
        except (binascii.Error, ValueError, OSError) as exc:
            raise BenchmarkFormatError(
                f"{self.source}: cannot decode the base64 image ({exc}). "
                "Expected: a base64-encoded PNG/JPEG") from exc
        return img


ImageRef = Union[str, os.PathLike, Callable[[], Any], None]


def open_image(ref: ImageRef, mode: str | None = "RGB"):
    """Open an image reference: a path (str/PathLike) or a zero-argument loader returning a PIL image.

    Raises :class:`BenchmarkFormatError` (naming the file) when the file is missing or undecodable.
    """
    from PIL import Image, UnidentifiedImageError

    if ref is None:
        raise BenchmarkFormatError("<sample>: this sample has no image")
    if callable(ref) and not isinstance(ref, (str, os.PathLike)):
        img = ref()
    else:
        p = os.fspath(ref)
        if not os.path.isfile(p):
            raise BenchmarkFormatError(f"{p}: image file not found. Expected: a PIL-readable image file")
        try:
            img = Image.open(p)
            img.load()
        except (UnidentifiedImageError, OSError) as exc:
            raise BenchmarkFormatError(
                f"{p}: cannot decode the image ({exc}). Expected: a PIL-readable image file") from exc
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    return img


@dataclass
class Sample:
    """One benchmark item.

    Attributes:
        id: unique within the benchmark (string; e.g. ``"adversarial/17"`` for POPE).
        image: a path to an image file, or a zero-argument callable returning a ``PIL.Image``
            (lazy: nothing is opened until :meth:`load_image`). ``None`` for text-only items.
        question: the raw question text (no answer-format instruction; see ``Benchmark.prompt``).
        answers: the reference answer (str) or the list of reference answers (VQA: 10 human answers;
            retrieval: the captions). For multiple choice: the correct letter (``"B"``).
        choices: option texts for multiple-choice items (letter i = ``"ABCD..."[i]``), else ``None``.
        meta: everything else the format carries (split, category, hint, question type, ...).
    """

    id: str
    image: ImageRef
    question: str
    answers: list[str] | str
    choices: list[str] | None = None
    meta: dict = field(default_factory=dict)

    def load_image(self, mode: str | None = "RGB"):
        """Open the image now (converted to ``mode``; ``None`` keeps the file's mode)."""
        return open_image(self.image, mode)

    @property
    def answer_list(self) -> list[str]:
        """``answers`` as a list."""
        return [self.answers] if isinstance(self.answers, str) else list(self.answers)


# ----------------------------------------------------------------------------------------------------
# Benchmark


class Benchmark:
    """A loaded benchmark: ``name``, ``samples``, ``prompt(sample)``, ``score(predictions)``.

    Subclasses implement ``load(path, **kw)`` (classmethod) and ``_score(pairs)``, where ``pairs`` is
    the list of ``(sample, prediction_text)`` for every sample (missing predictions are ``""``).
    """

    name: str = "benchmark"

    def __init__(self, samples: Sequence[Sample], *, source: str | os.PathLike | None = None,
                 name: str | None = None, **options: Any):
        self.samples: list[Sample] = list(samples)
        self.source = os.fspath(source) if source is not None else None
        if name is not None:
            self.name = name
        self.options = dict(options)
        ids = [s.id for s in self.samples]
        if len(set(ids)) != len(ids):
            seen: set[str] = set()
            dup = next(i for i in ids if i in seen or seen.add(i))
            raise format_error(self.source or self.name, None, f"duplicate sample id {dup!r}",
                               "unique ids per benchmark")
        self._by_id = None

    # -- container -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def __getitem__(self, i: int) -> Sample:
        return self.samples[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, n={len(self.samples)}, source={self.source!r})"

    def by_id(self, sample_id: str) -> Sample:
        if self._by_id is None:
            self._by_id = {s.id: s for s in self.samples}
        return self._by_id[sample_id]

    @classmethod
    def load(cls, path: str | os.PathLike, **kw: Any) -> "Benchmark":  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def layout(cls, path: str | os.PathLike, **options: Any) -> Layout:
        """The files and folders :meth:`load` reads at ``path`` with ``options`` (loaders override this
        with their official layout; the base only needs ``path`` to exist)."""
        return Layout(Path(path), (Need(Path(path), "dir" if Path(path).is_dir() else "file",
                                        f"the {cls.name} benchmark"),), "")

    def subset(self, limit: int | None = None, shard: int | None = None,
               num_shards: int | None = None) -> "Benchmark":
        """A shallow copy with the first ``limit`` samples, then every ``num_shards``-th from ``shard``."""
        samples = self.samples if limit is None else self.samples[: int(limit)]
        if num_shards is not None and num_shards > 1:
            shard = shard or 0
            if not 0 <= shard < num_shards:
                raise ValueError(f"shard {shard} not in [0, {num_shards})")
            samples = samples[shard::num_shards]
        elif shard not in (None, 0):
            raise ValueError("shard given without num_shards > 1")
        new = copy.copy(self)
        new.samples = list(samples)
        new._by_id = None
        return new

    # -- prompts and scoring ---------------------------------------------------------------------
    def prompt(self, sample: Sample) -> str:
        """Question plus the usual short-answer instruction."""
        return f"{sample.question}\n{SHORT_ANSWER_PROMPT}"

    def _pairs(self, predictions: Mapping[str, Any]) -> tuple[list[tuple[Sample, Any]], dict]:
        ids = {s.id for s in self.samples}
        pairs = []
        missing = 0
        for s in self.samples:
            if s.id in predictions and predictions[s.id] is not None:
                pairs.append((s, predictions[s.id]))
            else:
                missing += 1
                pairs.append((s, ""))
        extra = sum(1 for k in predictions if k not in ids)
        return pairs, {"n": len(self.samples), "n_missing": missing, "n_extra": extra}

    def score(self, predictions: Mapping[str, str]) -> dict:
        """Score ``{sample_id: prediction_text}``; returns the official metric(s) and ``primary``."""
        if not self.samples:
            raise ValueError(f"{self.name}: no samples to score")
        pairs, counts = self._pairs(predictions)
        out = self._score(pairs)
        out.update(counts)
        return out

    def _score(self, pairs: list[tuple[Sample, str]]) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------
# Reading helpers used by the loaders


def require_path(path: str | os.PathLike, expected: str, *, kind: str = "any") -> Path:
    """Return ``Path(path)`` or raise :class:`BenchmarkFormatError` if it does not exist."""
    p = Path(path)
    ok = p.is_file() if kind == "file" else p.is_dir() if kind == "dir" else p.exists()
    if not ok:
        what = {"file": "file", "dir": "folder"}.get(kind, "path")
        raise format_error(p, None, f"{what} not found", expected)
    return p


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """Parse a whole JSON file; errors name the file, line/column and the expected format."""
    p = require_path(path, expected, kind="file")
    try:
        with open(p, "r", encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise format_error(p, f"line {exc.lineno} column {exc.colno}", f"invalid JSON ({exc.msg})",
                           expected) from exc
    except UnicodeDecodeError as exc:
        raise format_error(p, None, f"not UTF-8 text ({exc})", expected) from exc


def iter_jsonl(path: str | os.PathLike, expected: str) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file (objects only)."""
    p = require_path(path, expected, kind="file")
    with open(p, "r", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise format_error(p, f"line {n}", f"invalid JSON ({exc.msg})", expected) from exc
            if not isinstance(obj, dict):
                raise format_error(p, f"line {n}", f"a JSON {type(obj).__name__}, not an object",
                                   expected)
            yield n, obj


def json_path(*parts: Any) -> str:
    """``json_path("data", 3, "answers") -> 'JSON path $["data"][3]["answers"]'``."""
    s = "$"
    for p in parts:
        s += f"[{p}]" if isinstance(p, int) else f"[{json.dumps(str(p))}]"
    return f"JSON path {s}"


def pick_dir(candidates: Sequence[str | os.PathLike]) -> Path:
    """The first existing folder among ``candidates``, else the first candidate (checked lazily)."""
    for c in candidates:
        if c is not None and Path(c).is_dir():
            return Path(c)
    return Path(next(c for c in candidates if c is not None))


def index_images(folder: Path) -> dict[str, str]:
    """Map image stem -> file name for the image files directly inside ``folder`` ({} if absent)."""
    out: dict[str, str] = {}
    if folder.is_dir():
        for name in sorted(os.listdir(folder)):
            stem, ext = os.path.splitext(name)
            if ext.lower() in IMAGE_EXTENSIONS:
                out.setdefault(stem, name)
    return out


def choice_letters(n: int) -> str:
    return "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n]


def format_choices(choices: Sequence[str]) -> str:
    """``"A. first\\nB. second"``."""
    return "\n".join(f"{l}. {c}" for l, c in zip(choice_letters(len(choices)), choices))
