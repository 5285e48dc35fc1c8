"""
The paper's Fig. 2 in miniature: exact accuracy on Rule 110 in the paper's layout (4 states of 24
cells, each alone in a window of L = 24) with one model per rollout depth t, against t (one line per
N, Fig. 2a) and against N at the two deepest t that every N has run (Fig. 2b; or --panel_b=T,T), with
the equal-compute controls beside.

Each run is one train.py run at one t (see docs/results.md for the commands). This script reads every
finished run under --root (any ckpt.pt below it; t, N, seed, steps and --layer_repeat come from the
run's own config, so the folder names do not matter and unfinished runs are left out). A grid takes
many hours on a CPU, so it is kept, run by run, in a record (a small CSV, one row per run: the numbers,
the minutes and the code it ran at): --record merges the finished runs into it and draws from all of it.

    python scripts/fig2.py --record=docs/fig2_runs.csv --out=fig2                  # redraw the record
    python scripts/fig2.py --root=out/fig2 --record=my_runs.csv --code=abc1234 --out=fig2
"""

import argparse
import csv
import glob
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from runs import load_checkpoint  # noqa: E402

FIELDS = ["t", "N", "seed", "steps", "layer_repeat", "exact", "minutes", "code"]
KEY = ["t", "N", "seed", "steps", "layer_repeat"]


def collect(root, code=""):
    """One row per finished Rule 110 run under root that trained and evaluated at a single t."""
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "**", "ckpt.pt"), recursive=True)):
        ckpt = load_checkpoint(path)
        cfg, task = ckpt["config"], ckpt["task"]
        if cfg["task"] != "rule110" or task["t_min"] != task["t_max"]:
            continue                                    # not a cell of this grid
        if ckpt["step"] < cfg["max_iters"] or not ckpt["history"]:
            continue                                    # still training
        t, n = task["t_max"], cfg["sleep_passes"]
        exact = ckpt["history"][-1]["eval"][str(n)][t]["exact"]
        rows.append(dict(t=t, N=n, seed=cfg["seed"], steps=cfg["max_iters"], layer_repeat=cfg["layer_repeat"],
                         exact=round(exact, 4), minutes=round(ckpt["elapsed"] / 60, 1), code=code))
    return rows


def read_record(path, fields=FIELDS):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and set(rows[0]) != set(fields):
        raise ValueError(f"--record={path}: expected the columns {','.join(fields)}, got {','.join(rows[0])}")
    def value(k, v):
        return None if v == "" else v if k in ("code", "by_answer") else float(v) if k in ("exact", "item", "minutes") \
            else int(v)
    return [{k: value(k, v) for k, v in row.items()} for row in rows]


def merge(old, new, key=KEY):
    """The record's rows with the new ones added; a row already there (the same values of `key`) is replaced by
    its checkpoint's numbers, keeping the record's code if no --code was given."""
    rows = {tuple(r[k] for k in key): r for r in old}
    for r in new:
        at = tuple(r[k] for k in key)
        rows[at] = {**r, "code": r["code"] or (rows[at]["code"] if at in rows else "")}
    return sorted(rows.values(), key=lambda r: [r[k] for k in key])


def write_record(path, rows, fields=FIELDS):
    """The rows as a CSV, atomically (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: ("" if r[k] is None else r[k]) for k in fields} for r in rows)
    os.replace(tmp, path)


def stats(values):
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value), as train.py's tables."""
    values = torch.tensor(values, dtype=torch.float64)
    return values.mean().item(), (values.std(correction=1).item() if len(values) > 1 else 0.0)


def split(rows, steps):
    """The grid {(t, N): [(seed, exact)]} (runs of `steps` steps, no --layer_repeat) and the controls
    {(label, t): [(seed, exact)]} (every other run)."""
    grid, controls = {}, {}
    for r in rows:
        if r["steps"] == steps and r["layer_repeat"] == 1:
            grid.setdefault((r["t"], r["N"]), []).append((r["seed"], r["exact"]))
        else:
            label = f"N = {r['N']}" + (f", {r['steps']} steps" if r["steps"] != steps else "") + \
                    (f", --layer_repeat={r['layer_repeat']}" if r["layer_repeat"] != 1 else "")
            controls.setdefault((label, r["t"]), []).append((r["seed"], r["exact"]))
    return ({k: sorted(v) for k, v in grid.items()}, {k: sorted(v) for k, v in controls.items()})


def cell(runs):
    mean, std = stats([e for _, e in runs])
    seeds = " / ".join(f"{e:.3f}" for _, e in runs)
    return f"{mean:.3f} ± {std:.3f} ({seeds})" if len(runs) > 1 else f"{mean:.3f} (seed {runs[0][0]})"


def table(rows, steps):
    grid, controls = split(rows, steps)
    ts, ns = sorted({t for t, _ in grid}), sorted({n for _, n in grid})
    lines = ["| N | " + " | ".join(f"t={t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
    for n in ns:
        lines.append(f"| {n} | " + " | ".join(cell(grid[t, n]) if (t, n) in grid else "" for t in ts) + " |")
    if controls:
        lines += ["", "| control | t | exact |", "|---|---|---|"]
        lines += [f"| {label} | {t} | {cell(runs)} |" for (label, t), runs in sorted(controls.items())]
    minutes = [r["minutes"] for r in rows if r["minutes"] is not None]
    lines.append(f"\nExact accuracy (all 4 answers right) after {steps} steps, mean ± std over seeds (per seed in "
                 f"brackets, seeds in order); {len(rows)} runs" +
                 (f", {min(minutes):.1f}-{max(minutes):.1f} min of training each." if minutes else "."))
    return "\n".join(lines)


def panel_b_depths(grid, chosen=()):
    """The t of panel (b): `chosen`, else the two deepest t at which every N of the grid has a run (else at
    which two N have one), so that a t where only some N were run does not stand for all of them."""
    if chosen:
        return sorted(chosen)
    ts, ns = sorted({t for t, _ in grid}), sorted({n for _, n in grid})
    every = [t for t in ts if all((t, n) in grid for n in ns)]
    return (every if len(every) >= 2 else [t for t in ts if sum((t, n) in grid for n in ns) >= 2])[-2:]


def plot(rows, steps, path, chosen=()):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is optional and not installed")
        return
    grid, controls = split(rows, steps)
    ts, ns = sorted({t for t, _ in grid}), sorted({n for _, n in grid})
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))

    def draw(ax, xs, runs, **style):
        """The mean as a line through xs, each seed as a small dot: seeds that learned a t and seeds that did
        not sit far apart here, and a mean ± std bar would hide that."""
        means = [stats([e for _, e in r])[0] for r in runs]
        line = ax.plot(xs, means, **style)[0]
        for x, r in zip(xs, runs):
            ax.plot([x] * len(r), [e for _, e in r], ".", color=line.get_color(), alpha=0.5, markersize=5)
        return line.get_color()

    for n in ns:   # each N a little apart, so that equal points do not hide each other
        cells = [t for t in ts if (t, n) in grid]
        draw(a, [t + 0.05 * (n - (ns[0] + ns[-1]) / 2) for t in cells], [grid[t, n] for t in cells], marker="o",
             label=f"N = {n}")
    for ax in (a, b):
        ax.axhline(1 / 16, color="gray", linestyle=":", linewidth=1, label="4 coin flips (1/16)" if ax is a else None)
    a.set(xlabel="rollout depth t (one model per t)", ylabel="exact accuracy", ylim=(-0.02, 1.02), xticks=ts,
          title="(a) accuracy against t")
    a.legend(fontsize=8)
    for t in panel_b_depths(grid, chosen):
        cells = [n for n in ns if (t, n) in grid]
        color = draw(b, cells, [grid[t, n] for n in cells], marker="o", label=f"t = {t}")
        for i, ((label, ct), runs) in enumerate(sorted(controls.items())):
            if ct == t:   # the controls are N = 1 models: drawn just right of N = 1
                draw(b, [1 + 0.15 * (i + 1)], [runs], marker="sD^v"[i % 4], color=color, linestyle="none",
                     mfc="none", label=f"{label}, t = {t}")
    b.set(xlabel="sleep passes N", ylabel="exact accuracy", ylim=(-0.02, 1.02), xticks=ns,
          title="(b) accuracy against N at two deep t")
    b.legend(fontsize=7)
    fig.suptitle(f"Rule 110, paper layout (4 x 24 cells, L = 24), AG d = 64, {steps} steps of 64; "
                 "lines: mean over seeds, dots: each seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def record_arguments(doc, out, runs):
    """The command line that fig2.py and fig2b.py share: --root, --record, --code, --out, --overwrite."""
    parser = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    parser.add_argument("--root", default="", help=f"a folder with {runs} below it (any */ckpt.pt)")
    parser.add_argument("--record", default="", help=f"a CSV: the {runs} under --root are merged into it, and the "
                                                     "table and figure drawn from all of it")
    parser.add_argument("--code", default="", help="the commit the runs under --root trained at, for the record")
    parser.add_argument("--out", default=out, help="writes OUT.md (the table) and OUT.png (the figure)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT.md and OUT.png if already there")
    return parser


def updated_record(parser, args, collect, fields=FIELDS, key=KEY):
    """The rows of the runs under --root merged into --record (written back): what the table and figure show."""
    if not args.root and not args.record:
        parser.error("give --root (runs), --record (a CSV) or both")
    taken = [path for path in (args.out + ".md", args.out + ".png") if os.path.exists(path)]
    if taken and not args.overwrite:   # before any work: a table or figure is never replaced silently
        sys.exit(f"error: {taken[0]} is already there: --out=NAME writes elsewhere, --overwrite replaces it")
    rows = collect(args.root, args.code) if args.root else []
    if args.record:
        rows = merge(read_record(args.record, fields) if os.path.exists(args.record) else [], rows, key)
    if not rows:
        sys.exit(f"error: no run under --root={args.root} and none in --record={args.record}")
    if args.record:
        write_record(args.record, rows, fields)
    return rows


def write_table(text, out):
    print(text)
    with open(out + ".md", "w") as f:
        f.write(text + "\n")


def main(argv=None):
    parser = record_arguments(__doc__, "fig2", "finished runs")
    parser.add_argument("--steps", type=int, default=3000, help="the grid's steps per run; other runs are controls")
    parser.add_argument("--panel_b", default="", help="comma list of t for panel (b); default: the two deepest t "
                                                      "that every N has run")
    args = parser.parse_args(argv)
    rows = updated_record(parser, args, collect)
    write_table(table(rows, args.steps), args.out)
    plot(rows, args.steps, args.out + ".png", [int(t) for t in args.panel_b.split(",") if t])


if __name__ == "__main__":
    main()
