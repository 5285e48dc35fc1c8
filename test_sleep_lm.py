"""Tests for sleep-lm. CPU, seconds. Run: python -m pytest -q test_sleep_lm.py"""

import pytest
import torch

from sleep_lm import SleepCache, SleepLM, SleepLMConfig, gated_delta_rule


def assert_close(actual, expected, rtol=1e-10, atol=1e-12, what=""):
    """torch.testing-style check that reports the max and mean difference."""
    diff = (actual - expected).abs()
    bound = atol + rtol * expected.abs()
    assert bool((diff <= bound).all()), (
        f"{what}: max diff {diff.max().item():.3e}, mean diff {diff.mean().item():.3e}, "
        f"max |expected| {expected.abs().max().item():.3e}")


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


def tiny_model(seed=0, dtype=torch.float64, **overrides):
    """A small model with non-trivial weights (the real init zeros the output projections)."""
    torch.manual_seed(seed)
    model = SleepLM(tiny_config(**overrides)).to(dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(std=0.3)
        model.lm_head.weight.normal_(std=0.3)
    return model


def tokens(B, T, vocab=13, seed=1, low=0):
    return torch.randint(low, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


# -- the local rule ----------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 64])
def test_chunked_rule_matches_recurrent_outputs_state_and_gradients(chunk_size):
    inputs = [x.requires_grad_() for x in random_rule_inputs(T=37)]   # 37: not a multiple of any C
    q, k, v, log_decay, beta, state = inputs
    o_ref, s_ref = gated_delta_rule(q, k, v, log_decay, beta, state=state)
    o, s = gated_delta_rule(q, k, v, log_decay, beta, state=state, chunk_size=chunk_size)
    assert_close(o, o_ref, what="outputs")
    assert_close(s, s_ref, what="final state")
    g = torch.Generator().manual_seed(7)
    w_o, w_s = torch.randn(o.shape, generator=g, dtype=o.dtype), torch.randn(s.shape, generator=g, dtype=s.dtype)
    grads_ref = torch.autograd.grad((o_ref * w_o).sum() + (s_ref * w_s).sum(), inputs)
    grads = torch.autograd.grad((o * w_o).sum() + (s * w_s).sum(), inputs)
    for name, a, b in zip(["q", "k", "v", "log_decay", "beta", "state"], grads, grads_ref):
        assert_close(a, b, what=f"grad of {name}")


def test_chunked_rule_without_initial_state_matches_recurrent():
    q, k, v, log_decay, beta, _ = random_rule_inputs(T=16)
    o_ref, s_ref = gated_delta_rule(q, k, v, log_decay, beta)
    o, s = gated_delta_rule(q, k, v, log_decay, beta, chunk_size=4)
    assert_close(o, o_ref, what="outputs")
    assert_close(s, s_ref, what="final state")


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
    name = {"q_rank": "q and k", "v_shape": "v", "beta_shape": "beta", "state_shape": "state", "chunk_size": "chunk_size"}[bad]
    with pytest.raises(ValueError, match=name):
        gated_delta_rule(q, k, v, log_decay, beta, **kwargs)


# -- the sleep loop ----------------------------------------------------------------------------


def test_one_pass_with_sliding_eviction_is_the_plain_sliding_window_hybrid():
    # N = 1 under sliding eviction: no sleep, so the windows must add up to one ordinary pass of a
    # sliding-window-attention + GDN hybrid over the whole sequence.
    model = tiny_model()
    x = tokens(2, 29)
    logits, _ = model(x, sleep_passes=1, eviction="sliding")
    context, S = model.empty_state(2)
    h, _, _ = model.block_pass(model.wte(x), torch.arange(29), context, S, span=model.config.window)
    assert_close(logits, model.head(h), what="windowed N=1 vs one plain pass")


def test_sleep_passes_one_is_the_plain_hybrid_whatever_the_config_says():
    x = tokens(2, 29)
    plain, _ = tiny_model(sleep_passes=1)(x)
    overridden, _ = tiny_model(sleep_passes=4)(x, sleep_passes=1)
    assert_close(overridden, plain, what="config N=4 called with N=1 vs config N=1")


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


def test_truncated_and_checkpointed_backprop_match_full_backprop():
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


# -- streaming ---------------------------------------------------------------------------------


@pytest.mark.parametrize("eviction", ["hard", "sliding", "none"])
def test_streaming_logits_equal_forward_across_sleep_boundaries(eviction):
    model = tiny_model(sleep_passes=3)
    x = tokens(2, 29)                                    # windows of 8: three sleeps and a partial window
    expected, _ = model(x, eviction=eviction)
    token_by_token = SleepCache(model, 2, eviction=eviction)
    streamed = torch.cat([token_by_token.feed(x[:, t:t + 1]) for t in range(29)], dim=1)
    assert_close(streamed, expected, what="token-by-token vs forward")
    prefill_then_decode = SleepCache(model, 2, eviction=eviction)
    streamed = torch.cat([prefill_then_decode.feed(x[:, :13])] + [prefill_then_decode.feed(x[:, t:t + 1]) for t in range(13, 29)], dim=1)
    assert_close(streamed, expected, what="prefill + decode vs forward")
    for t in (7, 8, 20):                                 # forward on a prefix sees no future
        prefix, _ = model(x[:, :t + 1], eviction=eviction)
        assert_close(prefix[:, -1], expected[:, t], what=f"prefix of {t + 1} tokens")


def test_decode_memory_is_bounded_by_the_window():
    model = tiny_model(sleep_passes=2, eviction="sliding")
    cache = SleepCache(model, 1)
    for t in range(40):
        cache.feed(tokens(1, 1, seed=t))
        attention_entries = [ctx[0].shape[2] for ctx in cache.context if isinstance(ctx, tuple)]
        assert max(attention_entries) <= 2 * model.config.window - 1
        assert sum(f.shape[1] for f in cache.features) < model.config.window


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
    assert all(torch.isfinite(s).all() for s in cache.S if s is not None)
    out = model.generate(prompt[:, :100], max_new_tokens=20, top_k=5)   # multinomial fails on NaN
    assert out.shape == (1, 120) and out.min() >= 0 and out.max() < 13


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("window", 0), ("sleep_passes", 0), ("eviction", "soft"), ("layers", "AXG"), ("layers", ""),
    ("n_embd", 30), ("vocab_size", 0), ("bptt_passes", 0), ("sleep_passes", 1.5),
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
    with pytest.raises(ValueError, match="sleep_passes"):
        model(x, sleep_passes=0)
    with pytest.raises(ValueError, match="window"):
        model(x, window=-2)
    with pytest.raises(ValueError, match="eviction"):
        model.generate(x, 2, eviction="partial")
