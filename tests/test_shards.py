import json

import numpy as np
import pytest
import torch

from crawl2chat.common import C2CError
from crawl2chat.shards import (HEADER_INTS, BatchLoader, TokenStream, corpus_rows, read_shard, shard_paths, tokenize_corpus,
                               val_batches, write_shard)
from crawl2chat.tokenizer import Tokenizer

HEADER = HEADER_INTS * 8


# ---------------------------------------------------------------- the shard format


def test_round_trip_uint16(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 512, 1000)
    path = tmp_path / "train_000000.bin"
    write_shard(path, tokens, vocab_size=512)
    assert path.stat().st_size == HEADER + 2 * 1000
    out = read_shard(path, 512)
    assert out.dtype == np.uint16 and np.array_equal(out, tokens)
    assert np.array_equal(read_shard(path), tokens)  # vocabulary check optional
    # the largest id that fits uint16, at the largest uint16 vocabulary
    write_shard(path, [0, 65535, 7], vocab_size=65536)
    assert read_shard(path, 65536).tolist() == [0, 65535, 7]


def test_round_trip_uint32(tmp_path):
    tokens = np.array([0, 65536, 99_999, 3])
    path = tmp_path / "big.bin"
    write_shard(path, tokens, vocab_size=100_000)
    assert path.stat().st_size == HEADER + 4 * 4
    out = read_shard(path, 100_000)
    assert out.dtype == np.uint32 and out.tolist() == tokens.tolist()


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "train_000007.bin"
    write_shard(path, np.arange(100) % 300, vocab_size=300)
    return path


def _header(path):
    return np.fromfile(path, dtype=np.int64, count=HEADER_INTS)


def _rewrite(path, header, body: bytes):
    path.write_bytes(header.astype(np.int64).tobytes() + body)


def test_truncated_shard(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])  # one token short
    with pytest.raises(C2CError, match="does not match its header") as e:
        read_shard(shard, 300)
    assert str(shard) in str(e.value)
    shard.write_bytes(data + b"\0\0")  # one token too many
    with pytest.raises(C2CError, match="length"):
        read_shard(shard, 300)
    shard.write_bytes(data[:50])  # not even a header
    with pytest.raises(C2CError, match="too short") as e:
        read_shard(shard, 300)
    assert str(shard) in str(e.value)


def test_wrong_magic(shard):
    h, body = _header(shard), shard.read_bytes()[HEADER:]
    h[0] = 0x12345
    _rewrite(shard, h, body)
    with pytest.raises(C2CError, match="magic") as e:
        read_shard(shard, 300)
    assert str(shard) in str(e.value)


def test_wrong_version(shard):
    h, body = _header(shard), shard.read_bytes()[HEADER:]
    h[1] = 99
    _rewrite(shard, h, body)
    with pytest.raises(C2CError, match="version"):
        read_shard(shard, 300)


def test_vocab_mismatch(shard):
    with pytest.raises(C2CError, match="vocabulary of 300") as e:
        read_shard(shard, 512)
    assert str(shard) in str(e.value)


def test_wrong_dtype(shard):
    """A header saying 4-byte tokens for a vocabulary that fits uint16, with a consistent length."""
    tokens = np.arange(100, dtype=np.uint32)
    h = _header(shard)
    h[2] = 4
    _rewrite(shard, h, tokens.tobytes())
    with pytest.raises(C2CError, match="dtype of 4 bytes") as e:
        read_shard(shard, 300)
    assert str(shard) in str(e.value)
    h[2] = 3
    _rewrite(shard, h, b"\0" * 300)
    with pytest.raises(C2CError, match="token size"):
        read_shard(shard, 300)


def test_missing_shard(tmp_path):
    with pytest.raises(C2CError, match="not found") as e:
        read_shard(tmp_path / "nope.bin")
    assert "nope.bin" in str(e.value)
    with pytest.raises(C2CError, match="no train shards"):
        shard_paths(tmp_path, "train")


# ---------------------------------------------------------------- streams and batches


def stream_of(tmp_path, tokens, cuts=(), vocab=65536) -> TokenStream:
    """tokens split at `cuts` into consecutive shard files, read back as one TokenStream."""
    bounds = [0, *cuts, len(tokens)]
    paths = []
    for k, (a, b) in enumerate(zip(bounds, bounds[1:])):
        paths.append(tmp_path / f"train_{k:06d}.bin")
        write_shard(paths[-1], tokens[a:b], vocab)
    assert shard_paths(tmp_path, "train") == paths
    return TokenStream(paths, vocab)


@pytest.fixture
def loader_stream(tmp_path):
    return stream_of(tmp_path, np.arange(3000))  # token i at position i: windows are recognisable


def test_batches_deterministic_and_shifted(loader_stream):
    a = BatchLoader(loader_stream, seq_len=16, batch_size=4, seed=7)
    b = BatchLoader(loader_stream, seq_len=16, batch_size=4, seed=7)
    b.batch(40)  # b has seen another epoch first: its cached permutation must not leak into step 3
    for step in (3, 0, 200, 3):
        xa, ya = a.batch(step)
        xb, yb = b.batch(step)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == ya.shape == (4, 16) and xa.dtype == torch.long
        assert torch.equal(xa[:, 1:], ya[:, :-1])
        assert torch.equal(ya, xa + 1)  # y is the next token of x, over the whole window
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(0)[0], BatchLoader(loader_stream, 16, 4, seed=8).batch(0)[0])


def test_one_epoch_visits_every_window_once(loader_stream):
    loader = BatchLoader(loader_stream, seq_len=16, batch_size=1, seed=3)
    n = loader.n_windows
    assert n == (3000 - 1 - 16) // 16
    starts = [int(loader.batch(s)[0][0, 0]) for s in range(n)]
    assert len(set(starts)) == n
    assert len({s % 16 for s in starts}) == 1  # one grid per epoch, shifted by the epoch's offset
    assert max(starts) + 17 <= 3000
    nxt = [int(loader.batch(s)[0][0, 0]) for s in range(n, 2 * n)]
    assert nxt != starts  # a new epoch, a new order


@pytest.mark.parametrize("step", [0, 1, 5, 60])
def test_ddp_slicing(loader_stream, step):
    """grad_accum=2 on one process sees exactly the rows that two ranks see with grad_accum=1."""
    loader = BatchLoader(loader_stream, seq_len=16, batch_size=3, seed=1)
    acc = [loader.batch(step, micro=m, grad_accum=2, rank=0, world=1) for m in (0, 1)]
    ddp = [loader.batch(step, micro=0, grad_accum=1, rank=r, world=2) for r in (0, 1)]
    for i in (0, 1):
        assert torch.equal(torch.cat([acc[0][i], acc[1][i]]), torch.cat([ddp[0][i], ddp[1][i]]))
    assert not torch.equal(acc[0][0], acc[1][0])


def test_stream_across_shards(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, 2000)
    one = stream_of(tmp_path / "one", tokens)
    many = stream_of(tmp_path / "many", tokens, cuts=(700, 705, 1500))  # a 5-token shard in between
    assert many.n == one.n == 2000
    for a, b in [(0, 2000), (690, 720), (699, 706), (700, 705), (1499, 1501), (0, 1), (1999, 2000), (10, 10 + 65)]:
        assert np.array_equal(many.read(a, b), tokens[a:b]), (a, b)
        assert np.array_equal(one.read(a, b), tokens[a:b]), (a, b)
    la, lb = BatchLoader(one, 64, 8, seed=2), BatchLoader(many, 64, 8, seed=2)
    for step in range(6):
        assert all(torch.equal(p, q) for p, q in zip(la.batch(step), lb.batch(step)))
    va, vb = val_batches(one, 64, 8, 4), val_batches(many, 64, 8, 4)
    assert len(va) == 3 and all(torch.equal(p, q) for (x1, y1), (x2, y2) in zip(va, vb) for p, q in
                                ((x1, x2), (y1, y2)))


def test_corpus_rows_are_windows_with_a_target_everywhere(tmp_path):
    stream = stream_of(tmp_path, np.arange(3000), cuts=(1000,))  # token i at position i
    x, y = corpus_rows(stream, 50, seq_len=16, seed=4)
    assert x.shape == y.shape == (50, 16)
    assert np.array_equal(y, x + 1)  # every position has its next token as the target, none masked
    assert np.array_equal(x, x[:, :1] + np.arange(16))  # each row one contiguous window
    assert x.min() >= 0 and y.max() <= 2999 and len(set(x[:, 0])) > 40
    assert np.array_equal(corpus_rows(stream, 50, 16, seed=4)[0], x)
    assert not np.array_equal(corpus_rows(stream, 50, 16, seed=5)[0], x)
    assert corpus_rows(stream, 0, 16, seed=4)[0].shape == (0, 16)
    with pytest.raises(C2CError, match="too few"):
        corpus_rows(stream, 1, seq_len=3000, seed=0)


def test_too_few_tokens(tmp_path):
    with pytest.raises(C2CError, match="too few"):
        BatchLoader(stream_of(tmp_path, np.arange(20)), seq_len=16, batch_size=2)


# ---------------------------------------------------------------- tokenize_corpus


@pytest.fixture(scope="module")
def tok():
    texts = ["the cat sat on the mat. " * 20, "Ada Lovelace was born in 1815 in London.\n" * 10]
    return Tokenizer.train(texts, 300)


def write_corpus(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_tokenize_corpus(tmp_path, tok):
    docs = [{"text": "the cat sat", "split": "train"}, {"text": "on the mat", "split": "val"},
            {"text": "   ", "split": "train"},  # blank: skipped
            {"text": "Ada Lovelace"},  # no split: train
            {"text": "born in 1815", "split": "train"}]
    corpus = write_corpus(tmp_path / "corpus.jsonl", docs[:2] + [""] + docs[2:])  # and an empty line
    out = tmp_path / "tokens"
    out.mkdir()
    (out / "train_000009.bin").write_bytes(b"stale")  # an old shard is removed first
    m = tokenize_corpus(corpus, tok, out, shard_tokens=4)
    train = [tok.bos_id] + tok.encode("the cat sat") + [tok.bos_id] + tok.encode("Ada Lovelace") \
        + [tok.bos_id] + tok.encode("born in 1815")
    val = [tok.bos_id] + tok.encode("on the mat")
    paths = shard_paths(out, "train")
    assert len(paths) == -(-len(train) // 4) == m["shards"]["train"]
    assert all(len(read_shard(p, tok.vocab_size)) == 4 for p in paths[:-1])
    assert TokenStream(paths, tok.vocab_size).read(0, len(train)).tolist() == train
    assert TokenStream(shard_paths(out, "val"), tok.vocab_size).read(0, len(val)).tolist() == val
    assert (m["train_tokens"], m["val_tokens"], m["train_docs"], m["val_docs"]) == (len(train), len(val), 3, 1)
    assert m["dtype"] == "uint16"
    assert tok.encode("the cat sat").count(tok.bos_id) == 0


def test_tokenize_corpus_no_train_text(tmp_path, tok):
    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"text": "on the mat", "split": "val"},
                                                      {"text": "  \n", "split": "train"}])
    with pytest.raises(C2CError, match="no training text") as e:
        tokenize_corpus(corpus, tok, tmp_path / "tokens")
    assert str(corpus) in str(e.value)
    empty = write_corpus(tmp_path / "empty.jsonl", [])
    with pytest.raises(C2CError, match="no training text"):
        tokenize_corpus(empty, tok, tmp_path / "tokens")


def test_tokenize_corpus_no_val(tmp_path, tok):
    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"text": "the cat", "split": "train"}])
    with pytest.raises(C2CError, match="no validation"):
        tokenize_corpus(corpus, tok, tmp_path / "tokens")


def test_tokenize_corpus_bad_line(tmp_path, tok):
    corpus = write_corpus(tmp_path / "corpus.jsonl", [{"text": "the cat", "split": "train"},
                                                      {"text": "on the mat", "split": "val"},
                                                      '{"text": "broken',
                                                      {"text": "more"}])
    with pytest.raises(C2CError, match=r":3: not valid JSON") as e:
        tokenize_corpus(corpus, tok, tmp_path / "tokens")
    assert str(corpus) in str(e.value)
    write_corpus(corpus, [{"text": "the cat"}, {"txt": "no text field"}])
    with pytest.raises(C2CError, match=r":2: document has no"):
        tokenize_corpus(corpus, tok, tmp_path / "tokens")
    write_corpus(corpus, [{"text": "the cat"}, "[1, 2]"])
    with pytest.raises(C2CError, match=r":2: expected a JSON object"):
        tokenize_corpus(corpus, tok, tmp_path / "tokens")
