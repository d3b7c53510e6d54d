"""engine.generate_with_tools and tool_parts_from_ids on a tiny random GPT. A random model makes no tool
calls by itself, so the calls are scripted: sample_next is replaced by a sampler that emits a fixed
sequence and records the logits it was given (to check the KV cache against a full recomputation)."""
from __future__ import annotations

import pytest
import torch

from crawl2chat import engine
from crawl2chat.chat_template import render
from crawl2chat.engine import generate, generate_with_tools, tool_parts_from_ids
from crawl2chat.model import GPT, GPTConfig
from crawl2chat.tokenizer import Tokenizer
from crawl2chat.tools import run_python

LINES = ["the cat sat on the mat", "Alice works at the bakery in Paris", "what is two plus two? four",
         "print(2 + 3) gives 5; sum([1, 2, 3]) = 6", "the river flows north to the sea"] * 20


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(LINES, 300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, 128, aspect_ratio=32, head_dim=32)).eval()
    with torch.no_grad():  # the init zeroes the output projections: without this, attention would not
        for p in model.parameters():  # matter and the cache check below would be trivially true
            p.add_(0.05 * torch.randn_like(p))
    return model


def prompt(tok, text="what is two plus two?"):
    return render(tok, [{"role": "user", "content": text}], add_generation_prompt=True)[0]


class Script:
    """Stands in for sample_next: returns the scripted ids in order (then `then` forever) and keeps the
    logits each call was given."""

    def __init__(self, ids, then=None):
        self.ids, self.then, self.seen = list(ids), then, []

    def __call__(self, logits, temperature, top_k, top_p, generator):
        self.seen.append(logits[0].clone())
        t = self.ids.pop(0) if self.ids else self.then
        assert t is not None, "script ran out"
        return torch.tensor([t])


def S(tok, name):
    return tok.special_id(f"<|{name}|>")


def test_python_call_runs_and_cache_stays_consistent(tok, model, monkeypatch):
    script = Script([S(tok, "python_start"), *tok.encode("2+3"), S(tok, "python_end"),
                     *tok.encode(" so it is five"), S(tok, "assistant_end")])
    monkeypatch.setattr(engine, "sample_next", script)
    p = prompt(tok)
    seen = []
    ids, parts = generate_with_tools(model, tok, p, 50, {"python": run_python},
                                     on_token=lambda t, kind: seen.append((t, kind)))
    assert parts == [{"type": "python", "text": "2+3"}, {"type": "output", "text": "5"},
                     {"type": "text", "text": " so it is five"}]
    k = ids.index(S(tok, "python_end"))
    assert ids[k + 1:k + 4] == [S(tok, "output_start"), *tok.encode("5"), S(tok, "output_end")]
    assert ids[-1] == S(tok, "assistant_end")
    assert [t for t, _ in seen] == ids  # the stream reports every id, tool output included
    kinds = [kind for _, kind in seen]
    assert kinds == ["python"] * (k + 1) + ["output"] * 3 + ["text"] * len(tok.encode(" so it is five")) + ["end"]
    # every sampled position's cached logits equal a no-cache forward pass over the final sequence
    injected = set(range(k + 1, k + 4))
    positions = [len(p) + i for i in range(len(ids)) if i not in injected]
    assert len(positions) == len(script.seen)
    with torch.no_grad():
        full = model(torch.tensor([p + ids]))[0]
    for pos, logits in zip(positions, script.seen):
        torch.testing.assert_close(logits, full[pos - 1], rtol=1e-4, atol=1e-4)


def test_greedy_without_calls_equals_generate(tok, model):
    p = prompt(tok, "the cat sat on the mat")
    stops = [S(tok, "assistant_end"), tok.bos_id]
    want = generate(model, [p], 40, stop_ids=stops)[0]
    starts = {S(tok, "python_start"), S(tok, "search_start")}
    assert len(want) > 5 and not starts & set(want)  # the premise: this random model makes no call
    ids, parts = generate_with_tools(model, tok, p, 40, {})
    assert ids == want
    assert "".join(x["text"] for x in parts) == tok.decode([t for t in want if not tok.is_special(t)])


def test_seeded_sampling_without_calls_equals_generate(tok, model):
    p = prompt(tok, "Alice works at the bakery")
    stops = [S(tok, "assistant_end"), tok.bos_id]
    calls = {S(tok, "python_start"), S(tok, "search_start")}
    seed = next((seed for seed in range(50) if not calls & set(generate(
        model, [p], 30, stop_ids=stops, temperature=1.0, top_k=50, generator=torch.Generator().manual_seed(seed))[0])))
    want = generate(model, [p], 30, stop_ids=stops, temperature=1.0, top_k=50,
                    generator=torch.Generator().manual_seed(seed))[0]
    ids, _ = generate_with_tools(model, tok, p, 30, {}, temperature=1.0, top_k=50,
                                 generator=torch.Generator().manual_seed(seed))
    assert ids == want


def test_search_call_missing_tool_limit_and_failure(tok, model, monkeypatch):
    call = lambda kind, q: [S(tok, f"{kind}_start"), *tok.encode(q), S(tok, f"{kind}_end")]  # noqa: E731
    script = [*call("search", "bakery in Paris?"), *call("python", "1+1"), *call("search", "x"),
              S(tok, "assistant_end")]
    queries = []

    def fake_search(q):
        queries.append(q)
        return "Alice works at the bakery"
    monkeypatch.setattr(engine, "sample_next", Script(script))
    _, parts = generate_with_tools(model, tok, prompt(tok), 60, {"search": fake_search}, max_calls=2)
    assert queries == ["bakery in Paris?"]  # the third call is over the limit
    assert [(x["type"], x["text"]) for x in parts] == [
        ("search", "bakery in Paris?"), ("output", "Alice works at the bakery"),
        ("python", "1+1"), ("output", "tool not available"),
        ("search", "x"), ("output", "tool call limit reached")]

    def broken(q):
        raise RuntimeError("index offline")
    monkeypatch.setattr(engine, "sample_next", Script(call("search", "x") + [S(tok, "assistant_end")]))
    _, parts = generate_with_tools(model, tok, prompt(tok), 20, {"search": broken})
    assert parts[1] == {"type": "output", "text": "tool error: index offline"}


def test_context_limit_and_budget(tok, model, monkeypatch):
    a = tok.encode("a")[0]
    seq_len = model.cfg.seq_len
    p = [tok.bos_id] + [a] * 90
    # a tool output longer than the room left is cut; generation stops at the context, no crash
    script = Script([S(tok, "python_start"), *tok.encode("print('x ' * 500)"), S(tok, "python_end")], then=a)
    monkeypatch.setattr(engine, "sample_next", script)
    ids, parts = generate_with_tools(model, tok, p, 1000, {"python": run_python})
    assert len(p) + len(ids) == seq_len and ids[-1] != S(tok, "assistant_end")
    out = parts[1]
    assert out["type"] == "output" and out["text"].startswith("x x x") and len(out["text"]) < 1000
    assert S(tok, "output_end") in ids
    # max_new_tokens counts sampled tokens only
    monkeypatch.setattr(engine, "sample_next", Script([], then=a))
    ids, parts = generate_with_tools(model, tok, prompt(tok), 5, {})
    assert ids == [a] * 5 and parts == [{"type": "text", "text": "a" * 5}]
    # a prompt that fills the context leaves nothing to generate
    assert generate_with_tools(model, tok, [tok.bos_id] + [a] * (seq_len - 1), 5, {}) == ([], [])


def test_parts_round_trip_through_the_template(tok):
    parts = [{"type": "text", "text": "Let me check. "}, {"type": "search", "text": "Alice bakery"},
             {"type": "output", "text": "Alice works at the bakery in Paris"},
             {"type": "python", "text": "2 + 3"}, {"type": "output", "text": "5"},
             {"type": "text", "text": "She works in Paris; 2 + 3 = 5."}]
    ids, _ = render(tok, [{"role": "user", "content": "where?"}, {"role": "assistant", "content": parts}])
    reply = ids[len(ids) - 1 - ids[::-1].index(S(tok, "assistant_start")) + 1:]
    assert reply[-1] == S(tok, "assistant_end")
    assert tool_parts_from_ids(tok, reply) == parts
    assert tool_parts_from_ids(tok, reply + tok.encode("after the end")) == parts


def test_parts_from_odd_ids(tok):
    hi = tok.encode("hi")
    # a stray end delimiter and other special ids are dropped; adjacent text merges
    assert tool_parts_from_ids(tok, hi + [S(tok, "python_end"), S(tok, "user_start")] + hi) == [
        {"type": "text", "text": "hihi"}]
    # an unclosed call (cut by the budget) is kept as it is
    assert tool_parts_from_ids(tok, [S(tok, "python_start")] + tok.encode("2+")) == [
        {"type": "python", "text": "2+"}]
    assert tool_parts_from_ids(tok, []) == []


class Alphabet:
    """Stands in for sample_next: greedy over a few ids (tool delimiters, digits, '+') whose logits are
    shifted by `offsets`, so that a random model makes calls. A function of each row's logits alone, so
    batched and one-by-one generation sample alike exactly when their logits agree."""

    def __init__(self, ids, offsets):
        self.ids, self.offsets = torch.tensor(ids), torch.tensor(offsets)

    def __call__(self, logits, temperature, top_k, top_p, generator):
        return self.ids[(logits[:, self.ids] + self.offsets).argmax(-1)]


@pytest.mark.parametrize("batch_size, budget", [(4, 40), (8, 40), (8, 25), (2, 30)])
def test_batched_tool_calls_equal_one_by_one(tok, model, monkeypatch, batch_size, budget):
    """generate_with_tools_batch (rows of different lengths in one cache, rows waiting while others
    decode, outputs prefilled left-padded, finished rows leaving the batch) gives each prompt what
    generate_with_tools gives it alone; sampled is 0 exactly on the injected outputs."""
    alphabet = [S(tok, "python_start"), S(tok, "python_end"), S(tok, "assistant_end"), *tok.encode("1+2+3")]
    # offsets found by a search for rows that differ in how many calls they make (checked below)
    monkeypatch.setattr(engine, "sample_next", Alphabet(alphabet, [0.29, 0.16, -0.13, 0.1, 0.06, -0.06, -0.12, -0.26]))
    texts = ["what is two plus two?", "the cat sat", "Alice works at the bakery in Paris", "four",
             "the river flows past the mill and the cat sat on the mat", "two plus", "Paris?"]
    ps = [prompt(tok, t) for t in texts]
    got = engine.generate_with_tools_batch(model, tok, ps, budget, {"python": run_python}, max_calls=2,
                                           batch_size=batch_size)
    out_start, out_end = S(tok, "output_start"), S(tok, "output_end")
    n_calls = []
    for p, (ids, sampled) in zip(ps, got):
        want, _ = generate_with_tools(model, tok, p, budget, {"python": run_python}, max_calls=2)
        assert ids == want
        inside, mask = False, []
        for t in ids:
            inside = inside or t == out_start
            mask.append(0 if inside else 1)
            inside = inside and t != out_end
        assert sampled == mask and sum(sampled) <= budget
        n_calls.append(ids.count(out_start))
    assert max(n_calls) >= 1 and len(set(n_calls)) > 1, n_calls  # the premise: rows differ in their calls


def test_batched_tools_greedy_without_calls_equals_generate(tok, model):
    ps = [prompt(tok, "the cat sat on the mat"), prompt(tok, "the river flows")]
    stops = [S(tok, "assistant_end"), tok.bos_id]
    want = generate(model, ps, 30, stop_ids=stops, ragged=True)
    assert not {S(tok, "python_start"), S(tok, "search_start")} & {t for w in want for t in w}
    got = engine.generate_with_tools_batch(model, tok, ps, 30, {})
    assert [ids for ids, _ in got] == want and all(m == [1] * len(ids) for ids, m in got)


def test_abstention_threshold_rules_out_an_unsure_opening_in_every_path(tok, model):
    """With the greedy first token of a reply declared the abstention's opening: a threshold above
    the probability the model gives it rules it out in generate, generate_with_tools and the batched
    tool loop alike; a threshold below it, or 0, changes nothing; a sequence that does not end where a
    reply opens is never touched."""
    import dataclasses
    ps = [prompt(tok, "the cat sat on the mat"), prompt(tok, "the river flows")]
    stops = [S(tok, "assistant_end"), tok.bos_id]
    plain = generate(model, ps, 12, stop_ids=stops, ragged=True)
    with torch.no_grad():
        probs = [model(torch.tensor([p]))[0, -1].softmax(-1) for p in ps]
    first = plain[0][0]
    p_first = float(probs[0][first])
    gated = GPT(dataclasses.replace(model.cfg, reply_open=S(tok, "assistant_start"), abstain_ids=[first]))
    gated.load_state_dict(model.state_dict())
    gated.eval()
    for threshold, ruled_out in ((p_first + 1e-3, True), (p_first - 1e-3, False), (0.0, False)):
        gated.cfg.abstain_threshold = threshold
        got = generate(gated, ps, 12, stop_ids=stops, ragged=True)
        assert (got[0][0] != first) == ruled_out and (got == plain) == (not ruled_out)
        if ruled_out:  # the most likely token other than the opening
            assert got[0][0] == int(probs[0].clone().index_fill_(0, torch.tensor([first]), -1).argmax())
        assert generate_with_tools(gated, tok, ps[0], 12, {})[0] == got[0]
        assert [ids for ids, _ in engine.generate_with_tools_batch(gated, tok, ps, 12, {})] == got
    gated.cfg.abstain_threshold = 2.0
    mid = ps[0][:-1]  # ends inside the user's message, not where a reply opens
    assert generate(gated, [mid], 5)[0] == generate(model, [mid], 5)[0]
