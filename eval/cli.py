"""The ``vtprune`` command line.

    vtprune methods            list the registered methods
    vtprune demo               patch a tiny random model (--family) and generate with every baseline method
    vtprune bench              interleaved latency / memory / FLOPs profile of methods (vtprune.profile)
    vtprune sweep CONFIG.yaml  models x methods x budgets x benchmarks into a resumable results store
    vtprune report RESULTS.jsonl --out DIR   markdown/CSV tables and accuracy-vs-FLOPs plots
"""
from __future__ import annotations

import argparse
import sys
import time

from vtprune.testing import FAMILIES


def _cmd_methods(args) -> int:
    import vtprune

    for name, desc in vtprune.methods().items():
        print(f"{name:14s} {desc}")
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
    print(f"tiny random {args.family} (no downloads), batch of 2 with left padding, {args.new_tokens} new tokens")
    print(f"{'method':34s} {'visual/img':>10s} {'LLM tokens per layer (sample 0)':>34s} {'same ids as vanilla':>20s} {'ms':>7s}")
    methods = args.methods or _DEMO_DEFAULTS["llava" if args.family == "llava" else "other"]
    for spec in methods:
        with vtprune.patch(model, spec, seed=0) as h:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=args.new_tokens, do_sample=False)
            ms = (time.perf_counter() - t0) * 1e3
            st = h.stats
        same = torch.equal(out, ref) if out.shape == ref.shape else False
        print(f"{spec:34s} {str(st.visual_tokens_per_image):>10s} {str(st.schedules[0].llm_tokens_per_layer):>34s} "
              f"{str(same):>20s} {ms:7.1f}")
    return 0


# LLaVA-1.5 has 16 tokens per tiny image; the dynamic-resolution families 4 to 12, hence fractions
_DEMO_DEFAULTS = {
    "llava": ["none", "random:keep=8", "pool:keep=4", "fastv:layer=2,keep=0.5", "random:keep=8 + fastv:layer=2,keep=0.5"],
    "other": ["none", "random:keep=0.5", "pool:keep=0.25", "fastv:layer=2,keep=0.5",
              "random:keep=0.5 + fastv:layer=2,keep=0.5"],
}

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

    from vtprune.eval.sweep import MissingAssetError, load_config, run_sweep

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config)
        store = args.store or cfg.store or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0],
                                                        "results.jsonl")
        records = run_sweep(args.config, store, limit=args.limit, shard_by=args.shard_by, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, MissingAssetError) as exc:
        print(f"vtprune sweep: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        ok = sum(1 for r in records if r and r.get("status") == "ok")
        print(f"vtprune sweep: {len(records)} cells ({ok} scored) in {store}; "
              f"next: vtprune report {store} --out {os.path.join(os.path.dirname(store) or '.', 'report')}")
    return 0


def _cmd_report(args) -> int:
    from vtprune.eval.report import make_report

    try:
        paths = make_report(args.results, args.out)
    except (ValueError, FileNotFoundError) as exc:
        print(f"vtprune report: error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {paths['markdown']}, {paths['csv']} and {len(paths['plots'])} plot(s) in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("methods", help="list registered methods")
    p.set_defaults(fn=_cmd_methods)
    p = sub.add_parser("demo", help="patched generate() on a tiny random model (no downloads)")
    p.add_argument("--family", default="llava", choices=list(FAMILIES))
    p.add_argument("--new-tokens", type=int, default=10)
    p.add_argument("--methods", nargs="+", default=None,
                   help="method specs (default: none, random, pool, fastv and random + fastv at budgets fit for the family)")
    p.set_defaults(fn=_cmd_demo)
    p = sub.add_parser("bench", help="interleaved latency/memory/FLOPs profile on a random-weights model")
    p.add_argument("--family", default="llava", choices=list(FAMILIES))
    p.add_argument("--shape", default="tiny", choices=["tiny", "llava-1.5-1b", "llava-1.5-7b"],
                   help="model shape (llava only): tiny (256 visual tokens), or LLaVA-1.5 shapes with random weights")
    p.add_argument("--methods", nargs="+", default=None,
                   help="method specs (default: none, fastv:layer=2,keep=64, random:keep=64; fractions off llava)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--question", default=None)
    p.add_argument("--json", default=None, metavar="OUT", help="also write the full result as JSON")
    p.add_argument("-v", "--verbose", action="store_true", help="print each run to stderr")
    p.set_defaults(fn=_cmd_bench)
    p = sub.add_parser("sweep", help="run or resume a sweep (models x methods x budgets x benchmarks)")
    p.add_argument("config", help="sweep config (YAML; see vtprune.eval.sweep)")
    p.add_argument("--store", default=None, help="results JSONL (default: the config's `store`, else runs/<config>/results.jsonl)")
    p.add_argument("--limit", type=int, default=None, help="first N samples of each benchmark")
    p.add_argument("--shard-by", default="auto", choices=["auto", "accelerate", "none"],
                   help="data-parallel shards through accelerate (auto: when launched with WORLD_SIZE > 1)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    p.set_defaults(fn=_cmd_sweep)
    p = sub.add_parser("report", help="tables and accuracy-vs-FLOPs plots of a results store")
    p.add_argument("results", help="results JSONL written by `vtprune sweep`")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(fn=_cmd_report)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
