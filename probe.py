"""
probe.py: what does sleep write into the fast weights S? Linear read-outs of S, pass by pass.

    python probe.py --out_dir=out/rule110-cpu/sweep/N4_seed0
    python probe.py --out_dir=out/rule110-cpu/sweep/N1_seed0 --compare=out/rule110-cpu/sweep/N4_seed0 \
        --png=probe_rule110.png --md=probe_rule110.md

The tables and heatmaps go beside the probed run's checkpoint, probe.md and probe.png (with --compare:
probe_vs_<the other run>.md and .png), unless --md / --png name files; a file that is already there is
never replaced silently: the probe stops before any work, naming --md / --png and --overwrite=1.
    python probe.py --help

The claim under test: extra passes over a window write deeper computation into S. On Rule 110 that
means S comes to hold the state's rollout (the cells after 1, 2, ... updates), not only its cells.

What it does, for a run folder written by train.py (its ckpt.pt):
  1. Rebuild the model and the task from the checkpoint; draw held-out examples (the task's
     evaluation split, task.eval_set, never trained on; duplicates of the evaluated input dropped).
  2. Run them window by window exactly as SleepLM.forward does (wake pass, then N - 1 sleep passes
     of every consolidation window, then eviction) and keep every GDN block's S after every pass,
     and the S that reaches the prediction window ("carried to query": after all later windows).
     The S after the last pass of a window is what forward carries into the next window (a test
     checks it); under one state per sequence (Rule 110 cpu preset) or one graph item (Depo)
     "carried to query" therefore equals the last pass.
  3. Compute targets from the input tokens with an independent solver, and check them against the
     task's own answers (a mismatch raises):
       rule110  every cell of the window's state after j updates, j = 0 .. the task's largest t
                (periodic boundary, as data.py); the first cell (cell 0) is what the query asks.
       depo     for each node name, its k-hop successor, k = 1 .. the task's max_hops (k = 1: the
                successor), decoded from the graph's edges "x -> y"; scored where the name is in the
                graph (read after the graph's last window).
  4. Fit one linear read-out per target: ridge regression on one-hot targets (argmax; for a bit this
     is "predict 1 when the fit is above 0.5"), closed form in float64, features = the flattened S
     (every GDN block's, or --block's), standardised with the fit split's mean and std. The ridge
     strength is chosen per column (per j or k) from a fixed grid on a held-out part of the fit
     split. The read-outs never see the test split until they are scored on it.
  5. Controls, from the same examples and splits: the same read-out from S of the untrained model
     (same config, freshly initialised with the run's seed, as train.py initialises it), and from
     the trained S with the fit split's targets shuffled across examples (should score chance).

How to read the output (a markdown table per model and target, and a heatmap per model):
  rows      "pass p": S right after pass p over the window that holds the item (Rule 110: each of
            the K states in its own window, accuracy averaged over the K windows; Depo: the last
            graph window). "carried to query": the S that enters the prediction window, read for
            every item (with K > 1 states also per state: state 1's rollout has to survive the writes
            of the K - 1 later windows, state K's S is its window's last pass).
            "untrained", "shuffled targets": the controls. "chance (majority class)": always answering
            the test split's majority class, per target. Depo also gets "chance (a random other node of
            the graph)": what knowing only which nodes are in the graph gives, 1 / (n - 1) for n nodes,
            above the majority rate, since a read-out can easily tell which names are present.
  columns   j (Rule 110, updates of the state) or k (Depo, hops).
  entries   test accuracy of the read-out, averaged over the targets in the column (cells, names).
A deeper column (larger j or k) that is read well from S after pass 4 but not after pass 1 (and not
from the untrained model's S) is deeper computation that sleep wrote into S. A linear read-out shows
what S holds in a linearly decodable form, not what the model uses.
"""

import dataclasses
import inspect
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import runs
import train
from data import make_task
from sleep_lm import SleepLM

PROBED_TASKS = ("rule110", "depo")
# The ridge strengths tried (features standardised). Wide on purpose: the untrained model's S is nearly low-rank
# and is read best with almost no ridge (1e-6 .. 1e-3 on Rule 110); shuffled targets pick the strongest.
RIDGE_STRENGTHS = tuple(10.0 ** k for k in range(-8, 7))
MAX_ONE_HOT_COLUMNS = 8192                                   # targets x classes fitted at once (memory)

# The Rule 110 table as the paper gives it: (left, centre, right) -> new centre.
RULE_110 = {(1, 1, 1): 0, (1, 1, 0): 1, (1, 0, 1): 1, (1, 0, 0): 0,
            (0, 1, 1): 1, (0, 1, 0): 1, (0, 0, 1): 1, (0, 0, 0): 0}


@dataclass
class ProbeConfig:
    out_dir: str = ""            # the run folder (holding ckpt.pt from train.py)
    compare: str = ""            # a second run folder, shown beside the first (e.g. N = 1 beside N = 4)
    examples: int = 2048         # held-out examples (the task's evaluation split), fit and test together
    test_frac: float = 0.25      # fraction of the examples the read-outs are scored on
    val_frac: float = 0.25       # fraction of the fit examples held out to choose the ridge strength
    block: str = "all"           # whose S: all (every GDN block's, concatenated) or one GDN block's index
    max_names: int = 32          # depo: probe the names most often in the fit split's graphs, at most this many
    seed: int = 0                # the split of the examples and the shuffle of the control
    batch_size: int = 256        # examples per forward pass
    device: str = "auto"         # auto (cuda, then mps, then cpu), cpu, cuda or mps
    threads: int = 1             # CPU threads (torch's default of one per core stalls when other work holds a core)
    md: str = "auto"             # where the tables go (also printed); auto: beside the run's ckpt.pt; "" = none
    png: str = "auto"            # where the heatmaps are drawn (needs matplotlib); auto: beside the tables; "" = none
    overwrite: int = 0           # 1: replace --md and --png files that are already there (0: stop, naming them)


# -----------------------------------------------------------------------------
# Settings from the command line (--key=value, as train.py).


def parse_args(argv):
    """--key=value pairs -> ProbeConfig; ValueError naming the setting for anything else."""
    cfg = ProbeConfig()
    values = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments look like --key=value, got {arg!r} (python probe.py --help lists them)")
        key, _, text = arg[2:].partition("=")
        if not hasattr(cfg, key):
            raise ValueError(f"unknown setting --{key}; settings: {', '.join(f.name for f in dataclasses.fields(cfg))}")
        kind = type(getattr(cfg, key))
        try:
            values[key] = kind(text)
        except ValueError:
            what = {int: "an integer", float: "a number"}[kind]
            raise ValueError(f"--{key} expects {what}, got {text!r}") from None
    cfg = dataclasses.replace(cfg, **values)
    check_config(cfg)
    return dataclasses.replace(cfg, md=output_path(cfg, cfg.md, "md"), png=output_path(cfg, cfg.png, "png"))


def output_path(cfg, given, ext):
    """--md / --png as given, or for auto a name of the runs probed, in the probed run's folder:
    probe.EXT, or probe_vs_<the other run>.EXT with --compare (its folder name, or its whole path
    when it is not a sibling), so that probing a run and comparing it with another never share a file."""
    if given != "auto":
        return given
    stem = "probe"
    if cfg.compare:
        other = os.path.normpath(cfg.compare)
        sibling = os.path.dirname(os.path.abspath(other)) == os.path.dirname(os.path.abspath(cfg.out_dir))
        stem += "_vs_" + (os.path.basename(other) if sibling else other.strip(os.sep).replace(os.sep, "_"))
    return os.path.join(cfg.out_dir, f"{stem}.{ext}")


def check_outputs(cfg):
    """Stop before any work if --md or --png would replace a file, unless --overwrite=1."""
    for name in ("md", "png"):
        path = getattr(cfg, name)
        if path and os.path.exists(path) and not cfg.overwrite:
            raise ValueError(f"{path} is already there: --{name}=PATH writes elsewhere, --overwrite=1 replaces it")


def check_config(cfg):
    if not cfg.out_dir:
        raise ValueError("--out_dir is required: a run folder holding ckpt.pt (written by train.py)")
    if cfg.overwrite not in (0, 1):
        raise ValueError(f"--overwrite must be 0 or 1, got {cfg.overwrite}")
    if cfg.examples < 16:
        raise ValueError(f"--examples must be >= 16 (fit, validation and test need a few each), got {cfg.examples}")
    for name in ("test_frac", "val_frac"):
        if not 0 < getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be between 0 and 1 (exclusive), got {getattr(cfg, name)}")
    for name in ("max_names", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    if cfg.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {cfg.seed}")
    if cfg.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {cfg.threads}")
    if cfg.block != "all" and not cfg.block.isdigit():
        raise ValueError(f"--block must be all or the index of a GDN block (0, 1, ...), got {cfg.block!r}")
    runs.pick_device(cfg.device)


def help_text():
    meaning = dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.*)$", inspect.getsource(ProbeConfig), re.M))
    lines = [__doc__.strip(), "", "settings (--key=value):"]
    lines += [f"  --{f.name}={f.default}".ljust(36) + f" {meaning.get(f.name, '')}"
              for f in dataclasses.fields(ProbeConfig)]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The run: model, untrained twin, task, examples.


def load_trained_and_untrained(out_dir, device="cpu"):
    """(trained model, untrained model, task, the run's TrainConfig) from out_dir/ckpt.pt."""
    ckpt = read_checkpoint(out_dir)
    cfg = runs.saved_config(ckpt, train.TrainConfig)
    if cfg.task not in PROBED_TASKS:
        raise ValueError(f"--out_dir={out_dir} holds a {cfg.task} run: the probe supports {' and '.join(PROBED_TASKS)}")
    task = make_task(cfg.task, preset=cfg.preset, **ckpt["task"])
    config = runs.saved_model_config(ckpt)
    if config.eviction == "none":
        raise ValueError(f"--out_dir={out_dir} was trained with eviction none: no windows, nothing to probe; the probe "
                         f"reads S at window boundaries (eviction hard or sliding)")
    models = []
    for weights in (ckpt["model"], None):
        torch.manual_seed(cfg.seed)          # as train.py, right before it builds the model
        model = SleepLM(config)
        if weights is not None:
            model.load_state_dict(weights)
        models.append(model.to(device).eval())
    return models[0], models[1], task, cfg


def read_checkpoint(out_dir):
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise FileNotFoundError(f"no ckpt.pt in {out_dir}: --out_dir and --compare take a run folder "
                                f"written by train.py")
    return runs.load_checkpoint(os.path.join(out_dir, "ckpt.pt"))


def held_out_examples(task, n):
    """About n examples of the task's evaluation split, n / levels from each level; an example whose
    consolidated part (all that the probe reads) repeats an earlier one's is dropped, so that no input
    can be in both the fit and the test split. Returns (idx, targets)."""
    per_level = math.ceil(n / len(task.levels))
    parts = [task.eval_set(level, per_level)[:2] for level in task.levels]
    idx, targets = (torch.cat(x) for x in zip(*parts))
    consolidated = idx[:, :first_prediction_window(task, targets) * task.window]
    _, inverse = torch.unique(consolidated, dim=0, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), len(idx)).scatter_reduce(0, inverse, torch.arange(len(idx)), "amin")
    keep = torch.sort(first).values[:n]
    return idx[keep], targets[keep]


def first_prediction_window(task, targets):
    """Index of the first window that holds an answer (the windows before it are consolidated)."""
    windows = targets.split(task.window, dim=1)
    return next(w for w, part in enumerate(windows) if (part >= 0).any())


# -----------------------------------------------------------------------------
# Collecting S: SleepLM.forward (Algorithm 1), noting S after every pass.


@torch.no_grad()
def collect_states(model, idx, targets, windows, blocks, batch_size=256):
    """S (flattened, the given blocks' concatenated) after every pass of the given consolidation windows.

    Runs SleepLM.forward itself, its wake and sleep passes wrapped to note S after each pass.
    Returns (passes, carried): passes[w] is a list of N tensors (B, F), S after pass 1..N of window w;
    carried (B, F) is the S that enters the first prediction window.
    """
    N = model.config.sleep_passes
    first_prediction = model.plan_windows(idx, targets, model.config.window).index(False)
    passes = {w: [[] for _ in range(N)] for w in windows}
    carried = []

    def features(S):
        return torch.cat([S[i].reshape(S[i].shape[0], -1) for i in blocks], dim=1).cpu()

    noted = []   # per window forward ran: S entering it, then S after each of its passes
    wake_pass, sleep_pass = model.wake_pass, model.sleep_pass

    def noting_wake_pass(h, pos, state, **kwargs):
        noted.append([features(state.S)])
        *out, state = wake_pass(h, pos, state, **kwargs)
        noted[-1].append(features(state.S))
        return *out, state

    def noting_sleep_pass(*args, **kwargs):
        h, state = sleep_pass(*args, **kwargs)
        noted[-1].append(features(state.S))
        return h, state

    device = model.wte.weight.device
    model.wake_pass, model.sleep_pass = noting_wake_pass, noting_sleep_pass
    try:
        for rows in torch.arange(len(idx)).split(batch_size):
            noted.clear()
            model(idx[rows].to(device), targets[rows].to(device))
            for w in windows:
                for p in range(N):
                    passes[w][p].append(noted[w][1 + p])
            carried.append(noted[first_prediction][0])
    finally:
        del model.wake_pass, model.sleep_pass   # the model's own methods again
    return {w: [torch.cat(p) for p in per_pass] for w, per_pass in passes.items()}, torch.cat(carried)


def gdn_blocks(model, block):
    """Indices of the GDN blocks whose S is read: every one ("all") or the one given."""
    gdn = [i for i, b in enumerate(model.blocks) if b.kind == "G"]
    if block == "all":
        return gdn
    if int(block) not in gdn:
        raise ValueError(f"--block={block} is not a GDN block of this model (layers {model.config.layers}); "
                         f"allowed: all or one of {gdn}")
    return [int(block)]


# -----------------------------------------------------------------------------
# Targets, from the input tokens (and checked against the task's answers).


@dataclass
class Item:
    """One thing to read from S: labels (B, V, C) of V target variables in C columns (j or k), each a
    class index, or -1 where there is nothing to score; window: the window after whose passes S is read."""
    window: int
    labels: torch.Tensor
    name: str = ""


def rule110_rollout(cells, steps):
    """cells (B, W) in {0, 1} -> (B, steps + 1, W): the state after 0, 1, ..., steps updates.
    Periodic boundary (cell W - 1 is the left neighbour of cell 0), the table RULE_110."""
    table = torch.tensor([RULE_110[(left, centre, right)] for left in (0, 1) for centre in (0, 1) for right in (0, 1)])
    states = [cells]
    for _ in range(steps):
        cells = table[4 * cells.roll(1, dims=-1) + 2 * cells + cells.roll(-1, dims=-1)]
        states.append(cells)
    return torch.stack(states, dim=1)


def rule110_items(task, idx, targets):
    """One item per state (its window): every cell after j = 0 .. max t updates, labels (B, W cells, j)."""
    W, K = task.params["width"], task.params["states"]
    steps = max(task.supported_levels)
    if first_prediction_window(task, targets) != K:
        raise ValueError(f"rule110 layout: expected {K} consolidation windows (one per state), got another layout")
    items = []
    for w in range(K):
        text = [task.decode(row).split() for row in idx[:, w * W:(w + 1) * W]]
        if any(token not in ("0", "1") for row in text for token in row):
            raise ValueError(f"rule110 layout: window {w} holds tokens other than cells 0 and 1")
        rollout = rule110_rollout(torch.tensor([[int(t) for t in row] for row in text]), steps)   # (B, j, W)
        items.append(Item(window=w, labels=rollout.transpose(1, 2), name=f"state {w + 1}"))        # (B, W, j)
    # The query "?i@t<t>" at position K*W + i - 1 asks the first cell of state i after t updates.
    for b in range(len(idx)):
        for i in range(K):
            position = K * W + i
            query = re.fullmatch(r"\?(\d+)@t(\d+)", task.vocab[int(idx[b, position])])
            state, t = int(query.group(1)) - 1, int(query.group(2))
            if int(items[state].labels[b, 0, t]) != int(targets[b, position]):
                raise ValueError(f"rule110: the simulated first cell of state {state + 1} after {t} updates disagrees "
                                 f"with the task's answer in example {b}: the layout is not what the probe expects")
    return items


def depo_names(task):
    """Every name the task can draw, as token tuples: one lowercase letter, or an uppercase prefix + a letter."""
    letters = [t for t in task.vocab if re.fullmatch(r"[a-zA-Z]+", t)]
    singles = [t for t in letters if t.islower()]
    prefixes = [t for t in letters if t.isupper()]
    return [(s,) for s in singles] + [(p, t) for p in prefixes for t in letters]


def parse_names(tokens):
    """A run of name tokens -> names (an uppercase token starts a two-token name)."""
    names, i = [], 0
    while i < len(tokens):
        size = 2 if tokens[i].isupper() else 1
        names.append(tuple(tokens[i:i + size]))
        i += size
    return names


def depo_successors(task, row):
    """One example's tokens -> {name: successor}, from the edges "x -> y" of its graph section."""
    tokens = [t for t in task.decode(row[:task.params["graph_len"]]).split() if t != "<pad>"]
    successor, i = {}, 0
    while i < len(tokens):
        arrow = tokens.index("->", i)
        (source,) = parse_names(tokens[i:arrow])
        size = 2 if tokens[arrow + 1].isupper() else 1
        successor[source] = tuple(tokens[arrow + 1:arrow + 1 + size])
        i = arrow + 1 + size
    return successor


def walk(successor, name, hops):
    for _ in range(hops):
        name = successor[name]
    return name


def depo_check_queries(task, row, successor):
    """Each query "hopK start = answer" of the example must be answered by walking the decoded graph."""
    tokens = task.decode(row[task.params["graph_len"]:]).split()
    i = 0
    while i < len(tokens) and tokens[i] != "<pad>":
        equals = tokens.index("=", i)
        (start,) = parse_names(tokens[i + 1:equals])
        end = equals + 1
        while end < len(tokens) and not tokens[end].startswith("hop") and tokens[end] != "<pad>":
            end += 1
        if walk(successor, start, int(tokens[i][3:])) != tuple(tokens[equals + 1:end]):
            raise ValueError("depo: walking the decoded graph disagrees with a query's answer: the layout is not what "
                             "the probe expects")
        i = end


def depo_items(task, idx, targets, max_names, fit_rows):
    """One item, read after the last graph window: for each probed name, its k-hop successor (k = 1 .. max_hops)
    as a class (an index into depo_names), -1 where the name is not in the example's graph.
    The probed names: the max_names names most often in the graphs of fit_rows (the fit split)."""
    names = depo_names(task)
    index = {name: i for i, name in enumerate(names)}
    graph_windows = task.params["graph_len"] // task.window
    if first_prediction_window(task, targets) != graph_windows:
        raise ValueError(f"depo layout: expected {graph_windows} graph windows before the queries")
    successors = [depo_successors(task, row) for row in idx]
    for row, successor in zip(idx, successors):
        depo_check_queries(task, row, successor)
    counts = torch.zeros(len(names))
    for b in fit_rows.tolist():
        counts[[index[name] for name in successors[b]]] += 1
    probed = [names[i] for i in counts.argsort(descending=True, stable=True)[:max_names].tolist() if counts[i] > 0]
    hops = task.params["max_hops"]
    labels = torch.full((len(idx), len(probed), hops), -1, dtype=torch.long)
    for b, successor in enumerate(successors):
        for v, name in enumerate(probed):
            if name in successor:
                labels[b, v] = torch.tensor([index[walk(successor, name, k)] for k in range(1, hops + 1)])
    # What knowing only the graph's nodes gives: a node other than the start (the start itself when k is a
    # multiple of the cycle's length n), right with probability 1 / (n - 1).
    n = torch.tensor([len(successor) for successor in successors], dtype=torch.float64)[:, None, None]
    k = torch.arange(1, hops + 1)
    guess = torch.where(k % n == 0, 1.0, 1 / (n - 1)).expand(labels.shape).where(labels >= 0, torch.nan)
    return [Item(window=graph_windows - 1, labels=labels, name="graph")], len(names), probed, guess


# -----------------------------------------------------------------------------
# The read-out: ridge regression on one-hot targets, closed form.


def one_hot(labels, n_classes):
    """(B, M) class indices (-1: none) -> (B, M * n_classes) float64, all zeros where the label is -1."""
    return F.one_hot(labels.clamp(min=0), n_classes).mul_((labels >= 0)[..., None]).flatten(1).double()


def ridge_fitter(X):
    """Standardise X (B, F) and take its SVD once. Returns predict(Y, X_new, strength) -> ridge predictions:
    argmin_W |Z W - (Y - mean Y)|^2 + strength |W|^2, Z = standardised X, plus the mean of Y as intercept."""
    X = X.double()
    mean, std = X.mean(0), X.std(0)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))           # a constant feature carries nothing
    U, s, Vh = torch.linalg.svd((X - mean) / std, full_matrices=False)

    def predict(Y, X_new, strength):
        shrink = s / (s ** 2 + strength)                                 # W = V diag(s / (s^2 + strength)) U^T Y
        y_mean = Y.mean(0)
        return (((X_new.double() - mean) / std) @ Vh.T) @ (shrink[:, None] * (U.T @ (Y - y_mean))) + y_mean

    return predict


def readout_predictions(X_fit, labels_fit, X_test, n_classes, groups, val_frac, strengths=RIDGE_STRENGTHS):
    """Fit a linear read-out per target on (X_fit, labels_fit) and predict the classes of X_test.

    X_fit (B, F), labels_fit (B, M) class indices in 0..n_classes-1 or -1 (not scored; an all-zero target),
    X_test (B', F). The ridge strength is chosen per group (groups: (M,) ints, e.g. the column j) by accuracy
    on the last val_frac of the fit rows, fitted on the rest; then the read-out is refitted on all fit rows.
    Test labels are never seen here. Returns (B', M) predicted classes and the chosen strength per target.
    """
    n_val = max(1, round(val_frac * len(X_fit)))
    if len(X_fit) - n_val < 2:
        raise ValueError(f"too few fit examples ({len(X_fit)}) for a validation split of {val_frac}")
    M = labels_fit.shape[1]
    chunk = max(1, MAX_ONE_HOT_COLUMNS // n_classes)
    chosen = torch.empty(M, dtype=torch.float64)
    # 1. the strength: fit on the first rows, score on the held-out last rows of the fit split
    predict = ridge_fitter(X_fit[:-n_val])
    right = torch.zeros(len(strengths), M)          # correct validation answers per strength and target
    for cols in torch.arange(M).split(chunk):
        Y = one_hot(labels_fit[:-n_val, cols], n_classes)
        truth = labels_fit[-n_val:, cols]
        for i, strength in enumerate(strengths):
            guess = predict(Y, X_fit[-n_val:], strength).view(n_val, len(cols), n_classes).argmax(-1)
            right[i, cols] = ((guess == truth) & (truth >= 0)).sum(0).float()
    for g in groups.unique():
        members = groups == g
        chosen[members] = strengths[int(right[:, members].sum(1).argmax())]   # first best: ties go to the weakest
    # 2. refit on every fit row with the chosen strengths, predict the test rows
    predict = ridge_fitter(X_fit)
    guesses = torch.empty(len(X_test), M, dtype=torch.long)
    for strength in chosen.unique().tolist():
        for cols in torch.nonzero(chosen == strength).flatten().split(chunk):
            scores = predict(one_hot(labels_fit[:, cols], n_classes), X_test, strength)
            guesses[:, cols] = scores.view(len(X_test), len(cols), n_classes).argmax(-1)
    return guesses, chosen


def accuracy(guesses, labels):
    """Per target (M,): the fraction of scored test rows (label >= 0) predicted right; nan where none."""
    scored = labels >= 0
    return ((guesses == labels) & scored).sum(0) / scored.sum(0).double()


def majority_rate(labels, n_classes):
    """Per target (M,): the fraction of scored rows in the most frequent class (always guessing it)."""
    counts = one_hot(labels, n_classes).view(len(labels), -1, n_classes).sum(0)   # (M, n_classes)
    return counts.max(-1).values / counts.sum(-1)


# -----------------------------------------------------------------------------
# Probing one run.


def probe_states(passes, carried, items, split, n_classes, val_frac, shuffle=None):
    """Read every item from S after each pass of its window and from the S carried to the query.

    passes, carried: from collect_states. split: (fit rows, test rows). shuffle: a permutation of the fit
    rows, or None; with it the same read-outs are also fitted to targets shuffled across examples.
    Returns {row name: {"real": (items, V, C) test accuracy, "shuffled": ... or absent}}.
    """
    fit, test = split
    N = len(next(iter(passes.values())))
    sources = {f"pass {p + 1}": [passes[item.window][p] for item in items] for p in range(N)}
    sources["carried to query"] = [carried for _ in items]
    results = {}
    for row, states in sources.items():
        real, shuffled = [None] * len(items), [None] * len(items)
        for X in {id(X): X for X in states}.values():          # items read from the same S share one fit
            mine = [i for i, s in enumerate(states) if s is X]
            kinds = [("real", i, items[i].labels[fit]) for i in mine]
            if shuffle is not None:
                kinds += [("shuffled", i, items[i].labels[fit][shuffle]) for i in mine]
            labels_fit = torch.cat([lab.flatten(1) for _, _, lab in kinds], dim=1)
            groups = torch.cat([torch.arange(lab.shape[2]).repeat(lab.shape[1]) + n * lab.shape[2]
                                for n, (_, _, lab) in enumerate(kinds)])
            guesses, _ = readout_predictions(X[fit], labels_fit, X[test], n_classes, groups, val_frac)
            start = 0
            for kind, i, lab in kinds:
                V, C = lab.shape[1:]
                acc = accuracy(guesses[:, start:start + V * C], items[i].labels[test].flatten(1)).view(V, C)
                (real if kind == "real" else shuffled)[i] = acc
                start += V * C
        results[row] = {"real": torch.stack(real)}
        if shuffle is not None:
            results[row]["shuffled"] = torch.stack(shuffled)
    return results


def probe_run(out_dir, cfg, log=print):
    """Probe one run: the trained model, its untrained twin, shuffled targets. Returns a summary dict."""
    started = time.time()
    device = runs.pick_device(cfg.device)
    model, untrained, task, run_cfg = load_trained_and_untrained(out_dir, device)
    blocks = gdn_blocks(model, cfg.block)
    idx, targets = held_out_examples(task, cfg.examples)
    g = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(len(idx), generator=g)
    n_test = max(1, round(cfg.test_frac * len(idx)))
    split = (order[n_test:], order[:n_test])
    if task.name == "rule110":
        items, n_classes, names, node_guess = rule110_items(task, idx, targets), 2, None, None
    else:
        items, n_classes, names, node_guess = depo_items(task, idx, targets, cfg.max_names, split[0])
    shuffle = torch.randperm(len(split[0]), generator=g)
    windows = sorted({item.window for item in items})
    log(f"{out_dir}: {task.name} ({task.preset}), N = {model.config.sleep_passes}, layers {model.config.layers}, "
        f"S of GDN block(s) {blocks}; {len(idx)} held-out examples (fit {len(split[0])}, test {len(split[1])})")
    results = {}
    for name, m in (("trained", model), ("untrained", untrained)):
        passes, carried = collect_states(m, idx, targets, windows, blocks, cfg.batch_size)
        log(f"  {name}: S has {carried.shape[1]} features; fitting read-outs")
        results[name] = probe_states(passes, carried, items, split, n_classes, cfg.val_frac,
                                     shuffle if name == "trained" else None)
    test_labels = [item.labels[split[1]] for item in items]
    chance = {"chance (majority class)":
              torch.stack([majority_rate(lab.flatten(1), n_classes).view(lab.shape[1:]) for lab in test_labels])}
    if node_guess is not None:   # depo: the expected accuracy of guessing a node of the graph, on the test split
        chance["chance (a random other node of the graph)"] = node_guess[split[1]].nanmean(0)[None]
    return dict(out_dir=out_dir, task=task, run=run_cfg, N=model.config.sleep_passes, blocks=blocks,
                items=[item.name for item in items],
                features=carried.shape[1], examples=len(idx), fit=len(split[0]), test=len(split[1]),
                results=results, chance=chance, names=names, seconds=time.time() - started)


# -----------------------------------------------------------------------------
# Tables and heatmaps.


def panels(summary):
    """The views of a probe: (title, column label, column values, reduce) where reduce maps an (items, V, C)
    accuracy tensor to (C,): the mean over items and target variables (nan-aware)."""
    task = summary["task"]
    if task.name == "rule110":
        steps = list(range(max(task.supported_levels) + 1))
        return [("the first cell after j updates (what the query asks at t = j)", "j", steps,
                 lambda a: a[:, 0].nanmean(dim=0)),
                ("every cell of the state after j updates (mean over cells and states)", "j", steps,
                 lambda a: a.nanmean(dim=(0, 1)))]
    hops = list(range(1, task.params["max_hops"] + 1))
    return [(f"each node's k-hop successor (mean over {len(summary['names'])} names)", "k", hops,
             lambda a: a.nanmean(dim=(0, 1)))]


def accuracy_rows(summary, model, kind):
    """[(row label, (items, V, C) accuracy)] of one model ("trained" or "untrained") and kind ("real" or
    "shuffled"): every row of probe_states, and with several items (Rule 110's K states) the S carried to
    the query once more per item, since the earlier states must survive the later windows' writes."""
    rows = []
    for row, acc in summary["results"][model].items():
        rows.append((row, acc[kind]))
        if row == "carried to query" and len(summary["items"]) > 1:
            rows += [(f"{row}, {name}", acc[kind][i:i + 1]) for i, name in enumerate(summary["items"])]
    return rows


def table_rows(summary, reduce):
    """[(row label, (C,) accuracies)]: the trained rows, the controls, chance."""
    rows = [(row, reduce(acc)) for row, acc in accuracy_rows(summary, "trained", "real")]
    rows += [(f"untrained model, {row}", reduce(acc)) for row, acc in accuracy_rows(summary, "untrained", "real")]
    rows += [(f"shuffled targets, {row}", reduce(acc)) for row, acc in accuracy_rows(summary, "trained", "shuffled")]
    return rows + [(label, reduce(values)) for label, values in summary["chance"].items()]


def title(summary):
    """What was probed: task, changed task parameters, model, N, seed."""
    run, task = summary["run"], summary["task"]
    defaults = make_task(task.name, preset=task.preset).params
    changed = " ".join(f"{k}={runs.flag_text(v)}" for k, v in task.params.items() if v != defaults[k])
    return (f"{task.name} {task.preset} preset{' ' + changed if changed else ''}; "
            f"{run.layers * run.layer_repeat} d={run.n_embd}, N = {summary['N']}, seed {run.seed}")


def markdown(summary):
    lines = [f"### {title(summary)}", "",
             f"Run `{summary['out_dir']}`; S of GDN block(s) {summary['blocks']} ({summary['features']} features); "
             f"{summary['examples']} held-out examples, read-outs fitted on {summary['fit']} and scored on "
             f"{summary['test']}; {summary['seconds']:.0f} s.", ""]
    for heading, letter, columns, reduce in panels(summary):
        lines += [f"Test accuracy of a linear read-out of S: {heading}", "",
                  "| S read after | " + " | ".join(f"{letter}={c}" for c in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {label} | " + " | ".join(f"{v:.3f}" for v in values.tolist()) + " |"
                  for label, values in table_rows(summary, reduce)]
        lines.append("")
    return "\n".join(lines)


def heatmap_rows(summary, reduce):
    """The trained rows, then the controls (read from the S carried to the query) and chance: [(label, (C,))]."""
    results = summary["results"]
    rows = [(row, reduce(acc)) for row, acc in accuracy_rows(summary, "trained", "real")]
    rows += [("untrained, carried", reduce(results["untrained"]["carried to query"]["real"])),
             ("shuffled, carried", reduce(results["trained"]["carried to query"]["shuffled"]))]
    return rows + [(label, reduce(values)) for label, values in summary["chance"].items()]


def draw(summaries, path, log=print):
    """One column of heatmaps per run, side by side; one heatmap per panel (rows: S read after; columns: j or k)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: no heatmap drawn (the tables hold the same numbers)")
        return
    grids = [[(view, heatmap_rows(s, view[3])) for view in panels(s)] for s in summaries]   # [run][panel]
    lowest = min(float(v.min()) for run in grids for _, rows in run for _, v in rows)
    vmin = min(0.5, math.floor(10 * lowest) / 10)
    heights = [max(len(run[p][1]) for run in grids) for p in range(len(grids[0]))]
    columns = max(len(view[2]) for run in grids for view, _ in run)
    size = (1 + max(4.5, 2 + 0.6 * columns) * len(summaries), 1 + 0.32 * sum(heights) + 0.8 * len(heights))
    fig, axes = plt.subplots(len(heights), len(summaries), squeeze=False, figsize=size, layout="constrained",
                             gridspec_kw=dict(height_ratios=heights))
    for c, (summary, run) in enumerate(zip(summaries, grids)):
        for r, ((heading, letter, labels, _), rows) in enumerate(run):
            ax = axes[r][c]
            grid = torch.stack([values for _, values in rows]).numpy()
            image = ax.imshow(grid, vmin=vmin, vmax=1, cmap="viridis", aspect="auto")
            for i in range(grid.shape[0]):
                for j in range(grid.shape[1]):
                    light = grid[i, j] > vmin + 0.6 * (1 - vmin)
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if light else "white")
            ax.axhline(len(rows) - 2.5 - len(summary["chance"]), color="white", linewidth=3)   # controls below
            ax.set_xticks(range(len(labels)), [str(x) for x in labels], fontsize=8)
            ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
            ax.set_xlabel(letter, fontsize=8)
            ax.set_title(title(summary).replace("; ", "\n") + f"\n{heading}", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="test accuracy of a linear read-out of S")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    log(f"wrote {path}")


def check_same_task(cfg):
    """--compare must be a run of the same task (same parameters): its heatmaps sit beside the first run's."""
    tasks = []
    for out_dir in (cfg.out_dir, cfg.compare):
        ckpt = read_checkpoint(out_dir)
        tasks.append((ckpt["config"]["task"], ckpt["task"]))
    if tasks[0] != tasks[1]:
        raise ValueError(f"--compare={cfg.compare} holds another task than --out_dir={cfg.out_dir} "
                         f"({tasks[1][0]} {tasks[1][1]} against {tasks[0][0]} {tasks[0][1]}): compare runs of one task")


def main(argv, log=print):
    """Probe --out_dir (and --compare), print and write the tables, draw the heatmaps. Returns the summaries."""
    runs.line_buffered()                 # as train.py: each line as it is printed, also into a file or a pipe
    if "-h" in argv or "--help" in argv:
        print(help_text())
        return None
    cfg = parse_args(argv)
    check_outputs(cfg)
    if cfg.compare:
        check_same_task(cfg)
    device = runs.setup_device(cfg.device, cfg.threads)   # as train.py: the device, and on the CPU its threads
    threads = torch.get_num_threads()
    log(f"probe: device {device}" + (f", {threads} thread{'s' if threads > 1 else ''}" if device == "cpu" else ""))
    summaries = [probe_run(out_dir, cfg, log) for out_dir in [cfg.out_dir] + ([cfg.compare] if cfg.compare else [])]
    text = "\n".join(markdown(s) for s in summaries)
    log(text)
    if cfg.md:
        os.makedirs(os.path.dirname(cfg.md) or ".", exist_ok=True)
        with open(cfg.md, "w") as f:
            f.write(text + "\n")
        log(f"wrote {cfg.md}")
    if cfg.png:
        draw(summaries, cfg.png, log)
    return summaries


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
