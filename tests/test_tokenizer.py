import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crawl2chat.common import C2CError
from crawl2chat.tokenizer import SPECIAL_TOKENS, Tokenizer, show_tokens, train_tokenizer_stage

SHARED = Path(__file__).resolve().parents[2] / "shared"
TAYLOR = SHARED / "data/text/minbpe/taylorswift.txt"
C4 = SHARED / "data/text/llamafactory/c4_demo.jsonl"
EXTRA = ["Hello world! 123 4567 héllo wörld — naïve café 😀 日本語のテキスト\n",
         "def f(x):\n\treturn x ** 2  # comment\r\n",
         "I'm sure they've said it's fine; we'll see.\n\n\n"]

# Text without lone surrogates (they are not valid UTF-8), biased towards tricky pieces.
texts = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs",))),
    st.lists(st.sampled_from(SPECIAL_TOKENS + ["<|", "|>", " ", "\n", "\r\n", "'s", "é", "😀", "12345", "a", "\x00"]))
    .map("".join),
)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    assert TAYLOR.is_file(), TAYLOR
    return Tokenizer.train([TAYLOR.read_text(encoding="utf-8")] + EXTRA, 512)


def test_vocab_size_exact(tok):
    assert tok.vocab_size == 512
    assert len(tok.token_bytes()) == 512


def test_special_ids(tok):
    ids = [tok.special_id(s) for s in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert ids == list(range(len(SPECIAL_TOKENS)))  # documented layout: specials first, in order
    assert tok.bos_id == tok.special_id("<|bos|>")
    for s, i in zip(SPECIAL_TOKENS, ids):
        assert tok.decode([i]) == s
        assert tok.id_to_piece(i) == s.encode()
    assert tok.decode([tok.bos_id] + tok.encode("hi") + [tok.special_id("<|assistant_end|>")]) \
        == "<|bos|>hi<|assistant_end|>"
    with pytest.raises(C2CError, match="unknown special token"):
        tok.special_id("<|nope|>")


def test_byte_tokens_present(tok):
    pieces = {tok.id_to_piece(i) for i in range(tok.vocab_size)}
    assert all(bytes([b]) in pieces for b in range(256))


@settings(max_examples=200, deadline=None)
@given(texts)
def test_round_trip(tok, s):
    ids = tok.encode(s)
    assert tok.decode(ids) == s
    specials = set(range(len(SPECIAL_TOKENS)))
    assert not specials & set(ids)
    assert int(tok.token_bytes()[ids].sum()) == len(s.encode("utf-8"))
    assert b"".join(tok.id_to_piece(i) for i in ids) == s.encode("utf-8")


@settings(max_examples=30, deadline=None)
@given(st.lists(texts, max_size=8))
def test_encode_batch_matches_encode(tok, batch):
    assert tok.encode_batch(batch) == [tok.encode(s) for s in batch]


def test_special_strings_in_plain_text_are_not_special(tok):
    s = "a <|bos|> b <|assistant_end|><|pad|>"
    ids = tok.encode(s)
    assert tok.bos_id not in ids
    assert all(tok.special_id(x) not in ids for x in SPECIAL_TOKENS)
    assert tok.decode(ids) == s


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == np.int32 and tb.shape == (512,)
    assert (tb[: len(SPECIAL_TOKENS)] == 0).all() and (tb[len(SPECIAL_TOKENS):] >= 1).all()
    s = "Taylor Swift released her album in 2019. Ünïcödé ✓"
    assert int(tb[tok.encode(s)].sum()) == len(s.encode())
    assert tok.encode(TAYLOR.read_text(encoding="utf-8")[:5000])  # merges were learned: compresses
    assert len(tok.encode("Taylor Swift")) < len("Taylor Swift".encode())


def test_save_load_round_trip(tok, tmp_path):
    tok.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for p in (tmp_path, tmp_path / "tokenizer.json"):
        tok2 = Tokenizer.load(p)
        assert tok2.vocab_size == tok.vocab_size and tok2.bos_id == tok.bos_id
        for s in EXTRA + ["x <|bos|> y", TAYLOR.read_text(encoding="utf-8")[:3000]]:
            assert tok2.encode(s) == tok.encode(s)
        assert (tok2.token_bytes() == tok.token_bytes()).all()


def test_pickle_keeps_plain_text_semantics(tok):
    import pickle

    tok2 = pickle.loads(pickle.dumps(tok))
    s = "x <|bos|> y"
    assert tok2.encode(s) == tok.encode(s) and tok2.bos_id not in tok2.encode(s)


def test_load_missing(tmp_path):
    with pytest.raises(C2CError, match="tokenizer.json not found — run `c2c tokenizer` first") as e:
        Tokenizer.load(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_load_corrupt(tmp_path):
    f = tmp_path / "tokenizer.json"
    f.write_text('{"version": "1.0", "model": ')
    with pytest.raises(C2CError) as e:
        Tokenizer.load(tmp_path)
    assert str(f) in str(e.value) and "\n" not in str(e.value)
    f.write_text('{"hello": 1}')
    with pytest.raises(C2CError, match="tokenizer.json"):
        Tokenizer.load(f)


def test_load_missing_special(tok, tmp_path):
    tok.save(tmp_path)
    f = tmp_path / "tokenizer.json"
    d = json.loads(f.read_text())
    d["added_tokens"] = [t for t in d["added_tokens"] if t["content"] != "<|python_end|>"]
    f.write_text(json.dumps(d))
    with pytest.raises(C2CError, match=r"<\|python_end\|>") as e:
        Tokenizer.load(tmp_path)
    assert str(f) in str(e.value)


def test_small_corpus_padded_to_exact_vocab():
    t = Tokenizer.train(["ab ab ab"], 300)
    assert t.vocab_size == 300
    assert t.decode(t.encode("ab <|bos|> zz")) == "ab <|bos|> zz"
    with pytest.raises(C2CError, match="too small"):
        Tokenizer.train(["ab"], 100)


def _write_corpus(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_stage(tmp_path):
    lines = TAYLOR.read_text(encoding="utf-8").splitlines()
    rows = [{"text": ln, "split": "val" if i % 50 == 0 else "train"} for i, ln in enumerate(lines) if ln]
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(corpus, rows)
    m = train_tokenizer_stage(corpus, tmp_path / "tok", 400, C4)
    assert m["vocab_size"] == 400 and m["n_special"] == len(SPECIAL_TOKENS)
    assert m["train_chars"] == sum(len(r["text"]) for r in rows if r["split"] == "train")
    assert m["train_s"] > 0 and m["train_chars_per_s"] > 0
    assert 1.0 < m["bytes_per_token"] < 10
    assert 1.0 < m["bytes_per_token_c4"] < 10
    json.dumps(m)
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 400
    m2 = train_tokenizer_stage(corpus, tmp_path / "tok2", 400, tmp_path / "no_c4.jsonl")
    assert m2["bytes_per_token_c4"] is None


def test_stage_errors(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("")
    with pytest.raises(C2CError, match="corpus.jsonl"):
        train_tokenizer_stage(corpus, tmp_path / "tok", 400, None)
    _write_corpus(corpus, [{"text": "only validation", "split": "val"}])
    with pytest.raises(C2CError, match="corpus.jsonl.*train"):
        train_tokenizer_stage(corpus, tmp_path / "tok", 400, None)
    assert not (tmp_path / "tok" / "tokenizer.json").exists()


def test_show_tokens(tok):
    from rich.console import Console

    buf = io.StringIO()
    console = Console(file=buf, width=100, color_system=None)
    s = "Hello <|bos|> wörld 😀\nok"
    show_tokens(tok, s, console=console)
    out = buf.getvalue()
    n = len(tok.encode(s))
    assert f"{n} tokens" in out and str(tok.encode(s)[:3])[1:-1] in out
    assert "<|bos|>" in out


def test_bench_tokenizer():
    from crawl2chat.bench_tokenizer import bench_tokenizer

    text = TAYLOR.read_text(encoding="utf-8")[:30000]
    r = bench_tokenizer(text.splitlines(keepends=True), 400, repeats=1)
    for key, unit, base in (("train", "chars/s", "rustbpe"), ("encode", "MB/s", "tiktoken")):
        e = r[key]
        assert e["ours"] > 0 and e["baseline"] > 0
        assert e["ratio"] == pytest.approx(e["ours"] / e["baseline"])
        assert e["unit"] == unit and e["baseline_is"] == base
