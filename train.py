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

Outputs: out/<task>-<preset>/<run name>/ckpt.pt, the run name N<n>_seed<s> and every training setting that
differs from the preset (N1_seed0_layers=AA); --out_dir chooses another folder. A run never overwrites a
checkpoint: --resume continues it (a larger --max_iters extends it), --eval_only evaluates it.

Read this file top to bottom: settings, model and optimizers, schedule, batches, evaluation, the
training step, the loop. The plumbing (command line, run folders, checkpoints and resume rules,
Ctrl-C, devices and threads, several GPUs, compile, sweeps) is in runs.py; a first reading skips it.

The data order is a pure function of (seed, step): runs at different N see the same batches, and a
resumed run sees what the uninterrupted one would have. Gradient accumulation and several GPUs split
the same global batch, so they change the update only up to float rounding.
"""

import math
import os
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import runs
from data import make_task
from sleep_lm import SleepLM, SleepLMConfig


# The defaults. A preset (PRESETS, below) overrides some of them, --key=value overrides both; `--help`
# and the settings printed at start show the values in effect.
@dataclass
class TrainConfig:
    task: str = "rule110"            # a task of data.TASKS: rule110, depo, math
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
    log_interval: int = 50           # print a log line every this many steps (and after the first and the last)
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
        input_injection=cfg.input_injection, sleep_blocks=runs.block_slice(cfg.sleep_blocks))
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
                                            worker_init_fn=runs.one_thread))


# -----------------------------------------------------------------------------
# Evaluation.


@torch.no_grad()
def evaluate(model, task, eval_data, batch_size, device, sleep_passes):
    """Accuracy on the fixed evaluation sets eval_data = {level: (idx, targets, _)}, per level.

    Returns {level: {"item": fraction of answers right, "exact": fraction of examples all right,
    "by_answer": [fraction right of each example's first answer, second, ...]}}. A multi-token answer
    counts as right only when all its tokens are.
    """
    model.eval()
    results = {}
    for level, (idx, targets, _) in eval_data.items():
        right = []
        for i in range(0, len(idx), batch_size):
            x, y = idx[i:i + batch_size].to(device), targets[i:i + batch_size].to(device)
            with runs.autocast(device):
                logits, _ = model(x, y, sleep_passes=sleep_passes)
            right.append(task.score(logits.argmax(-1).cpu(), y.cpu()))
        right = torch.cat(right)                                  # (examples, items)
        results[level] = {"item": right.float().mean().item(), "exact": right.all(1).float().mean().item(),
                          "by_answer": right.float().mean(0).tolist()}
    model.train()
    return results


def format_eval(task, results):
    return " | ".join(f"{task.level_name}={level} {r[task.metric]:.3f}" for level, r in results.items())


def format_by_answer(task, results):
    """--eval_only's lines under an evaluation when an example asks several things (e.g. Rule 110's four
    evicted states): each answer's share right, in the order asked."""
    if task.items_per_example == 1:
        return []
    return [f"  {task.level_name}={level}, each answer in the order asked: " +
            " ".join(f"{a:.3f}" for a in r["by_answer"]) for level, r in results.items()]


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
        if cfg.compile and cfg.compile_mode in runs.CUDA_GRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()            # a new forward: earlier outputs are consumed
        with nullcontext() if sync else model_for_step.no_sync():
            with runs.autocast(device.type):
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
            raise runs.NonFiniteLoss(f"{name} is {value} at step {step}: training stopped before the update")
    for opt in optimizers:
        opt.step()
    return loss, grad_norm


@dataclass
class Run:
    """A run's state: what the loop advances and its checkpoint holds (with the settings and RNG state)."""
    path: str                 # out_dir/ckpt.pt
    task: object              # the task (data.py) with the run's parameters
    model: SleepLM
    optimizers: list          # stepped together (configure_optimizers)
    step: int = 0             # updates done
    history: list = field(default_factory=list)   # per evaluation: dict(step, elapsed, eval={"N": results})
    losses: list = field(default_factory=list)    # per step
    elapsed: float = 0.0      # seconds of training


def start_or_resume(cfg, task_overrides, device, log):
    """A new model and its optimizers, or (--resume, --eval_only) the checkpoint's with its step, history,
    losses, elapsed time and RNG state. The rules (what may differ from the checkpoint) are runs.py's."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = runs.checkpoint_to_continue(cfg, task_overrides, path)   # None: a new run
    task = make_task(cfg.task, preset=cfg.preset, **(ckpt["task"] if ckpt is not None else task_overrides))
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task)
    if ckpt is not None:
        model = runs.checkpoint_model(model, ckpt, cfg.resume)      # --eval_only: the checkpoint's own model
    elif cfg.init_from:
        runs.load_weights(model, cfg.init_from)                     # another run's weights, not its optimizers
    model = model.to(device)
    optimizers = configure_optimizers(model, cfg.learning_rate, cfg.adamw_lr, cfg.weight_decay, optimizer=cfg.optimizer)
    run = Run(path, task, model, optimizers)
    if ckpt is not None:
        runs.load_state(run, ckpt, cfg.resume, log)   # weights, optimizers (--resume), step, history, losses, RNG
    log(runs.describe(task, model, device))   # task T, L, vocabulary | model layers, d, N, parameters | device
    return run


def train(cfg, task_overrides, log=print, later_steps=None):
    """Train one model; returns a dict with the config, per-step losses, eval history and final eval.
    In a sweep, later_steps is the work of the runs still to come, in steps of this run (for the eta).
    Ctrl-C stops after the current step, saves a checkpoint and raises runs.Interrupted."""
    rank, world_size, device = runs.distributed(runs.setup_device(cfg.device, cfg.threads))
    if rank != 0:
        log = lambda *a: None            # noqa: E731 (only rank 0 logs, evaluates and checkpoints)
    run = start_or_resume(cfg, task_overrides, device, log)
    task, model = run.task, run.model
    eval_passes = runs.int_list(cfg.eval_sleep_passes, "eval_sleep_passes") or [model.config.sleep_passes]
    eval_data = {}

    def run_eval():
        if not eval_data:   # made once: the evaluation sets are fixed
            eval_data.update({lv: task.eval_set(lv, cfg.eval_examples, seed=cfg.seed) for lv in task.levels})
        evals = {n: evaluate(model, task, eval_data, cfg.eval_batch_size, device, n) for n in eval_passes}
        for n, res in evals.items():
            log(f"eval step {run.step} N={n} | {format_eval(task, res)}")
            for line in format_by_answer(task, res) if cfg.eval_only else ():
                log(line)
        return evals

    if cfg.eval_only:
        return runs.summary(cfg, run, final=run_eval())
    model_for_step = runs.for_training(model, cfg, device, world_size)   # compiled and/or DDP-wrapped, or the model
    frozen = [p for name, p in model.named_parameters()                  # no update during --ssm_warmup_iters
              if not (name.startswith("blocks.") and model.blocks[int(name.split(".")[1])].kind == "G")]
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if device.startswith("cuda") else 0)
    batches = step_batches(StepBatches(task, cfg, rank, world_size), run.step, workers,
                           pin_memory=device.startswith("cuda"))
    sleep_choices = runs.int_list(cfg.train_sleep_passes, "train_sleep_passes")
    logged = (run.step, run.elapsed)   # the last progress line's step and time: ms/step is since then
    first = None                       # (step, time) after this process's first step: logged at once
    with runs.stop_on_ctrl_c(enabled=world_size == 1) as stop:
        while run.step < cfg.max_iters:
            t0 = time.time()
            try:
                loss, grad_norm = train_step(model_for_step, model, run.optimizers, next(batches), run.step, cfg,
                                             world_size, frozen, sleep_choices)
            except runs.NonFiniteLoss as e:
                raise runs.NonFiniteLoss(f"{e}. The last good checkpoint (if any) is {run.path}; try a lower "
                                         f"learning rate or more warm-up.") from None
            run.losses.append(loss)
            run.step += 1
            run.elapsed += time.time() - t0
            first = first or (run.step, run.elapsed)
            if run.step == first[0] or run.step % cfg.log_interval == 0 or run.step == cfg.max_iters:
                log(runs.progress_line(run, cfg, logged, first, grad_norm, later_steps, device))
                logged = (run.step, run.elapsed)
            evaluated = rank == 0 and (run.step % cfg.eval_interval == 0 or run.step == cfg.max_iters)
            if evaluated:
                evals = run_eval()
                run.history.append(dict(step=run.step, elapsed=run.elapsed,
                                        eval={str(n): r for n, r in evals.items()}))
                runs.save_run(run, cfg)
            if stop.requested:
                if not evaluated:
                    runs.save_run(run, cfg)
                raise runs.Interrupted(f"stopped at step {run.step}/{cfg.max_iters}; saved {run.path}")
    final = run.history[-1]["eval"] if run.history else {}
    return runs.summary(cfg, run, final={int(n): r for n, r in final.items()})


def main(argv):
    """python train.py --key=value ...: one run, or with --sweep one per N; --help lists every setting."""
    runs.line_buffered()               # each line as it is printed, also into a file or a pipe
    with runs.errors_as_one_line():     # "error: ..." (exit 1) instead of a traceback; the DDP group left
        if "-h" in argv or "--help" in argv:
            print(runs.help_text(argv, TrainConfig, PRESETS, __doc__))
            return
        cfg, task_overrides = runs.parse_args(argv, TrainConfig, PRESETS)
        build_model(cfg, make_task(cfg.task, preset=cfg.preset, **task_overrides))   # check it all before any work
        master = int(os.environ.get("RANK", 0)) == 0                                # under torchrun rank 0 prints
        if master:
            print(runs.settings_line(cfg, task_overrides, PRESETS))
        try:
            if cfg.sweep:
                runs.sweep(cfg, task_overrides, train)
            else:
                train(cfg, task_overrides)
        except runs.Interrupted as e:   # Ctrl-C: stopped after a step and saved a checkpoint
            again = argv if cfg.sweep or "--resume" in argv else argv + ["--resume"]
            print(f"{e}. To continue: python train.py {shlex.join(again)}")
            sys.exit(130)
        if master and not (cfg.sweep or cfg.eval_only):
            print(f"checkpoint: {os.path.join(cfg.out_dir, 'ckpt.pt')} (evaluate at other N: python train.py "
                  f"--out_dir={cfg.out_dir} --eval_only --eval_sleep_passes=1,2,4,8)")


if __name__ == "__main__":
    main(sys.argv[1:])
