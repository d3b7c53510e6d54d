import math

import pytest
import torch
import torch.nn.functional as F

from crawl2chat.common import C2CError
from crawl2chat.engine import generate, generate_batch, sample_next
from crawl2chat.model import GPT, GPTConfig, KVCache, surprisal_bins

CFG = GPTConfig(vocab_size=97, depth=2, n_embd=64, n_head=4, head_dim=16, mlp_hidden=128, seq_len=48)


def sharp_model(seed: int = 0) -> GPT:
    """A random model whose logits are far apart (weights of std ~1, nothing zero), so that greedy
    decoding does not hinge on float rounding."""
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]) if p.ndim == 2 and p is not model.embed.weight else 1.0)
        model.lm_head.weight.mul_(4.0)
    return model.eval()


def greedy_no_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    """The reference: recompute the whole forward pass for every new token, take the argmax."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def random_prompt(g: torch.Generator, length: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (length,), generator=g).tolist()


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("depth, aspect, head_dim, n_embd, n_head, mlp", [
    (2, 32, 32, 64, 2, 256),    # the smoke preset: 8*64//3 = 170 → 256
    (4, 64, 64, 256, 4, 768),   # the tiny preset: 682 → 768
    (3, 64, 128, 256, 2, 768),  # width 192 rounded up to a multiple of head_dim
    (12, 64, 64, 768, 12, 2048),
    (20, 64, 128, 1280, 10, 3456),
])
def test_from_depth(depth, aspect, head_dim, n_embd, n_head, mlp):
    c = GPTConfig.from_depth(depth, vocab_size=1000, seq_len=77, aspect_ratio=aspect, head_dim=head_dim)
    assert (c.depth, c.n_embd, c.n_head, c.head_dim, c.mlp_hidden) == (depth, n_embd, n_head, head_dim, mlp)
    assert (c.vocab_size, c.seq_len) == (1000, 77)
    assert c.n_head * c.head_dim == c.n_embd and c.mlp_hidden % 128 == 0 and c.mlp_hidden >= 8 * c.n_embd // 3
    assert GPTConfig.from_dict(c.to_dict()) == c


def test_from_dict_incomplete():
    d = CFG.to_dict()
    del d["n_head"]
    with pytest.raises(C2CError, match="incomplete"):
        GPTConfig.from_dict(d)


# ---------------------------------------------------------------- forward and loss


def test_forward_shapes():
    model = sharp_model()
    x = torch.randint(0, CFG.vocab_size, (3, 11))
    logits = model(x)
    assert logits.shape == (3, 11, CFG.vocab_size) and logits.dtype == torch.float32
    loss = model(x, x)
    assert loss.shape == () and torch.isfinite(loss)
    assert model(x, x, reduction="none").shape == (3 * 11,)
    n = CFG.vocab_size * CFG.n_embd * 2 + CFG.depth * (4 * CFG.n_embd * CFG.n_head * CFG.head_dim
                                                      + 3 * CFG.n_embd * CFG.mlp_hidden)
    assert model.num_params() == n
    assert model.num_params(non_embedding=True) == n - CFG.vocab_size * CFG.n_embd


def test_loss_ignores_minus_one():
    model = sharp_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, CFG.vocab_size, (2, 9), generator=g)
    y = torch.randint(0, CFG.vocab_size, (2, 9), generator=g)
    mask = torch.rand(2, 9, generator=g) < 0.5
    mask[0, 0] = True
    mask[1, -1] = False
    y_ign = y.masked_fill(mask, -1)
    logits = model(x)
    keep = ~mask
    expected = F.cross_entropy(logits[keep], y[keep])
    torch.testing.assert_close(model(x, y_ign), expected)
    per_tok = model(x, y_ign, reduction="none").view(2, 9)
    assert torch.all(per_tok[mask] == 0)
    torch.testing.assert_close(per_tok[keep], F.cross_entropy(logits[keep], y[keep], reduction="none"))
    # the ignored targets do not matter at all
    y_other = torch.where(mask, (y + 1) % CFG.vocab_size, y).masked_fill(mask, -1)
    assert model(x, y_other).item() == model(x, y_ign).item()
    assert model(x, y_ign).item() != model(x, y).item()


def test_forward_longer_than_context_raises():
    model = sharp_model()
    model(torch.zeros(1, CFG.seq_len, dtype=torch.long))  # exactly the context is fine
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, CFG.seq_len + 1, dtype=torch.long))
    cache = KVCache(CFG, 1, CFG.seq_len, "cpu", torch.float32)
    model(torch.zeros(1, CFG.seq_len - 2, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="longer than the context"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)


# ---------------------------------------------------------------- KV cache


@pytest.mark.parametrize("decode_layout", [False, True])
def test_chunked_prefill_matches_full_forward(decode_layout):
    """Also with the weights in the decoding layout (stacked, transposed), which the engine uses."""
    model = sharp_model(3)
    x = torch.randint(0, CFG.vocab_size, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        for cuts in ([0, 13, 30], [0, 1, 2, 17, 18, 30], [0, 30]):
            fused = model.decode_weights() if decode_layout else None
            cache = KVCache(CFG, 2, CFG.seq_len, "cpu", torch.float32, fused=fused)
            parts = [model(x[:, a:b], cache=cache) for a, b in zip(cuts, cuts[1:])]
            assert cache.pos == 30
            torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_greedy_with_cache_equals_recompute():
    model = sharp_model(1)
    g = torch.Generator().manual_seed(1)
    for length in (1, 4, 9):
        prompt = random_prompt(g, length)
        n = CFG.seq_len - length  # right up to the end of the context
        out = generate(model, [prompt], n, temperature=0.0)[0]
        assert len(out) == n
        assert out == greedy_no_cache(model, prompt, n)
        assert len(set(out)) > 3  # a real sequence, not one token repeated


def test_generate_stops_and_clips_to_context():
    model = sharp_model(1)
    prompt = random_prompt(torch.Generator().manual_seed(5), 6)
    ref = greedy_no_cache(model, prompt, 20)
    stop = ref[7]
    first = ref.index(stop)
    assert generate(model, [prompt], 20, stop_ids=[stop])[0] == ref[:first + 1]
    assert len(generate(model, [prompt], 10_000)[0]) == CFG.seq_len - len(prompt)
    assert generate_batch(model, [list(range(CFG.seq_len))], 5) == [[]]


def test_batched_generate_equals_one_by_one():
    model = sharp_model(2)
    g = torch.Generator().manual_seed(2)
    prompts = [random_prompt(g, n) for n in (3, 7, 3, 5, 7, 1, 3)]
    one_by_one = [generate(model, [p], 12)[0] for p in prompts]
    assert generate(model, prompts, 12) == one_by_one
    assert generate(model, prompts, 12, batch_size=2) == one_by_one
    assert one_by_one[0] != one_by_one[2]  # different prompts of one length: the rows are not mixed up
    assert one_by_one == [greedy_no_cache(model, p, 12) for p in prompts]
    assert model.training is False


def test_ragged_batches_equal_one_by_one():
    """Left-padded prompts of different lengths in one batch: padding is masked out of attention and
    RoPE is relative, so the continuations and the logits match the unpadded ones."""
    model = sharp_model(3)
    g = torch.Generator().manual_seed(3)
    prompts = [random_prompt(g, n) for n in (1, 9, 4, 4, 12, 2)]
    one_by_one = [generate(model, [p], 10)[0] for p in prompts]
    assert generate(model, prompts, 10, ragged=True) == one_by_one
    assert generate(model, prompts, 10, ragged=True, batch_size=4) == one_by_one
    L = 12
    padded = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    cache = KVCache(CFG, len(prompts), CFG.seq_len, "cpu", torch.float32)
    cache.key_mask = torch.ones(len(prompts), CFG.seq_len, dtype=torch.bool)
    cache.key_mask[:, :L] = torch.tensor([[j >= L - len(p) for j in range(L)] for p in prompts])
    with torch.no_grad():
        last = model(padded, cache=cache)[:, -1]
        for i, p in enumerate(prompts):
            torch.testing.assert_close(last[i], model(torch.tensor([p]))[0, -1], atol=1e-4, rtol=0)


def test_rows_that_stop_leave_the_batch(monkeypatch):
    """Rows that hit a stop id at different steps are dropped from the cache (KVCache.keep_rows) and
    the others go on exactly as alone."""
    model = sharp_model(3)
    g = torch.Generator().manual_seed(3)
    prompts = [random_prompt(g, n) for n in (1, 9, 4, 4, 12, 2)]
    full = [generate(model, [p], 10)[0] for p in prompts]
    stops = {full[0][1], full[4][4]}
    want = [next((o[:j + 1] for j, t in enumerate(o) if t in stops), o) for o in full]
    assert len({len(w) for w in want}) >= 3  # the premise: rows stop at different steps
    kept = []
    real_keep = KVCache.keep_rows
    monkeypatch.setattr(KVCache, "keep_rows", lambda self, rows: (kept.append(len(rows)), real_keep(self, rows)))
    assert generate(model, prompts, 10, ragged=True, stop_ids=list(stops)) == want
    assert kept and min(kept) < len(prompts)


def test_decode_step_matches_forward():
    """decode_step (fixed shapes: the whole cache under a position mask) gives the forward's logits."""
    model = sharp_model(4)
    x = torch.randint(0, CFG.vocab_size, (3, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(x)
        cache = KVCache(CFG, 3, CFG.seq_len, "cpu", torch.float32, fused=model.decode_weights())
        model(x[:, :12], cache=cache)
        for t in range(12, 20):
            logits = model.decode_step(x[:, t:t + 1], torch.tensor([t]), cache)
            torch.testing.assert_close(logits, full[:, t], atol=1e-4, rtol=0)


def test_compiled_generation_equals_eager():
    """torch.compile'd decoding (one graph for every position) continues prompts exactly as the eager
    engine does, for equal-length and for ragged (left-padded, masked) batches."""
    model = sharp_model(5)
    g = torch.Generator().manual_seed(5)
    same = [random_prompt(g, 6) for _ in range(3)]
    ragged = [random_prompt(g, n) for n in (2, 6, 9)]
    for prompts, kw in ((same, {}), (ragged, {"ragged": True})):
        eager = generate(model, prompts, 12, **kw)
        assert generate(model, prompts, 12, compile=True, **kw) == eager
        assert eager == [greedy_no_cache(model, p, 12) for p in prompts]


def test_generate_restores_training_mode():
    model = sharp_model(2)
    model.train()
    generate(model, [[1, 2]], 2)
    assert model.training


# ---------------------------------------------------------------- sampling


def test_top_k_1_is_greedy():
    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        for temp in (1.0, 0.5, 3.0):
            g = torch.Generator().manual_seed(seed)
            assert torch.equal(sample_next(logits, temp, 1, None, g), logits.argmax(-1))
    assert torch.equal(sample_next(logits, 0.0, None, None, None), logits.argmax(-1))


def support(logits_row: torch.Tensor, top_p: float, n: int = 3000) -> set[int]:
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits_row.repeat(n, 1), 1.0, None, top_p, g)
    return set(ids.tolist())


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.1, 0.0, 0.2, 0.3, 0.4])
    g = torch.Generator().manual_seed(0)
    ids = sample_next(probs.log().repeat(40_000, 1), 1.0, None, None, g)
    freq = torch.bincount(ids, minlength=5).float() / len(ids)
    assert freq[1] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(freq, probs, atol=0.01, rtol=0)
    hot = sample_next((probs.log() / 0.5).repeat(40_000, 1), 2.0, None, None, g)  # temperature undoes the sharpening
    torch.testing.assert_close(torch.bincount(hot, minlength=5).float() / len(hot), probs, atol=0.01, rtol=0)


@pytest.mark.parametrize("top_p, kept", [
    (0.3, {1}),
    (0.5, {1}),           # token 1 alone has exactly 0.5: the smallest set reaching top_p
    (0.6, {1, 3}),
    (0.75, {1, 3}),       # 0.5 + 0.25 reaches 0.75 exactly
    (0.8, {1, 3, 0}),
    (0.96, {0, 1, 2, 3}),
    (1.0, {0, 1, 2, 3}),
])
def test_top_p_keeps_smallest_set(top_p, kept):
    probs = torch.tensor([0.2, 0.5, 0.05, 0.25])  # sorted: 1 (0.5), 3 (0.25), 0 (0.2), 2 (0.05)
    assert support(probs.log()[None], top_p) == kept


def test_top_p_zero_is_greedy_and_rows_independent():
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.9]])
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, 1.0, None, 0.0, g).tolist() == [1, 0]
    out = sample_next(logits.repeat(500, 1), 1.0, None, 0.5, g).view(500, 2)
    assert set(out[:, 0].tolist()) == {1}        # 0.84 ≥ 0.5 alone
    assert set(out[:, 1].tolist()) == {0, 2}     # 0.48 < 0.5: needs the second token too


def test_document_mask_isolates_packed_documents():
    """With doc_start set, a document packed after another is computed as if it were alone (rotary
    positions are relative, so its offset in the row does not matter); without it, it sees the first."""
    model = sharp_model().eval()
    g = torch.Generator().manual_seed(0)
    start = 1
    first = [start] + [int(t) for t in torch.randint(2, model.cfg.vocab_size, (20,), generator=g)]
    second = [start] + [int(t) for t in torch.randint(2, model.cfg.vocab_size, (15,), generator=g)]
    alone = model(torch.tensor([second]))[0]
    with torch.no_grad():
        model.doc_start = start
        packed = model(torch.tensor([first + second]))[0, len(first):]
        model.doc_start = None
        unmasked = model(torch.tensor([first + second]))[0, len(first):]
    assert torch.allclose(packed, alone, atol=1e-4)
    assert not torch.allclose(unmasked, alone, atol=1e-2)


# ---------------------------------------------------------------- surprisal input

OPEN, CLOSE = 5, 6  # stand-ins for <|user_start|> and <|user_end|>


def surprisal_model(seed: int = 7) -> GPT:
    model = sharp_model(seed).with_surprisal_input(OPEN, CLOSE)
    torch.manual_seed(seed)
    torch.nn.init.normal_(model.surprisal_in.weight, std=1.0)
    return model.eval()


def user_prompt(g: torch.Generator, n_user: int) -> list[int]:
    body = [t + 7 for t in torch.randint(0, CFG.vocab_size - 7, (n_user,), generator=g).tolist()]
    return [1, OPEN, *body, CLOSE, 2]


def test_surprisal_input_starts_at_zero_and_reads_only_user_tokens():
    plain = sharp_model(7)
    model = plain.with_surprisal_input(OPEN, CLOSE).eval()
    x = torch.tensor([[1, OPEN, 10, 11, 12, CLOSE, 20, OPEN, 30, CLOSE]])
    assert model.user_mask(x).int().tolist() == [[0, 0, 1, 1, 1, 0, 0, 0, 1, 0]]
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))  # zero weights: the same model
        T = x.size(1)
        s = model.input_surprisal(x, None, model.rope_cos[:T], model.rope_sin[:T])
        expected = -plain(x)[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
    torch.testing.assert_close(s[0, 1:], expected)
    model = surprisal_model(7)
    with torch.no_grad():
        changed = (model(x) - plain(x)).abs().amax(-1)[0]
        no_user = torch.tensor([[1, 10, 11, 12, 20]])
        torch.testing.assert_close(model(no_user), plain(no_user))  # no user text, no input
    assert float(changed[:2].max()) < 1e-5 and float(changed[2:].min()) > 1e-3  # causal: from the first user token on


def test_surprisal_input_separates_expected_from_unexpected_tokens():
    """The same prompt shape with the user token the model expects vs one it does not: the input
    differs only through the surprisal, so the logits after it differ."""
    model = surprisal_model(8)
    plain = sharp_model(8)
    with torch.no_grad():
        guess = int(plain(torch.tensor([[1, OPEN]]))[0, -1].argmax())
        unlikely = int(plain(torch.tensor([[1, OPEN]]))[0, -1].argmin())
        expected, unexpected = torch.tensor([[1, OPEN, guess]]), torch.tensor([[1, OPEN, unlikely]])
        T = 3
        s = [float(model.input_surprisal(x, None, model.rope_cos[:T], model.rope_sin[:T])[0, 2])
             for x in (expected, unexpected)]
    assert s[0] < 1.0 < 5.0 < s[1]


def test_generation_with_surprisal_input_equals_recompute():
    """Cached, batched, ragged and compiled generation all read the surprisal as the full forward does."""
    model = surprisal_model(9)
    g = torch.Generator().manual_seed(9)
    prompts = [user_prompt(g, n) for n in (2, 5, 2, 8)]
    reference = [greedy_no_cache(model, p, 8) for p in prompts]
    assert [generate(model, [p], 8)[0] for p in prompts] == reference
    assert generate(model, prompts, 8) == reference
    assert generate(model, prompts, 8, ragged=True) == reference
    assert reference != [greedy_no_cache(sharp_model(9), p, 8) for p in prompts]


def test_surprisal_source_is_read_but_not_part_of_the_model():
    model, other = surprisal_model(10), sharp_model(11)
    x = torch.tensor([[1, OPEN, 10, 11, 12, CLOSE, 2]])
    T = x.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        own, own_logits = model.input_surprisal(x, None, cos, sin), model(x)
        model.set_surprisal_source(other)
        theirs = model.input_surprisal(x, None, cos, sin)
        expected = -other(x)[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[:, 0]
        torch.testing.assert_close(theirs[0, 1:], expected)
        assert not torch.allclose(own, theirs)
        assert not torch.allclose(model(x), own_logits)
    n_params = len(list(model.parameters()))
    assert set(model.state_dict()) == set(surprisal_model(10).state_dict()) and n_params == len(list(surprisal_model(10).parameters()))
    assert not any(p.requires_grad for p in other.parameters())
    model.set_surprisal_source(None)
    with torch.no_grad():
        torch.testing.assert_close(model(x), own_logits)


def test_frozen_surprisal_copy_is_read_saved_and_never_trained(tmp_path):
    """with_surprisal_input(frozen=True) reads the surprisal from a copy of the model as it was: training
    the model's own weights moves its predictions but not that input; the copy is saved and loaded with
    the weights, left out of the optimizer and of num_params."""
    from crawl2chat.config import TrainConfig
    from crawl2chat.train import build_optimizers, load_model, save_model
    plain = sharp_model(13)
    model = plain.with_surprisal_input(OPEN, CLOSE, frozen=True)
    own = plain.with_surprisal_input(OPEN, CLOSE)
    torch.nn.init.normal_(model.surprisal_in.weight)
    x = torch.tensor([[1, OPEN, 10, 11, 12, CLOSE, 20, 21]])
    T = x.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        before = model.input_surprisal(x, None, cos, sin)
        torch.testing.assert_close(before, own.input_surprisal(x, None, cos, sin))
    opt, = build_optimizers(model, TrainConfig(steps=1, lr=1e-2, optimizer="adamw"), torch.device("cpu"))
    assert not any(p is q for g in opt.param_groups for p in g["params"] for q in model.surprisal_model.parameters())
    for _ in range(3):
        opt.zero_grad()
        model(x[:, :-1], targets=x[:, 1:]).backward()
        opt.step()
    with torch.no_grad():
        torch.testing.assert_close(model.input_surprisal(x, None, cos, sin), before, atol=0, rtol=0)
        for block in own.blocks:
            block.mlp.up_proj.weight.mul_(2.0)
        assert not torch.allclose(own.input_surprisal(x, None, cos, sin), before)
        assert not torch.allclose(model.lm_head.weight, plain.lm_head.weight)
    assert model.num_params() == own.num_params()
    save_model(model.eval(), tmp_path / "m")
    loaded = load_model(tmp_path / "m").eval()
    assert loaded.cfg.surprisal_frozen and not any(p.requires_grad for p in loaded.surprisal_model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)
    # adding the input again (a reward model reading every token) keeps the copy it has
    again = loaded.with_surprisal_input(OPEN, CLOSE, everywhere=True)
    assert again.cfg.surprisal_frozen
    for name, t in again.surprisal_model.state_dict().items():
        torch.testing.assert_close(t, plain.state_dict()[name], atol=0, rtol=0)


def test_surprisal_pass_stops_at_the_last_user_token():
    """The surprisal pass is causal, so running it only up to the last user token changes nothing."""
    model = surprisal_model(12)
    x = torch.tensor([[1, OPEN, 10, 11, 12, CLOSE, 20, 21, 22, 23, 24], [1, 2, OPEN, 13, CLOSE, 25, 26, 27, 28, 29, 30]])
    T = x.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        full = model.input_surprisal(x, None, cos, sin)
        want = model.embed(x) + model.surprisal_in(surprisal_bins(full, model.user_mask(x)))
        torch.testing.assert_close(model.embed_input(x, cos, sin, None), want)
