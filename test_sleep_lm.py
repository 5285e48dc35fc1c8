"""Tests for sleep-lm, in the order of the files they check: sleep_lm.py, data.py, train.py (with runs.py), bench.py,
probe.py, scripts/, then the commands of README.md and docs/.

    python -m pytest -q test_sleep_lm.py                  everything (what CI runs)
    python -m pytest -q -m "not slow" test_sleep_lm.py    without the tests marked slow, for an edit loop (or QUICK=1)

Their times: docs/performance.md, "The test suite".

On a machine with CUDA the parity and training tests also run on the GPU.
"""

import collections
import contextlib
import copy
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import data
import probe
import runs
import sleep_lm
import train
from runs import CompiledSleepCache
from sleep_lm import SleepCache, SleepLM, SleepLMConfig, gated_delta_rule


# Parity tests run on every device here: exactly (float64) on the CPU; on CUDA in float32 and under
# bf16 autocast. The local rule keeps its state math in float32 under autocast, so its bf16 tolerance
# is float32's. Measured once under CPU bf16 autocast: rule differences up to 1e-5 (gradients), logits
# up to 0.06 (about 2 bf16 steps at |logit| 5); planted bugs give far more: rule math in bf16 0.03-0.06
# (rule tolerance ~1e-4), one sleep pass missing 1.7-4.3 (logit tolerance 0.15 + 0.02 |logit|).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
PRECISIONS = [(d, p) for d in DEVICES for p in (["float64"] if d == "cpu" else ["float32", "bf16"])]
DTYPE = {"float64": torch.float64, "float32": torch.float32, "bf16": torch.float32}
TOLERANCE = {  # (rtol, atol) for the local rule and for model logits
    "float64": dict(rule=(1e-10, 1e-12), model=(1e-10, 1e-12)),
    "float32": dict(rule=(1e-4, 1e-5), model=(1e-4, 1e-4)),
    "bf16": dict(rule=(1e-4, 1e-5), model=(0.02, 0.15)),
}


HERE = Path(__file__).parent
# One thread: the tensors here are small, and torch's one thread per core stalls when other work holds a core.
torch.set_num_threads(1)

# The slow tests (compiles, subprocesses, sweeps, bench) carry the mark `slow` (registered in pytest.ini):
# `-m "not slow"` (or QUICK=1) leaves them out, for the edit loop. The README's command and CI run everything.
SLOW = (pytest.mark.slow, pytest.mark.skipif(os.environ.get("QUICK") == "1", reason="slow: QUICK=1 skips it"))


def slow(test):
    for mark in SLOW:
        test = mark(test)
    return test

# The tests against a reference written again from the paper (the rule by hand, the layers, the whole model,
# Algorithm 1) carry the mark `reference`: they fail by design when you change the method on purpose. While
# experimenting, `-m "not reference"` keeps the tests that the code agrees with itself (chunkwise vs per-token
# rule, streaming vs forward, fast vs plain paths, checkpointing, gradients everywhere).
reference = pytest.mark.reference

# Subprocesses get a hang guard only, never a measure of speed: far beyond what they take on a busy machine.
HANG_GUARD = 900   # seconds


def autocast(device, precision):
    return torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16")


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    """torch.testing-style check that reports the max and mean difference."""
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((diff <= bound).all()), (
        f"{what}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, "
        f"max |expected| {expected.abs().max().item():.3e}")


def unused_on_both(actual, expected, what):
    """True where neither form gives a gradient (an input or parameter a changed method no longer reads);
    fails where only one does."""
    if actual is None or expected is None:
        assert actual is None and expected is None, f"{what}: a gradient on one path only"
        return True
    return False


def random_rule_inputs(B=2, T=37, H=3, Dk=8, Dv=6, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, Dk, generator=g, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, Dk, generator=g, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, Dv, generator=g, dtype=dtype)
    log_decay = -torch.rand(B, T, H, generator=g, dtype=dtype) * 2
    log_decay[:, ::4] = 0.0          # gates exactly 0 in log space: no decay
    beta = torch.rand(B, T, H, generator=g, dtype=dtype)
    state = torch.randn(B, H, Dk, Dv, generator=g, dtype=dtype)
    return q, k, v, log_decay, beta, state


def tiny_config(**overrides):
    config = dict(vocab_size=13, n_embd=32, n_head=2, layers="AGAG", window=8, sleep_passes=3, gdn_chunk_size=4)
    config.update(overrides)
    return SleepLMConfig(**config)


def tiny_model(seed=0, dtype=torch.float64, device="cpu", **overrides):
    """A small model with non-trivial weights (the real init zeros the output projections)."""
    torch.manual_seed(seed)
    model = SleepLM(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.3)
        model.lm_head.weight.normal_(std=0.3)
    return model.to(device)


def tokens(B, T, vocab=13, seed=1, low=0, device="cpu"):
    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: the local rule


@pytest.mark.parametrize("device, precision", PRECISIONS)
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_chunked_rule_matches_recurrent_outputs_state_and_gradients(chunk_size, device, precision):
    rtol, atol = TOLERANCE[precision]["rule"]
    # T = 37: no chunk length divides it
    inputs = [x.to(device).requires_grad_() for x in random_rule_inputs(T=37, dtype=DTYPE[precision])]
    q, k, v, log_decay, beta, state = inputs
    with autocast(device, precision):
        o_ref, s_ref = gated_delta_rule(q, k, v, log_decay, beta, state=state)
        o, s = gated_delta_rule(q, k, v, log_decay, beta, state=state, chunk_size=chunk_size)
    assert_close(o, o_ref, rtol, atol, what="outputs")
    assert_close(s, s_ref, rtol, atol, what="final state")
    g = torch.Generator().manual_seed(7)
    w_o, w_s = (torch.randn(x.shape, generator=g, dtype=x.dtype).to(device) for x in (o, s))
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), inputs, allow_unused=True)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs, allow_unused=True)
    for name, a, b in zip(["q", "k", "v", "log_decay", "beta", "state"], grads, grads_ref):
        if unused_on_both(a, b, f"grad of {name}"):
            continue
        assert_close(a, b, rtol, atol, what=f"grad of {name}")


@pytest.mark.parametrize("device, precision", PRECISIONS)
def test_chunked_rule_without_initial_state_matches_recurrent(device, precision):
    rtol, atol = TOLERANCE[precision]["rule"]
    q, k, v, log_decay, beta, _ = (x.to(device) for x in random_rule_inputs(T=16, dtype=DTYPE[precision]))
    with autocast(device, precision):
        o_ref, s_ref = gated_delta_rule(q, k, v, log_decay, beta)
        o, s = gated_delta_rule(q, k, v, log_decay, beta, chunk_size=4)
    assert_close(o, o_ref, rtol, atol, what="outputs")
    assert_close(s, s_ref, rtol, atol, what="final state")


@reference
def test_rule_two_token_example_by_hand():
    # B = H = 1, Dk = 2, Dv = 1. Token 1 writes v = 2 under key e1; token 2 decays by 1/2, then
    # rewrites the value under key e1 from 1 (= 2 / 2) towards 5 with beta = 1/2, so it becomes 3.
    q = torch.tensor([[[[1.0, 0.0]], [[1.0, 1.0]]]], dtype=torch.float64)
    k = torch.tensor([[[[1.0, 0.0]], [[1.0, 0.0]]]], dtype=torch.float64)
    v = torch.tensor([[[[2.0]], [[5.0]]]], dtype=torch.float64)
    log_decay = torch.tensor([[[0.0], [torch.log(torch.tensor(0.5)).item()]]], dtype=torch.float64)
    beta = torch.tensor([[[1.0], [0.5]]], dtype=torch.float64)
    # token 1: S = 0; error = 1 * (2 - 0) = 2; S = e1 2^T -> S[0, 0] = 2; o = S^T q = 2
    # token 2: S = 0.5 S -> 1; error = 0.5 * (5 - 1) = 2; S[0, 0] = 1 + 2 = 3; o = S^T (1, 1) = 3
    for chunk_size in (None, 2):
        o, S = gated_delta_rule(q, k, v, log_decay, beta, chunk_size=chunk_size)
        assert o.flatten().tolist() == pytest.approx([2.0, 3.0])
        assert S.flatten().tolist() == pytest.approx([3.0, 0.0])


def test_rule_keeps_float32_state_math_under_bf16_autocast():
    q, k, v, log_decay, beta, state = random_rule_inputs(T=20, dtype=torch.float32)
    for chunk_size in (None, 8):
        o_ref, s_ref = gated_delta_rule(q, k, v, log_decay, beta, state=state, chunk_size=chunk_size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            o, s = gated_delta_rule(q, k, v, log_decay, beta, state=state, chunk_size=chunk_size)
        assert_close(s, s_ref, rtol=1e-5, atol=1e-5, what=f"state under autocast, chunk_size={chunk_size}")
        assert_close(o, o_ref, rtol=1e-5, atol=1e-5, what=f"outputs under autocast, chunk_size={chunk_size}")


def test_rule_computes_in_float32_for_half_inputs():
    q, k, v, log_decay, beta, _ = random_rule_inputs(T=8, dtype=torch.float32)
    o, S = gated_delta_rule(q.bfloat16(), k.bfloat16(), v.bfloat16(), log_decay, beta, chunk_size=4)
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32


@pytest.mark.parametrize("bad", ["q_rank", "v_shape", "beta_shape", "state_shape", "chunk_size"])
def test_rule_rejects_bad_shapes(bad):
    q, k, v, log_decay, beta, state = random_rule_inputs(T=8)
    kwargs = dict(state=state, chunk_size=4)
    if bad == "q_rank":
        q = q[0]
    elif bad == "v_shape":
        v = v[:, :5]
    elif bad == "beta_shape":
        beta = beta[..., :2]
    elif bad == "state_shape":
        kwargs["state"] = state[..., :3, :]
    else:
        kwargs["chunk_size"] = 0
    name = {"q_rank": "q and k", "v_shape": "v", "beta_shape": "beta", "state_shape": "state",
            "chunk_size": "chunk_size"}[bad]
    with pytest.raises(ValueError, match=name):
        gated_delta_rule(q, k, v, log_decay, beta, **kwargs)


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: the attention layer, against an independent float64 reference


def reference_rope(x, pos, base):
    """Rotary embedding from its definition, independently of sleep_lm. x: (B, T, H, D), pos: (T,).
    Channels i and i + D/2 of a head form the complex number x_i + j x_{i+D/2} (the half-split layout
    of GPT-NeoX and Llama), which is multiplied by exp(j pos theta_i), theta_i = base^(-2i/D): a
    rotation by the angle pos theta_i. theta is rounded to float32, as the module keeps it (a
    float32 buffer, cast when the model is cast), so that a float64 comparison can be exact."""
    D = x.shape[-1]
    theta = (base ** (-2 * torch.arange(D // 2, dtype=torch.float64) / D)).float().double()
    turn = torch.polar(torch.ones(len(pos), 1, D // 2, dtype=torch.float64), pos[:, None, None].double() * theta)
    z = torch.complex(x[..., :D // 2], x[..., D // 2:]) * turn
    return torch.cat([z.real, z.imag], dim=-1)


def reference_attention(mixer, x, pos, span, base, context=None):
    """The attention layer written out from its equations, independently of sleep_lm. x: (B, T, C),
    float64, at absolute positions pos (T,); context: the (keys, values, positions) of tokens before
    x, keys NOT yet rotated, (B, Tc, H, D) each. Query t sees key s iff pos_t - span < pos_s <= pos_t.
    Returns the output and the context after x: rotated keys, values (B, H, Tc + T, D), positions."""
    B, T, C = x.shape
    H, D = mixer.n_head, mixer.head_dim
    q, k, v = (x @ mixer.qkv.weight.T).view(B, T, 3, H, D).unbind(2)
    if context is None:
        context = (x.new_zeros(B, 0, H, D), x.new_zeros(B, 0, H, D), torch.zeros(0, dtype=torch.long))
    k_ctx, v_ctx, pos_ctx = context
    keys = torch.cat([reference_rope(k_ctx, pos_ctx, base), reference_rope(k, pos, base)], dim=1)  # (B, S, H, D)
    values, key_pos = torch.cat([v_ctx, v], dim=1), torch.cat([pos_ctx, pos])
    scores = torch.einsum("bthd,bshd->bhts", reference_rope(q, pos, base), keys) / math.sqrt(D)
    visible = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - span)      # (T, S)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    y = torch.einsum("bhts,bshd->bthd", weights, values).reshape(B, T, C)
    return y @ mixer.proj.weight.T, (keys.transpose(1, 2), values.transpose(1, 2), key_pos)


@reference
@pytest.mark.parametrize("case", ["causal", "span", "far_positions", "sliding_context", "one_token"])
def test_attention_layer_matches_an_independent_reference(case):
    base = 500.0                                         # not the default: the layer must use the config's
    mixer = tiny_model(rope_base=base).blocks[0].mixer
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in mixer.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    B, C, H, D = 2, 32, mixer.n_head, mixer.head_dim
    T, start, span, n_context = dict(causal=(11, 0, 16, 0), span=(11, 0, 4, 0), far_positions=(11, 40, 16, 0),
                                     sliding_context=(11, 40, 8, 7), one_token=(1, 40, 8, 7))[case]
    x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
    pos = torch.arange(start, start + T)
    context = None
    if n_context:                                        # the newest tokens of the previous window
        k_ctx, v_ctx = (torch.randn(B, n_context, H, D, generator=g, dtype=torch.float64) for _ in range(2))
        context = (k_ctx, v_ctx, torch.arange(start - n_context, start))
    y_ref, (k_ref, v_ref, pos_ref) = reference_attention(mixer, x, pos, span, base, context)
    given = mixer.empty_context(B, "cpu", torch.float64) if context is None else (
        reference_rope(context[0], context[2], base).transpose(1, 2), context[1].transpose(1, 2), context[2])
    y, S, (k, v, key_pos) = mixer(x, pos, given, None, span)
    assert S is None
    assert_close(y, y_ref, what=f"attention output, {case}")
    assert_close(k, k_ref, what="rotated keys kept as context")
    assert torch.equal(v, v_ref) and torch.equal(key_pos, pos_ref)


def test_rope_is_a_rotation_that_makes_scores_depend_on_relative_position_only():
    from sleep_lm import rotate
    inv_freq = tiny_model().blocks[0].mixer.inv_freq
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(1, 1, 3, 16, generator=g, dtype=torch.float64) for _ in range(2))

    def score(p, r):
        return (rotate(q, torch.tensor([p]), inv_freq) * rotate(k, torch.tensor([r]), inv_freq)).sum(-1)
    for p in (0, 1, 7, 1000):
        assert_close(rotate(q, torch.tensor([p]), inv_freq).norm(dim=-1), q.norm(dim=-1), what=f"norm at {p}")
    assert torch.equal(rotate(q, torch.tensor([0]), inv_freq), q), "position 0 is no rotation"
    for p, r in ((0, 0), (5, 2), (2, 5), (9, 9)):
        for shift in (1, 13, 300):
            assert_close(score(p + shift, r + shift), score(p, r), what=f"score of ({p}, {r}) shifted by {shift}")
    assert (score(5, 2) - score(2, 2)).abs().min() > 1e-3, "the score should depend on the distance"
    assert (score(5, 2) - score(2, 5)).abs().min() > 1e-3, "and on its sign"


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: the Gated DeltaNet layer, against an independent float64 reference


def reference_gated_deltanet(mixer, x, conv_window, S):
    """The GDN layer written out step by step, independently of sleep_lm. x: (B, T, C), float64."""
    B, T, _ = x.shape
    H, D, K = mixer.n_head, mixer.head_dim, mixer.conv_size
    qkv = x @ mixer.qkv.weight.T                                          # (B, T, 3HD)
    if conv_window is None:
        conv_window = x.new_zeros(B, K - 1, 3 * H * D)
    padded = torch.cat([conv_window, qkv], dim=1)                        # causal: K - 1 rows before x
    conv = F.conv1d(padded.transpose(1, 2), mixer.conv_weight, groups=3 * H * D).transpose(1, 2)
    q, k, v = F.silu(conv).view(B, T, 3, H, D).unbind(2)
    q = q / torch.sqrt((q ** 2).sum(-1, keepdim=True) + 1e-6) / math.sqrt(D)
    k = k / torch.sqrt((k ** 2).sum(-1, keepdim=True) + 1e-6)
    beta = torch.sigmoid(x @ mixer.b_proj.weight.T)                      # (B, T, H)
    log_decay = -torch.exp(mixer.A_log) * torch.log1p(torch.exp(x @ mixer.a_proj.weight.T + mixer.dt_bias))
    S = x.new_zeros(B, H, D, D) if S is None else S
    outputs = []
    for t in range(T):
        S = torch.exp(log_decay[:, t, :, None, None]) * S
        error = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], error)
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outputs, dim=1)                                      # (B, T, H, D)
    o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + 1e-6) * mixer.o_norm.weight
    o = o * F.silu((x @ mixer.g_proj.weight.T).view(B, T, H, D))
    return o.reshape(B, T, H * D) @ mixer.proj.weight.T, S, padded[:, -(K - 1):]


@reference
@pytest.mark.parametrize("with_context", [False, True])
def test_gated_deltanet_layer_matches_an_independent_reference(with_context):
    mixer = tiny_model().blocks[1].mixer
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in mixer.parameters():                     # random everything (the init zeros proj)
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    B, C, H, D, K = 2, 32, mixer.n_head, mixer.head_dim, mixer.conv_size
    for T in (11, 1):                                    # chunkwise rule (11: no multiple of 4), one token
        x = torch.randn(B, T, C, generator=g, dtype=torch.float64)
        conv_window = torch.randn(B, K - 1, 3 * C, generator=g, dtype=torch.float64) if with_context else None
        S = torch.randn(B, H, D, D, generator=g, dtype=torch.float64) if with_context else None
        y, S_out, window = mixer(x, torch.arange(T), conv_window, S, 8)
        y_ref, S_ref, window_ref = reference_gated_deltanet(mixer, x, conv_window, S)
        assert_close(y, y_ref, what=f"output, T={T}")
        assert_close(S_out, S_ref, what=f"state, T={T}")
        assert torch.equal(window, window_ref)


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: the whole model against an independent float64 reference
#
# ReferenceSleepLM below is written again from the paper (Algorithm 1 and its eviction variants) and the
# layer equations, token by token, with plain torch float64 ops on a dict of leaf tensors named as in
# model.state_dict(): autograd gives its gradients too. It calls nothing of sleep_lm; sleep_lm is only
# the thing under test, through its public API (SleepLM, SleepLMConfig, forward, SleepCache, generate).




REFERENCE_TOLERANCE = dict(rtol=1e-9, atol=1e-11)   # float64 on both sides; the rest is rounding


def reference_weights(model):
    """The model's parameters as float64 leaf tensors that require grad, by state_dict name."""
    return {name: t.detach().clone().double().requires_grad_() for name, t in model.state_dict().items()
            if t.is_floating_point()}


class ReferenceSleepLM:
    """SleepLM from its equations, one token at a time, in float64. weights: {state_dict name: tensor}.

    Per block (pre-norm): h <- h + mixer(rms(h)), then h <- h + W2 gelu(W1 rms(h)); rms(x) = x / sqrt(mean x^2
    + 1e-6) * weight. logits = lm_head(rms(h)).
    Attention: q, k, v = split(W_qkv x) into heads; q, k rotated by RoPE at their absolute positions (channels i
    and i + D/2 turn by pos * base^(-2i/D)); query at p reads every key at p' with p - span < p' <= p,
    softmax(q.k / sqrt(D)).
    GDN: q, k, v = SiLU(depthwise causal conv over the last K rows of W_qkv x); q, k L2-normalised (eps 1e-6), q
    scaled by 1/sqrt(D); beta = sigmoid(W_b x), log_decay = -exp(A_log) softplus(W_a x + dt_bias);
    S <- exp(log_decay) S; S <- S + k (beta (v - S^T k))^T; o = S^T q; y = W_o (rms_head(o) * silu(W_g x)).
    Memory per block: the attention entries (position, rotated key, value) before the window, or the last K - 1
    pre-conv rows; plus S per GDN block.
    Windows (Algorithm 1): embed once; pass 1 runs every block and gives the logits; a consolidation window (no
    target >= 0; without targets every window but the last) gets passes 2..N of blocks start..stop-1
    (sleep_blocks) on their own previous output (plus their pass-1 input under input_injection), each from the
    memory the window started with and the S the previous pass left. Then eviction: "hard" keeps only S;
    "sliding" also the newest L - 1 attention entries and the conv rows, as the last pass that ran each block
    left them; "none" is one window and one pass with unbounded attention.
    """

    def __init__(self, weights, config):
        self.w, self.config = weights, config
        self.C, self.H = config.n_embd, config.n_head
        self.D, self.K = config.n_embd // config.n_head, config.conv_size
        # RoPE frequencies computed in float32, as the model keeps them (so float64 comparisons can be exact)
        self.theta = (config.rope_base ** (-2 * torch.arange(self.D // 2, dtype=torch.float32) / self.D)).double()

    def rms(self, x, name):
        return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w[name]

    def linear(self, x, name):
        return x @ self.w[name].T

    def rope(self, x, p):
        """x: (B, H, D) at absolute position p."""
        half = self.D // 2
        cos, sin = torch.cos(p * self.theta), torch.sin(p * self.theta)
        return torch.cat([x[..., :half] * cos - x[..., half:] * sin, x[..., :half] * sin + x[..., half:] * cos], -1)

    def attention(self, pre, x, positions, entries, span):
        B, n, C = x.shape
        q, k, v = self.linear(x, pre + "qkv.weight").view(B, n, 3, self.H, self.D).unbind(2)   # (B, n, H, D)
        entries, out = list(entries), []
        for t, p in enumerate(positions):
            entries.append((p, self.rope(k[:, t], p), v[:, t]))
            seen = [(key, value) for key_pos, key, value in entries if p - span < key_pos <= p]
            keys = torch.stack([key for key, _ in seen], dim=2)                                 # (B, H, m, D)
            values = torch.stack([value for _, value in seen], dim=2)
            scores = (keys * self.rope(q[:, t], p)[:, :, None, :]).sum(-1) / math.sqrt(self.D)  # (B, H, m)
            weights = torch.exp(scores - scores.max(-1, keepdim=True).values)
            weights = weights / weights.sum(-1, keepdim=True)
            out.append((weights[..., None] * values).sum(2).reshape(B, C))
        return self.linear(torch.stack(out, 1), pre + "proj.weight"), entries

    def gated_deltanet(self, pre, x, rows, S):
        B, n, C = x.shape
        H, D = self.H, self.D
        qkv = self.linear(x, pre + "qkv.weight")                                                 # (B, n, 3C)
        taps = self.w[pre + "conv_weight"][:, 0, :]                                              # (3C, K), oldest first
        beta = torch.sigmoid(self.linear(x, pre + "b_proj.weight"))                              # (B, n, H)
        softplus = torch.logaddexp(self.linear(x, pre + "a_proj.weight") + self.w[pre + "dt_bias"], x.new_zeros(()))
        log_decay = -torch.exp(self.w[pre + "A_log"]) * softplus
        gate = self.linear(x, pre + "g_proj.weight").view(B, n, H, D)
        gate = gate * torch.sigmoid(gate)
        rows, out = list(rows), []
        for t in range(n):
            rows.append(qkv[:, t])
            conv = (torch.stack(rows[-self.K:], dim=-1) * taps).sum(-1)                          # (B, 3C)
            q, k, v = (conv * torch.sigmoid(conv)).view(B, 3, H, D).unbind(1)                    # (B, H, D)
            q = q / torch.sqrt(q.pow(2).sum(-1, keepdim=True) + 1e-6) / math.sqrt(D)
            k = k / torch.sqrt(k.pow(2).sum(-1, keepdim=True) + 1e-6)
            S = torch.exp(log_decay[:, t])[:, :, None, None] * S                                 # (B, H, Dk, Dv)
            error = beta[:, t, :, None] * (v - (S * k[..., :, None]).sum(-2))                    # v - S^T k
            S = S + k[..., :, None] * error[..., None, :]
            o = (S * q[..., :, None]).sum(-2)                                                    # S^T q, (B, H, Dv)
            o = self.rms(o, pre + "o_norm.weight") * gate[:, t]
            out.append(o.reshape(B, C))
        return self.linear(torch.stack(out, 1), pre + "proj.weight"), S, rows[-(self.K - 1):]

    def block(self, i, h, positions, memory, S, span):
        pre = f"blocks.{i}."
        x = self.rms(h, pre + "norm1.weight")
        if self.config.layers[i] == "A":
            y, memory = self.attention(pre + "mixer.", x, positions, memory, span)
        else:
            y, S, memory = self.gated_deltanet(pre + "mixer.", x, memory, S)
        h = h + y
        u = self.linear(self.rms(h, pre + "norm2.weight"), pre + "mlp.fc.weight")
        u = 0.5 * u * (1 + torch.erf(u / math.sqrt(2)))                                         # exact GELU
        return h + self.linear(u, pre + "mlp.proj.weight"), S, memory

    def empty_memory(self, kind, B):
        return [] if kind == "A" else [self.w["wte.weight"].new_zeros(B, 3 * self.C)] * (self.K - 1)

    def evict(self, kind, memory, L, eviction):
        if eviction == "none":
            return memory
        if eviction == "hard":
            return self.empty_memory(kind, memory[0].shape[0] if kind == "G" else 0)
        return memory[max(len(memory) - (L - 1), 0):] if kind == "A" else memory

    def __call__(self, idx, targets=None, *, sleep_passes=None, window=None, eviction=None):
        """(logits (B, T, V), loss or None), as SleepLM.forward with these per-call settings."""
        cfg = self.config
        N = cfg.sleep_passes if sleep_passes is None else sleep_passes
        L = cfg.window if window is None else window
        eviction = cfg.eviction if eviction is None else eviction
        B, T = idx.shape
        n_blocks = len(cfg.layers)
        loop_start, loop_stop = cfg.sleep_blocks or (0, n_blocks)
        if eviction == "none":
            bounds, span = [(0, T)], math.inf
        else:
            bounds, span = [(s, min(s + L, T)) for s in range(0, T, L)], L
        memory = [self.empty_memory(kind, B) for kind in cfg.layers]
        S = [None if kind == "A" else self.w["wte.weight"].new_zeros(B, self.H, self.D, self.D) for kind in cfg.layers]
        logits = []
        for w, (s, e) in enumerate(bounds):
            positions = list(range(s, e))
            consolidate = w < len(bounds) - 1 if targets is None else bool((targets[:, s:e] < 0).all())
            passes = N if consolidate and eviction != "none" else 1
            h = self.w["wte.weight"][idx[:, s:e]]                                                # embedded once
            after = list(memory)                                                     # memory after it
            for i in range(n_blocks):                                                            # pass 1: wake
                if i == loop_start:
                    loop_input = h
                h, S[i], after[i] = self.block(i, h, positions, memory[i], S[i], span)
                if i == loop_stop - 1:
                    loop_output = h
            logits.append(self.rms(h, "norm_f.weight") @ self.w["lm_head.weight"].T)
            h = loop_output
            for _ in range(passes - 1):                                                          # passes 2..N: sleep
                if cfg.input_injection:
                    h = h + loop_input
                for i in range(loop_start, loop_stop):
                    h, S[i], after[i] = self.block(i, h, positions, memory[i], S[i], span)
            memory = [self.evict(kind, m, L, eviction) for kind, m in zip(cfg.layers, after)]
        logits = torch.cat(logits, dim=1)
        if targets is None:
            return logits, None
        answered = targets >= 0
        log_probs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
        return logits, -log_probs[answered].gather(-1, targets[answered][:, None]).mean()


def perturbed_model(config, seed):
    """SleepLM in float64 with every weight random and every path live: the init zeros the output projections
    (each block would start as the identity) and nearly zeros the head; decays are kept slow enough that S
    carries windows forward."""
    torch.manual_seed(seed)
    model = SleepLM(config).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if name.endswith("A_log"):
                p.copy_((0.1 + 0.9 * torch.rand(p.shape, generator=g, dtype=p.dtype)).log())
            elif name.endswith("dt_bias"):
                p.copy_(-1.5 + 0.5 * noise)
            elif "norm" in name:
                p.copy_(1 + 0.3 * noise)
            elif name == "wte.weight":
                p.copy_(noise)
            else:                                        # every matrix and the conv taps: std 1 / sqrt(fan_in)
                p.copy_(noise / math.sqrt(p.shape[-1]))
    return model


def draw_targets(rng, B, T, L, eviction, vocab):
    """Targets with a random kind per window: consolidation (all -1), every token, some tokens, the last token."""
    targets = torch.full((B, T), -1, dtype=torch.long)
    starts = list(range(0, T, T if eviction == "none" else L))
    kinds = [rng.choice(["consolidate", "consolidate", "all", "some", "last"]) for _ in starts]
    if all(kind == "consolidate" for kind in kinds):
        kinds[-1] = rng.choice(["all", "some", "last"])
    for s, kind in zip(starts, kinds):
        e = min(s + (T if eviction == "none" else L), T)
        for b in range(B):
            if kind == "all":
                chosen = range(s, e)
            elif kind == "last":
                chosen = [e - 1]
            elif kind == "some":
                chosen = rng.sample(range(s, e), rng.randint(1, e - s))
            else:
                chosen = []
            for t in chosen:
                targets[b, t] = rng.randrange(vocab)
    return targets


LAYER_PATTERNS = ["A", "G", "AG", "GA", "AGAG", "GGA", "GAG"]
EVICTION_MODES = ["hard", "sliding", "none"]
EVICTION_CYCLE = ["hard", "sliding", "hard", "sliding", "none"]


def draw_case(index):
    """A tiny random configuration, call and batch. Layer pattern and eviction cycle with the index; the rest
    (N, L with T not always a multiple, sleep_blocks, input_injection, conv_size, mlp_ratio, per-call overrides,
    targets or none) comes from a generator seeded by it."""
    rng = random.Random(index)
    layers, eviction = LAYER_PATTERNS[index % len(LAYER_PATTERNS)], EVICTION_CYCLE[index % len(EVICTION_CYCLE)]
    n_head = rng.choice([1, 2])
    n_embd = rng.choice([8, 12, 16])                     # head sizes 4 to 16
    T = rng.randint(6, 18)
    start = rng.randrange(len(layers))
    config = dict(vocab_size=rng.randint(7, 17), n_embd=n_embd, n_head=n_head, layers=layers,
                  window=rng.choice([1, 2, 3, rng.randint(2, T // 2), rng.randint(2, T // 2), T + 2]),
                  sleep_passes=rng.randint(2, 4), eviction=eviction, mlp_ratio=rng.randint(1, 3),
                  conv_size=rng.randint(2, 5), gdn_chunk_size=rng.randint(1, 8), rope_base=rng.choice([50.0, 1e4]),
                  input_injection=rng.random() < 0.5,
                  sleep_blocks=None if rng.random() < 0.4 else (start, rng.randint(start + 1, len(layers))))
    call = {}
    if rng.random() < 0.4:                               # per-call overrides of N, L and eviction
        options = dict(sleep_passes=rng.randint(1, 4), window=rng.randint(2, T - 1),
                       eviction=rng.choice(EVICTION_MODES))
        call = dict(rng.sample(sorted(options.items()), rng.randint(1, 3)))
    elif rng.random() < 0.2:
        config["sleep_passes"] = 1
    resolved = {k: call.get(k, config[k]) for k in ("window", "eviction")}
    g = torch.Generator().manual_seed(index)
    idx = torch.randint(config["vocab_size"], (2, T), generator=g)
    targets = None
    if index % 6 != 4:
        targets = draw_targets(rng, 2, T, resolved["window"], resolved["eviction"], config["vocab_size"])
    return SleepLMConfig(**config), call, idx, targets


def case_id(index):
    """The drawn case in a few words, with N, L and eviction as the call resolves them."""
    config, call, idx, targets = draw_case(index)
    N, L, eviction = (call.get(k, getattr(config, k)) for k in ("sleep_passes", "window", "eviction"))
    blocks = "" if config.sleep_blocks is None else f"-loop{config.sleep_blocks[0]}{config.sleep_blocks[1]}"
    return (f"{index}-{config.layers}-{eviction}-N{N}-L{L}-T{idx.shape[1]}{blocks}"
            f"{'-inject' if config.input_injection else ''}{'-call_' + '_'.join(sorted(call)) if call else ''}"
            f"{'-notargets' if targets is None else ''}")


def run_and_backprop(run, parameters, last_window_start):
    """Run a (logits, loss) function and backpropagate the loss or, without targets, a fixed random projection
    of the last window's logits (forward keeps a slept-on window's logits out of the graph). Returns logits,
    loss and the gradient of every parameter (zeros where none arrived)."""
    logits, loss = run()
    if loss is None:
        last = logits[:, last_window_start:]
        probe = torch.randn(last.shape, generator=torch.Generator().manual_seed(7), dtype=last.dtype)
        (last * probe).sum().backward()
    else:
        loss.backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for name, p in parameters.items()}
    return logits.detach(), None if loss is None else loss.detach(), grads


def compare_with_reference(model, idx, targets, call, check_grads=True, what=""):
    """Logits, loss and (check_grads) the gradient of every parameter: the model vs the reference."""
    L, eviction = (call.get(k, getattr(model.config, k)) for k in ("window", "eviction"))
    last_window_start = 0 if eviction == "none" else (idx.shape[1] - 1) // L * L
    weights = reference_weights(model)
    reference = ReferenceSleepLM(weights, model.config)
    model.zero_grad(set_to_none=True)
    logits, loss, grads = run_and_backprop(lambda: model(idx, targets, **call), dict(model.named_parameters()),
                                           last_window_start)
    ref_logits, ref_loss, ref_grads = run_and_backprop(lambda: reference(idx, targets, **call), weights,
                                                       last_window_start)
    assert_close(logits, ref_logits, **REFERENCE_TOLERANCE, what=f"logits{what}")
    if targets is not None:
        assert_close(loss, ref_loss, **REFERENCE_TOLERANCE, what=f"loss{what}")
    if check_grads:
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            assert_close(grads[name], ref_grads[name], **REFERENCE_TOLERANCE, what=f"gradient of {name}{what}")


MODEL_CASES = range(140, 154)   # seeds whose draws cover every feature listed in draw_case


@reference
@pytest.mark.parametrize("index", MODEL_CASES, ids=case_id)
def test_forward_logits_loss_and_every_gradient_match_the_reference(index):
    config, call, idx, targets = draw_case(index)
    compare_with_reference(perturbed_model(config, seed=index), idx, targets, call)


def fixed_case(**overrides):
    config = dict(vocab_size=11, n_embd=12, n_head=2, layers="GAG", window=5, sleep_passes=3, conv_size=3,
                  mlp_ratio=2, gdn_chunk_size=3, rope_base=100.0)
    config.update(overrides)
    return SleepLMConfig(**config)


def fixed_batch(T=14, vocab=11):
    """Windows of 5: a consolidation window, then two prediction windows (the last one partial), with gaps."""
    g = torch.Generator().manual_seed(11)
    idx = torch.randint(vocab, (2, T), generator=g)
    targets = torch.full_like(idx, -1)
    targets[:, 6:] = torch.randint(vocab, (2, T - 6), generator=g)
    targets[0, 12] = -1
    return idx, targets


@pytest.mark.parametrize("eviction, sleep_blocks, injection", [("hard", None, False), ("sliding", (1, 3), True)],
                         ids=["hard", "sliding-loop13-inject"])
@reference
def test_truncated_backprop_and_checkpointing_keep_the_reference_values(eviction, sleep_blocks, injection):
    # bptt_passes and checkpoint_windows change only what backward records, never the values. Gradients:
    # checkpointing recomputes, so it is full backprop; bptt_passes >= N (3 here) records every pass.
    idx, targets = fixed_batch()
    options = dict(eviction=eviction, sleep_blocks=sleep_blocks, input_injection=injection)
    weights = reference_weights(perturbed_model(fixed_case(**options), seed=3))
    ref_logits, ref_loss, ref_grads = run_and_backprop(
        lambda: ReferenceSleepLM(weights, fixed_case(**options))(idx, targets), weights, None)
    for settings, full_backprop in (({"bptt_passes": 1}, False), ({"bptt_passes": 3}, True),
                                    ({"checkpoint_windows": True}, True),
                                    ({"bptt_passes": 2, "checkpoint_windows": True}, False)):
        model = perturbed_model(fixed_case(**options, **settings), seed=3)
        logits, loss, grads = run_and_backprop(lambda: model(idx, targets), dict(model.named_parameters()), None)
        assert_close(logits, ref_logits, **REFERENCE_TOLERANCE, what=f"logits with {settings}")
        assert_close(loss, ref_loss, **REFERENCE_TOLERANCE, what=f"loss with {settings}")
        for name in grads if full_backprop else ():
            assert_close(grads[name], ref_grads[name], **REFERENCE_TOLERANCE, what=f"gradient of {name}, {settings}")


# Per-call settings for SleepCache and generate, each different from the config it is paired with.
STREAM_CASES = [
    ("hard", {}), ("hard", {"sleep_passes": 1}), ("hard", {"window": 7}), ("hard", {"eviction": "sliding"}),
    ("sliding", {}), ("sliding", {"sleep_passes": 4, "window": 3}), ("sliding", {"eviction": "hard"}),
    ("none", {}), ("none", {"eviction": "sliding", "window": 4, "sleep_passes": 2}), ("hard", {"eviction": "none"}),
]


def settings_id(settings):
    return "-".join(f"{k}={v}" for k, v in settings.items()) or "as_configured"


@pytest.mark.parametrize("eviction, settings", STREAM_CASES,
                         ids=[f"{eviction}-{settings_id(settings)}" for eviction, settings in STREAM_CASES])
@reference
def test_streaming_feed_in_random_pieces_matches_the_reference(eviction, settings):
    config = fixed_case(eviction=eviction, sleep_blocks=(0, 2), input_injection=True)
    model = perturbed_model(config, seed=5)
    rng = random.Random(str(settings) + eviction)
    first, idx = (torch.randint(11, (2, 17), generator=torch.Generator().manual_seed(seed)) for seed in (1, 2))
    with torch.no_grad():
        expected, _ = ReferenceSleepLM(reference_weights(model), config)(idx, **settings)
        if settings:                                     # the setting must matter, or the test checks nothing
            assert (model(idx)[0] - expected).abs().max() > 1e-6, f"{settings} should change the logits"
        cache = SleepCache(model, 2, **settings)
        cache.feed(first[:, :rng.randint(1, 9)])        # some other sequence, then reset()
        cache.reset()
        pieces, start = [], 0
        while start < idx.shape[1]:
            size = rng.randint(1, 7)
            pieces.append(cache.feed(idx[:, start:start + size]))
            start += size
    assert_close(torch.cat(pieces, dim=1), expected, **REFERENCE_TOLERANCE, what=f"streamed logits, {settings}")


def greedy(forward, prompt, steps, settings):
    """Greedy continuation by running a (logits, loss) function over the whole sequence once per new token."""
    seq = prompt
    with torch.no_grad():
        for _ in range(steps):
            logits, _ = forward(seq, **settings)
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq


@pytest.mark.parametrize("settings", [{}, {"sleep_passes": 1}, {"window": 5}, {"eviction": "sliding"},
                                      {"eviction": "none"}, {"sleep_passes": 3, "window": 4, "eviction": "sliding"}],
                         ids=settings_id)
@reference
def test_greedy_generate_matches_the_rolled_reference_at_every_per_call_setting(settings):
    config = fixed_case(eviction="hard", window=3, sleep_passes=2, layers="AG")
    model = perturbed_model(config, seed=9)
    prompt = torch.randint(11, (2, 4), generator=torch.Generator().manual_seed(4))
    expected = greedy(ReferenceSleepLM(reference_weights(model), config), prompt, 7, settings)
    if settings:                                         # the setting must matter, or the test checks nothing
        assert not torch.equal(greedy(model, prompt, 7, {}), expected), f"{settings} should change the tokens"
    assert torch.equal(model.generate(prompt, 7, temperature=0, **settings), expected)


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: the model and the sleep loop


def test_initial_weights_follow_the_init_table():
    torch.manual_seed(0)
    model = SleepLM(tiny_config(n_embd=64, n_head=2))
    K = model.config.conv_size
    for name, p in model.named_parameters():
        p = p.detach().double()
        if name.endswith("A_log"):                      # decay rates exp(A_log) in [1, 16]
            assert 1 <= p.exp().min() and p.exp().max() <= 16, name
        elif name.endswith("dt_bias"):                  # softplus(dt_bias) = dt in [1e-3, 0.1]
            dt = F.softplus(p)
            assert 1e-3 * (1 - 1e-5) <= dt.min() and dt.max() <= 0.1 * (1 + 1e-5), name   # float32 rounding
        elif name.endswith(("mixer.proj.weight", "mlp.proj.weight")):
            assert not p.any(), f"{name}: output projections start at zero"
        elif "norm" in name:
            assert (p == 1).all(), name
        elif name == "wte.weight":
            assert 0.9 < p.std() < 1.1, name
        elif name == "lm_head.weight":
            assert 0.0009 < p.std() < 0.0011, name
        elif name.endswith("conv_weight"):               # uniform with std 1 / sqrt(K)
            assert p.abs().max() <= math.sqrt(3 / K) and 0.8 < p.std() * math.sqrt(K) < 1.2, name
        else:                                            # qkv, mlp.fc, g/a/b_proj: uniform, std 1 / sqrt(fan_in)
            fan_in = p.shape[-1]
            assert p.abs().max() <= math.sqrt(3 / fan_in) and 0.8 < p.std() * math.sqrt(fan_in) < 1.2, name


def algorithm1(model, idx, targets):
    """The paper's Algorithm 1 written from its steps (hard eviction, every block sleeps, full backprop),
    from the model's blocks, embedding and head only: an independent reference for SleepLM.forward."""
    N, L = model.config.sleep_passes, model.config.window
    S = [None if block.kind == "A" else torch.zeros(idx.shape[0], block.mixer.n_head, block.mixer.head_dim,
                                                      block.mixer.head_dim, dtype=torch.float64)
         for block in model.blocks]                      # 1. S = 0
    logits, predicted = [], []
    for start in range(0, idx.shape[1], L):              # 2. windows of L tokens
        x, y = idx[:, start:start + L], targets[:, start:start + L]
        pos = torch.arange(start, start + x.shape[1])
        consolidate = bool((y < 0).all())
        h = model.wte(x)                                 # embed once
        for p in range(N if consolidate else 1):         # 3. N passes (consolidation) or one (prediction)
            for i, block in enumerate(model.blocks):     # each pass: only this window, from the previous S
                h, S[i], _ = block(h, pos, block.mixer.empty_context(x.shape[0], "cpu", h.dtype), S[i], L)
            if p == 0:
                logits.append(model.head(h))             # the wake pass is what the model predicts from
        if not consolidate:
            predicted.append((logits[-1], y))
        # 4. evict: nothing but S goes on
    loss = torch.nn.functional.cross_entropy(torch.cat([z for z, _ in predicted], 1).flatten(0, 1),
                                             torch.cat([y for _, y in predicted], 1).flatten(), ignore_index=-1)
    return torch.cat(logits, dim=1), loss


@reference
def test_forward_is_algorithm1_written_from_the_paper():
    # Logits, loss and gradients over two consolidation windows, a prediction window with a gap in its
    # answers, and a partial window.
    model = tiny_model(sleep_passes=3, layers="AGAG")
    x = tokens(3, 30)
    y = torch.full_like(x, -1)
    y[:, 16:24] = tokens(3, 8, seed=2)
    y[:, 18] = -1
    y[:, 28:] = tokens(3, 2, seed=3)
    results = []
    for run in (lambda x, y: algorithm1(model, x, y), model):
        model.zero_grad()
        logits, loss = run(x, y)
        loss.backward()
        results.append((logits.detach(), loss.detach(), [p.grad.clone() for p in model.parameters()]))
    (logits, loss, grads), (expected_logits, expected_loss, expected_grads) = results
    assert_close(logits, expected_logits, what="logits")
    assert_close(loss, expected_loss, what="loss")
    for g, expected in zip(grads, expected_grads):
        assert_close(g, expected, what="gradients")


@pytest.mark.parametrize("device, precision", PRECISIONS)
def test_sleep_passes_one_is_the_plain_hybrid_whatever_the_config_says(device, precision):
    x = tokens(2, 29, device=device)
    with autocast(device, precision):
        plain, _ = tiny_model(sleep_passes=1, dtype=DTYPE[precision], device=device)(x)
        overridden, _ = tiny_model(sleep_passes=4, dtype=DTYPE[precision], device=device)(x, sleep_passes=1)
    assert_close(overridden, plain, *TOLERANCE[precision]["model"], what="config N=4 called with N=1 vs config N=1")


@pytest.mark.parametrize("device, precision", PRECISIONS)
def test_one_pass_with_sliding_eviction_is_the_plain_sliding_window_hybrid(device, precision):
    # N = 1 under sliding eviction: no sleep, so the windows must add up to one ordinary pass of a
    # sliding-window-attention + GDN hybrid over the whole sequence.
    model = tiny_model(dtype=DTYPE[precision], device=device)
    x = tokens(2, 29, device=device)
    with autocast(device, precision):
        logits, _ = model(x, sleep_passes=1, eviction="sliding")
        state = model.initial_state(2, model.config.window, "sliding")   # attention sees the last L positions
        h, _, _, _ = model.wake_pass(model.wte(x), torch.arange(29, device=device), state)   # every block once
        plain = model.head(h)
    assert_close(logits, plain, *TOLERANCE[precision]["model"], what="windowed N=1 vs one plain pass")


def test_hard_eviction_hides_evicted_windows_from_attention_only_models():
    x = tokens(2, 24)
    changed = x.clone()
    changed[:, :8] = tokens(2, 8, seed=5)               # rewrite the whole first window
    attention_only = tiny_model(layers="AA")
    a, _ = attention_only(x)
    b, _ = attention_only(changed)
    assert_close(a[:, 8:], b[:, 8:], what="AA model after the first window")
    hybrid = tiny_model(layers="AG")
    a, _ = hybrid(x)
    b, _ = hybrid(changed)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-6, "the GDN state S should carry the first window"


def test_a_single_prediction_window_gives_the_same_loss_for_every_N():
    model = tiny_model()
    x = tokens(2, 8)                       # exactly one window, with answer tokens: one pass always
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]
    losses = [model(x, y, sleep_passes=n)[1] for n in (1, 2, 5)]
    for loss in losses[1:]:
        assert_close(loss, losses[0], what="loss at N > 1 vs N = 1")


def test_a_window_whose_only_answer_is_its_last_token_predicts_and_is_never_slept_on():
    model = tiny_model(sleep_passes=3)
    x = tokens(2, 16)
    y = torch.full_like(x, -1)
    y[:, [7, 15]] = x[:, [7, 15]]                        # one answer each, on the last token of both windows
    logits, loss = model(x, y, sleep_passes=1)
    by_hand = F.cross_entropy(logits[:, [7, 15]].reshape(-1, 13), y[:, [7, 15]].reshape(-1))
    assert_close(loss, by_hand, what="loss over both answers")
    assert_close(model(x, y, sleep_passes=3)[1], loss, what="no window sleeps: every N gives the N = 1 loss")


def test_a_freshly_initialised_model_is_blind_to_sleep_so_checks_randomise_its_output_projections():
    # docs/porting.md, "Checking a port": init_weights zeroes every block's output projection, so each block
    # starts as the identity and N changes nothing; a port compared with a fresh SleepLM would pass broken.
    torch.manual_seed(0)
    fresh = SleepLM(tiny_config()).double()
    x = tokens(2, 29)
    assert torch.equal(fresh(x, sleep_passes=1)[0], fresh(x, sleep_passes=3)[0])
    randomised = tiny_model()                            # the same config, output projections drawn at random
    assert (randomised(x, sleep_passes=1)[0] - randomised(x, sleep_passes=3)[0]).abs().max() > 1e-3


def test_sleep_changes_the_loss_and_gradients_reach_the_first_window():
    model = tiny_model()
    x = torch.cat([tokens(2, 8, vocab=6), tokens(2, 16, seed=2, vocab=13, low=6)], dim=1)  # ids < 6 only in window 1
    y = torch.full_like(x, -1)
    y[:, -4:] = x[:, -4:]
    loss_1 = model(x, y, sleep_passes=1)[1]
    loss_3 = model(x, y, sleep_passes=3)[1]
    assert (loss_1 - loss_3).abs() > 1e-8, "N = 3 should change the loss when there are consolidation windows"
    loss_3.backward()
    first_window_rows = model.wte.weight.grad[:6]
    assert first_window_rows.abs().sum() > 0, "no gradient reached the embeddings of the first window"


def test_every_parameter_gets_a_gradient_in_a_training_step():
    model = tiny_model(sleep_passes=2)
    x = tokens(2, 24)                                    # two consolidation windows, one prediction window
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]
    model(x, y)[1].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"no gradient for {missing}"


def test_truncated_backprop_keeps_the_loss_and_checkpointing_keeps_loss_and_gradients():
    x = tokens(2, 24)
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]

    def loss_and_grads(**overrides):
        model = tiny_model(**overrides)
        loss = model(x, y)[1]
        loss.backward()
        return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    full_loss, full_grads = loss_and_grads()
    truncated_loss, truncated_grads = loss_and_grads(bptt_passes=1)
    assert_close(truncated_loss, full_loss, what="truncated loss")
    assert any((truncated_grads[n] - g).abs().max() > 1e-8 for n, g in full_grads.items()), \
        "truncation should change some gradient"
    ckpt_loss, ckpt_grads = loss_and_grads(checkpoint_windows=True)
    assert_close(ckpt_loss, full_loss, what="checkpointed loss")
    assert ckpt_grads.keys() == full_grads.keys()
    for name, g in full_grads.items():
        assert_close(ckpt_grads[name], g, what=f"checkpointed grad of {name}")


@pytest.mark.parametrize("bptt_passes", [1, 3])
def test_truncated_backprop_is_straight_through_to_the_first_windows_embeddings(bptt_passes):
    # Windows 1 and 2 are consolidated (4 passes, the first 4 - K untracked), window 3 predicts.
    x = torch.cat([tokens(2, 8, vocab=6), tokens(2, 16, seed=2, vocab=13, low=6)], dim=1)  # ids < 6 only in window 1
    y = torch.full_like(x, -1)
    y[:, -4:] = x[:, -4:]
    full_loss = tiny_model(sleep_passes=4)(x, y)[1]
    model = tiny_model(sleep_passes=4, bptt_passes=bptt_passes)
    loss = model(x, y)[1]
    assert_close(loss, full_loss, what="truncated vs full backprop loss")
    loss.backward()
    assert model.wte.weight.grad[:6].abs().sum() > 0, "no gradient reached the embeddings of the first window"


@pytest.mark.parametrize("bptt_passes", [1, 2, 3, 5])
def test_truncated_backprop_records_the_last_k_passes_of_a_consolidation_window(bptt_passes):
    model = tiny_model(sleep_passes=4, bptt_passes=bptt_passes, layers="AG")
    x = tokens(2, 16)                                    # a consolidation window, then a prediction window
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]
    recorded = []
    model.blocks[0].register_forward_hook(lambda *_: recorded.append(torch.is_grad_enabled()))
    model(x, y)
    untracked = max(4 - bptt_passes, 0)
    assert recorded == [False] * untracked + [True] * (4 - untracked) + [True], "grad mode of each pass"


def test_default_sleep_blocks_is_the_whole_stack_and_one_pass_ignores_the_slice_bitwise():
    x = tokens(2, 24)
    for N in (1, 3):
        whole = tiny_model(sleep_passes=N)(x)[0]
        assert torch.equal(tiny_model(sleep_passes=N, sleep_blocks=[0, 4])(x)[0], whole)
    assert torch.equal(tiny_model(sleep_passes=1, sleep_blocks=(1, 3))(x)[0], tiny_model(sleep_passes=1)(x)[0])
    assert tiny_config(sleep_blocks=[1, 3]).sleep_blocks == (1, 3)


@reference
def test_sleep_passes_rerun_only_the_sliced_blocks_on_their_own_output():
    # AGAG looping blocks 1..2: per consolidation window blocks 0 and 3 run once (block 3, a GDN block,
    # writes its S once), blocks 1 and 2 run N times, each sleep pass on block 2's output plus the
    # injected block-1 input of pass 1.
    model = tiny_model(sleep_passes=3, sleep_blocks=(1, 3), input_injection=True)
    x = tokens(2, 16)                                    # a consolidation window, then a prediction window
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]
    calls = [0] * 4
    hooks = [b.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, b in enumerate(model.blocks)]
    logits, loss = model(x, y)
    for hook in hooks:
        hook.remove()
    assert calls == [2, 4, 4, 2], "block calls in (consolidation + prediction) windows"
    blocks, pos, span = model.blocks, torch.arange(8), 8
    state = model.initial_state(2, span, "hard")
    context, S = state.context, list(state.S)
    h, S[0], _ = blocks[0](model.wte(x[:, :8]), pos, context[0], S[0], span)
    loop_input = h
    for n in range(3):
        if n > 0:
            h = h + loop_input
        for i in (1, 2):
            h, S[i], _ = blocks[i](h, pos, context[i], S[i], span)
        if n == 0:
            _, S[3], _ = blocks[3](h, pos, context[3], S[3], span)
    h = model.wte(x[:, 8:])
    for i, block in enumerate(blocks):
        h, S[i], _ = block(h, torch.arange(8, 16), context[i], S[i], span)
    assert_close(logits[:, 8:], model.head(h), what="prediction window after a sliced sleep, by hand")
    whole_stack = tiny_model(sleep_passes=3, input_injection=True)(x, y)[1]
    assert (loss - whole_stack).abs() > 1e-8, "looping a slice should change the loss"


def test_input_injection_changes_sleep_but_not_the_wake_pass():
    x = tokens(2, 24)
    plain, injected = tiny_model(), tiny_model(input_injection=True)
    a, b = plain(x)[0], injected(x)[0]
    assert_close(b[:, :8], a[:, :8], what="first window (wake pass, same weights)")
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-6, "injection should change what sleep writes into S"


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_fast_paths_match_the_plain_forms(eviction, monkeypatch):
    # sleep_lm.FAST_PATHS picks the GDN conv (K shifted multiply-adds or F.conv1d) and the chunkwise rule's
    # triangular solve (transposed or plain): logits, loss and gradients must agree either way. Windows of 11
    # over chunks of 4: padded chunks; three windows: S and (sliding) conv windows carried over.
    x = tokens(2, 30)
    y = torch.full_like(x, -1)
    y[:, 24:] = x[:, 24:]
    results = []
    for fast in (True, False):
        monkeypatch.setattr(sleep_lm, "FAST_PATHS", fast)
        model = tiny_model(window=11, eviction=eviction)
        logits, loss = model(x, y)
        loss.backward()
        results.append((logits.detach(), loss.detach(), [p.grad for p in model.parameters()]))
    (logits, loss, grads), (plain_logits, plain_loss, plain_grads) = results
    assert_close(logits, plain_logits, what="logits")
    assert_close(loss, plain_loss, what="loss")
    for (name, _), g, expected in zip(model.named_parameters(), grads, plain_grads):
        if unused_on_both(g, expected, f"gradient of {name}"):
            continue
        assert_close(g, expected, what=f"gradient of {name}")


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: streaming and generation


@pytest.mark.parametrize("device, precision", PRECISIONS)
@pytest.mark.parametrize("eviction, injection, layers, sleep_blocks", [
    ("hard", False, "AGAG", None), ("sliding", False, "AGAG", None), ("none", False, "AGAG", None),
    ("hard", True, "AGAG", None),
    # slices that leave a GDN block outside the loop: before it, after it, and with injection
    ("hard", False, "GAGA", (2, 4)), ("sliding", False, "AGAG", (1, 2)), ("sliding", True, "GAGA", (1, 3)),
])
def test_streaming_logits_equal_forward_across_sleep_boundaries(eviction, injection, layers, sleep_blocks, device,
                                                                  precision):
    tolerance = TOLERANCE[precision]["model"]
    model = tiny_model(sleep_passes=3, input_injection=injection, layers=layers, sleep_blocks=sleep_blocks,
                       dtype=DTYPE[precision], device=device)
    x = tokens(2, 29, device=device)                     # windows of 8: three sleeps and a partial window
    with torch.no_grad(), autocast(device, precision):
        expected, _ = model(x, eviction=eviction)
        token_by_token = SleepCache(model, 2, eviction=eviction)
        streamed = torch.cat([token_by_token.feed(x[:, t:t + 1]) for t in range(29)], dim=1)
        assert_close(streamed, expected, *tolerance, what="token-by-token vs forward")
        prefill_then_decode = SleepCache(model, 2, eviction=eviction)
        streamed = torch.cat([prefill_then_decode.feed(x[:, :13])] +
                             [prefill_then_decode.feed(x[:, t:t + 1]) for t in range(13, 29)], dim=1)
        assert_close(streamed, expected, *tolerance, what="prefill + decode vs forward")
        for t in (7, 8, 20):                             # forward on a prefix sees no future
            prefix, _ = model(x[:, :t + 1], eviction=eviction)
            assert_close(prefix[:, -1], expected[:, t], *tolerance, what=f"prefix of {t + 1} tokens")


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_a_change_to_the_loop_over_passes_reaches_forward_and_streaming_alike(eviction, monkeypatch):
    # SleepLM.sleep is the one loop over sleep passes: forward (training, evaluation) and SleepCache both run
    # it, so a variant written there (here: each pass starts from half its input) changes both the same way.
    model = tiny_model(sleep_passes=3, layers="AG")
    x = tokens(2, 29)                                    # windows of 8

    def halving_sleep(self, h, loop_input, pos, state, passes):
        for _ in range(passes):
            h, state = self.sleep_pass(h / 2, loop_input, pos, state)
        return h, state

    with torch.no_grad():
        before, _ = model(x, eviction=eviction)
        monkeypatch.setattr(SleepLM, "sleep", halving_sleep)
        after, _ = model(x, eviction=eviction)
        cache = SleepCache(model, 2, eviction=eviction)
        streamed = torch.cat([cache.feed(x[:, t:t + 1]) for t in range(29)], dim=1)
    assert (after[:, 8:] - before[:, 8:]).abs().max() > 1e-3   # the variant changes what later windows see
    assert_close(after[:, :8], before[:, :8], what="the first window (before any sleep)")
    assert_close(streamed, after, *TOLERANCE["float64"]["model"], what="streaming vs forward under the variant")


@pytest.mark.parametrize("eviction, sleep_blocks", [("hard", None), ("sliding", None), ("sliding", (1, 2))])
def test_cache_holds_exactly_the_current_window_and_the_kept_context(eviction, sleep_blocks):
    L = 8
    model = tiny_model(sleep_passes=2, eviction=eviction, window=L, sleep_blocks=sleep_blocks)
    cache = SleepCache(model, 1)
    for n in range(1, 3 * L + 4):                        # n tokens read so far
        cache.feed(tokens(1, 1, seed=n))
        in_window = n % L                                # 0: a full window was just slept on and evicted
        kept = min(L - 1, n - in_window) if eviction == "sliding" else 0   # what the last eviction kept
        for ctx, block in zip(cache.state.context, model.blocks):
            if block.kind == "A":
                assert ctx[0].shape[2] == ctx[1].shape[2] == kept + in_window, f"attention entries after {n} tokens"
                assert ctx[2].tolist() == list(range(n - kept - in_window, n)), "the newest positions are kept"
            else:
                assert ctx.shape[1] == 3, "the conv window: conv_size - 1 rows"
                if eviction == "hard" and in_window == 0:
                    assert not ctx.any(), "hard eviction zeroes the conv window"
        assert sum(f.shape[1] for f in cache.features) == sum(e.shape[1] for e in cache.loop_inputs) == in_window


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_generate_at_temperature_zero_is_greedy(eviction):
    model = tiny_model(sleep_passes=2, eviction=eviction)
    prompt = tokens(2, 5)
    expected = prompt
    with torch.no_grad():
        for _ in range(12):                              # crosses two window boundaries
            next_id = model(expected)[0][:, -1].argmax(dim=-1, keepdim=True)
            expected = torch.cat([expected, next_id], dim=1)
    assert torch.equal(model.generate(prompt, 12, temperature=0), expected)
    assert torch.equal(model.generate(prompt, 12, top_k=1), expected)   # one candidate left: greedy too


def test_generate_with_top_k_samples_among_each_rows_k_most_likely_tokens_and_only_those():
    model = tiny_model(sleep_passes=2)
    for batch in (1, 4):                                 # each row has its own K most likely tokens
        prompt = tokens(batch, 5, seed=6)
        torch.manual_seed(0)
        out = model.generate(prompt, 30, temperature=3.0, top_k=3)    # crosses four window boundaries
        with torch.no_grad():
            logits = model(out[:, :-1])[0][:, 4:]        # what each new token was drawn from (forward = streaming)
        sampled = logits.gather(-1, out[:, 5:, None])
        rank = (logits > sampled).sum(-1)                # 0: the most likely token
        assert (rank < 3).all(), f"batch {batch}: a token outside the top 3 was sampled (ranks {rank.tolist()})"
        assert set(rank.flatten().tolist()) == {0, 1, 2}, f"batch {batch}: not sampling among all 3"


@slow
def test_generate_long_random_stream_stays_finite():
    torch.manual_seed(0)
    model = SleepLM(tiny_config(window=64, sleep_passes=2, gdn_chunk_size=32))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(std=1.0)                       # large random weights: a stress test
    prompt = tokens(1, 20_000, seed=3)
    cache = SleepCache(model, 1)
    logits = cache.feed(prompt)
    assert torch.isfinite(logits).all()
    assert all(torch.isfinite(s).all() for s in cache.state.S if s is not None)
    out = model.generate(prompt[:, :100], max_new_tokens=20, top_k=5)   # multinomial fails on NaN
    assert out.shape == (1, 120) and out.min() >= 0 and out.max() < 13


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: input checks


@pytest.mark.parametrize("field, value", [
    ("window", 0), ("sleep_passes", 0), ("eviction", "soft"), ("layers", "AXG"), ("layers", ""),
    ("n_embd", 30), ("vocab_size", 0), ("bptt_passes", 0), ("sleep_passes", 1.5),
    ("sleep_blocks", (2, 2)), ("sleep_blocks", (0, 5)), ("sleep_blocks", (-1, 2)), ("sleep_blocks", 3),
    ("sleep_blocks", (0, 1, 2)), ("sleep_blocks", (0.0, 2)),
])
def test_invalid_config_raises_value_error_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        tiny_config(**{field: value})


def test_invalid_calls_raise_value_error_naming_the_argument():
    model = tiny_model()
    x = tokens(2, 10)
    with pytest.raises(ValueError, match="idx"):
        model(x[0])                                       # wrong rank
    with pytest.raises(ValueError, match="idx"):
        model(x.float())                                  # wrong dtype
    with pytest.raises(ValueError, match="idx"):
        model(x + 13)                                     # outside the vocabulary
    with pytest.raises(ValueError, match="targets"):
        model(x, x[:, :5])
    with pytest.raises(ValueError, match="targets"):
        model(x, torch.full_like(x, -1))                  # nothing to predict
    ragged = torch.full_like(x, -1)
    ragged[0, 2] = 1                                      # an answer in window 1 of row 0 only
    ragged[:, -1] = 1
    with pytest.raises(ValueError, match="line up"):
        model(x, ragged)
    with pytest.raises(ValueError, match="sleep_passes"):
        model(x, sleep_passes=0)
    with pytest.raises(ValueError, match="window"):
        model(x, window=-2)
    with pytest.raises(ValueError, match="eviction"):
        model.generate(x, 2, eviction="partial")
    with pytest.raises(ValueError, match="temperature"):
        model.generate(x, 2, temperature=-0.5)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(x, 2, top_k=0)


# ----------------------------------------------------------------------------------------------------
# sleep_lm.py: the fast paths (compiled), against eager


@slow
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_compiled_one_token_wake_has_static_shapes_and_matches_the_eager_cache(eviction):
    # CompiledSleepCache keeps every attention context at L - 1 entries, so that all one-token
    # wake steps share one graph: a backend that counts its compiles sees exactly one over three windows
    # (prefill, sleeps and evictions in between), and the logits equal the eager cache's.
    model = tiny_model(sleep_passes=2, eviction=eviction)
    compiles = []

    def counting_backend(graph_module, example_inputs):
        compiles.append(graph_module)
        return graph_module.forward
    fast = CompiledSleepCache(model, 2, compile_mode="default")
    fast.compiled_step = torch.compile(fast.eager_step, backend=counting_backend, fullgraph=True, dynamic=False)
    x = tokens(2, 29)                                    # windows of 8: three sleeps and a partial window
    with torch.no_grad():
        eager = SleepCache(model, 2)
        expected = torch.cat([eager.feed(x[:, t:t + 1]) for t in range(29)], dim=1)
        streamed = torch.cat([fast.feed(x[:, :5])] + [fast.feed(x[:, t:t + 1]) for t in range(5, 29)], dim=1)
    assert_close(streamed, expected, what="static-shape compiled wake vs the eager cache")
    assert len(compiles) == 1, f"{len(compiles)} graphs: the one-token step changed shape"
    for ctx, block in zip(fast.state.context, model.blocks):
        if block.kind == "A":
            assert ctx[0].shape[2] == model.config.window - 1


@slow
def test_compiled_model_matches_eager_loss_and_gradients(monkeypatch):
    # aot_eager_decomp_partition: dynamo + AOT autograd, run eagerly, no C++ compiler. Plain aot_eager
    # fails in backward on this model with torch 2.13 (eager softplus_backward returns other strides
    # than the traced graph assumes, "view size is not compatible"); inductor compiles it.
    # train.py --compile compiles each window (process_window) with fullgraph=True, and forward's window
    # loop must compile as one graph too: fullgraph fails on any graph break, which would cost a device
    # sync per window on CUDA and split its CUDA graphs. Only forward's eager input checks
    # (plan_windows) stay outside; here they run once, up front. The loop's graph runs on dynamo's
    # "eager" backend: a graph break fails there just as well, in half the time of the test.
    model = tiny_model(dtype=torch.float32, layers="AG", gdn_chunk_size=8)
    compiled = runs.compiled_for_training(model, backend="aot_eager_decomp_partition")
    assert "process_window" not in vars(model), "the model itself stays eager (evaluation uses it)"
    x = tokens(2, 16)                                    # a consolidation window, then a prediction window
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]
    plan = model.plan_windows(x, y, model.config.window)
    assert plan == (True, False)
    loop = copy.copy(model)                              # the same parameters, its input checks done above
    monkeypatch.setattr(loop, "plan_windows", lambda *args: plan)
    loop = torch.compile(loop, backend="eager", fullgraph=True)
    # N = 2 with full backprop (gradients through both passes) and truncated to the last pass (an untracked
    # pass, then a tracked one); N = 1 runs the same loop with one tracked pass (each graph costs seconds).
    for N, bptt_passes in ((2, None), (2, 1)):
        model.config.bptt_passes = bptt_passes
        results = []
        for forward in (model, compiled, loop):
            model.zero_grad()
            loss = forward(x, y, sleep_passes=N)[1]
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        (eager_loss, eager_grads), *others = results
        for kind, (compiled_loss, compiled_grads) in zip(("train.py --compile", "fullgraph window loop"), others):
            what = f"{kind}, N={N}, bptt_passes={bptt_passes}"
            assert_close(compiled_loss, eager_loss, 1e-6, 1e-6, what=f"loss, {what}")
            for (name, _), a, b in zip(model.named_parameters(), compiled_grads, eager_grads):
                assert_close(a, b, 1e-4, 1e-6, what=f"grad of {name}, {what}")


@slow
@torch._dynamo.config.patch(recompile_limit=2)
def test_compiled_training_survives_more_kinds_of_window_than_torchs_default_recompile_limit():
    # Each (window kind, N, grad mode) is a graph of its own; under fullgraph=True, passing torch's
    # recompile limit (default 8) raises instead of falling back (--train_sleep_passes=1,2,4,8 --compile
    # did). Here the limit starts at 2, to need fewer graphs; compiled_for_training must raise it.
    # (torch's own config.patch: pytest >= 9.2's monkeypatch deletes the setting on undo, which hides it.)
    model = tiny_model(dtype=torch.float32, layers="G")
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward
    fast = runs.compiled_for_training(model, backend=counting_backend)
    x = tokens(2, 16)                                    # a consolidation window, then a prediction window
    y = torch.full_like(x, -1)
    y[:, -3:] = x[:, -3:]
    with torch.no_grad():
        for N in range(1, 5):
            assert_close(fast(x, y, sleep_passes=N)[1], model(x, y, sleep_passes=N)[1], 1e-6, 1e-6, what=f"N={N}")
    assert len(graphs) > 2


@slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="inductor's GPU kernels and CUDA graphs need CUDA")
@pytest.mark.parametrize("mode, precision", [("default", "bf16"), ("reduce-overhead", "float32")])
def test_inductor_compiled_training_matches_eager_on_cuda(mode, precision):
    # train.py --compile --compile_mode=MODE on the GPU: real inductor kernels (and, for reduce-overhead,
    # CUDA graphs: the first call warms up, the second records, the third replays on new inputs, where
    # stale inputs would show).
    model = tiny_model(dtype=torch.float32, device="cuda", layers="AG", window=8)
    compiled = runs.compiled_for_training(model, mode)
    rtol, atol = TOLERANCE[precision]["model"]
    for batch in range(3):
        x = tokens(4, 24, seed=batch).cuda()                 # two consolidation windows, then a prediction window
        y = torch.full_like(x, -1)
        y[:, -3:] = x[:, -3:]
        results = []
        for forward in (model, compiled):
            model.zero_grad()
            if forward is compiled and mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()
            with autocast("cuda", precision):
                logits, loss = forward(x, y, sleep_passes=3)
            loss.backward()
            results.append((logits.detach().clone(), loss.detach().clone(),
                            [p.grad.clone() for p in model.parameters()]))
        (logits, loss, grads), (c_logits, c_loss, c_grads) = results
        what = f"mode={mode}, {precision}, batch {batch}"
        assert_close(c_logits, logits, rtol, atol, what=f"logits, {what}")
        assert_close(c_loss, loss, rtol, atol, what=f"loss, {what}")
        if precision == "float32":
            for (name, _), a, b in zip(model.named_parameters(), c_grads, grads):
                assert_close(a, b, 1e-3, 1e-5, what=f"grad of {name}, {what}")


# ----------------------------------------------------------------------------------------------------
# data.py: every answer re-derived from the decoded text by an independent solver


PAD = "<pad>"


def rows_of(task, idx):
    """Decoded examples as token lists."""
    return [task.decode(row).split() for row in idx]


# independent solvers, working from decoded text
RULE_110_TABLE = {"111": "0", "110": "1", "101": "1", "100": "0", "011": "1", "010": "1", "001": "1", "000": "0"}


def rule110_after(state, steps):
    """state: string of '0'/'1'; periodic boundary; returns the state after `steps` updates."""
    width = len(state)
    for _ in range(steps):
        state = "".join(RULE_110_TABLE[state[i - 1] + state[i] + state[(i + 1) % width]] for i in range(width))
    return state


def parse_depo_names(tokens):
    """Split a token run into names: an uppercase token starts a two-token name."""
    names, i = [], 0
    while i < len(tokens):
        size = 2 if tokens[i][0].isupper() else 1
        names.append(tuple(tokens[i:i + size]))
        i += size
    return names


def solve_depo(task, tokens):
    """From one decoded Depo example: (successor map, [(hop, start, answer, position of '=')])."""
    graph_len = task.params["graph_len"]
    graph = [t for t in tokens[:graph_len] if t != PAD]
    pieces, current = [], []
    for token in graph:  # edges "x -> y" back to back: split at the arrows
        if token == "->":
            pieces.append(current)
            current = []
        else:
            current.append(token)
    pieces.append(current)
    successor = {}
    sources = parse_depo_names(pieces[0])
    for piece in pieces[1:]:
        names = parse_depo_names(piece)
        successor[sources[-1]] = names[0]
        sources = names[1:]
    queries, i = [], graph_len
    while i < len(tokens) and tokens[i] != PAD:
        hop = int(tokens[i][3:])
        equals = tokens.index("=", i)
        start = tuple(tokens[i + 1:equals])
        end = equals + 1
        while end < len(tokens) and not tokens[end].startswith("hop") and tokens[end] != PAD:
            end += 1
        queries.append((hop, start, tuple(tokens[equals + 1:end]), equals))
        i = end
    return successor, queries


def parse_math(task, tokens):
    """From one decoded math problem: (asked quantity, {quantity: statement}, answer, answer marker
    position). A statement is ('const', c) | ('sum', a, b) | ('diff', a, b) | ('more', a, c)."""
    symbolic = task.params["rendering"] == "symbolic"
    name_len = 1 if symbolic else 6
    assert tokens[:2] == ["what", "is"]
    asked = tuple(tokens[2:2 + name_len])
    assert tokens[2 + name_len] == "?"
    marker = tokens.index("answer")
    body = tokens[3 + name_len:marker]
    statements = {}
    while body:
        end = body.index(".")
        s, body = body[:end], body[end + 1:]
        x, rest = tuple(s[:name_len]), s[name_len:]
        assert x not in statements, "a quantity is defined twice"
        if symbolic:
            assert rest[0] == "="
            if len(rest) == 2:
                statements[x] = ("const", int(rest[1]))
            elif rest[2] == "-":
                statements[x] = ("diff", (rest[1],), (rest[3],))
            elif rest[3].startswith("V"):
                statements[x] = ("sum", (rest[1],), (rest[3],))
            else:
                statements[x] = ("more", (rest[1],), int(rest[3]))
        elif rest[0] == "is" and len(rest) == 2:
            statements[x] = ("const", int(rest[1]))
        elif rest[0] == "is":
            assert rest[2:4] == ["more", "than"]
            statements[x] = ("more", tuple(rest[4:10]), int(rest[1]))
        else:
            assert rest[:2] == ["equals", "the"] and rest[3] == "of" and rest[10] == "and"
            statements[x] = ({"sum": "sum", "difference": "diff"}[rest[2]], tuple(rest[4:10]), tuple(rest[11:17]))
    assert tokens[marker + 2:] == [PAD] * len(tokens[marker + 2:])
    return asked, statements, int(tokens[marker + 1]), marker


def evaluate_math(statements, quantity, used):
    """Value of quantity; adds every quantity it depends on (itself included) to `used`."""
    used.add(quantity)
    kind, first, second = (statements[quantity] + (None,))[:3]
    if kind == "const":
        return first
    x = evaluate_math(statements, first, used)
    if kind == "more":
        return x + second
    y = evaluate_math(statements, second, used)
    return x + y if kind == "sum" else x - y


@pytest.mark.parametrize("preset,overrides", [
    ("cpu", {}), ("gpu", {}), ("paper", {}), ("cpu", dict(states=3, width=11, t_min=0, t_max=12, levels=(0, 5, 12)))])
def test_rule110_answers_match_an_independent_simulation(preset, overrides):
    task = data.make_task("rule110", preset, **overrides)
    states, width = task.params["states"], task.params["width"]
    idx, targets, difficulty = task.train_batch(300, step=3)
    for tokens, target_row, t in zip(rows_of(task, idx), targets, difficulty.tolist()):
        answers = task.decode(target_row[states * width:]).split()
        for i in range(states):
            assert tokens[states * width + i] == f"?{i + 1}@t{t}"
            state = "".join(tokens[i * width:(i + 1) * width])
            assert answers[i] == rule110_after(state, t)[0]


@pytest.mark.parametrize("preset", sorted(data.Depo.presets))
def test_depo_answers_match_walking_the_decoded_cycle(preset):
    task = data.make_task("depo", preset)
    p = task.params
    training = task.train_batch(200, step=1)
    evaluation = task.eval_set(task.levels[-1], 20)
    for (idx, targets, difficulty), is_eval in ((training, False), (evaluation, True)):
        for tokens, target_row, level in zip(rows_of(task, idx), targets, difficulty.tolist()):
            successor, queries = solve_depo(task, tokens)
            nodes = len(successor)
            assert p["min_nodes"] <= nodes <= p["max_nodes"] and (nodes == p["max_nodes"] or not is_eval)
            node, seen = next(iter(successor)), set()
            while node not in seen:  # one cycle through every node
                seen.add(node)
                node = successor[node]
            assert len(seen) == nodes and len(set(successor.values())) == nodes
            assert len(queries) == p["queries"]
            for hop, start, answer, equals in queries:
                node = start
                for _ in range(hop):
                    node = successor[node]
                assert answer == node
                assert task.decode(target_row[equals:equals + len(answer)]).split() == list(answer)
            hops = [hop for hop, *_ in queries]
            assert level == max(hops) and (not is_eval or set(hops) == {level})
            # no query repeats, even modulo the cycle: its answer would already be in the window
            assert len({(hop % nodes, start) for hop, start, *_ in queries}) == len(queries)


def test_depo_small_graphs_still_get_distinct_queries():
    task = data.make_task("depo", "cpu", min_nodes=3, max_nodes=4, queries=4, query_len=16)
    for tokens in rows_of(task, task.train_batch(100, step=0, levels=[1])[0]):
        successor, queries = solve_depo(task, tokens)
        assert len(successor) == 4 and len({(h % 4, s) for h, s, *_ in queries}) == 4
    with pytest.raises(ValueError, match="queries"):
        data.make_task("depo", "cpu", queries=9)


REALISTIC_CPU = data.Math.REALISTIC_CPU   # the cpu preset's sizes for realistic statements


@pytest.mark.parametrize("rendering", ["symbolic", "realistic"])
def test_math_answers_match_evaluating_the_decoded_statements(rendering):
    for preset, batch in (("cpu", 300), ("paper", 6)):
        sizes = REALISTIC_CPU if (rendering, preset) == ("realistic", "cpu") else {}
        task = data.make_task("math", preset, rendering=rendering, **sizes)
        idx, targets, difficulty = task.train_batch(batch, step=2)
        with_distractors = 0
        for tokens, target_row, op in zip(rows_of(task, idx), targets, difficulty.tolist()):
            asked, statements, answer, marker = parse_math(task, tokens)
            used = set()
            assert evaluate_math(statements, asked, used) == answer
            assert sum(statements[q][0] != "const" for q in used) == op  # operations on the solution path
            with_distractors += len(used) < len(statements)
            values = {q: evaluate_math(statements, q, set()) for q in statements}
            assert all(0 <= v < task.params["values"] for v in values.values())
            assert task.decode(target_row[marker:marker + 1]) == str(answer)
        assert with_distractors >= 0.8 * batch


# ----------------------------------------------------------------------------------------------------
# data.py: the distributions each task promises


@slow
@pytest.mark.parametrize("preset, examples", [("cpu", 10_000), ("paper", 4000)])
def test_depo_training_graph_sizes_follow_the_weights_one_over_n_plus_sqrt_max_nodes(preset, examples):
    task = data.make_task("depo", preset)
    p = task.params
    n = np.arange(p["min_nodes"], p["max_nodes"] + 1)
    # only graphs with room for `queries` distinct (hop mod n, start) pairs (the paper preset's n = 3 has 9)
    expected = (n * np.minimum(n, p["max_hops"]) >= p["queries"]) / (n + math.sqrt(p["max_nodes"]))
    expected /= expected.sum()
    idx = task.train_batch(examples, step=0)[0]
    nodes = (idx == task.encode("->")[0]).sum(dim=1).numpy()   # one arrow per edge, one edge per node
    assert n[0] <= nodes.min() and nodes.max() <= n[-1]
    observed = np.bincount(nodes - n[0], minlength=len(n)) / examples
    # Kolmogorov-Smirnov: the cumulative distributions differ by less than the 0.1% critical value
    gap = np.abs(np.cumsum(observed) - np.cumsum(expected)).max()
    assert gap < 1.95 / math.sqrt(examples), f"graph sizes: CDF gap {gap:.4f}, observed {observed[:6].round(3)}..."


def test_math_distractors_come_in_every_kind_and_a_quarter_are_constants():
    # Each distractor draws its kind uniformly from const, sum, diff, more; an operation that would leave
    # 0..values-1 becomes a difference, so only the constants keep exactly their quarter.
    task = data.make_task("math", "cpu")
    kinds = []
    for tokens in rows_of(task, task.train_batch(400, step=4)[0]):
        asked, statements, _, _ = parse_math(task, tokens)
        used = set()
        evaluate_math(statements, asked, used)
        kinds += [statements[q][0] for q in statements if q not in used]
    share = {kind: kinds.count(kind) / len(kinds) for kind in ("const", "sum", "diff", "more")}
    assert len(kinds) > 1000 and abs(share["const"] - 0.25) < 4 * math.sqrt(0.25 * 0.75 / len(kinds)), share
    assert min(share.values()) > 0.1, share


# ----------------------------------------------------------------------------------------------------
# data.py: layouts


# The generic tests of data.py run over every task in data.TASKS, so a new task is checked as it is added.
TASK_NAMES = list(data.TASKS)
TASK_PRESETS = [(name, preset) for name, cls in data.TASKS.items() for preset in cls.presets]


@pytest.mark.parametrize("name, preset", TASK_PRESETS)
def test_targets_are_minus_one_outside_answer_positions(name, preset):
    task = data.make_task(name, preset)
    idx, targets, _ = task.train_batch(8 if name == "math" and preset == "paper" else 64, step=0)
    assert idx.shape == targets.shape == (len(idx), task.seq_len) and idx.dtype == targets.dtype == torch.long
    for tokens, row, target_row in zip(rows_of(task, idx), idx, targets):
        if name == "rule110":
            k = task.params["states"]
            expected = set(range(task.seq_len - k, task.seq_len))
        elif name == "depo":
            _, queries = solve_depo(task, tokens)
            expected = {equals + j for _, _, answer, equals in queries for j in range(len(answer))}
            assert all(target_row[p] == row[p + 1] for p in expected)  # teacher forcing
        elif name == "math":
            marker = tokens.index("answer")
            expected = {marker}
            assert target_row[marker] == row[marker + 1]
        else:
            pytest.fail(f"add the answer positions of task {name} to this test")
        assert set(torch.nonzero(target_row != -1).flatten().tolist()) == expected


@pytest.mark.parametrize("name, preset", TASK_PRESETS)
def test_all_answers_lie_in_one_prediction_chunk_after_the_first_window(name, preset):
    task = data.make_task(name, preset)
    _, targets, _ = task.train_batch(8 if name == "math" and preset == "paper" else 64, step=5)
    rows, positions = torch.nonzero(targets != -1, as_tuple=True)
    chunk = positions // task.window
    for row in range(len(targets)):
        assert len(set(chunk[rows == row].tolist())) == 1
    assert chunk.min() >= 1


def test_rule110_paper_layout_each_state_is_one_window_and_no_state_token_is_predicted():
    task = data.make_task("rule110", "paper")
    assert (task.seq_len, task.window, task.params["states"]) == (100, 24, 4)
    idx, targets, difficulty = task.train_batch(64, step=0)
    assert (difficulty == 32).all()
    cell_ids = torch.tensor(task.encode("0 1"))
    assert torch.isin(idx[:, :96], cell_ids).all()
    assert not torch.isin(idx[:, 96:], cell_ids).any()
    assert (targets[:, :96] == -1).all() and torch.isin(targets[:, 96:], cell_ids).all()
    assert len(set(idx[:, 96:].flatten().tolist())) == 4  # four distinct query tokens


def test_depo_paper_layout_graph_fills_whole_windows_without_targets_and_queries_follow():
    task = data.make_task("depo", "paper")
    assert (task.seq_len, task.window, task.params["graph_len"]) == (360, 75, 300)
    idx, targets, _ = task.train_batch(64, step=0)
    evaluation = task.eval_set(16, 8)
    for idx, targets in ((idx, targets), evaluation[:2]):
        assert (targets[:, :300] == -1).all()
        for tokens in rows_of(task, idx):
            assert not any(t.startswith("hop") or t == "=" for t in tokens[:300])
            assert tokens[300].startswith("hop") and "->" not in tokens[300:]
            assert tokens[299] != PAD  # the graph ends right at the window boundary


def test_math_paper_layout_question_first_answer_after_the_first_window():
    for rendering in ("symbolic", "realistic"):
        task = data.make_task("math", "paper", rendering=rendering)
        idx, targets, _ = task.train_batch(6, step=0)
        assert task.seq_len == 3300 and task.window == 2000
        assert (targets[:, :2000] == -1).all()
        for tokens in rows_of(task, idx):
            length = len(tokens) - tokens.count(PAD)
            assert 2000 <= length <= 3300 and tokens[:2] == ["what", "is"]
            assert 2000 <= tokens.index("answer") == length - 2


# ----------------------------------------------------------------------------------------------------
# data.py: determinism and the train / eval split


@pytest.mark.parametrize("name", TASK_NAMES)
def test_train_batch_is_a_pure_function_of_seed_and_step(name):
    task = data.make_task(name)
    first, again = task.train_batch(32, step=7, seed=1), data.make_task(name).train_batch(32, step=7, seed=1)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], task.train_batch(32, step=8, seed=1)[0])
    assert not torch.equal(first[0], task.train_batch(32, step=7, seed=2)[0])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_eval_set_is_fixed_and_a_prefix_of_longer_eval_sets(name):
    task = data.make_task(name)
    level = task.levels[-1]
    short, long = task.eval_set(level, 7), task.eval_set(level, 40)
    assert all(torch.equal(s, l[:7]) for s, l in zip(short, long))
    assert all(torch.equal(a, b) for a, b in zip(long, data.make_task(name).eval_set(level, 40)))
    assert (long[2] == level).all()
    assert not torch.equal(long[0], task.eval_set(level, 40, seed=1)[0])


def test_each_evaluation_level_draws_its_own_inputs():
    task = data.make_task("rule110", "gpu")             # 4 states of 24 cells: no input repeats by chance
    states = [{tuple(row) for row in task.eval_set(level, 128)[0][:, :96].tolist()} for level in (2, 4)]
    assert len(states[0]) == len(states[1]) == 128 and states[0].isdisjoint(states[1])


@slow
@pytest.mark.parametrize("name,overrides", [
    ("rule110", dict(width=8, t_min=1, t_max=1, levels=(1,))),  # 256 possible inputs
    ("depo", dict(max_nodes=3, name_tokens=4, max_hops=1, levels=(1,), queries=1, graph_len=24, query_len=4)),
    ("math", {}),
])
def test_eval_and_train_streams_never_share_an_input(name, overrides):
    task = data.make_task(name, **overrides)
    train = {tuple(row) for step in range(20) for row in task.train_batch(100, step)[0].tolist()}
    evaluation = {tuple(row) for level in task.levels for row in task.eval_set(level, 50)[0].tolist()}
    assert train.isdisjoint(evaluation)
    if name != "math":  # tiny input spaces: without the split, the streams would collide
        assert len(train) < 2000 and len(evaluation) < 50 * len(task.levels)


@slow
@pytest.mark.parametrize("name", TASK_NAMES)
def test_the_evaluation_split_holds_one_input_in_sixteen(name):
    task = data.make_task(name)
    idx, _, _ = task._generate(np.random.default_rng(7), 3200, task.train_levels, evaluation=False)
    fraction = task.in_eval_split(idx).mean()
    assert abs(fraction - 1 / data.EVAL_BUCKETS) < 0.02, f"{fraction:.3f} of fresh inputs fall in the evaluation split"


def test_train_batch_levels_restrict_the_difficulty():
    for name, levels in (("rule110", [3]), ("depo", [2, 4]), ("math", [2])):
        task = data.make_task(name, **({"max_hops": 4} if name == "depo" else {}))
        idx, targets, difficulty = task.train_batch(64, step=0, levels=levels)
        assert set(difficulty.tolist()) <= set(levels)
    task = data.make_task("depo", max_hops=4)
    for tokens in rows_of(task, task.train_batch(64, step=0, levels=[2, 4])[0]):
        assert {int(t[3:]) for t in tokens if t.startswith("hop")} <= {2, 4}


# ----------------------------------------------------------------------------------------------------
# data.py: the structural promises of each generator, on many samples

@pytest.mark.parametrize("preset, overrides", [
    ("cpu", {}), ("gpu", {}), ("paper", {}), ("cpu", dict(states=3, width=11, t_min=0, t_max=12, levels=(0, 5, 12)))])
def test_rule110_every_example_is_k_states_in_their_windows_then_one_query_per_state(preset, overrides):
    task = data.make_task("rule110", preset, **overrides)
    K, W, p = task.params["states"], task.params["width"], task.params
    assert (task.window, task.seq_len, task.items_per_example) == (W, K * W + K, K)
    batches = [(task.train_batch(48, step, seed), None) for seed, step in ((0, 0), (3, 9))]
    batches += [(task.eval_set(level, 8, seed), level) for seed in (0, 2) for level in task.levels]
    train_t = set()
    for (idx, targets, difficulty), level in batches:
        for tokens, target_row, t in zip(rows_of(task, idx), targets.tolist(), difficulty.tolist()):
            if level is None:
                assert p["t_min"] <= t <= p["t_max"]
                train_t.add(t)
            else:
                assert t == level
            assert set(tokens[:K * W]) <= {"0", "1"}
            assert tokens[K * W:] == [f"?{i + 1}@t{t}" for i in range(K)]
            assert target_row[:K * W] == [-1] * (K * W)                   # no target before the queries
            answers = [rule110_after("".join(tokens[i * W:(i + 1) * W]), t)[0] for i in range(K)]
            assert [task.vocab[a] for a in target_row[K * W:]] == answers
    assert train_t == set(range(p["t_min"], p["t_max"] + 1))          # training draws every t of its range


# ----------------------------------------------------------------------------------------------------
# data.py, Depo: one cycle listed edge by edge, queries walked on it


def depo_name(tokens, i):
    """The name starting at tokens[i]: one lowercase token, or an uppercase token and any letter token."""
    if tokens[i].isupper():
        assert re.fullmatch(r"[a-zA-Z]+", tokens[i + 1]), tokens[i:i + 2]
        return tuple(tokens[i:i + 2]), i + 2
    assert re.fullmatch(r"[a-z]+", tokens[i]), tokens[i]
    return (tokens[i],), i + 1


def depo_edges(task, tokens):
    """(left padding, [(source, target)] as listed) of the graph section; asserts its grammar:
    <pad>* then edges "x -> y" back to back to the end of the section."""
    graph = tokens[:task.params["graph_len"]]
    padding = next(i for i, token in enumerate(graph) if token != PAD)
    body, edges, i = graph[padding:], [], 0
    assert PAD not in body
    while i < len(body):
        source, i = depo_name(body, i)
        assert body[i] == "->", body[i:]
        target, i = depo_name(body, i + 1)
        edges.append((source, target))
    return padding, edges


def depo_queries(task, tokens):
    """[(hop, start, answer, position of "=")] of the query section; asserts its grammar:
    "hopK start = answer" back to back, then <pad> to the end."""
    queries, i = [], task.params["graph_len"]
    while i < len(tokens) and tokens[i] != PAD:
        assert re.fullmatch(r"hop[1-9]\d*", tokens[i]), tokens[i]
        hop = int(tokens[i][3:])
        start, equals = depo_name(tokens, i + 1)
        assert tokens[equals] == "="
        answer, i = depo_name(tokens, equals + 1)
        queries.append((hop, start, answer, equals))
    assert tokens[i:] == [PAD] * (len(tokens) - i)
    return queries


@pytest.mark.parametrize("preset, train_examples, eval_examples", [
    ("cpu", 64, 16), ("gpu", 32, 6), ("paper", 12, 3)])
def test_depo_context_lists_one_cycle_and_each_answer_is_the_kth_successor_along_it(preset, train_examples,
                                                                                   eval_examples):
    task = data.make_task("depo", preset)
    p = task.params
    assert task.seq_len == p["graph_len"] + p["query_len"] and p["graph_len"] % task.window == 0
    batches = [(task.train_batch(train_examples, step, seed), None) for seed, step in ((0, 0), (4, 11))]
    batches += [(task.eval_set(level, eval_examples, seed), level) for seed in (0, 1) for level in task.levels]
    train_hops, sizes, chained, train_graphs = set(), set(), 0, 0
    for (idx, targets, difficulty), level in batches:
        for tokens, row, target_row, k in zip(rows_of(task, idx), idx.tolist(), targets.tolist(), difficulty.tolist()):
            padding, edges = depo_edges(task, tokens)
            n = len(edges)
            sources, ends = [s for s, _ in edges], [e for _, e in edges]
            # n edges over n distinct nodes, every node once a source and once a target: a permutation...
            assert len(set(sources)) == n and set(ends) == set(sources)
            successor = dict(edges)
            node, cycle = sources[0], []
            for _ in range(n):
                cycle.append(node)
                node = successor[node]
            # ...that is ONE cycle through all n nodes
            assert node == sources[0] and len(set(cycle)) == n
            assert p["min_nodes"] <= n <= p["max_nodes"] and (level is None or n == p["max_nodes"])
            assert padding + 3 * n + sum(len(s) - 1 for s in sources) * 2 == p["graph_len"]
            queries = depo_queries(task, tokens)
            assert len(queries) == p["queries"]
            expected_targets = [-1] * task.seq_len
            for hop, start, answer, equals in queries:
                walked = start
                for _ in range(hop):
                    walked = successor[walked]
                assert answer == walked
                answer_ids = task.encode(list(answer))
                expected_targets[equals:equals + len(answer)] = answer_ids
                assert row[equals + 1:equals + 1 + len(answer)] == answer_ids    # teacher-forced
            assert target_row == expected_targets            # the loss mask covers exactly the answer tokens
            hops = [hop for hop, *_ in queries]
            assert k == max(hops) and all(1 <= hop <= p["max_hops"] for hop in hops)
            assert len({(hop % n, start) for hop, start, *_ in queries}) == len(queries)
            if level is None:
                train_hops.update(hops)
                sizes.add(n)
                chained += sum(edges[i][1] == edges[i + 1][0] for i in range(n - 1))
                train_graphs += 1
            else:
                assert set(hops) == {level} and len({start for _, start, *_ in queries}) == len(queries)
    assert train_hops == set(range(1, p["max_hops"] + 1))              # training asks every hop of its range
    assert len(sizes) >= min(4, p["max_nodes"] - p["min_nodes"] + 1)     # and graphs of many sizes
    # the edges are listed shuffled: in a random order, on average one listed edge leads on to the next one
    # (n - 1 neighbours, each with chance 1 / (n - 1)); listed along the cycle, n - 1 >= 2 of them would
    assert chained < 1.5 * train_graphs, (chained, train_graphs)


# ----------------------------------------------------------------------------------------------------
# data.py, math: the question's answer follows from exactly op operations, distractors feed nothing


def operands(statement):
    """The quantities a statement reads."""
    return [x for x in statement[1:] if isinstance(x, tuple)]


def depth(statements, quantity):
    """Operations on the longest chain of statements that the quantity's value is computed through."""
    reads = operands(statements[quantity])
    return 0 if statements[quantity][0] == "const" else 1 + max(depth(statements, q) for q in reads)


@pytest.mark.parametrize("rendering, preset, train_examples, eval_examples", [
    ("symbolic", "cpu", 96, 24), ("realistic", "cpu", 32, 8),
    pytest.param("symbolic", "paper", 1, 1, marks=SLOW), pytest.param("realistic", "paper", 1, 1, marks=SLOW)])
def test_math_answer_follows_from_exactly_op_chained_operations_and_distractors_feed_nothing(
        rendering, preset, train_examples, eval_examples):
    sizes = REALISTIC_CPU if (rendering, preset) == ("realistic", "cpu") else {}
    task = data.make_task("math", preset, rendering=rendering, **sizes)
    p = task.params
    batches = [(task.train_batch(train_examples, step, seed), None) for seed, step in ((0, 0), (5, 3))]
    seeds = (0, 1) if preset == "cpu" else (0,)            # a paper-size evaluation block is 64 problems
    batches += [(task.eval_set(level, eval_examples, seed), level) for seed in seeds for level in task.levels]
    distractor_operations = 0
    for (idx, targets, difficulty), level in batches:
        for tokens, row, target_row, op in zip(rows_of(task, idx), idx.tolist(), targets.tolist(), difficulty.tolist()):
            assert (op == level) if level is not None else (p["op_min"] <= op <= p["op_max"])
            length = len(tokens) - tokens.count(PAD)
            assert tokens[length:] == [PAD] * (task.seq_len - length)           # right-padded
            assert p["min_tokens"] <= length <= p["max_tokens"] == task.seq_len
            asked, statements, answer, marker = parse_math(task, tokens)       # each quantity defined once
            assert marker == length - 2 and marker >= task.window                # answer after the first window
            for quantity, statement in statements.items():
                reads = operands(statement)
                assert all(q in statements for q in reads), (quantity, statement)
                if statement[0] in ("sum", "diff"):
                    assert reads[0] != reads[1], f"{quantity} reads {reads[0]} twice"
                if rendering == "symbolic":
                    assert int(quantity[0][1:]) < p["quantities"]
            used = set()
            assert evaluate_math(statements, asked, used) == answer
            # exactly op operations feed the asked quantity, one after another (each needs the previous)
            assert sum(statements[q][0] != "const" for q in used) == op == depth(statements, asked)
            values = {q: evaluate_math(statements, q, set()) for q in statements}
            assert all(0 <= v < p["values"] for v in values.values())
            distractor_operations += sum(statements[q][0] in ("sum", "diff") for q in statements if q not in used)
            assert target_row == [-1] * marker + [row[marker + 1]] + [-1] * (task.seq_len - marker - 1)
            assert tokens[marker + 1] == str(answer)
    assert distractor_operations >= (len(batches) if preset == "cpu" else 1)  # the operand check had work to do


# ----------------------------------------------------------------------------------------------------
# data.py: train_batch is a pure function, eval sets are fixed and hold only evaluation-split inputs

TASKS = [(name, {}) for name in TASK_NAMES]
TINY_TASKS = [("rule110", dict(width=8)),                  # input spaces where the streams would collide
              ("depo", dict(max_nodes=4, name_tokens=5, max_hops=2, queries=2, query_len=8))]


def in_eval_split(task, row):
    """The documented rule: blake2b (8 bytes, little-endian) of the decoded input text, modulo EVAL_BUCKETS, is 0."""
    digest = hashlib.blake2b(task.decode(row).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % data.EVAL_BUCKETS == 0


@pytest.mark.parametrize("name, overrides", TASKS)
def test_train_batch_depends_on_seed_and_step_only_not_on_global_rngs_or_earlier_calls(name, overrides):
    task = data.make_task(name, **overrides)
    first = task.train_batch(24, step=5, seed=2)
    first_eval = task.eval_set(task.levels[-1], 8, seed=1)
    saved = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        random.seed(1)
        np.random.seed(1)
        torch.manual_seed(1)
        for step in range(3):
            task.train_batch(7, step=step, seed=step)
            task.eval_set(task.levels[0], 5, seed=step)
        again = data.make_task(name, **overrides)
        second = task.train_batch(24, step=5, seed=2), again.train_batch(24, step=5, seed=2)
        second_eval = task.eval_set(task.levels[-1], 8, seed=1), again.eval_set(task.levels[-1], 8, seed=1)
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    for batch in second:
        assert all(torch.equal(a, b) for a, b in zip(first, batch))
    for batch in second_eval:
        assert all(torch.equal(a, b) for a, b in zip(first_eval, batch))


@pytest.mark.parametrize("name, overrides", TASKS + TINY_TASKS)
def test_eval_sets_hold_only_evaluation_split_inputs_and_training_batches_none(name, overrides):
    task = data.make_task(name, **overrides)
    train_rows = [row for seed, step in ((0, 0), (1, 6)) for row in task.train_batch(40, step, seed)[0].tolist()]
    eval_rows = [row for seed in (0, 1) for level in task.levels for row in task.eval_set(level, 12, seed)[0].tolist()]
    assert not any(in_eval_split(task, row) for row in train_rows)
    assert all(in_eval_split(task, row) for row in eval_rows)
    assert {tuple(row) for row in train_rows}.isdisjoint(tuple(row) for row in eval_rows)


# ----------------------------------------------------------------------------------------------------
# data.py: vocabulary, validation, scoring, the command line


@pytest.mark.parametrize("name", TASK_NAMES)
def test_encode_inverts_decode(name):
    task = data.make_task(name, rendering="realistic", **REALISTIC_CPU) if name == "math" else data.make_task(name)
    idx = task.train_batch(4, step=0)[0]
    for row in idx:
        assert task.encode(task.decode(row)) == row.tolist()
    assert len(task.vocab) == task.vocab_size == len(set(task.vocab)) and idx.max() < task.vocab_size


@pytest.mark.parametrize("name,preset,overrides,parameter", [
    ("sudoku", "cpu", {}, "name"),
    ("rule110", "tpu", {}, "preset"), ("math", "gpu", {}, "preset"),
    ("rule110", "cpu", dict(colour=1), "colour"),
    ("rule110", "cpu", dict(width=2), "width"),
    ("rule110", "cpu", dict(width=16.5), "width"),
    ("rule110", "cpu", dict(t_min=-1), "t_min"),
    ("rule110", "cpu", dict(t_max=0), "t_max"),
    ("rule110", "cpu", dict(levels=(-2,)), "levels"),
    ("rule110", "cpu", dict(levels=()), "levels"),
    ("rule110", "cpu", dict(states=17), "states"),
    ("depo", "cpu", dict(max_hops=9), "max_hops"),
    ("depo", "cpu", dict(levels=(1, 9)), "levels"),
    ("depo", "cpu", dict(graph_len=36), "graph_len"),
    ("depo", "cpu", dict(graph_len=12), "graph_len"),
    ("depo", "paper", dict(prefix_tokens=20), "graph_len"),
    ("depo", "cpu", dict(name_tokens=4), "name_tokens"),
    ("depo", "cpu", dict(query_len=30), "query_len"),
    ("depo", "cpu", dict(queries=7), "query_len"),
    ("depo", "cpu", dict(min_nodes=2), "min_nodes"),
    ("math", "cpu", dict(rendering="latex"), "rendering"),
    ("math", "cpu", dict(op_min=0), "op_min"),
    ("math", "cpu", dict(window=120), "min_tokens"),
    ("math", "cpu", dict(max_tokens=38), "max_tokens"),
    ("math", "cpu", dict(rendering="realistic"), "max_tokens"),
    ("math", "cpu", dict(quantities=10), "quantities"),
    ("math", "paper", dict(rendering="realistic", quantities=1000), "quantities"),
    ("math", "cpu", dict(levels=(30,)), "max_tokens"),
])
def test_invalid_parameters_raise_value_error_naming_the_parameter(name, preset, overrides, parameter):
    with pytest.raises(ValueError, match=rf"\b{parameter}="):
        data.make_task(name, preset, **overrides)


def test_invalid_levels_raise_value_error_naming_the_argument():
    task = data.make_task("rule110")
    with pytest.raises(ValueError, match=r"\blevels="):
        task.train_batch(4, step=0, levels=[99])
    with pytest.raises(ValueError, match=r"\blevel="):
        task.eval_set(99, 4)
    with pytest.raises(ValueError, match=r"\btext="):
        task.encode("0 1 2")


@pytest.mark.parametrize("name,preset", [("rule110", "paper"), ("depo", "paper"), ("math", "cpu")])
def test_score_marks_a_perfect_prediction_right_and_one_wrong_answer_token_wrong(name, preset):
    task = data.make_task(name, preset)
    idx, targets, _ = task.train_batch(16, step=0)
    perfect = torch.where(targets == -1, torch.randint_like(targets, task.vocab_size), targets)
    score = task.score(perfect, targets)
    assert score.shape == (16, task.items_per_example) and score.dtype == torch.bool and score.all()
    item = task.item_index(targets)
    is_answer = targets != -1
    # prefer an answer token right after another one: for Depo, the second token of a two-token answer
    follows_answer = is_answer & torch.nn.functional.pad(is_answer[:, :-1], (1, 0))
    row, position = torch.nonzero(follows_answer if follows_answer.any() else is_answer)[0].tolist()
    wrong = perfect.clone()
    wrong[row, position] = (targets[row, position] + 1) % task.vocab_size
    score = task.score(wrong, targets)
    assert not score[row, item[row, position]] and score.sum() == score.numel() - 1


def test_depo_items_group_two_token_answers():
    task = data.make_task("depo", "paper")
    _, targets, _ = task.train_batch(32, step=0)
    item = task.item_index(targets)
    assert (item.max(dim=1).values == task.params["queries"] - 1).all()
    answer_tokens = (targets != -1).sum(dim=1)
    assert (answer_tokens > task.params["queries"]).any()  # some answers have two tokens


def test_data_cli_takes_overrides_as_key_value_and_as_flags(capsys):
    data.main(["math", "--rendering=realistic", *(f"--{k}={v}" for k, v in REALISTIC_CPU.items()), "--examples=1"])
    data.main(["depo", "max_hops=1", "--examples=1"])
    out = capsys.readouterr().out
    assert "'rendering': 'realistic'" in out and "'max_hops': 1" in out
    with pytest.raises(SystemExit):
        data.main(["math", "--no_such_parameter=1"])
    assert "no_such_parameter" in capsys.readouterr().err


def test_cli_prints_examples(capsys):
    for name in TASK_NAMES:
        task = data.make_task(name)
        idx, targets, difficulty = task.train_batch(1, step=0)
        data.show_example(task, idx[0], targets[0], difficulty[0])
    out = capsys.readouterr().out
    assert "predict" in out and "consolidate" in out and re.search(r"answers: \S", out)


# ----------------------------------------------------------------------------------------------------
# train.py: model, optimizers and schedule


# The exactness tests run on the CPU; the ones parametrized over DEVICES also on CUDA when it is there.
SMOKE = ["--n_embd=16", "--n_head=2", "--batch_size=4", "--max_iters=4", "--eval_interval=2", "--log_interval=2",
         "--eval_examples=8", "--warmup_iters=2", "--sleep_passes=2", "--device=cpu", "--parallel=1"]


def parse_args(argv):
    """train.py's command line: (TrainConfig, task overrides)."""
    return runs.parse_args(argv, train.TrainConfig, train.PRESETS)


def smoke_config(tmp_path, *extra):
    return parse_args(SMOKE + [f"--out_dir={tmp_path}"] + list(extra))


def quiet_train(argv):
    cfg, overrides = parse_args(argv)
    return cfg, train.train(cfg, overrides, log=lambda *a: None)


def test_optimizers_put_the_hidden_matrices_on_muon_and_the_rest_on_adamw():
    model = tiny_model(dtype=torch.float32)
    muon, adamw = train.configure_optimizers(model, 2e-3, 5e-4)
    on_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        hidden = name.startswith("blocks.") and p.dim() == 2 and not name.endswith(("a_proj.weight", "b_proj.weight"))
        assert (id(p) in on_muon) == hidden, name
    assert sum(len(g["params"]) for g in adamw.param_groups) == len(list(model.parameters())) - len(on_muon)
    assert len(train.configure_optimizers(model, 2e-3, 5e-4, optimizer="adamw")) == 1
    with pytest.raises(ValueError, match="--optimizer must be one of muon, adamw"):
        train.configure_optimizers(model, 2e-3, 5e-4, optimizer="sgd")


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_weight_decay_shrinks_exactly_the_hidden_matrices_and_nothing_when_it_is_zero(optimizer):
    # With zero gradients, an optimizer step changes a parameter only through its weight decay.
    for weight_decay in (0.0, 0.1):
        model = tiny_model(dtype=torch.float32)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        optimizers = train.configure_optimizers(model, 0.01, 0.01, weight_decay=weight_decay, optimizer=optimizer)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for opt in optimizers:
            opt.step()
        for name, p in model.named_parameters():
            gate = name.endswith(("a_proj.weight", "b_proj.weight"))
            hidden = name.startswith("blocks.") and p.dim() == 2 and not gate
            if weight_decay and hidden:                  # decoupled decay: p <- p (1 - lr weight_decay)
                assert_close(p.detach(), before[name] * (1 - 0.01 * weight_decay), 1e-6, 0, what=f"{name} decayed")
            else:
                assert torch.equal(p.detach(), before[name]), f"{name} changed, weight_decay={weight_decay}"


def test_lr_multiplier_warms_up_from_above_zero_then_decays_to_the_floor():
    cfg = train.TrainConfig(warmup_iters=10, max_iters=110, min_lr_frac=0.1)
    values = [train.lr_multiplier(step, cfg) for step in range(111)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.55) and values[110] == pytest.approx(0.1)
    assert all(a < b for a, b in zip(values[:10], values[1:10]))
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_the_lr_schedule_drives_both_optimizers(tmp_path):
    cfg, _ = quiet_train(SMOKE + [f"--out_dir={tmp_path}"])     # 4 steps, 2 of warm-up
    muon, adamw = torch.load(tmp_path / "ckpt.pt", weights_only=False)["optimizers"]
    last = train.lr_multiplier(cfg.max_iters - 1, cfg)           # the last step's multiplier: 0.55
    assert last < 1
    assert [g["lr"] for g in muon["param_groups"]] == pytest.approx([cfg.learning_rate * last])
    assert [g["lr"] for g in adamw["param_groups"]] == pytest.approx([cfg.adamw_lr * last])


def test_curriculum_cap_rises_linearly_over_curriculum_iters_not_over_the_run(tmp_path):
    cfg, _ = smoke_config(tmp_path, "--curriculum_iters=100")        # rule110 cpu: levels t = 1..8, 4 steps in all
    task = train.make_task(cfg.task)
    assert task.train_levels == tuple(range(1, 9))
    # the cap is 1 + 7 step / 100: 1 at step 0, 2.75 at 25, 4.5 at 50, 6.25 at 75, 7.93 at 99
    for step, hardest in ((0, 1), (25, 2), (50, 4), (75, 6), (99, 7), (100, 8), (500, 8)):
        assert list(train.training_levels(step, cfg, task)) == list(range(1, hardest + 1)), f"step {step}"


# ----------------------------------------------------------------------------------------------------
# train.py: batches and evaluation


def test_training_batches_follow_the_curriculum_step_by_step(tmp_path):
    cfg, _ = smoke_config(tmp_path, "--curriculum_iters=4", "--max_iters=8", "--batch_size=64")
    task = train.make_task(cfg.task)                     # rule110 cpu: one state, then its query "?1@t<t>"
    batches = train.StepBatches(task, cfg)
    # the cap 1 + 7 step / 4: 1, 2.75, 4.5, 6.25, then every level (t = 1..8)
    for step, hardest in ((0, 1), (1, 2), (2, 4), (3, 6), (4, 8), (7, 8)):
        rollouts = {int(task.vocab[i].split("@t")[1]) for i in batches[step][0][:, -1].tolist()}
        assert max(rollouts) == hardest, f"step {step}: rollouts {sorted(rollouts)}"


def test_curriculum_raises_the_hardest_level_to_all_levels_and_n_draws_are_seeded(tmp_path):
    cfg, _ = smoke_config(tmp_path, "--curriculum_iters=100", "--train_sleep_passes=1,2,4")
    task = train.make_task(cfg.task)
    caps = [max(train.training_levels(step, cfg, task)) for step in range(0, 120, 10)]
    assert caps == sorted(caps) and caps[0] == task.train_levels[0] and caps[-1] == task.train_levels[-1]
    draws = [train.step_sleep_passes(step, cfg, [1, 2, 4]) for step in range(50)]
    assert set(draws) == {1, 2, 4}
    assert draws == [train.step_sleep_passes(step, cfg, [1, 2, 4]) for step in range(50)]


@slow
def test_worker_processes_make_exactly_the_in_loop_batches(tmp_path):
    cfg, _ = smoke_config(tmp_path, "--task=depo", "--curriculum_iters=3")
    dataset = train.StepBatches(train.make_task("depo"), cfg)
    in_loop = list(train.step_batches(dataset, 1, num_workers=0, pin_memory=False))
    ahead = list(train.step_batches(dataset, 1, num_workers=2, pin_memory=False))
    start_method = torch.multiprocessing.get_start_method()
    torch.multiprocessing.set_start_method("spawn", force=True)      # macOS's default: everything must pickle
    try:
        spawned = list(train.step_batches(dataset, 1, num_workers=1, pin_memory=False))
    finally:
        torch.multiprocessing.set_start_method(start_method, force=True)
    assert len(in_loop) == len(ahead) == len(spawned) == cfg.max_iters - 1
    for (x0, y0, n0), (x1, y1, n1), (x2, y2, n2) in zip(in_loop, ahead, spawned):
        assert torch.equal(x0, x1) and torch.equal(y0, y1) and n0 == n1
        assert torch.equal(x0, x2) and torch.equal(y0, y2) and n0 == n2
    plain = losses_and_grad_norms(tmp_path / "w0", "--num_workers=0")
    workers = losses_and_grad_norms(tmp_path / "w2", "--num_workers=2")
    assert_same_training(plain, workers, rtol=0)


class ScriptedModel(torch.nn.Module):
    """Stands in for the model in train.evaluate: its logits' argmax is the given prediction, row by row."""

    def __init__(self, inputs, predictions, vocab_size):
        super().__init__()
        self.inputs, self.predictions, self.vocab_size, self.seen = inputs, predictions, vocab_size, 0
        self.sleep_passes = []

    def forward(self, x, y, sleep_passes=None):
        rows = slice(self.seen, self.seen + len(x))
        assert torch.equal(x, self.inputs[rows])
        self.sleep_passes.append(sleep_passes)
        self.seen += len(x)
        return F.one_hot(self.predictions[rows], self.vocab_size).double(), None


def test_evaluate_counts_an_example_exactly_right_only_when_all_its_answers_and_their_tokens_are():
    task = data.make_task("depo", "paper")              # 10 answers per example, some of two tokens
    idx, targets, difficulty = task.eval_set(16, 6)
    prediction = torch.where(targets == -1, 0, targets)
    wrong_answers = [0, 1, 10, 0, 2, 9]                  # per example: how many of its 10 answers to get wrong
    wrong_by_answer = [0] * 10                           # per answer (first, second, ...): in how many examples
    for row, n_wrong in enumerate(wrong_answers):
        positions = torch.nonzero(targets[row] != -1).flatten().tolist()
        runs = [[p] for p in positions[:1]]              # an answer: a run of consecutive target positions
        for p in positions[1:]:
            if p == runs[-1][-1] + 1:
                runs[-1].append(p)
            else:
                runs.append([p])
        assert len(runs) == 10
        chosen = list(range(n_wrong))                    # which answers of the example (0-9) are made wrong
        if row == 1:                                     # only the second token of a two-token answer
            chosen = [i for i, r in enumerate(runs) if len(r) == 2][:n_wrong]
        for i in chosen:
            prediction[row, runs[i][-1]] = (targets[row, runs[i][-1]] + 1) % task.vocab_size
            wrong_by_answer[i] += 1
    model = ScriptedModel(idx, prediction, task.vocab_size)
    results = train.evaluate(model, task, {16: (idx, targets, difficulty)}, batch_size=4, device="cpu",
                             sleep_passes=3)
    assert model.seen == 6 and model.sleep_passes == [3, 3], "evaluate runs the model at the N it is given"
    assert results[16]["item"] == pytest.approx(1 - sum(wrong_answers) / 60)
    assert results[16]["exact"] == pytest.approx(2 / 6)      # examples 0 and 3
    assert results[16]["by_answer"] == pytest.approx([1 - w / 6 for w in wrong_by_answer])


def test_eval_only_lists_each_answer_only_where_an_example_asks_several():
    results = {5: {"item": 0.75, "exact": 0.5, "by_answer": [0.5, 1.0, 0.75, 0.75]}}
    four = data.make_task("rule110", states=4, width=24, t_min=5, t_max=5, levels=(5,))
    assert train.format_by_answer(four, results) == ["  t=5, each answer in the order asked: 0.500 1.000 0.750 0.750"]
    one = data.make_task("rule110")                      # the cpu preset: one state, one answer per example
    assert train.format_by_answer(one, {5: {"item": 0.75, "exact": 0.75, "by_answer": [0.75]}}) == []


# ----------------------------------------------------------------------------------------------------
# train.py: the training step and the loop


@slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", TASK_NAMES)
def test_training_runs_end_to_end_with_finite_loss_and_accuracy_per_level(task, device, tmp_path):
    cfg, overrides = smoke_config(tmp_path, f"--task={task}", f"--device={device}")
    result = train.train(cfg, overrides, log=lambda *a: None)
    assert len(result["losses"]) == 4 and all(map(torch.isfinite, torch.tensor(result["losses"])))
    final = result["final"][2]
    levels = train.make_task(task).levels
    assert list(final) == list(levels)
    assert all(0.0 <= final[lv]["item"] <= 1.0 and 0.0 <= final[lv]["exact"] <= 1.0 for lv in levels)
    assert (tmp_path / "ckpt.pt").exists()


def losses_and_grad_norms(tmp_path, *extra):
    """Per-step losses and gradient norms (from the log) of a 3-step smoke run."""
    lines = []
    cfg, overrides = smoke_config(tmp_path, "--max_iters=3", "--eval_interval=3", "--log_interval=1", *extra)
    train.train(cfg, overrides, log=lines.append)
    return grad_norms_and_losses("\n".join(lines))


def grad_norms_and_losses(log_text):
    pairs = re.findall(r"loss (\S+) \| grad norm (\S+) ", log_text)
    return torch.tensor([[float(x) for x in pair] for pair in pairs], dtype=torch.float64)


def assert_same_training(a, b, rtol):
    assert a.shape == b.shape == (3, 2)
    assert_close(b, a, rtol=rtol, atol=0, what="(loss, gradient norm) per step")


@pytest.mark.parametrize("task", ["depo", "math"])
def test_gradient_accumulation_gives_the_same_update(tmp_path, task):
    one = losses_and_grad_norms(tmp_path / "k1", f"--task={task}")
    two = losses_and_grad_norms(tmp_path / "k2", f"--task={task}", "--gradient_accumulation_steps=2")
    assert_same_training(one, two, rtol=1e-4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        parse_args(["--batch_size=5", "--gradient_accumulation_steps=2"])


def test_gradient_accumulation_weights_micro_batches_by_their_answer_tokens(tmp_path):
    # Two-token Depo names: the micro-batches of a step hold different numbers of answer tokens, so
    # averaging their mean losses with equal weights would change the update.
    flags = ["--task=depo", "--prefix_tokens=4", "--query_len=18"]
    cfg, overrides = smoke_config(tmp_path, *flags, "--gradient_accumulation_steps=2")
    steps = train.StepBatches(train.make_task("depo", **overrides), cfg)
    counts = [[int((steps[s][1][m:m + 2] >= 0).sum()) for m in (0, 2)] for s in range(3)]
    assert sum(a != b for a, b in counts) >= 2, f"answer tokens per micro-batch: {counts}"
    one = losses_and_grad_norms(tmp_path / "k1", *flags)
    two = losses_and_grad_norms(tmp_path / "k2", *flags, "--gradient_accumulation_steps=2")
    assert_same_training(one, two, rtol=1e-4)


def test_train_sleep_passes_trains_each_step_at_its_drawn_n(tmp_path, monkeypatch):
    passes = []
    real_forward = SleepLM.forward

    def recording(self, idx, targets=None, **kwargs):
        if self.training:
            passes.append(kwargs.get("sleep_passes"))
        return real_forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(SleepLM, "forward", recording)
    cfg, _ = quiet_train(SMOKE + [f"--out_dir={tmp_path}", "--train_sleep_passes=1,2,3", "--max_iters=8",
                                  "--eval_interval=8"])
    assert passes == [train.step_sleep_passes(step, cfg, [1, 2, 3]) for step in range(8)]
    assert set(passes) == {1, 2, 3}


def test_ssm_warmup_trains_only_the_gdn_blocks_under_hard_eviction(tmp_path, monkeypatch):
    evictions = []
    real_forward = SleepLM.forward

    def recording(self, idx, targets=None, **kwargs):
        if self.training:
            evictions.append(kwargs.get("eviction"))
        return real_forward(self, idx, targets, **kwargs)

    monkeypatch.setattr(SleepLM, "forward", recording)
    cfg, result = quiet_train(SMOKE + [f"--out_dir={tmp_path}", "--max_iters=3", "--eval_interval=3",
                                       "--eviction=sliding", "--layers=AG", "--ssm_warmup_iters=2"])
    assert evictions == ["hard", "hard", None]          # None: the configured (sliding) eviction
    torch.manual_seed(cfg.seed)
    initial = train.build_model(cfg, train.make_task(cfg.task)).state_dict()
    trained = torch.load(tmp_path / "ckpt.pt", weights_only=False)["model"]
    cfg, _ = quiet_train(SMOKE + [f"--out_dir={tmp_path / 'warm'}", "--max_iters=2", "--eval_interval=2",
                                  "--layers=AG", "--ssm_warmup_iters=2"])
    warm = torch.load(tmp_path / "warm" / "ckpt.pt", weights_only=False)["model"]
    for name, w in initial.items():
        changed = not torch.equal(warm[name], w)
        assert changed == name.startswith("blocks.1."), f"{name} {'changed' if changed else 'did not change'}"
    for name in ("wte.weight", "lm_head.weight", "blocks.0.mixer.proj.weight"):   # the zero-init proj first
        assert not torch.equal(trained[name], initial[name]), f"{name} did not train after the warm-up"


def test_nan_loss_stops_training_with_a_message_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    cfg, overrides = smoke_config(tmp_path)
    real_forward = SleepLM.forward
    calls = []

    def poisoned(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training:
            calls.append(1)
            if len(calls) == 3:                          # step 3, after the step-2 checkpoint
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(SleepLM, "forward", poisoned)
    with pytest.raises(runs.NonFiniteLoss, match="loss is nan at step 2"):
        train.train(cfg, overrides, log=lambda *a: None)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"] == 2


@slow
@pytest.mark.parametrize("device", DEVICES)
def test_resume_gives_bitwise_the_same_next_losses(tmp_path, monkeypatch, device):
    cfg, overrides = smoke_config(tmp_path / "a", "--max_iters=6", "--eval_interval=3", f"--device={device}")
    uninterrupted = train.train(cfg, overrides, log=lambda *a: None)["losses"]

    cfg, overrides = smoke_config(tmp_path / "b", "--max_iters=6", "--eval_interval=3", f"--device={device}")
    real_multiplier = train.lr_multiplier

    def preempted(step, cfg):                            # the job dies after the step-3 checkpoint (in the
        if step == 4:                                    # training loop's own process: on CUDA the batches
            raise KeyboardInterrupt                      # come from worker processes)
        return real_multiplier(step, cfg)

    monkeypatch.setattr(train, "lr_multiplier", preempted)
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg, overrides, log=lambda *a: None)
    monkeypatch.setattr(train, "lr_multiplier", real_multiplier)
    resumed = train.train(dataclasses.replace(cfg, resume=True), overrides, log=lambda *a: None)["losses"]
    if device == "cpu":
        assert resumed == uninterrupted                  # float equality: bitwise the same run
    else:   # CUDA kernels may reduce in another order and bf16 rounding magnify it; other batches or a
            # lost RNG state would move the losses by 1e-2 and more
        assert_close(torch.tensor(resumed), torch.tensor(uninterrupted), rtol=1e-4, what="resumed losses")


def train_process(*argv, text=True):
    """`python train.py ARGV` as a user runs it (no PYTHONUNBUFFERED), its output in a pipe."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    process = subprocess.Popen([sys.executable, str(HERE / "train.py"), *argv], cwd=HERE, env=env, text=text,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    guard = threading.Timer(HANG_GUARD, process.kill)   # a hung run ends, and so does a read waiting on it
    guard.daemon = True
    guard.start()
    return process


def read_until(process, pattern):
    """The process's output lines up to the first that matches pattern (fails if it ends first)."""
    lines = []
    while not (lines and re.search(pattern, lines[-1])):
        line = process.stdout.readline()
        assert line, f"ended before a line matched {pattern!r}:\n" + "".join(lines)
        lines.append(line)
    return lines


def saved_step(run_dir):
    return torch.load(run_dir / "ckpt.pt", weights_only=False)["step"] if (run_dir / "ckpt.pt").exists() else 0


@slow
def test_log_lines_reach_a_pipe_as_they_are_printed(tmp_path):
    process = train_process(*SMOKE, f"--out_dir={tmp_path}", "--max_iters=100000", "--log_interval=1",
                            "--eval_interval=1", text=False)
    pipe, text = process.stdout.fileno(), b""
    try:
        while not re.search(rb"^step 3/", text, re.M):
            chunk = os.read(pipe, 1 << 16)
            assert chunk, text.decode()
            text += chunk
        last_seen = max(int(n) for n in re.findall(rb"^step (\d+)/", text, re.M))
        while saved_step(tmp_path) < last_seen + 2:      # two steps more, written nowhere yet but the pipe
            assert process.poll() is None, "train.py ended before it saved two more steps"
            time.sleep(0.05)
        process.send_signal(signal.SIGSTOP)             # frozen: what it printed so far must be in the pipe
        step = saved_step(tmp_path)                     # written after that step's lines
        os.set_blocking(pipe, False)
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(pipe, 1 << 16):
                text += chunk
        text = text.decode()
        assert step >= 2 and re.search(rf"^step {step}/", text, re.M) and f"\neval step {step} N=2 " in text
    finally:
        process.kill()
        process.wait()


@slow
def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_resumes(tmp_path):
    process = train_process(*SMOKE, f"--out_dir={tmp_path}", "--max_iters=100000", "--log_interval=1")
    read_until(process, r"^step 2/")
    process.send_signal(signal.SIGINT)
    out = process.communicate(timeout=HANG_GUARD)[0]
    last = out.strip().splitlines()[-1]
    assert process.returncode == 130 and "Traceback" not in out
    step = torch.load(tmp_path / "ckpt.pt", weights_only=False)["step"]
    assert last.startswith(f"stopped at step {step}/100000; saved {tmp_path / 'ckpt.pt'}. To continue: python train.py")
    command = shlex.split(last.split("To continue: ")[1])
    assert command[-1] == "--resume"
    resumed = train_process(*command[2:])               # the printed command, run as printed
    first = read_until(resumed, r"^step \d+/")[-1]
    resumed.send_signal(signal.SIGINT)
    resumed.communicate(timeout=HANG_GUARD)
    assert first.startswith(f"step {step + 1}/100000") and resumed.returncode == 130


# ----------------------------------------------------------------------------------------------------
# train.py and runs.py: the command line


@pytest.mark.parametrize("argv, message", [
    (["--task=chess"], "--task"), (["--preset=huge"], "--preset"), (["--learning_rate=fast"], "--learning_rate"),
    (["--no_such_key=1"], "unknown setting --no_such_key"), (["--compile=maybe"], "--compile"),
    (["max_iters=3"], "--key=value"),
    (["--eval_interval=0"], "--eval_interval"), (["--sweep=1,2", "--train_sleep_passes=1,2"], "--train_sleep_passes"),
    (["--sleep_blocks=2"], "--sleep_blocks"), (["--num_workers=-2"], "--num_workers"),
    (["--parallel=-1"], "--parallel"),
    (["--threads=-1"], "--threads"),
    (["--compile_mode=fast"], "--compile_mode must be one of default, reduce-overhead"),
    (["--compile", "--compile_mode=reduce-overhead", "--gradient_accumulation_steps=2"], "CUDA graphs"),
    (["--task=math", "--preset=paper", "--compile", "--compile_mode=reduce-overhead"], "without --checkpoint_windows"),
])
def test_invalid_flags_are_refused_with_a_clear_message(argv, message):
    with pytest.raises(ValueError, match=message):
        parse_args(argv)


def test_a_task_of_data_py_without_presets_names_the_presets_table(monkeypatch):
    # A task just added to data.TASKS, before its line in train.PRESETS: the error says where to add it.
    monkeypatch.setitem(data.TASKS, "no_presets_yet", data.Rule110)
    with pytest.raises(ValueError, match=r"--task=no_presets_yet is a task of data.py, but .*PRESETS.*"
                                         r"\('no_presets_yet', 'cpu'\)"):
        parse_args(["--task=no_presets_yet"])


def test_an_unknown_flag_suggests_the_nearest_setting():
    with pytest.raises(ValueError, match="unknown setting --sleep_pases: did you mean --sleep_passes"):
        parse_args(["--sleep_pases=2"])
    with pytest.raises(ValueError, match="unknown setting --t_maxx: did you mean --t_max"):   # a task parameter
        parse_args(["--t_maxx=6"])


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_a_device_this_torch_lacks_is_a_one_line_error(device, capsys):
    if (device == "cuda" and torch.cuda.is_available()) or (device == "mps" and torch.backends.mps.is_available()):
        pytest.skip(f"this machine has {device}")
    with pytest.raises(SystemExit) as stop:
        train.main([f"--device={device}"])
    message = str(stop.value.code)
    assert message.startswith(f"error: --device={device}: this torch") and "\n" not in message
    assert capsys.readouterr().out == ""                 # refused before anything is printed


def test_main_refuses_bad_model_settings_before_training(capsys):
    with pytest.raises(SystemExit, match="eviction"):
        train.main(["--eviction=partial"])


def test_help_documents_every_setting_and_the_tasks_parameters(capsys):
    train.main(["--task=depo", "--help"])
    out = capsys.readouterr().out
    for field in dataclasses.fields(train.TrainConfig):
        line = re.search(rf"^  --{field.name}=\S*\s+(.+)$", out, re.M)
        assert line and len(line.group(1)) > 10, f"--help does not explain --{field.name}"
    assert re.search(r"^  --batch_size=64 ", out, re.M)                        # depo's preset value
    for key in train.make_task("depo").params:
        assert re.search(rf"^  --{key}=", out, re.M)
    train.main(["-h"])
    assert "--sleep_passes=4" in capsys.readouterr().out


def test_default_output_folders_name_the_task_preset_and_every_changed_setting():
    def out_dir(*argv):
        return parse_args(list(argv))[0].out_dir
    assert out_dir("--task=depo") == os.path.join("out", "depo-cpu", "N4_seed0")
    assert out_dir("--task=depo", "--preset=paper", "--sleep_passes=2", "--seed=1") == \
        os.path.join("out", "depo-paper", "N2_seed1")
    assert out_dir("--layers=AA") == os.path.join("out", "rule110-cpu", "N1_seed0_layers=AA")
    assert out_dir("--sleep_passes=1", "--max_iters=13000", "--t_max=6") == \
        os.path.join("out", "rule110-cpu", "N1_seed0_max_iters=13000_t_max=6")
    assert out_dir("--sweep=1,4", "--seeds=0,1") == os.path.join("out", "rule110-cpu", "sweep")
    assert out_dir("--eval_interval=10", "--device=cpu") == out_dir()   # run control is not in the name
    assert out_dir("--t_max=8", "--width=16") == out_dir()                  # the preset's own task values
    assert out_dir("--sleep_blocks=1:2") == os.path.join("out", "rule110-cpu", "N4_seed0_sleep_blocks=1-2")
    with pytest.raises(ValueError, match="sleep_blocks"):                   # AG has 2 blocks
        train.build_model(parse_args(["--sleep_blocks=1:3"])[0], train.make_task("rule110"))
    model = train.build_model(parse_args(["--sleep_blocks=1:2", "--layer_repeat=2"])[0],
                              train.make_task("rule110"))
    assert model.config.sleep_blocks == (1, 2) and model.config.layers == "AGAG"


def test_the_saved_n_is_a_trained_one_and_baselines_run_with_the_n_they_need():
    assert parse_args(["--train_sleep_passes=1,2"])[0].sleep_passes == 2
    assert parse_args(["--train_sleep_passes=1,2", "--sleep_passes=1"])[0].sleep_passes == 1
    with pytest.raises(ValueError, match="--sleep_passes=4 is not among"):
        parse_args(["--train_sleep_passes=1,2", "--sleep_passes=4"])
    assert parse_args(["--layers=AA"])[0].sleep_passes == 1              # nothing to sleep into
    assert parse_args(["--eviction=none"])[0].sleep_passes == 1          # no windows
    assert parse_args(["--layers=AG"])[0].sleep_passes == 4
    assert parse_args(["--layers=AA", "--eviction=sliding"])[0].sleep_passes == 4   # N changes the kept KV
    assert parse_args(["--sleep_blocks=0:1"])[0].sleep_passes == 1       # AG: only the A block would sleep
    with pytest.raises(ValueError, match="nothing sleeps"):
        parse_args(["--layers=AA", "--sweep=1,4"])


# ----------------------------------------------------------------------------------------------------
# train.py and runs.py: checkpoints, resume rules, a trained run


@pytest.mark.parametrize("device", DEVICES)
def test_eval_only_rebuilds_the_checkpoints_model_and_evaluates_other_n(tmp_path, device):
    cfg, overrides = smoke_config(tmp_path, "--task=depo", "--input_injection", f"--device={device}")
    trained = train.train(cfg, overrides, log=lambda *a: None)
    # The model, task and settings come from the checkpoint, not from the (default) flags.
    cfg, overrides = parse_args([f"--out_dir={tmp_path}", "--eval_only", "--eval_sleep_passes=2,3",
                                       "--eval_examples=8",
                                       f"--device={device}"])
    lines = []
    evaluated = train.train(cfg, overrides, log=lines.append)
    assert evaluated["final"][2] == trained["final"][2]
    assert set(evaluated["final"]) == {2, 3}
    for n in (2, 3):   # and each answer's share, in the order asked, under its N's line
        at = [i for i, line in enumerate(lines) if line.startswith(f"eval step {trained['history'][-1]['step']} N={n} |")]
        below = [f"  k={level}, each answer in the order asked: " + " ".join(f"{a:.3f}" for a in r["by_answer"])
                 for level, r in evaluated["final"][n].items()]
        assert len(at) == 1 and lines[at[0] + 1:at[0] + 1 + len(below)] == below, lines


def test_resume_refuses_different_model_settings(tmp_path):
    cfg, overrides = smoke_config(tmp_path)
    train.train(cfg, overrides, log=lambda *a: None)
    with pytest.raises(ValueError, match="--layers=GA"):        # on the command line
        smoke_config(tmp_path, "--resume", "--layers=GA")
    with pytest.raises(ValueError, match="layers"):             # and called directly
        train.train(dataclasses.replace(cfg, resume=True, layers="GA"), overrides, log=lambda *a: None)


@slow
def test_resume_and_eval_only_take_the_runs_settings_from_the_checkpoint(tmp_path):
    first, done = quiet_train(SMOKE + [f"--out_dir={tmp_path}", "--task=depo", "--seed=3", "--batch_size=6",
                                       "--device=cpu",
                                       "--learning_rate=0.01", "--curriculum_iters=2"])
    cfg, overrides = parse_args([f"--out_dir={tmp_path}", "--resume", "--max_iters=6"])   # nothing else given
    assert dataclasses.replace(cfg, max_iters=4, resume=False, device="cpu", parallel=1) == first
    assert overrides == done["task"]
    extended = train.train(cfg, overrides, log=lambda *a: None)
    assert len(extended["losses"]) == 6 and extended["losses"][:4] == done["losses"]
    for flag in ("--learning_rate=0.1", "--adamw_lr=0.1", "--weight_decay=0.1", "--seed=0", "--task=rule110",
                 "--batch_size=4", "--max_hops=1"):
        with pytest.raises(ValueError, match=flag.split("=")[0]):
            parse_args([f"--out_dir={tmp_path}", "--resume", flag])
    for shorter in ("--max_iters=2", "--max_iters=5"):
        with pytest.raises(ValueError, match="max_iters"):
            parse_args([f"--out_dir={tmp_path}", "--resume", shorter])
    assert parse_args([f"--out_dir={tmp_path}", "--eval_only"])[0].device == "auto"   # not the run's "cpu"
    cfg, _ = parse_args([f"--out_dir={tmp_path}", "--eval_only", "--eval_sleep_passes=1,2", "--eval_examples=4"])
    assert (cfg.task, cfg.seed, cfg.batch_size, cfg.eval_sleep_passes, cfg.eval_examples) == ("depo", 3, 6, "1,2", 4)


def test_a_new_run_refuses_to_overwrite_a_checkpoint(tmp_path):
    quiet_train(SMOKE + [f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="already holds a run"):
        quiet_train(SMOKE + [f"--out_dir={tmp_path}", "--task=depo"])


def test_resume_with_a_new_max_iters_names_the_run_it_means(tmp_path, monkeypatch):
    # --max_iters is part of a run's folder name, so `--resume --max_iters=6` after a 4-step run looks in
    # another folder: the error names the run's own folder and the flag that reaches it
    monkeypatch.chdir(tmp_path)
    quiet_train(SMOKE)
    (done,) = [p.parent for p in tmp_path.glob("out/*/*/ckpt.pt")]
    with pytest.raises(FileNotFoundError, match=re.escape(f"--out_dir={done.relative_to(tmp_path)}")):
        parse_args([*SMOKE, "--max_iters=6", "--resume"])
    assert parse_args([*SMOKE, f"--out_dir={done}", "--max_iters=6", "--resume"])[0].max_iters == 6   # as told
    with pytest.raises(FileNotFoundError, match="give the flags the run was started with"):
        parse_args([*SMOKE, "--seed=5", "--resume"])            # no run of another length either


def test_an_unreadable_checkpoint_is_named_in_the_error(tmp_path):
    (tmp_path / "ckpt.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "ckpt.pt"))):
        parse_args([f"--out_dir={tmp_path}", "--resume"])


def test_init_from_loads_the_weights_only_and_refuses_another_model(tmp_path):
    quiet_train(SMOKE + [f"--out_dir={tmp_path / 'n1'}", "--sleep_passes=1"])
    source = torch.load(tmp_path / "n1" / "ckpt.pt", weights_only=False)["model"]
    cfg, result = quiet_train(SMOKE + [f"--out_dir={tmp_path / 'n2'}", f"--init_from={tmp_path / 'n1'}",
                                       "--learning_rate=0", "--adamw_lr=0", "--max_iters=2", "--eval_interval=2"])
    loaded = torch.load(tmp_path / "n2" / "ckpt.pt", weights_only=False)
    assert loaded["step"] == 2 and loaded["model_config"]["sleep_passes"] == 2
    for name, w in source.items():
        assert torch.equal(loaded["model"][name], w), name        # lr 0: still exactly the source weights
    with pytest.raises(ValueError, match="init_from"):
        quiet_train(SMOKE + [f"--out_dir={tmp_path / 'other'}", f"--init_from={tmp_path / 'n1'}", "--layers=AGAG"])


# ----------------------------------------------------------------------------------------------------
# train.py and runs.py: sweeps, side-by-side runs and several processes


@slow
@pytest.mark.parametrize("device", DEVICES)
def test_sweep_tables_every_run_and_collects_finished_runs_without_retraining(tmp_path, monkeypatch, device):
    cfg, overrides = smoke_config(tmp_path, "--sweep=1,2", "--seeds=0", f"--device={device}")
    first = runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    assert [(r["sleep_passes"], r["seed"], r["steps"]) for r in first] == [(1, 0, 4), (2, 0, 4)]
    # seed 1 in another process (here: another call), then one call collects all four runs
    runs.sweep(dataclasses.replace(cfg, seeds="1"), overrides, train.train, log=lambda *a: None)
    task_class = type(train.make_task(cfg.task))
    monkeypatch.setattr(task_class, "train_batch", lambda *a, **k: pytest.fail("a finished run was retrained"))
    collected = runs.sweep(dataclasses.replace(cfg, seeds="0,1"), overrides, train.train, log=lambda *a: None)
    assert [(r["sleep_passes"], r["seed"]) for r in collected] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert collected[0]["final"] == first[0]["final"] and collected[2]["final"] == first[1]["final"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["runs"]) == 4
    table = (tmp_path / "results.md").read_text()
    assert re.search(r"^\| 1 \| .* \| 2 \| ", table, re.M) and re.search(r"^\| 2 \| ", table, re.M)


@slow
def test_a_sweep_refuses_a_checkpoint_of_another_task(tmp_path):
    cfg, overrides = smoke_config(tmp_path, "--sweep=2")
    runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    (tmp_path / "results.json").unlink()         # its results alone are refused first (a test of its own)
    cfg, overrides = smoke_config(tmp_path, "--sweep=2", "--task=depo")
    with pytest.raises(ValueError, match="holds another run.*task"):
        runs.sweep(cfg, overrides, train.train, log=lambda *a: None)


def test_step_ms_is_exact_from_two_n_and_never_above_the_truth_from_one():
    """Made-up ms/step of tasks whose step costs an overhead a plus b per window pass (N over each of C
    consolidation windows, one over each of P prediction windows): two N seen give every N; one N seen
    gives no more than the truth, and the truth where the model leaves no choice (a = 0 below, b = 0 above)."""
    gen = random.Random(0)
    for _ in range(300):
        c, p, a, b = gen.randint(1, 4), gen.randint(1, 2), gen.choice([0.0, gen.uniform(0, 80)]), gen.uniform(0, 40)
        true = lambda n: a + b * (c * n + p)     # noqa: E731
        ns = gen.sample(range(1, 9), 3)
        for k in (2, 3):
            seen = {n: true(n) for n in ns[:k]}
            assert all(runs.step_ms(n, seen, (c, p)) == pytest.approx(true(n)) for n in range(1, 9))
        n0 = ns[0]
        for n in range(1, 9):
            estimate = runs.step_ms(n, {n0: true(n0)}, (c, p))
            assert estimate <= true(n) * (1 + 1e-9)
            if (a == 0 and n <= n0) or n == n0:
                assert estimate == pytest.approx(true(n))
            if n >= n0:                           # all overhead (b = 0): the same at every N
                assert runs.step_ms(n, {n0: a}, (c, p)) == pytest.approx(a)


def test_the_sweep_eta_is_never_above_the_time_the_sweep_takes_and_at_least_half_of_it():
    """Side-by-side runs of made-up costs, started in order as processes free up: the eta (a lower bound on
    any such schedule's end) is never later than the simulated end, and once two N have been seen not below
    half of it (a process is never idle while runs wait)."""
    gen = random.Random(1)
    for _ in range(300):
        c, p, a, b = gen.randint(1, 4), gen.randint(1, 2), gen.uniform(0, 80), gen.uniform(1, 40)
        ms = lambda n: a + b * (c * n + p)     # noqa: E731
        cfgs = [types.SimpleNamespace(sleep_passes=gen.choice([1, 2, 3, 4, 8]), max_iters=gen.randint(10, 500))
                for _ in range(gen.randint(1, 8))]
        parallel = gen.randint(1, 3)
        running = [types.SimpleNamespace(cfg=cfg, eta=None) for cfg in cfgs[:parallel]]
        waiting = cfgs[parallel:]
        seen = {}
        for r in running:                         # some running runs have logged a line: their eta and ms/step
            if gen.random() < 0.7:
                r.eta = gen.uniform(0, 1) * r.cfg.max_iters * ms(r.cfg.sleep_passes) / 1000
                seen[r.cfg.sleep_passes] = ms(r.cfg.sleep_passes)
        if not seen:
            continue
        left = [r.eta if r.eta is not None else r.cfg.max_iters * ms(r.cfg.sleep_passes) / 1000 for r in running]
        left += [0.0] * (parallel - len(left))
        for cfg in waiting:                       # each waiting run on the first process to free up
            i = min(range(parallel), key=lambda j: left[j])
            left[i] += cfg.max_iters * ms(cfg.sleep_passes) / 1000
        eta, bound = runs.sweep_eta(running, waiting, seen, parallel, (c, p))
        assert eta <= max(left) * (1 + 1e-9)
        if len(seen) >= 2:
            assert not bound and eta >= max(left) / 2 * (1 - 1e-9)
        elif any(cfg.sleep_passes not in seen for cfg in waiting):
            assert bound


def test_window_counts_are_the_windows_before_the_answers_and_those_holding_them():
    for name in TASK_NAMES:
        task = data.make_task(name, preset="cpu")
        consolidation, prediction = runs.window_counts(task)
        _, targets, _ = task.eval_set(task.levels[0], 4, seed=5)
        answered = [bool((targets[:, w:w + task.window] >= 0).any()) for w in range(0, task.seq_len, task.window)]
        assert consolidation + prediction == len(answered) and prediction >= 1
        assert answered == [False] * consolidation + [True] * prediction, name


@slow
def test_a_parallel_sweep_trains_its_runs_side_by_side_as_the_sequential_one_does(tmp_path):
    cfg, overrides = smoke_config(tmp_path / "seq", "--sweep=1,2", "--task=depo", "--max_hops=1")
    sequential = runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    cfg, overrides = smoke_config(tmp_path / "par", "--sweep=1,2", "--task=depo", "--max_hops=1", "--parallel=2")
    lines = []
    parallel = runs.sweep(cfg, overrides, train.train, log=lines.append)
    assert sum("started" in line for line in lines) == 2 and sum("finished" in line for line in lines) == 2
    for a, b in zip(sequential, parallel):
        assert (a["sleep_passes"], a["steps"], a["final"]) == (b["sleep_passes"], b["steps"], b["final"])
        losses = [torch.load(d / f"N{a['sleep_passes']}_seed0" / "ckpt.pt", weights_only=False)["losses"]
                  for d in (tmp_path / "seq", tmp_path / "par")]
        assert losses[1] == losses[0]                   # bitwise: one thread per process either way
    assert "max_hops=1" in (tmp_path / "par" / "N2_seed0" / "train.log").read_text()
    # the runs' own step lines come through, labelled, with an estimate for the whole sweep
    assert any(re.match(r"\[run 2/2 N=2 seed=0\] step 4/4 .*\| sweep eta (at least )?[\d.]+ min$", line)
               for line in lines)
    assert any(re.match(r"\[run 2/2 N=2 seed=0\] step 1/4 .*\| first step: eta from the next line$", line)
               for line in lines)
    assert lines[-1].startswith("checkpoints: ") and str(tmp_path / "par" / "N2_seed0" / "ckpt.pt") in lines[-1]
    auto = dataclasses.replace(cfg, parallel=0)                # by default one run per core on the CPU
    assert runs.sweep_parallel(auto, 2) == min(2, os.cpu_count()) and runs.sweep_parallel(auto, 1) == 1


@slow
def test_ctrl_c_stops_a_side_by_side_sweep_with_a_checkpoint_per_run(tmp_path):
    # three runs, two at a time: the third is still waiting when Ctrl-C comes, and must not hold the sweep open
    argv = [*SMOKE, f"--out_dir={tmp_path}", "--max_iters=100000", "--log_interval=1", "--sweep=1,2,3", "--parallel=2"]
    process = train_process(*argv)
    read_until(process, r"^\[run 1/3 .*\] step ")
    read_until(process, r"^\[run 2/3 .*\] step ")
    process.send_signal(signal.SIGINT)
    out = process.communicate(timeout=HANG_GUARD)[0]
    assert process.returncode == 130 and "Traceback" not in out
    assert out.strip().splitlines()[-1].endswith(f"To continue: python train.py {shlex.join(argv)}")
    for n in (1, 2):
        assert torch.load(tmp_path / f"N{n}_seed0" / "ckpt.pt", weights_only=False)["step"] >= 1
    assert not (tmp_path / "N3_seed0" / "ckpt.pt").exists(), "a waiting run started after Ctrl-C"


@slow
def test_torchrun_with_two_processes_trains_like_one(tmp_path):
    single = losses_and_grad_norms(tmp_path / "one", "--device=cpu")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *SMOKE, "--max_iters=3", "--eval_interval=3", "--log_interval=1", "--device=cpu",
                           f"--out_dir={tmp_path / 'two'}"], cwd=HERE, env=env, timeout=HANG_GUARD, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("step 2/3") == 1, "only rank 0 logs"
    assert_same_training(single, grad_norms_and_losses(done.stdout), rtol=1e-4)
    assert (tmp_path / "two" / "ckpt.pt").exists()


# ----------------------------------------------------------------------------------------------------
# train.py: every setting and every task parameter reaches what it should
#
# The plumbing of train.py used below, one place each: the command line (parse_args: flags -> settings,
# and with --resume the settings restored from a checkpoint), the names of the settings that a resumed
# run may give anew (RUN_CONTROL), the sweep's table and its statistics. Checkpoints are read as files.


def command_line(argv):
    """(TrainConfig, task overrides) as `python train.py ARGV` reads them."""
    return parse_args(argv)


def resumable_with_other_values():
    """The settings a resumed run may give anew, which run names leave out."""
    return set(runs.RUN_CONTROL)


def results_table(task, finished):
    return runs.results_table(task, finished)


def read_checkpoint(run_dir):
    return torch.load(run_dir / "ckpt.pt", weights_only=False)


# A tiny run on the CPU: two steps, evaluated and saved once, at the end.
TINY = ["--n_embd=16", "--n_head=2", "--batch_size=8", "--max_iters=2", "--eval_interval=2", "--log_interval=2",
        "--eval_examples=8", "--warmup_iters=1", "--sleep_passes=2", "--device=cpu", "--parallel=1"]

# Where a setting can show. Each is observed on a tiny run (see observe) before and after the setting changes.
DESTINATIONS = {
    "model": "the model's config, build_model(cfg, task).config",
    "batches": "the training batches, StepBatches(task, cfg): the first steps' batches and the number of steps",
    "schedule": "the learning-rate multiplier lr_multiplier(step, cfg) of steps 0..11",
    "optimizer": "the saved optimizers' parameter groups: their hyperparameters, without the scheduled lr",
    "step": "what each training step asks of the model: its N and its eviction",
    "evaluation": "what evaluate() is asked: the N and the examples of each level",
    "training": "the run's losses and final weights",
}
# "training" lies downstream of everything that changes what is trained, so it is listed only where it is
# the setting's main way in; every other destination is exact: a setting changes it iff it lists it.
TRAINING = {"model", "batches", "schedule", "optimizer", "step", "training"}

# Every setting of TrainConfig that changes the run: another valid value (a tiny rule110 run at the cpu
# preset is the starting point), and the destinations it changes. A value may be a function of the
# unchanged run's folder.
SETTING_DESTINATIONS = {
    "task": ("depo", {"model", "batches", "evaluation"}),
    "preset": ("gpu", {"model", "batches", "evaluation"}),   # the gpu preset's task layout, and its AGAG
    "seed": (1, {"batches", "evaluation", "training"}),      # also the initial weights (a test of its own)
    "n_embd": (32, {"model"}),
    "n_head": (4, {"model"}),
    "layers": ("GA", {"model"}),
    "layer_repeat": (2, {"model"}),
    "sleep_passes": (3, {"model", "step", "evaluation"}),    # evaluated at the trained N by default
    "sleep_blocks": ("1:2", {"model"}),
    "eviction": ("sliding", {"model"}),
    "bptt_passes": (1, {"model"}),
    "checkpoint_windows": (True, {"model"}),
    "input_injection": (True, {"model"}),
    "train_sleep_passes": ("1,2", {"step"}),                 # step 0 draws N = 1 at seed 0
    "curriculum_iters": (3, {"batches"}),
    "ssm_warmup_iters": (1, {"step", "training"}),           # hard eviction, and only the G blocks train
    "init_from": (lambda unchanged_run: str(unchanged_run), {"training"}),   # that run's trained weights
    "optimizer": ("adamw", {"optimizer"}),
    "batch_size": (4, {"batches"}),
    "max_iters": (3, {"batches", "schedule", "step", "training"}),   # one step more
    "learning_rate": (1e-3, {"optimizer"}),
    "adamw_lr": (1e-3, {"optimizer"}),
    "weight_decay": (0.1, {"optimizer"}),
    "warmup_iters": (2, {"schedule"}),
    "min_lr_frac": (0.5, {"schedule"}),
    "grad_clip": (0.01, {"training"}),
    "eval_examples": (4, {"evaluation"}),
    "eval_sleep_passes": ("1", {"evaluation"}),
}

# Every setting that says how or where a run is done, not what is trained or measured: why, and (where one
# fits in a tiny run in this process) another value, with which nothing above may change.
RUN_CONTROL_SETTINGS = {
    "eval_interval": ("when to evaluate and save, not what: see the run invariants below", 1),
    "log_interval": ("when to print a progress line", 1),
    "eval_batch_size": ("examples per evaluation forward pass: the same examples, the same accuracy", 4),
    "parallel": ("how many runs of a --sweep train at once", 2),
    "gradient_accumulation_steps": ("the same batch in micro-batches: the same update up to float rounding "
                                    "(test_gradient_accumulation_gives_the_same_update)", None),
    "eval_only": ("evaluates a saved run instead of training one", None),
    "out_dir": ("where the run is saved (every run here has its own)", None),
    "resume": ("continues the saved run with its own settings (test_resume_with_a_larger_max_iters_...)", None),
    "sweep": ("trains one run per N with these settings (test_a_sweeps_table_and_fig2_...)", None),
    "seeds": ("the seeds of a --sweep's runs", None),
    "device": ("where the run computes; the CUDA tests compare devices", None),
    "threads": ("CPU threads per process: the same numbers", None),
    "compile": ("torch.compile of the same model (test_compiled_model_matches_eager_loss_and_gradients)", None),
    "compile_mode": ("how --compile compiles", None),
    "num_workers": ("processes that make the same batches ahead (test_worker_processes_make_exactly_...)", None),
}

# Every parameter of every task (at its cpu preset): another valid value, the destinations it changes, and
# settings it needs (given before and after, so that only the parameter differs).
TASK_PARAMETER_DESTINATIONS = {
    "rule110": {
        "states": (2, {"model", "batches", "evaluation"}),          # one query token per state and t
        "width": (12, {"model", "batches", "evaluation"}),          # the window is a state
        "t_min": (2, {"model", "batches", "evaluation"}),           # the vocabulary has a query per t trained
        "t_max": (9, {"model", "batches"}),                         # ... or evaluated (t = 9 comes last)
        "levels": ((2, 4), {"evaluation"}),
    },
    "depo": {
        "max_nodes": (7, {"batches", "evaluation"}),                # evaluation graphs have max_nodes nodes
        "min_nodes": (4, {"batches"}),
        "name_tokens": (12, {"model", "batches", "evaluation"}),
        "prefix_tokens": (2, {"batches", "evaluation"}, {"query_len": 18}),   # two-token names, in as many tokens
        "max_hops": (1, {"batches"}),
        "levels": ((1,), {"evaluation"}),
        "queries": (2, {"batches", "evaluation"}),
        "graph_len": (48, {"batches", "evaluation"}),
        "query_len": (18, {"batches", "evaluation"}),
        "window": (12, {"model"}),
    },
    "math": {
        "rendering": ("realistic", {"model", "batches", "evaluation"},
                      {"min_tokens": 98, "max_tokens": 168, "window": 96, "quantities": 48}),
        "op_min": (2, {"batches"}),
        "op_max": (3, {"batches"}),
        "levels": ((1,), {"evaluation"}),
        "values": (12, {"model", "batches", "evaluation"}),
        "quantities": (30, {"model", "batches", "evaluation"}),
        "min_tokens": (40, {"batches", "evaluation"}),
        "max_tokens": (60, {"batches", "evaluation"}),
        "window": (30, {"model"}),
    },
}

# What the tests below run over, generated from TrainConfig and data.TASKS (not from the tables): (None, setting)
# for every setting, (task, parameter) for every parameter of every task.
SETTINGS = [f.name for f in dataclasses.fields(train.TrainConfig)]
EVERY_SETTING = [(None, name) for name in SETTINGS] + \
                [(task, key) for task in data.TASKS for key in data.make_task(task).params]
SETTING_IDS = [name if task is None else f"{task}-{name}" for task, name in EVERY_SETTING]


def flag(key, value):
    return f"--{key}={','.join(map(str, value)) if isinstance(value, (tuple, list)) else value}"


def fingerprint(x):
    """x with every tensor replaced by (shape, dtype, hash of its bytes): comparable with ==."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().contiguous()
        return ("tensor", tuple(x.shape), str(x.dtype), hashlib.blake2b(x.numpy().tobytes()).hexdigest())
    if isinstance(x, dict):
        return tuple(sorted(((k, fingerprint(v)) for k, v in x.items()), key=lambda kv: str(kv[0])))
    if isinstance(x, (list, tuple)):
        return tuple(fingerprint(v) for v in x)
    return x


def observe(run_dir, argv, run):
    """What the settings TINY + argv give at each destination: model, batches and schedule, or (run=True) all,
    from a tiny run trained into run_dir. A run also checks that its checkpoint records every setting and
    task parameter, and that --resume restores them."""
    cfg, overrides = command_line(TINY + argv + [f"--out_dir={run_dir}"])
    task = data.make_task(cfg.task, preset=cfg.preset, **overrides)
    seen = {"model": dataclasses.asdict(train.build_model(cfg, task).config)}
    steps = train.StepBatches(task, cfg)
    seen["batches"] = (len(steps), fingerprint([steps[s] for s in range(min(3, len(steps)))]))
    seen["schedule"] = [train.lr_multiplier(step, cfg) for step in range(12)]
    observed = dict(seen=seen, cfg=cfg, task=task, name=command_line(TINY + argv)[0].out_dir)
    if not run:
        return observed
    asked, evaluated = [], set()
    real_forward, real_evaluate = SleepLM.forward, train.evaluate

    def forward(self, idx, targets=None, **kwargs):
        if self.training:
            asked.append((kwargs.get("sleep_passes"), kwargs.get("eviction")))
        return real_forward(self, idx, targets, **kwargs)

    def evaluate(*args, **kwargs):
        call = inspect.signature(real_evaluate).bind(*args, **kwargs).arguments
        evaluated.add((call["sleep_passes"], fingerprint(call["eval_data"])))
        return real_evaluate(*args, **kwargs)

    with mock.patch.object(SleepLM, "forward", forward), mock.patch.object(train, "evaluate", evaluate):
        result = train.train(cfg, overrides, log=lambda *a: None)
    ckpt = observed["ckpt"] = read_checkpoint(run_dir)
    seen["optimizer"] = [[{k: v for k, v in group.items() if k not in ("params", "lr")}
                          for group in opt["param_groups"]] for opt in ckpt["optimizers"]]
    seen["step"] = asked
    seen["evaluation"] = sorted(evaluated, key=repr)
    seen["training"] = (result["losses"], fingerprint(ckpt["model"]))
    assert len(result["losses"]) == cfg.max_iters and seen["evaluation"], "the run did not train and evaluate"

    saved, settings = ckpt["config"], dataclasses.asdict(cfg)
    assert saved == settings, (f"the checkpoint's settings differ from the run's: missing "
                               f"{sorted(set(settings) - set(saved))}, differing "
                               f"{sorted(k for k in saved if saved[k] != settings.get(k))}")
    assert ckpt["task"] == task.params, f"the checkpoint's task parameters {ckpt['task']} are not {task.params}"
    restored, restored_task = command_line([f"--out_dir={run_dir}", "--resume"])
    differ = [k for k in SETTINGS if k not in RUN_CONTROL_SETTINGS and getattr(restored, k) != getattr(cfg, k)]
    assert not differ, f"--resume restored other values of {differ}"
    assert data.make_task(cfg.task, preset=cfg.preset, **restored_task).params == task.params
    return observed


@pytest.fixture(scope="module")
def unchanged(tmp_path_factory):
    """observe() of the unchanged settings TINY + argv, made once per module."""
    made = {}

    def get(argv, run):
        if (tuple(argv), run) not in made:
            made[tuple(argv), run] = observe(tmp_path_factory.mktemp("unchanged"), list(argv), run)
        return made[tuple(argv), run]
    return get


def entry(task, name):
    """(value, destinations, needed settings) of a setting (task None) or a task parameter, from the tables;
    None for run control; a failure naming the table for a setting that is in none."""
    if task is None:
        if name in RUN_CONTROL_SETTINGS:
            reason, _ = RUN_CONTROL_SETTINGS[name]
            assert reason and name in resumable_with_other_values(), \
                f"--{name} is run control here, but train.py does not let a resumed run change it (RUN_CONTROL)"
            return None
        found = SETTING_DESTINATIONS.get(name)
        where = "SETTING_DESTINATIONS (another valid value and what it must change) or RUN_CONTROL_SETTINGS " \
                "(why it changes nothing that is trained or measured)"
    else:
        found = TASK_PARAMETER_DESTINATIONS.get(task, {}).get(name)
        where = f"TASK_PARAMETER_DESTINATIONS[{task!r}] (another valid value and what it must change)"
    if found is None:
        pytest.fail(f"{'--' + name if task is None else f'the {task} parameter {name}'} has no entry in the "
                    f"tests: add it to {where}")
    value, destinations, *needs = found
    unknown = set(destinations) - set(DESTINATIONS)
    assert not unknown, f"{name}: unknown destinations {unknown}; known: {sorted(DESTINATIONS)}"
    return value, set(destinations), (needs[0] if needs else {})


def check_setting(task, name, unchanged, tmp_path, run):
    """Change one setting or task parameter from the unchanged tiny settings; assert that exactly the
    destinations its table entry lists change (of those seen without a run, or of all with run=True)."""
    found = entry(task, name)
    if found is None:                                    # run control: where a value is given, nothing changes
        value, destinations, given = RUN_CONTROL_SETTINGS[name][1], set(), []
        if value is None:
            return
    else:
        value, destinations, needs = found
        given = ([] if task is None else [f"--task={task}"]) + [flag(k, v) for k, v in needs.items()]
    before = unchanged(given, run)
    value = value(before["cfg"].out_dir) if callable(value) else value
    after = observe(tmp_path, given + [flag(name, value)], run)
    what = f"--{name}={value}" + ("" if task is None else f" ({task})")
    reached = getattr(after["cfg"], name) if task is None else after["task"].params[name]
    assert str(reached) == str(value), f"{what}: the run's setting is {reached!r}"
    for where, meaning in DESTINATIONS.items():
        if where not in after["seen"]:
            continue
        changed = before["seen"][where] != after["seen"][where]
        if where in destinations:
            assert changed, f"{what} should change {where} ({meaning}), and did not"
        elif where != "training" or found is None:
            assert not changed, f"{what} changed {where} ({meaning}): list it in its entry, or stop the leak"
    if destinations & TRAINING:
        assert after["name"] != before["name"], f"{what} changes what is trained, but not the run's folder name"
    elif found is None:
        assert after["name"] == before["name"], f"{what} is run control, but it changes the run's folder name"


@pytest.mark.parametrize("task, name", EVERY_SETTING, ids=SETTING_IDS)
def test_each_setting_changes_what_its_entry_lists_of_the_model_batches_and_schedule(task, name, unchanged,
                                                                                     tmp_path):
    check_setting(task, name, unchanged, tmp_path, run=False)


@slow
@pytest.mark.parametrize("task, name", EVERY_SETTING, ids=SETTING_IDS)
def test_each_setting_changes_what_its_entry_lists_in_a_tiny_run_and_is_saved(task, name, unchanged, tmp_path):
    check_setting(task, name, unchanged, tmp_path, run=True)


def test_the_tables_name_only_settings_and_parameters_that_exist():
    tables = [*SETTING_DESTINATIONS, *RUN_CONTROL_SETTINGS]
    assert sorted(tables) == sorted(set(tables)), "a setting is both run control and a training setting"
    assert set(tables) <= set(SETTINGS), f"no such settings: {sorted(set(tables) - set(SETTINGS))}"
    assert set(TASK_PARAMETER_DESTINATIONS) <= set(data.TASKS)
    for task, table in TASK_PARAMETER_DESTINATIONS.items():
        stale = set(table) - set(data.make_task(task).params)
        assert not stale, f"{task} has no parameters {sorted(stale)}"


def test_the_seed_decides_the_initial_weights_and_the_data_order(tmp_path):
    def run(folder, seed):
        """The initial weights (learning rates 0 keep them) and the inputs each training step saw."""
        seen = []
        real_forward = SleepLM.forward

        def forward(self, idx, targets=None, **kwargs):
            if self.training:
                seen.append(idx.clone())
            return real_forward(self, idx, targets, **kwargs)

        cfg, overrides = command_line(TINY + [f"--seed={seed}", "--learning_rate=0", "--adamw_lr=0", "--max_iters=3",
                                              "--eval_interval=3", f"--out_dir={tmp_path / folder}"])
        with mock.patch.object(SleepLM, "forward", forward):
            train.train(cfg, overrides, log=lambda *a: None)
        steps = train.StepBatches(data.make_task(cfg.task, preset=cfg.preset, **overrides), cfg)
        assert len(seen) == 3 and all(torch.equal(x, steps[s][0]) for s, x in enumerate(seen)), \
            "training did not see StepBatches' batches in step order"
        return read_checkpoint(tmp_path / folder)["model"], seen

    (weights, batches), (weights_again, batches_again), (other_weights, other_batches) = \
        run("a", 0), run("b", 0), run("c", 1)
    random = [name for name, w in weights.items() if len(w.unique()) > 1]
    fixed = [name for name in weights if "norm" in name or name.endswith(".proj.weight")]   # ones, zeros
    assert random and sorted(random) == sorted(set(weights) - set(fixed)), "the seed draws every other weight"
    for name, w in weights.items():
        assert torch.equal(weights_again[name], w), f"{name}: the same seed gave other initial weights"
        assert name not in random or not torch.equal(other_weights[name], w), f"{name}: another seed, the same"
    for step, x in enumerate(batches):
        assert torch.equal(batches_again[step], x), f"step {step}: the same seed gave another batch"
        assert not torch.equal(other_batches[step], x), f"step {step}: another seed gave the same batch"


# ----------------------------------------------------------------------------------------------------
# train.py: invariants of a run


def run_for(run_dir, *argv):
    """A tiny run: (its summary, its log lines, its checkpoint)."""
    lines = []
    cfg, overrides = command_line(TINY + [f"--out_dir={run_dir}", *argv])
    result = train.train(cfg, overrides, log=lines.append)
    return result, lines, read_checkpoint(run_dir)


def without_elapsed(history):
    return [{k: v for k, v in h.items() if k != "elapsed"} for h in history]


@pytest.mark.parametrize("max_iters, eval_interval, log_interval", [(6, 3, 2), (7, 3, 2), (5, 8, 3), (3, 1, 5)])
def test_the_last_step_is_logged_evaluated_and_saved_whatever_the_intervals(max_iters, eval_interval, log_interval,
                                                                            tmp_path):
    result, lines, ckpt = run_for(tmp_path, f"--max_iters={max_iters}", f"--eval_interval={eval_interval}",
                                  f"--log_interval={log_interval}")
    steps = range(1, max_iters + 1)
    logged = [int(s) for s in re.findall(r"^step (\d+)/", "\n".join(lines), re.M)]
    evaluated = [int(s) for s in re.findall(r"^eval step (\d+) N=2 ", "\n".join(lines), re.M)]
    assert logged == [s for s in steps if s == 1 or s % log_interval == 0 or s == max_iters]
    assert evaluated == [s for s in steps if s % eval_interval == 0 or s == max_iters]
    assert [h["step"] for h in result["history"]] == evaluated
    assert len(result["losses"]) == max_iters
    assert result["final"] == {int(n): r for n, r in result["history"][-1]["eval"].items()}
    assert ckpt["step"] == max_iters, f"the checkpoint holds step {ckpt['step']}, not the last, {max_iters}"
    assert ckpt["losses"] == result["losses"] and ckpt["history"] == result["history"]


@slow
@pytest.mark.parametrize("first, total, log_interval", [(3, 9, 4), (4, 6, 4), (2, 3, 5)])
def test_a_run_logs_its_first_step_at_once_then_every_interval_and_its_last(first, total, log_interval, tmp_path):
    run_for(tmp_path, f"--max_iters={first}", f"--eval_interval={first}")
    lines = []
    cfg, overrides = command_line([f"--out_dir={tmp_path}", "--resume", f"--max_iters={total}",
                                   f"--log_interval={log_interval}"])
    train.train(cfg, overrides, log=lines.append)
    step_lines = [line for line in lines if line.startswith("step ")]
    logged = [int(re.match(r"step (\d+)/", line)[1]) for line in step_lines]
    steps = range(first + 1, total + 1)         # a resumed process's first step is its own first line
    assert logged == [s for s in steps if s == first + 1 or s % log_interval == 0 or s == total]
    # the first line's time holds the start-up: it says so instead of an eta; every later line has one
    assert step_lines[0].endswith("| first step: eta from the next line") or total == first + 1
    assert all(re.search(r"\| eta [\d.]+ min$", line) for line in step_lines[1:])
    assert re.search(r"\| eta 0\.0 min$", step_lines[-1])


def check_resume_extends_as_one_run(first, eval_interval, tmp_path, total=8):
    # A flat learning rate after the warm-up: the cosine decay is stretched over max_iters, so only then is a
    # run extended from `first` to `total` steps the same as a run of `total` steps from the start.
    flat = ["--min_lr_frac=1", f"--eval_interval={eval_interval}", "--log_interval=1"]
    whole, _, whole_ckpt = run_for(tmp_path / "whole", *flat, f"--max_iters={total}")
    part, _, _ = run_for(tmp_path / "part", *flat, f"--max_iters={first}")
    lines = []
    cfg, overrides = command_line([f"--out_dir={tmp_path / 'part'}", "--resume", f"--max_iters={total}"])
    resumed = train.train(cfg, overrides, log=lines.append)
    ckpt = read_checkpoint(tmp_path / "part")
    assert next(line for line in lines if line.startswith("step ")).startswith(f"step {first + 1}/{total} ")
    assert resumed["losses"][:first] == part["losses"]
    assert resumed["losses"] == whole["losses"]                     # float equality: bitwise the same run
    assert fingerprint(ckpt["model"]) == fingerprint(whole_ckpt["model"])
    assert fingerprint(ckpt["optimizers"]) == fingerprint(whole_ckpt["optimizers"])
    assert ckpt["step"] == total and ckpt["history"][-1]["step"] == total
    # the same evaluations, and the shorter run's own last one where it ended
    expected = sorted(without_elapsed(whole["history"]) + ([] if first % eval_interval == 0
                                                          else without_elapsed(part["history"][-1:])),
                      key=lambda h: h["step"])
    assert without_elapsed(resumed["history"]) == expected


@slow
def test_resume_with_a_larger_max_iters_continues_as_one_run_of_that_length(tmp_path):
    check_resume_extends_as_one_run(5, 3, tmp_path)       # 5 is no multiple of the evaluation interval


@slow
@pytest.mark.parametrize("first, eval_interval", [(4, 6), (6, 3)])
def test_resume_extends_a_run_shorter_than_its_eval_interval_or_ending_on_an_evaluation(first, eval_interval,
                                                                                         tmp_path):
    check_resume_extends_as_one_run(first, eval_interval, tmp_path)


# ----------------------------------------------------------------------------------------------------
# The tables of a sweep and of scripts/fig2.py: mean and sample standard deviation (n - 1) over seeds


def cell_numbers(cell):
    """'0.500 ± 0.125 (...)' -> (0.5, 0.125); '0.500' or '0.500 (seed 0)' -> (0.5, None)."""
    m = re.match(r"\s*([\d.]+)(?: ± ([\d.]+))?", cell)
    return float(m[1]), (float(m[2]) if m[2] else None)


def assert_printed(printed, value, what):
    assert abs(printed - value) <= 0.0005 + 1e-9, f"{what}: the table says {printed:.3f}, numpy {value:.6f}"


def fig2_module():
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2
    return fig2


def test_the_tables_report_the_mean_and_the_sample_std_over_seeds():
    # three seeds whose sample std (n - 1) and population std (n) differ in the third decimal
    values = {1: [[0.25, 1.0], [0.5, 0.75], [1.0, 0.5]], 2: [[0.125, 0.0], [0.125, 0.0], [0.0, 0.25]]}
    task = data.make_task("rule110", levels=(2, 4))
    runs = [dict(sleep_passes=n, seed=seed, final={lv: {"exact": v, "item": v} for lv, v in zip(task.levels, row)},
                 elapsed=60.0) for n, rows in values.items() for seed, row in enumerate(rows)]
    table = {line.split("|")[1].strip(): line.split("|")[2:4]
             for line in results_table(task, runs).splitlines()[2:]}
    fig2 = fig2_module()
    for n, rows in values.items():
        for level, column in enumerate(np.array(rows).T):
            mean, std = cell_numbers(table[str(n)][level])
            assert_printed(mean, column.mean(), f"results table N={n} mean")
            assert_printed(std, column.std(ddof=1), f"results table N={n} std")
            fig2_mean, fig2_std = fig2.stats(column.tolist())
            assert fig2_mean == pytest.approx(column.mean()) and fig2_std == pytest.approx(column.std(ddof=1))
    assert fig2.stats([0.5]) == (0.5, 0.0)


@slow
def test_a_sweeps_table_and_fig2_agree_with_numpy_on_the_runs_numbers(tmp_path, capsys):
    # one t trained and evaluated, as a cell of fig2's grid; levels 2 and 4 evaluated, for the sweep's table
    argv = [*TINY, "--max_iters=3", "--eval_interval=3", "--eval_examples=16", "--t_min=2", "--t_max=2",
            "--levels=2,4", "--sweep=1,2", "--seeds=0,1,2", f"--out_dir={tmp_path / 'sweep'}"]
    train.main(argv)
    task = data.make_task("rule110", t_min=2, t_max=2, levels=(2, 4))
    accuracy = {(n, seed): read_checkpoint(tmp_path / "sweep" / f"N{n}_seed{seed}")["history"][-1]["eval"][str(n)]
                for n in (1, 2) for seed in (0, 1, 2)}
    table = {line.split("|")[1].strip(): line.split("|")[2:4]
             for line in (tmp_path / "sweep" / "results.md").read_text().splitlines()[2:]}
    fig2 = fig2_module()
    fig2.main([f"--root={tmp_path / 'sweep'}", "--steps=3", f"--out={tmp_path / 'fig2'}"])
    grid = {line.split("|")[1].strip(): line.split("|")[2]
            for line in (tmp_path / "fig2.md").read_text().splitlines()[2:] if line.startswith("| ")}
    apart = 0.0
    for n in (1, 2):
        for i, level in enumerate(task.levels):
            column = np.array([accuracy[n, seed][level][task.metric] for seed in (0, 1, 2)])
            mean, std = cell_numbers(table[str(n)][i])
            assert_printed(mean, column.mean(), f"results.md N={n} t={level} mean")
            assert_printed(std, column.std(ddof=1), f"results.md N={n} t={level} std")
            apart = max(apart, column.std(ddof=1) - column.std(ddof=0))
            if level == 2:
                mean, std = cell_numbers(grid[str(n)])
                assert_printed(mean, column.mean(), f"fig2 N={n} mean")
                assert_printed(std, column.std(ddof=1), f"fig2 N={n} std")
                assert f"({' / '.join(f'{v:.3f}' for v in column)})" in grid[str(n)]
    assert apart > 0.002, "the seeds scored too alike to tell n - 1 from n in the standard deviation"


# ----------------------------------------------------------------------------------------------------
# bench.py must keep running: its --quick mode produces every row with finite numbers (no timing asserted)


@slow
def test_quick_bench_produces_every_row_with_finite_numbers_one_thread_and_each_line_as_it_comes(tmp_path):
    # As a user runs it, output redirected to a file (run_redirected: no PYTHONUNBUFFERED, no OMP_NUM_THREADS):
    # one thread by default (two OpenMP threads on a shared 2-core machine can stall for seconds per step),
    # each line in the file as it is printed, and nothing on stderr but bench's own progress lines.
    out = tmp_path / "bench.json"
    seen = run_redirected(["bench.py", "--quick", "--device=cpu", "--peak_tflops=1", f"--json={out}"],
                          tmp_path / "out.txt", tmp_path / "err.txt")
    assert_lines_as_they_come_and_one_thread(seen, (tmp_path / "out.txt").read_text())
    stray = [line for line in (tmp_path / "err.txt").read_text().splitlines() if not line.startswith("bench: ")]
    assert not stray, stray[:5]
    rows = json.loads(out.read_text())["rows"]
    counts = {}
    for r in rows:
        counts[r["section"]] = counts.get(r["section"], 0) + 1
    # rule: 3 rows per T (2 T in --quick) + the agreement check; train: N=1,2,4 + AAAA per task;
    # wake: 4 positions x 2 models + the sleep; memory: 3 methods x 3 N; compile: one row (n/a in --quick).
    assert counts == {"rule": 7, "train": 8, "wake": 9, "memory": 9, "compile": 1}
    for r in rows:
        if r["section"] == "compile":
            assert r["value"] is None and r["reason"]
            continue
        numbers = [r["value"]] + ([r["ratio"]] if r["ratio"] is not None else []) + \
                  ([r["tokens_per_s"]] if "tokens_per_s" in r else [])
        assert all(isinstance(x, float) and math.isfinite(x) and x >= 0 for x in numbers), r
        if r["section"] == "train":   # MFU = counted FLOPs / time / the 1 TFLOP/s given
            assert r["mfu"] == pytest.approx(r["flops"] / (r["value"] / 1e3) / 1e12) and 0 < r["mfu"] < 1, r
    assert max(r["value"] for r in rows if r["section"] == "rule" and r["unit"] == "abs diff") < 1e-4


@slow
def test_bench_counts_the_flops_of_every_pass_and_of_backward():
    """bench.py's MFU numerator: matmul FLOPs of forward + backward, linear in N (each pass re-runs the
    blocks over the consolidated window), about 3x those of forward alone, and no optimizer FLOPs."""
    import bench
    from torch.utils.flop_counter import FlopCounterMode
    task = data.make_task("depo")
    idx, targets, _ = (torch.as_tensor(x) for x in task.train_batch(2, 0))
    flops = [bench.training_step(bench.preset_model(task.vocab_size, task.window, torch.device("cpu"),
                                                    sleep_passes=n), idx, targets).flops() for n in (1, 2, 3)]
    assert flops[2] - flops[1] == pytest.approx(flops[1] - flops[0], rel=0.02)
    model = bench.preset_model(task.vocab_size, task.window, torch.device("cpu"), sleep_passes=1)
    with FlopCounterMode(display=False) as forward_only, torch.no_grad():
        model(idx, targets)
    assert 2.5 < flops[0] / forward_only.get_total_flops() < 3.5


# ----------------------------------------------------------------------------------------------------
# probe.py: linear read-outs of the fast weights S, pass by pass


def synthetic_probe_case(n_classes, seed=0, examples=600, variables=4, columns=2, missing=0.0, noise=0.3):
    """Labels (B, V, C) and an S (B, 2, 4, 8) that holds a random linear code of their one-hot form plus
    Gaussian noise, offset and scaled per feature; a fraction `missing` of the labels is -1 (not scored),
    as for Depo's absent names."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (examples, variables, columns), generator=g)
    labels[torch.rand(labels.shape, generator=g) < missing] = -1
    code = torch.randn(variables * columns * n_classes, 64, generator=g, dtype=torch.float64)
    S = probe.one_hot(labels.flatten(1), n_classes) @ code + noise * torch.randn(examples, 64, generator=g,
                                                                                   dtype=torch.float64)
    S = 3 + S * torch.rand(64, generator=g, dtype=torch.float64)     # features with a mean and unequal scales
    order = torch.randperm(examples, generator=g)
    split = (order[examples // 3:], order[:examples // 3])
    return labels, S.view(examples, 2, 4, 8).flatten(1), split


@pytest.mark.parametrize("n_classes, missing", [(2, 0.0), (5, 0.3)])
def test_probe_readout_recovers_targets_linearly_coded_in_a_synthetic_s(n_classes, missing):
    labels, S, split = synthetic_probe_case(n_classes, missing=missing)
    item = probe.Item(window=0, labels=labels)
    results = probe.probe_states({0: [S]}, S, [item], split, n_classes, val_frac=0.25)
    for row in ("pass 1", "carried to query"):
        accuracy = results[row]["real"]
        assert accuracy.shape == (1, 4, 2) and accuracy.min() > 0.97, (row, accuracy)
    chance = probe.majority_rate(labels[split[1]].flatten(1), n_classes)
    assert chance.max() < 0.7


@pytest.mark.parametrize("n_classes, missing", [(2, 0.0), (5, 0.3)])
def test_probe_readout_of_shuffled_targets_scores_chance(n_classes, missing):
    labels, S, split = synthetic_probe_case(n_classes, missing=missing)
    shuffle = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(1))
    results = probe.probe_states({0: [S]}, S, [probe.Item(window=0, labels=labels)], split, n_classes,
                                 val_frac=0.25, shuffle=shuffle)
    assert results["pass 1"]["real"].min() > 0.97          # the same S and split hold the real targets
    shuffled = results["pass 1"]["shuffled"].nanmean().item()
    assert abs(shuffled - 1 / n_classes) < 0.06, shuffled


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_probe_collects_after_the_last_pass_the_s_that_forward_carries_into_the_next_window(eviction):
    model = tiny_model(eviction=eviction)                   # AGAG, L = 8, N = 3, float64
    idx = tokens(3, 28)
    targets = torch.full_like(idx, -1)
    targets[:, 25:] = idx[:, 25:]                           # windows 0-2 consolidate, 24-27 predicts
    carried_by_forward = []
    process_window = model.process_window

    def recording(*args, **kwargs):                         # forward's own windows, S as it leaves each
        logits, state = process_window(*args, **kwargs)
        carried_by_forward.append(state.S)
        return logits, state

    model.process_window = recording
    with torch.no_grad():
        model(idx, targets)
    del model.process_window                                # the model's own method again
    passes, carried = probe.collect_states(model, idx, targets, windows=[0, 1, 2], blocks=[1, 3], batch_size=2)

    def flat(S):
        return torch.cat([S[1].flatten(1), S[3].flatten(1)], dim=1)

    for w in range(3):
        assert len(passes[w]) == 3
        assert_close(passes[w][-1], flat(carried_by_forward[w]), what=f"window {w}, pass 3")
        assert (passes[w][0] - passes[w][-1]).abs().max() > 1e-3   # the passes do write into S
    assert_close(carried, flat(carried_by_forward[2]), what="S carried to the prediction window")


def test_probe_rule110_rollout_agrees_with_the_task_and_the_rule_table():
    cells = torch.randint(0, 2, (64, 11), generator=torch.Generator().manual_seed(0))
    rollout = probe.rule110_rollout(cells, 5)
    expected = cells.numpy()
    for j in range(6):
        assert (rollout[:, j].numpy() == expected).all(), j
        expected = data.rule110_step(expected)
    assert rollout[0, 1].tolist() == [int(c) for c in rule110_after("".join(map(str, cells[0].tolist())), 1)]


@pytest.fixture(scope="module")
def probe_runs(tmp_path_factory):
    """Tiny trained runs (4 steps each) to probe: rule110 at N = 2 and N = 1, rule110 with two states of 8 cells,
    depo and math, at N = 2."""
    runs = {}
    for name, extra in {"rule110": ["--task=rule110"], "rule110_N1": ["--task=rule110", "--sleep_passes=1"],
                        "rule110_K2": ["--task=rule110", "--states=2", "--width=8"],
                        "depo": ["--task=depo"], "math": ["--task=math"]}.items():
        folder = tmp_path_factory.mktemp(name)
        cfg, overrides = smoke_config(folder, *extra)
        train.train(cfg, overrides, log=lambda *a: None)
        runs[name] = folder
    return runs


def probe_table_rows(text):
    """{row label: [numbers]} of every markdown table row in text."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[1:] and re.fullmatch(r"[\d.na]+", cells[1]):
            rows.setdefault(cells[0], []).append([float(c) for c in cells[1:]])
    return rows


@slow
@pytest.mark.parametrize("run, columns", [("rule110", 9), ("rule110_K2", 9), ("depo", 2)])
def test_probe_end_to_end_on_a_trained_checkpoint_writes_a_table(probe_runs, tmp_path, run, columns):
    md = tmp_path / "probe.md"
    summaries = probe.main([f"--out_dir={probe_runs[run]}", "--examples=64", f"--md={md}", "--png="],
                           log=lambda *a: None)
    assert summaries[0]["N"] == 2 and summaries[0]["test"] == 16
    rows = probe_table_rows(md.read_text())
    expected = ["pass 1", "pass 2", "carried to query", "untrained model, pass 1", "untrained model, carried to query",
                "shuffled targets, pass 2", "chance (majority class)"]
    assert all(label in rows for label in expected), sorted(rows)
    if run == "rule110_K2":                             # the S carried to the query, read for each state
        assert "carried to query, state 1" in rows and "untrained model, carried to query, state 2" in rows
    panels = 1 if run == "depo" else 2                  # rule110: the first cell, and every cell
    for label, tables in rows.items():
        assert len(tables) == panels and all(len(values) == columns for values in tables), label
        assert all(0 <= v <= 1 for values in tables for v in values if not math.isnan(v)), label
    if run != "rule110_K2":   # one item, read after the last window's pass 2: the S carried to the query
        assert rows["pass 2"] == rows["carried to query"]


@slow
def test_probe_compare_draws_n1_beside_n2_in_one_figure(probe_runs, tmp_path):
    pytest.importorskip("matplotlib")
    png, md = tmp_path / "probe.png", tmp_path / "probe.md"
    summaries = probe.main([f"--out_dir={probe_runs['rule110_N1']}", f"--compare={probe_runs['rule110']}",
                            "--examples=48", f"--md={md}", f"--png={png}"], log=lambda *a: None)
    assert [s["N"] for s in summaries] == [1, 2]
    assert md.read_text().count("### rule110") == 2 and png.stat().st_size > 10_000
    assert "pass 2" not in probe_table_rows(md.read_text().split("### ")[1])


@slow
def test_probe_outputs_never_replace_one_another_silently(probe_runs, tmp_path):
    """A run's probe and its comparison with another write different files, beside the probed run; a probe
    that would replace a file stops before any work, naming --md / --png and --overwrite=1."""
    a, b = tmp_path / "sweep" / "N1_seed0", tmp_path / "sweep" / "N2_seed0"
    shutil.copytree(probe_runs["rule110_N1"], a)
    shutil.copytree(probe_runs["rule110"], b)
    quiet = {"log": lambda *x: None}
    probe.main([f"--out_dir={a}", "--examples=32", "--png="], **quiet)
    alone = (a / "probe.md").read_text()
    probe.main([f"--out_dir={a}", f"--compare={b}", "--examples=32", "--png="], **quiet)
    assert (a / "probe.md").read_text() == alone and (a / "probe_vs_N2_seed0.md").read_text().count("### ") == 2
    with pytest.raises(ValueError, match=r"probe\.md is already there: --md=PATH writes elsewhere, --overwrite=1 "):
        probe.main([f"--out_dir={a}", "--examples=16", "--png="], **quiet)
    assert (a / "probe.md").read_text() == alone
    (a / "probe.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"probe\.png is already there: --png=PATH writes elsewhere"):
        probe.main([f"--out_dir={a}", "--examples=16", "--md="], **quiet)
    probe.main([f"--out_dir={a}", "--examples=16", "--png=", "--overwrite=1"], **quiet)
    assert (a / "probe.md").read_text() != alone                    # 16 examples, not 32: replaced as asked
    # the automatic names of every probe of two runs, siblings or not, are all different
    names = [probe.parse_args([f"--out_dir={x}"] + ([f"--compare={y}"] if y else []))
             for x, y in [(a, None), (b, None), (a, b), (b, a), (a, tmp_path / "elsewhere" / "N2_seed0")]]
    assert len({(n.md, n.png) for n in names} | {(n.png, n.md) for n in names}) == 2 * len(names)


@slow
def test_a_sweep_never_replaces_another_sweeps_results_and_the_scripts_never_their_tables(tmp_path, capsys):
    cfg, overrides = smoke_config(tmp_path, "--sweep=2")
    runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    written = (tmp_path / "results.md").read_text()
    for extra in (["--n_embd=8"], ["--task=depo"], ["--max_nodes=4", "--task=depo"]):   # other settings: refused
        cfg, overrides = smoke_config(tmp_path, "--sweep=1", *extra)
        with pytest.raises(ValueError, match=r"results\.json holds the results of another sweep \(--.*--out_dir=DIR"):
            runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    assert (tmp_path / "results.md").read_text() == written and not (tmp_path / "N1_seed0").exists()
    cfg, overrides = smoke_config(tmp_path, "--sweep=1")      # a part of the same sweep: its own name
    runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    assert (tmp_path / "results.md").read_text() == written
    assert "| 1 |" in (tmp_path / "results_N1_seeds0.md").read_text()
    cfg, overrides = smoke_config(tmp_path, "--sweep=1,2")    # holds every run of it: replaces it
    runs.sweep(cfg, overrides, train.train, log=lambda *a: None)
    assert "| 1 |" in (tmp_path / "results.md").read_text() and "| 2 |" in (tmp_path / "results.md").read_text()
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2
    import fig2b
    for script in (fig2, fig2b):                   # refused before any work: before reading the record
        out = tmp_path / script.__name__
        out.with_suffix(".md").write_text("mine\n")
        with pytest.raises(SystemExit, match=r"fig2b?\.md is already there: --out=NAME writes elsewhere, "
                                             r"--overwrite replaces it"):
            script.main([f"--record={tmp_path / 'no.csv'}", f"--out={out}"])
        assert out.with_suffix(".md").read_text() == "mine\n"
    fig2.main([f"--record={HERE / 'docs' / 'fig2_runs.csv'}", f"--out={tmp_path / 'fig2'}", "--overwrite"])
    assert (tmp_path / "fig2.md").read_text() != "mine\n"


@pytest.mark.parametrize("argv, message", [
    (["--examples=8"], "--examples must be >= 16"),
    (["--test_frac=1.5"], "--test_frac must be between 0 and 1"),
    (["--block=first"], "--block must be all or the index of a GDN block"),
    (["--block=0"], r"--block=0 is not a GDN block of this model \(layers AG\); allowed: all or one of \[1\]"),
    (["--colour=red"], "unknown setting --colour"),
    (["--examples=many"], "--examples expects an integer"),
    ([], r"holds a math run: the probe supports rule110 and depo"),
    (["--compare=depo"], "--compare=.* holds another task than --out_dir"),
    (["--compare=/nonexistent"], "no ckpt.pt in /nonexistent"),
])
def test_probe_refuses_bad_input_with_a_value_error_naming_the_setting(probe_runs, argv, message):
    run = probe_runs["math"] if not argv else probe_runs["rule110"]
    argv = [a.replace("=depo", f"={probe_runs['depo']}") for a in argv]
    with pytest.raises(FileNotFoundError if "ckpt.pt" in message else ValueError, match=message):
        probe.main([f"--out_dir={run}", "--examples=32", "--md=", "--png="] + argv, log=lambda *a: None)


# ----------------------------------------------------------------------------------------------------
# probe.py and bench.py: threads and output as train.py's (runs.py)


def run_redirected(argv, out, err):
    """`python ARGV` as a user runs it with its output redirected to a file: no PYTHONUNBUFFERED, and no
    OMP_NUM_THREADS (torch's own default would then be one thread per core). Returns the first text found
    in the file while the process still ran ("" if none), once it has ended (exit 0)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONUNBUFFERED", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with open(out, "w") as stdout, open(err, "w") as stderr:
        process = subprocess.Popen([sys.executable, *argv], cwd=HERE, env=env, stdout=stdout, stderr=stderr)
    seen, deadline = "", time.monotonic() + 900                  # a hang guard only
    try:
        while time.monotonic() < deadline:
            text = out.read_text()
            if process.poll() is not None:
                break
            seen = seen or text                                   # read before the process was seen running
            time.sleep(0.02)
        assert process.wait(timeout=60) == 0, err.read_text()[-3000:]
    finally:
        process.kill()
    return seen


def assert_lines_as_they_come_and_one_thread(seen, final):
    # block-buffered, the whole output (a few KB) would reach the file only when the process ends
    assert seen.count("\n") >= 1 and final.startswith(seen) and final.count("\n") > seen.count("\n"), (seen, final)
    assert re.search(r"\b1 threads?\b", final.splitlines()[0]), final.splitlines()[0]   # not torch's one per core


@slow
def test_probe_uses_one_thread_and_prints_each_line_as_it_comes_into_a_file(probe_runs, tmp_path):
    # (bench.py's run of the same check is test_quick_bench_produces_every_row_...: one process for both)
    out = tmp_path / "out.txt"
    seen = run_redirected(["probe.py", f"--out_dir={probe_runs['rule110']}", "--examples=256", "--device=cpu",
                           f"--md={tmp_path / 'probe.md'}", "--png="], out, tmp_path / "err.txt")
    assert_lines_as_they_come_and_one_thread(seen, out.read_text())


# ----------------------------------------------------------------------------------------------------
# probe.py: the fit and test splits, the majority baseline, a planted linear code


def quiet_run(folder, *extra):
    """A run folder of train.py after one step (the probe reads the split and S, not what was learned)."""
    cfg, overrides = smoke_config(folder, *extra, "--max_iters=1", "--eval_interval=1", "--log_interval=1",
                                  "--warmup_iters=0")
    train.train(cfg, overrides, log=lambda *a: None)
    return folder


def recorded_probe_run(monkeypatch, out_dir, examples):
    """probe_run on out_dir, recording the examples it read S from and the (fit, test) splits it fitted on."""
    seen = {"idx": [], "splits": []}
    collect_states, probe_states = probe.collect_states, probe.probe_states

    def collect_recording(model, idx, targets, *args, **kwargs):
        seen["idx"].append(idx)
        return collect_states(model, idx, targets, *args, **kwargs)

    def probe_recording(passes, carried, items, split, *args, **kwargs):
        seen["splits"].append(split)
        return probe_states(passes, carried, items, split, *args, **kwargs)

    monkeypatch.setattr(probe, "collect_states", collect_recording)
    monkeypatch.setattr(probe, "probe_states", probe_recording)
    cfg = probe.parse_args([f"--out_dir={out_dir}", f"--examples={examples}", "--md=", "--png="])
    return probe.probe_run(out_dir, cfg, log=lambda *a: None), seen


@pytest.mark.parametrize("extra", [
    ("--task=rule110", "--width=8"),                 # 256 states: the evaluation draws repeat states
    ("--task=depo", "--max_nodes=4", "--name_tokens=5", "--max_hops=2", "--levels=1,2", "--queries=2",
     "--query_len=8"),                               # few graphs: the evaluation draws repeat graphs
])
def test_probe_fit_and_test_splits_share_no_consolidated_input(tmp_path, monkeypatch, extra):
    summary, seen = recorded_probe_run(monkeypatch, quiet_run(tmp_path, *extra), examples=64)
    task = summary["task"]
    consolidated = task.params["graph_len"] if task.name == "depo" else task.params["states"] * task.params["width"]
    # what the evaluation stream gives at these sizes holds repeated consolidated inputs
    drawn = torch.cat([task.eval_set(level, 64 // len(task.levels) + 1)[0] for level in task.levels])
    assert len({tuple(row) for row in drawn[:, :consolidated].tolist()}) < len(drawn)
    idx = seen["idx"][0]
    assert all(torch.equal(other, idx) for other in seen["idx"])     # trained and untrained read the same rows
    assert torch.from_numpy(task.in_eval_split(idx)).all()          # held out: never trained on
    assert len(seen["splits"]) == 2                                  # trained, untrained: one split for both
    for fit, test in seen["splits"]:
        assert torch.equal(fit, seen["splits"][0][0]) and torch.equal(test, seen["splits"][0][1])
        assert len(set(fit.tolist())) == len(fit) and len(set(test.tolist())) == len(test)
        assert set(fit.tolist()).isdisjoint(test.tolist())
        assert sorted(fit.tolist() + test.tolist()) == list(range(len(idx)))
        assert len(test) == round(0.25 * len(idx)) and (summary["fit"], summary["test"]) == (len(fit), len(test))
        fit_inputs = {tuple(row) for row in idx[fit, :consolidated].tolist()}
        test_inputs = {tuple(row) for row in idx[test, :consolidated].tolist()}
        assert fit_inputs.isdisjoint(test_inputs), "an input the read-outs are scored on was fitted on"
        assert len(fit_inputs) == len(fit)         # nor twice in the fit split (its validation part is one of them)
    if task.name == "depo":                        # the probed names are chosen from the fit split's graphs only
        fit_rows = idx[seen["splits"][0][0]]
        in_fit_graphs = {source for row in fit_rows for source, _ in depo_edges(task, task.decode(row).split())[1]}
        assert summary["names"] and set(summary["names"]) <= in_fit_graphs


def planted_case(n_classes, seed, examples=800, features=24, variables=4, noise=0.1):
    """Features X (standard normal, then offset and scaled per feature) and labels (B, V, 1) read from a
    fixed linear map of X plus noise: for bits, whether the map exceeds half its scale (about 30% ones);
    for more classes, the argmax of n_classes maps, the last one favoured (an unbalanced target)."""
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(examples, features, generator=g, dtype=torch.float64)
    maps = torch.randn(features, variables, n_classes, generator=g, dtype=torch.float64)
    scale = maps.norm(dim=0)                                                        # (V, C)
    scores = torch.einsum("bf,fvc->bvc", Z, maps)
    scores = scores + noise * scale * torch.randn(scores.shape, generator=g, dtype=torch.float64)
    if n_classes == 2:
        labels = (scores[..., 0] > 0.5 * scale[:, 0]).long()
    else:
        labels = (scores + torch.tensor([0.0] * (n_classes - 1) + [0.7]) * scale).argmax(-1)
    X = 3 + Z * (0.5 + torch.rand(features, generator=g, dtype=torch.float64))
    order = torch.randperm(examples, generator=g)
    split = (order[examples // 4:], order[:examples // 4])
    return X, labels[..., None], split, torch.randperm(len(split[0]), generator=g)


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("seed", [0, 1])
def test_probe_readout_recovers_a_planted_linear_code_and_shuffled_targets_stay_at_chance(n_classes, seed):
    X, labels, split, shuffle = planted_case(n_classes, seed)
    results = probe.probe_states({0: [X]}, X, [probe.Item(window=0, labels=labels)], split, n_classes,
                                 val_frac=0.25, shuffle=shuffle)
    majority = probe.majority_rate(labels[split[1]].flatten(1), n_classes)        # (V,)
    assert 0.4 < majority.min() and majority.max() < 0.8                          # unbalanced, not trivial
    for row in ("pass 1", "carried to query"):
        real, shuffled = results[row]["real"].flatten(), results[row]["shuffled"].flatten()
        assert real.min() > (0.88 if n_classes == 2 else 0.8) and (real - majority).min() > 0.15, (row, real, majority)
        assert (shuffled - majority).abs().max() < 0.06, (row, shuffled, majority)


def test_probe_readout_scores_the_majority_rate_on_features_that_carry_nothing():
    g = torch.Generator().manual_seed(0)
    examples, features = 600, 16
    X = 5 + 3 * torch.randn(examples, features, generator=g, dtype=torch.float64)
    # unbalanced targets whose majority is not class 0 (a tie or a lost intercept falls back to class 0),
    # with and without unscored rows (-1, as Depo's absent names); and constant targets
    unbalanced = torch.multinomial(torch.tensor([0.15, 0.7, 0.15]), examples * 6, replacement=True,
                                   generator=g).view(examples, 6, 1)
    missing = unbalanced.clone()
    missing[torch.rand(missing.shape, generator=g) < 0.3] = -1
    constant = torch.full((examples, 6, 1), 2)
    constant[: examples // 2, 3:] = -1
    items = [probe.Item(window=0, labels=labels) for labels in (unbalanced, missing, constant)]
    order = torch.randperm(examples, generator=g)
    split = (order[examples // 4:], order[:examples // 4])
    shuffle = torch.randperm(len(split[0]), generator=g)
    results = probe.probe_states({0: [X]}, X, items, split, n_classes=3, val_frac=0.25, shuffle=shuffle)
    for kind in ("real", "shuffled"):
        for i, item in enumerate(items):
            test_labels = item.labels[split[1]].flatten(1)
            majority = probe.majority_rate(test_labels, 3)
            for v in range(test_labels.shape[1]):          # an independent count of the majority rate
                counts = collections.Counter(x for x in test_labels[:, v].tolist() if x >= 0)
                assert abs(majority[v].item() - max(counts.values()) / sum(counts.values())) < 1e-12
            accuracy = results["pass 1"][kind][i].flatten()
            assert (accuracy - majority).min() > -0.03 and (accuracy - majority).mean() > -0.01, (kind, i, accuracy)
            assert (accuracy - majority).max() < 0.05, (kind, i, accuracy)
    assert (results["pass 1"]["real"][2] == 1).all()        # a constant target: every scored test row right


def test_probe_readout_predicts_each_test_row_from_the_fit_rows_alone():
    """A test row's prediction does not depend on which other test rows are scored with it (no statistics of
    the test split enter the read-out)."""
    X, labels, split, _ = planted_case(3, seed=3, noise=1.0)
    fit, test = split
    groups = torch.arange(labels.shape[1])
    guesses, _ = probe.readout_predictions(X[fit], labels[fit].flatten(1), X[test], 3, groups, 0.25)
    part = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:17]
    some, _ = probe.readout_predictions(X[fit], labels[fit].flatten(1), X[test][part], 3, groups, 0.25)
    assert torch.equal(some, guesses[part])
    other_rows, _ = probe.readout_predictions(X[fit], labels[fit].flatten(1), X[test][part].flip(1), 3, groups, 0.25)
    assert not torch.equal(other_rows, some)       # and the prediction does read the row itself


# ----------------------------------------------------------------------------------------------------
# data.py, Rule 110: the answers are the rollout of each state, one state per window


# ----------------------------------------------------------------------------------------------------
# scripts/fig2.py: the grid of one model per t and N, as a table and a figure


@slow
def test_fig2_tables_every_finished_run_by_t_and_n_and_keeps_a_record_across_sittings(tmp_path, capsys):
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2
    cell = SMOKE + ["--states=2", "--width=8", "--max_iters=4"]
    for t in (1, 2):
        for n in (1, 2):
            quiet_train(cell + [f"--out_dir={tmp_path / 'runs' / f't{t}' / f'N{n}_seed0'}", f"--sleep_passes={n}",
                                f"--t_min={t}", f"--t_max={t}", f"--levels={t}"])
    control = tmp_path / "runs" / "anywhere" / "deep"    # the folder name does not matter: the config does
    quiet_train(cell + [f"--out_dir={control}", "--sleep_passes=1", "--layer_repeat=2", "--t_min=2", "--t_max=2",
                        "--levels=2"])
    unfinished = tmp_path / "runs" / "t2" / "N3_seed0"
    quiet_train(cell + [f"--out_dir={unfinished}", "--sleep_passes=3", "--t_min=2", "--t_max=2", "--levels=2"])
    ckpt = torch.load(unfinished / "ckpt.pt", weights_only=False)
    ckpt["config"]["max_iters"] = 6                     # as if still training: left out
    torch.save(ckpt, unfinished / "ckpt.pt")
    record = tmp_path / "record.csv"                    # an earlier sitting's run, kept in the record
    record.write_text("t,N,seed,steps,layer_repeat,exact,minutes,code\n2,2,1,4,1,0.5,3.0,abc1234\n")
    fig2.main([f"--root={tmp_path / 'runs'}", f"--record={record}", "--code=def5678", "--steps=4",
               f"--out={tmp_path / 'fig2'}"])
    table = (tmp_path / "fig2.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert {"1", "2"} <= set(rows) and "3" not in rows, table     # N = 3 never finished
    exact = torch.load(tmp_path / "runs" / "t2" / "N2_seed0" / "ckpt.pt",
                       weights_only=False)["history"][-1]["eval"]["2"][2]["exact"]
    assert rows["2"].split("|")[3].strip() == f"{(exact + 0.5) / 2:.3f} ± {abs(exact - 0.5) / 2 ** 0.5:.3f} " \
                                               f"({exact:.3f} / 0.500)", table
    assert "N = 1, --layer_repeat=2 | 2 |" in rows["N = 1, --layer_repeat=2"], table
    kept = fig2.read_record(record)                     # 5 finished runs merged with the earlier one
    assert len(kept) == 6 and {r["code"] for r in kept} == {"abc1234", "def5678"}, kept
    fig2.main([f"--record={record}", "--steps=4", f"--out={tmp_path / 'again'}"])   # the record alone: same table
    assert (tmp_path / "again.md").read_text() == table
    # panel (b): the two deepest t that every N has run; a deeper t that only some N have run does not count
    grid = {(t, n): [(0, 0.5)] for t in (1, 2, 3, 4) for n in (1, 2, 4) if not (t == 4 and n == 2)}
    assert fig2.panel_b_depths(grid) == [2, 3] and fig2.panel_b_depths(grid, [4, 1]) == [1, 4]
    assert fig2.panel_b_depths({(1, 1): [(0, 1.0)], (2, 1): [(0, 1.0)], (2, 4): [(0, 1.0)]}) == [2]


def test_the_fig2_tables_in_the_docs_are_the_record_as_scripts_fig2_draws_it():
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2
    drawn = fig2.table(fig2.read_record(HERE / "docs" / "fig2_runs.csv"), 3000)
    docs = (HERE / "docs" / "results.md").read_text()
    rows = [line for line in drawn.splitlines() if line.startswith("| ")]
    assert len(rows) >= 6 and [line for line in rows if line not in docs] == [], drawn


@slow
def test_fig2b_keeps_every_evaluation_of_every_run_and_redraws_the_curves_from_the_record_alone(tmp_path):
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2
    import fig2b
    cell = SMOKE + ["--states=2", "--width=8", "--max_iters=4", "--eval_interval=2", "--t_min=2", "--t_max=2",
                    "--levels=2"]
    for n in (1, 2):
        quiet_train(cell + [f"--out_dir={tmp_path / 'runs' / f'N{n}_seed0'}", f"--sleep_passes={n}"])
    stopped = tmp_path / "runs" / "N2_seed1"            # a run stopped half way: its curve so far is kept
    quiet_train(cell + [f"--out_dir={stopped}", "--sleep_passes=2", "--seed=1", "--max_iters=2"])
    ckpt = torch.load(stopped / "ckpt.pt", weights_only=False)
    ckpt["config"]["max_iters"] = 4
    torch.save(ckpt, stopped / "ckpt.pt")
    record = tmp_path / "curves.csv"
    fig2b.main([f"--root={tmp_path / 'runs'}", f"--record={record}", "--code=abc1234", f"--out={tmp_path / 'b'}"])
    rows = fig2.read_record(record, fig2b.FIELDS)
    for n, seed, steps in ((1, 0, [2, 4]), (2, 0, [2, 4]), (2, 1, [2])):   # one row per evaluation, from the history
        history = torch.load(tmp_path / "runs" / f"N{n}_seed{seed}" / "ckpt.pt", weights_only=False)["history"]
        mine = [r for r in rows if (r["N"], r["seed"]) == (n, seed)]
        assert [r["step"] for r in mine] == steps == [h["step"] for h in history], mine
        for what in ("exact", "item"):
            assert [r[what] for r in mine] == [round(h["eval"][str(n)][2][what], 4) for h in history]
        by_answer = [h["eval"][str(n)][2]["by_answer"] for h in history]     # --states=2: two answers each
        assert all(len(b) == 2 for b in by_answer)
        assert [[float(a) for a in r["by_answer"].split()] for r in mine] == [[round(a, 4) for a in b] for b in by_answer]
    table = (tmp_path / "b.md").read_text()
    per_run, per_n = table.split("Per N:")
    assert "(at step 2, still training)" in per_run and per_run.count("still training") == 1, table
    assert "| 2 | 2 | 1 (+1 still training) |" in per_n, table
    fig2b.main([f"--record={record}", f"--out={tmp_path / 'again'}"])          # the record alone: the same table
    assert (tmp_path / "again.md").read_text() == table
    curve = [(250, 0.1, 1.0), (500, 0.6, 2.0), (750, 0.4, 3.0), (1000, 0.95, 4.0)]
    assert (fig2b.first_step(curve, 0.5), fig2b.first_step(curve, 0.9), fig2b.first_step(curve, 0.99)) == \
        (500, 1000, None)
    steps, means = fig2b.mean_curve([curve, curve[:2]])                      # only the steps every seed reached
    assert steps == [250, 500] and means == pytest.approx([0.1, 0.6])


def test_fig2b_summary_counts_finished_runs_only_and_reports_each_seeds_first_step():
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2b

    def run(n, seed, exacts, max_iters=1000):
        return [dict(t=5, N=n, seed=seed, max_iters=max_iters, step=250 * (i + 1), exact=e, item=0.5, minutes=1.0,
                     code="")
                for i, e in enumerate(exacts)]
    rows = (run(1, 0, [0.1, 0.1, 0.2, 0.2]) + run(1, 1, [0.1, 0.2, 0.2, 0.4]) +
            run(2, 0, [0.1, 0.6, 0.95, 0.9]) + run(2, 1, [0.1, 0.1, 0.5, 0.7]) + run(2, 2, [0.9, 0.9]) +
            run(3, 0, [0.5]))
    lines = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
             for line in fig2b.summary(rows).splitlines()[2:]}
    assert lines["5", "1"][2:] == ["2", "0", "0", "0: -, 1: -", "0.300 ± 0.141 (0.200-0.400)"]
    assert lines["5", "2"][2:] == ["2 (+1 still training)", "2", "1", "0: 500, 1: 750", "0.800 ± 0.141 (0.700-0.900)"]
    assert lines["5", "3"][2:] == ["0 (+1 still training)", "", "", "", ""]


def test_fig2b_draws_each_answers_curve_only_for_the_runs_whose_record_keeps_it():
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2b
    rows = [dict(t=6, N=4, seed=0, max_iters=750, step=s, exact=0.1, item=0.5, by_answer=b, minutes=1.0, code="")
            for s, b in ((500, "0.6 0.7 0.8 0.9"), (250, "0.5 0.5 0.5 0.6"))]     # out of step order
    rows += [dict(t=5, N=1, seed=0, max_iters=750, step=250, exact=0.1, item=0.5, by_answer="", minutes=1.0,
                  code="")]                                                       # an older run: no by_answer
    assert fig2b.answer_curves(rows) == {(6, 4, 0, 750): ([250, 500], [[0.5, 0.6], [0.5, 0.7], [0.5, 0.8],
                                                                        [0.6, 0.9]])}


def test_the_fig2b_table_in_the_docs_is_the_record_as_scripts_fig2b_draws_it():
    sys.path.insert(0, str(HERE / "scripts"))
    import fig2
    import fig2b
    record = fig2.read_record(HERE / "docs" / "fig2b_curves.csv", fig2b.FIELDS)
    drawn = fig2b.table(record) + "\n" + fig2b.summary(record)
    docs = (HERE / "docs" / "results.md").read_text()
    rows = [line for line in drawn.splitlines() if line.startswith("| ")]
    assert len(rows) >= 3 and [line for line in rows if line not in docs] == [], drawn


# ----------------------------------------------------------------------------------------------------
# README.md and docs/: excerpts of sleep_lm.py are its lines; every command and code block runs as written


def test_the_docs_excerpts_of_sleep_lm_are_its_current_lines():
    # A fenced text block that calls itself an excerpt (in the block or the line before it) quotes sleep_lm.py:
    # each quoted line, its comment aside, must be a line of the code as it is now ("..." skips).
    source = {line.split("  #")[0].strip() for line in (HERE / "sleep_lm.py").read_text().splitlines()}
    excerpts = 0
    for path in [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]:
        for before, block in re.findall(r"([^\n]*)\n+```text\n(.*?)```", path.read_text(), flags=re.S):
            if "excerpt" not in before + block:
                continue
            excerpts += 1
            for line in block.splitlines():
                code = line.split("  #")[0].strip()
                assert code in source or code in ("", "..."), f"{path.name}: {code!r} is not a line of sleep_lm.py"
    assert excerpts >= 2


def documented_code():
    """(file, language, code) of every fenced bash and python block: the README, then docs/ as its index lists them."""
    index = (HERE / "docs" / "README.md").read_text()
    files = ["README.md", "docs/README.md"] + [f"docs/{name}" for name in re.findall(r"\]\((\w[\w-]*\.md)\)", index)]
    assert len(files) >= 8 and all((HERE / f).exists() for f in files), files
    blocks = []
    for f in dict.fromkeys(files):
        found = re.findall(r"```(bash|python)\n(.*?)```", (HERE / f).read_text(), re.S)
        blocks += [(f, lang, code) for lang, code in found]
    return blocks


# What the docs test does not run here: installs, the GPU scripts, several processes, the paper presets (a GPU's
# work: thousands of tokens per example even when shrunk), compiled runs (a minute of compiling each on a CPU),
# the full benchmark (minutes; `bench.py --quick` has its own test) and the tests themselves.
NOT_RUN_HERE = re.compile(r"^(pip |bash scripts/|torchrun |python -m pytest )|--compile|--preset=paper"
                          r"|^python bench\.py(?!.*--quick)")


@slow
def test_every_command_and_code_block_in_the_docs_runs_as_written_after_the_quick_start(tmp_path, monkeypatch, capsys):
    """Runs each fenced command and code block of README.md and docs/, in order, from a copy of the repository
    root. The presets shrink to a few steps of a tiny model, and every --max_iters given with them by the same
    factor of 1000, so the whole chain (quick start, evaluate, resume, extend, probe, load_run, ...) takes
    seconds; sweeps run in this process (their side-by-side processes have a test of their own)."""
    for key, preset in train.PRESETS.items():
        steps = max(2, preset.get("max_iters", train.TrainConfig.max_iters) // 1000)
        monkeypatch.setitem(train.PRESETS, key, {**preset, "n_embd": 16, "n_head": 2, "batch_size": 4,
                                                 "max_iters": steps, "eval_interval": steps, "log_interval": 1,
                                                 "eval_examples": 4, "warmup_iters": 1})
    monkeypatch.setattr(runs, "sweep_parallel", lambda cfg, runs: 1)
    for name in ("sleep_lm.py", "data.py", "runs.py", "train.py", "bench.py", "probe.py"):
        (tmp_path / name).symlink_to(HERE / name)
    monkeypatch.chdir(tmp_path)
    ran, skipped = [], []
    for f, lang, code in documented_code():
        if lang == "python":
            exec(compile(code, f"{f} (python block)", "exec"), {"__name__": "__docs__"})
            ran.append(code)
            continue
        for line in code.splitlines():
            command = line.split("  #")[0].strip()
            if not command:
                continue
            if NOT_RUN_HERE.search(command):
                skipped.append(command)
                continue
            python, script, *argv = shlex.split(command)
            assert python == "python" and script.endswith(".py"), f"{f}: {command!r} is not a python script"
            argv = [re.sub(r"^--max_iters=(\d+)$", lambda m: f"--max_iters={max(2, int(m[1]) // 1000)}", a)
                    for a in argv]
            module = __import__(script[:-3])
            monkeypatch.setattr(sys, "argv", [script, *argv])
            try:
                module.main(argv) if module.main.__code__.co_argcount else module.main()
            except SystemExit as stop:
                assert stop.code in (None, 0), f"{f}: {command!r} stopped with {stop.code!r}"
            ran.append(command)
    out = capsys.readouterr().out
    assert "python train.py --task=rule110 --sweep=1,4" in ran and any("load_run" in c for c in ran), ran
    assert len(ran) >= 15 and "Traceback" not in out
    assert all(NOT_RUN_HERE.search(c) for c in skipped)


def test_numbers_the_docs_repeat_are_kept_in_one_place_and_match_their_source():
    docs = {f: (HERE / f).read_text() for f in ["README.md"] + [f"docs/{p.name}" for p in (HERE / "docs").glob("*.md")]}
    readme, perf, results = docs["README.md"], docs["docs/performance.md"], docs["docs/results.md"]
    section = lambda text, title: text.split(f"\n## {title}\n")[1].split("\n## ")[0]   # noqa: E731
    # the test suite's size and time: only under performance.md's "The test suite", which the README links to
    counts = re.compile(r"\b\d+ (tests|passed|skipped)\b(?! \d)")
    suite = section(perf, "The test suite")
    assert counts.search(suite) and "(docs/performance.md#the-test-suite)" in readme
    for f, text in docs.items():
        assert not counts.search(text.replace(suite, "")), f"{f} gives a test count: link to the test suite's"
    # the quick start's minutes per run are the ones its measurement gives
    quick = " ".join(section(perf, "The quick start").split())
    table = readme.split("python train.py --task=rule110 --sweep=1,4\n```")[1].split("```text\n")[1].split("```")[0]
    minutes = re.findall(r"^\| \d \| .* \| (\d+\.\d) \|$", table, re.M)
    assert len(minutes) == 2 and all(f"({m} minutes" in quick for m in minutes), (minutes, quick)
    # the README's results tables (mean ± std over seeds) are docs/results.md's
    rows = re.findall(r"^\| \d \| .*±.*\|$", readme, re.M)
    assert len(rows) == 7 and all(row in results for row in rows), [r for r in rows if r not in results]
    # gpu_check.sh's dry run is given once, in the script's header
    script = (HERE / "scripts" / "gpu_check.sh").read_text()
    assert re.search(r'^# EXTRA="[^"]+" bash scripts/gpu_check\.sh', script, re.M)
    assert not any(re.search(r'EXTRA="[^"]*"\s+bash\s+scripts/gpu_check', text) for text in docs.values())


def test_the_readme_task_examples_are_what_data_py_prints(capsys):
    """The example blocks under the README's "The tasks" are `python data.py TASK`'s own output, verbatim."""
    section = (HERE / "README.md").read_text().split("\n## The tasks\n")[1].split("\n## ")[0]
    blocks = re.findall(r"```text\n(difficulty .*?)```", section, re.S)
    assert len(blocks) == 3, blocks
    for name, block in zip(("rule110", "depo", "math"), blocks):
        data.main([name])
        assert block in capsys.readouterr().out, f"README's {name} example is not what data.py {name} prints"
