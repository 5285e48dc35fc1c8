"""
Train and evaluate the sleeping hybrid on Rule 110, Depo or math.

    python train.py --task=rule110                      # cpu preset: a laptop CPU, minutes
    python train.py --task=depo --preset=paper          # paper scale: one GPU
    python train.py --task=rule110 --sweep=1,4 --seeds=0,1,2   # one model per N (and seed), a results table
    python train.py --task=rule110 --eval_only --eval_sleep_passes=1,2,4,8   # evaluate the first line's run
    torchrun --standalone --nproc_per_node=2 train.py --task=depo --preset=paper   # several GPUs (DDP)
    python train.py --help                              # every setting, its default and meaning

Every setting below can be overridden with --key=value (booleans also as a bare --key), and so can
every parameter of the task (see `python data.py TASK`), e.g. --t_max=12. Settings are printed at start.

Outputs: each run writes out/<task>-<preset>/<run name>/ckpt.pt, where the run name is N<n>_seed<s>
followed by every training setting that differs from the preset (N1_seed0_layers=AA); a sweep writes
out/<task>-<preset>/sweep<...>/ with one such folder per run and results.md/.json/.png. --out_dir
chooses another folder. A run refuses to overwrite a checkpoint: --resume continues it (its settings
come from the checkpoint; a larger --max_iters extends it), --eval_only evaluates it.

Optimiser (as in the paper): Muon for the 2-D hidden matrices at learning_rate, AdamW for the
embedding, the head, norm gains, GDN gates (a_proj, b_proj, A_log, dt_bias) and conv weights at
adamw_lr; --optimizer=adamw uses AdamW at learning_rate for the matrices too. Weight decay (default 0)
applies to matrices only. Schedule: linear warm-up over warmup_iters, then cosine decay to
min_lr_frac x the peak, for both optimisers. Gradients are clipped to grad_clip (global norm).

The data order is a pure function of (seed, step): runs at different N see the same batches, and a
resumed run sees what the uninterrupted one would have. Batches can be made ahead of the step by
worker processes (--num_workers); gradient accumulation and several GPUs split the same global batch
(each micro-batch's loss weighted by its share of the batch's answer tokens), so they change the
update only up to float rounding.
"""

import copy
import ctypes
import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from data import make_task
from sleep_lm import CUDA_GRAPH_MODES, SleepLM, SleepLMConfig


# The defaults. A preset (PRESETS, below) overrides some of them, --key=value overrides both; `--help`
# and the settings printed at start show the values in effect.
@dataclass
class TrainConfig:
    task: str = "rule110"            # rule110, depo or math
    preset: str = "cpu"              # cpu (a laptop CPU, minutes), gpu (one GPU; rule110, depo), paper (paper scale)
    seed: int = 0                    # model init and data order
    # model
    n_embd: int = 64                 # model width
    n_head: int = 2                  # heads of every attention and GDN mixer
    layers: str = "AGAG"             # one letter per block: A causal attention, G Gated DeltaNet
    layer_repeat: int = 1            # repeat the layers (with --sleep_passes=1: the compute-matched baseline)
    sleep_passes: int = 4            # N, passes over each full window (1 = no sleep); the window L is the task's
    sleep_blocks: str = ""           # start:stop, the blocks that passes 2..N run (wake runs all); "" = every block
    eviction: str = "hard"           # what crosses a window: hard (S), sliding (S + last L-1 tokens), none (no windows)
    bptt_passes: int = 0             # 0 = full backprop; K = through the last K passes (straight through the others)
    checkpoint_windows: bool = False  # recompute each window's passes in backward: less memory, more time
    input_injection: bool = False    # add the looped blocks' wake input (the embeddings) before every sleep pass
    # training levers (see docs/making-sleep-pay-off.md)
    train_sleep_passes: str = ""     # comma list: N drawn per step from it (seeded); saved and evaluated at the largest
    curriculum_iters: int = 0        # raise the hardest training level from the easiest to the hardest over these steps
    ssm_warmup_iters: int = 0        # for this many first steps train only the G blocks, under hard eviction (sec. 6.4)
    init_from: str = ""              # a run folder: start from the weights of its ckpt.pt (not its optimiser or step)
    # optimisation
    optimizer: str = "muon"          # muon (hidden matrices) + adamw (the rest), or adamw for everything
    batch_size: int = 128            # the global batch: all micro-batches and all processes together
    gradient_accumulation_steps: int = 1  # split each batch into this many micro-batches: same update, less memory
    max_iters: int = 2000            # training steps
    learning_rate: float = 2e-3      # Muon (or AdamW with --optimizer=adamw) for the hidden matrices
    adamw_lr: float = 5e-4           # AdamW for everything else
    weight_decay: float = 0.0        # on the matrices only
    warmup_iters: int = 200          # linear warm-up steps
    min_lr_frac: float = 0.1         # the cosine decays to this fraction of the peak
    grad_clip: float = 1.0           # global gradient-norm clip; 0 = off
    # evaluation and logging
    eval_interval: int = 250         # evaluate and checkpoint every this many steps
    eval_examples: int = 512         # evaluation examples per difficulty level (a fixed set)
    eval_batch_size: int = 256       # examples per evaluation forward pass
    eval_sleep_passes: str = ""      # comma list of N to evaluate at; "" = the trained N
    eval_only: bool = False          # evaluate the run's checkpoint, do not train
    log_interval: int = 50           # print a log line every this many steps
    # runs
    out_dir: str = ""                # "" = out/<task>-<preset>/N<n>_seed<s><settings that differ from the preset>
    resume: bool = False             # continue the run in out_dir with the checkpoint's settings
    sweep: str = ""                  # comma list of N: one model per N (and seed), then a results table
    seeds: str = ""                  # comma list of seeds for --sweep; "" = just --seed
    parallel: int = 0                # --sweep: runs trained at once, one process each; 0 = one per CPU core (GPU: 1)
    device: str = "auto"             # auto (cuda, then mps, then cpu), cpu, cuda or mps
    threads: int = 0                 # CPU threads per training process; 0 = 1 (more stall when other work holds a core)
    compile: bool = False            # torch.compile one window's passes for training (a graph per kind of window)
    compile_mode: str = "default"    # default, reduce-overhead (CUDA graphs), max-autotune, max-autotune-no-cudagraphs
    num_workers: int = -1            # processes making batches ahead; 0 = in the loop; -1 = 4 on CUDA, else 0


PRESETS = {
    # A laptop CPU: at most about 20 minutes per run on 2 cores (README, Results).
    # Two layers (AG): one pass is too shallow for long rollouts, so N = 4 has something to add.
    ("rule110", "cpu"): dict(n_embd=64, n_head=2, layers="AG", batch_size=128, max_iters=4000, eval_interval=500),
    ("depo", "cpu"): dict(n_embd=64, n_head=2, layers="AG", batch_size=64, max_iters=3000, eval_interval=500),
    ("math", "cpu"): dict(n_embd=64, n_head=2, layers="AG", batch_size=64, max_iters=3000, eval_interval=500),
    # One GPU, minutes: the paper's layouts (data.py's gpu presets) with a 4-layer AGAG model, d = 128,
    # head size 64, for the N = 1 / 2 / 4 sweeps of scripts/gpu_sweep.sh (docs/gpu.md). Rule 110 and Depo.
    ("rule110", "gpu"): dict(n_embd=128, n_head=2, batch_size=256, max_iters=3000, eval_interval=500,
                             eval_examples=1024),
    ("depo", "gpu"): dict(n_embd=128, n_head=2, batch_size=128, max_iters=3000, eval_interval=500,
                          eval_examples=1024),
    # One GPU, the paper's model (4 layers, d = 256, AGAG) and batch sizes; Muon 2e-3 / AdamW 5e-5.
    # Rule 110: ~5B tokens = 100k steps of 512 x 100 tokens. Depo and math: sized to a 1-2 GPU-day run.
    ("rule110", "paper"): dict(n_embd=256, n_head=4, batch_size=512, max_iters=100_000, adamw_lr=5e-5,
                               warmup_iters=1000, eval_interval=2000, eval_examples=2048, log_interval=100),
    ("depo", "paper"): dict(n_embd=256, n_head=4, batch_size=128, max_iters=100_000, adamw_lr=5e-5,
                            warmup_iters=1000, eval_interval=2000, eval_examples=2048, log_interval=100),
    ("math", "paper"): dict(n_embd=256, n_head=4, batch_size=256, max_iters=20_000, adamw_lr=5e-5,
                            warmup_iters=500, eval_interval=1000, eval_examples=400, eval_batch_size=32,
                            log_interval=20, checkpoint_windows=True, gradient_accumulation_steps=4),
}


# -----------------------------------------------------------------------------
# Model, optimizers and schedule.


def build_model(cfg, task):
    config = SleepLMConfig(
        vocab_size=task.vocab_size, n_embd=cfg.n_embd, n_head=cfg.n_head, layers=cfg.layers * cfg.layer_repeat,
        window=task.window, sleep_passes=cfg.sleep_passes, eviction=cfg.eviction,
        bptt_passes=cfg.bptt_passes or None, checkpoint_windows=cfg.checkpoint_windows,
        input_injection=cfg.input_injection, sleep_blocks=block_slice(cfg.sleep_blocks))
    return SleepLM(config)


def configure_optimizers(model, learning_rate, adamw_lr, weight_decay=0.0, betas=(0.9, 0.95), optimizer="muon"):
    """Muon for the 2-D hidden matrices (the paper's optimiser); AdamW for the embedding, the head,
    norm gains, the GDN gates (a_proj, b_proj, A_log, dt_bias) and conv weights. Weight decay applies
    to matrices only. optimizer="adamw": AdamW at learning_rate for the matrices too. Returns a list
    of optimizers (stepped together); each param group keeps its peak_lr for the schedule to scale."""
    if optimizer not in ("muon", "adamw"):
        raise ValueError(f"--optimizer must be one of muon, adamw, got {optimizer!r}")
    matrices, others = [], []
    for name, p in model.named_parameters():
        is_gate = name.endswith(("a_proj.weight", "b_proj.weight"))
        (matrices if name.startswith("blocks.") and p.dim() == 2 and not is_gate else others).append(p)
    adamw_groups = [{"params": others, "lr": adamw_lr, "weight_decay": 0.0}]
    if optimizer == "adamw":
        adamw_groups.append({"params": matrices, "lr": learning_rate, "weight_decay": weight_decay})
        optimizers = [torch.optim.AdamW(adamw_groups, betas=betas)]
    else:
        muon = torch.optim.Muon(matrices, lr=learning_rate, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        optimizers = [muon, torch.optim.AdamW(adamw_groups, betas=betas)]
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    return optimizers


def lr_multiplier(step, cfg):
    """Linear warm-up, then cosine decay to min_lr_frac."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def training_levels(step, cfg, task):
    """The difficulty levels of step's batch: all of them, or under a curriculum the easiest up to a
    cap that rises linearly over curriculum_iters steps."""
    levels = task.train_levels
    if step >= cfg.curriculum_iters:
        return levels
    cap = levels[0] + (levels[-1] - levels[0]) * step / cfg.curriculum_iters
    return [lv for lv in levels if lv <= cap]


def step_sleep_passes(step, cfg, choices):
    """N for this training step: fixed, or drawn from choices by a generator seeded with (seed, step)."""
    if not choices:
        return cfg.sleep_passes
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return choices[torch.randint(len(choices), (1,), generator=g).item()]


# -----------------------------------------------------------------------------
# Batches: a pure function of (seed, step), made in the loop or ahead by worker processes.


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is this process's slice of that step's training batch, plus the number of answer
    tokens in the whole batch (it weights each micro-batch's mean loss). A pure function of
    (seed, step), so DataLoader workers can make batches ahead and a resumed run gets the same ones."""

    def __init__(self, task, cfg, rank=0, world_size=1):
        self.task, self.cfg, self.rank, self.per_rank = task, cfg, rank, cfg.batch_size // world_size

    def __len__(self):
        return self.cfg.max_iters

    def __getitem__(self, step):
        idx, targets, _ = self.task.train_batch(self.cfg.batch_size, step, seed=self.cfg.seed,
                                                levels=training_levels(step, self.cfg, self.task))
        mine = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        return idx[mine], targets[mine], int((targets >= 0).sum())


def step_batches(dataset, start, num_workers, pin_memory):
    """Batches of steps start, start + 1, ... in order: made in the loop, or ahead by worker processes."""
    if num_workers == 0:
        return (dataset[step] for step in range(start, len(dataset)))
    return iter(torch.utils.data.DataLoader(dataset, batch_size=None, sampler=range(start, len(dataset)),
                                            num_workers=num_workers, pin_memory=pin_memory,
                                            worker_init_fn=one_thread))


# -----------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate(model, task, eval_data, batch_size, device, sleep_passes):
    """Accuracy on the fixed evaluation sets eval_data = {level: (idx, targets, _)}, per level.

    Returns {level: {"item": fraction of answers right, "exact": fraction of examples all right}}.
    A multi-token answer counts as right only when all its tokens are.
    """
    model.eval()
    results = {}
    for level, (idx, targets, _) in eval_data.items():
        right = []
        for i in range(0, len(idx), batch_size):
            x, y = idx[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
            with autocast(device):
                logits, _ = model(x, y, sleep_passes=sleep_passes)
            right.append(task.score(logits.argmax(-1).cpu(), y.cpu()))
        right = torch.cat(right)                                  # (examples, items)
        results[level] = {"item": right.float().mean().item(), "exact": right.all(1).float().mean().item()}
    model.train()
    return results


def format_eval(task, results):
    return " | ".join(f"{task.level_name}={level} {r[task.metric]:.3f}" for level, r in results.items())


# -----------------------------------------------------------------------------
# One training step, and the loop.


def train_step(model_for_step, model, optimizers, batch, step, cfg, world_size, frozen, sleep_choices):
    """One update on the global batch: set the learning rate, forward and backward each micro-batch (its
    mean loss weighted by its share of the batch's answer tokens), clip, check for NaN, step the optimizers.
    Returns the batch's loss and the gradient norm before clipping, as floats."""
    device = next(model.parameters()).device
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["peak_lr"] * lr_multiplier(step, cfg)
        opt.zero_grad(set_to_none=True)
    idx, targets, batch_answers = batch
    accumulation = cfg.gradient_accumulation_steps
    micro = idx.shape[0] // accumulation
    warming_up = step < cfg.ssm_warmup_iters
    loss_sum = torch.zeros((), device=device)
    for m in range(accumulation):
        x, y = (t[m * micro:(m + 1) * micro].to(device, non_blocking=True) for t in (idx, targets))
        share = int((targets[m * micro:(m + 1) * micro] >= 0).sum()) / batch_answers   # of the global batch's answers
        sync = m == accumulation - 1 or world_size == 1          # DDP all-reduces gradients on the last micro-step
        if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()            # a new forward: earlier outputs are consumed
        with nullcontext() if sync else model_for_step.no_sync():
            with autocast(device.type):
                _, loss = model_for_step(x, y, sleep_passes=step_sleep_passes(step, cfg, sleep_choices),
                                         eviction="hard" if warming_up else None)
            (loss * share * world_size).backward()               # DDP averages over processes
        loss_sum += loss.detach() * share
    if world_size > 1:
        dist.all_reduce(loss_sum)                                 # the loss of the whole global batch
    if warming_up:
        for p in frozen:
            p.grad = None                                         # optimizers skip parameters without grad
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
    loss, grad_norm = torch.stack([loss_sum.float(), grad_norm.float()]).tolist()   # one device sync for both
    for name, value in (("loss", loss), ("gradient norm", grad_norm)):
        if not math.isfinite(value):
            raise NonFiniteLoss(f"{name} is {value} at step {step}: training stopped before the update")
    for opt in optimizers:
        opt.step()
    return loss, grad_norm


def train(cfg, task_overrides, log=print, later_steps=None):
    """Train one model; returns a dict with the config, per-step losses, eval history and final eval.
    In a sweep, later_steps is the work of the runs still to come, in steps of this run (for the eta).
    Ctrl-C stops after the current step, saves a checkpoint and raises Interrupted."""
    rank, world_size, device = distributed(pick_device(cfg.device))
    if rank != 0:
        log = lambda *a: None            # noqa: E731 (only rank 0 logs, evaluates and checkpoints)
    if device == "cpu":
        torch.set_flush_denormal(True)   # exp-decay products go denormal; they made a step ~20x slower
        torch.set_num_threads(cfg.threads or 1)   # torch's one per core: 10-100x slower on busy cores
        keep_freed_memory()              # a fast path: same numbers, ~10% less CPU time per step
    run = start_or_resume(cfg, task_overrides, device, log)   # model, task, optimizers, step, ... (or a checkpoint's)
    task, model, optimizers = run["task"], run["model"], run["optimizers"]
    eval_passes = int_list(cfg.eval_sleep_passes, "eval_sleep_passes") or [model.config.sleep_passes]
    eval_data = {}

    def run_eval():
        if not eval_data:   # made once: the evaluation sets are fixed
            eval_data.update({lv: task.eval_set(lv, cfg.eval_examples, seed=cfg.seed) for lv in task.levels})
        evals = {n: evaluate(model, task, eval_data, cfg.eval_batch_size, device, n) for n in eval_passes}
        for n, res in evals.items():
            log(f"eval step {run['step']} N={n} | {format_eval(task, res)}")
        return evals

    if cfg.eval_only:
        return summary(cfg, run, final=run_eval())
    model_for_step = for_training(model, cfg, device, world_size)   # compiled and/or DDP-wrapped, or the model
    frozen = [p for name, p in model.named_parameters()              # no update during --ssm_warmup_iters
              if not (name.startswith("blocks.") and model.blocks[int(name.split(".")[1])].kind == "G")]
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.startswith("cuda") else 0)
    batches = step_batches(StepBatches(task, cfg, rank, world_size), run["step"], workers,
                           pin_memory=device.startswith("cuda"))
    sleep_choices = int_list(cfg.train_sleep_passes, "train_sleep_passes")
    logged = (run["step"], run["elapsed"])
    with stop_on_ctrl_c() if world_size == 1 else nullcontext(StopRequest()) as stop:
        while run["step"] < cfg.max_iters:
            t0 = time.time()
            try:
                loss, grad_norm = train_step(model_for_step, model, optimizers, next(batches), run["step"], cfg,
                                             world_size, frozen, sleep_choices)
            except NonFiniteLoss as e:
                raise NonFiniteLoss(f"{e}. The last good checkpoint (if any) is {run['path']}; try a lower "
                                    f"learning rate or more warm-up.") from None
            run["losses"].append(loss)
            run["step"] += 1
            run["elapsed"] += time.time() - t0
            step = run["step"]
            if step % cfg.log_interval == 0 or step == cfg.max_iters:
                log(progress_line(run, cfg, task, logged, grad_norm, later_steps, device))
                logged = (step, run["elapsed"])
            evaluated = rank == 0 and (step % cfg.eval_interval == 0 or step == cfg.max_iters)
            if evaluated:
                evals = run_eval()
                run["history"].append(dict(step=step, elapsed=run["elapsed"],
                                           eval={str(n): r for n, r in evals.items()}))
                save_run(run, cfg)
            if stop.requested:
                if not evaluated:
                    save_run(run, cfg)
                raise Interrupted(f"stopped at step {step}/{cfg.max_iters}; saved {run['path']}")
    final = run["history"][-1]["eval"] if run["history"] else {}
    return summary(cfg, run, final={int(n): r for n, r in final.items()})


def progress_line(run, cfg, task, logged, grad_norm, later_steps, device):
    """step, loss, gradient norm, learning rate, ms/step and tokens/s since the last line, eta."""
    step, elapsed = run["step"], run["elapsed"]
    ms = (elapsed - logged[1]) * 1000 / (step - logged[0])
    eta = (cfg.max_iters - step) * elapsed / step
    eta = f"{eta / 60:.1f} min" + (f" | sweep eta {(eta + later_steps * elapsed / step) / 60:.1f} min"
                                   if later_steps is not None else "")
    memory = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.startswith("cuda") else ""
    return (f"step {step}/{cfg.max_iters} ({100 * step / cfg.max_iters:.0f}%) | loss {run['losses'][-1]:.4f} "
            f"| grad norm {grad_norm:.4g} | lr {run['optimizers'][0].param_groups[0]['lr']:.2e} "
            f"| {ms:.0f} ms/step | {cfg.batch_size * task.seq_len * 1000 / ms:,.0f} tok/s{memory} | eta {eta}")


def main(argv):
    sys.stdout.reconfigure(line_buffering=True)   # each line as it is printed, also into a file or a pipe
    if "-h" in argv or "--help" in argv:
        try:
            print(help_text(argv))
        except ValueError as e:
            sys.exit(f"error: {e}")
        return
    try:
        cfg, task_overrides = parse_args(argv)
        # Check the whole configuration (model and task) before any work starts.
        build_model(cfg, make_task(cfg.task, preset=cfg.preset, **task_overrides))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if int(os.environ.get("RANK", 0)) == 0:
        per_run = {"sleep_passes", "seed"} if cfg.sweep else set()   # a sweep sets them per run
        changed = changed_settings(cfg, task_overrides, skip={"task", "preset", "out_dir", *per_run})
        flags = [f"--{k}" if v is True else f"--{k}={flag_text(v)}" for k, v in changed]
        print(f"{cfg.task}, {cfg.preset} preset; changed: {' '.join(flags) or 'nothing'} (--help lists every setting)")
    try:
        if cfg.sweep:
            sweep(cfg, task_overrides)
        else:
            train(cfg, task_overrides)
            if not cfg.eval_only and int(os.environ.get("RANK", 0)) == 0:
                print(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')} (evaluate at other N: python train.py "
                      f"--out_dir={cfg.out_dir} --eval_only --eval_sleep_passes=1,2,4,8)")
    except Interrupted as e:
        again = argv if cfg.sweep or "--resume" in argv else argv + ["--resume"]
        print(f"{e}. To continue: python train.py {shlex.join(again)}")
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit("stopped at once (a second Ctrl-C): nothing saved since the last checkpoint")
    except (NonFiniteLoss, ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# =============================================================================
# Plumbing: the command line, run names, checkpoints and resume rules, help, Ctrl-C, several GPUs and
# compile, sweeps and side-by-side runs, plots. A first reading can stop here. What the code above calls
# from here does what its name says; the one that does most is start_or_resume (the task, the model and
# its optimisers, fresh or from a checkpoint).


RUN_CONTROL = ("out_dir", "resume", "eval_only", "sweep", "seeds", "parallel", "device", "threads", "compile",
               "compile_mode", "num_workers", "gradient_accumulation_steps", "eval_interval", "eval_examples",
               "eval_batch_size",
               "eval_sleep_passes", "log_interval")


MAY_CHANGE = set(RUN_CONTROL) | {"max_iters"}   # what --resume / --eval_only may give anew (max_iters: only larger)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# -----------------------------------------------------------------------------
# The command line.


def _convert(key, text, default):
    """Parse text as the type of default; ValueError naming the key otherwise."""
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        if kind in (tuple, list):
            return kind(type(default[0])(x) if default else int(x) for x in text.split(","))
        return kind(text)
    except ValueError:
        raise ValueError(f"--{key} expects {'an' if kind.__name__[0] in 'aeiou' else 'a'} {kind.__name__} "
                         f"(like {default!r}), got {text!r}") from None


def preset_settings(task_name, preset):
    """Every setting's default for this task and preset (TrainConfig's defaults, then the preset's)."""
    if (task_name, preset) not in PRESETS:
        presets = {t: [p for t2, p in PRESETS if t2 == t] for t, _ in PRESETS}
        listed = "; ".join(f"{t}: {', '.join(p)}" for t, p in presets.items())
        raise ValueError(f"--task must be one of {', '.join(presets)} and --preset one of its presets ({listed}); "
                         f"got task={task_name!r}, preset={preset!r}")
    return {**dataclasses.asdict(TrainConfig()), "task": task_name, "preset": preset, **PRESETS[task_name, preset]}


def parse_args(argv):
    """--key=value pairs -> (TrainConfig, task overrides). Unknown keys or bad values: ValueError.

    With --resume or --eval_only the run's own settings come from its checkpoint (see restore_run)."""
    pairs = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        pairs[key] = value if "=" in arg else "true"
    settings = preset_settings(pairs.get("task", "rule110"), pairs.get("preset", "cpu"))
    task_params = make_task(settings["task"], preset=settings["preset"]).params
    overrides = {}
    for key, value in pairs.items():
        if key in ("task", "preset"):
            continue
        if key in settings:
            settings[key] = _convert(key, value, settings[key])
        elif key in task_params:
            overrides[key] = _convert(key, value, task_params[key])
        else:
            known = [*settings, *task_params]
            near = difflib.get_close_matches(key, known, n=1)
            raise ValueError(f"unknown setting --{key}: " + (f"did you mean --{near[0]}? (" if near else "(")
                             + "python train.py --help lists every setting and task parameter)")
    cfg = TrainConfig(**settings)
    check_config(cfg)
    cfg = dataclasses.replace(cfg, sleep_passes=effective_sleep_passes(cfg, "sleep_passes" in pairs))
    if not cfg.out_dir:
        name = run_name(cfg, overrides, sweep=bool(cfg.sweep))
        cfg = dataclasses.replace(cfg, out_dir=os.path.join("out", f"{cfg.task}-{cfg.preset}", name))
    if cfg.resume or cfg.eval_only:
        cfg, overrides = restore_run(cfg, overrides, given=set(pairs))
    return cfg, overrides


def check_config(cfg):
    """Refuse settings that would only fail later (or silently do the wrong thing)."""
    for name in ("batch_size", "max_iters", "eval_interval", "log_interval", "eval_examples", "eval_batch_size",
                 "layer_repeat", "n_embd", "n_head", "gradient_accumulation_steps"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "curriculum_iters", "ssm_warmup_iters", "bptt_passes", "seed", "parallel", "threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ValueError(f"--compile_mode must be one of {', '.join(COMPILE_MODES)}, got {cfg.compile_mode!r}")
    if cfg.compile and cfg.compile_mode in CUDA_GRAPH_MODES and (
            cfg.gradient_accumulation_steps > 1 or cfg.checkpoint_windows):
        # a CUDA-graph replay overwrites the previous one's outputs, gradients of earlier micro-steps and
        # the forward that checkpointing replays in backward included (pytorch issues 96693, 169545)
        raise ValueError(f"--compile_mode={cfg.compile_mode} (CUDA graphs) works with --gradient_accumulation_steps=1 "
                         f"and without --checkpoint_windows; got {cfg.gradient_accumulation_steps} and "
                         f"{cfg.checkpoint_windows}: use --compile_mode=default or max-autotune-no-cudagraphs")
    if cfg.num_workers < -1:
        raise ValueError(f"--num_workers must be -1 (auto), 0 (in the loop) or more, got {cfg.num_workers}")
    for name in ("sweep", "seeds", "eval_sleep_passes", "train_sleep_passes"):
        int_list(getattr(cfg, name), name)
    block_slice(cfg.sleep_blocks)
    if cfg.sweep and cfg.train_sleep_passes:
        raise ValueError("--sweep trains one model per N: it cannot be combined with --train_sleep_passes")
    if cfg.sweep and nothing_sleeps(cfg):
        raise ValueError(f"--sweep over N with --layers={cfg.layers} --sleep_blocks={cfg.sleep_blocks} "
                         f"--eviction={cfg.eviction}: nothing sleeps (no G block among the looped ones under hard "
                         f"eviction, or no windows), so every N is the same model; use --sleep_passes=1")
    if cfg.parallel > 1 and "RANK" in os.environ:
        raise ValueError("--parallel starts its own processes: run it without torchrun")
    if cfg.sweep and (cfg.resume or cfg.eval_only):
        raise ValueError("--sweep resumes the runs it finds by itself: drop --resume / --eval_only")
    if cfg.resume and cfg.eval_only:
        raise ValueError("--resume and --eval_only exclude each other")
    if cfg.batch_size % cfg.gradient_accumulation_steps:
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of "
                         f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps}")
    pick_device(cfg.device)


def int_list(text, name):
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} expects comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values) and name != "seeds":
        raise ValueError(f"--{name} values must be >= 1, got {text!r}")
    return values


def pick_device(name):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    if name not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda or mps, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        why = "was built without CUDA" if torch.version.cuda is None else "finds no CUDA GPU"
        raise ValueError(f"--device=cuda: this torch ({torch.__version__}) {why}; use --device=auto or --device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device=mps: this torch ({torch.__version__}) finds no Apple GPU (MPS); "
                         f"use --device=auto or --device=cpu")
    return name


def block_slice(text):
    """--sleep_blocks: "" -> None (every block), "1:3" -> (1, 3)."""
    if not text:
        return None
    start, colon, stop = text.partition(":")
    if not (colon and start.isdigit() and stop.isdigit()):
        raise ValueError(f"--sleep_blocks expects start:stop (block indices, e.g. 1:3) or nothing, got {text!r}")
    return int(start), int(stop)


def nothing_sleeps(cfg):
    """True when N cannot change the model: --eviction=none has no windows, and under hard eviction
    only S crosses a window, so sleep passes over blocks without a G block (no S) leave no trace.
    (Under sliding eviction the kept attention context comes from the last pass, so N matters.)"""
    looped = (cfg.layers * cfg.layer_repeat)[slice(*(block_slice(cfg.sleep_blocks) or (None,)))]
    return cfg.eviction == "none" or (cfg.eviction == "hard" and "G" not in looped)


def effective_sleep_passes(cfg, explicit):
    """The N the model is saved, named and evaluated at: with --train_sleep_passes the largest trained N;
    1 when nothing sleeps (see nothing_sleeps)."""
    n = cfg.sleep_passes
    choices = int_list(cfg.train_sleep_passes, "train_sleep_passes")
    if choices:
        if explicit and n not in choices:
            raise ValueError(f"--sleep_passes={n} is not among --train_sleep_passes={cfg.train_sleep_passes}: "
                             f"the model is saved and evaluated at a trained N (by default the largest, "
                             f"{max(choices)})")
        n = n if explicit else max(choices)
    return 1 if nothing_sleeps(cfg) else n


def help_text(argv):
    """Every setting with its default (for the --task and --preset in argv) and meaning, then the
    task's parameters; the meanings are the comments in TrainConfig."""
    pairs = dict(arg[2:].partition("=")[::2] for arg in argv if arg.startswith("--"))
    task_name, preset = pairs.get("task", "rule110"), pairs.get("preset", "cpu")
    settings = preset_settings(task_name, preset)
    meaning = dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.*)$", inspect.getsource(TrainConfig), re.M))
    lines = [__doc__.strip().splitlines()[0], "", f"usage: python train.py [--key=value ...]   "
             f"(defaults below for --task={task_name} --preset={preset}; give those flags to see another preset's)", ""]
    lines += [f"  --{k}={v}".ljust(34) + f" {meaning.get(k, '')}" for k, v in settings.items()]
    task = make_task(task_name, preset=preset)
    lines += ["", f"parameters of task {task_name} (preset {preset}), also --key=value; "
              f"see `python data.py {task_name} --preset={preset}`:"]
    lines += [f"  --{k}={flag_text(v)}" for k, v in task.params.items()]
    return "\n".join(lines)


def changed_settings(cfg, task_overrides, skip=()):
    """[(key, value)] of every setting, then every task parameter, that differs from the preset's."""
    defaults = preset_settings(cfg.task, cfg.preset)
    task_defaults = make_task(cfg.task, preset=cfg.preset).params
    changed = [(k, v) for k, v in dataclasses.asdict(cfg).items() if k not in skip and v != defaults[k]]
    return changed + sorted((k, v) for k, v in task_overrides.items() if v != task_defaults[k])


def run_name(cfg, task_overrides, sweep=False):
    """N4_seed0 (a sweep: "sweep"), then every training setting that differs from the preset's, e.g.
    N1_seed0_layers=AA_max_iters=13000: runs with different settings never share a folder."""
    changed = changed_settings(cfg, task_overrides, skip={"task", "preset", "sleep_passes", "seed", *RUN_CONTROL})
    text = "_".join(f"{k}={flag_text(v)}" for k, v in changed)
    head = "sweep" if sweep else f"N{cfg.sleep_passes}_seed{cfg.seed}"
    return re.sub(r"[^\w=,.+-]", "-", f"{head}_{text}" if text else head)


def flag_text(value):
    """A setting's value as --key=value writes it: (1, 2) -> "1,2"."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


# -----------------------------------------------------------------------------
# Checkpoints: start, resume, restore the settings, load a trained run.


def start_or_resume(cfg, task_overrides, device, log):
    """The run's state: a new model and optimizers, or (--resume, --eval_only) the checkpoint's, with its
    step, history, losses, elapsed time and RNG state. A new run refuses to overwrite a checkpoint."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.resume or cfg.eval_only:
        ckpt = load_checkpoint(path)
        check_against_checkpoint(cfg, task_overrides, ckpt, path)
        task_overrides = ckpt["task"]
    elif os.path.exists(path):
        raise ValueError(f"{path} already holds a run (step {load_checkpoint(path)['step']}): --resume continues "
                         f"it (a larger --max_iters extends it), --eval_only evaluates it; or choose another --out_dir")
    task = make_task(cfg.task, preset=cfg.preset, **task_overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task)
    if ckpt is not None and model.config != saved_model_config(ckpt):
        if cfg.resume:
            raise ValueError(f"--resume with model settings that differ from the checkpoint's: {model.config} "
                             f"(checkpoint: {saved_model_config(ckpt)})")
        model = SleepLM(saved_model_config(ckpt))                 # --eval_only: the checkpoint's model
    if cfg.init_from and ckpt is None:
        load_weights(model, cfg.init_from)
    model = model.to(device)
    optimizers = configure_optimizers(model, cfg.learning_rate, cfg.adamw_lr, cfg.weight_decay, optimizer=cfg.optimizer)
    run = dict(path=path, task=task, model=model, optimizers=optimizers, step=0, history=[], losses=[], elapsed=0.0)
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if cfg.resume:
            for opt, state in zip(optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
        run.update({k: ckpt[k] for k in ("step", "history", "losses", "elapsed")})
        torch.set_rng_state(ckpt["rng_state"])
        if device.startswith("cuda") and ckpt.get("cuda_rng_state") is not None:
            torch.cuda.set_rng_state(ckpt["cuda_rng_state"])
        log(f"loaded {path} at step {run['step']}")
    world = f" x {dist.get_world_size()} processes" if dist.is_initialized() else ""
    log(f"task {task.name} ({task.preset}) T={task.seq_len} L={model.config.window} vocab={task.vocab_size} "
        f"| model {model.config.layers} d={model.config.n_embd} N={model.config.sleep_passes} "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M params | {device}{world}")
    return run


def check_against_checkpoint(cfg, task_overrides, ckpt, path, given=None):
    """The one place that compares settings with a checkpoint's: training settings and task parameters
    must match (run control and a larger max_iters may differ). given: only these flags (the command line)."""
    saved = dataclasses.asdict(saved_config(ckpt))
    keys = [k for k in dataclasses.asdict(cfg) if given is None or k in given]
    differ = [f"--{k}={getattr(cfg, k)} (checkpoint: {saved[k]})" for k in keys
              if k not in MAY_CHANGE and k in saved and getattr(cfg, k) != saved[k]]
    differ += [f"--{k}={v} (checkpoint: {ckpt['task'].get(k)})" for k, v in task_overrides.items()
               if ckpt["task"].get(k) != v]
    if differ:
        raise ValueError(f"{path} holds another run; these settings differ from it: {', '.join(differ)}. Only "
                         f"{', '.join(sorted(MAY_CHANGE))} may change (start a new run in another --out_dir, or "
                         f"--init_from={os.path.dirname(path)} to start from its weights)")


def save_run(run, cfg):
    """The checkpoint: model, optimizers, settings, step, history, losses, RNG state; atomically."""
    save_checkpoint(run["path"], model=run["model"].state_dict(),
                    optimizers=[o.state_dict() for o in run["optimizers"]],
                    config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(run["model"].config),
                    task=run["task"].params, step=run["step"], history=run["history"], losses=run["losses"],
                    elapsed=run["elapsed"], rng_state=torch.get_rng_state(),
                    cuda_rng_state=torch.cuda.get_rng_state() if run["model"].lm_head.weight.is_cuda else None)


def summary(cfg, run, final):
    return dict(config=dataclasses.asdict(cfg), task=run["task"].params, losses=run["losses"], history=run["history"],
                final=final, elapsed=run["elapsed"])


def restore_run(cfg, overrides, given):
    """--resume / --eval_only continue the run saved in cfg.out_dir with the checkpoint's own settings.
    Only run-control flags (RUN_CONTROL) and a larger --max_iters may change; any other flag given on
    the command line that differs from the checkpoint is refused."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    saved = saved_config(ckpt)
    check_against_checkpoint(cfg, overrides, ckpt, path, given=given)
    # the machine's settings come from this command line (its defaults if not given), the rest of
    # the run control from the checkpoint unless given
    here = ("out_dir", "resume", "eval_only", "device", "threads", "num_workers", "compile", "compile_mode", "parallel")
    keep = {k: getattr(cfg, k) for k in MAY_CHANGE if k in given or k in here}
    cfg = dataclasses.replace(saved, **keep)
    if cfg.resume and cfg.max_iters < saved.max_iters:
        raise ValueError(f"--max_iters={cfg.max_iters} is below the run's {saved.max_iters}: a resumed run can "
                         f"only be extended")
    check_config(cfg)
    return cfg, dict(ckpt["task"])


def save_checkpoint(path, **state):
    """Atomic: write a temp file, then rename over the old checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    """A checkpoint as a dict (tensors on the CPU), or a ValueError that names the file."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}: give the flags the run was started with (they name "
                                f"its folder) or its --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # truncated, not a checkpoint, or from an incompatible version
        raise ValueError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); it may be truncated "
                         f"or not a train.py checkpoint") from None


def saved_config(ckpt):
    """The TrainConfig a checkpoint was written with (fields added since take their defaults)."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in ckpt["config"].items() if k in fields})


def saved_model_config(ckpt):
    """The SleepLMConfig a checkpoint was written with (fields added since take their defaults)."""
    return SleepLMConfig(**{f.name: ckpt["model_config"].get(f.name, f.default)
                            for f in dataclasses.fields(SleepLMConfig)})


def load_weights(model, run_dir):
    """--init_from: the model weights of run_dir/ckpt.pt (not its optimiser, step or schedule)."""
    weights = load_checkpoint(os.path.join(run_dir, "ckpt.pt"))["model"]
    mine = model.state_dict()
    differ = sorted(k for k in mine.keys() | weights.keys()
                    if k not in mine or k not in weights or mine[k].shape != weights[k].shape)
    if differ:
        raise ValueError(f"--init_from={run_dir}: its model has other parameters or shapes than this one "
                         f"({', '.join(differ[:4])}{', ...' if len(differ) > 4 else ''}); it needs the same "
                         f"--layers, --layer_repeat, --n_embd, --n_head and task vocabulary")
    model.load_state_dict(weights)


def load_run(out_dir, device="cpu"):
    """A trained run in one call: (its model in eval mode, its task with the run's parameters).

        model, task = load_run("out/rule110-cpu/sweep/N4_seed0")
    """
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = SleepLM(saved_model_config(ckpt))
    model.load_state_dict(ckpt["model"])
    task = make_task(ckpt["config"]["task"], preset=ckpt["config"]["preset"], **ckpt["task"])
    return model.to(device).eval(), task


class NonFiniteLoss(RuntimeError):
    pass


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint (main prints how to continue)."""


class StopRequest:
    """The SIGINT (Ctrl-C) handler while training: the first asks the loop to stop after the current
    step and save a checkpoint; a second stops at once, without saving."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


@contextmanager
def stop_on_ctrl_c():
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():   # signal handlers live in the main thread
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


# -----------------------------------------------------------------------------
# Devices, several GPUs (DDP under torchrun) and torch.compile.


def distributed(device):
    """Under torchrun (RANK is set): join the process group, nccl on CUDA, gloo on CPU.
    Returns (rank, world_size, this process's device)."""
    if "RANK" not in os.environ:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def one_thread(worker_id):
    """A batch worker's torch threads: one (the workers run side by side). Ctrl-C is the training loop's."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def autocast(device):
    """bf16 autocast on CUDA (the recurrent state stays float32 inside the model); float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


def keep_freed_memory():
    """On Linux (glibc), keep freed memory for the next step instead of returning it to the OS and faulting
    it back in: about 10,000 page faults per CPU step of the cpu presets fewer, and ~10% less CPU time.
    The numbers do not change (test_a_parallel_sweep_trains_... and the resume tests are bitwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option, value in ((-3, 32 << 20), (-1, 1 << 30), (-2, 64 << 20)):   # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD,
        libc.mallopt(option, value)                                           # M_TOP_PAD (malloc.h)


def for_training(model, cfg, device, world_size):
    """The model the training step calls: --compile's per-window graphs, DDP under torchrun, or the model."""
    if cfg.batch_size % (world_size * cfg.gradient_accumulation_steps):
        raise ValueError(f"--batch_size={cfg.batch_size} must be a multiple of {world_size} processes x "
                         f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps}")
    model_for_step = compiled_for_training(model, cfg.compile_mode) if cfg.compile else model
    if world_size > 1:
        model_for_step = DDP(model_for_step, device_ids=[torch.device(device).index] if device.startswith("cuda")
                             else None)
    return model_for_step


def compiled_for_training(model, mode="default", backend="inductor"):
    """--compile: a view of model (same parameters) whose process_window, one window's embedding, wake
    pass and N - 1 sleep passes, runs under torch.compile as one graph. That is the unit that repeats:
    one graph per kind of window (consolidation or prediction, per shape and N), reused by every window
    of its kind, so compiling does not grow with the number of windows. Evaluation keeps the eager model."""
    fast = copy.copy(model)   # shares the modules and parameters; only the attribute below differs
    # each kind of window (first, later, prediction; each N) is a graph of its own, and with fullgraph
    # going past the limit (8) is an error, not a fall-back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    fast.process_window = torch.compile(model.process_window, mode=mode, backend=backend, fullgraph=True,
                                        dynamic=False)
    return fast


# -----------------------------------------------------------------------------
# Sweeps: one model per N (and seed), side by side, then a table and a plot.


def sweep(cfg, task_overrides, log=print):
    """Train one model per N in --sweep (for each seed in --seeds), same data order and learning rate;
    write results.json and results.md (and results.png if matplotlib is installed) to out_dir.

    A run whose checkpoint is already there is resumed (a finished one is only loaded), so the runs
    of a sweep can be spread over processes and collected by one more call. On the CPU the runs train
    side by side, one process per core (--parallel=P: P at once; on a GPU 1 unless given)."""
    passes, seeds = int_list(cfg.sweep, "sweep"), int_list(cfg.seeds, "seeds") or [cfg.seed]
    task = make_task(cfg.task, preset=cfg.preset, **task_overrides)
    run_cfgs = []
    for n in passes:
        for seed in seeds:
            eval_passes = ",".join(str(x) for x in dict.fromkeys([n] + int_list(cfg.eval_sleep_passes,
                                                                                "eval_sleep_passes")))
            run_cfgs.append(dataclasses.replace(cfg, sleep_passes=n, seed=seed, sweep="", seeds="", parallel=1,
                                                eval_sleep_passes=eval_passes,
                                                out_dir=os.path.join(cfg.out_dir, f"N{n}_seed{seed}")))
    labels = {c.out_dir: f"[run {i + 1}/{len(run_cfgs)} N={c.sleep_passes} seed={c.seed}]"
              for i, c in enumerate(run_cfgs)}
    parallel = sweep_parallel(cfg, len(run_cfgs))
    if parallel > 1:
        train_side_by_side([c for c in run_cfgs if not finished(c)], task_overrides, parallel, log, labels)
    runs = []
    for i, run_cfg in enumerate(run_cfgs):
        done = os.path.exists(os.path.join(run_cfg.out_dir, "ckpt.pt"))
        label = labels[run_cfg.out_dir]
        log(f"{label} {('collecting' if finished(run_cfg) else 'resuming') if done else 'training'}: {run_cfg.out_dir}")
        later = sum(c.max_iters * c.sleep_passes / run_cfg.sleep_passes for c in run_cfgs[i + 1:] if not finished(c))
        result = train(dataclasses.replace(run_cfg, resume=done), task_overrides,
                       lambda text, label=label: log(f"{label} {text}"), later_steps=later)
        if int(os.environ.get("RANK", 0)) != 0:
            continue                  # the other processes of torchrun help train; rank 0 evaluates and collects
        if len(result["losses"]) > run_cfg.max_iters:
            log(f"{label} note: this run was extended to step {len(result['losses'])}, past the sweep's "
                f"{run_cfg.max_iters}: its row is at that step, not at the other runs'")
        runs.append(dict(sleep_passes=run_cfg.sleep_passes, seed=run_cfg.seed,
                         final=result["final"][run_cfg.sleep_passes],
                         history=result["history"], elapsed=result["elapsed"], steps=len(result["losses"])))
    if int(os.environ.get("RANK", 0)) != 0:
        return runs
    table = results_table(task, runs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), task=task.params, metric=task.metric, runs=runs), f, indent=1)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    plotted = plot(task, runs, os.path.join(cfg.out_dir, "results.png"), log)
    log(f"results: {os.path.join(cfg.out_dir, 'results.md')} (the table above), results.json"
        + (", results.png" if plotted else ""))
    log(f"checkpoints: {', '.join(os.path.join(c.out_dir, 'ckpt.pt') for c in run_cfgs)}")
    return runs


def sweep_parallel(cfg, runs):
    """--parallel, or by default on the CPU one run per core (each of cfg.threads threads); else 1."""
    if cfg.parallel:
        return cfg.parallel
    if "RANK" in os.environ or pick_device(cfg.device) != "cpu":
        return 1
    return max(1, min(runs, (os.cpu_count() or 1) // (cfg.threads or 1)))


def finished(cfg):
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    return os.path.exists(path) and load_checkpoint(path)["step"] >= cfg.max_iters


def train_side_by_side(run_cfgs, task_overrides, parallel, log, labels):
    """Train each run as `python train.py` with all its settings, up to `parallel` processes at once.
    Each writes its log to out_dir/train.log; its step and eval lines are shown here, labelled, with
    an estimate for the whole sweep. Ctrl-C is passed on to the runs, which save a checkpoint."""
    waiting, running, ms_per_step = list(run_cfgs), [], {}
    with stop_on_ctrl_c() as stop:
        try:
            while waiting or running:
                while waiting and len(running) < parallel and not stop.requested:
                    running.append(start_run(waiting.pop(0), task_overrides))
                    log(f"{labels[running[-1]['cfg'].out_dir]} started: {running[-1]['cfg'].out_dir}/train.log")
                time.sleep(0.5)
                if stop.requested:
                    for run in running:
                        if not run.get("told"):
                            run["process"].send_signal(signal.SIGINT)
                            run["told"] = True
                for run in running:
                    relay(run, labels, log, ms_per_step, lambda: sweep_eta(running, waiting, ms_per_step, parallel))
                for run in [r for r in running if r["process"].poll() is not None]:
                    running.remove(run)
                    run["log"].close()
                    code, label = run["process"].returncode, labels[run["cfg"].out_dir]
                    if code == 0:
                        log(f"{label} finished")
                    elif not stop.requested:
                        raise RuntimeError(f"{label} failed (exit {code}): see {run['cfg'].out_dir}/train.log")
        finally:
            for run in running:
                run["process"].terminate()
    if stop.requested:
        raise Interrupted("stopped: each run of the sweep saved a checkpoint")


def start_run(run_cfg, task_overrides):
    run_cfg = dataclasses.replace(run_cfg, resume=os.path.exists(os.path.join(run_cfg.out_dir, "ckpt.pt")))
    argv = [f"--{k}={v}" for k, v in dataclasses.asdict(run_cfg).items()]
    argv += [f"--{k}={flag_text(v)}" for k, v in task_overrides.items()]
    os.makedirs(run_cfg.out_dir, exist_ok=True)
    path = os.path.join(run_cfg.out_dir, "train.log")
    log_file = open(path, "a")
    start = log_file.tell()
    # its own session: a Ctrl-C in the terminal reaches this process, which passes it on once
    process = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv], stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    return dict(cfg=run_cfg, process=process, log=log_file, path=path, read=start, eta=None)


def relay(run, labels, log, ms_per_step, sweep_eta):
    """Show the new step and eval lines of a run's train.log; remember its ms/step and eta."""
    with open(run["path"]) as f:
        f.seek(run["read"])
        text = f.read()
    complete = text[:text.rfind("\n") + 1]
    run["read"] += len(complete.encode())
    for line in complete.splitlines():
        step = re.match(r"step .*\| (\d+) ms/step .*\| eta ([\d.]+) min", line)
        if step:
            ms_per_step[run["cfg"].sleep_passes] = int(step.group(1))
            run["eta"] = float(step.group(2)) * 60
            line += f" | sweep eta {sweep_eta() / 60:.1f} min"
        if step or line.startswith(("eval ", "error")):
            log(f"{labels[run['cfg'].out_dir]} {line}")


def sweep_eta(running, waiting, ms_per_step, parallel):
    """Seconds until the sweep is done: the runs under way, then the waiting ones shared among the
    processes (a waiting run's ms/step from a run with its N, else scaled by N from the slowest seen)."""
    per_pass = max((ms / n for n, ms in ms_per_step.items()), default=0.0)

    def seconds(c):
        return c.max_iters * ms_per_step.get(c.sleep_passes, per_pass * c.sleep_passes) / 1000

    busy = [r["eta"] if r["eta"] is not None else seconds(r["cfg"]) for r in running]   # no line of its own yet
    queued = sum(seconds(c) for c in waiting)
    return max(max(busy, default=0.0), (sum(busy) + queued) / parallel)


def accuracy_over_seeds(task, runs):
    """{N: (runs of that N, mean per level, std per level over seeds; zeros for a single seed)}."""
    stats = {}
    for n in sorted({r["sleep_passes"] for r in runs}):
        mine = [r for r in runs if r["sleep_passes"] == n]
        values = torch.tensor([[r["final"][lv][task.metric] for lv in task.levels] for r in mine])
        spread = values.std(dim=0) if len(mine) > 1 else torch.zeros(len(task.levels))
        stats[n] = (mine, values.mean(dim=0), spread)
    return stats


def results_table(task, runs):
    """Markdown: one row per N, accuracy per level (mean +- std over seeds), wall time per run."""
    lines = [f"| N | {' | '.join(f'{task.level_name}={lv}' for lv in task.levels)} | seeds | minutes/run |",
             "|---" * (len(task.levels) + 3) + "|"]
    for n, (mine, mean, spread) in accuracy_over_seeds(task, runs).items():
        cells = [f"{m:.3f}" + (f" ± {s:.3f}" if len(mine) > 1 else "") for m, s in zip(mean.tolist(), spread.tolist())]
        minutes = sum(r["elapsed"] for r in mine) / len(mine) / 60
        lines.append(f"| {n} | {' | '.join(cells)} | {len(mine)} | {minutes:.1f} |")
    return "\n".join(lines)


def plot(task, runs, path, log):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no plot: matplotlib is optional and not installed (pip install matplotlib draws results.png)")
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n, (mine, mean, spread) in accuracy_over_seeds(task, runs).items():
        ax.errorbar(task.levels, mean, yerr=spread, marker="o", capsize=3,
                    label=f"N = {n} ({len(mine)} seeds, mean ± std)" if len(mine) > 1
                    else f"N = {n} (seed {mine[0]['seed']})")
    ax.set_xticks(list(task.levels))
    ax.set_xlabel(task.level_name)
    ax.set_ylabel(f"accuracy ({task.metric})")
    changed = {k: v for k, v in task.params.items() if make_task(task.name, preset=task.preset).params[k] != v}
    ax.set_title(f"{task.name} ({task.preset} preset{', ' if changed else ''}"
                 f"{' '.join(f'{k}={flag_text(v)}' for k, v in changed.items())})", fontsize=9 if changed else None)
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


if __name__ == "__main__":
    main(sys.argv[1:])
