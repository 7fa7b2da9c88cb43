#!/usr/bin/env python3
"""Figure and tables of the StreamingLLM experiment (streaming_experiment.sh writes the inputs).

    /usr/bin/python3 examples/llama/streaming_report.py OUT_DIR

Reads OUT_DIR/<text>.json (stream-ppl), OUT_DIR/speed.json, OUT_DIR/eval_<text>_<budget>.json
(kvsparse-eval) and OUT_DIR/gates.tsv (calibrate-gates); writes OUT_DIR/streaming.png (per-segment perplexity against position, one panel per
text and budget, one line per policy) and OUT_DIR/report.md (the tables docs/streaming.md quotes).
Needs matplotlib (Debian: python3-matplotlib); nothing else beyond the standard library.
"""

import json
import os
import re
import sys

TEXTS = ["tinystories_160k", "pride_and_prejudice"]
BUDGETS = [64, 128, 256]
SINKS = [0, 1, 2, 4, 8]
SEGMENT = 512
# The independent implementation's figures (issue 7): tinystories_160k.txt, 4096 tokens, budget 128.
INDEPENDENT = {
    "dense": 53.67,
    "window:window=128": 5.636,
    "sink:sinks=4,window=124,positions=in_cache": 5.688,
    "sink:sinks=4,window=124": 37.43,
}


def load(path):
    with open(path) as f:
        return json.load(f)


def by_spec(doc):
    return {p["spec"]: p for p in doc["policies"]}


def sink_spec(sinks, budget, mode):
    if sinks == 0 and mode == "absolute":
        return f"window:window={budget}"
    spec = f"sink:sinks={sinks},window={budget - sinks}"
    return spec + ",positions=in_cache" if mode == "in_cache" else spec


def segment_labels(doc):
    first = doc.get("first_scored", 0)
    steps = doc["tokens"] - 1
    labels, begin = [], first
    while begin < steps:
        end = min(steps, (begin // SEGMENT + 1) * SEGMENT)
        labels.append((begin, end))
        begin = end
    return labels


def fmt(x, digits=3):
    if x is None:
        return "-"
    if x >= 1000:
        return f"{x:.0f}"
    return f"{x:.{digits}f}"


def quality_tables(out, lines):
    for text in TEXTS:
        path = os.path.join(out, f"{text}.json")
        if not os.path.exists(path):
            continue
        doc = load(path)
        specs = by_spec(doc)
        segs = segment_labels(doc)
        lines.append(f"### {text}.txt, {doc['tokens']} tokens: perplexity, overall and per {SEGMENT}-position segment\n")
        header = "| policy | budget | ppl | " + " | ".join(f"{a}-{b - 1}" for a, b in segs) + " |"
        lines.append(header)
        lines.append("|" + "---|" * (3 + len(segs)))
        for p in doc["policies"]:
            if "budget" not in p:
                continue
            budget = "-" if p["spec"] == "dense" else p["budget"]
            lines.append(f"| `{p['spec']}` | {budget} | **{fmt(p['ppl'])}** | " +
                         " | ".join(fmt(x, 2) for x in p["segment_ppl"]) + " |")
        lines.append("")
        lines.append(f"Sink sweep on {text}.txt (perplexity; sinks 0 with absolute positions is the window):\n")
        lines.append("| sinks | " + " | ".join(f"{b} in_cache | {b} absolute" for b in BUDGETS) + " |")
        lines.append("|---|" + "---|---|" * len(BUDGETS))
        for s in SINKS:
            cells = []
            for b in BUDGETS:
                for mode in ("in_cache", "absolute"):
                    p = specs.get(sink_spec(s, b, mode))
                    cells.append(fmt(p["ppl"]) if p else "-")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        if text == "tinystories_160k":
            lines.append("Against the independent implementation (budget 128):\n")
            lines.append("| policy | here | independent | difference |")
            lines.append("|---|---|---|---|")
            for spec, ref in INDEPENDENT.items():
                p = specs.get(spec)
                if p:
                    lines.append(f"| `{spec}` | {p['ppl']:.3f} | {ref} | {100 * (p['ppl'] / ref - 1):+.2f}% |")
            lines.append("")


def mass_tables(out, lines):
    for text in TEXTS:
        path = os.path.join(out, f"{text}.json")
        if not os.path.exists(path):
            continue
        specs = by_spec(load(path))
        cols = [
            ("dense, 0-511", "dense", [0]),
            ("dense, 512-4095", "dense", list(range(1, 8))),
            ("in_cache, 512-4095", "sink:sinks=4,window=124,positions=in_cache", list(range(1, 8))),
            ("absolute, 512-1023", "sink:sinks=4,window=124", [1]),
            ("absolute, 1536-2047", "sink:sinks=4,window=124", [3]),
            ("absolute, 2560-3071", "sink:sinks=4,window=124", [5]),
            ("absolute, 3584-4095", "sink:sinks=4,window=124", [7]),
        ]
        if not all(c[1] in specs and "first_mass" in specs[c[1]] for c in cols):
            continue
        lines.append(f"### {text}.txt: attention on positions 0-3, mean over query heads and steps "
                     "(sink 4 + window at budget 128; uniform attention over 128 tokens would give 0.031)\n")
        lines.append("| layer | " + " | ".join(c[0] for c in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        layers = len(specs["dense"]["first_mass"]["per_layer_segment"])
        for l in range(layers):
            cells = []
            for _, spec, segs in cols:
                m = specs[spec]["first_mass"]["per_layer_segment"][l]
                cells.append(f"{sum(m[s] for s in segs) / len(segs):.3f}")
            lines.append(f"| {l} | " + " | ".join(cells) + " |")
        lines.append("")


def gates_table(out, lines):
    path = os.path.join(out, "gates.tsv")
    if not os.path.exists(path):
        return
    with open(path) as f:
        alpha = [[float(x) for x in line.split("\t")] for line in f if line.strip()]
    # LServe's rule (docs/lserve.md): ascending alpha, ties by layer then head; the first half stream.
    order = sorted((a, l, h) for l, row in enumerate(alpha) for h, a in enumerate(row))
    streaming = {(l, h) for _, l, h in order[:int(0.5 * len(order) + 0.5)]}
    lines.append("### LServe gate values (calibrate-gates on tinystories_sample.txt; * streams at sparsity 0.5)\n")
    lines.append("| layer | " + " | ".join(f"KV head {h}" for h in range(len(alpha[0]))) + " |")
    lines.append("|---|" + "---|" * len(alpha[0]))
    for l, row in enumerate(alpha):
        lines.append(f"| {l} | " + " | ".join(f"{a:.3f}{' *' if (l, h) in streaming else ''}"
                                              for h, a in enumerate(row)) + " |")
    lines.append("")


def speed_table(out, lines):
    path = os.path.join(out, "speed.json")
    if not os.path.exists(path):
        return
    doc = load(path)
    specs = by_spec(doc)
    lines.append(f"### Speed: positions {doc['first_scored']}-{doc['tokens'] - 2} of {doc['tokens']} tokens scored "
                 f"and timed, one thread\n")
    lines.append("| budget | sink + window ppl | sink + window tokens/s | recompute ppl | recompute tokens/s | speed-up |")
    lines.append("|---|---|---|---|---|---|")
    for spec, p in specs.items():
        m = re.fullmatch(r"recompute:window=(\d+)", spec)
        if not m:
            continue
        b = int(m.group(1))
        s = specs.get(sink_spec(4, b, "in_cache"))
        if not s:
            continue
        lines.append(f"| {b} | {s['ppl']:.3f} | {s['tokens_per_s']:.0f} | {p['ppl']:.3f} | {p['tokens_per_s']:.1f} | "
                     f"{s['tokens_per_s'] / p['tokens_per_s']:.0f}x |")
    lines.append("")


def eval_tables(out, lines):
    for text in TEXTS:
        docs = {b: os.path.join(out, f"eval_{text}_{b}.json") for b in BUDGETS}
        if not all(os.path.exists(p) for p in docs.values()):
            continue
        lines.append(f"### kvsparse-eval on the dense trace of {text}.txt (2048 tokens, 2047 decode steps)\n")
        lines.append("| budget | policy | recall mean | recall min | output error mean | peak tokens |")
        lines.append("|---|---|---|---|---|---|")
        for b, path in docs.items():
            for p in load(path)["policies"]:
                if p["spec"] == "dense" and b != BUDGETS[0]:
                    continue
                recall_min = p["recall_min"]
                lines.append(f"| {'-' if p['spec'] == 'dense' else b} | `{p['spec']}` | {p['recall_mean']:.4f} | "
                             f"{recall_min:.4f} | {p['output_error_mean']:.4f} | {p['peak_tokens']} |")
        lines.append("")


def figure(out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    docs = {t: load(os.path.join(out, f"{t}.json")) for t in TEXTS if os.path.exists(os.path.join(out, f"{t}.json"))}
    if not docs:
        return
    fig, axes = plt.subplots(len(docs), len(BUDGETS), figsize=(5 * len(BUDGETS), 4 * len(docs)), squeeze=False,
                             sharey="row")
    for row, (text, doc) in enumerate(docs.items()):
        segs = segment_labels(doc)
        x = [(a + b) / 2 for a, b in segs]
        for col, budget in enumerate(BUDGETS):
            ax = axes[row][col]
            for p in doc["policies"]:
                if p["spec"] != "dense" and p.get("budget") != budget:
                    continue
                style = {"color": "black", "linestyle": "--"} if p["spec"] == "dense" else {}
                ax.plot(x, p["segment_ppl"], marker="o", markersize=3, label=p["spec"], **style)
            ax.axvline(512, color="gray", linewidth=0.8, linestyle=":")
            ax.set_yscale("log")
            ax.set_title(f"{text}.txt, budget {budget}", fontsize=10)
            ax.set_xlabel("position (segment of 512 tokens)")
            if col == 0:
                ax.set_ylabel("perplexity (log)")
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("stories260K, one token at a time: per-segment perplexity (dotted line: trained context 512)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "streaming.png"), dpi=110)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = sys.argv[1]
    lines = ["# StreamingLLM experiment: results\n"]
    quality_tables(out, lines)
    mass_tables(out, lines)
    gates_table(out, lines)
    speed_table(out, lines)
    eval_tables(out, lines)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    figure(out)


if __name__ == "__main__":
    main()
