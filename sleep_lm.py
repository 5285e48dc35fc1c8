"""
sleep-lm: a hybrid attention + Gated DeltaNet language model that sleeps. Reference implementation of
"Do Language Models Need Sleep? Offline Recurrence for Improved Online Inference" (arXiv 2605.26099).

A Gated DeltaNet (GDN) layer keeps a matrix state S per head, the "fast weights", and writes every token into it;
attention keeps a KV cache. Once a window of L tokens is full, the model *sleeps*: it runs its blocks over that
window again, N passes in all (pass 1 is the wake pass that read the tokens), each from the previous pass's
features and the S it left. Then the KV cache and the features are dropped and only S is kept ("hard"
eviction; "sliding" also keeps the newest L - 1 tokens, "none" is one pass of full attention, an upper bound).
Prediction ("wake") stays one ordinary pass.

Read in this order: gated_delta_rule (the local rule: per-token reference, exact chunkwise form); Attention,
GatedDeltaNet, MLP, Block; SleepState (per block its context and S; evict); SleepLM.forward (Algorithm 1, the loop
every caller runs) and its steps process_window, wake_pass, sleep (the loop over passes), sleep_pass; SleepCache
(streaming: the same steps as tokens arrive). The end of the file, marked, holds what a first reading can skip: input
checks and fast paths. To change something, docs/model.md "Where to change things" says where, and which tests then
fail by design (the independent references) and which must keep passing.

Shapes: B batch, T tokens, C n_embd, V vocabulary, H heads, Dk / Dv key / value head dims, L window, N passes per
window (N = 1: no sleep), Lc chunk of the chunkwise rule (a speed device, not a window), K the GDN's conv kernel.
"""

import contextlib
import math
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

EVICTIONS = ("hard", "sliding", "none")
LAYER_KINDS = {"A": "causal attention", "G": "Gated DeltaNet"}

# -----------------------------------------------------------------------------
# The local rule: the gated delta recurrence that writes tokens into the fast weights S.

def state_dtype(x):
    """Recurrent state math runs in float32 (float64 when the model is float64, for exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def gated_delta_rule(q, k, v, log_decay, beta, *, state=None, chunk_size=None):
    """The gated delta rule, state in, state out. Per token t (K x V layout, as in flash-linear-attention):
        S <- exp(log_decay_t) S                      decay, log_decay <= 0
        S <- S + k_t (beta_t (v_t - S^T k_t))^T      delta-rule write: move S^T k_t towards v_t
        o_t = S^T q_t                                read
    q, k: (B, T, H, Dk)   v: (B, T, H, Dv)   log_decay, beta: (B, T, H)   state: (B, H, Dk, Dv) or None (zeros)
    Returns o (B, T, H, Dv) in q's dtype and the final state. chunk_size None: the per-token loop (the reference);
    Lc: the exact chunkwise-parallel form (any T). Both compute in float32 (float64 for float64 inputs), bf16
    autocast or not. No normalisation or scaling here (the layer does it). As flash-linear-attention's
    chunk_gated_delta_rule(q, k, v, g=log_decay, beta=beta, scale=1.0, initial_state=state, output_final_state=True).
    """
    check_rule_inputs(q, k, v, log_decay, beta, state, chunk_size)
    out_dtype, dtype = q.dtype, state_dtype(q)
    q, k, v, log_decay, beta = (x.to(dtype) for x in (q, k, v, log_decay, beta))
    B, T, H, Dk = q.shape
    state = (q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state).to(dtype)
    rule = _delta_rule_recurrent if chunk_size is None else _delta_rule_chunked
    with torch.autocast(q.device.type, enabled=False):   # under bf16 autocast too: matmuls in float32
        o, state = rule(q, k, v, log_decay, beta, state, chunk_size)
    return o.to(out_dtype), state


def _delta_rule_recurrent(q, k, v, log_decay, beta, S, chunk_size=None):
    """The reference: one token at a time, exactly the equations in the docstring above."""
    outputs = []
    # Unbind once: x[:, t] in the loop would make backward write a full-size gradient per token (quadratic in T).
    for q_t, k_t, v_t, g_t, beta_t in zip(*(x.unbind(1) for x in (q, k, v, log_decay, beta))):
        S = S * g_t.exp()[..., None, None]                                # (B, H, Dk, Dv)
        # S^T k_t as the row product (B, H, 1, Dk) @ (B, H, Dk, Dv): twice as fast as einsum (decoding runs this).
        error = beta_t[..., None] * (v_t - (k_t[..., None, :] @ S).squeeze(-2))
        S = S + k_t[..., :, None] * error[..., None, :]
        outputs.append((q_t[..., None, :] @ S).squeeze(-2))
    return torch.stack(outputs, dim=1), S


def _delta_rule_chunked(q, k, v, log_decay, beta, S, chunk_size):
    """The chunkwise-parallel form (WY / UT transform; Yang et al., arXiv 2412.06464, sec. 3), over chunks of Lc
    tokens. In a chunk with c_i = sum_{j<=i} log_decay_j, unrolling from the chunk's initial state S0 gives
    S_i = e^{c_i} S0 + sum_{j<=i} e^{c_i - c_j} k_j u_j^T, where the new values u_j = beta_j (v_j - (e^{log_decay_j}
    S_{j-1})^T k_j) solve the unit lower-triangular system
        (I + diag(beta) A) u = diag(beta) V - diag(beta e^c) K S0,   A_ij = e^{c_i - c_j} k_i.k_j (j < i).
    So u = U - W S0 with [U, W] = (I + diag(beta) A)^{-1} [diag(beta) V, diag(beta e^c) K]: one batched solve for
    all chunks; only the cheap state hand-off runs chunk after chunk."""
    (B, T, H, Dk), Dv = q.shape, v.shape[-1]
    Lc = min(chunk_size, T)
    pad = -T % Lc
    if pad:  # padded tokens have k = v = q = 0, beta = 0, log_decay = 0: they leave S unchanged
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        log_decay, beta = (F.pad(x, (0, 0, 0, pad)) for x in (log_decay, beta))
    n = (T + pad) // Lc
    # contiguous once: the batched matmuls below would otherwise each copy the permuted q and k
    q, k, v = (x.reshape(B, n, Lc, H, -1).permute(0, 3, 1, 2, 4).contiguous() for x in (q, k, v))  # (B, H, n, Lc, D)
    log_decay, beta = (x.reshape(B, n, Lc, H).permute(0, 3, 1, 2) for x in (log_decay, beta))  # (B, H, n, Lc)
    c = log_decay.cumsum(-1)                                              # (B, H, n, Lc)
    gap = c[..., :, None] - c[..., None, :]                               # c_i - c_j, (B, H, n, Lc, Lc)
    causal = torch.ones(Lc, Lc, dtype=torch.bool, device=q.device).tril()   # masked before exp, which could overflow
    decay = gap.masked_fill(~causal, float("-inf")).exp()                 # e^{c_i - c_j} for j <= i
    A = (k @ k.transpose(-1, -2)) * decay * beta[..., None]               # diag(beta) A, diagonal ignored
    rhs = torch.cat([beta[..., None] * v, (beta * c.exp())[..., None] * k], dim=-1)
    if FAST_PATHS:   # the same system, solved transposed: much faster on CPU (end of file)
        UW = fast_solve_unit_lower(A, rhs)
    else:            # (I + diag(beta) A) UW = rhs; unitriangular: the diagonal of A is not read
        UW = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    U, W = UW.split([Dv, Dk], dim=-1)                                     # (B, H, n, Lc, Dv), (.., Dk)
    scores = (q @ k.transpose(-1, -2)) * decay                            # (B, H, n, Lc, Lc), j <= i
    q_decayed = q * c.exp()[..., None]                                    # reads S0 through e^{c_i}
    k_decayed = k * (c[..., -1:] - c).exp()[..., None]                    # writes decay to chunk end
    chunk_decay = c[..., -1].exp()[..., None, None]                       # (B, H, n, 1, 1)
    outputs = []   # unbind once, as in the recurrent form
    per_chunk = (x.unbind(2) for x in (U, W, q_decayed, scores, k_decayed.transpose(-1, -2), chunk_decay))
    for U_i, W_i, q_i, scores_i, k_i, decay_i in zip(*per_chunk):
        u = U_i - W_i @ S                                                 # (B, H, Lc, Dv)
        outputs.append(q_i @ S + scores_i @ u)
        S = decay_i * S + k_i @ u
    o = torch.stack(outputs, dim=2).permute(0, 2, 3, 1, 4).reshape(B, n * Lc, H, Dv)[:, :T]   # (B, T, H, Dv)
    return o, S


# -----------------------------------------------------------------------------
# Layers. Every mixer maps (x, pos, context, S, span) -> (y, S, extended context):
#   context  what this layer may see from before x: attention keys/values, or the conv window
#   S        the fast weights (GDN only; None for attention)
#   span     how many positions back attention may look, itself included (L; infinite for "none")
#   extended the context after reading x (what a decoder keeps, before eviction trims it)

def l2_normalize(x, eps=1e-6):
    """x / sqrt(sum x^2 + eps) over the last dim (as flash-linear-attention's l2norm)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def rotate(x, pos, inv_freq):
    """Rotary position embedding at absolute positions pos. x: (B, T, H, D), pos: (T,)."""
    angles = pos[:, None].to(inv_freq.dtype) * inv_freq[None, :]          # (T, D/2)
    cos, sin = angles.cos()[:, None, :].to(x.dtype), angles.sin()[:, None, :].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    """Causal softmax attention over at most the last `span` positions (itself included). Its context:
    (keys, values, positions) of the tokens before x, keys already rotated; (B, H, Tc, D), (B, H, Tc, D), (Tc,).
    pos (T,): x's positions, increasing in token order (the is_causal shortcut below counts on it)."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        inv_freq = config.rope_base ** (-torch.arange(0, self.head_dim, 2).float() / self.head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def empty_context(self, batch_size, device, dtype):
        kv = torch.zeros(batch_size, self.n_head, 0, self.head_dim, device=device, dtype=dtype)
        return kv, kv, torch.zeros(0, dtype=torch.long, device=device)

    def forward(self, x, pos, context, S, span):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, self.head_dim).unbind(2)   # (B, T, H, D)
        q, k = rotate(q, pos, self.inv_freq), rotate(k, pos, self.inv_freq)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))                              # (B, H, T, D)
        k_ctx, v_ctx, pos_ctx = context
        k, v = torch.cat([k_ctx, k.to(k_ctx.dtype)], 2), torch.cat([v_ctx, v.to(v_ctx.dtype)], 2)   # (B, H, Tk, D)
        k_pos = torch.cat([pos_ctx, pos])
        if pos_ctx.numel() == 0 and T <= span:  # nothing before x: the mask is plain causal
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), is_causal=True)
        else:
            visible = (k_pos[None, :] <= pos[:, None]) & (k_pos[None, :] > pos[:, None] - span)  # (T, Tk)
            y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=visible)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), None, (k, v, k_pos)


class GatedDeltaNet(nn.Module):
    """Gated DeltaNet mixer (Yang et al., arXiv 2412.06464); its state S is the fast weights. q, k, v pass a short
    causal depthwise conv + SiLU; q and k are L2-normalised per head (q also scaled by 1/sqrt(Dk));
    beta = sigmoid(W_b x); log_decay = -exp(A_log) * softplus(W_a x + dt_bias); the output goes through a gated
    RMSNorm, norm(o) * silu(W_g x), and a projection. Its context: the last K - 1 pre-conv q, k, v rows."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.conv_size = config.conv_size
        self.chunk_size = config.gdn_chunk_size
        inner = config.n_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, 3 * inner, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * inner, 1, config.conv_size))  # depthwise
        self.a_proj = nn.Linear(config.n_embd, config.n_head, bias=False)     # decay gate
        self.b_proj = nn.Linear(config.n_embd, config.n_head, bias=False)     # write strength beta
        self.A_log = nn.Parameter(torch.empty(config.n_head))
        self.dt_bias = nn.Parameter(torch.empty(config.n_head))
        self.g_proj = nn.Linear(config.n_embd, inner, bias=False)            # output gate
        self.o_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj = nn.Linear(inner, config.n_embd, bias=False)

    def empty_context(self, batch_size, device, dtype):
        return torch.zeros(batch_size, self.conv_size - 1, 3 * self.n_head * self.head_dim, device=device, dtype=dtype)

    def forward(self, x, pos, context, S, span):
        B, T, _ = x.shape
        H, D = self.n_head, self.head_dim
        qkv = self.qkv(x)                                                     # (B, T, 3HD)
        if context is None:
            context = self.empty_context(B, x.device, qkv.dtype)
        padded = torch.cat([context.to(qkv.dtype), qkv], dim=1)               # (B, K - 1 + T, 3HD)
        if FAST_PATHS:   # the same conv as K shifted multiply-adds: much faster on CPU (end of file)
            qkv = fast_causal_conv(padded, self.conv_weight)
        else:            # depthwise (a group per channel) and causal: padded starts K - 1 rows early
            qkv = F.conv1d(padded.transpose(1, 2), self.conv_weight, groups=qkv.shape[-1]).transpose(1, 2)
        qkv = F.silu(qkv).view(B, T, 3, H, D)
        q, k = l2_normalize(qkv[:, :, :2]).unbind(2)                          # (B, T, H, D), one call for both
        beta = torch.sigmoid(self.b_proj(x))                                  # (B, T, H), in (0, 1)
        log_decay = -self.A_log.exp() * F.softplus(self.a_proj(x) + self.dt_bias)
        # One token (decoding): the per-token recurrence is the fast path; a window: the chunkwise form.
        o, S = gated_delta_rule(q / math.sqrt(D), k, qkv[:, :, 2], log_decay, beta, state=S,
                                chunk_size=None if T == 1 else self.chunk_size)
        o = self.o_norm(o) * F.silu(self.g_proj(x).view(B, T, H, D))
        return self.proj(o.reshape(B, T, H * D)), S, padded[:, -(self.conv_size - 1):]


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """Pre-norm mixer + residual, pre-norm MLP + residual."""

    def __init__(self, config, kind):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.mixer = Attention(config) if kind == "A" else GatedDeltaNet(config)
        self.norm2 = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.mlp = MLP(config)

    def forward(self, x, pos, context, S, span):
        y, S, extended = self.mixer(self.norm1(x), pos, context, S, span)
        x = x + y
        x = x + self.mlp(self.norm2(x))
        return x, S, extended


# -----------------------------------------------------------------------------
# The model.

@dataclass
class SleepLMConfig:
    vocab_size: int = 64
    n_embd: int = 128
    n_head: int = 4
    layers: str = "AGAG"          # one letter per block: A attention, G Gated DeltaNet
    window: int = 24              # L: tokens per window; a full window is slept on, then evicted
    sleep_passes: int = 1         # N: passes over a consolidation window (N = 1: the plain hybrid)
    eviction: str = "hard"        # "hard", "sliding" or "none" (see the module docstring)
    mlp_ratio: int = 4
    conv_size: int = 4            # GDN short conv kernel
    gdn_chunk_size: int = 64      # chunk of the chunkwise-parallel local rule
    rope_base: float = 10000.0
    bptt_passes: int | None = None     # truncated backprop through the last passes only (process_window)
    checkpoint_windows: bool = False   # recompute each window's passes in backward (activation checkpointing)
    input_injection: bool = False      # add the wake-pass input before every sleep pass (sleep_pass)
    sleep_blocks: tuple | None = None  # (start, stop): the blocks sleep passes run (looped_blocks); None: all

    def __post_init__(self):
        check_config(self)   # a ValueError naming the field (at the end of the file)


@dataclass
class SleepState:
    """What one sequence carries from window to window; per block (attention blocks have S None):
    S               the fast weights (B, H, Dk, Dv), zero at the start
    context         what the next token may see: attention (keys, values, positions), the GDN conv window
    window_context  the context when the current window began: where every sleep pass starts
    The steps return a new state, never change one (checkpointing replays them)."""
    S: list
    context: list
    window_context: list
    window: int
    eviction: str

    @property
    def span(self):
        """How many positions back attention may look, itself included: L (all of them without eviction)."""
        return self.window if self.eviction != "none" else float("inf")

    def evict(self):
        """Algorithm 1 at a window's end (sec. 3): the attention KV goes (the caller drops the features), conv
        windows are zeroed, only S stays. "sliding" (sec. 6.4): the newest L - 1 KV entries and the conv
        windows stay too. "none": everything stays."""
        kept = []
        for S, context in zip(self.S, self.context):
            if self.eviction == "none":
                kept.append(context)
            elif S is not None:   # GDN: the conv window
                kept.append(context if self.eviction == "sliding" else torch.zeros_like(context))
            else:                 # attention: (keys, values, positions)
                k, v, pos = context
                start = max(k.shape[2] - (self.window - 1 if self.eviction == "sliding" else 0), 0)
                kept.append((k[:, :, start:], v[:, :, start:], pos[start:]))
        return replace(self, context=kept, window_context=kept)


class SleepLM(nn.Module):
    """Embedding, the blocks of config.layers, final norm and head; forward runs the windows (Algorithm 1)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, kind) for kind in config.layers)
        self.norm_f = nn.RMSNorm(config.n_embd, eps=1e-6)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self):
        """Initialise the parameters (norm_f keeps RMSNorm's ones); uniform(+-sqrt(3 / n)) has std 1 / sqrt(n)."""
        nn.init.normal_(self.wte.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)             # near-zero logits at the start
        for name, p in self.blocks.named_parameters():
            if name.endswith(".proj.weight"):       # every output projection: zeros, so each block
                nn.init.zeros_(p)                   # starts as the identity
            elif name.endswith("A_log"):            # decay rates log U(1, 16), as in GDN / Mamba2
                p.copy_(torch.empty_like(p).uniform_(1, 16).log())
            elif name.endswith("dt_bias"):          # softplus^-1 of dt, dt log-uniform in [1e-3, 0.1]
                dt = torch.empty_like(p).uniform_(math.log(1e-3), math.log(0.1)).exp()
                p.copy_(dt + torch.log(-torch.expm1(-dt)))
            elif "norm" in name:                    # RMSNorm weights
                nn.init.ones_(p)
            else:                                   # qkv, mlp.fc, g/a/b_proj (n = fan_in), conv_weight (n = K)
                bound = math.sqrt(3 / p.shape[-1])
                nn.init.uniform_(p, -bound, bound)

    # -- the sleep loop: Algorithm 1 ----------------------------------------------------------
    def forward(self, idx, targets=None, *, sleep_passes=None, window=None, eviction=None):
        """Algorithm 1 of the paper (sec. 3). idx, targets: (B, T), targets -1 where there is nothing to predict
        (without targets every window but the last sleeps); sleep_passes, window, eviction override the config's.
        Returns every window's wake logits (B, T, V) and the loss (None without targets). Beyond Algorithm 1:
        the lines marked "option"."""
        N, L, eviction = self.resolve(sleep_passes, window, eviction)
        consolidate = self.plan_windows(idx, targets, None if eviction == "none" else L)   # per window: sleep?
        B, T = idx.shape
        if eviction == "none":   # option: no windows, no sleep, one pass of full attention
            L, N = T, 1
        grad, bptt = torch.is_grad_enabled(), self.config.bptt_passes
        step = self.process_window                            # one window: the wake pass, then sleep passes
        if self.config.checkpoint_windows and grad:           # option: recompute each window in backward
            step = partial(checkpoint, self.process_window, use_reentrant=False)
        state = self.initial_state(B, L, eviction)            # 1. S = 0; nothing before the first window
        logits, predicted = [], []
        for w, start in enumerate(range(0, T, L)):            # 2. windows of L tokens
            x, pos = idx[:, start:start + L], torch.arange(start, min(start + L, T), device=idx.device)
            passes = N if consolidate[w] else 1               # 3. no answer in it: N passes, else one
            untracked = max(passes - bptt, 0) if bptt and grad else 0   # option: passes without gradient
            window_logits, state = step(x, pos, state, passes, untracked)   # wake pass, passes - 1 sleep passes
            state = state.evict()                             # 4. evict: only S goes on (sliding: KV too)
            logits.append(window_logits)
            if targets is not None and not consolidate[w]:
                predicted.append((window_logits, targets[:, start:start + L]))
        logits = torch.cat(logits, dim=1)
        if targets is None:
            return logits, None
        # The loss: cross-entropy on the answer tokens, which only prediction windows hold.
        loss = F.cross_entropy(torch.cat([z for z, _ in predicted], dim=1).flatten(0, 1),
                               torch.cat([y for _, y in predicted], dim=1).flatten(), ignore_index=-1)
        return logits, loss

    def process_window(self, idx, pos, state, passes, untracked=0):
        """One window (Algorithm 1, step 3): embed once, the wake pass, then passes - 1 sleep passes over idx (B, t)
        at positions pos (t,). Returns the wake logits (B, t, V) and the state. train.py --compile compiles this
        (no branch on a tensor value). Option bptt_passes (truncated backprop, untried in the paper): the first
        `untracked` passes run without gradient, reconnected straight-through (their values, identity backward)."""
        embeddings = self.wte(idx)                            # once: the passes do not re-embed
        S_in = state.S
        with torch.no_grad() if untracked else contextlib.nullcontext():
            out, loop_input, h, state = self.wake_pass(embeddings, pos, state)
            wake_logits = self.head(out)
            h, state = self.sleep(h, loop_input, pos, state, untracked - 1)
        if untracked:   # straight-through: untracked values, identity gradient
            h, loop_input = (embeddings + (x - embeddings).detach() for x in (h, loop_input))
            state = replace(state, S=[s if s is None else s_in + (s - s_in).detach() for s_in, s in zip(S_in, state.S)])
        h, state = self.sleep(h, loop_input, pos, state, passes - max(untracked, 1))   # the (tracked) sleep passes
        # Logits of a consolidation window are never trained on: keep them out of the graph.
        return (wake_logits if passes == 1 else wake_logits.detach()), state

    def wake_pass(self, h, pos, state):
        """Pass 1 (wake): every block once over h (B, t, C), reading and extending the context. Returns the
        output features, the looped blocks' input and output (where sleep passes start), and the state."""
        loop = self.looped_blocks()
        h, state = self.run_blocks(h, pos, state, range(loop.start), state.context)
        loop_input = h
        h, state = self.run_blocks(h, pos, state, loop, state.context)
        out, state = self.run_blocks(h, pos, state, range(loop.stop, len(self.blocks)), state.context)
        return out, loop_input, h, state

    def sleep(self, h, loop_input, pos, state, passes):
        """`passes` sleep passes in a row, each on the last one's output h and S: the loop over passes that
        training, evaluation and streaming (SleepCache.sleep) all run. Returns h and the state."""
        for _ in range(passes):
            h, state = self.sleep_pass(h, loop_input, pos, state)
        return h, state

    def sleep_pass(self, h, loop_input, pos, state):
        """One sleep pass (Algorithm 1, step 3): the looped blocks again on their output h, from the window's starting
        context and the last pass's S. Option input_injection (not in Algorithm 1): add their wake-pass input first."""
        if self.config.input_injection:
            h = h + loop_input
        return self.run_blocks(h, pos, state, self.looped_blocks(), state.window_context)

    def looped_blocks(self):
        """The blocks sleep passes run: all (Algorithm 1), or option sleep_blocks=(start, stop), as the paper
        does for its pretrained Jet-Nemotron (the middle 14 of 28 blocks)."""
        return range(*(self.config.sleep_blocks or (0, len(self.blocks))))

    def run_blocks(self, h, pos, state, blocks, context):
        """h (B, t, C) through the blocks in range `blocks`, block i from context[i] and state.S[i].
        Returns h and the state with those blocks' S and extended context."""
        S, extended = list(state.S), list(state.context)
        for i in blocks:
            h, S[i], extended[i] = self.blocks[i](h, pos, context[i], S[i], state.span)
        return h, replace(state, S=S, context=extended)

    def head(self, h):
        """Logits, in float32 (float64 for a float64 model) even under bf16 autocast."""
        return self.lm_head(self.norm_f(h)).to(state_dtype(h))

    def initial_state(self, batch_size, window, eviction):
        """Algorithm 1, step 1: S = 0 in every GDN block, and nothing before the first window."""
        w = self.wte.weight
        context = [b.mixer.empty_context(batch_size, w.device, w.dtype) for b in self.blocks]
        S = [None if b.kind == "A" else w.new_zeros(batch_size, b.mixer.n_head, b.mixer.head_dim, b.mixer.head_dim,
                                                    dtype=state_dtype(w)) for b in self.blocks]
        return SleepState(S, context, context, window, eviction)

    def resolve(self, sleep_passes=None, window=None, eviction=None):
        """Per-call overrides of N, L and eviction, checked like the config."""
        N = self.config.sleep_passes if sleep_passes is None else sleep_passes
        L = self.config.window if window is None else window
        eviction = self.config.eviction if eviction is None else eviction
        check_int("sleep_passes", N, 1)
        check_int("window", L, 1)
        check_choice("eviction", eviction, EVICTIONS)
        return N, L, eviction

    @torch.compiler.disable   # reads tensor values: a compiled forward runs this eagerly, then one graph
    def plan_windows(self, idx, targets, L):
        """Check idx and targets; return, per window of L tokens (None: one window), whether it is a
        consolidation window: a tuple of Python bools, so that the window loop branches on no tensor value."""
        check_tokens("idx", idx, self.config.vocab_size)
        T = idx.shape[1]
        L = L or T
        if targets is None:
            return tuple(stop < T for stop in range(L, T + L, L))
        check_tokens("targets", targets, self.config.vocab_size, like=idx)
        no_answer = torch.stack([(targets[:, s:s + L] < 0).all(dim=1) for s in range(0, T, L)]).tolist()  # (windows, B)
        check_windows_line_up(no_answer, L, T)
        return tuple(rows[0] for rows in no_answer)

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, *, sleep_passes=None, window=None,
                 eviction=None):
        """Continue idx (B, T) by max_new_tokens tokens, sleeping whenever a window fills; each new token costs one
        wake pass over one token. temperature 0: greedy, > 0: sample softmax(logits / temperature); top_k: only
        among the K most likely (None: all)."""
        if not isinstance(temperature, (int, float)) or not temperature >= 0:
            raise ValueError(f"temperature must be a number >= 0 (0: greedy), got {temperature!r}")
        check_int("top_k", top_k, 1, allow_none=True)
        cache = SleepCache(self, idx.shape[0], sleep_passes=sleep_passes, window=window, eviction=eviction)
        logits = cache.feed(idx)[:, -1]
        for _ in range(max_new_tokens):
            if temperature == 0:
                next_id = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                next_id = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat([idx, next_id], dim=1)
            logits = cache.feed(next_id)[:, -1]
        return idx


class SleepCache:
    """A streaming SleepLM: forward's steps (wake_pass, sleep, SleepState.evict), taken as tokens arrive.
    It holds the SleepState and the looped blocks' wake-pass output and input (features, loop_inputs) for the
    window so far: memory is bounded by the window (unless eviction is "none")."""

    def __init__(self, model, batch_size, *, sleep_passes=None, window=None, eviction=None):
        self.model, self.batch_size = model, batch_size
        self.sleep_passes, self.window, self.eviction = model.resolve(sleep_passes, window, eviction)
        self.reset()

    def reset(self):
        self.pos = 0   # absolute position of the next token
        self.start_window(self.model.initial_state(self.batch_size, self.window, self.eviction))

    def start_window(self, state):
        self.state = replace(state, window_context=state.context)
        self.features, self.loop_inputs, self.window_start = [], [], self.pos

    def room(self):
        """How many more tokens the current window takes."""
        return self.window - (self.pos - self.window_start)

    def wake(self, idx):
        """The wake pass over idx (B, t), which must fit in the current window; returns its logits (B, t, V)."""
        if self.eviction != "none" and idx.shape[1] > self.room():
            raise ValueError(f"wake got {idx.shape[1]} tokens but only {self.room()} fit in the window")
        pos = torch.arange(self.pos, self.pos + idx.shape[1], device=idx.device)
        logits, loop_input, h, self.state = self.wake_step(idx, pos, self.state)
        if self.eviction != "none":
            self.features.append(h)
            self.loop_inputs.append(loop_input)
        self.pos += idx.shape[1]
        return logits

    def wake_step(self, idx, pos, state):
        out, loop_input, h, state = self.model.wake_pass(self.model.wte(idx), pos, state)
        return self.model.head(out), loop_input, h, state

    def sleep(self):
        """Passes 2..N over the full window, from its starting context and the current S."""
        h, loop_input = torch.cat(self.features, dim=1), torch.cat(self.loop_inputs, dim=1)
        pos = torch.arange(self.window_start, self.pos, device=h.device)
        _, self.state = self.model.sleep(h, loop_input, pos, self.state, self.sleep_passes - 1)

    def evict(self):
        self.start_window(self.state.evict())

    def feed(self, idx):
        """Read idx (B, T): wake, and sleep + evict each time the window fills. Returns the wake logits (B, T, V),
        equal to SleepLM.forward's."""
        check_tokens("idx", idx, self.model.config.vocab_size)
        logits, start = [], 0
        while start < idx.shape[1]:
            room = idx.shape[1] - start if self.eviction == "none" else self.room()
            logits.append(self.wake(idx[:, start:start + room]))
            start += room
            if self.eviction != "none" and self.room() == 0:
                self.sleep()
                self.evict()
        return torch.cat(logits, dim=1)


# -----------------------------------------------------------------------------
# Input checks: a ValueError that names the argument and what it allows. Skip on first read.

def check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def check_int(name, value, minimum, allow_none=False):
    if not (value is None and allow_none) and (type(value) is not int or value < minimum):
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, got {value!r}")


def check_config(config):
    """SleepLMConfig's fields, checked when it is made; sleep_blocks becomes a tuple."""
    for name, minimum in (("vocab_size", 1), ("n_embd", 1), ("n_head", 1), ("window", 1), ("sleep_passes", 1),
                          ("mlp_ratio", 1), ("conv_size", 2), ("gdn_chunk_size", 1)):
        check_int(name, getattr(config, name), minimum)
    check_int("bptt_passes", config.bptt_passes, 1, allow_none=True)
    check_choice("eviction", config.eviction, EVICTIONS)
    if config.n_embd % config.n_head or (config.n_embd // config.n_head) % 2:
        raise ValueError(f"n_embd must be divisible by n_head with an even head size, got "
                         f"n_embd={config.n_embd}, n_head={config.n_head}")
    if not isinstance(config.layers, str) or not config.layers or set(config.layers) - set(LAYER_KINDS):
        raise ValueError(f"layers must be a non-empty string of letters {LAYER_KINDS}, got {config.layers!r}")
    if config.sleep_blocks is not None:
        n = len(config.layers)
        blocks = tuple(config.sleep_blocks) if isinstance(config.sleep_blocks, (tuple, list)) else ()
        if not (len(blocks) == 2 and all(type(b) is int for b in blocks) and 0 <= blocks[0] < blocks[1] <= n):
            raise ValueError(f"sleep_blocks must be None (every block) or (start, stop) with "
                             f"0 <= start < stop <= {n} (the number of blocks), got {config.sleep_blocks!r}")
        config.sleep_blocks = blocks


def check_rule_inputs(q, k, v, log_decay, beta, state, chunk_size):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, T, H, Dk), got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, Dk = q.shape
    Dv = v.shape[-1] if v.dim() == 4 else "Dv"
    for name, x, shape in (("v", v, (B, T, H, Dv)), ("log_decay", log_decay, (B, T, H)), ("beta", beta, (B, T, H)),
                           ("state", state, (B, H, Dk, Dv))):
        if (x is not None or name != "state") and tuple(x.shape) != shape:
            raise ValueError(f"{name} must be {shape}, got {tuple(x.shape)}")
    check_int("chunk_size", chunk_size, 1, allow_none=True)   # None: the per-token recurrence


def check_tokens(name, x, vocab_size, like=None):
    """idx (like=None) or targets (like=idx: its shape, and -1 allowed) as a (B, T) LongTensor of ids."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype != torch.long or x.shape[1] == 0:
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a (B, T) LongTensor with T >= 1, got {got}")
    if like is not None and x.shape != like.shape:
        raise ValueError(f"{name} must have the shape of idx {tuple(like.shape)}, got {tuple(x.shape)}")
    low, high = (int(v) for v in torch.stack([x.min(), x.max()]).tolist()) if x.numel() else (0, 0)
    if low < (0 if like is None else -1) or high >= vocab_size:
        allowed = ("" if like is None else "-1 (ignore) or ") + f"0..{vocab_size - 1}"
        raise ValueError(f"{name} holds ids outside the vocabulary: allowed {allowed}, got min {low}, max {high}")


def check_windows_line_up(no_answer, L, T):
    """no_answer[w][b]: window w of row b has no answer. Every row must agree, and some window must answer."""
    for w, rows in enumerate(no_answer):
        if any(rows) != all(rows):
            raise ValueError(f"targets: the window at {w * L}..{min(w * L + L, T) - 1} holds answers in some rows "
                             f"but not in others; windows must line up across the batch")
    if all(rows[0] for rows in no_answer):
        raise ValueError("targets has no answer token (every entry is -1): nothing to predict")


# -----------------------------------------------------------------------------
# Fast paths: the plain forms above, faster (equal up to rounding; tested). Skip on first read. FAST_PATHS picks two
# in the reading path (the GDN conv, the chunkwise solve). The torch.compile paths (training's per-window graphs,
# CompiledSleepCache for decoding) are in runs.py.

FAST_PATHS = True   # False: the plain F.conv1d and solve_triangular (slower on CPU)


def fast_causal_conv(padded, weight):
    """The GDN's depthwise causal conv as K shifted multiply-adds (F.conv1d with a group per channel, and
    much faster than it on CPU at these sizes). padded (B, K - 1 + T, C), weight (C, 1, K) -> (B, T, C)."""
    K = weight.shape[-1]
    T = padded.shape[1] - (K - 1)
    weight = weight[:, 0, :].to(padded.dtype)                                # (C, K)
    out = padded[:, -T:] * weight[:, -1]
    for i in range(K - 1):
        out = torch.addcmul(out, padded[:, i:i + T], weight[:, i])            # out += shifted * w_i
    return out


def fast_solve_unit_lower(A, rhs):
    """solve_triangular(A, rhs, upper=False, unitriangular=True) as X^T A^T = rhs^T: the same system, but LAPACK
    gets row-major operands without copies (the solve and its backward: much faster on CPU)."""
    return torch.linalg.solve_triangular(A.mT, rhs.mT, upper=True, left=False, unitriangular=True).mT
