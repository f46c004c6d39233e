"""The sweep loop: run (or resume) every cell of a config into a results store.

A cell that fails (an exception while predicting or scoring) is recorded in the store's failures
file with a message naming the cell and the samples, and the sweep goes on with the next cell; the
sweep raises :class:`CellsFailedError` at the end. Nothing is stored for a failed cell, so the same
command retries exactly the failed cells. Two sweeps on one store share the work: a cell another
process is running is skipped and taken up at the end (waiting for it, then resuming or skipping it).
"""
from __future__ import annotations

import gc
import os
import sys
import time
import traceback
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from ..store import CellClaimedError, CellExistsError, ResultsStore
from .config import Cell, SweepConfig, bench_limit, load_config, plan_cells
from .measure import (PrefillTimer, cell_record, count_new_tokens, environment, eos_ids, peak_memory,
                      sample_flops)
from .assets import missing_images, preflight
from .clip import load_clip, run_clip_cell
from .models import MissingAssetError, load_model, resolve_path
from .sharding import DataParallel
from .validate import patch_args, validate_cells

__all__ = ["run_sweep", "CellFailure", "CellsFailedError", "describe_cell"]


def describe_cell(cell: Cell) -> str:
    """``model 'm', method 'fastv', budget 0.5, benchmark 'pope'`` (for messages)."""
    budget = "" if cell.budget is None else f", budget {cell.budget}"
    return f"model {cell.model.name!r}, method {cell.method.label!r}{budget}, benchmark {cell.bench.label!r}"


@dataclass
class CellFailure:
    """Why one cell did not finish: ``message`` names the cell and the samples; ``traceback`` the cause."""

    cell: Cell
    message: str
    traceback: str = ""
    rank: int = 0


class CellsFailedError(RuntimeError):
    """Some cells failed; every other cell ran and is stored. ``failures`` (:class:`CellFailure`),
    ``records`` (the list :func:`run_sweep` would have returned; ``None`` for the failed cells)."""

    def __init__(self, failures: Sequence[CellFailure], records: list, store_path: str):
        self.failures, self.records, self.store_path = list(failures), records, store_path
        n = len({f.cell.key for f in self.failures})
        lines = [f"{n} of {len(records)} cells failed (every other cell is stored in {store_path}; details in "
                 f"{ResultsStore(store_path).failures_path}). Fix the cause and run the same command again: "
                 "it retries only the failed cells."]
        lines += [f"  - {f.message}" for f in self.failures]
        super().__init__("\n".join(lines))


class _SampleError(RuntimeError):
    """An exception while predicting a batch, annotated with its sample ids."""


# ----------------------------------------------------------------------------------------------------
# The sweep


def run_sweep(config: Mapping | str | os.PathLike, store_path: str | os.PathLike, *, limit: int | None = None,
              shard_by: str = "auto", progress: bool = True, variables: Mapping[str, str] | None = None) -> list[dict]:
    """Run (or resume) a sweep; returns the records of its cells in run order.

    Args:
        config: a config dict or a YAML file (:mod:`vtprune.eval.sweep`).
        store_path: the results JSONL (per-cell predictions go to ``<stem>.predictions/``).
        limit: first ``limit`` samples of each benchmark (overrides the config's ``limit``; part of
            the cell identity, so limited and full runs never mix).
        shard_by: ``"auto"`` (data-parallel when ``WORLD_SIZE > 1``), ``"accelerate"`` or ``"none"``.
        progress: tqdm bars (overall cells, samples of the current cell) on the main process.
        variables: values of the config's ``${NAME}`` placeholders (the CLI's ``--set``); the
            environment supplies the others.

    Before the first cell runs, every unfinished cell is checked: every variable is set, checkpoints
    and benchmark files are on disk (else :class:`MissingAssetError` says what to download and where),
    benchmark files load and name existing images, and ``vtprune.patch`` accepts each (model, method,
    budget) (on a weightless copy of the model); any problem raises ``ValueError`` naming the config
    entry, with nothing stored. A config's ``published`` block is saved next to the store
    (:func:`.published.save_sidecar`) for ``vtprune report``.
    Cells finished in the store are skipped; a partial cell continues from its predictions file.
    A cell that fails while running is recorded in the failures file and the sweep continues; at the
    end :class:`CellsFailedError` lists the failures. ``KeyboardInterrupt`` propagates; everything
    written so far is kept and the same call resumes. Every rank returns the records.
    """
    import torch
    from tqdm.auto import tqdm

    cfg = load_config(config, variables, allow_unset=True)
    cells = plan_cells(cfg, limit)
    if cfg.unset_variables:
        preflight(cfg, cells)  # raises: says which variables to set and what goes where
    dist = DataParallel(shard_by, cfg.device)
    if dist.world > 1 and any(m.open_clip for m in cfg.models):
        raise ValueError("open_clip models score a whole gallery per cell; run their sweep in one process")
    device = dist.device(cfg.device)
    store = ResultsStore(store_path)
    pending = [c for c in cells if not store.has(c.key)]
    bench_paths = preflight(cfg, pending)
    benches = _load_benchmarks(cfg, pending, bench_paths, limit)
    validate_cells(cfg, pending)
    if cfg.published is not None and dist.main:
        from .published import save_sidecar

        save_sidecar(store_path, _config_name(cfg), cfg.published)
    env = environment(device, dist.world)

    say = (lambda msg: tqdm.write(msg, file=sys.stderr)) if dist.main else (lambda msg: None)
    overall = tqdm(total=len(cells), initial=len(cells) - len(pending), desc="sweep", unit="cell", position=0,
                   disable=not (progress and dist.main), dynamic_ncols=True)
    failures: list[CellFailure] = []

    def fail(cell: Cell, exc: BaseException, what: str = "") -> None:
        f = CellFailure(cell, f"{describe_cell(cell)}: {what}{type(exc).__name__}: {exc}",
                        "".join(traceback.format_exception(exc)), dist.rank)
        failures.append(f)
        store.add_failure(cell.key, {"message": f.message, "traceback": f.traceback, "rank": dist.rank,
                                     "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        say(f"vtprune sweep: cell failed: {f.message} (continuing with the next cell)")

    try:
        for model_entry in cfg.models:
            mine = [c for c in pending if c.model is model_entry and not store.has(c.key)]
            if not mine:
                continue
            try:
                if model_entry.open_clip:  # (model, tokenizer, preprocess)
                    loaded = load_clip(model_entry, resolve_path(model_entry.path, cfg) or model_entry.path, device)
                else:
                    loaded = load_model(model_entry, cfg, device)  # (model, processor, prompt_fn)
            except Exception as exc:  # noqa: BLE001 - one model that does not load must not stop the others
                for cell in mine:
                    fail(cell, exc, "loading the model: ")
                    overall.update(1)
                continue

            def run(cell: Cell) -> None:
                overall.set_postfix_str(f"{model_entry.name} | {cell.bench.label} | {cell.method.label} @ {cell.budget}")
                try:
                    if model_entry.open_clip:
                        run_clip_cell(cell, loaded, benches[cell.bench.label], store, cfg, env, device)
                    else:
                        _run_cell(cell, *loaded, benches[cell.bench.label], store, dist, device, cfg, env, progress)
                except _SampleError as exc:
                    fail(cell, exc.__cause__, f"{exc}: ")
                except KeyboardInterrupt:
                    raise
                except Exception as exc:  # noqa: BLE001 - recorded; the sweep goes on
                    fail(cell, exc)
                overall.update(1)

            try:
                _run_claimed(mine, run, store, dist, say)
            finally:
                loaded = None  # free the model before the next one loads
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        overall.close()
    dist.barrier()
    records = [store.get(c.key) for c in cells]
    if failures:
        raise CellsFailedError(failures, records, str(store_path))
    return records


def _config_name(cfg: SweepConfig) -> str:
    """The name a config's published block is saved under: its ``name``, else its file name."""
    if cfg.name:
        return str(cfg.name)
    return cfg.source.stem if cfg.source is not None else "config"


def _load_benchmarks(cfg: SweepConfig, pending: Sequence[Cell], paths: Mapping, limit: int | None) -> dict[str, Any]:
    """Every benchmark an unfinished cell needs, loaded and checked (its image files exist) before the
    first cell runs; :class:`MissingAssetError` lists the missing images of every benchmark."""
    from ..benchmarks import BENCHMARKS, load_benchmark

    out: dict[str, Any] = {}
    problems = []
    for entry in cfg.benchmarks:
        if any(c.bench is entry for c in pending):
            bench = load_benchmark(entry.name, paths[entry.label], **entry.options)
            n = bench_limit(cfg, entry, limit)
            try:
                bench = bench.subset(limit=n) if n is not None else bench
            except NotImplementedError as exc:
                raise ValueError(f"sweep config: limit: benchmark {entry.label!r}: {exc}") from None
            out[entry.label] = bench
            missing = missing_images(bench)
            if missing:
                source = BENCHMARKS[entry.name].layout(paths[entry.label], **entry.options).source
                problems.append(f"benchmark {entry.label!r}: {len(missing)} image file(s) not found, e.g. "
                                + ", ".join(missing[:3]) + (f"\n      get them from: {source}" if source else ""))
    if problems:
        raise MissingAssetError("missing assets: nothing was run. The benchmark files load, but images are "
                                "missing:\n  - " + "\n  - ".join(problems))
    return out


def _run_claimed(cells: Sequence[Cell], run: Callable[[Cell], None], store: ResultsStore, dist: DataParallel,
                 say: Callable[[str], None]) -> None:
    """Run ``cells`` in order, each under its claim in the store, so that two sweeps on one store
    split the work instead of running a cell twice.

    One process: a cell another sweep is running is deferred and taken up at the end, waiting for its
    claim (then it is stored, and skipped, or its owner died or failed, and it is resumed). The
    reference cell (``none``) is always waited for: relative accuracy needs it. Data-parallel ranks
    follow rank 0, which waits for each claim.
    """
    deferred: list[Cell] = []
    for cell in cells:
        if dist.world > 1:
            _run_sharded(cell, run, store, dist, say)
            continue
        if store.has(cell.key):
            continue
        try:
            with store.claim(cell.key, timeout=0):
                if not store.has(cell.key):
                    run(cell)
        except CellClaimedError:
            if cell.is_reference:
                _wait_and_run(cell, run, store, say)
            else:
                deferred.append(cell)
    for cell in deferred:
        _wait_and_run(cell, run, store, say)


def _wait_and_run(cell: Cell, run: Callable[[Cell], None], store: ResultsStore, say: Callable[[str], None]) -> None:
    """Wait for another process's claim of ``cell``; run it unless that process stored it."""
    if store.has(cell.key):
        return
    say(f"vtprune sweep: waiting for another process that runs {describe_cell(cell)}")
    with store.claim(cell.key):
        if not store.has(cell.key):
            run(cell)


def _run_sharded(cell: Cell, run: Callable[[Cell], None], store: ResultsStore, dist: DataParallel,
                 say: Callable[[str], None]) -> None:
    with ExitStack() as stack:
        if dist.main:
            try:
                stack.enter_context(store.claim(cell.key, timeout=0))
            except CellClaimedError:
                say(f"vtprune sweep: waiting for another process that runs {describe_cell(cell)}")
                stack.enter_context(store.claim(cell.key))
        dist.barrier()  # every rank sees the store as rank 0 does once it holds the claim
        if not store.has(cell.key):
            run(cell)


def _run_cell(cell: Cell, model, proc, prompt_fn, bench, store: ResultsStore, dist: DataParallel, device,
              cfg: SweepConfig, env: dict, progress: bool) -> None:
    """Predict this rank's unfinished batches of ``cell``, then (rank 0) score and store the record.

    Raises on failure (nothing stored); with several ranks, rank 0 stores the record only when every
    sample has a prediction, so a cell that failed on another rank is retried by the next run."""
    import torch
    from tqdm.auto import tqdm

    import vtprune

    writer = store.predictions(cell.key)
    samples = bench.samples
    bs = cfg.batch_size
    batches = [samples[i:i + bs] for i in range(0, len(samples), bs)]
    mine = [bt for j, bt in enumerate(batches) if j % dist.world == dist.rank]
    done = writer.done_ids()
    todo = [bt for bt in mine if not all(s.id in done for s in bt)]
    method, params = patch_args(cell)
    error: BaseException | None = None
    try:
        if todo:
            patch = vtprune.patch(model, method, seed=cfg.seed, **params)
            sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
            timer = PrefillTimer(model, sync)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            n_mine = sum(len(bt) for bt in mine)
            bar = tqdm(total=n_mine, initial=n_mine - sum(len(bt) for bt in todo), desc=cell.method.label,
                       unit="sample", position=1, leave=False, disable=not (progress and dist.main), dynamic_ncols=True)
            try:
                for bt in todo:
                    try:
                        rows = predict_batch(bt, model, proc, prompt_fn, bench, patch, timer, sync, device, cfg)
                    except Exception as exc:
                        ids = ", ".join(s.id for s in bt)
                        raise _SampleError(f"sample{'s' if len(bt) > 1 else ''} {ids}") from exc
                    for _, extra in rows:
                        extra["rank"] = dist.rank
                    writer.append_many([(s.id, text, extra) for s, (text, extra) in zip(bt, rows) if s.id not in done])
                    bar.update(len(bt))
            finally:
                bar.close()
                timer.remove()
                patch.remove()
    except Exception as exc:  # noqa: BLE001 - re-raised after the barrier, so that every rank gets there
        error = exc
    dist.barrier()
    if error is not None:
        raise error
    if dist.main:
        missing = [s.id for s in samples if s.id not in writer.done_ids()]
        if missing:
            raise RuntimeError(f"{len(missing)} sample(s) have no prediction after every rank finished "
                               f"(first: {missing[0]}); another rank failed on them (see its message)")
        try:
            store.put(cell.key, cell_record(cell, bench, writer, store, env))
        except CellExistsError:  # a process that does not claim cells (an older vtprune) stored it first
            pass


def predict_batch(batch, model, proc, prompt_fn, bench, patch, timer: PrefillTimer, sync, device, cfg: SweepConfig):
    import torch

    texts = [prompt_fn(bench, s) for s in batch]
    images = [s.load_image() for s in batch]
    inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
    inputs = inputs.to(device)
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tok = getattr(proc, "tokenizer", proc)
    timer.reset()
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id)
    sync()
    total_ms = (time.perf_counter() - t0) * 1e3
    gen = out[:, inputs["input_ids"].shape[1]:]
    answers = tok.batch_decode(gen, skip_special_tokens=True)
    n_new = count_new_tokens(gen.cpu(), eos_ids(model, tok), tok.pad_token_id)
    flops = sample_flops(model, patch, inputs, n_new)
    b = len(batch)
    st = patch.stats
    peak, kind = peak_memory(device)
    rows = []
    for i in range(b):
        extra = dict(flops[i])
        extra.update(prefill_ms=timer.ms / b if timer.ms is not None else None, total_ms=total_ms / b, select_ms=st.select_ms / b,
                     vision_ms=st.vision_ms / b, peak_mem_mib=peak, peak_mem_kind=kind, batch=b)
        rows.append((answers[i].strip(), extra))
    return rows


