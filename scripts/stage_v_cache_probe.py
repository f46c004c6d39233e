#!/usr/bin/env python
"""Why a stage-V method's merging costs more between encoder layers than on its own (issue #13).

Not a test: it prints times side by side, it asserts nothing.

PiToMe merges after every CLIP layer. Its 23 ``after_layer`` calls take longer inside the encoder than
the same calls replayed back to back on the same inputs. This script separates the causes on the
LLaVA-1.5 shape (random weights, bf16, 1 thread on CPU):

1. ``in situ``: the calls as ``generate()`` makes them (a CLIP layer between two calls), with the minor
   page faults taken inside them (``getrusage``: fresh memory the calls touch for the first time);
2. ``replay``: the captured inputs of those calls, replayed back to back (caches warm);
3. ``replay, caches flushed``: before each call, a read of a buffer larger than the last-level cache;
4. ``replay, flushed, kernels re-run``: after the flush, the same policy steps on a tiny input (the code
   and the interpreter's objects are warm again, the large tensors are not).

If (3) is close to (1) the in-situ cost is cache refills; if (4) is close to (2) those refills are the
code path (libtorch kernels, dispatcher, Python), not the tensors' data.

Then the similarity products of the same calls alone, back to back, in fp32 (what PiToMe computes) and
in bf16 (what it would cost to score in bf16): the BSM layers' strided half products and the PiToMe
layers' full T x T products, summed over the calls; and whether bf16 products would give the PiToMe
layers the same energy order.

    python scripts/stage_v_cache_probe.py               # keep 64, ~2 min on a quiet 2-core CPU
    python scripts/stage_v_cache_probe.py --keep 192 --rounds 7
    python scripts/stage_v_cache_probe.py --shape tiny --keep 128 --rounds 1   # a smoke run in seconds
"""
from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import vtprune
from vtprune.eval.profile import build_llava_shape, llava_inputs
from vtprune.methods.pitome import PiToMe, energy_scores
from vtprune.policy import Context

QUESTION = "What objects are visible in this image and why?"
SYSTEM = "A chat between a user and an AI assistant. "


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llava-1.5-1b", choices=["llava-1.5-1b", "tiny"])
    ap.add_argument("--keep", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds of each variant (after one warm-up)")
    ap.add_argument("--flush-mib", type=int, default=64, help="size of the buffer read to flush the caches")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, proc = build_llava_shape(args.shape)
    inputs = llava_inputs(proc, QUESTION, system=SYSTEM)
    policy = PiToMe(keep=args.keep)
    own = PiToMe.after_layer
    calls: list[tuple[int, torch.Tensor]] = []
    towers = []
    spent = [0.0, 0]  # seconds, minor page faults inside the calls

    def timed(layer, x, ctx, record=False):
        if record:
            calls.append((layer, x.clone()))
            towers.append(ctx.vit)
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = time.perf_counter()
        out = own(policy, layer, x, ctx)
        spent[0] += time.perf_counter() - t
        spent[1] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        return out

    in_situ, in_situ_faults = [], []
    for i in range(args.rounds + 1):
        spent[0], spent[1] = 0.0, 0
        record = i == 0
        policy.after_layer = lambda layer, x, ctx, record=record: timed(layer, x, ctx, record)
        handle = vtprune.patch(model, policy)
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
        handle.remove()
        if i:
            in_situ.append(spent[0] * 1e3)
            in_situ_faults.append(spent[1])
    del policy.after_layer
    vit = towers[0]

    big = torch.ones(args.flush_mib << 20, dtype=torch.uint8)
    tiny = torch.randn(1, vit.tokens, 16, dtype=calls[0][1].dtype)

    def replay(flush: bool, rewarm: bool) -> float:
        ctx, warm_ctx = Context(family="llava", vit=vit), Context(family="llava", vit=vit)
        total = 0.0
        for layer, x in calls:
            if flush:
                big.sum()
            if rewarm:  # the same steps on a (1, tokens, 16) input: code warm, large tensors cold
                own(policy, layer, tiny[:, : x.shape[1]], warm_ctx)
            t = time.perf_counter()
            own(policy, layer, x, ctx)
            total += time.perf_counter() - t
        return total * 1e3

    variants = {"replay": (False, False), "replay, caches flushed": (True, False),
                "replay, flushed, kernels re-run": (True, True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.rounds + 1):
        for name, (flush, rewarm) in variants.items():
            ms = replay(flush, rewarm)
            if i:
                times[name].append(ms)
    times = {"in situ": in_situ, **times}
    base = statistics.median(times["replay"])
    print(f"pitome:keep={args.keep}: {len(calls)} after_layer calls, median of {args.rounds} rounds "
          f"(flush: read {args.flush_mib} MiB)")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:34s} {med:7.1f} ms  x{med / base:4.2f} of replay   [{min(ts):.1f}, {max(ts):.1f}]")
    print(f"  in situ, minor page faults inside the calls: median {statistics.median(in_situ_faults):.0f} per "
          f"prefill [{min(in_situ_faults)}, {max(in_situ_faults)}]")
    _products(policy, vit, calls, args.rounds)
    return 0


def _product(alg: str, v: torch.Tensor) -> torch.Tensor:
    """The similarity product a merge layer scores with: BSM's strided half product (a x b), PiToMe's T x T."""
    if alg == "bsm":
        return torch.bmm(v[:, 0::2], v[:, 1::2].transpose(1, 2))
    return torch.bmm(v, v.transpose(1, 2))


def _products(policy: PiToMe, vit, calls, rounds: int) -> None:
    """Time the calls' similarity products alone in fp32 and bf16, by algorithm (BSM / PiToMe)."""
    plan = policy._plan("llava", vit.layers, vit.last_layer, vit.tokens, vit.drop_cls)
    steps = []  # (the layer's LayerMerge, normalised fp32 metric (1, N, C) of the tokens it scores)
    for layer, x in calls:
        if layer >= len(plan) or plan[layer].r <= 0:
            continue
        m = x.float() if plan[layer].algorithm == "bsm" else x[:, 1:].float()  # PiToMe scores without the CLS
        steps.append((plan[layer], m / m.norm(dim=-1, keepdim=True)))
    units = [(step.algorithm, v) for step, v in steps]
    ms = {(alg, dt): [] for alg in ("bsm", "pitome") for dt in (torch.float32, torch.bfloat16)}
    cast = {dt: [(alg, v.to(dt)) for alg, v in units] for dt in (torch.float32, torch.bfloat16)}
    for i in range(rounds + 1):
        for dt, us in cast.items():
            spent = {"bsm": 0.0, "pitome": 0.0}
            for alg, v in us:
                t = time.perf_counter()
                _product(alg, v)
                spent[alg] += time.perf_counter() - t
            if i:
                for alg in spent:
                    ms[(alg, dt)].append(spent[alg] * 1e3)
    print("similarity products alone, back to back (median): fp32 as computed, bf16 for comparison")
    for alg in ("bsm", "pitome"):
        n = sum(1 for a, _ in units if a == alg)
        if n == 0:
            print(f"  {alg:6s} layers ( 0)")
            continue
        f32, b16 = (statistics.median(ms[(alg, dt)]) for dt in (torch.float32, torch.bfloat16))
        print(f"  {alg:6s} layers ({n:2d}): fp32 {f32:6.1f} ms, bf16 {b16:6.1f} ms (x{b16 / f32:.2f})")
    _bf16_energy_order(steps)


def _bf16_energy_order(steps) -> None:
    """Would bf16 products rank the PiToMe layers' tokens as fp32 does? ``steps``: (LayerMerge, unit
    vectors (1, T, C) fp32) per merge layer. Per PiToMe layer: the energy order from the bf16-rounded
    vectors against the fp32 one; the median gap between neighbouring energies, the largest change."""
    same, gaps, moved = 0, [], []
    for step, v in steps:
        if step.algorithm != "pitome":
            continue
        e32 = energy_scores(_product("pitome", v), step.margin)
        vb = v.bfloat16().float()  # the products of bf16 inputs, exact in fp32 apart from the accumulation
        e16 = energy_scores(_product("pitome", vb), step.margin)
        same += int(torch.equal(torch.argsort(e32, dim=-1, descending=True, stable=True),
                                torch.argsort(e16, dim=-1, descending=True, stable=True)))
        gaps.append(e32.sort(dim=-1).values.diff(dim=-1).median().item())
        moved.append((e16 - e32).abs().max().item())
    if gaps:
        print(f"bf16 energies: same order as fp32 in {same} of {len(gaps)} PiToMe layers; median neighbour gap "
              f"{statistics.median(gaps):.1e}, largest energy change {max(moved):.1e}")

if __name__ == "__main__":
    raise SystemExit(main())
