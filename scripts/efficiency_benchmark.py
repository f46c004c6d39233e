#!/usr/bin/env python
"""Efficiency benchmark: do the FLOPs that pruning saves turn into wall-clock savings? (issue #4)

Not a test: it prints numbers and verdicts, it asserts nothing.

Model: LLaVA-1.5 shape with random weights built from configs (no downloads): CLIP ViT-L/14-336
(1024 wide, 24 layers, 16 heads, MLP 4096, 576 visual tokens) + a Llama of ~1 B parameters (2048 wide,
16 layers, 16 heads, MLP 5632, vocab 32064), bf16, 1 thread on CPU. With a GPU the Vicuna-7B shape
(``--shape llava-1.5-7b``) is the default. Input: one 336 px image and a ~40-token question after a short
system text (byte-level tokenizer: one token per character).

Methods (those registered in ``vtprune.methods()``; the others are skipped with a note):
none, fastv (layer=2, keep 192/128/64), hiprune / visionzip / todre / pitome (keep 192/128/64; pitome in
its budget mode), transprune (its default schedule), and random:keep=64 as a selection-free reference.

Two interleaved passes of :func:`vtprune.profile` (methods round-robin inside each round):

1. prefill pass: ``generate(max_new_tokens=1)`` (vision + selection + prefill + first token), more rounds;
2. generate pass: ``generate(max_new_tokens=32)`` greedy (``min_new_tokens=32``), fewer rounds.

Columns (medians over rounds; definitions):

* FLOPs ratio   = F_method / F_none, F = primary LLM prefill FLOPs of the schedule that actually ran
                  (FLOPS.md §2, ``vtprune.count_flops``).
* speedup       = t_none / t_method (median over rounds of the paired ratio), t = measured LLM prefill
                  time (``model.model.language_model`` forward at prefill, vtprune's in-LLM hooks included).
* realization   = (t_none / t_method) / (F_none / F_method): the fraction of the FLOPs speedup that
                  became a wall-clock speedup (1.0 = FLOPs and time fall together).
* overhead %    = 100 * (select + signal + in-LLM hook time) / t_method: the method's own work (selection,
                  recomputed attention rows, in-encoder merging, in-LLM scoring) against the pruned
                  prefill. A method whose pruning layers are served the key rows its signals projected
                  before the cut (TransPrune; ``vtprune/reuse.py``) also runs in a third pass with
                  ``reuse_projections=False``, interleaved: the median paired difference of the layers'
                  own key-projection time (``key_proj_ms``) is work they no longer repeat, and its verdict
                  uses the overhead net of it (the serving itself stays counted in both). For a stage-V
                  method (merging inside the encoder, which shortens the encoder too) a line also gives
                  the overhead as a share of encoder + LLM prefill, for information.
* KV MiB        = KV cache at the end of prefill (FLOPS.md §5).
* generate(32)  = end-to-end ``generate()`` time for 32 new tokens; "generate vs none" is the median over
                  rounds of the paired ratio t_method / t_none (the monotonicity verdict uses it).

Peer columns (``eval/peers.py``; ``--no-peers`` skips them): for HiPrune, VisionZip, FastV, PiToMe and
TransPrune at keep 64 (TransPrune: its schedule) the same request run reference-style, the way the
authors' code runs it (eager attention in the scored stage, every attention map kept through
``output_attentions``), with the kept tokens verified equal to vtprune's (HiPrune and FastV also from the
peer's returned maps), TTFT, LLM prefill and peak memory side by side (paired rounds; CPU peak = sampled
resident set above the run's start). Then a batch of ``--next-batch`` (8) LLaVA-NeXT requests of 5 views
each (CLIP-L/336 tower; a 2-layer LLM, the part both pipelines share) for HiPrune and VisionZip at the
papers' NeXT budgets, where the kept maps dominate memory (24 layers x 16 heads x 577^2 per view).

Targets, reported (not asserted): realization >= 0.9 for stage-P methods at keep 64; overhead <= 2 % of
the pruned prefill; generate() time falls monotonically as the budget shrinks.

    python scripts/efficiency_benchmark.py              # ~10 min on a quiet 2-core CPU (estimate, see below)
    python scripts/efficiency_benchmark.py --quick      # fewer rounds, ~6 min
    python scripts/efficiency_benchmark.py --json out.json
    python scripts/efficiency_benchmark.py --from-json out.json   # re-render tables/verdicts, no measurement

Rounds (CPU defaults): prefill pass 1 warm-up + 2 timed, generate pass 2 timed (the prefill pass has warmed
every shape). On a GPU: 3 + 20 and 1 + 5 (FLOPS.md §7.3). One CPU run with ``--prefill-repeats 5
--generate-repeats 3`` took 25 min at load average 2-3 on the 2-core machine (per run ~7 s prefill-only,
~14 s generate(32)); the defaults cut the runs to 90 from 162, ~10 min on a quiet machine.

Speedups are paired: within each interleaved round, t_none / t_method, then the median over rounds. This
cancels most of the drift of a shared machine's load between rounds (which the per-method medians keep).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Sequence

import torch

SYSTEM = "A chat between a user and an AI assistant. "
QUESTION = "What objects are visible in this image and why?"  # 48 characters = 48 tokens
STAGE_P_TARGET_BUDGET = 64
#: peer columns (eval/peers.py): vtprune vs the reference-style pipeline of each method
PEER_SPECS = ["hiprune:keep=64", "visionzip:keep=64", "fastv:layer=2,keep=64", "pitome:keep=64", "transprune"]
#: the LLaVA-NeXT batch (paper budgets: HiPrune 640 per image, VisionZip its NeXT default)
NEXT_SPECS = ["hiprune", "visionzip"]


def _load() -> float:
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def _wait_for_quiet(max_load: float | None, retries: int, wait_s: float) -> None:
    if max_load is None:
        return
    for i in range(retries):
        la = _load()
        if la <= max_load:
            return
        print(f"# load average {la:.2f} > {max_load}: waiting {wait_s:.0f} s ({i + 1}/{retries})", flush=True)
        time.sleep(wait_s)
    print(f"# load average {_load():.2f}; running anyway", flush=True)


def _family_specs(budgets: Sequence[int]) -> dict[str, list[tuple[str, int | None]]]:
    """{family: [(spec, budget)]}: every method family the benchmark runs besides "none", in table order."""
    specs: dict[str, list[tuple[str, int | None]]] = {"fastv": [(f"fastv:layer=2,keep={b}", b) for b in budgets]}
    for name in ("hiprune", "visionzip", "todre", "pitome"):
        specs[name] = [(f"{name}:keep={b}", b) for b in budgets]
    specs["transprune"] = [("transprune", None)]
    specs["random"] = [(f"random:keep={STAGE_P_TARGET_BUDGET}", STAGE_P_TARGET_BUDGET)]
    return specs


METHOD_FAMILIES = tuple(_family_specs(()))


def _configs(budgets: list[int], families: Sequence[str] = METHOD_FAMILIES) -> tuple[list[tuple[str, str, int | None]], list[str]]:
    """[(family, spec, budget)] for the registered methods among ``families`` (and always "none");
    notes for the skipped ones."""
    import vtprune

    reg = vtprune.methods()
    out, notes = [], []
    for fam, pairs in [("none", [("none", None)])] + list(_family_specs(budgets).items()):
        if fam != "none" and fam not in families:
            continue
        if fam not in reg:
            notes.append(f"{fam}: not registered in vtprune.methods(), skipped")
            continue
        out.extend((fam, s, b) for s, b in pairs)
    return out, notes


def _validate(model, configs, notes):
    """Drop configs whose patch() already refuses the model (the rest fail, if at all, in the warm-up)."""
    import vtprune

    ok = []
    for fam, spec, b in configs:
        try:
            vtprune.patch(model, spec).remove()
        except ValueError as e:
            notes.append(f"{spec}: {e} (skipped)")
            continue
        ok.append((fam, spec, b))
    return ok


def _verdict(ok: bool | None) -> str:
    return "NOT MEASURED" if ok is None else "PASS" if ok else "FAIL"


def _fmt(x, f="{:.2f}"):
    return "-" if x is None or x != x else f.format(x)


def _median(xs):
    xs = sorted(x for x in xs if x is not None and x == x)
    if not xs:
        return None
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _by_round(d: dict, method: str, phase: str) -> dict[int, float]:
    """{round: value} of one phase of one method, from a ProfileResult dict (timed rounds only)."""
    rounds = [o["round"] for o in d["order"] if o["method"] == method and not o["warmup"]]
    samples = d["phases"][method][phase]["samples"]
    return dict(zip(rounds, samples)) if len(rounds) == len(samples) else {}


def _paired(d: dict, method: str, ref: str, phase: str):
    """Per-round ratios t_ref / t_method (both ran in the same interleaved round)."""
    a, b = _by_round(d, ref, phase), _by_round(d, method, phase)
    return [a[r] / b[r] for r in sorted(set(a) & set(b)) if b[r] > 0]


def _spec_info(spec: str) -> tuple[str, int | None, str]:
    from vtprune.registry import build, parse_spec

    (name, params), = parse_spec(spec)
    keep = params.get("keep")
    return name, (keep if isinstance(keep, int) else None), build(name, params).stage


def measure(args) -> dict:
    from vtprune.eval.profile import build_llava_shape, llava_inputs, profile

    torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    shape = args.shape or ("llava-1.5-7b" if gpu else "llava-1.5-1b")
    if gpu:  # FLOPS.md §7.3: >= 3 warm-up runs and >= 20 timed repeats on a GPU
        pre_warm, pre_rep, gen_warm, gen_rep = (1, 5, 1, 2) if args.quick else (3, 20, 1, 5)
    else:
        pre_warm, pre_rep, gen_warm, gen_rep = (1, 1, 0, 1) if args.quick else (1, 2, 0, 2)
    pre_rep = args.prefill_repeats or pre_rep
    gen_rep = args.generate_repeats or gen_rep

    _wait_for_quiet(args.max_load, args.load_retries, 180.0)
    t_start = time.time()
    model, proc = build_llava_shape(shape, device=device)
    inputs = llava_inputs(proc, QUESTION, system=SYSTEM).to(device)
    if args.peers_only:
        data = {"shape": shape, "notes": [], "command": " ".join(sys.argv), "loadavg": [_loadavg_line()]}
        return _peers(args, data, model, inputs, shape, device, gpu, t_start)
    n_params = sum(p.numel() for p in model.parameters())
    n_prompt = inputs["input_ids"].shape[1]
    n_vis = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"# {shape}: {n_params / 1e9:.2f} B random parameters, {next(model.parameters()).dtype}, {device}, "
          f"{torch.get_num_threads()} thread(s); prompt {n_prompt} tokens = {n_vis} visual + "
          f"{n_prompt - n_vis} text; built in {time.time() - t_start:.0f} s", flush=True)

    budgets = [b for b in args.budgets if b <= n_vis]
    configs, notes = _configs(budgets, args.methods)
    configs = _validate(model, configs, notes)
    specs = [s for _, s, _ in configs]
    say = (lambda m: print("  " + m, flush=True)) if args.verbose else None

    print(f"# pass 1 (prefill, generate(max_new_tokens=1)): {len(specs)} configs x ({pre_warm} warm-up + "
          f"{pre_rep}) rounds, interleaved", flush=True)
    pre = profile(model, inputs, specs, repeats=pre_rep, warmup=pre_warm, new_tokens=1, progress=say,
                  skip_errors=True)
    for spec, err in pre.skipped.items():
        notes.append(f"{spec}: failed in the run ({err}), skipped")
    specs = list(pre.methods)
    print(f"# pass 2 (generate(max_new_tokens={args.new_tokens})): {len(specs)} configs x ({gen_warm} warm-up + "
          f"{gen_rep}) rounds, interleaved", flush=True)
    gen = profile(model, inputs, specs, repeats=gen_rep, warmup=gen_warm, new_tokens=args.new_tokens,
                  progress=say, skip_errors=True)
    for spec, err in gen.skipped.items():
        notes.append(f"{spec}: failed in the generate pass ({err}), skipped")
    data = {"shape": shape, "notes": notes, "prefill_pass": pre.to_dict(), "generate_pass": gen.to_dict(),
            "command": " ".join(sys.argv), "loadavg": [_loadavg_line()]}
    served = [s for s in specs if pre.tokens[s].get("reused_key_rows")]
    if served:  # A/B: the pruning layers served their kept key rows (default) vs projecting them again
        ab = [m for s in served for m in (s, (s, {"reuse_projections": False}))]
        print(f"# pass 3 (prefill, served key projections on / off): {len(ab)} configs x ({pre_warm} warm-up + "
              f"{pre_rep + 2}) rounds, interleaved", flush=True)
        data["reuse_pass"] = profile(model, inputs, ab, repeats=pre_rep + 2, warmup=pre_warm, new_tokens=1,
                                     progress=say).to_dict()
    return _peers(args, data, model, inputs, shape, device, gpu, t_start)


def _peers(args, data, model, inputs, shape, device, gpu, t_start) -> dict:
    """The peer columns (one request at ``shape``) and the LLaVA-NeXT batch, added to ``data``."""
    import vtprune
    from vtprune.eval.peers import PeakMemory, build_llava_next_shape, next_batch_inputs, run_pairs

    notes = data["notes"]
    data["memory"] = PeakMemory(device).kind
    if not args.no_peers:
        peer_rounds = args.peer_rounds or (5 if gpu else 2)
        specs = [s for s in PEER_SPECS if s.split(":")[0] in vtprune.methods()]
        print(f"# peers (reference-style: eager attention, every map kept): {len(specs)} methods x {peer_rounds} "
              "paired rounds", flush=True)
        skipped: dict[str, str] = {}
        data["peers"] = run_pairs(model, inputs, specs, rounds=peer_rounds, progress=_say, skipped=skipped)
        notes.extend(f"peer {k}: {e} (skipped)" for k, e in skipped.items())
        data["loadavg"].append(_loadavg_line())
    data["seconds"] = time.time() - t_start
    if args.json:  # the LLaVA-1.5 part is safe on disk before the memory-heavy NeXT batch
        _write(args.json, data)
    if not args.no_peers and args.next_batch > 0:
        del model
        nxt, nproc = build_llava_next_shape(llm_layers=2, tiny=shape == "tiny", device=device)
        ninp = next_batch_inputs(nxt, nproc, args.next_batch)
        v = tuple(ninp["pixel_values"].shape[:2])
        next_specs = args.next_methods if shape != "tiny" else ["hiprune:keep=32", "fastv:layer=1,keep=32"]
        print(f"# LLaVA-NeXT batch: {v[0]} requests x {v[1]} views (CLIP ViT-L/14-336 tower, 2-layer 2048-wide LLM), "
              f"{next_specs}, {args.next_rounds} paired round(s)", flush=True)
        skipped = {}
        data["next_peers"] = run_pairs(nxt, ninp, next_specs, rounds=args.next_rounds, progress=_say, skipped=skipped)
        notes.extend(f"NeXT peer {k}: {e} (skipped)" for k, e in skipped.items())
        data["next_batch"] = list(v)
        data["loadavg"].append(_loadavg_line())
        data["seconds"] = time.time() - t_start
    return data


def _say(msg: str) -> None:
    print("  " + msg, flush=True)


def _loadavg_line() -> str:
    with open("/proc/loadavg") as f:
        return f.read().strip()


def _write(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)


def _print_peers(data: dict, verdicts: list) -> None:
    """The peer tables (vtprune vs reference-style) and their kept-tokens verdicts."""
    for key, title in (("peers", f"Peers on the {data.get('shape', '?')} shape (one request)"),
                       ("next_peers", "Peers on the LLaVA-NeXT batch (%s requests x %s views)" % tuple(
                           data.get("next_batch", ["?", "?"])))):
        if data.get(key):
            print()
            print(f"{title}: vtprune (SDPA, attention rows from the layers' own q/k) vs reference-style (eager, "
                  "every attention map kept: output_attentions)")
            print()
            print("| method | kept tokens equal | TTFT ms vtprune | TTFT ms peer | TTFT peer / vtprune | LLM prefill ms "
                  "vtprune | LLM prefill ms peer | prefill peer / vtprune | outside the LLM ms vtprune | outside the "
                  "LLM ms peer | outside peer / vtprune | peak MiB vtprune | peak MiB peer | peak peer / vtprune |")
            print("|" + "---|" * 14)
            for spec, r in data[key].items():
                mem_ratio = r["peer_peak_mib"] / r["vtprune_peak_mib"] if r["vtprune_peak_mib"] >= 1 else float("nan")
                diff = r.get("kept_diff")
                eq = "yes" if r["kept_equal"] else ("NO" + (f", {diff[0]} of {diff[1]} differ" if diff else ""))
                print(f"| {spec} | {eq} ({'; '.join(c + (': yes' if ok else ': no') for c, ok in r['checks'])}) | "
                      f"{r['vtprune_ttft_ms']:.0f} | {r['peer_ttft_ms']:.0f} | {r['ttft_ms_ratio']:.3f} | "
                      f"{r['vtprune_prefill_ms']:.0f} | {r['peer_prefill_ms']:.0f} | {r['prefill_ms_ratio']:.3f} | "
                      f"{_fmt(r.get('vtprune_outside_llm_ms'), '{:.0f}')} | {_fmt(r.get('peer_outside_llm_ms'), '{:.0f}')} | "
                      f"{_fmt(r.get('outside_llm_ms_ratio'), '{:.3f}')} | "
                      f"{r['vtprune_peak_mib']:.0f} | {r['peer_peak_mib']:.0f} | {_fmt(mem_ratio, '{:.1f}')} |")
            bad = [s for s, r in data[key].items() if not r["kept_equal"]]
            verdicts.append((f"peers keep the same tokens ({key})", not bad, ", ".join(bad) or "all equal"))
    if data.get("memory"):
        print(f"peak memory: {data['memory']}, MiB above the run's start (median over rounds)")


def report(data: dict) -> dict:
    """Derived rows, fit and verdicts from the two passes (ProfileResult dicts); prints the tables."""
    if "prefill_pass" not in data:  # --peers-only
        verdicts: list = []
        _print_peers(data, verdicts)
        print()
        for name, ok, detail in verdicts:
            print(f"TARGET {name}: {_verdict(ok)} -- {detail}")
        for n in data["notes"]:
            print(f"NOTE {n}")
        print(f"# the CPU is shared with other jobs; /proc/loadavg: {' | '.join(data.get('loadavg', []))}")
        return {"verdicts": [{"target": n, "pass": ok, "detail": d} for n, ok, d in verdicts]}
    pre, gen, notes = data["prefill_pass"], data["generate_pass"], list(data["notes"])
    new_tokens = gen["settings"]["new_tokens"]
    f0 = pre["flops"]["none"]["llm_prefill_tflops"]
    t0 = pre["phases"]["none"]["prefill_ms"]["median"]
    rows = []
    for s in pre["methods"]:
        fam, b, stage = _spec_info(s)
        fl = pre["flops"][s]
        ph = pre["phases"][s]
        t = ph["prefill_ms"]["median"]
        ratio = fl["llm_prefill_tflops"] / f0
        sp = _paired(pre, s, "none", "prefill_ms")
        speed = _median(sp)
        over = ph["overhead_ms"]["median"]
        g = gen["phases"].get(s)
        gr = [1.0 / x for x in _paired(gen, s, "none", "generate_ms")] if g else []
        rows.append({
            "method": fam, "spec": s, "stage": stage, "budget": b,
            "visual_tokens_at_llm": pre["tokens"][s]["visual_tokens_per_image"],
            "eq_visual_tokens": fl["eq_visual_tokens"],
            "llm_prefill_tflops": fl["llm_prefill_tflops"],
            "flops_ratio": ratio,
            "vision_ms": ph["vision_ms"]["median"],
            "prefill_ms": t, "prefill_ms_p10": ph["prefill_ms"]["p10"], "prefill_ms_p90": ph["prefill_ms"]["p90"],
            "speedup": speed, "speedup_per_round": sp,
            "realization": speed * ratio if speed else None,  # (t_none / t) / (F_none / F)
            "overhead_ms": over,
            "overhead_pct": 100.0 * over / t,
            "ttft_ms": ph["ttft_ms"]["median"],
            "kv_mib": fl["kv_mib"],
            "decode_ms_per_token": g["decode_ms_per_token"]["median"] if g else None,
            "generate_ms": g["generate_ms"]["median"] if g else None,
            "generate_ms_p10": g["generate_ms"]["p10"] if g else None,
            "generate_ms_p90": g["generate_ms"]["p90"] if g else None,
            "generate_vs_none": _median(gr), "generate_vs_none_per_round": gr,
        })

    print()
    print(f"| method | stage | visual @LLM (eq.) | LLM prefill TFLOPs | FLOPs ratio | prefill ms [p10, p90] | "
          f"speedup | realization | overhead ms (% of prefill) | KV MiB | vision ms | TTFT ms | decode ms/tok | "
          f"generate({new_tokens}) ms [p10, p90] | generate vs none |")
    print("|" + "---|" * 15)
    for r in rows:
        print(f"| {r['spec']} | {r['stage']} | {r['visual_tokens_at_llm'][0]} ({r['eq_visual_tokens']:.0f}) | "
              f"{r['llm_prefill_tflops']:.3f} | {r['flops_ratio']:.3f} | "
              f"{r['prefill_ms']:.0f} [{r['prefill_ms_p10']:.0f}, {r['prefill_ms_p90']:.0f}] | "
              f"{_fmt(r['speedup'])} | {_fmt(r['realization'])} | {r['overhead_ms']:.1f} ({r['overhead_pct']:.2f} %) | "
              f"{r['kv_mib']:.1f} | {r['vision_ms']:.0f} | {r['ttft_ms']:.0f} | "
              f"{_fmt(r['decode_ms_per_token'], '{:.0f}')} | {_fmt(r['generate_ms'], '{:.0f}')} "
              f"[{_fmt(r['generate_ms_p10'], '{:.0f}')}, {_fmt(r['generate_ms_p90'], '{:.0f}')}] | "
              f"{_fmt(r['generate_vs_none'], '{:.3f}')} |")
    reuse = data.get("reuse_pass")
    for r in rows:  # overhead net of the key projections the pruning layers were served (measured A/B)
        off = f"{r['spec']} [reuse_projections=False]"
        if not reuse or off not in reuse["methods"]:
            continue
        a, b = _by_round(reuse, r["spec"], "key_proj_ms"), _by_round(reuse, off, "key_proj_ms")
        saved = _median([b[k] - a[k] for k in sorted(set(a) & set(b))])
        r["served_key_rows"] = reuse["tokens"][r["spec"]]["reused_key_rows"]
        r["served_saving_ms"] = saved
        r["overhead_net_ms"] = r["overhead_ms"] - saved
        r["overhead_net_pct"] = 100.0 * r["overhead_net_ms"] / r["prefill_ms"]
    print()
    print("speedup = median over rounds of t_none / t_method (paired within each interleaved round; t = LLM prefill "
          "time); realization = (t_none / t_method) / (F_none / F_method), F = primary LLM prefill FLOPs; overhead = "
          "select + signal + in-LLM hook time, as % of the method's own LLM prefill; generate vs none = median over "
          "rounds of t_method / t_none for generate()")
    for r in rows:
        if "overhead_net_ms" in r:
            ph = reuse["phases"]
            off = f"{r['spec']} [reuse_projections=False]"
            print(f"{r['spec']}: its pruning layers were served {r['served_key_rows']} key-projection rows computed by "
                  f"its signals before the cut; the layers' own key projections took "
                  f"{ph[r['spec']]['key_proj_ms']['median']:.1f} ms served vs {ph[off]['key_proj_ms']['median']:.1f} ms "
                  f"projecting them again (pass 3, median paired difference {r['served_saving_ms']:.1f} ms; LLM prefill "
                  f"{ph[r['spec']]['prefill_ms']['median']:.0f} vs {ph[off]['prefill_ms']['median']:.0f} ms): "
                  f"overhead net of that work {r['overhead_net_ms']:.1f} ms ({r['overhead_net_pct']:.2f} % of the prefill)")
    stage_v = [r for r in rows if r["stage"] == "V"]
    for r in stage_v:  # merging inside the encoder shortens the encoder too: the share of both, for information
        r["overhead_pct_of_vision_and_prefill"] = 100.0 * r["overhead_ms"] / (r["vision_ms"] + r["prefill_ms"])
    if stage_v:
        print("stage V (merging between encoder layers, which shortens the encoder as well): overhead as a share of "
              "encoder + LLM prefill, for information (the verdict keeps the LLM prefill): "
              + "; ".join(f"{r['spec']} {r['overhead_pct_of_vision_and_prefill']:.2f} %" for r in stage_v))

    # ---------------------------------------------------------------------------------- diagnosis
    # Least-squares fit over none and the pre-LLM (stage P / V) configs of the paired time ratio
    # t_method / t_none = a + b * (F_method / F_none). a is the fraction of the unpruned prefill that does not
    # shrink with the FLOPs (weights streamed once per forward, per-layer fixed costs, hooks); with a > 0 the
    # realization at FLOPs ratio r is 1 / (a / r + b) < 1. a = 0, b = 1: time proportional to FLOPs.
    pts = [(r["flops_ratio"], 1.0 / r["speedup"]) for r in rows if r["stage"] in ("P", "V") and r["speedup"]]
    fit = None
    if len(pts) >= 3:
        mx = sum(x for x, _ in pts) / len(pts)
        my = sum(y for _, y in pts) / len(pts)
        sxx = sum((x - mx) ** 2 for x, _ in pts)
        if sxx > 0:
            b = sum((x - mx) * (y - my) for x, y in pts) / sxx
            a = my - b * mx
            res = [y - (a + b * x) for x, y in pts]
            fit = {"fixed_fraction": a, "slope": b, "fixed_ms": a * t0, "max_abs_residual": max(abs(e) for e in res),
                   "points": len(pts)}
            print(f"fit over {len(pts)} pre-LLM configs: t_method / t_none = {a:.3f} + {b:.3f} x F_method / F_none "
                  f"(max |residual| {fit['max_abs_residual']:.3f}): a fixed part of {100 * a:.1f} % of the unpruned "
                  f"LLM prefill (~{a * t0:.0f} ms). Decode per token (none): "
                  f"{_fmt(rows[0]['decode_ms_per_token'], '{:.0f}')} ms")

    # ---------------------------------------------------------------------------------- verdicts
    verdicts = []
    p64 = [r for r in rows if r["stage"] == "P" and r["budget"] == STAGE_P_TARGET_BUDGET]
    bad = [r for r in p64 if r["realization"] is None or r["realization"] < 0.9]
    verdicts.append(("realization >= 0.9 for stage-P methods at keep 64", (not bad) if p64 else None,
                     "; ".join(f"{r['spec']} {_fmt(r['realization'])}" for r in p64) if p64 else
                     f"no stage-P method at keep {STAGE_P_TARGET_BUDGET} in this run (--methods)"))
    pruned = [r for r in rows if r["spec"] != "none"]
    pct = lambda r: r.get("overhead_net_pct", r["overhead_pct"])  # noqa: E731  (net of served work where measured)
    bad = [r for r in pruned if pct(r) > 2.0]
    worst = max(pruned, key=pct) if pruned else None
    net = lambda r: " (net)" if "overhead_net_pct" in r else ""  # noqa: E731
    verdicts.append(("selection overhead <= 2 % of the pruned prefill", not bad,
                     ("over: " + "; ".join(f"{r['spec']} {pct(r):.2f} %{net(r)}" for r in bad)) if bad else
                     (f"max {worst['spec']} {pct(worst):.2f} %{net(worst)}" if worst else "")))
    mono_detail, mono_ok = [], True
    for fam in dict.fromkeys(r["method"] for r in rows if r["method"] not in ("none", "random")):
        seq = sorted((r for r in rows if r["method"] == fam), key=lambda r: -(r["budget"] or r["eq_visual_tokens"]))
        rel = [1.0] + [r["generate_vs_none"] for r in seq]
        ms = [rows[0]["generate_ms"]] + [r["generate_ms"] for r in seq]
        ok = all(a is not None and b is not None and a > b for a, b in zip(rel, rel[1:]))
        mono_ok &= ok
        mono_detail.append(f"{fam} {'ok' if ok else 'NOT monotonic'} (" + " > ".join(_fmt(x, "{:.3f}") for x in rel)
                           + " of none; medians " + " > ".join(_fmt(x, "{:.0f}") for x in ms) + " ms)")
    verdicts.append((f"generate({new_tokens}) time falls monotonically with the budget (none > 192 > 128 > 64)",
                     mono_ok, "; ".join(mono_detail)))
    _print_peers(data, verdicts)
    print()
    for name, ok, detail in verdicts:
        print(f"TARGET {name}: {_verdict(ok)} -- {detail}")
    for n in notes:
        print(f"NOTE {n}")
    env, ps, gs = pre["environment"], pre["settings"], gen["settings"]
    print(f"# environment: {env['device']}, {env['dtype']}, {env['threads']} thread(s), attn={env['attn_implementation']}, "
          f"torch {env['torch']}, transformers {env['transformers']}; loadavg before pass 1 {env['loadavg_before']}, "
          f"after pass 2 {gen['environment'].get('loadavg_after')}; prefill pass {ps['warmup']}+{ps['repeats']} rounds, "
          f"generate pass {gs['warmup']}+{gs['repeats']} rounds"
          + (f"; total {data['seconds']:.0f} s" if data.get("seconds") else ""))
    if data.get("loadavg"):
        print(f"# the CPU is shared with other jobs (ratios are paired within this run); /proc/loadavg after the passes, "
              f"the peers, the NeXT batch: {' | '.join(data['loadavg'])}")
    return {"rows": rows, "prefill_fit": fit,
            "verdicts": [{"target": n, "pass": ok, "detail": d} for n, ok, d in verdicts]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (CPU: prefill 1+1, generate 0+1)")
    ap.add_argument("--json", metavar="OUT", default=None, help="write every number as JSON")
    ap.add_argument("--from-json", metavar="IN", default=None,
                    help="no measurement: recompute the tables and verdicts from a JSON written by --json")
    ap.add_argument("--shape", default=None, choices=["llava-1.5-1b", "llava-1.5-7b", "tiny"],
                    help="default: llava-1.5-7b with a GPU, llava-1.5-1b on CPU")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--prefill-repeats", type=int, default=None, help="timed rounds of pass 1 (CPU default 2)")
    ap.add_argument("--generate-repeats", type=int, default=None, help="timed rounds of pass 2 (CPU default 2)")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_FAMILIES), choices=METHOD_FAMILIES, metavar="METHOD",
                    help=f"method families to run besides none (default all: {' '.join(METHOD_FAMILIES)})")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-load", type=float, default=None,
                    help="wait (up to --load-retries x 180 s) until the 1-min load average is below this")
    ap.add_argument("--load-retries", type=int, default=3)
    ap.add_argument("--no-peers", action="store_true", help="skip the reference-style peer columns (eval/peers.py)")
    ap.add_argument("--peers-only", action="store_true", help="only the peer columns and the NeXT batch")
    ap.add_argument("--peer-rounds", type=int, default=None, help="paired rounds per peer (CPU default 2, GPU 5)")
    ap.add_argument("--next-batch", type=int, default=8, help="LLaVA-NeXT requests (5 views each) for the peer "
                    "memory comparison; 0 skips it")
    ap.add_argument("--next-rounds", type=int, default=1, help="paired rounds of the NeXT batch")
    ap.add_argument("--next-methods", nargs="+", default=NEXT_SPECS, help=f"methods of the NeXT batch (default {NEXT_SPECS})")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run")
    args = ap.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
        print(f"# re-rendered from {args.from_json} (measured with: {data.get('command', '?')})")
    else:
        data = measure(args)
    derived = report(data)
    if args.json:
        out = {k: v for k, v in data.items() if k in ("shape", "notes", "prefill_pass", "generate_pass", "seconds",
                                                      "command", "peers", "next_peers", "next_batch", "loadavg",
                                                      "memory", "reuse_pass")}
        out.update(derived)
        _write(args.json, out)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
