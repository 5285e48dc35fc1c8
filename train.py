"""
Train and evaluate the sleeping hybrid on Rule 110, Depo or math.

    python train.py --task=rule110                      # cpu preset: a laptop CPU, minutes
    python train.py --task=depo --preset=paper          # paper scale: one GPU
    python train.py --task=rule110 --sweep=1,4 --seeds=0,1,2   # one model per N (and seed), a results table
    python train.py --task=rule110 --eval_only --eval_sleep_passes=1,2,4,8   # evaluate out_dir/ckpt.pt

Every setting below can be overridden with --key=value (booleans also as a bare --key), and so can
every parameter of the task (see `python data.py TASK`), e.g. --t_max=12. Settings are printed at start.

Optimiser (as in the paper): Muon for the 2-D hidden matrices at learning_rate, AdamW for the
embedding, the head, norm gains, GDN gates (a_proj, b_proj, A_log, dt_bias) and conv weights at
adamw_lr; --optimizer=adamw uses AdamW at learning_rate for the matrices too. Weight decay (default 0)
applies to matrices only. Schedule: linear warm-up over warmup_iters, then cosine decay to
min_lr_frac x the peak, for both optimisers. Gradients are clipped to grad_clip (global norm).

The data order is a pure function of (seed, step): runs at different N see the same batches, and a
resumed run sees what the uninterrupted one would have.
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from data import make_task
from sleep_lm import SleepLM, SleepLMConfig


@dataclass
class TrainConfig:
    task: str = "rule110"            # rule110, depo or math
    preset: str = "cpu"              # cpu (minutes on a laptop) or paper (one GPU, paper scale)
    seed: int = 0                    # model init and data order
    # model
    n_embd: int = 64
    n_head: int = 2
    layers: str = "AGAG"
    layer_repeat: int = 1            # repeat the layer pattern: --sleep_passes=1 --layer_repeat=4 is the compute-matched baseline
    sleep_passes: int = 4            # N (the window L is the task's: --width for rule110, --window for depo and math)
    eviction: str = "hard"
    bptt_passes: int = 0             # 0 = full backprop; K = only the last K passes carry gradient
    checkpoint_windows: bool = False
    input_injection: bool = False    # add the embeddings before every sleep pass (not in Algorithm 1)
    # training levers (see the README's "Making sleep train at small scale")
    train_sleep_passes: str = ""     # comma list: draw N per step from it (seeded by step); "" = always sleep_passes
    curriculum_iters: int = 0        # raise the hardest training level linearly from the easiest to the hardest over these steps
    # optimisation
    optimizer: str = "muon"          # muon (matrices) + adamw (the rest), or adamw
    batch_size: int = 128
    max_iters: int = 2000
    learning_rate: float = 2e-3      # Muon (or AdamW with --optimizer=adamw) for the hidden matrices
    adamw_lr: float = 5e-4           # AdamW for everything else
    weight_decay: float = 0.0
    warmup_iters: int = 200
    min_lr_frac: float = 0.1
    grad_clip: float = 1.0           # 0 = off
    # evaluation and logging
    eval_interval: int = 250
    eval_examples: int = 512         # per difficulty level
    eval_batch_size: int = 256
    eval_sleep_passes: str = ""      # comma list of N to evaluate at; "" = the trained N
    eval_only: bool = False
    log_interval: int = 50
    # runs
    out_dir: str = "out"
    resume: bool = False
    sweep: str = ""                  # comma list of N: one model per N, then a results table
    seeds: str = ""                  # comma list of seeds for --sweep; "" = just --seed
    device: str = "auto"             # auto (cuda, then mps, then cpu), cpu, cuda or mps
    compile: bool = False


PRESETS = {
    # A laptop CPU: at most about 20 minutes per run on 2 cores (README, Results).
    # Two layers (AG): one pass is too shallow for long rollouts, so N = 4 has something to add.
    ("rule110", "cpu"): dict(n_embd=64, n_head=2, layers="AG", batch_size=128, max_iters=4000, eval_interval=500),
    ("depo", "cpu"): dict(n_embd=64, n_head=2, layers="AG", batch_size=64, max_iters=3000, eval_interval=500),
    ("math", "cpu"): dict(n_embd=64, n_head=2, layers="AG", batch_size=32, max_iters=500, eval_interval=250),
    # One GPU, the paper's model (4 layers, d = 256, AGAG) and batch sizes; Muon 2e-3 / AdamW 5e-5.
    # Rule 110: ~5B tokens = 100k steps of 512 x 100 tokens. Depo and math: sized to a 1-2 GPU-day run.
    ("rule110", "paper"): dict(n_embd=256, n_head=4, batch_size=512, max_iters=100_000, adamw_lr=5e-5,
                               warmup_iters=1000, eval_interval=2000, eval_examples=2048, log_interval=100),
    ("depo", "paper"): dict(n_embd=256, n_head=4, batch_size=128, max_iters=100_000, adamw_lr=5e-5,
                            warmup_iters=1000, eval_interval=2000, eval_examples=2048, log_interval=100),
    ("math", "paper"): dict(n_embd=256, n_head=4, batch_size=256, max_iters=20_000, adamw_lr=5e-5,
                            warmup_iters=500, eval_interval=1000, eval_examples=400, eval_batch_size=32,
                            log_interval=20, checkpoint_windows=True),
}

# -----------------------------------------------------------------------------
# Settings from the command line.


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
        raise ValueError(f"--{key} expects a {kind.__name__} (like {default!r}), got {text!r}") from None


def parse_args(argv):
    """--key=value pairs -> (TrainConfig, task overrides). Unknown keys or bad values: ValueError."""
    pairs = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        pairs[key] = value if "=" in arg else "true"
    defaults = TrainConfig()
    task_name, preset = pairs.get("task", defaults.task), pairs.get("preset", defaults.preset)
    if (task_name, preset) not in PRESETS:
        raise ValueError(f"--task must be one of rule110, depo, math and --preset one of cpu, paper; "
                         f"got task={task_name!r}, preset={preset!r}")
    settings = {**dataclasses.asdict(defaults), **PRESETS[task_name, preset]}
    task_params = make_task(task_name, preset=preset).params
    overrides = {}
    for key, value in pairs.items():
        if key in settings:
            settings[key] = _convert(key, value, settings[key]) if key not in ("task", "preset") else value
        elif key in task_params:
            overrides[key] = _convert(key, value, task_params[key])
        else:
            raise ValueError(f"unknown setting --{key}; settings: {', '.join(settings)}; "
                             f"parameters of task {task_name}: {', '.join(task_params)}")
    cfg = TrainConfig(**settings)
    check_config(cfg)
    return cfg, overrides


def check_config(cfg):
    """Refuse settings that would only fail later (or silently do the wrong thing)."""
    for name in ("batch_size", "max_iters", "eval_interval", "log_interval", "eval_examples", "eval_batch_size",
                 "layer_repeat", "n_embd", "n_head"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_iters", "curriculum_iters", "bptt_passes", "seed"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(cfg, name)}")
    for name in ("sweep", "seeds", "eval_sleep_passes", "train_sleep_passes"):
        int_list(getattr(cfg, name), name)
    if cfg.sweep and cfg.train_sleep_passes:
        raise ValueError("--sweep trains one model per N: it cannot be combined with --train_sleep_passes")
    if cfg.resume and cfg.eval_only:
        raise ValueError("--resume and --eval_only exclude each other")
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
    return name


# -----------------------------------------------------------------------------
# Model, schedule, evaluation, checkpoints.


def build_model(cfg, task):
    config = SleepLMConfig(
        vocab_size=task.vocab_size, n_embd=cfg.n_embd, n_head=cfg.n_head, layers=cfg.layers * cfg.layer_repeat,
        window=task.window, sleep_passes=cfg.sleep_passes, eviction=cfg.eviction,
        bptt_passes=cfg.bptt_passes or None, checkpoint_windows=cfg.checkpoint_windows,
        input_injection=cfg.input_injection)
    return SleepLM(config)


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


def lr_multiplier(step, cfg):
    """Linear warm-up, then cosine decay to min_lr_frac."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
    return cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


@torch.no_grad()
def evaluate(model, task, cfg, device, sleep_passes):
    """Accuracy on the fixed evaluation set, per difficulty level.

    Returns {level: {"item": fraction of answers right, "exact": fraction of examples all right}}.
    A multi-token answer counts as right only when all its tokens are.
    """
    model.eval()
    results = {}
    for level in task.levels:
        idx, targets, _ = task.eval_set(level, cfg.eval_examples, seed=cfg.seed)
        right = []
        for i in range(0, len(idx), cfg.eval_batch_size):
            x, y = idx[i:i + cfg.eval_batch_size].to(device), targets[i:i + cfg.eval_batch_size].to(device)
            with autocast(device):
                logits, _ = model(x, y, sleep_passes=sleep_passes)
            right.append(task.score(logits.argmax(-1).cpu(), y.cpu()))
        right = torch.cat(right)                                  # (examples, items)
        results[level] = {"item": right.float().mean().item(), "exact": right.all(1).float().mean().item()}
    model.train()
    return results


def autocast(device):
    """bf16 autocast on CUDA (the recurrent state stays float32 inside the model); float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda")


def format_eval(task, results):
    return " | ".join(f"{task.level_name}={level} {r[task.metric]:.3f}" for level, r in results.items())


def save_checkpoint(path, **state):
    """Atomic: write a temp file, then rename over the old checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


class NonFiniteLoss(RuntimeError):
    pass


# -----------------------------------------------------------------------------
# Training.


def train(cfg, task_overrides, log=print):
    """Train one model; returns a dict with the config, per-step losses, eval history and final eval."""
    device = pick_device(cfg.device)
    if device == "cpu":
        torch.set_flush_denormal(True)   # exp-decay products go denormal; they made a step ~20x slower
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = None
    if cfg.resume or cfg.eval_only:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"no checkpoint to {'resume' if cfg.resume else 'evaluate'} at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        # The task the model was trained on, whatever the flags say.
        cfg = dataclasses.replace(cfg, task=ckpt["config"]["task"], preset=ckpt["config"]["preset"])
        task_overrides = ckpt["task"]
    task = make_task(cfg.task, preset=cfg.preset, **task_overrides)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, task)
    if ckpt is not None and dataclasses.asdict(model.config) != ckpt["model_config"]:
        if cfg.resume:
            differ = {k: (v, ckpt["model_config"][k]) for k, v in dataclasses.asdict(model.config).items()
                      if v != ckpt["model_config"][k]}
            raise ValueError(f"--resume with model settings that differ from the checkpoint's (flag, checkpoint): {differ}")
        model = SleepLM(SleepLMConfig(**ckpt["model_config"]))     # --eval_only: the checkpoint's model
    model = model.to(device)
    optimizers = model.configure_optimizers(cfg.learning_rate, cfg.adamw_lr, cfg.weight_decay, optimizer=cfg.optimizer)
    for opt in optimizers:
        for group in opt.param_groups:
            group["peak_lr"] = group["lr"]
    step, history, losses, elapsed = 0, [], [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        if cfg.resume:
            for opt, state in zip(optimizers, ckpt["optimizers"]):
                opt.load_state_dict(state)
        step, history, losses, elapsed = ckpt["step"], ckpt["history"], ckpt["losses"], ckpt["elapsed"]
        torch.set_rng_state(ckpt["rng_state"])
        log(f"loaded {ckpt_path} at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"task {task.name} ({task.preset}) T={task.seq_len} L={model.config.window} vocab={task.vocab_size} "
        f"| model {model.config.layers} d={model.config.n_embd} N={model.config.sleep_passes} "
        f"{n_params / 1e6:.3f}M params | {device}")
    eval_passes = int_list(cfg.eval_sleep_passes, "eval_sleep_passes") or [model.config.sleep_passes]
    sleep_choices = int_list(cfg.train_sleep_passes, "train_sleep_passes")

    def run_eval():
        evals = {n: evaluate(model, task, cfg, device, n) for n in eval_passes}
        for n, res in evals.items():
            log(f"eval step {step} N={n} | {format_eval(task, res)}")
        return evals

    def summary(final):
        return dict(config=dataclasses.asdict(cfg), task=task.params, losses=losses, history=history,
                    final=final, elapsed=elapsed)

    if cfg.eval_only:
        return summary(run_eval())

    model_for_step = torch.compile(model) if cfg.compile else model
    tokens_per_step = cfg.batch_size * task.seq_len
    logged_step, logged_elapsed = step, elapsed
    while step < cfg.max_iters:
        mult = lr_multiplier(step, cfg)
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["peak_lr"] * mult
        t0 = time.time()
        idx, targets, _ = task.train_batch(cfg.batch_size, step, seed=cfg.seed, levels=training_levels(step, cfg, task))
        idx, targets = idx.to(device), targets.to(device)
        with autocast(device):
            _, loss = model_for_step(idx, targets, sleep_passes=step_sleep_passes(step, cfg, sleep_choices))
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"loss is {loss.item()} at step {step}: training stopped. The last good "
                                f"checkpoint (if any) is {ckpt_path}; try a lower learning rate or more warm-up.")
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
        if not torch.isfinite(grad_norm):
            raise NonFiniteLoss(f"gradient norm is {grad_norm.item()} at step {step}: training stopped before the "
                                f"update. The last good checkpoint (if any) is {ckpt_path}.")
        for opt in optimizers:
            opt.step()
        losses.append(loss.item())
        step += 1
        elapsed += time.time() - t0
        if step % cfg.log_interval == 0 or step == cfg.max_iters:
            ms = (elapsed - logged_elapsed) * 1000 / (step - logged_step)
            logged_step, logged_elapsed = step, elapsed
            eta = (cfg.max_iters - step) * elapsed / step
            log(f"step {step}/{cfg.max_iters} ({100 * step / cfg.max_iters:.0f}%) | loss {losses[-1]:.4f} "
                f"| lr {optimizers[0].param_groups[0]['lr']:.2e} | {ms:.0f} ms/step "
                f"| {tokens_per_step * 1000 / ms:,.0f} tok/s | eta {eta / 60:.1f} min")
        if step % cfg.eval_interval == 0 or step == cfg.max_iters:
            evals = run_eval()
            history.append(dict(step=step, elapsed=elapsed, eval={str(n): r for n, r in evals.items()}))
            save_checkpoint(ckpt_path, model=model.state_dict(), optimizers=[o.state_dict() for o in optimizers],
                            config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(model.config),
                            task=task.params, step=step, history=history, losses=losses, elapsed=elapsed,
                            rng_state=torch.get_rng_state())
    final = history[-1]["eval"] if history else {}
    return summary({int(n): r for n, r in final.items()})


# -----------------------------------------------------------------------------
# Sweeps: one model per N (and seed), then a table.


def sweep(cfg, task_overrides, log=print):
    """Train one model per N in --sweep (for each seed in --seeds), same data order and learning rate;
    write results.json and results.md (and results.png if matplotlib is installed) to out_dir."""
    passes, seeds = int_list(cfg.sweep, "sweep"), int_list(cfg.seeds, "seeds") or [cfg.seed]
    task = make_task(cfg.task, preset=cfg.preset, **task_overrides)
    runs = []
    for n in passes:
        for seed in seeds:
            eval_passes = ",".join(str(x) for x in dict.fromkeys([n] + int_list(cfg.eval_sleep_passes, "eval_sleep_passes")))
            run_cfg = dataclasses.replace(cfg, sleep_passes=n, seed=seed, sweep="", seeds="", eval_sleep_passes=eval_passes,
                                          out_dir=os.path.join(cfg.out_dir, f"N{n}_seed{seed}"))
            # A run whose checkpoint is already there is resumed (a finished one is only loaded), so the
            # runs of a sweep can be spread over processes and collected by one more call of the sweep.
            done = os.path.exists(os.path.join(run_cfg.out_dir, "ckpt.pt"))
            log(f"=== sweep: N={n} seed={seed}{' (resuming from its checkpoint)' if done else ''} ===")
            result = train(dataclasses.replace(run_cfg, resume=done), task_overrides, log)
            runs.append(dict(sleep_passes=n, seed=seed, final=result["final"][n], history=result["history"],
                             elapsed=result["elapsed"], steps=len(result["losses"])))
    table = results_table(task, runs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, "results.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), task=task.params, metric=task.metric, runs=runs), f, indent=1)
    with open(os.path.join(cfg.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    plot(task, runs, os.path.join(cfg.out_dir, "results.png"), log)
    return runs


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
        log("matplotlib not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for n, (mine, mean, spread) in accuracy_over_seeds(task, runs).items():
        ax.errorbar(task.levels, mean, yerr=spread, marker="o", capsize=3,
                    label=f"N = {n} ({len(mine)} seeds, mean ± std)" if len(mine) > 1 else f"N = {n} (seed {mine[0]['seed']})")
    ax.set_xticks(list(task.levels))
    ax.set_xlabel(task.level_name)
    ax.set_ylabel(f"accuracy ({task.metric})")
    ax.set_title(f"{task.name} ({task.preset} preset)")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    log(f"wrote {path}")


def main(argv):
    try:
        cfg, task_overrides = parse_args(argv)
        # Check the whole configuration (model and task) before any work starts.
        build_model(cfg, make_task(cfg.task, preset=cfg.preset, **task_overrides))
    except ValueError as e:
        sys.exit(f"error: {e}")
    for key, value in dataclasses.asdict(cfg).items():
        print(f"{key} = {value}")
    for key, value in task_overrides.items():
        print(f"{key} = {value}  (task)")
    try:
        if cfg.sweep:
            sweep(cfg, task_overrides)
        else:
            train(cfg, task_overrides)
    except (NonFiniteLoss, ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main(sys.argv[1:])
