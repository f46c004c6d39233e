"""Sweep runner: models x methods (with params) x budgets x benchmarks -> one record per cell.

    from vtprune.eval.sweep import run_sweep
    records = run_sweep("eval/configs/tiny.yaml", "runs/tiny/results.jsonl", limit=8)

or ``vtprune sweep CONFIG.yaml [--store RESULTS.jsonl] [--limit N] [--shard-by auto|accelerate|none]
[--set NAME=VALUE ...]``. The configs in ``eval/configs/papers/`` reproduce the main tables of the
methods' papers (docs/reproduce.md).

Config (YAML or a dict; unknown keys are errors, every error is a ``ValueError`` naming the key)::

    models:                       # required, non-empty
      - name: tiny-llava          # required; the label used in records and plots
        builtin: tiny-llava       # a name of BUILTIN_MODELS: tiny-llava | tiny-llava_next | tiny-qwen2_vl |
                                  # tiny-qwen2_5_vl | embedded | embedded-anyres (register_builtin adds more)
      - name: llava-1.5-7b
        path: ${MODELS}/llava-1.5-7b-hf   # AutoModelForImageTextToText / AutoProcessor.from_pretrained
        hub: llava-hf/llava-1.5-7b-hf     # optional: the repository named in the download instructions
        dtype: float16            # optional (default: the top-level dtype)
        prompt: "USER: {image}\\n{prompt} ASSISTANT:"   # optional; {image} {prompt} {question}
      - name: clip-l-336          # a plain CLIP (retrieval / imagefolder benchmarks only; .clip)
        open_clip: ViT-L-14-336-quickgelu
        path: ${MODELS}/vit_large_patch14_clip_336.openai/open_clip_pytorch_model.bin
    benchmarks:                   # required, non-empty
      - name: embedded            # a loader of vtprune.eval.benchmarks.load_benchmark
        path: assets/embedded/bench
        label: embedded-heldout   # optional display name (default: name)
        options: {}               # optional loader keyword arguments
        models: [embedded]        # optional: only with these models (e.g. a model's own held-out split)
        limit: 240                # optional: its first N samples (overrides the top-level limit)
    methods:                      # optional; `none` and `random` are always added
      - fastv                     # short form: a registered name, default params, budget knob `keep`
      - name: fastv
        params: {layer: 3}
        label: fastv-K3           # optional (default: name plus params)
        budgets: [0.5, 0.25]      # optional: overrides the top-level budgets for this method
      - name: pitome
        budget_param: ratio       # the method's own budget knob (default: keep)
        models: [llava-1.5-7b]    # optional: only on these models (e.g. a method for one family)
      - name: transprune
        budget_param: null        # no budget knob: one cell per model at the method's own settings
      - spec: "pool:keep={budget} + fastv:layer=2,keep=0.5"   # a composition; {budget} is filled in
        label: pool+fastv
    budgets: [0.5, 0.25]          # required unless every method has its own
    max_new_tokens: 8             # greedy decoding, short answers
    batch_size: 4                 # left padding
    seed: 0                       # the patch seed (stochastic methods such as random)
    limit: null                   # first N samples of each benchmark
    dtype: float32
    device: auto                  # auto (cuda if available) | cpu | cuda | cuda:N
    store: runs/x/results.jsonl   # optional default for the CLI's --store
    baselines: [none, random]     # optional; `none` is required (relative accuracy), `random` optional
    variables:                    # optional: what each ${NAME} is (quoted in the messages)
      MODELS: the folder of the Hugging Face checkpoints
    published: {...}              # optional: the papers' numbers (.published), shown by `vtprune report`

``${NAME}`` anywhere in a string takes its value from ``--set NAME=VALUE`` (``run_sweep(variables=)``),
else from the environment; an unset name stops the sweep with the list of variables to set and the
download instructions written with the placeholders.
Relative paths (benchmark and model paths) are tried against the working directory, the config
file's folder and the repository root, in that order.

Before the first cell runs, the sweep checks every unfinished cell: every checkpoint and every file
and folder the benchmark loaders read is on disk (:mod:`.assets`; else ``MissingAssetError`` lists each
missing file with the ``huggingface-cli download`` command or the benchmark's official source, exit code
2, nothing loaded), benchmark files parse and name existing images, and ``vtprune.patch`` accepts each (model, method, budget) on the model (built without
weights from its config; :mod:`.validate`): a layer beyond the LLM's depth, a budget above the
model's visual tokens, an unknown or wrongly typed parameter or an unsupported family stops the
sweep with a ``ValueError`` naming the config entry, before anything is stored.

While it runs, a failing cell (say an out-of-memory batch) does not stop the sweep: its error, naming
the cell and the samples, goes to the store's failures file and to stderr, the remaining cells run,
and :class:`CellsFailedError` lists the failures at the end (``vtprune sweep`` exits with 1). Nothing
is stored for a failed cell, so rerunning the command retries exactly those cells. Two sweeps on one
store split the work: each cell is claimed while it runs (:meth:`ResultsStore.claim`), a cell
claimed by another process is taken up at the end after waiting for it.

Each cell writes its per-sample predictions (with the per-sample schedule, FLOPs and latency in
``extra``) through :meth:`ResultsStore.predictions`; batches are appended atomically, so a killed
cell resumes at the first batch not on disk, with the same batch composition (hence the same
predictions) as an uninterrupted run. The record is computed from the predictions file alone, in the
benchmark's sample order, after which ``store.put`` marks the cell finished. Timing, memory and
environment fields (:data:`VOLATILE_FIELDS`) naturally differ between runs; :func:`comparable`
drops them.

Record fields (``store.get(key)`` / the list ``run_sweep`` returns): identity (``model``, ``benchmark``,
``benchmark_loader``, ``method`` (the label), ``method_name``, ``spec``, ``params``, ``budget_param``,
``budget``), ``status`` (``"ok"``; stores written before validation existed may hold
``"unsupported"`` records), ``n``, ``accuracy`` (the benchmark's ``primary``), ``score`` (its full dict),
``rel_accuracy`` (accuracy / accuracy of the ``none`` cell of the same model x benchmark; 1.0 for
``none`` itself; ``None`` when the reference scores 0), ``flops_ratio`` / ``llm_flops_ratio`` (total /
LLM prefill FLOPs relative to ``none``), the kept-token schedule as means over samples
(``visual_tokens`` per image at the LLM input, ``visual_tokens_in``, ``llm_tokens_per_layer``,
``visual_tokens_per_layer``, ``prompt_tokens``, ``new_tokens``), the FLOPs that ran as means over
samples of ``count_flops(model, schedule)`` (:data:`FLOPS_FIELDS`), and the volatile
``prefill_ms`` / ``total_ms`` (median per sample; batch time / batch size), ``select_ms``,
``vision_ms`` (mean), ``peak_mem_mib`` (CUDA max allocated, or the process max RSS on CPU),
``peak_mem_kind`` and ``env``.

Data-parallel sharding (``shard_by="accelerate"``, automatic when ``WORLD_SIZE > 1`` as set by
``accelerate launch`` / ``torchrun``): batch ``j`` (of the single-process batching) goes to rank
``j % world`` (with ``batch_size: 1`` this is sample ``i % world == rank``); every rank appends to
the cell's predictions file (under the store's lock), then after ``wait_for_everyone()`` rank 0 scores
and puts the record. Because batches are the same as in a single process, a sharded sweep yields the
records of a single-process one. Launch with ``accelerate launch --multi_gpu --num_processes N -m
vtprune.eval.cli sweep CONFIG`` on GPUs; on CPU use ``torchrun --nproc_per_node N -m vtprune.eval.cli
sweep CONFIG`` (gloo; ``accelerate launch --cpu`` starts one process unless MPI is configured).
"""
from __future__ import annotations

from .config import BASELINES, Cell, SweepConfig, load_config, plan_cells
from .loop import CellFailure, CellsFailedError, describe_cell, run_sweep
from .measure import FLOPS_FIELDS, VOLATILE_FIELDS, comparable, environment
from .models import BUILTIN_MODELS, BuiltinModel, MissingAssetError, register_builtin
from .validate import SweepConfigError, validate_cells

__all__ = ["run_sweep", "load_config", "plan_cells", "comparable", "validate_cells", "SweepConfig", "Cell",
           "MissingAssetError", "SweepConfigError", "CellFailure", "CellsFailedError", "describe_cell",
           "VOLATILE_FIELDS", "FLOPS_FIELDS", "BUILTIN_MODELS", "BuiltinModel", "register_builtin", "BASELINES",
           "environment"]
