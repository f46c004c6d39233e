"""The vtprune command line.

  vtprune methods [NAME]      the registered methods (a table), or one method's parameters and paper
  vtprune demo                patched generate() on a tiny random model of one family, every baseline
  vtprune bench               interleaved latency / memory / FLOPs profile of methods
  vtprune sweep CONFIG.yaml   models x methods x budgets x benchmarks into a resumable results store
  vtprune report RESULTS.jsonl --out DIR   markdown/CSV tables and accuracy-vs-FLOPs plots

Nothing here downloads weights; torch and transformers are imported only by the command that runs.
"""
from __future__ import annotations

import argparse
import sys
import time

#: vtprune.policy.FAMILIES, spelled out so that the CLI imports no torch before a command runs
FAMILIES = ["llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "llava_onevision", "llava_onevision1_5", "qwen3_vl",
            "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe"]

#: demo budgets are fractions, valid for every family's tiny model (4 to 70 visual tokens per image)
DEMO_METHODS = ["none", "random:keep=0.5", "pool:keep=0.25", "fastv:layer=2,keep=0.5",
                "random:keep=0.5 + fastv:layer=2,keep=0.5"]


def _cmd_methods(args) -> int:
    from vtprune.eval.method_info import all_methods, format_detail, format_table

    infos = all_methods()
    if args.name is None:
        print(format_table(infos))
        print("\nvtprune methods NAME: every parameter with its type and default, and the paper")
        return 0
    by_name = {i.name: i for i in infos}
    if args.name not in by_name:
        print(f"vtprune methods: error: unknown method {args.name!r}; registered: {', '.join(by_name)}",
              file=sys.stderr)
        return 2
    print(format_detail(by_name[args.name]))
    return 0


def _cmd_demo(args) -> int:
    import torch

    import vtprune
    from vtprune.testing import BUILDERS, make_inputs, tiny_images

    torch.set_num_threads(1)
    model, proc = BUILDERS[args.family]()
    sizes = None if args.family == "llava" else [(56, 56), (70, 112)]
    inputs = make_inputs(args.family, proc, ["what is in the picture?", "how many objects?"], tiny_images(2, sizes=sizes))
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
    w = max(len(s) for s in args.methods + ["method"])
    print(f"tiny random {args.family} (no downloads), batch of 2 with left padding, {args.new_tokens} new tokens")
    print(f"{'method':{w}s}  {'visual/img':>10s}  {'LLM tokens per layer (sample 0)':>34s}  {'same ids as vanilla':>19s}  "
          f"{'ms':>7s}")
    for spec in args.methods:
        try:
            handle = vtprune.patch(model, spec, seed=0)
        except ValueError as exc:
            print(f"vtprune demo: error: {spec}: {exc}", file=sys.stderr)
            return 2
        with handle as h:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            ms = (time.perf_counter() - t0) * 1e3
            st = h.stats
        same = torch.equal(out, ref) if out.shape == ref.shape else False
        print(f"{spec:{w}s}  {str(st.visual_tokens_per_image):>10s}  {str(st.schedules[0].llm_tokens_per_layer):>34s}  "
              f"{str(same):>19s}  {ms:7.1f}")
    return 0


_BENCH_DEFAULTS = {
    "llava": ["none", "fastv:layer=2,keep=64", "random:keep=64"],
    "other": ["none", "fastv:layer=2,keep=0.5", "random:keep=0.5"],
}


def _cmd_bench(args) -> int:
    import torch

    from vtprune.eval.profile import build_llava_shape, llava_inputs, profile

    torch.set_num_threads(args.threads)
    if args.family == "llava":
        model, proc = build_llava_shape(args.shape, seed=args.seed)
        question = args.question or ("What objects are visible in this image?" if args.shape != "tiny"
                                     else "what is in the picture?")
        inputs = llava_inputs(proc, question, seed=args.seed)
    else:
        if args.shape != "tiny":
            parser_error = f"--shape {args.shape} exists for --family llava only"
            print(parser_error, file=sys.stderr)
            return 2
        from vtprune.testing import BUILDERS, make_inputs, tiny_images

        model, proc = BUILDERS[args.family]()
        sizes = None if args.family == "llava" else [(56, 56)]
        inputs = make_inputs(args.family, proc, [args.question or "what is in the picture?"], tiny_images(1, sizes=sizes))
    methods = args.methods or _BENCH_DEFAULTS["llava" if args.family == "llava" else "other"]
    say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if args.verbose else None
    res = profile(model, inputs, methods, repeats=args.repeats, warmup=args.warmup, new_tokens=args.new_tokens,
                  seed=args.seed, progress=say)
    shape = args.shape if args.family == "llava" else "tiny"
    print(f"vtprune bench: random-weights {args.family} ({shape}), interleaved methods, no downloads")
    print(res.to_table())
    if args.json:
        res.to_json(args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_sweep(args) -> int:
    import os

    import torch

    from vtprune.eval.sweep import CellsFailedError, MissingAssetError, load_config, run_sweep
    from vtprune.eval.sweep.variables import parse_overrides

    if args.threads:
        torch.set_num_threads(args.threads)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    store = args.store
    try:
        variables = parse_overrides(args.set)
        cfg = load_config(args.config, variables, allow_unset=True)
        store = store or cfg.store or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0],
                                                   "results.jsonl")
        records = run_sweep(args.config, store, limit=args.limit, shard_by=args.shard_by, progress=not args.no_progress,
                            variables=variables)
    except (ValueError, FileNotFoundError, MissingAssetError) as exc:
        print(f"vtprune sweep: error: {exc}", file=sys.stderr)
        return 2
    except CellsFailedError as exc:
        if main_rank:
            print(f"vtprune sweep: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if main_rank:
            print(f"\nvtprune sweep: interrupted; the finished cells and the predictions made so far are kept in "
                  f"{store}; run the same command to resume.", file=sys.stderr)
        return 130
    if main_rank:
        ok = sum(1 for r in records if r and r.get("status") == "ok")
        print(f"vtprune sweep: {len(records)} cells ({ok} scored) in {store}; "
              f"next: vtprune report {store} --out {os.path.join(os.path.dirname(store) or '.', 'report')}")
    return 0


def _cmd_report(args) -> int:
    from vtprune.eval.report import make_report

    try:
        paths = make_report(args.results, args.out, config=args.config, x=args.x)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vtprune report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {paths['markdown']}, {paths['csv']} and {len(paths['plots'])} plot(s) in {args.out}")
    return 0


def _version() -> str:
    import platform

    from vtprune import __version__

    return f"vtprune {__version__} (Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("methods", help="the registered methods, or one method's parameters",
                       description="Without NAME: a table of every registered method (stage, model families, main "
                                   "parameters with their defaults, description). With NAME: every parameter with "
                                   "its type and default, and the paper.")
    p.add_argument("name", nargs="?", default=None, metavar="NAME", help="a registered method, e.g. fastv")
    p.set_defaults(fn=_cmd_methods)

    p = sub.add_parser("demo", help="patched generate() on a tiny random model (no downloads)",
                       description="Builds a tiny random model of one family, generates for a batch of two "
                                   "images with left padding, once unpatched and once per method, and prints the "
                                   "kept tokens and whether the output equals the unpatched one (it should for "
                                   "'none'). Answers are noise: the weights are random.")
    p.add_argument("--family", default="llava", choices=FAMILIES, help="model family (default: llava)")
    p.add_argument("--new-tokens", type=int, default=10, metavar="N", help="tokens to generate (default: 10)")
    p.add_argument("--methods", nargs="+", default=DEMO_METHODS, metavar="SPEC",
                   help="method specs, e.g. 'fastv:layer=2,keep=0.5'; '+' composes; keep as a fraction works "
                        "on every family (default: " + ", ".join(DEMO_METHODS) + ")")
    p.set_defaults(fn=_cmd_demo)

    p = sub.add_parser("bench", help="interleaved latency / memory / FLOPs profile on a random-weights model",
                       description="Profiles patched generate() calls of several methods, interleaved round-robin "
                                   "with warm-up and repeats (median, p10, p90), on a random-weights model: vision, "
                                   "selection, LLM prefill, decode per token, end to end, peak memory, FLOPs.")
    p.add_argument("--family", default="llava", choices=FAMILIES, help="model family (default: llava)")
    p.add_argument("--shape", default="tiny", choices=["tiny", "llava-1.5-1b", "llava-1.5-7b"],
                   help="model shape, llava only: tiny (256 visual tokens), or LLaVA-1.5 shapes with random weights")
    p.add_argument("--methods", nargs="+", default=None, metavar="SPEC",
                   help="method specs (default: none, fastv:layer=2,keep=64, random:keep=64; fractions off llava)")
    p.add_argument("--repeats", type=int, default=5, metavar="N", help="measured rounds per method (default: 5)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="unmeasured rounds first (default: 2)")
    p.add_argument("--new-tokens", type=int, default=8, metavar="N", help="tokens per generate() (default: 8)")
    p.add_argument("--seed", type=int, default=0, help="weights, image and patch seed (default: 0)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="torch CPU threads (default: 1)")
    p.add_argument("--question", default=None, help="the prompt's question (default: a short fixed one)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run to stderr")
    p.set_defaults(fn=_cmd_bench)

    p = sub.add_parser("sweep", help="run or resume a sweep (models x methods x budgets x benchmarks)",
                       description="Runs every cell of CONFIG into a resumable results store. Every (model, "
                                   "method, budget) is checked against its model before the first cell runs "
                                   "(exit 2, nothing stored, on a problem). A cell that fails is reported and the "
                                   "others still run (exit 1 at the end); rerunning the same command resumes and "
                                   "retries only what is missing. Several sweeps may share one store.")
    p.add_argument("config", help="sweep config (YAML; format: python -c 'import vtprune.eval.sweep as s; help(s)')")
    p.add_argument("--store", default=None,
                   help="results JSONL (default: the config's store, else runs/CONFIG-NAME/results.jsonl)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="first N samples of each benchmark")
    p.add_argument("--shard-by", default="auto", choices=["auto", "accelerate", "none"],
                   help="data-parallel shards through accelerate (auto: when launched with WORLD_SIZE > 1)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--set", action="append", default=None, metavar="NAME=VALUE",
                   help="value of a ${NAME} in the config, e.g. --set MODELS=/data/models (repeatable; overrides the "
                        "environment variable of the same name)")
    p.set_defaults(fn=_cmd_sweep)

    p = sub.add_parser("report", help="tables and accuracy-vs-FLOPs plots of a results store",
                       description="Writes results.md (per model: a table with n per cell, the ranking, accuracy "
                                   "by question type), results.csv, by_type.csv and one accuracy-vs-FLOPs plot per "
                                   "model x benchmark from a results store. When the sweep's config carries published "
                                   "numbers (a 'published' block, saved next to the store by the sweep, or "
                                   "--config), adds them beside the measured ones with the difference and a "
                                   "measured-vs-published plot.")
    p.add_argument("results", help="results JSONL written by vtprune sweep")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--config", default=None, help="a sweep config whose 'published' block to compare with (default: "
                                                  "the blocks the sweep saved next to RESULTS)")
    p.add_argument("--x", choices=("llm", "total"), default="llm",
                   help="x axis of the plots: llm = LLM prefill FLOPs as a fraction of the vanilla run (default, the "
                        "papers' convention); total = total prefill TFLOPs per sample (vision + projector + LLM)")
    p.set_defaults(fn=_cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
