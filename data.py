"""
The three tasks of "Do Language Models Need Sleep?", generated locally from a seed.

Read this file top to bottom: the shared conventions (split, batching, scoring) come first in the
Task base class, then one class per task, each with its layout drawn in its docstring:

    Rule110  K random states of W cells (paper: 4 x 24), each alone in its window; answer i is the
             first cell of state i after t Rule-110 updates (periodic boundary). Difficulty = t.
    Depo     a shuffled directed cycle listed as edges, evicted before the queries "k hops from
             start node: answer" (paper: 10 queries). Difficulty = hops k.
    Math     a GSM-Infinite-style word problem: question first, then shuffled statements and
             distractors, then the answer with no chain of thought. Difficulty = operation count.

Every task has a "paper" preset (the paper's exact layout) and a small "cpu" preset (the same
structure, small enough that a tiny model learns it on a laptop CPU in minutes); Rule 110 and Depo
also a "gpu" preset (the paper's layout, sized for minutes on one GPU). Any parameter can be
overridden: make_task("depo", preset="cpu", max_hops=6). Nothing is downloaded.

Shapes: B batch, T sequence length (task.seq_len, fixed per preset), L window (task.window).

Conventions shared by all tasks
- A batch is (idx, targets, difficulty): idx and targets are (B, T) torch.long, difficulty is (B,).
  targets[b, p] is the token the model must output after reading idx[b, :p + 1], and -1 wherever
  nothing is asked. So a window of L tokens with no target is a consolidation chunk (the model
  sleeps on it), and the window holding the answer targets is the prediction chunk. The layouts
  are built so that every window before the answers is free of targets (tests check it).
- Multi-token answers are teacher-forced: the answer tokens appear in idx and the target of each
  is placed one position earlier (Depo). Rule 110 never feeds its answers: its prediction chunk
  holds one query token per state, and the answer is the target at that query's position.
- An item is one answer (Rule 110: K per example; Depo: one per query; math: one per problem);
  an item is right when all its answer tokens are right. task.metric says how results are
  reported: "exact" (all items of an example right, Rule 110) or "item" (fraction of items right).
- Tokens are whole symbols (a cell, a node name, a word, a number); decode() joins them with
  spaces and encode() splits on whitespace, so text and ids convert both ways.

Train / evaluation split, disjoint by construction
- Every example is hashed (blake2b of its decoded input text, Task.in_eval_split). It belongs to
  the evaluation split iff hash % EVAL_BUCKETS == 0. The training stream resamples every evaluation-split example it
  draws; the evaluation stream keeps only evaluation-split examples. No input can be in both.
- train_batch(batch_size, step, seed) is a pure function of its arguments (resuming at step s
  needs no RNG state). eval_set(level, n, seed) draws from its own seed stream in fixed blocks of
  EVAL_BLOCK candidates, so it is fixed, and eval_set(level, n) is a prefix of eval_set(level, m)
  for n <= m.

Run `python data.py rule110` (or depo, math; add --preset paper, overrides such as
rendering=realistic or --rendering=realistic) to see decoded examples window by window, and --speed to time generation.
"""

import argparse
import ast
import hashlib
import itertools
import math
import sys
import time

import numpy as np
import torch

EVAL_BUCKETS = 16  # one input in EVAL_BUCKETS (by hash) is reserved for evaluation
EVAL_BLOCK = 64  # candidates drawn per RNG block of the evaluation stream
TRAIN_STREAM, EVAL_STREAM = 0, 1  # in every RNG seed, so the two streams never share a seed
PAD = "<pad>"


def require(ok, name, value, allowed):
    """Raise ValueError naming the parameter, its value and what is allowed, unless ok."""
    if not ok:
        raise ValueError(f"{name}={value!r} is invalid: {allowed}")


class Task:
    """
    What all tasks share: parameters, vocabulary, the train/eval split, batching and scoring.

    A subclass sets name, metric and presets, and provides
        _validate()                         check self.params, raise ValueError naming the parameter
        _build() -> list[str]               set derived attributes, return the vocabulary
        _generate(rng, n, levels, evaluation) -> (idx, targets, difficulty) numpy int64 arrays of
                                            shapes (n, T), (n, T), (n,); levels is a tuple of
                                            difficulties to draw from uniformly; evaluation=True
                                            asks for the evaluation distribution at that level
    and sets self.window, self.seq_len, self.items_per_example, self.train_levels (the training
    distribution's difficulties) and self.supported_levels (what the vocabulary can express).
    """

    name = ""
    metric = ""
    level_name = ""  # what a difficulty level counts: t, k or op
    presets = {}

    def __init__(self, preset="cpu", **overrides):
        require(preset in self.presets, "preset", preset, f"one of {sorted(self.presets)}")
        defaults = self.presets[preset]
        for key, value in overrides.items():
            require(key in defaults, key, value, f"unknown parameter for {self.name}; allowed: {sorted(defaults)}")
            require(_same_kind(value, defaults[key]), key, value, f"must be of the same kind as {defaults[key]!r}")
        self.preset = preset
        self.params = {**defaults, **overrides}
        self.params["levels"] = tuple(int(level) for level in self.params["levels"])
        require(len(self.params["levels"]) > 0, "levels", self.params["levels"], "needs at least one level")
        self._validate()
        self.vocab = self._build()
        self.vocab_size = len(self.vocab)
        self.token_id = {token: i for i, token in enumerate(self.vocab)}
        self.levels = self.params["levels"]

    # ---- vocabulary
    def encode(self, text_or_tokens):
        """'a -> b' or ['a', '->', 'b'] -> list of token ids."""
        tokens = text_or_tokens.split() if isinstance(text_or_tokens, str) else list(text_or_tokens)
        unknown = [token for token in tokens if token not in self.token_id]
        require(not unknown, "text", unknown[:5], f"tokens not in the {self.name} vocabulary")
        return [self.token_id[token] for token in tokens]

    def decode(self, ids):
        """Token ids (list, array or tensor) -> space-separated text."""
        return " ".join(self.vocab[i] for i in np.asarray(ids).reshape(-1).tolist())

    # ---- batches
    def train_batch(self, batch_size, step, seed=0, levels=None):
        """
        The batch of training step `step`: a pure function of (seed, step, batch_size, levels).
        levels=None draws difficulties from the training distribution; levels=[...] draws them
        uniformly from the given values (for curricula). Returns (idx, targets, difficulty):
        (B, T), (B, T), (B,) torch.long.
        """
        require(batch_size >= 1, "batch_size", batch_size, "must be >= 1")
        require(step >= 0 and seed >= 0, "step/seed", (step, seed), "must be >= 0")
        levels = self.train_levels if levels is None else self._checked_levels(levels, "levels")
        rng = np.random.default_rng([seed, TRAIN_STREAM, step])
        return self._keep_split(lambda attempt, missing: self._generate(rng, missing, levels, evaluation=False),
                                batch_size, evaluation=False)

    def eval_set(self, level, n, seed=0):
        """
        The first n examples of the fixed evaluation stream at difficulty `level` (its own seeds,
        only evaluation-split inputs). Returns (idx, targets, difficulty): (n, T), (n, T), (n,).
        """
        require(n >= 1, "n", n, "must be >= 1")
        require(seed >= 0, "seed", seed, "must be >= 0")
        (level,) = self._checked_levels([level], "level")
        return self._keep_split(lambda block, missing: self._generate(
            np.random.default_rng([seed, EVAL_STREAM, level, block]), EVAL_BLOCK, (level,), evaluation=True),
            n, evaluation=True)

    def _keep_split(self, draw, n, evaluation):
        """Call draw(attempt, missing) -> candidate (idx, targets, difficulty) for attempt = 0, 1, ...
        and keep the candidates of the wanted split until there are n; return them as torch.long."""
        parts, have = [], 0
        for attempt in itertools.count():
            if have >= n:
                return _to_torch(parts, n)
            require(attempt < 100 or have > 0, "params", self.params,
                    f"the {'evaluation' if evaluation else 'training'} split is empty: too few distinct inputs")
            idx, targets, difficulty = draw(attempt, n - have)
            keep = self.in_eval_split(idx) == evaluation
            parts.append((idx[keep], targets[keep], difficulty[keep]))
            have += int(keep.sum())

    def in_eval_split(self, idx):
        """(B, T) input tokens -> (B,) bool: True for examples of the evaluation split, decided by
        a stable hash of the decoded text (so it does not depend on how ids are numbered)."""
        digests = [hashlib.blake2b(self.decode(row).encode(), digest_size=8).digest() for row in idx]
        return np.array([int.from_bytes(d, "little") % EVAL_BUCKETS == 0 for d in digests], dtype=bool)

    def _checked_levels(self, levels, name):
        levels = tuple(int(level) for level in levels)
        require(len(levels) > 0 and set(levels) <= set(self.supported_levels), name, levels,
                f"must be a non-empty subset of {self.supported_levels}")
        return levels

    # ---- scoring
    def item_index(self, targets):
        """(B, T) targets -> (B, T) long: which item each answer position belongs to, -1 elsewhere.
        Default: every answer token is an item of its own (Rule 110, math)."""
        is_answer = targets != -1
        return torch.where(is_answer, is_answer.long().cumsum(dim=1) - 1, -1)

    def score(self, pred, targets):
        """pred: (B, T) predicted token ids (argmax of the logits), targets: (B, T) ->
        (B, items_per_example) bool: True where every answer token of the item is right."""
        item = self.item_index(targets)
        wrong = (pred != targets) & (item >= 0)
        right = torch.ones(targets.shape[0], self.items_per_example, dtype=torch.bool, device=targets.device)
        rows, positions = wrong.nonzero(as_tuple=True)
        right[rows, item[rows, positions]] = False
        return right


def _same_kind(value, default):
    """Overrides keep the kind of the preset value: int, str, or a sequence of ints."""
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(is_int(v) for v in value)
    if isinstance(default, str):
        return isinstance(value, str)
    return is_int(value)


def _to_torch(parts, n):
    """Concatenate (idx, targets, difficulty) numpy parts, keep the first n rows, as torch.long."""
    return tuple(torch.from_numpy(np.concatenate(arrays)[:n].astype(np.int64)) for arrays in zip(*parts))


def _letter_names(count, letters):
    """count distinct names: 'a'..'z', then 'aa', 'ab', ... (spreadsheet-column style)."""
    names, width = [], 1
    while len(names) < count:
        for i in range(len(letters) ** width):
            digits = [letters[(i // len(letters) ** p) % len(letters)] for p in reversed(range(width))]
            names.append("".join(digits))
        width += 1
    return names[:count]


class ScalarDraws:
    """Uniform integers for Python loops, cut from vectorised numpy draws of rng: one scalar call
    to a numpy Generator costs microseconds, and a paper-size math problem needs thousands."""

    def __init__(self, rng, chunk=4096):
        self.rng, self.chunk, self.buffer = rng, chunk, []

    def below(self, n):
        """A uniform integer in 0..n-1."""
        if not self.buffer:
            self.buffer = self.rng.random(self.chunk).tolist()
        return int(self.buffer.pop() * n)


# ----------------------------------------------------------------------------------------------
# Rule 110


def rule110_step(cells):
    """One Rule-110 update of (..., W) cells in {0, 1} with periodic boundary (cell W-1 is the left
    neighbour of cell 0). The new cell is bit (4*left + 2*centre + right) of the number 110:
    111->0 110->1 101->1 100->0 011->1 010->1 001->1 000->0."""
    pattern = 4 * np.roll(cells, 1, axis=-1) + 2 * cells + np.roll(cells, -1, axis=-1)
    return (110 >> pattern) & 1


class Rule110(Task):
    """
    K independent random states of W cells; answer i is the first cell of state i after t Rule-110
    updates (periodic boundary, see rule110_step). Window L = W: each state fills exactly one
    window (consolidation chunks), then a prediction chunk of K query tokens "?i@t<t>" (state i
    after t updates, e.g. "?2@t32"). The answers are never fed as input: the target at query i is
    answer i, so no state token is in the prediction chunk.

        position  0 .. W-1 | W .. 2W-1 | ... | (K-1)W .. KW-1 | KW .. KW+K-1
        idx       state 1  | state 2   | ... | state K        | ?1@t<t> .. ?K@t<t>
        targets   -1 ...   | -1 ...    | ... | -1 ...         | answer 1 .. answer K
        T = K*W + K (paper: 4*24 + 4 = 100)

    Paper preset, decoded by `python data.py rule110 --preset paper` (one window per line):
        consolidate     0: 1 1 1 0 0 0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 0 1 1 0
        consolidate    24: 0 1 1 0 1 1 1 0 0 1 0 1 0 0 0 0 0 0 0 0 0 1 1 1
        consolidate    48: 0 1 1 0 0 1 1 1 0 1 1 1 1 1 1 0 1 0 1 1 1 1 0 0
        consolidate    72: 0 0 1 1 0 1 1 0 1 1 0 0 1 1 1 0 1 0 0 1 0 0 1 1
        predict        96: ?1@t32 ?2@t32 ?3@t32 ?4@t32
        answers: 0 | 0 | 1 | 1

    Difficulty = t. Training draws t uniformly from t_min..t_max; levels are the evaluation t.
    The query tokens carry t because the model must be told which rollout is asked when t varies.
    Metric "exact": an example is right when all K answers are right (chance 2^-K).
    """

    name = "rule110"
    metric = "exact"
    level_name = "t"
    presets = {
        "paper": dict(states=4, width=24, t_min=32, t_max=32, levels=(32,)),
        # gpu: the paper's layout (4 states of 24 cells, L = 24) at the cpu preset's rollouts.
        "gpu": dict(states=4, width=24, t_min=1, t_max=8, levels=(2, 4, 6, 8)),
        # W=12 is too small: 4096 states can be memorised as a lookup table.
        "cpu": dict(states=1, width=16, t_min=1, t_max=8, levels=(2, 4, 6, 8)),
    }

    def _validate(self):
        p = self.params
        require(p["width"] >= 3, "width", p["width"], "must be >= 3 (a cell has two neighbours)")
        require(1 <= p["states"] <= p["width"], "states", p["states"],
                f"must be in 1..width={p['width']} so the K query tokens fit in one window")
        require(p["t_min"] >= 0, "t_min", p["t_min"], "must be >= 0")
        require(p["t_max"] >= p["t_min"], "t_max", p["t_max"], f"must be >= t_min={p['t_min']}")
        require(min(p["levels"]) >= 0, "levels", p["levels"], "every rollout t must be >= 0")

    def _build(self):
        p = self.params
        self.window = p["width"]
        self.seq_len = p["states"] * p["width"] + p["states"]
        self.items_per_example = p["states"]
        self.train_levels = tuple(range(p["t_min"], p["t_max"] + 1))
        self.supported_levels = tuple(sorted(set(self.train_levels) | set(p["levels"])))
        vocab = ["0", "1"]  # cell value == token id
        self.query_ids = np.full((max(self.supported_levels) + 1, p["states"]), -1)  # (t, K)
        for t in self.supported_levels:
            self.query_ids[t] = np.arange(len(vocab), len(vocab) + p["states"])
            vocab += [f"?{i + 1}@t{t}" for i in range(p["states"])]
        return vocab

    def _generate(self, rng, n, levels, evaluation):
        states, width = self.params["states"], self.params["width"]
        initial = rng.integers(0, 2, size=(n, states, width))  # (n, K, W)
        rollouts = rng.choice(levels, size=n)
        cells, first_cells = initial, [initial[:, :, 0]]  # first cell after 0, 1, 2, ... updates
        for _ in range(rollouts.max()):
            cells = rule110_step(cells)
            first_cells.append(cells[:, :, 0])
        answers = np.stack(first_cells, axis=2)[np.arange(n), :, rollouts]  # (n, K)
        idx = np.concatenate([initial.reshape(n, states * width), self.query_ids[rollouts]], axis=1)
        targets = np.full_like(idx, -1)
        targets[:, states * width:] = answers  # token id of a cell value is the value
        return idx, targets, rollouts


# ----------------------------------------------------------------------------------------------
# Depo


class Depo(Task):
    """
    k-hop retrieval on a shuffled directed cycle (Depo, after Physics of Language Models 4.1).

    A cycle over n nodes with random names is listed as its n edges "x -> y" in shuffled order,
    left-padded to graph_len tokens; graph_len is a whole number of windows, so the graph is
    consolidated and evicted before the first query. The query section (query_len <= L tokens,
    right-padded) holds `queries` queries "hopK start = answer": answer is the K-th successor of
    start (K may exceed a small n: the walk goes round the cycle). Answers are teacher-forced:
    the target at "=" is the answer's first token, at that token the second one (if any).

        position  0 .. graph_len-1 (graph_len/L windows)   | graph_len .. T-1 (prediction chunk)
        idx       <pad> ... <pad> x -> y y -> z z -> x ... | hop2 y = x hop1 z = x ... <pad>
        targets   -1 everywhere                            | at each "=" and each answer token
                                                             but the last: the next answer token
        T = graph_len + query_len (paper: 300 + 60 = 360, L = 75)

    Node names are a prefix code over name_tokens letters, so "x -> y x -> y" parses without
    separators: the first name_tokens - prefix_tokens letters (lowercase) are one-token names, the
    other prefix_tokens letters (uppercase) only start two-token names ("C" + any letter). Each
    example draws how many two-token names it uses, uniformly within what the graph section can
    hold (a one-token name costs 2 graph tokens, a two-token name 4, an arrow 1); the paper preset
    fits its worst case, 75 nodes with 35-37 two-token names, into 300 tokens.

    Training: n in min_nodes..max_nodes with weight 1/(n + sqrt(max_nodes)), every query's hop
    uniform in 1..max_hops, difficulty = the largest hop in the example. Evaluation at level k:
    n = max_nodes and all queries at hop k. No query of an example can be answered from an earlier
    one in the same window (its answer would already stand there, teacher-forced): the (hop, start)
    pairs are distinct, and so are their (hop mod n, start), since k and k + n hops from one start
    end on the same node. At evaluation the starts are distinct. Metric "item": the fraction of
    queries answered.

    CPU preset, decoded by `python data.py depo` (one window per line):
        consolidate     0: <pad>*9 a -> f b -> o o -> a f -> d d -> b
        predict        24: hop2 a = d hop2 b = a hop2 f = b
        answers: d | a | b
    Paper preset, a piece of the graph: ... b -> D H G w -> A c C G -> C ac A k -> b ...
    (edges b -> "D H", "G w" -> "A c", "C G" -> "C ac", "A k" -> b).
    """

    name = "depo"
    metric = "item"
    level_name = "k"
    presets = {
        "paper": dict(max_nodes=75, min_nodes=3, name_tokens=50, prefix_tokens=10, max_hops=16,
                      levels=(1, 2, 4, 8, 16), queries=10, graph_len=300, query_len=60, window=75),
        # cpu: up to 8 nodes, the whole graph in one window of 24 (consolidated, then evicted), k <= 2.
        # A 16-node graph over 4 windows of 12 with k <= 4 (the first cpu preset) learned k = 1 only
        # in 2000 steps at N = 1 and N = 4 alike (README, "Making sleep pay off").
        "cpu": dict(max_nodes=8, min_nodes=3, name_tokens=16, prefix_tokens=0, max_hops=2,
                    levels=(1, 2), queries=3, graph_len=24, query_len=12, window=24),
        # gpu: the paper's layout at 40% scale: up to 32 nodes (16 one-token names, 192 two-token ones) in a
        # graph of 128-160 tokens over 4 windows of 40, evicted before 6 queries, k <= 8.
        "gpu": dict(max_nodes=32, min_nodes=3, name_tokens=24, prefix_tokens=8, max_hops=8,
                    levels=(1, 2, 4, 8), queries=6, graph_len=160, query_len=36, window=40),
    }

    def _validate(self):
        p = self.params
        require(p["min_nodes"] >= 3, "min_nodes", p["min_nodes"], "must be >= 3")
        require(p["max_nodes"] >= p["min_nodes"], "max_nodes", p["max_nodes"], f"must be >= min_nodes={p['min_nodes']}")
        require(p["name_tokens"] >= 1, "name_tokens", p["name_tokens"], "must be >= 1")
        require(0 <= p["prefix_tokens"] < p["name_tokens"], "prefix_tokens", p["prefix_tokens"],
                f"must be in 0..name_tokens-1={p['name_tokens'] - 1}")
        require(1 <= p["max_hops"] <= p["max_nodes"], "max_hops", p["max_hops"],
                f"must be in 1..max_nodes={p['max_nodes']}")
        require(1 <= min(p["levels"]) and max(p["levels"]) <= p["max_nodes"], "levels", p["levels"],
                f"every hop count must be in 1..max_nodes={p['max_nodes']}")
        require(1 <= p["queries"] <= p["max_nodes"], "queries", p["queries"],
                f"must be in 1..max_nodes={p['max_nodes']}: the queries of an example have distinct starts at one hop")
        require(p["window"] >= 1, "window", p["window"], "must be >= 1")
        require(p["graph_len"] >= p["window"] and p["graph_len"] % p["window"] == 0, "graph_len", p["graph_len"],
                f"must be a positive multiple of window={p['window']} so the graph is evicted before the queries")
        require(1 <= p["query_len"] <= p["window"], "query_len", p["query_len"],
                f"must be in 1..window={p['window']} so the queries form one prediction chunk")
        longest_name = 2 if p["prefix_tokens"] else 1
        longest_query = 2 + 2 * longest_name  # hop, start, "=", answer
        require(p["queries"] * longest_query <= p["query_len"], "query_len", p["query_len"],
                f"must hold {p['queries']} queries of up to {longest_query} tokens")
        distinct_names = p["name_tokens"] - p["prefix_tokens"] + p["prefix_tokens"] * p["name_tokens"]
        require(distinct_names >= p["max_nodes"], "name_tokens", p["name_tokens"],
                f"with prefix_tokens={p['prefix_tokens']} gives {distinct_names} names, "
                f"fewer than max_nodes={p['max_nodes']}")
        for nodes in range(p["min_nodes"], p["max_nodes"] + 1):
            fewest, most = self._two_token_name_range(nodes)
            require(fewest <= most, "graph_len", p["graph_len"],
                    f"cannot hold {nodes} edges with names from name_tokens={p['name_tokens']}, "
                    f"prefix_tokens={p['prefix_tokens']}")

    def _two_token_name_range(self, nodes):
        """(fewest, most) two-token names an n-node example can use: enough for distinct names,
        few enough that the n edges (2*n name occurrences + n arrows) fit in graph_len."""
        p = self.params
        singles = p["name_tokens"] - p["prefix_tokens"]
        fewest = max(0, nodes - singles)
        most = min(nodes, p["prefix_tokens"] * p["name_tokens"], (p["graph_len"] - 3 * nodes) // 2)
        return fewest, most

    def _build(self):
        p = self.params
        self.window = p["window"]
        self.seq_len = p["graph_len"] + p["query_len"]
        self.items_per_example = p["queries"]
        self.train_levels = tuple(range(1, p["max_hops"] + 1))
        self.supported_levels = tuple(range(1, max(p["max_hops"], *p["levels"]) + 1))
        self.node_counts = np.arange(p["min_nodes"], p["max_nodes"] + 1)
        weights = 1.0 / (self.node_counts + math.sqrt(p["max_nodes"]))
        self.node_weights = weights / weights.sum()
        singles = p["name_tokens"] - p["prefix_tokens"]
        letters = _letter_names(singles, "abcdefghijklmnopqrstuvwxyz")
        letters += _letter_names(p["prefix_tokens"], "ABCDEFGHIJKLMNOPQRSTUVWXYZ")
        vocab = [PAD, "->", "="] + [f"hop{k}" for k in self.supported_levels] + letters
        token_id = {token: i for i, token in enumerate(vocab)}
        self.pad_id, self.arrow_id, self.equals_id = token_id[PAD], token_id["->"], token_id["="]
        self.hop_id = {k: token_id[f"hop{k}"] for k in self.supported_levels}
        self.letter_ids = np.array([token_id[letter] for letter in letters])  # singles, then prefixes
        return vocab

    def _sample_names(self, rng, nodes):
        """Distinct names for `nodes` nodes, in cycle order: a list of 1- or 2-tuples of ids."""
        p = self.params
        singles = p["name_tokens"] - p["prefix_tokens"]
        fewest, most = self._two_token_name_range(nodes)
        two_token = int(rng.integers(fewest, most + 1))
        names = [(self.letter_ids[i],) for i in rng.choice(singles, nodes - two_token, replace=False)]
        for code in rng.choice(p["prefix_tokens"] * p["name_tokens"], two_token, replace=False):
            prefix, second = divmod(code, p["name_tokens"])
            names.append((self.letter_ids[singles + prefix], self.letter_ids[second]))
        return [names[i] for i in rng.permutation(nodes)]

    def _generate(self, rng, n, levels, evaluation):
        p = self.params
        idx = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        targets = np.full_like(idx, -1)
        difficulty = np.empty(n, dtype=np.int64)
        for row in range(n):
            nodes = p["max_nodes"] if evaluation else self._draw_node_count(rng, levels)
            names = self._sample_names(rng, nodes)  # node i -> node i+1 (mod nodes)
            graph = []
            for i in rng.permutation(nodes):
                graph += [*names[i], self.arrow_id, *names[(i + 1) % nodes]]
            idx[row, p["graph_len"] - len(graph):p["graph_len"]] = graph
            # No two queries with the same answer for the same reason: a repeated (hop, start), or
            # hops that differ by a multiple of n from one start, would find the answer teacher-forced
            # earlier in the window, answerable without remembering the graph. Drawn until it holds.
            while True:
                pairs = rng.choice(len(levels) * nodes, size=p["queries"], replace=False)
                hops, starts = np.asarray(levels)[pairs // nodes], pairs % nodes
                if len(set(zip((hops % nodes).tolist(), starts.tolist()))) == p["queries"]:
                    break
            position = p["graph_len"]
            for hop, start in zip(hops, starts):
                answer = names[(start + hop) % nodes]
                query = [self.hop_id[int(hop)], *names[start], self.equals_id, *answer]
                idx[row, position:position + len(query)] = query
                answer_start = position + len(query) - len(answer)
                targets[row, answer_start - 1:answer_start - 1 + len(answer)] = answer
                position += len(query)
            difficulty[row] = hops.max()
        return idx, targets, difficulty

    def _draw_node_count(self, rng, levels):
        """A training graph's n, weighted 1/(n + sqrt(max_nodes)) over the n that give at least
        `queries` queries with distinct answers-by-construction: (hop mod n, start) pairs."""
        residues = np.array([len({level % n for level in levels}) for n in self.node_counts])
        enough = self.node_counts * residues >= self.params["queries"]
        require(enough.any(), "levels", levels, f"too few hop counts for {self.params['queries']} distinct queries")
        weights = self.node_weights * enough
        return int(rng.choice(self.node_counts, p=weights / weights.sum()))

    def item_index(self, targets):
        """Each query's answer is one run of consecutive target positions: number the runs."""
        is_answer = targets != -1
        run_start = is_answer & ~torch.nn.functional.pad(is_answer[:, :-1], (1, 0), value=False)
        return torch.where(is_answer, run_start.long().cumsum(dim=1) - 1, -1)


# ----------------------------------------------------------------------------------------------
# Math

ANIMALS = ("owls foxes bats deer wolves bears hares otters eagles hawks crows frogs toads moles voles "
           "mice rats ducks geese swans herons beavers badgers lynxes ravens finches robins lizards newts "
           "snails").split()
PLACES = ("oakridge riverside pinecrest brookfield maplewood stonebridge ashford elmwood fernhill glenmoor "
          "hollowbrook ivydale lakeshore millbrook northfield oxbow redcliff sandhurst thornbury underhill "
          "westmere willowby yarrow zennor ambleside bramley cedarton dunmore eastbury foxton").split()

# One template per statement kind; {x} is the quantity defined, {a} {b} quantities it uses, {c} a number.
TEMPLATES = {
    "symbolic": {
        "question": "what is {x} ?",
        "const": "{x} = {c} .",
        "sum": "{x} = {a} + {b} .",
        "diff": "{x} = {a} - {b} .",
        "more": "{x} = {a} + {c} .",
    },
    "realistic": {
        "question": "what is {x} ?",
        "const": "{x} is {c} .",
        "sum": "{x} equals the sum of {a} and {b} .",
        "diff": "{x} equals the difference of {a} and {b} .",
        "more": "{x} is {c} more than {a} .",
    },
}
OPERATIONS = ("sum", "diff", "more")
STATEMENT_SLOTS = {"const": ("{c}",), "sum": ("{a}", "{b}"), "diff": ("{a}", "{b}"), "more": ("{a}", "{c}")}


def quantity_names(rendering, count):
    """The first `count` quantity names as token lists: symbolic V0, V1, ...; realistic
    'the number of owls in oakridge', pairing animals and places along diagonals so the first
    names already use every animal and many places."""
    if rendering == "symbolic":
        return [[f"V{q}"] for q in range(count)]
    names = []
    for q in range(count):
        shift, animal = divmod(q, len(ANIMALS))
        names.append(["the", "number", "of", ANIMALS[animal], "in", PLACES[(animal + shift) % len(PLACES)]])
    return names


def node_value(node, values):
    """Value of one graph node given the values of the nodes before it.
    node: ("const", c) | ("sum", a, b) | ("diff", a, b) | ("more", a, c); a, b are node indices."""
    kind = node[0]
    if kind == "const":
        return node[1]
    if kind == "sum":
        return values[node[1]] + values[node[2]]
    if kind == "diff":
        return values[node[1]] - values[node[2]]
    return values[node[1]] + node[2]


class Math(Task):
    """
    GSM-Infinite-style problems without chain of thought. A random computational graph of
    quantities holds exactly `op` operations on the solution path, plus distractor statements about
    quantities the question does not need; its statements are shuffled. The question comes first,
    the answer (one number token) right after the "answer" marker at the end.

        position  0 ..................... L-1 | L ......................... len-1 | len .. T-1
        idx       what is V35 ? V1 = V33 - V30 ... | ... V33 = 12 . answer 7          | <pad> ...
        targets   -1 ...                           | -1 ...            7 (at "answer") | -1 ...
                  consolidation window             | prediction chunk (one pass)
        problem length len in min_tokens..max_tokens, T = max_tokens (paper: 2048..3300,
        L = 2000, T = 3300; cpu: 34..56, L = 32, T = 56)

    The first window holds the question and the start of the context, so what it says reaches
    the answer only through the recurrent state; min_tokens >= L + 2 puts the answer after it.
    With T <= 2L (both presets) there is exactly one consolidation window and one prediction chunk.

    The graph: a constant, then op operations each applied to the previous result and (for sums and
    differences) a second quantity, new or already on the path; so all op operations are needed.
    Distractors are constants or operations on any earlier quantities, added in random kinds until
    the drawn length is reached. Each quantity is defined once. Values stay in 0..values-1 without
    wrap-around: an operation that would leave the range is turned into a difference, whose larger
    operand is written first. The answer is the value of the asked quantity from evaluating the
    graph (node_value). Tokens are whole words, names, operators and numbers.

    Two renderings of the same graph (rendering="symbolic" or "realistic", TEMPLATES above): a
    quantity is "V12" or "the number of owls in oakridge", and a statement of each kind reads
        const  V30 = 7 .          the number of ducks in thornbury is 7 .
        sum    V53 = V28 + V58 .  the number of geese in underhill equals the sum of the number of
                                  mice in redcliff and the number of toads in lakeshore .
        diff   V1 = V33 - V30 .   ... equals the difference of ... and ... .  (first minus second)
        more   V24 = V9 + 1 .     the number of mice in redcliff is 1 more than the number of hawks
                                  in glenmoor .
    The cpu preset (values 0..9), decoded by `python data.py math` (one window per line):
        consolidate     0: what is V13 ? V0 = V22 + 6 . V11 = V18 - V15 . V22 = 3 . V20 = V16 + 1 .
                           V18 = 6 . V15 =
        predict        32: 5 . V16 = 6 . V7 = V13 + V18 . V13 = V20 - V18 . answer 1 <pad>*4
        answers: 1                                    (op 2: V13 = V20 - V18 = (V16 + 1) - 6 = 7 - 6)
    Difficulty = op. Training draws op uniformly in op_min..op_max. Metric "item": accuracy.
    """

    name = "math"
    metric = "item"
    level_name = "op"
    presets = {
        "paper": dict(rendering="symbolic", op_min=1, op_max=8, levels=(2, 4, 6, 8), values=20,
                      quantities=900, min_tokens=2048, max_tokens=3300, window=2000),
        # The cpu preset is the small setting that a 2-layer model learns from scratch in minutes
        # (README, Results: the levers tried). The realistic rendering is about 3x longer: give it
        # REALISTIC_CPU's sizes.
        "cpu": dict(rendering="symbolic", op_min=1, op_max=2, levels=(1, 2), values=10,
                    quantities=24, min_tokens=34, max_tokens=56, window=32),
    }

    REALISTIC_CPU = dict(min_tokens=98, max_tokens=168, window=96)   # the cpu preset's sizes for realistic statements

    def _validate(self):
        p = self.params
        require(p["rendering"] in TEMPLATES, "rendering", p["rendering"], f"one of {sorted(TEMPLATES)}")
        require(p["op_min"] >= 1, "op_min", p["op_min"], "must be >= 1")
        require(p["op_max"] >= p["op_min"], "op_max", p["op_max"], f"must be >= op_min={p['op_min']}")
        require(min(p["levels"]) >= 1, "levels", p["levels"], "every operation count must be >= 1")
        require(p["values"] >= 2, "values", p["values"], "must be >= 2")
        require(p["window"] >= 1, "window", p["window"], "must be >= 1")
        require(p["min_tokens"] >= p["window"] + 2, "min_tokens", p["min_tokens"],
                f"must be >= window + 2 = {p['window'] + 2} so the answer lies after the first window")
        pool = len(ANIMALS) * len(PLACES) if p["rendering"] == "realistic" else math.inf
        require(p["quantities"] <= pool, "quantities", p["quantities"],
                f"must be <= {pool} for the realistic rendering")
        lengths = self._statement_lengths()
        longest = max(lengths[kind] for kind in OPERATIONS)
        sizes = " ".join(f"{k}={v}" for k, v in self.REALISTIC_CPU.items())
        hint = (" (realistic statements are about 3x longer than symbolic ones; at the cpu preset give "
                f"{sizes})") if p["rendering"] == "realistic" else ""
        require(p["max_tokens"] >= p["min_tokens"] + longest, "max_tokens", p["max_tokens"],
                f"must be >= min_tokens + {longest} (the longest statement){hint}")
        require(p["quantities"] * lengths["const"] >= p["max_tokens"], "quantities", p["quantities"],
                f"must be >= {math.ceil(p['max_tokens'] / lengths['const'])}: distractors need fresh quantities")
        hardest = max(p["op_max"], *p["levels"])
        worst = lengths["question"] + hardest * longest + (hardest + 1) * lengths["const"] + 2
        require(worst <= p["max_tokens"], "max_tokens", p["max_tokens"],
                f"must be >= {worst} to fit a problem with {hardest} operations{hint}")

    def _statement_lengths(self):
        """Tokens per statement kind (and for the question) in this rendering."""
        name_len = len(quantity_names(self.params["rendering"], 1)[0])
        lengths = {}
        for kind, template in TEMPLATES[self.params["rendering"]].items():
            pieces = template.split()
            lengths[kind] = len(pieces) + (name_len - 1) * sum(piece in ("{x}", "{a}", "{b}") for piece in pieces)
        return lengths

    def _build(self):
        p = self.params
        self.window = p["window"]
        self.seq_len = p["max_tokens"]
        self.items_per_example = 1
        self.train_levels = tuple(range(p["op_min"], p["op_max"] + 1))
        self.supported_levels = tuple(range(1, max(p["op_max"], *p["levels"]) + 1))
        self.statement_lengths = self._statement_lengths()
        templates = TEMPLATES[p["rendering"]]
        names = quantity_names(p["rendering"], p["quantities"])
        numbers = [str(value) for value in range(p["values"])]
        words = [word for template in templates.values() for word in template.split() if not word.startswith("{")]
        vocab = list(dict.fromkeys([PAD, "answer"] + words + numbers + [word for name in names for word in name]))
        token_id = {token: i for i, token in enumerate(vocab)}
        self.pad_id, self.answer_id = token_id[PAD], token_id["answer"]
        self.number_ids = [token_id[number] for number in numbers]
        self.name_ids = [[token_id[word] for word in name] for name in names]
        self.template_pieces = {  # template words as token ids, placeholders kept as strings
            kind: [piece if piece.startswith("{") else token_id[piece] for piece in template.split()]
            for kind, template in templates.items()}
        return vocab

    def _render(self, kind, filling):
        """Template `kind` as token ids; filling maps each placeholder ('{x}', ...) to ids."""
        tokens = []
        for piece in self.template_pieces[kind]:
            tokens += filling[piece] if isinstance(piece, str) else [piece]
        return tokens

    def _statement(self, node, index, name_of):
        """Token ids of the statement that defines graph node `index`; name_of: node -> quantity."""
        kind, *operands = node
        filling = {"{x}": self.name_ids[name_of[index]]}
        for slot, operand in zip(STATEMENT_SLOTS[kind], operands):
            filling[slot] = [self.number_ids[operand]] if slot == "{c}" else self.name_ids[name_of[operand]]
        return self._render(kind, filling)

    def _sample_problem(self, rng, draws, ops):
        """One problem with `ops` operations on its solution path, as token ids:
        question, shuffled statements, "answer", answer."""
        p = self.params
        graph, values = [], []  # graph nodes in creation order (operands come first), their values

        def add(node):
            graph.append(node)
            values.append(node_value(node, values))
            return len(graph) - 1

        def constant():
            return add(("const", draws.below(p["values"])))

        def other_than(a):
            b = draws.below(len(graph) - 1)
            return b + (b >= a)

        def operation(kind, a, second):
            """Apply kind to quantity a and, for a sum or difference, to quantity second();
            an operation that would leave 0..values-1 becomes a difference."""
            if kind == "more" and values[a] < p["values"] - 1:
                return add(("more", a, 1 + draws.below(p["values"] - 1 - values[a])))
            b = second()
            if kind == "sum" and values[a] + values[b] < p["values"]:
                return add(("sum", a, b))
            return add(("diff", a, b) if values[a] >= values[b] else ("diff", b, a))

        def new_or_on_path(a):
            return constant() if len(graph) == 1 or draws.below(2) == 0 else other_than(a)

        asked = constant()
        for _ in range(ops):  # each operation uses the previous result, so all of them are needed
            previous = asked
            asked = operation(OPERATIONS[draws.below(3)], previous, lambda: new_or_on_path(previous))

        length = self.statement_lengths["question"] + sum(self.statement_lengths[node[0]] for node in graph) + 2
        target_length = p["min_tokens"] + draws.below(p["max_tokens"] - p["min_tokens"] + 1)
        while length < target_length:  # distractors: nothing on the solution path uses them
            kind = (("const",) + OPERATIONS)[draws.below(4)]
            if kind == "const":
                constant()
            else:
                a = draws.below(len(graph))
                operation(kind, a, lambda: other_than(a))
            if length + self.statement_lengths[graph[-1][0]] > p["max_tokens"]:
                graph.pop()
                values.pop()
                break
            length += self.statement_lengths[graph[-1][0]]

        name_of = rng.permutation(p["quantities"])[:len(graph)]
        tokens = self._render("question", {"{x}": self.name_ids[name_of[asked]]})
        for i in rng.permutation(len(graph)):
            tokens += self._statement(graph[i], i, name_of)
        return tokens + [self.answer_id, self.number_ids[values[asked]]]

    def _generate(self, rng, n, levels, evaluation):
        idx = np.full((n, self.seq_len), self.pad_id, dtype=np.int64)
        targets = np.full_like(idx, -1)
        difficulty = np.empty(n, dtype=np.int64)
        draws = ScalarDraws(rng)
        for row in range(n):
            difficulty[row] = levels[draws.below(len(levels))]
            tokens = self._sample_problem(rng, draws, int(difficulty[row]))
            idx[row, :len(tokens)] = tokens
            targets[row, len(tokens) - 2] = tokens[-1]  # at "answer": the answer
        return idx, targets, difficulty


# ----------------------------------------------------------------------------------------------
# Entry points

TASKS = {"rule110": Rule110, "depo": Depo, "math": Math}
PAPER_BATCH_SIZE = {"rule110": 512, "depo": 128, "math": 256}


def make_task(name, preset="cpu", **overrides):
    """make_task("rule110" | "depo" | "math", preset="cpu" | "paper", **parameter overrides)."""
    require(name in TASKS, "name", name, f"one of {sorted(TASKS)}")
    return TASKS[name](preset, **overrides)


def show_example(task, idx, targets, difficulty):
    """Print one example window by window (runs of padding shortened), then its answers."""
    print(f"difficulty {int(difficulty)}")
    for start in range(0, task.seq_len, task.window):
        kind = "predict" if (targets[start:start + task.window] != -1).any() else "consolidate"
        tokens = task.decode(idx[start:start + task.window]).split()
        runs = [(token, len(list(run))) for token, run in itertools.groupby(tokens)]
        text = " ".join(f"{PAD}*{count}" if token == PAD else " ".join([token] * count) for token, count in runs)
        print(f"  {kind:11s} {start:5d}: {text}")
    item = task.item_index(targets[None])[0]
    answers = [task.decode(targets[item == i]) for i in range(task.items_per_example)]
    print("  answers: " + " | ".join(answers))


def measure_speed(task, batch_size, steps=5):
    """Examples per second of train_batch (and of eval_set, which draws EVAL_BUCKETS times more)."""
    task.train_batch(batch_size, step=0)  # warm-up
    start = time.perf_counter()
    for step in range(1, steps + 1):
        task.train_batch(batch_size, step)
    train_rate = steps * batch_size / (time.perf_counter() - start)
    start = time.perf_counter()
    task.eval_set(task.levels[-1], batch_size)
    eval_rate = batch_size / (time.perf_counter() - start)
    print(f"{task.name} ({task.preset}): T={task.seq_len}, batch {batch_size}: "
          f"train {train_rate:,.0f} examples/s ({1000 * batch_size / train_rate:.0f} ms/batch), "
          f"eval_set {eval_rate:,.0f} examples/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Show decoded examples of a task, or time its generation.")
    parser.add_argument("task", choices=sorted(TASKS))
    parser.add_argument("overrides", nargs="*",
                        help="parameter overrides as key=value or --key=value, e.g. rendering=realistic")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--speed", action="store_true", help="time generation at the paper's batch size")
    # --key=value for a task parameter, as train.py takes it: the same as key=value
    options = {"--preset", "--examples", "--seed", "--speed", "-h", "--help"}
    argv = [a[2:] if a.startswith("--") and "=" in a and a.split("=")[0] not in options else a
            for a in (sys.argv[1:] if argv is None else argv)]
    args = parser.parse_intermixed_args(argv)
    overrides = {}
    for assignment in args.overrides:
        key, _, value = assignment.partition("=")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value  # a bare word such as realistic
    try:
        task = make_task(args.task, args.preset, **overrides)
    except ValueError as e:
        parser.error(str(e))
    if args.speed:
        measure_speed(task, PAPER_BATCH_SIZE.get(args.task, 64))   # a task without a paper batch size: 64
        return
    print(f"{task.name} ({task.preset}): T={task.seq_len}, window L={task.window}, vocab {task.vocab_size}, "
          f"eval levels {task.levels}, metric {task.metric}")
    print(f"parameters: {task.params}")
    idx, targets, difficulty = task.train_batch(args.examples, step=0, seed=args.seed)
    for i in range(args.examples):
        show_example(task, idx[i], targets[i], difficulty[i])


if __name__ == "__main__":
    main()
