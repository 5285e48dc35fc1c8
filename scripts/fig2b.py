"""
The paper's Fig. 2b in miniature: learning curves, exact accuracy on Rule 110 against training steps at the
deepest rollouts, one line per N (each seed thin, the mean over seeds thick), one panel per t, a table of
when each run first reached 0.5 and 0.9 exact and where it ended, and one of the same per N over its seeds.

Each run is one train.py run at one t evaluated every --eval_interval steps on the same fixed evaluation set
(see docs/results.md for the commands). The evaluations are kept in a record (a small CSV, one row per run and
evaluation), so that the curves can be drawn from the record alone: --root merges the evaluations of every run
under it (finished or still training) into --record, and the table and figure are drawn from all of it. Runs
whose evaluations keep each answer's share (train.py since 300d866) get a second figure, OUT_by_answer.png:
one panel per run, one line per answer in the order the states were written.

    python scripts/fig2b.py --record=docs/fig2b_curves.csv --out=fig2b                   # redraw the record
    python scripts/fig2b.py --root=out/fig2b --record=my_curves.csv --code=abc1234 --out=fig2b
"""

import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fig2 import load_checkpoint, record_arguments, stats, updated_record, write_table  # noqa: E402

# item: the share of single answers right; by_answer: each answer's share in the order asked (state 1 to 4),
# space-separated, where the run's evaluations kept it (train.py since 300d866), else empty
FIELDS = ["t", "N", "seed", "max_iters", "step", "exact", "item", "by_answer", "minutes", "code"]
KEY = ["t", "N", "seed", "max_iters", "step"]
RUN = ["t", "N", "seed", "max_iters"]


def collect(root, code=""):
    """One row per evaluation of every Rule 110 run under root that trains and evaluates at a single t."""
    rows = []
    for path in sorted(glob.glob(os.path.join(root, "**", "ckpt.pt"), recursive=True)):
        ckpt = load_checkpoint(path)
        cfg, task = ckpt["config"], ckpt["task"]
        if cfg["task"] != "rule110" or task["t_min"] != task["t_max"] or cfg["layer_repeat"] != 1:
            continue
        t, n = task["t_max"], cfg["sleep_passes"]
        for h in ckpt["history"]:
            r = h["eval"][str(n)][t]
            rows.append(dict(t=t, N=n, seed=cfg["seed"], max_iters=cfg["max_iters"], step=h["step"],
                             exact=round(r["exact"], 4), item=round(r["item"], 4),
                             by_answer=" ".join(f"{a:.4f}" for a in r.get("by_answer", [])),
                             minutes=round(h["elapsed"] / 60, 1), code=code))
    return rows


def runs_rows(rows):
    """{(t, N, seed, max_iters): its rows in step order}."""
    runs = {}
    for r in rows:
        runs.setdefault(tuple(r[k] for k in RUN), []).append(r)
    return {k: sorted(v, key=lambda r: r["step"]) for k, v in sorted(runs.items())}


def runs_of(rows):
    """{(t, N, seed, max_iters): [(step, exact, minutes)] in step order}."""
    return {k: [(r["step"], r["exact"], r["minutes"]) for r in v] for k, v in runs_rows(rows).items()}


def first_step(curve, level):
    """The first evaluated step at which exact accuracy reached level, or None."""
    return next((step for step, exact, _ in curve if exact >= level), None)


def table(rows):
    lines = ["| t | N | seed | steps | first step at 0.5 | first step at 0.9 | final exact | per answer | minutes |",
             "|---|---|---|---|---|---|---|---|---|"]
    last = {run: rs[-1] for run, rs in runs_rows(rows).items()}
    for run, curve in runs_of(rows).items():
        (t, n, seed, max_iters), (last_step, final, minutes) = run, curve[-1]
        done = "" if last_step >= max_iters else f" (at step {last_step}, still training)"
        cells = [first_step(curve, 0.5), first_step(curve, 0.9)]
        lines.append(f"| {t} | {n} | {seed} | {max_iters} | " + " | ".join("-" if c is None else str(c) for c in cells)
                     + f" | {final:.3f}{done} | {last[run]['item']:.3f} | {minutes:.1f} |")
    lines.append("\nExact accuracy (all 4 answers right) on the fixed evaluation set, and at the same step the share "
                 "of single answers right (per answer; chance 0.5 and 1/16 exact); '-': never reached within the "
                 "run; minutes: training time to the last evaluation (one thread, two runs side by side).")
    return "\n".join(lines)


def summary(rows):
    """Per (t, N), over the finished runs: how many reached 0.5 and 0.9 exact, when each seed first reached
    0.5, and the final exact (mean, sample std and range): the paper's claim, sooner and higher, at a glance."""
    lines = ["| t | N | finished runs | reached 0.5 | reached 0.9 | first step at 0.5, by seed | final exact: "
             "mean ± std (min-max) |", "|---|---|---|---|---|---|---|"]
    groups = {}
    for (t, n, seed, max_iters), curve in runs_of(rows).items():
        groups.setdefault((t, n), []).append((seed, max_iters, curve))
    for (t, n), group in groups.items():
        done = [(seed, curve) for seed, max_iters, curve in group if curve[-1][0] >= max_iters]
        training = len(group) - len(done)
        note = f" (+{training} still training)" if training else ""
        if not done:
            lines.append(f"| {t} | {n} | 0{note} | | | | |")
            continue
        finals = [curve[-1][1] for _, curve in done]
        mean, std = stats(finals)
        half = [(seed, first_step(curve, 0.5)) for seed, curve in done]
        firsts = ", ".join(f"{seed}: {'-' if step is None else step}" for seed, step in half)
        reached = [sum(step is not None for _, step in half), sum(first_step(c, 0.9) is not None for _, c in done)]
        lines.append(f"| {t} | {n} | {len(done)}{note} | {reached[0]} | {reached[1]} | {firsts} | "
                     + (f"{mean:.3f} ± {std:.3f} ({min(finals):.3f}-{max(finals):.3f}) |" if len(done) > 1
                        else f"{mean:.3f} (one run) |"))
    return "\n".join(lines)


def mean_curve(curves):
    """The mean over seeds at every step that all of them evaluated, with the std (sample, ddof = 1)."""
    steps = sorted(set.intersection(*({s for s, _, _ in c} for c in curves)))
    per_step = [[dict((s, e) for s, e, _ in c)[step] for c in curves] for step in steps]
    return steps, [stats(v)[0] for v in per_step]


def answer_curves(rows):
    """{(t, N, seed, max_iters): (steps, [each answer's share at those steps, state 1 first])} for the runs
    whose record keeps each answer's share (by_answer)."""
    curves = {}
    for run, rs in runs_rows(rows).items():
        kept = [(r["step"], [float(a) for a in r["by_answer"].split()]) for r in rs if r.get("by_answer")]
        if kept:
            curves[run] = ([step for step, _ in kept], [list(a) for a in zip(*(shares for _, shares in kept))])
    return curves


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no figure: matplotlib is optional and not installed")
        return
    runs = runs_of(rows)
    ts = sorted({t for t, *_ in runs})
    fig, axes = plt.subplots(1, len(ts), figsize=(max(6.5, 5 * len(ts)), 4.2), squeeze=False)
    for ax, t in zip(axes[0], ts):
        for n in sorted({n for tt, n, *_ in runs if tt == t}):
            curves = [c for (tt, nn, _, _), c in runs.items() if (tt, nn) == (t, n)]
            color = f"C{n - 1}"
            for c in curves:
                ax.plot([s for s, _, _ in c], [e for _, e, _ in c], color=color, linewidth=0.7, alpha=0.45)
            steps, means = mean_curve(curves)
            ax.plot(steps, means, color=color, linewidth=2.2, marker="o" if len(steps) == 1 else None,
                    label=f"N = {n} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
        ax.axhline(1 / 16, color="gray", linestyle=":", linewidth=1, label="4 coin flips (1/16)")
        longest = max(max_iters for tt, _, _, max_iters in runs if tt == t)   # the whole run, however far it is
        ax.set(xlabel="training step (batch 64)", ylabel="exact accuracy", ylim=(-0.02, 1.02), title=f"t = {t}",
               xlim=(0, longest * 1.02))
        ax.legend(fontsize=8)
    save(plt, fig, "Rule 110, paper layout (4 x 24 cells, L = 24), AG d = 64\nthin: each seed; thick: the mean over "
         "seeds, at the steps that all of them have reached", path)
    plot_by_answer(plt, answer_curves(rows), path.replace(".png", "_by_answer.png"))


def plot_by_answer(plt, curves, path):
    """One panel per run whose record keeps each answer's share: one line per state, in the order written."""
    if not curves:
        return
    fig, axes = plt.subplots(1, len(curves), figsize=(max(6.5, 4.2 * len(curves)), 3.8), squeeze=False)
    for ax, ((t, n, seed, max_iters), (steps, shares)) in zip(axes[0], curves.items()):
        for i, share in enumerate(shares):
            where = " (written first)" if i == 0 else " (written last)" if i == len(shares) - 1 else ""
            ax.plot(steps, share, color=f"C{i}", linewidth=1.6, marker="o" if len(steps) == 1 else None,
                    label=f"state {i + 1}{where}")
        ax.axhline(0.5, color="gray", linestyle=":", linewidth=1, label="a coin flip")
        ax.set(xlabel="training step (batch 64)", ylabel="share of this answer right", ylim=(0.3, 1.02),
               xlim=(0, max_iters * 1.02), title=f"t = {t}, N = {n}, seed {seed}")
        ax.legend(fontsize=8, loc="upper left")
    save(plt, fig, "Rule 110, paper layout: the share of each answer right\nstate i is written in window i and "
         "evicted before the queries", path)


def save(plt, fig, title, path):
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main(argv=None):
    parser = record_arguments(__doc__, "fig2b", "runs (finished or still training)")
    args = parser.parse_args(argv)
    rows = updated_record(parser, args, collect, FIELDS, KEY)
    write_table(table(rows) + "\n\nPer N:\n\n" + summary(rows), args.out)
    plot(rows, args.out + ".png")


if __name__ == "__main__":
    main()
