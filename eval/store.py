"""File-backed, append-only results store of a sweep, and resumable per-cell prediction files.

Files (both JSON Lines, UTF-8, one JSON object per ``\\n``-terminated line, never rewritten):

- results ``<path>`` (e.g. ``runs/sweep/results.jsonl``): one line per finished cell,
  ``{"cell": "<cell key>", "record": {...}}``; the cell key is :func:`cell_key`'s canonical JSON of
  the cell's full identity (model, method, params, budget, benchmark, limit, shard, ...).
- predictions ``<path stem>.predictions/<sha256(cell)[:24]>.jsonl`` (see
  :meth:`ResultsStore.predictions`): a header line ``{"header": {"cell": "<cell key>"}}`` then one
  ``{"id": "<sample id>", "prediction": <json>, "extra": {...}}`` per predicted sample.
- failures ``<path stem>.failures.jsonl``: ``{"cell": key, "failure": {...}}`` per failed attempt of
  a cell (:meth:`ResultsStore.add_failure`); a later record of the cell supersedes them.
- locks ``<path stem>.lock`` (appends and reads of all the files above) and
  ``<path stem>.claims/<hash>.lock`` (a cell being run: :meth:`ResultsStore.claim`); empty files.

Guarantees:

- every append is one ``write`` of complete lines under an exclusive lock (:mod:`filelock`:
  ``flock`` on POSIX, ``msvcrt`` locking on Windows; the operating system drops it when its process
  dies, so a ``kill -9`` never leaves a stale lock), then ``fsync``:
  several processes (data-parallel shards, two sweeps on one store) never interleave partial lines;
  readers take the same lock and so never see a live writer's half line;
- a process killed mid-write leaves at most a torn LAST line: readers ignore it, and the next append
  repairs it (a tail that parses as a complete record just gets its missing ``\\n``; anything else
  is cut off). Complete lines are never dropped or rewritten; an invalid line elsewhere raises
  :class:`StoreCorruptError` (naming the file and line) instead of being skipped;
- reading is incremental (only the bytes appended since the last read), so ``has()`` stays cheap;
- when a key/id appears twice (``put(..., replace=True)``, or a re-predicted sample), the last line
  wins and the order of first appearance is kept.

Resume protocol of a sweep: for each cell, ``if store.has(key): skip``; else open
``store.predictions(key)``, predict only the samples not in ``done_ids()``, ``append`` each, score
all of ``predictions()``, then ``store.put(key, record)``. A run killed at any point and restarted
ends with exactly the records of an uninterrupted run (given deterministic predictions).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

from filelock import FileLock, Timeout

__all__ = ["cell_key", "parse_cell_key", "ResultsStore", "PredictionsWriter", "StoreCorruptError",
           "CellExistsError", "CellClaimedError"]


class StoreCorruptError(ValueError):
    """A complete line of a store file is not a valid record (message names file and line)."""


class CellExistsError(KeyError):
    """``put`` of a cell that already has a record (use ``replace=True`` to supersede it)."""


class CellClaimedError(RuntimeError):
    """Another process holds the claim of this cell (:meth:`ResultsStore.claim`)."""


# ----------------------------------------------------------------------------------------------------
# Cell identity


def _canon(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"non-finite number {obj!r} in a cell identity")
        return obj
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"cell identity keys must be strings, got {k!r}")
            out[k] = _canon(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_canon(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _canon(obj.item())
    raise TypeError(f"cannot put {type(obj).__name__} {obj!r} in a cell identity (JSON values only)")


def cell_key(**identity: Any) -> str:
    """Canonical JSON of a cell's identity: sorted keys, no spaces, top-level ``None`` values dropped.

    Values must be JSON-like (str, int, float, bool, None, lists/tuples, dicts with str keys; paths and
    numpy scalars are converted). ``1`` and ``1.0`` stay distinct (a token count vs. a fraction).

    >>> cell_key(model="llava", method="hiprune", params={"keep": 64}, budget=0.5, limit=None)
    '{"budget":0.5,"method":"hiprune","model":"llava","params":{"keep":64}}'
    """
    ident = {k: v for k, v in identity.items() if v is not None}
    return json.dumps(_canon(ident), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def parse_cell_key(key: str) -> dict | None:
    """The identity dict back from a :func:`cell_key` string (``None`` if it is not JSON)."""
    try:
        v = json.loads(key)
    except (TypeError, ValueError):
        return None
    return v if isinstance(v, dict) else None


def _as_key(cell: str | Mapping[str, Any]) -> str:
    if isinstance(cell, str):
        return cell
    if isinstance(cell, Mapping):
        return cell_key(**cell)
    raise TypeError(f"a cell key is a str (from cell_key) or an identity dict, not {type(cell).__name__}")


# ----------------------------------------------------------------------------------------------------
# The append-only JSONL log


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


_POLL_S = 0.002  # filelock polls a contended lock; flock itself would wake at once


@contextmanager
def _hold(lock: FileLock) -> Iterator[None]:
    lock.acquire(poll_interval=_POLL_S)
    try:
        yield
    finally:
        lock.release()


def _pread(fd: int, n: int, offset: int) -> bytes:
    """``n`` bytes at ``offset`` (``os.pread`` where it exists; seek + read elsewhere, under the lock)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Log:
    """An append-only JSONL file with locked appends, torn-tail repair and incremental reads."""

    def __init__(self, path: str | os.PathLike, valid: Callable[[Any], bool], what: str,
                 fsync: bool = True, lock: FileLock | None = None):
        self.path = Path(path)
        self.valid = valid
        self.what = what
        self.fsync = fsync
        self._offset = 0      # bytes of complete lines consumed so far
        self._lineno = 0      # complete lines consumed so far
        self._lock = lock if lock is not None else FileLock(self.path.with_name(self.path.name + ".lock"))

    def _parse(self, raw: bytes) -> Any:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None
        return obj if self.valid(obj) else None

    # -- reading ---------------------------------------------------------------------------------
    def _consume(self, f) -> tuple[list[Any], bool]:
        """New objects since the last call (the caller holds a lock). Returns (objs, reset)."""
        size = os.fstat(f.fileno()).st_size
        reset = False
        if size < self._offset:  # the file was replaced behind our back: start over
            self._offset, self._lineno, reset = 0, 0, True
        f.seek(self._offset)
        data = f.read(size - self._offset)
        out: list[Any] = []
        pos = 0
        while True:
            nl = data.find(b"\n", pos)
            if nl < 0:
                break
            line = data[pos:nl]
            self._lineno += 1
            if line.strip():
                obj = self._parse(line)
                if obj is None:
                    raise StoreCorruptError(
                        f"{self.path}: line {self._lineno}: not a valid {self.what} line "
                        f"({line[:80]!r}...). Nothing is dropped automatically; fix or move the line")
                out.append(obj)
            pos = nl + 1
        self._offset += pos
        tail = data[pos:]
        if tail.strip():
            obj = self._parse(tail)  # a complete record that only lacks its newline counts
            if obj is not None:
                out.append(obj)
        return out, reset

    def read_new(self) -> tuple[list[Any], bool]:
        """Objects appended since the last read (under the lock); ``reset`` if the file shrank."""
        if not self.path.exists():  # never create a lock file (or its folder) just to read nothing
            reset = self._offset > 0
            self._offset, self._lineno = 0, 0
            return [], reset
        with _hold(self._lock):
            try:
                f = open(self.path, "rb")
            except FileNotFoundError:
                reset = self._offset > 0
                self._offset, self._lineno = 0, 0
                return [], reset
            with f:
                return self._consume(f)

    # -- writing ---------------------------------------------------------------------------------
    def _repair_tail(self, fd: int) -> None:
        size = os.fstat(fd).st_size
        if size == 0 or _pread(fd, 1, size - 1) == b"\n":
            return
        start, pos = 0, size
        while pos > 0:
            lo = max(0, pos - 65536)
            i = _pread(fd, pos - lo, lo).rfind(b"\n")
            if i >= 0:
                start = lo + i + 1
                break
            pos = lo
        tail = _pread(fd, size - start, start)
        if self._parse(tail) is not None:
            self._write(fd, b"\n")
        else:
            os.ftruncate(fd, start)

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    @contextmanager
    def locked(self) -> Iterator[Callable[[Iterable[Any]], None]]:
        """Hold the exclusive lock (torn tail repaired); yields ``append(objs)``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _hold(self._lock):
            existed = self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND | getattr(os, "O_BINARY", 0), 0o644)
            try:
                if not existed and self.fsync:
                    _fsync_dir(self.path.parent)
                self._repair_tail(fd)

                def append(objs: Iterable[Any]) -> None:
                    objs = list(objs)
                    for o in objs:
                        if not self.valid(o):
                            raise ValueError(f"not a valid {self.what} record: {o!r}")
                    data = b"".join(_dumps(o) for o in objs)
                    if data:
                        self._write(fd, data)
                        if self.fsync:
                            os.fsync(fd)

                yield append
            finally:
                os.close(fd)

    def consume_locked(self) -> tuple[list[Any], bool]:
        """Like :meth:`read_new`, for a caller already inside :meth:`locked`."""
        with open(self.path, "rb") as f:
            return self._consume(f)


# ----------------------------------------------------------------------------------------------------
# Results store


def _valid_result(o: Any) -> bool:
    return isinstance(o, dict) and isinstance(o.get("cell"), str) and isinstance(o.get("record"), dict)


def _valid_failure(o: Any) -> bool:
    return isinstance(o, dict) and isinstance(o.get("cell"), str) and isinstance(o.get("failure"), dict)


class ResultsStore:
    """Append-only store of finished cells: ``has/get/put/records`` keyed by :func:`cell_key`.

    ``path`` is the results JSONL; per-cell prediction files go to ``predictions_dir`` (default
    ``<path without suffix>.predictions/``). Cells may be given as key strings or identity dicts.
    """

    def __init__(self, path: str | os.PathLike, predictions_dir: str | os.PathLike | None = None,
                 fsync: bool = True):
        self.path = Path(path)
        self.predictions_dir = (Path(predictions_dir) if predictions_dir is not None
                                else self.path.with_name(self.path.stem + ".predictions"))
        self.fsync = fsync
        self.lock_path = self.path.with_name(self.path.stem + ".lock")
        self.claims_dir = self.path.with_name(self.path.stem + ".claims")
        self.failures_path = self.path.with_name(self.path.stem + ".failures.jsonl")
        self._lock = FileLock(self.lock_path)  # one lock for every file of this store (reentrant)
        self._log = _Log(self.path, _valid_result, "results", fsync, self._lock)
        self._index: dict[str, dict] = {}

    def _ingest(self, objs: list[dict], reset: bool) -> None:
        if reset:
            self._index = {}
        for o in objs:
            self._index[o["cell"]] = o["record"]

    def refresh(self) -> None:
        """Read what other processes appended since the last call (done by every query)."""
        self._ingest(*self._log.read_new())

    def has(self, cell: str | Mapping[str, Any]) -> bool:
        self.refresh()
        return _as_key(cell) in self._index

    __contains__ = has

    def get(self, cell: str | Mapping[str, Any], default: Any = None) -> dict | Any:
        """The (latest) record of ``cell``, else ``default``."""
        self.refresh()
        return self._index.get(_as_key(cell), default)

    def put(self, cell: str | Mapping[str, Any], record: Mapping[str, Any], *, replace: bool = False) -> str:
        """Append ``record`` for ``cell`` atomically; returns the key.

        Raises :class:`CellExistsError` when the cell already has a record unless ``replace`` (the new
        line then supersedes the old one; the old line stays in the file).
        """
        key = _as_key(cell)
        rec = json.loads(json.dumps(dict(record)))  # JSON round trip: what you read is what was stored
        with self._log.locked() as append:
            self._ingest(*self._log.consume_locked())
            if key in self._index and not replace:
                raise CellExistsError(key)
            append([{"cell": key, "record": rec}])
            self._index[key] = rec
            self._log._offset = self._log.path.stat().st_size
            self._log._lineno += 1
        return key

    def keys(self) -> list[str]:
        self.refresh()
        return list(self._index)

    def __len__(self) -> int:
        return len(self.keys())

    def records(self) -> list[dict]:
        """``[{"cell": key, "identity": dict | None, "record": dict}]`` in order of first appearance."""
        self.refresh()
        return [{"cell": k, "identity": parse_cell_key(k), "record": r} for k, r in self._index.items()]

    def predictions_path(self, cell: str | Mapping[str, Any]) -> Path:
        key = _as_key(cell)
        return self.predictions_dir / (hashlib.sha256(key.encode("utf-8")).hexdigest()[:24] + ".jsonl")

    def predictions(self, cell: str | Mapping[str, Any]) -> "PredictionsWriter":
        """The resumable predictions file of ``cell`` (header ``{"cell": key}``)."""
        key = _as_key(cell)
        return PredictionsWriter(self.predictions_path(key), header={"cell": key}, fsync=self.fsync, lock=self._lock)

    # -- claims: which process is running a cell -------------------------------------------------
    @contextmanager
    def claim(self, cell: str | Mapping[str, Any], timeout: float = -1) -> Iterator[None]:
        """Hold the cell's claim while running it, so that two sweeps on one store never run the same
        cell at once. ``timeout``: seconds to wait (``-1``: as long as it takes, ``0``: not at all);
        raises :class:`CellClaimedError` when another process still holds it. The operating system
        releases a claim whose process died (``kill -9`` included): the next sweep resumes the cell."""
        key = _as_key(cell)
        path = self.claims_dir / (self.predictions_path(key).stem + ".lock")
        lock = FileLock(path)
        try:
            lock.acquire(timeout=timeout, poll_interval=0.05)
        except Timeout:
            raise CellClaimedError(key) from None
        try:
            yield
        finally:
            lock.release()

    # -- failures: why a cell did not finish (kept for reports; a later success supersedes them) ---
    def add_failure(self, cell: str | Mapping[str, Any], failure: Mapping[str, Any]) -> None:
        """Append why ``cell`` failed (a JSON mapping, e.g. ``{"message": ..., "traceback": ...}``)."""
        key = _as_key(cell)
        obj = json.loads(json.dumps({"cell": key, "failure": dict(failure)}))
        with _Log(self.failures_path, _valid_failure, "failures", self.fsync, self._lock).locked() as append:
            append([obj])

    def failures(self) -> dict[str, dict]:
        """``{cell key: latest failure}`` of the cells that have no record (yet)."""
        objs, _ = _Log(self.failures_path, _valid_failure, "failures", self.fsync, self._lock).read_new()
        done = set(self.keys())
        return {o["cell"]: o["failure"] for o in objs if o["cell"] not in done}


# ----------------------------------------------------------------------------------------------------
# Per-cell predictions


def _valid_prediction(o: Any) -> bool:
    if not isinstance(o, dict):
        return False
    if "header" in o:
        return isinstance(o["header"], dict) and len(o) == 1
    return isinstance(o.get("id"), str) and "prediction" in o and isinstance(o.get("extra", {}), dict)


class PredictionsWriter:
    """Resumable per-sample predictions of one cell (JSONL; see the module docstring).

    ``done_ids()`` lists the samples already predicted (so a restarted cell skips them);
    ``append(id, prediction, extra)`` adds one line atomically (safe across processes). If ``header``
    is given, it is written as the first line of a new file and checked against an existing one
    (``ValueError`` on mismatch: the file belongs to another cell).
    """

    def __init__(self, path: str | os.PathLike, header: Mapping[str, Any] | None = None, fsync: bool = True,
                 lock: FileLock | None = None):
        self.path = Path(path)
        self.header_expected = json.loads(json.dumps(dict(header))) if header is not None else None
        self._log = _Log(self.path, _valid_prediction, "predictions", fsync, lock)
        self._rows: dict[str, dict] = {}
        self._header: dict | None = None
        self.refresh()

    def _ingest(self, objs: list[dict], reset: bool) -> None:
        if reset:
            self._rows, self._header = {}, None
        for o in objs:
            if "header" in o:
                if self._header is None:
                    self._header = o["header"]
                continue
            self._rows[o["id"]] = {"prediction": o["prediction"], "extra": o.get("extra", {})}
        if (self._header is not None and self.header_expected is not None
                and self._header != self.header_expected):
            raise ValueError(f"{self.path}: header {self._header!r} does not match the expected "
                             f"{self.header_expected!r} (predictions of another cell?)")

    def refresh(self) -> None:
        self._ingest(*self._log.read_new())

    @property
    def header(self) -> dict | None:
        self.refresh()
        return self._header

    def done_ids(self) -> set[str]:
        """Ids with a prediction on disk."""
        self.refresh()
        return set(self._rows)

    def __len__(self) -> int:
        self.refresh()
        return len(self._rows)

    def append(self, id: str, prediction: Any, extra: Mapping[str, Any] | None = None) -> None:
        """Append one prediction (JSON value) with optional ``extra`` fields (e.g. latency, tokens)."""
        self.append_many([(id, prediction, extra)])

    def append_many(self, items: Iterable[tuple[str, Any, Mapping[str, Any] | None]]) -> None:
        """Append several predictions in one locked, fsynced write."""
        lines = []
        for id_, pred, extra in items:
            line = {"id": str(id_), "prediction": pred}
            if extra:
                line["extra"] = dict(extra)
            lines.append(json.loads(json.dumps(line)))
        with self._log.locked() as append:
            self._ingest(*self._log.consume_locked())
            if self._header is None and self.header_expected is not None and self.path.stat().st_size == 0:
                lines.insert(0, {"header": self.header_expected})
            append(lines)
            self._ingest(lines, False)
            self._log._offset = self.path.stat().st_size
            self._log._lineno += len(lines)

    def records(self) -> dict[str, dict]:
        """``{id: {"prediction": ..., "extra": {...}}}`` (order of first appearance, last write wins)."""
        self.refresh()
        return {k: dict(v) for k, v in self._rows.items()}

    def predictions(self) -> dict[str, Any]:
        """``{id: prediction}``."""
        self.refresh()
        return {k: v["prediction"] for k, v in self._rows.items()}
