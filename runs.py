"""
runs.py: the plumbing that train.py, probe.py and bench.py share, so that every tool behaves the same.

train.py is the file to read; this one holds what it calls for everything around the loop, in order:

  1. output, devices and threads: lines reach a file as they are printed (line_buffered); the device
     (cuda, then mps, then cpu; --device forces one) and on the CPU one thread by default (setup_device);
     bf16 autocast on CUDA; several GPUs (DDP under torchrun) and torch.compile (for_training)
  2. the command line: --key=value settings with a did-you-mean for typos (parse_args), their checks,
     --help, the run folder's name
  3. checkpoints: save, load, the resume rules (what --resume and --eval_only may change), load_run
  4. the log lines, Ctrl-C (stop after the current step and save a checkpoint) and errors as one line
  5. sweeps: one model per N (and seed), trained one after another or side by side, then a results
     table (results.md, results.json) and a plot

It imports the model (sleep_lm.py) and the tasks (data.py), never train.py: train.py passes what this
needs from it (its settings dataclass TrainConfig, its PRESETS, its train function).
"""

import copy
import ctypes
import dataclasses
import difflib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils._pytree import tree_map

from data import TASKS, make_task
from sleep_lm import SleepCache, SleepLM, SleepLMConfig

TRAIN_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train.py")   # a sweep's side-by-side runs
RUN_CONTROL = ("out_dir", "resume", "eval_only", "sweep", "seeds", "parallel", "device", "threads", "compile",
               "compile_mode", "num_workers", "gradient_accumulation_steps", "eval_interval", "eval_examples",
               "eval_batch_size", "eval_sleep_passes", "log_interval")
MAY_CHANGE = set(RUN_CONTROL) | {"max_iters"}   # what --resume / --eval_only may give anew (max_iters: only larger)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


# -----------------------------------------------------------------------------
# 1. Output, devices and threads; several GPUs and torch.compile.


def line_buffered():
    """Print each line as it comes, also into a file or a pipe (Python buffers 8 KiB there by default)."""
    if hasattr(sys.stdout, "reconfigure"):   # a notebook's stdout has none (and buffering of its own)
        sys.stdout.reconfigure(line_buffering=True)


def pick_device(name):
    """--device: auto (cuda, then mps, then cpu), cpu, cuda or mps; a one-line ValueError for one this torch lacks."""
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


def setup_device(name, threads):
    """The device to compute on (pick_device), made ready. On the CPU: `threads` torch threads (0 = 1;
    torch's default of one per core runs 10-100x slower when other work holds a core), denormals
    flushed to zero (the exp-decay products go denormal; they made a step ~20x slower), freed memory kept."""
    device = pick_device(name)
    if device == "cpu":
        torch.set_flush_denormal(True)
        torch.set_num_threads(threads or 1)
        keep_freed_memory()              # a fast path: same numbers, ~10% less CPU time per step
    return device


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


def one_thread(worker_id):
    """A batch worker's torch threads: one (the workers run side by side). Ctrl-C is the training loop's."""
    torch.set_num_threads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def autocast(device):
    """bf16 autocast on CUDA (the recurrent state stays float32 inside the model); float32 elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=torch.device(device).type == "cuda")


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


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")   # the torch.compile modes that replay CUDA graphs


class CompiledSleepCache(SleepCache):
    """SleepCache with its one-token wake step under torch.compile ("reduce-overhead": a CUDA graph replay per
    token). Every attention context is kept at exactly L - 1 entries, padded with entries no query can see, so
    all one-token steps share one graph. Under eviction "none" (no window to fix shapes to) it is the eager cache."""

    def __init__(self, model, batch_size, *, compile_mode="default", **kwargs):
        self.compile_mode = None                     # the eager cache until the compiled step exists
        super().__init__(model, batch_size, **kwargs)
        if self.eviction != "none":                  # one graph per batch size and model: raise dynamo's limit
            self.compile_mode = compile_mode
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
            self.compiled_step = torch.compile(self.eager_step, mode=compile_mode, fullgraph=True, dynamic=False)
            self.reset()

    def start_window(self, state):
        super().start_window(replace(state, context=self.fixed_context(state.context)))

    def eager_step(self, idx, pos, state):
        logits, loop_input, h, state = SleepCache.wake_step(self, idx, pos, state)
        return logits, loop_input, h, replace(state, context=self.fixed_context(state.context))

    def wake_step(self, idx, pos, state):
        if not self.compile_mode or idx.shape[1] != 1:
            return self.eager_step(idx, pos, state)
        if self.compile_mode in CUDA_GRAPH_MODES:      # a new step: the replay overwrites its outputs,
            torch.compiler.cudagraph_mark_step_begin()   # so they are cloned
        logits, loop_input, h, state = self.compiled_step(idx, pos, state)
        logits, loop_input, h, S, context = tree_map(lambda x: x.clone() if torch.is_tensor(x) else x,
                                                     (logits, loop_input, h, state.S, state.context))
        return logits, loop_input, h, replace(state, S=S, context=context)

    def fixed_context(self, context):
        """Each attention context as its newest L - 1 entries, padded in front with zeros at position 2^40 (unseen)."""
        if not self.compile_mode:
            return context
        fixed, M = [], self.window - 1
        for block, ctx in zip(self.model.blocks, context):
            if block.kind == "A":   # torch.cat: a new contiguous tensor, so the strides never change either
                k, v, pos = ctx
                pad, keep = max(M - len(pos), 0), len(pos) - min(M, len(pos))
                ctx = (*(torch.cat([x.new_zeros(*x.shape[:2], pad, x.shape[3]), x[:, :, keep:]], 2) for x in (k, v)),
                       torch.cat([pos.new_full((pad,), 2**40), pos[keep:]]))
            fixed.append(ctx if block.kind == "A" else ctx.contiguous())
        return fixed


# -----------------------------------------------------------------------------
# 2. The command line. `config` is train.py's TrainConfig (the class), `presets` its PRESETS.


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


def preset_settings(task_name, preset, config, presets):
    """Every setting's default for this task and preset (config's defaults, then the preset's)."""
    if (task_name, preset) not in presets:
        tasks = {t: [p for t2, p in presets if t2 == t] for t, _ in presets}
        if task_name in TASKS and task_name not in tasks:   # a task data.py has, with no presets yet
            raise ValueError(f"--task={task_name} is a task of data.py, but the presets (train.py's PRESETS) have "
                             f"no entry for it: add ({task_name!r}, {preset!r}): dict(...) with its model settings "
                             f"(see docs/model.md, 'A new task')")
        listed = "; ".join(f"{t}: {', '.join(p)}" for t, p in tasks.items())
        raise ValueError(f"--task must be one of {', '.join(tasks)} and --preset one of its presets ({listed}); "
                         f"got task={task_name!r}, preset={preset!r}")
    return {**dataclasses.asdict(config()), "task": task_name, "preset": preset, **presets[task_name, preset]}


def parse_args(argv, config, presets):
    """--key=value pairs -> (a config, task overrides). Unknown keys or bad values: ValueError.

    With --resume or --eval_only the run's own settings come from its checkpoint (see restore_run)."""
    pairs = {}
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"arguments look like --key=value, got {arg!r}")
        key, _, value = arg[2:].partition("=")
        pairs[key] = value if "=" in arg else "true"
    settings = preset_settings(pairs.get("task", "rule110"), pairs.get("preset", "cpu"), config, presets)
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
    cfg = config(**settings)
    check_config(cfg)
    cfg = dataclasses.replace(cfg, sleep_passes=effective_sleep_passes(cfg, "sleep_passes" in pairs))
    if not cfg.out_dir:
        name = run_name(cfg, overrides, presets, sweep=bool(cfg.sweep))
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
    """A comma list of ints ("1,2,4" -> [1, 2, 4]), each >= 1 (seeds: >= 0 is checked elsewhere)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--{name} expects comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values) and name != "seeds":
        raise ValueError(f"--{name} values must be >= 1, got {text!r}")
    return values


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


def help_text(argv, config, presets, doc):
    """Every setting with its default (for the --task and --preset in argv) and meaning, then the
    task's parameters; the meanings are the comments in config's source, the title doc's first line."""
    pairs = dict(arg[2:].partition("=")[::2] for arg in argv if arg.startswith("--"))
    task_name, preset = pairs.get("task", "rule110"), pairs.get("preset", "cpu")
    settings = preset_settings(task_name, preset, config, presets)
    meaning = dict(re.findall(r"^    (\w+): [^=]+= .*?  # (.*)$", inspect.getsource(config), re.M))
    lines = [doc.strip().splitlines()[0], "", f"usage: python train.py [--key=value ...]   "
             f"(defaults below for --task={task_name} --preset={preset}; give those flags to see another preset's)", ""]
    lines += [f"  --{k}={v}".ljust(34) + f" {meaning.get(k, '')}" for k, v in settings.items()]
    task = make_task(task_name, preset=preset)
    lines += ["", f"parameters of task {task_name} (preset {preset}), also --key=value; "
              f"see `python data.py {task_name} --preset={preset}`:"]
    lines += [f"  --{k}={flag_text(v)}" for k, v in task.params.items()]
    return "\n".join(lines)


def settings_line(cfg, task_overrides, presets):
    """The line a run starts with: its task, preset and every setting it changes."""
    per_run = {"sleep_passes", "seed"} if cfg.sweep else set()   # a sweep sets them per run
    changed = changed_settings(cfg, task_overrides, presets, skip={"task", "preset", "out_dir", *per_run})
    flags = [f"--{k}" if v is True else f"--{k}={flag_text(v)}" for k, v in changed]
    return f"{cfg.task}, {cfg.preset} preset; changed: {' '.join(flags) or 'nothing'} (--help lists every setting)"


def changed_settings(cfg, task_overrides, presets, skip=()):
    """[(key, value)] of every setting, then every task parameter, that differs from the preset's."""
    defaults = preset_settings(cfg.task, cfg.preset, type(cfg), presets)
    task_defaults = make_task(cfg.task, preset=cfg.preset).params
    changed = [(k, v) for k, v in dataclasses.asdict(cfg).items() if k not in skip and v != defaults[k]]
    return changed + sorted((k, v) for k, v in task_overrides.items() if v != task_defaults[k])


def run_name(cfg, task_overrides, presets, sweep=False):
    """N4_seed0 (a sweep: "sweep"), then every training setting that differs from the preset's, e.g.
    N1_seed0_layers=AA_max_iters=13000: runs with different settings never share a folder."""
    changed = changed_settings(cfg, task_overrides, presets,
                               skip={"task", "preset", "sleep_passes", "seed", *RUN_CONTROL})
    text = "_".join(f"{k}={flag_text(v)}" for k, v in changed)
    head = "sweep" if sweep else f"N{cfg.sleep_passes}_seed{cfg.seed}"
    return re.sub(r"[^\w=,.+-]", "-", f"{head}_{text}" if text else head)


def flag_text(value):
    """A setting's value as --key=value writes it: (1, 2) -> "1,2"."""
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)


# -----------------------------------------------------------------------------
# 3. Checkpoints: save, load, the resume rules, a trained run in one call.


def checkpoint_to_continue(cfg, task_overrides, path):
    """--resume / --eval_only: the checkpoint at path, its settings checked against cfg's. A new run:
    None, and it refuses to overwrite a checkpoint."""
    if cfg.resume or cfg.eval_only:
        ckpt = load_checkpoint(path)
        check_against_checkpoint(cfg, task_overrides, ckpt, path)
        return ckpt
    if os.path.exists(path):
        raise ValueError(f"{path} already holds a run (step {load_checkpoint(path)['step']}): --resume continues "
                         f"it (a larger --max_iters extends it), --eval_only evaluates it; or choose another --out_dir")
    return None


def checkpoint_model(model, ckpt, resume):
    """The model the checkpoint's weights go into: model, built from the settings, if its config is the
    checkpoint's; otherwise --resume is refused and --eval_only builds the checkpoint's own model."""
    saved = saved_model_config(ckpt)
    if model.config == saved:
        return model
    if resume:
        raise ValueError(f"--resume with model settings that differ from the checkpoint's: {model.config} "
                         f"(checkpoint: {saved})")
    return SleepLM(saved)


def load_state(run, ckpt, resume, log):
    """Into run (train.py's Run): the checkpoint's weights, optimizer state (--resume only), step,
    history, losses, elapsed time and RNG state."""
    run.model.load_state_dict(ckpt["model"])
    if resume:
        for opt, state in zip(run.optimizers, ckpt["optimizers"]):
            opt.load_state_dict(state)
    run.step, run.history, run.losses, run.elapsed = (ckpt[k] for k in ("step", "history", "losses", "elapsed"))
    torch.set_rng_state(ckpt["rng_state"])
    if run.model.lm_head.weight.is_cuda and ckpt.get("cuda_rng_state") is not None:
        torch.cuda.set_rng_state(ckpt["cuda_rng_state"])
    log(f"loaded {run.path} at step {run.step}")


def summary(cfg, run, final):
    """What train.py's train returns: settings, task parameters, losses, evaluation history, final
    evaluation {N: results}, seconds of training."""
    return dict(config=dataclasses.asdict(cfg), task=run.task.params, losses=run.losses, history=run.history,
                final=final, elapsed=run.elapsed)


def save_run(run, cfg):
    """The checkpoint of run (train.py's Run): model, optimizers, settings, step, history, losses, RNG
    state; atomically."""
    save_checkpoint(run.path, model=run.model.state_dict(), optimizers=[o.state_dict() for o in run.optimizers],
                    config=dataclasses.asdict(cfg), model_config=dataclasses.asdict(run.model.config),
                    task=run.task.params, step=run.step, history=run.history, losses=run.losses,
                    elapsed=run.elapsed, rng_state=torch.get_rng_state(),
                    cuda_rng_state=torch.cuda.get_rng_state() if run.model.lm_head.weight.is_cuda else None)


def check_against_checkpoint(cfg, task_overrides, ckpt, path, given=None):
    """The one place that compares settings with a checkpoint's: training settings and task parameters
    must match (run control and a larger max_iters may differ). given: only these flags (the command line)."""
    saved = dataclasses.asdict(saved_config(ckpt, type(cfg)))
    keys = [k for k in dataclasses.asdict(cfg) if given is None or k in given]
    differ = [f"--{k}={getattr(cfg, k)} (checkpoint: {saved[k]})" for k in keys
              if k not in MAY_CHANGE and k in saved and getattr(cfg, k) != saved[k]]
    differ += [f"--{k}={v} (checkpoint: {ckpt['task'].get(k)})" for k, v in task_overrides.items()
               if ckpt["task"].get(k) != v]
    if differ:
        raise ValueError(f"{path} holds another run; these settings differ from it: {', '.join(differ)}. Only "
                         f"{', '.join(sorted(MAY_CHANGE))} may change (start a new run in another --out_dir, or "
                         f"--init_from={os.path.dirname(path)} to start from its weights)")


def restore_run(cfg, overrides, given):
    """--resume / --eval_only continue the run saved in cfg.out_dir with the checkpoint's own settings.
    Only run-control flags (RUN_CONTROL) and a larger --max_iters may change; any other flag given on
    the command line that differs from the checkpoint is refused."""
    path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = load_checkpoint(path)
    saved = saved_config(ckpt, type(cfg))
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
        near = same_run_other_length(os.path.dirname(path))
        if near:   # e.g. --resume --max_iters=200 after a run of 100 steps: max_iters is in the folder's name
            raise FileNotFoundError(f"no checkpoint at {path}; the run in {near[0]} differs only in --max_iters, "
                                    f"which is part of a run's folder name: to extend it, give --out_dir={near[0]}")
        raise FileNotFoundError(f"no checkpoint at {path}: give the flags the run was started with (they name "
                                f"its folder) or its --out_dir")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # truncated, not a checkpoint, or from an incompatible version
        raise ValueError(f"cannot read the checkpoint {path} ({type(e).__name__}: {e}); it may be truncated "
                         f"or not a train.py checkpoint") from None


def same_run_other_length(folder):
    """The run folders beside `folder` whose names differ from its only in max_iters (and hold a checkpoint)."""
    parent, name = os.path.split(os.path.normpath(folder))
    plain = lambda text: re.sub(r"_max_iters=\d+", "", text)   # noqa: E731
    found = os.listdir(parent) if parent and os.path.isdir(parent) else []
    return sorted(os.path.join(parent, d) for d in found if d != name and plain(d) == plain(name)
                  and os.path.exists(os.path.join(parent, d, "ckpt.pt")))


def saved_config(ckpt, config):
    """The config (train.py's TrainConfig) a checkpoint was written with (fields added since take their defaults)."""
    fields = {f.name for f in dataclasses.fields(config)}
    return config(**{k: v for k, v in ckpt["config"].items() if k in fields})


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
    if not os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise FileNotFoundError(f"load_run: no trained run in {os.path.abspath(out_dir)} (no ckpt.pt); train one "
                                f"first, or give the folder of its ckpt.pt (train.py prints it: 'checkpoint: ...'), "
                                f"relative to the current directory {os.getcwd()}")
    ckpt = load_checkpoint(os.path.join(out_dir, "ckpt.pt"))
    model = SleepLM(saved_model_config(ckpt))
    model.load_state_dict(ckpt["model"])
    task = make_task(ckpt["config"]["task"], preset=ckpt["config"]["preset"], **ckpt["task"])
    return model.to(device).eval(), task


# -----------------------------------------------------------------------------
# 4. The log line, Ctrl-C and errors.


def describe(task, model, device):
    """The line a run starts with: the task's T, L and vocabulary, the model's size, the device(s)."""
    world = f" x {dist.get_world_size()} processes" if dist.is_initialized() else ""
    return (f"task {task.name} ({task.preset}) T={task.seq_len} L={model.config.window} vocab={task.vocab_size} "
            f"| model {model.config.layers} d={model.config.n_embd} N={model.config.sleep_passes} "
            f"{sum(p.numel() for p in model.parameters()) / 1e6:.3f}M params | {device}{world}")


def progress_line(run, cfg, logged, first, grad_norm, later_steps, device):
    """step, loss, gradient norm, learning rate, ms/step and tokens/s since the last line (logged: its
    (step, elapsed)), peak GPU memory, eta (in a sweep also the sweep's: later_steps, see train). first:
    (step, elapsed) after this process's first step, which is logged at once; its time holds the start-up
    (and with --compile the compiling), so the eta is from the steps after it."""
    ms = (run.elapsed - logged[1]) * 1000 / (run.step - logged[0])
    if run.step == first[0] and run.step < cfg.max_iters:
        eta = f"first step{' (compiling included)' if cfg.compile else ''}: eta from the next line"
    else:
        per_step = (run.elapsed - first[1]) / (run.step - first[0]) if run.step > first[0] else ms / 1000
        left = (cfg.max_iters - run.step) * per_step
        eta = f"eta {left / 60:.1f} min" + (f" | sweep eta {(left + later_steps * per_step) / 60:.1f} min"
                                            if later_steps is not None else "")
    memory = f" | {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB peak" if device.startswith("cuda") else ""
    return (f"step {run.step}/{cfg.max_iters} ({100 * run.step / cfg.max_iters:.0f}%) | loss {run.losses[-1]:.4f} "
            f"| grad norm {grad_norm:.4g} | lr {run.optimizers[0].param_groups[0]['lr']:.2e} "
            f"| {ms:.0f} ms/step | {cfg.batch_size * run.task.seq_len * 1000 / ms:,.0f} tok/s{memory} | {eta}")


class NonFiniteLoss(RuntimeError):
    """The loss or the gradient norm is nan or inf: training stops before the update."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C after saving a checkpoint (train.main prints how to continue)."""


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
def stop_on_ctrl_c(enabled=True):
    """A StopRequest that Ctrl-C sets while inside; disabled (under torchrun, which passes the signal on
    to every process) or off the main thread, where signal handlers cannot be set, it is never set."""
    stop = StopRequest()
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def errors_as_one_line():
    """A command's end as its user wants it: a bad setting, an unreadable checkpoint or a failed run
    (ValueError, FileNotFoundError, RuntimeError) as one line "error: ..." (exit 1), not a traceback; a
    second Ctrl-C as a line that says nothing was saved; under torchrun, the process group left."""
    try:
        yield
    except KeyboardInterrupt:
        sys.exit("stopped at once (a second Ctrl-C): nothing saved since the last checkpoint")
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# -----------------------------------------------------------------------------
# 5. Sweeps: one model per N (and seed), side by side, then a table and a plot.


def sweep(cfg, task_overrides, train, log=print):
    """Train one model per N in --sweep (for each seed in --seeds) with train (train.py's), same data order
    and learning rate; write results.json and results.md (and results.png if matplotlib is installed) to out_dir.

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
    results_stem(cfg, task, run_cfgs)   # before any work: another sweep's results are never replaced
    parallel = sweep_parallel(cfg, len(run_cfgs))
    windows = window_counts(task)
    if parallel > 1:
        train_side_by_side([c for c in run_cfgs if not finished(c)], task_overrides, parallel, log, labels, windows)
    runs = []
    for i, run_cfg in enumerate(run_cfgs):
        done = os.path.exists(os.path.join(run_cfg.out_dir, "ckpt.pt"))
        label = labels[run_cfg.out_dir]
        log(f"{label} {('collecting' if finished(run_cfg) else 'resuming') if done else 'training'}: {run_cfg.out_dir}")
        later = sum(c.max_iters * step_ms(c.sleep_passes, {run_cfg.sleep_passes: 1.0}, windows)   # in its steps
                    for c in run_cfgs[i + 1:] if not finished(c))
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
    if int(os.environ.get("RANK", 0)) == 0:
        write_results(cfg, task, runs, [c.out_dir for c in run_cfgs], log, results_stem(cfg, task, run_cfgs))
    return runs


def results_stem(cfg, task, run_cfgs):
    """The name of this sweep's results files in out_dir: results (.json, .md, .png) unless a results.json
    there holds a run this sweep does not (a part of a sweep spread over processes by hand): then
    results_N<sweep>_seeds<seeds>. ValueError if that results.json is of other settings or another task."""
    path = os.path.join(cfg.out_dir, "results.json")
    if not os.path.exists(path):
        return "results"
    with open(path) as f:
        saved = json.load(f)
    mine = dataclasses.asdict(cfg)
    differ = [f"--{k}={flag_text(v)}" for k, v in saved["config"].items()
              if k in mine and mine[k] != v and k not in MAY_CHANGE]
    params = json.loads(json.dumps(task.params))   # as results.json holds them (tuples as lists)
    differ += [f"--{k}={flag_text(v)}" for k, v in saved["task"].items() if params.get(k) != v]
    if differ:
        raise ValueError(f"{path} holds the results of another sweep ({' '.join(differ)}): --out_dir=DIR "
                         f"writes this one elsewhere")
    if {(r["sleep_passes"], r["seed"]) for r in saved["runs"]} <= {(c.sleep_passes, c.seed) for c in run_cfgs}:
        return "results"                      # this sweep's table holds every run of that one
    return f"results_N{cfg.sweep.replace(',', '-')}_seeds{(cfg.seeds or str(cfg.seed)).replace(',', '-')}"


def write_results(cfg, task, runs, run_dirs, log, stem="results"):
    """results.json (settings and every run), results.md (the table, also logged) and results.png."""
    table = results_table(task, runs)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with open(os.path.join(cfg.out_dir, f"{stem}.json"), "w") as f:
        json.dump(dict(config=dataclasses.asdict(cfg), task=task.params, metric=task.metric, runs=runs), f, indent=1)
    with open(os.path.join(cfg.out_dir, f"{stem}.md"), "w") as f:
        f.write(table + "\n")
    log(table)
    plotted = plot(task, runs, os.path.join(cfg.out_dir, f"{stem}.png"), log)
    log(f"results: {os.path.join(cfg.out_dir, stem + '.md')} (the table above), {stem}.json"
        + (f", {stem}.png" if plotted else ""))
    log(f"checkpoints: {', '.join(os.path.join(d, 'ckpt.pt') for d in run_dirs)}")


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


@dataclasses.dataclass
class SideRun:
    """One run of a sweep trained in a process of its own, and how much of its train.log was shown."""
    cfg: object                   # its TrainConfig
    process: subprocess.Popen
    log: object                   # its train.log, open for the process to write
    path: str                     # that file's path
    read: int                     # bytes of it shown so far
    eta: float = None             # seconds left, from its last step line
    told: bool = False            # Ctrl-C passed on to it


def train_side_by_side(run_cfgs, task_overrides, parallel, log, labels, windows):
    """Train each run as `python train.py` with all its settings, up to `parallel` processes at once.
    Each writes its log to out_dir/train.log; its step and eval lines are shown here, labelled, with
    an estimate for the whole sweep (windows: the task's, see step_ms). Ctrl-C is passed on to the runs,
    which save a checkpoint."""
    waiting, running, ms_per_step = list(run_cfgs), [], {}
    with stop_on_ctrl_c() as stop:
        try:
            while running or (waiting and not stop.requested):   # after Ctrl-C the waiting runs never start
                while waiting and len(running) < parallel and not stop.requested:
                    running.append(start_run(waiting.pop(0), task_overrides))
                    log(f"{labels[running[-1].cfg.out_dir]} started: {running[-1].cfg.out_dir}/train.log")
                time.sleep(0.5)
                if stop.requested:
                    for run in running:
                        if not run.told:
                            run.process.send_signal(signal.SIGINT)
                            run.told = True
                for run in running:
                    relay(run, labels, log, ms_per_step,
                          lambda: sweep_eta(running, waiting, ms_per_step, parallel, windows))
                for run in [r for r in running if r.process.poll() is not None]:
                    running.remove(run)
                    run.log.close()
                    code, label = run.process.returncode, labels[run.cfg.out_dir]
                    if code == 0:
                        log(f"{label} finished")
                    elif not stop.requested:
                        raise RuntimeError(f"{label} failed (exit {code}): see {run.cfg.out_dir}/train.log")
        finally:
            for run in running:
                run.process.terminate()
    if stop.requested:
        raise Interrupted("stopped: each run of the sweep saved a checkpoint")


def start_run(run_cfg, task_overrides):
    """`python train.py` with every setting of run_cfg, in a process of its own writing out_dir/train.log."""
    run_cfg = dataclasses.replace(run_cfg, resume=os.path.exists(os.path.join(run_cfg.out_dir, "ckpt.pt")))
    argv = [f"--{k}={v}" for k, v in dataclasses.asdict(run_cfg).items()]
    argv += [f"--{k}={flag_text(v)}" for k, v in task_overrides.items()]
    os.makedirs(run_cfg.out_dir, exist_ok=True)
    path = os.path.join(run_cfg.out_dir, "train.log")
    log_file = open(path, "a")
    start = log_file.tell()
    # its own session: a Ctrl-C in the terminal reaches this process, which passes it on once
    process = subprocess.Popen([sys.executable, TRAIN_SCRIPT, *argv], stdout=log_file,
                               stderr=subprocess.STDOUT, start_new_session=True)
    return SideRun(cfg=run_cfg, process=process, log=log_file, path=path, read=start)


def relay(run, labels, log, ms_per_step, sweep_eta):
    """Show the new step and eval lines of a run's train.log; remember its ms/step and eta (not from the
    line of its first step, whose time holds the start-up)."""
    with open(run.path) as f:
        f.seek(run.read)
        text = f.read()
    complete = text[:text.rfind("\n") + 1]
    run.read += len(complete.encode())
    for line in complete.splitlines():
        step = re.match(r"step .*\| (\d+) ms/step .*\| eta ([\d.]+) min", line)
        if step:
            ms_per_step[run.cfg.sleep_passes] = int(step.group(1))
            run.eta = float(step.group(2)) * 60
            seconds, bound = sweep_eta()
            line += f" | sweep eta {'at least ' if bound else ''}{seconds / 60:.1f} min"
        if line.startswith(("step ", "eval ", "error")):
            log(f"{labels[run.cfg.out_dir]} {line}")


def window_counts(task):
    """(C, P): the task's consolidation windows (no answer in them: N passes each) and prediction windows."""
    _, targets, _ = task.eval_set(task.levels[-1], 8)
    answered = [bool((targets[:, w:w + task.window] != -1).any()) for w in range(0, task.seq_len, task.window)]
    return answered.count(False), answered.count(True)


def step_ms(n, seen, windows):
    """ms/step at N = n from the ms/step seen at other N ({N: ms}), never more than it is for a task whose
    step costs an overhead a >= 0 plus b >= 0 per window pass: N passes over each of its C consolidation
    windows and one over each of its P prediction windows (windows = (C, P)), ms = a + b (C N + P).
    Two or more N seen: the line through them (least squares; exact for such a task). One N0 seen: the
    least that such a task can take, ms0 at a larger N (all overhead), ms0 (C n + P) / (C N0 + P) at a
    smaller one (no overhead)."""
    (c, p), ns = windows, sorted(seen)
    if len(ns) == 1:
        return seen[ns[0]] * min(1.0, (c * n + p) / (c * ns[0] + p))
    mean_n, mean_ms = sum(ns) / len(ns), sum(seen.values()) / len(ns)
    slope = max(0.0, sum((k - mean_n) * (seen[k] - mean_ms) for k in ns) / sum((k - mean_n) ** 2 for k in ns))
    return max(0.0, mean_ms + slope * (n - mean_n))


def sweep_eta(running, waiting, ms_per_step, parallel, windows):
    """(seconds until the sweep is done, whether that is only a lower bound): the runs under way (their own
    eta), then the waiting ones shared among the processes, at step_ms from the N seen so far. A lower
    bound while only one N has been seen and another is still to come (see step_ms)."""
    def seconds(c):
        return c.max_iters * step_ms(c.sleep_passes, ms_per_step, windows) / 1000

    busy = [r.eta if r.eta is not None else seconds(r.cfg) for r in running]   # no line of its own yet
    queued = [seconds(c) for c in waiting]
    first_free = min(busy) if len(busy) >= parallel else 0.0
    bound = len(ms_per_step) < 2 and any(c.sleep_passes not in ms_per_step
                                         for c in [r.cfg for r in running if r.eta is None] + waiting)
    # the longest run under way, the longest waiting one after the first process frees up, all the work shared
    end = max(max(busy, default=0.0), first_free + max(queued, default=0.0), (sum(busy) + sum(queued)) / parallel)
    return end, bound


def accuracy_over_seeds(task, runs):
    """{N: (runs of that N, mean per level, std per level over seeds; zeros for a single seed)}.
    std is the sample standard deviation (n - 1 in the denominator), as scripts/fig2.py's."""
    stats = {}
    for n in sorted({r["sleep_passes"] for r in runs}):
        mine = [r for r in runs if r["sleep_passes"] == n]
        values = torch.tensor([[r["final"][lv][task.metric] for lv in task.levels] for r in mine], dtype=torch.float64)
        spread = values.std(dim=0, correction=1) if len(mine) > 1 else torch.zeros(len(task.levels))
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
    """results.png: accuracy per level, one line per N (mean and std over seeds); False without matplotlib."""
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
