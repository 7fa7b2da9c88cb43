#!/usr/bin/env python3
"""Figure and tables from kvsparse-bench's JSON output (--benchmark_format=json or --benchmark_out).

    python3 bench/plot.py results.json --figure docs/benchmarks.svg --markdown

Draws the speedup of every policy's decode step over dense decode at the same context, against the
context, with the memory bound of a page-selecting policy, L / (L/P + B) (it reads B tokens of K/V plus
the key bounds of L/P pages, each bounds page as many bytes as one token's K and V), and the bound of a
policy that reads only its budget, L / B. A second panel shows bandwidth_fraction. --markdown prints the
tables of docs/benchmarks.md; --check prints the two CPU goals of the suite and exits non-zero if one is
missed. Each goal takes its Paired/ benchmark where the run has it, else the Decode results: the dense
goal Paired/dense/32768's bandwidth_fraction (dense steps and copies timed in turns), the Quest goal
Paired/quest/32768's speedup (dense and Quest steps timed in turns); with Reads/quest/32768 in the run it
adds the speedup the two steps' reads alone allow (their bytes read in their patterns, without the
arithmetic). Needs numpy and matplotlib (Debian: python3-matplotlib) for the figure only.
"""

import argparse
import json
import math
import re
import sys

PAGE = 16
ORDER = ["dense", "window", "sink", "h2o", "quest", "lserve"]
GOAL_DENSE_FRACTION = 0.60  # dense decode at 32K reads at least this fraction of copy bandwidth
GOAL_QUEST_OF_BOUND = 0.85  # Quest at 32K, budget 2048, page 16: at least this fraction of the bound


def load_one(path):
    with open(path) as f:
        data = json.load(f)
    decode, copy, other = {}, {}, {}
    for b in data["benchmarks"]:
        name = b["name"]
        if b.get("run_type") == "aggregate":  # with --benchmark_repetitions: the mean stands for the runs
            if b.get("aggregate_name") != "mean":
                continue
            name = b["run_name"]
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b.get("time_unit", "ns")]
        m = re.match(r"^Decode/([a-z0-9_]+)/(\d+)$", name)
        if m:
            decode[(m.group(1), int(m.group(2)))] = dict(b, step_s=b["real_time"] * scale)
            continue
        m = re.match(r"^Copy/(\d+)$", name)
        if m:
            copy[int(m.group(1))] = b
            continue
        other[name] = dict(b, step_s=b["real_time"] * scale)
    return data.get("context", {}), decode, copy, other


def load(paths):
    """One or more result files. Every speedup is against dense decode from the same file (the same run);
    a policy found in several files is taken from the last, dense from the first."""
    context, decode, copy, other, runs = {}, {}, {}, {}, []
    for path in paths:
        ctx, dec, cp, oth = load_one(path)
        context = context or ctx
        runs.append(ctx)
        for key, b in dec.items():
            dense = dec.get(("dense", key[1]))
            if dense:
                b["speedup"] = dense["step_s"] / b["step_s"]
            if key[0] != "dense" or key not in decode:
                decode[key] = dict(b, run=len(runs) - 1)
        for key, b in cp.items():
            copy.setdefault(key, b)
        for key, b in oth.items():
            other.setdefault(key, b)
    context = dict(context, runs=runs)
    return context, decode, copy, other


def budget(context):
    return int(context.get("kvsparse_token_budget", 2048))


def bound_pages(L, B):
    return L / (L / PAGE + B) if L > B else 1.0


def bound_budget(L, B):
    return L / B if L > B else 1.0


def speedups(decode):
    return {key: b["speedup"] for key, b in decode.items() if "speedup" in b}


def fit_line(xs, ys):
    """Least squares y = a + b x; returns slope, intercept, RMS residual, R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    residuals = [y - (intercept + slope * x) for x, y in zip(xs, ys)]
    rms = math.sqrt(sum(r * r for r in residuals) / n)
    syy = sum((y - my) ** 2 for y in ys)
    r2 = 1.0 - sum(r * r for r in residuals) / syy if syy else 1.0
    return slope, intercept, rms, r2


def policies_of(decode):
    names = {p for p, _ in decode}
    return [p for p in ORDER if p in names] + sorted(names - set(ORDER))


def markdown(context, decode, copy, other):
    B = budget(context)
    sp = speedups(decode)
    contexts = sorted({L for _, L in decode})
    lines = []
    runs = context.get("runs", [context])
    for i, run in enumerate(runs):
        names = sorted({p for (p, _), b in decode.items() if b.get("run") == i})
        lines.append(f"- Run {i + 1} ({', '.join(names) or 'no decode'}): copy bandwidth (the reference) "
                     f"{float(run.get('copy_bytes_per_second', 'nan')) / 1e9:.1f} GB/s, the median of 12 copies of "
                     f"256 MiB on {run.get('kvsparse_threads', '?')} threads, read + write (the best: "
                     f"{float(run.get('copy_best_bytes_per_second', 'nan')) / 1e9:.1f} GB/s); load average at "
                     f"the start {', '.join(f'{x:.2f}' for x in run.get('load_avg', []))}.")
    lines.append("")
    for size, b in sorted(copy.items()):
        lines.append(f"- `Copy/{size}`: {b['bytes_per_second'] / 1e9:.1f} GB/s.")
    read = other.get("Read/4096")
    if read:
        lines.append(f"- `Read/4096`: 256 MiB read in 4 KiB pages in order at {read['in_order_bytes_per_second'] / 1e9:.1f} GB/s, "
                     f"shuffled at {read['scattered_bytes_per_second'] / 1e9:.1f} GB/s (in turns; median ratio "
                     f"{read['scattered_fraction']:.2f}).")
    reads = other.get("Reads/quest/32768")
    if reads:
        bound = bound_pages(32768, B)
        lines.append(f"- `Reads/quest/32768`: the bytes of a dense step read alone (no arithmetic) in "
                     f"{reads['dense_ns'] / 1e3:.0f} us, those of a Quest step in {reads['step_ns'] / 1e3:.0f} us "
                     f"(in turns; median ratio {reads['speedup']:.2f}x, {reads['speedup'] / bound:.2f} of the bound).")
    lines.append("")
    lines.append("| policy | context | run | step (us) | select (us) | attend (us) | MB read | bandwidth fraction | speedup over dense | bound L/(L/P+B) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in policies_of(decode):
        for L in contexts:
            b = decode.get((p, L))
            if not b:
                continue
            s = sp.get((p, L))
            lines.append(
                f"| {p} | {L} | {b['run'] + 1} | {b['step_s'] * 1e6:.0f} | {b['select_ns'] / 1e3:.0f} | {b['attend_ns'] / 1e3:.0f} | "
                f"{b['bytes_read'] / 1e6:.1f} | {b['bandwidth_fraction']:.2f} | "
                f"{'' if s is None else f'{s:.2f}'} | {bound_pages(L, B):.2f} |")
    lines.append("")
    lines.append("Selection cost against context (least-squares line over the contexts measured):")
    lines.append("")
    lines.append("| policy | slope (ns per 1K tokens) | intercept (us) | RMS residual (us) | R^2 |")
    lines.append("|---|---:|---:|---:|---:|")
    for p in policies_of(decode):
        pts = [(L, decode[(p, L)]["select_ns"]) for L in contexts if (p, L) in decode]
        if len(pts) < 3:
            continue
        slope, intercept, rms, r2 = fit_line([x for x, _ in pts], [y for _, y in pts])
        lines.append(f"| {p} | {slope * 1e3:.1f} | {intercept / 1e3:.1f} | {rms / 1e3:.1f} | {r2:.4f} |")
    pairs = paired(other)
    copies = {L: b for (p, L), b in pairs.items() if p == "dense"}
    if copies:
        lines.append("")
        lines.append("Dense steps and 256 MiB copies timed in turns (`Paired/dense/`, medians over 100 pairs or more):")
        lines.append("")
        lines.append("| context | dense step (us) | copy (GB/s) | bandwidth fraction |")
        lines.append("|---:|---:|---:|---:|")
        for L, b in sorted(copies.items()):
            lines.append(f"| {L} | {b['dense_ns'] / 1e3:.0f} | {b['copy_bytes_per_second'] / 1e9:.1f} | {b['bandwidth_fraction']:.2f} |")
    steps = {k: b for k, b in pairs.items() if k[0] != "dense"}
    if steps:
        order = {p: i for i, p in enumerate(ORDER)}
        lines.append("")
        lines.append("Dense and the policy's step timed in turns (`Paired/`, medians over 100 pairs or more):")
        lines.append("")
        lines.append("| policy | context | dense step (us) | policy step (us) | speedup over dense | of the bound L/(L/P+B) |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for (p, L), b in sorted(steps.items(), key=lambda kv: (order.get(kv[0][0], len(ORDER)), kv[0])):
            lines.append(f"| {p} | {L} | {b['dense_ns'] / 1e3:.0f} | {b['step_ns'] / 1e3:.0f} | {b['speedup']:.2f} | "
                         f"{b['speedup'] / bound_pages(L, B):.2f} |")
    extra = sorted(n for n in other if n.startswith(("Append/", "H2OUpdate/")))
    if extra:
        lines.append("")
        lines.append("| benchmark | time (us) |")
        lines.append("|---|---:|")
        for n in extra:
            lines.append(f"| `{n}` | {other[n]['step_s'] * 1e6:.2f} |")
    return "\n".join(lines)


def paired(other):
    """Paired/<policy>/<context> results: {(policy, context): benchmark}."""
    result = {}
    for name, b in other.items():
        m = re.match(r"^Paired/([a-z0-9_]+)/(\d+)$", name)
        if m:
            result[(m.group(1), int(m.group(2)))] = b
    return result


def check(context, decode, other):
    B = budget(context)
    ok = True
    pairs = paired(other)
    dense, dense_pair = decode.get(("dense", 32768)), pairs.get(("dense", 32768))
    if dense or dense_pair:
        # The paired fraction compares a step and a copy that saw the same memory bandwidth.
        f, how = (dense_pair["bandwidth_fraction"], "paired with copies") if dense_pair else (dense["bandwidth_fraction"], "one copy reference")
        good = f >= GOAL_DENSE_FRACTION
        ok &= good
        print(f"dense decode at 32K: {f:.2f} of copy bandwidth ({how}) (goal >= {GOAL_DENSE_FRACTION}): {'met' if good else 'NOT met'}")
    pair = pairs.get(("quest", 32768))
    quest = decode.get(("quest", 32768))
    if pair or (quest and "speedup" in quest):
        # Both against dense in the same run; the paired steps also saw the same memory bandwidth.
        s, how = (pair["speedup"], "paired steps") if pair else (quest["speedup"], "Decode steps")
        bound = bound_pages(32768, B)
        good = s >= GOAL_QUEST_OF_BOUND * bound
        ok &= good
        print(f"quest at 32K: {s:.2f}x faster than dense ({how}) = {s / bound:.2f} of the bound {bound:.1f}x "
              f"(goal >= {GOAL_QUEST_OF_BOUND}): {'met' if good else 'NOT met'}")
        reads = other.get("Reads/quest/32768")
        if reads:
            # The bound counts bytes; this machine reads Quest's scattered pages more slowly than dense's
            # runs of pages. The same bytes read alone, in the same patterns: the speedup the reads allow.
            r = reads["speedup"]
            print(f"  Reads/quest/32768: the two steps' bytes read alone, without arithmetic: {r:.2f}x = "
                  f"{r / bound:.2f} of {bound:.1f}x; the {how} reach {s / r:.2f} of that")
    return ok


def figure(context, decode, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    B = budget(context)
    sp = speedups(decode)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    Ls = sorted({L for _, L in decode})
    grid = np.geomspace(min(Ls), max(Ls), 200)
    ax.plot(grid, [bound_pages(L, B) for L in grid], "k--", lw=1.2, label=f"bound L/(L/P+B), P={PAGE}, B={B}")
    ax.plot(grid, [bound_budget(L, B) for L in grid], "k:", lw=1.2, label=f"bound L/B (budget only)")
    markers = dict(dense="o", window="s", sink="^", h2o="v", quest="D", lserve="P")
    for p in policies_of(decode):
        pts = sorted((L, s) for (q, L), s in sp.items() if q == p)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker=markers.get(p, "x"), label=p)
        fr = sorted((L, decode[(p, L)]["bandwidth_fraction"]) for (q, L) in decode if q == p)
        bx.plot([x for x, _ in fr], [y for _, y in fr], marker=markers.get(p, "x"), label=p)
    for a in (ax, bx):
        a.set_xscale("log", base=2)
        a.set_xlabel("context (tokens)")
        a.grid(True, which="both", alpha=0.3)
    ax.set_yscale("log", base=2)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda y, _: f"{y:g}"))
    ax.set_ylabel("decode step speedup over dense")
    ax.set_title("Speedup over dense decode (one layer, CPU)")
    ax.legend(fontsize=8)
    bx.axhline(GOAL_DENSE_FRACTION, color="grey", lw=0.8, ls="--")
    bx.set_ylabel("bytes read / step time / copy bandwidth")
    bx.set_title("Fraction of measured copy bandwidth")
    bx.set_ylim(bottom=0)
    bx.legend(fontsize=8)
    threads = context.get("kvsparse_threads", "?")
    fig.suptitle(f"kvsparse-bench: Hq 32, Hkv 8, D 128, float16, page {PAGE}, {threads} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="+", help="kvsparse-bench output in JSON (several runs: each speedup against dense of its own run)")
    ap.add_argument("--figure", help="write the figure here (.svg, .png, ...)")
    ap.add_argument("--markdown", action="store_true", help="print the tables in Markdown")
    ap.add_argument("--check", action="store_true", help="print the goals; exit 1 if one is missed")
    args = ap.parse_args()
    context, decode, copy, other = load(args.json)
    if not decode and not copy:
        sys.exit("no Decode/ or Copy/ results in " + " ".join(args.json))
    if args.markdown:
        print(markdown(context, decode, copy, other))
    if args.figure:
        figure(context, decode, args.figure)
    if args.check:
        sys.exit(0 if check(context, decode, other) else 1)


if __name__ == "__main__":
    main()
