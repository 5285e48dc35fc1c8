"""
bench.py: how fast sleep-lm is, both halves: sleep (training through N passes) and wake (decoding).

    python bench.py                     # the full table: a few minutes on a 2-core CPU
    python bench.py --quick             # tiny sizes, seconds (a test in test_sleep_lm.py runs this)
    python bench.py --device=cuda --json=bench.json --only=rule,wake

Prints one markdown table, each section's rows as soon as they are measured. Every time is the median
of --repeats runs after a warm-up, and every ratio compares numbers measured in the same run,
interleaved round by round so that background load hits both sides alike. Float32 (on CUDA the training steps run under bf16 autocast, as train.py).
Nothing here is a test: timings are never asserted.
Devices, threads and output as train.py (runs.py): --device=auto picks cuda, then mps, then cpu; on
the CPU one thread unless --threads=K (on a CPU shared with other jobs two spinning OpenMP threads that
must meet at every op stall whenever the scheduler parks one of them, and a run can take 100x longer).

What is measured:
  1. rule     the local rule (gated_delta_rule), forward + backward, B=4 H=4 Dk=Dv=64, T = 256, 1024,
              2048: the per-token recurrence and a row-loop chunkwise baseline (the shape of public
              reference code, written below), each against the chunkwise form (chunk 64); the baseline
              is checked against gated_delta_rule (max abs diff).
  2. train    one training step (forward + backward + optimizer step) of the Rule 110 and Depo cpu
              presets at N = 1, 2, 4, against ideal(N) = time(N=1) * (consolidated tokens * N +
              predicted tokens) / all tokens; and the hybrid at N = 1 against an attention-only model
              ("AAAA") of the same width and depth.
  3. wake     ms per decoded token (SleepCache.feed of one token; median over 16 consecutive tokens)
              at positions L, 4L, 16L, 64L for the sleeping hybrid (hard eviction, N=4), eager and with
              CompiledSleepCache (reduce-overhead on CUDA: CUDA graphs), and the same model
              with eviction "none" (full attention, growing KV cache); and the cost of one sleep (N
              passes over a full window).
  4. memory   peak memory allocated by one training step over 8 consolidation windows + 1 prediction
              window at N = 1, 4, 8: full backprop, truncated (bptt_passes=1), per-window checkpointing.
              CUDA: torch.cuda.max_memory_allocated; CPU: the allocation events recorded by
              torch.profiler(profile_memory=True), summed in time order; MPS: n/a.
  5. compile  training steps under train.py --compile (each window under torch.compile) against eager
              (each mode of TIMED_COMPILE_MODES; "n/a" and why
              where it fails): the Rule 110 cpu preset's model at N = 1 and 4, on CUDA also the paper
              presets (Rule 110 N = 1, 4; Depo N = 4); and the local rule at the rule section's largest T.
  6. paper    one training step of the Rule 110 and Depo paper presets (AGAG d=256, 4 heads, batch 512 /
              128) at N = 1 and 4: the GPU sizes (by default only on CUDA; --only=paper elsewhere).

Training rows (train, paper) also give the model FLOPs utilisation: the matmul FLOPs of one forward +
backward (counted once by torch.utils.flop_counter; the optimizer's own matmuls are left out) / the
step's time / the device's peak (--peak_tflops, or the bf16 dense tensor-core peak for the GPUs in
PEAK_TFLOPS; none for a CPU unless given). On CUDA the training rows run under bf16 autocast, as train.py.
"""

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from data import PAPER_BATCH_SIZE, make_task
from sleep_lm import SleepCache, SleepLM, SleepLMConfig, gated_delta_rule
from runs import CUDA_GRAPH_MODES, CompiledSleepCache, autocast, compiled_for_training, line_buffered, setup_device
from train import PRESETS, configure_optimizers

# Width, batch sizes and optimizer of train.py's PRESETS[(task, "cpu")], with the paper's 4-layer AGAG
# stack (the cpu training presets use 2 layers, AG) so that "hybrid vs attention-only" compares 4 layers.
N_EMBD, N_HEAD, LAYERS = 64, 2, "AGAG"
BATCH_SIZE = {"rule110": 128, "depo": 64}
LEARNING_RATE, ADAMW_LR = 2e-3, 5e-4

# The paper presets' model (train.py PRESETS[(task, "paper")]); --quick shrinks only the batch.
PAPER_MODEL = dict(n_embd=256, n_head=4, layers="AGAG")
PAPER_BATCH = {"full": PAPER_BATCH_SIZE, "quick": {"rule110": 2, "depo": 2}}

# Problem sizes of the full run and of --quick (which only checks that every row is produced).
SIZES = {
    "full": dict(repeats=5, rule_shape=(4, 4, 64), rule_T=(256, 1024, 2048), rule_chunk=64,
                 train_batch=BATCH_SIZE, wake_window=64, wake_batch=8, wake_tokens=16,
                 memory_batch=BATCH_SIZE["rule110"], memory_windows=8, compile=True, paper_batch=PAPER_BATCH["full"]),
    "quick": dict(repeats=2, rule_shape=(1, 2, 16), rule_T=(32, 80), rule_chunk=16,
                  train_batch={"rule110": 4, "depo": 4}, wake_window=8, wake_batch=1, wake_tokens=3,
                  memory_batch=2, memory_windows=1, compile=False, paper_batch=PAPER_BATCH["quick"]),
}
# Peak dense bf16 tensor-core TFLOP/s (NVIDIA datasheets, SXM parts), matched against the device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
WAKE_POSITIONS = (1, 4, 16, 64)   # decode at positions L, 4L, 16L, 64L
MEMORY_PASSES = (1, 4, 8)         # N for the peak-memory rows
# train.py --compile_mode values timed per device
TIMED_COMPILE_MODES = {"cuda": ("default", "reduce-overhead"), "cpu": ("default",), "mps": ("default",)}
SECTIONS = ("rule", "train", "wake", "memory", "compile", "paper")

# -----------------------------------------------------------------------------
# Timing and the table.


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def median_times(fns, device, repeats, warmup=1):
    """Median seconds of each fn in fns (a dict), run round-robin: warmup rounds, then repeats rounds."""
    times = {name: [] for name in fns}
    for round_ in range(warmup + repeats):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            if round_ >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def row(section, setting, value, unit, ratio=None, ratio_of="", target=None, **extra):
    """One table row. target: (">=" or "<=", bound) on the ratio."""
    met = None
    if target is not None and ratio is not None:
        met = ratio >= target[1] if target[0] == ">=" else ratio <= target[1]
    return dict(section=section, setting=setting, value=value, unit=unit, ratio=ratio, ratio_of=ratio_of,
                target=target, met=met, **extra)


def format_value(r):
    if r["value"] is None:
        return "n/a"
    if r["unit"] == "ms":
        text = f"{r['value']:.3f} ms" if r["value"] < 10 else f"{r['value']:.1f} ms"
    elif r["unit"] == "MB":
        text = f"{r['value']:.1f} MB"
    else:
        text = f"{r['value']:.1e}"
    if "tokens_per_s" in r:
        text += f" ({r['tokens_per_s'] / 1e3:.1f}k tok/s)"
    return text


TABLE_HEAD = "| section | setting | median | ratio | ratio is | target | MFU |\n|---|---|---|---|---|---|---|"


def print_rows(rows):
    for r in rows:
        ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        target = ""
        if r["target"] is not None:
            verdict = "" if r["met"] is None else ": met" if r["met"] else ": MISSED"
            target = f"{r['target'][0]} {r['target'][1]}x{verdict}"
        setting = r["setting"] + (f" (n/a: {r['reason']})" if r.get("reason") else "")
        mfu = "" if r.get("mfu") is None else f"{100 * r['mfu']:.2f}%"
        print(f"| {r['section']} | {setting} | {format_value(r)} | {ratio} | {r['ratio_of']} | {target} | {mfu} |")

# -----------------------------------------------------------------------------
# 1. The local rule.


def chunkwise_row_loop(q, k, v, log_decay, beta, chunk_size):
    """Baseline: the chunkwise gated delta rule written the way public reference code writes it
    (cf. flash-linear-attention's naive chunk_gated_delta_rule): the inverse of the unit lower
    triangular matrix (I + diag(beta) A) is built row by row by a Python loop (forward substitution),
    and the chunks are visited by indexing [:, :, i]. Same math and arguments as gated_delta_rule
    (zero initial state); returns o (B, T, H, Dv) and the final state (B, H, Dk, Dv).
    """
    B, T, H, Dk = q.shape
    Dv = v.shape[-1]
    C = chunk_size
    pad = -T % C
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).transpose(1, 2) for x in (q, k, v))       # (B, H, T', D)
    log_decay, beta = (F.pad(x, (0, 0, 0, pad)).transpose(1, 2) for x in (log_decay, beta))  # (B, H, T')
    n = q.shape[2] // C
    k_beta, v_beta = k * beta[..., None], v * beta[..., None]
    q, k, k_beta, v_beta = (x.reshape(B, H, n, C, -1) for x in (q, k, k_beta, v_beta))  # (B, H, n, C, D)
    c = log_decay.reshape(B, H, n, C).cumsum(-1)
    decay = (c[..., :, None] - c[..., None, :]).tril().exp().tril()      # e^{c_i - c_j} for j <= i
    inverse = -((k_beta @ k.transpose(-1, -2)) * decay).tril(-1)
    for i in range(1, C):
        inverse[..., i, :i] = inverse[..., i, :i].clone() + (inverse[..., i, :i, None].clone()
                                                             * inverse[..., :i, :i].clone()).sum(-2)
    inverse = inverse + torch.eye(C, device=q.device)
    U = inverse @ v_beta                                                  # (B, H, n, C, Dv)
    W = inverse @ (k_beta * c.exp()[..., None])                           # (B, H, n, C, Dk)
    scores = (q @ k.transpose(-1, -2)) * decay
    S = q.new_zeros(B, H, Dk, Dv)
    outputs = []
    for i in range(n):
        u = U[:, :, i] - W[:, :, i] @ S
        outputs.append((q[:, :, i] * c[:, :, i, :, None].exp()) @ S + scores[:, :, i] @ u)
        k_decayed = k[:, :, i] * (c[:, :, i, -1:] - c[:, :, i]).exp()[..., None]
        S = c[:, :, i, -1, None, None].exp() * S + k_decayed.transpose(-1, -2) @ u
    o = torch.stack(outputs, dim=2).reshape(B, H, n * C, Dv)[:, :, :T].transpose(1, 2)  # (B, T, H, Dv)
    return o, S


def rule_inputs(B, T, H, D, device):
    """Inputs as the GDN layer makes them: unit-norm k, q scaled by 1/sqrt(Dk), beta in (0, 1),
    log_decay in (-0.5, 0]; all requiring grad."""
    q = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1) / math.sqrt(D)
    k = F.normalize(torch.randn(B, T, H, D, device=device), dim=-1)
    v = torch.randn(B, T, H, D, device=device)
    log_decay = -0.5 * torch.rand(B, T, H, device=device)
    beta = torch.rand(B, T, H, device=device)
    return [x.requires_grad_() for x in (q, k, v, log_decay, beta)]


def forward_backward(rule, inputs):
    o, state = rule(*inputs)
    (o.sum() + state.sum()).backward()
    for x in inputs:
        x.grad = None


def bench_rule(sizes, device, repeats):
    B, H, D = sizes["rule_shape"]
    C = sizes["rule_chunk"]
    rules = {
        "recurrence": lambda q, k, v, g, b: gated_delta_rule(q, k, v, log_decay=g, beta=b),
        "chunkwise": lambda q, k, v, g, b: gated_delta_rule(q, k, v, log_decay=g, beta=b, chunk_size=C),
        "row-loop": lambda q, k, v, g, b: chunkwise_row_loop(q, k, v, log_decay=g, beta=b, chunk_size=C),
    }
    rows, max_diff = [], 0.0
    for T in sizes["rule_T"]:
        inputs = rule_inputs(B, T, H, D, device)
        with torch.no_grad():
            (o_base, s_base), (o_rule, s_rule) = rules["row-loop"](*inputs), rules["chunkwise"](*inputs)
        max_diff = max(max_diff, (o_base - o_rule).abs().max().item(), (s_base - s_rule).abs().max().item())
        t = median_times({name: lambda r=r: forward_backward(r, inputs) for name, r in rules.items()},
                         device, repeats)
        last = T == sizes["rule_T"][-1]
        setting = f"T={T} B={B} H={H} Dk=Dv={D}, fwd+bwd"
        rows.append(row("rule", f"{setting}: chunkwise form (chunk {C})", t["chunkwise"] * 1e3, "ms"))
        rows.append(row("rule", f"{setting}: per-token recurrence", t["recurrence"] * 1e3, "ms",
                        t["recurrence"] / t["chunkwise"], "recurrence / chunkwise", (">=", 20) if last else None))
        rows.append(row("rule", f"{setting}: row-loop chunkwise baseline", t["row-loop"] * 1e3, "ms",
                        t["row-loop"] / t["chunkwise"], "baseline / chunkwise", (">=", 1.5) if last else None))
    if not max_diff < 1e-4:
        raise RuntimeError(f"the row-loop baseline disagrees with gated_delta_rule: max abs diff {max_diff:.2e}")
    rows.append(row("rule", "row-loop baseline vs gated_delta_rule (o and final state), max abs diff",
                    max_diff, "abs diff"))
    return rows

# -----------------------------------------------------------------------------
# 2. Training steps.


def preset_model(vocab_size, window, device, layers=LAYERS, **config):
    torch.manual_seed(0)
    model = SleepLM(SleepLMConfig(vocab_size=vocab_size, n_embd=N_EMBD, n_head=N_HEAD, layers=layers,
                                  window=window, **config))
    return model.to(device)


def training_step(model, idx, targets, forward=None, cuda_graphs=False):
    """A closure running one training step: forward + backward + every optimizer's step (under bf16
    autocast on CUDA, as train.py). step.flops() counts the matmul FLOPs of its forward + backward.
    cuda_graphs: forward is compiled with CUDA graphs (mode reduce-overhead): mark each new step."""
    forward = model if forward is None else forward
    optimizers = configure_optimizers(model, learning_rate=LEARNING_RATE, adamw_lr=ADAMW_LR)

    def forward_backward():
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(idx.device):
            _, loss = forward(idx, targets)
        loss.backward()

    def step():
        forward_backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    def flops():
        with FlopCounterMode(display=False) as counter:
            forward_backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops()
    step.flops = flops
    return step


def peak_flops(device, given_tflops):
    """The device's peak FLOP/s for the MFU column: --peak_tflops, else PEAK_TFLOPS by GPU name, else None."""
    if given_tflops:
        return given_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def train_rows(section, layout, steps, t, consolidated, predicted, tokens, peak, passes=(1, 2, 4)):
    """Rows for training steps timed as t[f"N={n}"]: ms, time / ideal(n), tok/s and MFU."""
    rows = []
    for n in passes:
        ideal = t["N=1"] * (consolidated * n + predicted) / (consolidated + predicted)
        flops = steps[f"N={n}"].flops()
        rows.append(row(section, f"{layout} N={n}", t[f"N={n}"] * 1e3, "ms", t[f"N={n}"] / ideal, f"time / ideal({n})",
                        ("<=", 1.2) if n == 4 else None, tokens_per_s=tokens / t[f"N={n}"], flops=flops,
                        mfu=flops / t[f"N={n}"] / peak if peak else None))
    return rows


def token_split(targets, window):
    """(consolidated, predicted) tokens per sequence; a window is consolidated iff all its targets are
    -1 across the batch, as SleepLM.forward decides."""
    T = targets.shape[1]
    consolidated = sum(min(window, T - start) for start in range(0, T, window)
                       if bool((targets[:, start:start + window] < 0).all()))
    return consolidated, T - consolidated


def preset_batch(name, preset, B, device):
    """The task, batch 0 of B examples on device, and its (consolidated, predicted) tokens per sequence."""
    task = make_task(name, preset=preset)
    idx, targets, _ = task.train_batch(B, 0)
    idx, targets = idx.to(device), targets.to(device)
    return task, idx, targets, token_split(targets, task.window)


def bench_train(sizes, device, repeats, peak):
    rows = []
    for name in ("rule110", "depo"):
        B = sizes["train_batch"][name]
        task, idx, targets, (consolidated, predicted) = preset_batch(name, "cpu", B, device)
        steps = {f"N={n}": training_step(preset_model(task.vocab_size, task.window, device, sleep_passes=n),
                                         idx, targets) for n in (1, 2, 4)}
        steps["AAAA"] = training_step(preset_model(task.vocab_size, task.window, device, layers="AAAA"), idx, targets)
        t = median_times(steps, device, repeats, warmup=2)   # the first step also allocates optimizer state
        layout = (f"{name} cpu preset, B={B} T={task.seq_len} L={task.window} "
                  f"({consolidated} consolidated + {predicted} predicted tokens)")
        rows += train_rows("train", f"{layout}, {LAYERS}", steps, t, consolidated, predicted, B * task.seq_len, peak)
        flops = steps["AAAA"].flops()
        rows.append(row("train", f"{layout}, attention-only AAAA N=1", t["AAAA"] * 1e3, "ms", t["N=1"] / t["AAAA"],
                        f"{LAYERS} N=1 / AAAA", ("<=", 1.5), tokens_per_s=B * task.seq_len / t["AAAA"],
                        flops=flops, mfu=flops / t["AAAA"] / peak if peak else None))
    return rows


def bench_paper(sizes, device, repeats, peak):
    """One training step of the Rule 110 and Depo paper presets at N = 1 and 4 (the GPU sizes)."""
    rows = []
    for name in ("rule110", "depo"):
        B = sizes["paper_batch"][name]
        task, idx, targets, (consolidated, predicted) = preset_batch(name, "paper", B, device)
        torch.manual_seed(0)
        steps = {f"N={n}": training_step(SleepLM(SleepLMConfig(vocab_size=task.vocab_size, window=task.window,
                                                               sleep_passes=n, **PAPER_MODEL)).to(device), idx, targets)
                 for n in (1, 4)}
        t = median_times(steps, device, repeats, warmup=2)
        layout = (f"{name} paper preset, B={B} T={task.seq_len} L={task.window} "
                  f"({consolidated} consolidated + {predicted} predicted tokens), "
                  f"{PAPER_MODEL['layers']} d={PAPER_MODEL['n_embd']}")
        rows += train_rows("paper", layout, steps, t, consolidated, predicted, B * task.seq_len, peak, passes=(1, 4))
    return rows

# -----------------------------------------------------------------------------
# 3. Wake latency.


@torch.no_grad()
def bench_wake(sizes, device, repeats):
    L, B, n_tokens = sizes["wake_window"], sizes["wake_batch"], sizes["wake_tokens"]
    vocab_size = 32
    assert n_tokens + 1 < L, "the timed tokens must fit in one window, so that no sleep fires among them"
    mode = TIMED_COMPILE_MODES[device.type][-1]
    rows = []
    for eviction in ("hard", "none"):
        model = preset_model(vocab_size, L, device, sleep_passes=4, eviction=eviction).eval()
        # eager caches, and for the sleeping hybrid the fast path (static shapes, the one-token step
        # compiled; once per cache, all with the same shapes), timed round by round together
        kinds = ("eager", "compiled") if eviction == "hard" and sizes["compile"] else ("eager",)
        feeds = {}
        for kind in kinds:
            for multiple in WAKE_POSITIONS:
                cache = CompiledSleepCache(model, B, compile_mode=mode) if kind == "compiled" else SleepCache(model, B)
                cache.feed(torch.randint(0, vocab_size, (B, multiple * L), device=device))
                tokens = iter(torch.randint(0, vocab_size, (n_tokens + 2, B, 1), device=device))
                cache.feed(next(tokens))   # compiles, for the compiled kind
                feeds[kind, multiple] = lambda cache=cache, tokens=tokens: cache.feed(next(tokens))
        t = median_times(feeds, device, repeats=n_tokens, warmup=1)
        name = "sleeping hybrid (hard eviction, N=4)" if eviction == "hard" else "full attention (eviction none)"
        for kind in kinds:
            for multiple in WAKE_POSITIONS:
                position = "L" if multiple == 1 else f"{multiple}L"
                setting = f"{name}, L={L} B={B}: one token at position {position}"
                if kind == "eager":
                    rows.append(row("wake", setting, t[kind, multiple] * 1e3, "ms", t[kind, multiple] / t[kind, 1],
                                    "/ position L",
                                    ("<=", 1.15) if eviction == "hard" and multiple == WAKE_POSITIONS[-1] else None))
                else:
                    rows.append(row("wake", f"{setting}, CompiledSleepCache(compile_mode={mode!r})",
                                    t[kind, multiple] * 1e3, "ms", t["eager", multiple] / t[kind, multiple],
                                    "eager / compiled"))
        if eviction == "hard":   # one sleep: N passes over a full window, i.e. feed L tokens at a window boundary
            cache = SleepCache(model, B)
            windows = iter(torch.randint(0, vocab_size, (repeats + 1, B, L), device=device))
            sleep = median_times({"sleep": lambda: cache.feed(next(windows))}, device, repeats)["sleep"]
            rows.append(row("wake", f"{name}, L={L} B={B}: one sleep (4 passes over a window of L tokens, then evict)",
                            sleep * 1e3, "ms", sleep / (L * t["eager", 1]), "sleep / (L x one-token wake)"))
    return rows

# -----------------------------------------------------------------------------
# 4. Peak memory.


def peak_memory_mb(step, device):
    """Peak memory allocated while step() runs, above what was allocated before it, in MB."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # torch's profiler (Kineto) prints two log lines to stderr per profile; level 6 is above its highest
    # (USDT), so it stays quiet. Read when a profile starts; a value set by the user wins.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:   # + bytes on allocation, - bytes on free
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


def bench_memory(sizes, device):
    if device.type not in ("cpu", "cuda"):
        return [row("memory", "peak memory of a training step", None, "MB", reason=f"no peak counter on {device.type}")]
    task = make_task("rule110", preset="cpu")
    L, B = task.window, sizes["memory_batch"]
    windows = sizes["memory_windows"]   # consolidation windows before the prediction window
    T = (windows + 1) * L
    idx = torch.randint(0, task.vocab_size, (B, T), device=device)
    targets = torch.full_like(idx, -1)
    targets[:, -L:] = torch.randint(0, task.vocab_size, (B, L), device=device)   # only the last window predicts
    methods = {"full backprop": {}, "truncated (bptt_passes=1)": dict(bptt_passes=1),
               "checkpointing (checkpoint_windows)": dict(checkpoint_windows=True)}
    rows, base = [], None
    for n in MEMORY_PASSES:
        for method, config in methods.items():
            step = training_step(preset_model(task.vocab_size, L, device, sleep_passes=n, **config), idx, targets)
            step()   # allocates the optimizer state, which is then not counted
            mb = peak_memory_mb(step, device)
            base = base or mb
            bounded = n == MEMORY_PASSES[-1] and method != "full backprop"
            rows.append(row("memory", f"{windows} + 1 windows of L={L}, B={B}, N={n}: {method}", mb, "MB",
                            mb / base, "/ full backprop N=1", ("<=", 1.5) if bounded else None))
    return rows

# -----------------------------------------------------------------------------
# 5. torch.compile.


def compile_cases(device, sizes):
    """(task, preset, N, batch, model settings, target speed-up) for the compile rows: the cpu preset's
    Rule 110 model (train.py's, AG d=64), and on CUDA the paper presets with a target speed-up for each."""
    cpu = {k: PRESETS["rule110", "cpu"][k] for k in ("n_embd", "n_head", "layers")}
    cases = [("rule110", "cpu", n, sizes["train_batch"]["rule110"], cpu, None) for n in (1, 4)]
    if device.type == "cuda":
        cases += [("rule110", "paper", 1, sizes["paper_batch"]["rule110"], PAPER_MODEL, 5),
                  ("rule110", "paper", 4, sizes["paper_batch"]["rule110"], PAPER_MODEL, 5),
                  ("depo", "paper", 4, sizes["paper_batch"]["depo"], PAPER_MODEL, 4)]
    return cases


def bench_compile(sizes, device, repeats, peak):
    """Training steps under torch.compile (train.py --compile --compile_mode=M) against the eager step on
    the same batch, for each mode of TIMED_COMPILE_MODES[device.type]; and the local rule at T = 2048 compiled.
    Each compiled row gives the seconds of its first step (the compile)."""
    if not sizes["compile"]:
        return [row("compile", "training steps and the local rule under torch.compile", None, "ms",
                    reason="skipped under --quick: compiling takes minutes")]
    rows = []
    for name, preset, n, B, model_settings, target in compile_cases(device, sizes):
        torch._dynamo.reset()   # each case compiles afresh: no case runs into the recompile limit of another
        task, idx, targets, _ = preset_batch(name, preset, B, device)
        setting = (f"{name} {preset} preset, B={B} T={task.seq_len}, {model_settings['layers']} "
                   f"d={model_settings['n_embd']} N={n} training step")

        def make_model():
            torch.manual_seed(0)
            return SleepLM(SleepLMConfig(vocab_size=task.vocab_size, window=task.window, sleep_passes=n,
                                         **model_settings)).to(device)
        eager = training_step(make_model(), idx, targets)
        steps, compile_s, failed = {"eager": eager}, {}, {}
        for mode in TIMED_COMPILE_MODES[device.type]:
            model = make_model()
            try:
                step = training_step(model, idx, targets, forward=compiled_for_training(model, mode),
                                     cuda_graphs=mode in CUDA_GRAPH_MODES)
                sync(device)
                t0 = time.perf_counter()
                step()
                sync(device)
                compile_s[mode], steps[mode] = time.perf_counter() - t0, step
            except Exception as e:  # compile support varies by platform: report, do not fail the benchmark
                failed[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"
        t = median_times(steps, device, repeats, warmup=2)
        flops = eager.flops()
        rows.append(row("compile", f"{setting}, eager", t["eager"] * 1e3, "ms",
                        tokens_per_s=B * task.seq_len / t["eager"],
                        mfu=flops / t["eager"] / peak if peak else None))
        for mode in TIMED_COMPILE_MODES[device.type]:
            label = f"{setting}, --compile --compile_mode={mode}"
            if mode in failed:
                rows.append(row("compile", label, None, "ms", reason=failed[mode]))
                continue
            rows.append(row("compile", f"{label} (first step {compile_s[mode]:.0f} s)", t[mode] * 1e3, "ms",
                            t["eager"] / t[mode], "eager / compiled", target and (">=", target),
                            tokens_per_s=B * task.seq_len / t[mode], mfu=flops / t[mode] / peak if peak else None))
    return rows + bench_compiled_rule(sizes, device, repeats)


def bench_compiled_rule(sizes, device, repeats):
    """gated_delta_rule's chunkwise form under torch.compile, forward + backward and forward only, at the
    largest T of the rule section; checked against the eager form."""
    B, H, D = sizes["rule_shape"]
    T, C = sizes["rule_T"][-1], sizes["rule_chunk"]
    inputs = rule_inputs(B, T, H, D, device)

    def rule(q, k, v, g, b):
        return gated_delta_rule(q, k, v, log_decay=g, beta=b, chunk_size=C)
    compiled = torch.compile(rule)
    try:
        with torch.no_grad():
            (o, s), (o_c, s_c) = rule(*inputs), compiled(*inputs)
        diff = max((o - o_c).abs().max().item(), (s - s_c).abs().max().item())
        forward_backward(compiled, inputs)   # compiles the backward
    except Exception as e:
        return [row("compile", "local rule under torch.compile", None, "ms", reason=f"{type(e).__name__}")]
    if not diff < 1e-4:
        raise RuntimeError(f"the compiled local rule disagrees with the eager one: max abs diff {diff:.2e}")
    setting = f"local rule, chunkwise (chunk {C}), T={T} B={B} H={H} Dk=Dv={D}"
    t = median_times({"eager": lambda: forward_backward(rule, inputs),
                      "compiled": lambda: forward_backward(compiled, inputs)}, device, repeats)
    with torch.no_grad():
        f = median_times({"eager": lambda: rule(*inputs), "compiled": lambda: compiled(*inputs)}, device, repeats)
    return [*fla_yardstick(inputs, setting, f["compiled"], device, repeats),
            row("compile", f"{setting}, fwd+bwd, eager", t["eager"] * 1e3, "ms"),
            row("compile", f"{setting}, fwd+bwd, torch.compile", t["compiled"] * 1e3, "ms", t["eager"] / t["compiled"],
                "eager / compiled", (">=", 5) if device.type == "cuda" else None),
            row("compile", f"{setting}, forward only, eager", f["eager"] * 1e3, "ms"),
            row("compile", f"{setting}, forward only, torch.compile (max abs diff to eager {diff:.1e})",
                f["compiled"] * 1e3, "ms", f["eager"] / f["compiled"], "eager / compiled")]

def fla_yardstick(inputs, setting, ours, device, repeats):
    """flash-linear-attention's Triton chunk_gated_delta_rule, forward, on the same inputs (in bf16 where
    its kernel refuses float32): a yardstick for CUDA, not a dependency; a row only where it imports
    (PYTHONPATH=<a checkout of fla-org/flash-linear-attention>, which needs einops). ours: our compiled
    forward's seconds."""
    if device.type != "cuda":
        return []
    name = "flash-linear-attention chunk_gated_delta_rule (yardstick)"
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    except Exception as e:
        return [row("compile", name, None, "ms", reason=f"not importable here ({type(e).__name__})")]
    with torch.no_grad():
        o_ref, s_ref = gated_delta_rule(*inputs, chunk_size=64)
        for dtype in (torch.float32, torch.bfloat16):
            q, k, v, g, beta = (x.detach().to(dtype) for x in inputs)
            try:   # our q is scaled already: scale 1; states (B, H, Dk, Dv) as ours
                def fla():
                    return chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, output_final_state=True)
                o, s = fla()
                break
            except Exception as e:
                error = f"{type(e).__name__}: {str(e).splitlines()[0][:60] if str(e) else ''}"
        else:
            return [row("compile", name, None, "ms", reason=error)]
        diff = max((o.float() - o_ref).abs().max().item(), (s.float() - s_ref).abs().max().item())
        t = median_times({"fla": fla}, device, repeats)["fla"]
    return [row("compile", f"{setting}, forward only, {name}, {str(dtype).replace('torch.', '')} (max abs diff to "
                f"ours {diff:.1e})", t * 1e3, "ms", ours / t, "our compiled forward / fla", ("<=", 2))]

# -----------------------------------------------------------------------------


def main():
    line_buffered()   # as train.py: each line as it is printed, also into a file or a pipe
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda or mps")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: checks that every row runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 5, quick 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1, as train.py: more stall when other work holds a core)")
    parser.add_argument("--only", default=None,
                        help=f"comma list of sections: {','.join(SECTIONS)} (default: all; paper only on CUDA)")
    parser.add_argument("--peak_tflops", type=float, default=None,
                        help="the device's peak TFLOP/s for the MFU column (default: PEAK_TFLOPS by GPU name)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        device = torch.device(setup_device(args.device, args.threads))   # on the CPU: threads, denormals flushed
    except ValueError as e:
        parser.error(str(e))
    default = [s for s in SECTIONS if s != "paper" or device.type == "cuda"]
    sections = args.only.split(",") if args.only else default
    if set(sections) - set(SECTIONS):
        parser.error(f"--only takes a comma list of {', '.join(SECTIONS)}, got {args.only!r}")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak_tflops must be > 0, got {args.peak_tflops}")
    peak = peak_flops(device, args.peak_tflops)
    sizes = SIZES["quick" if args.quick else "full"]
    repeats = args.repeats or sizes["repeats"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    header = (f"sleep-lm bench{' (--quick)' if args.quick else ''}: device {name}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, "
              f"{'bf16 autocast in training rows' if device.type == 'cuda' else 'float32'}, "
              f"median of {repeats}, peak {peak / 1e12 if peak else 'n/a'} TFLOP/s")
    print(f"{header}\n\n{TABLE_HEAD}")

    started = time.perf_counter()
    rows = []
    for section in sections:
        print(f"bench: {section} ...", file=sys.stderr, flush=True)
        if section == "rule":
            new = bench_rule(sizes, device, repeats)
        elif section == "train":
            new = bench_train(sizes, device, repeats, peak)
        elif section == "wake":
            new = bench_wake(sizes, device, repeats)
        elif section == "memory":
            new = bench_memory(sizes, device)
        elif section == "compile":
            new = bench_compile(sizes, device, repeats, peak)
        elif section == "paper":
            new = bench_paper(sizes, device, repeats, peak)
        if args.quick:   # tiny sizes: the targets do not apply
            for r in new:
                r["met"] = None
        print_rows(new)
        rows += new
    wall = time.perf_counter() - started
    print(f"\n{wall:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(header=f"{header}, {wall:.0f} s", device=str(device), torch=torch.__version__,
                           threads=torch.get_num_threads(), wall_s=wall, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
