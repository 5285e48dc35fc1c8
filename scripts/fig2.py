"""
The paper's Fig. 2 in miniature: exact accuracy on Rule 110 in the paper's layout (4 states of 24
cells, each alone in a window of L = 24) with one model per rollout depth t, against t (one line per
N, Fig. 2a) and against N at the two deepest t (Fig. 2b).

Each cell of the grid is one run of train.py (see docs/results.md for the command), one sweep folder
per t: ROOT/t<T>/N<n>_seed<s>/ckpt.pt. This script reads the finished runs only, so it can be run
while the grid is still training:

    python scripts/fig2.py --root=out/fig2 --out=fig2        # writes fig2.md and fig2.png
"""

import argparse
import glob
import os
import re
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from train import load_checkpoint  # noqa: E402


def collect(root):
    """{(t, N): [(seed, exact, minutes)]} over the finished runs under root."""
    cells = {}
    for path in sorted(glob.glob(os.path.join(root, "t*", "N*_seed*", "ckpt.pt"))):
        t, n, seed = map(int, re.search(r"t(\d+)/N(\d+)_seed(\d+)/ckpt\.pt$", path).groups())
        ckpt = load_checkpoint(path)
        if ckpt["step"] < ckpt["config"]["max_iters"] or not ckpt["history"]:
            continue                                    # still training
        exact = ckpt["history"][-1]["eval"][str(n)][t]["exact"]
        cells.setdefault((t, n), []).append((seed, exact, ckpt["elapsed"] / 60))
    return cells


def stats(runs):
    values = torch.tensor([exact for _, exact, _ in runs])
    return values.mean().item(), (values.std().item() if len(runs) > 1 else 0.0)


def table(cells):
    ts, ns = sorted({t for t, _ in cells}), sorted({n for _, n in cells})
    lines = ["| N | " + " | ".join(f"t={t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
    for n in ns:
        row = []
        for t in ts:
            runs = sorted(cells.get((t, n), []))
            if not runs:
                row.append("")
                continue
            mean, std = stats(runs)
            seeds = " / ".join(f"{e:.3f}" for _, e, _ in runs)
            row.append(f"{mean:.3f} ± {std:.3f} ({seeds})" if len(runs) > 1 else f"{mean:.3f} (seed {runs[0][0]})")
        lines.append(f"| {n} | " + " | ".join(row) + " |")
    minutes = [m for runs in cells.values() for _, _, m in runs]
    lines.append(f"\nExact accuracy (all 4 answers right), mean ± std over seeds (per seed in brackets); "
                 f"{len(minutes)} runs, {min(minutes):.1f}-{max(minutes):.1f} min of training each.")
    return "\n".join(lines)


def plot(cells, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is optional and not installed")
        return
    ts, ns = sorted({t for t, _ in cells}), sorted({n for _, n in cells})
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    for n in ns:
        points = [(t, *stats(cells[t, n]), len(cells[t, n])) for t in ts if (t, n) in cells]
        a.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                   capsize=3, label=f"N = {n}")
    a.set(xlabel="rollout depth t (one model per t)", ylabel="exact accuracy", ylim=(0, 1.02), xticks=ts,
          title="(a) accuracy against t")
    a.legend()
    deepest = [t for t in ts if sum((t, n) in cells for n in ns) >= 2][-2:]
    for t in deepest:
        points = [(n, *stats(cells[t, n])) for n in ns if (t, n) in cells]
        b.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                   capsize=3, label=f"t = {t}")
    b.set(xlabel="sleep passes N", ylabel="exact accuracy", ylim=(0, 1.02), xticks=ns,
          title="(b) accuracy against N at the deepest t")
    b.legend()
    fig.suptitle("Rule 110, paper layout (4 x 24 cells, L = 24), AG d = 64, 3000 steps of 64; mean ± std over seeds",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--root", default="out/fig2", help="the folder holding t<T>/N<n>_seed<s>/ckpt.pt")
    parser.add_argument("--out", default="fig2", help="writes OUT.md (the table) and OUT.png (the figure)")
    args = parser.parse_args(argv)
    cells = collect(args.root)
    if not cells:
        sys.exit(f"error: no finished run under {args.root}/t<T>/N<n>_seed<s>/ckpt.pt")
    text = table(cells)
    print(text)
    with open(args.out + ".md", "w") as f:
        f.write(text + "\n")
    plot(cells, args.out + ".png")


if __name__ == "__main__":
    main()
