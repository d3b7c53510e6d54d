import numpy as np
import pytest

from crawl2chat.chat_template import render
from crawl2chat.common import C2CError
from crawl2chat.shards import RowLoader
from crawl2chat.sft import pack
from crawl2chat.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tok():
    lines = ["hello there, how are you?", "I am fine, thank you.", "What is 2 + 3? 2 + 3 = 5."] * 20
    return Tokenizer.train(lines, 400)


def convs():
    return [
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "2 + 3 = 5. The answer is 5."}],
        [{"role": "user", "content": "thanks"}, {"role": "assistant", "content": "You are welcome."},
         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Goodbye!"}],
    ]


def test_pack_targets_are_the_assistant_tokens(tok):
    rendered = [render(tok, c) for c in convs()]
    x, y, stats = pack(rendered, 64, tok.special_id("<|pad|>"))
    assert x.shape == y.shape and x.shape[1] == 64
    assert stats["rows"] == len(x) < len(rendered)  # short conversations share rows
    # every trained target is an assistant token (mask 1 at the target position), each exactly once
    expected = sorted(t for ids, m in rendered for t, k in zip(ids[1:], m[1:]) if k == 1)
    assert sorted(y[y >= 0].tolist()) == expected
    assert stats["trained_tokens"] == len(expected)
    used = sum(len(ids) for ids, _ in rendered)
    assert stats["padding_share"] == pytest.approx(1 - used / (len(x) * 65))
    # a row's inputs: the conversations back to back, then padding
    pad = tok.special_id("<|pad|>")
    for row in x:
        n = int((row != pad).sum())
        assert (row[n:] == pad).all() and row[0] == tok.bos_id


def test_pack_truncates_long_conversations(tok):
    long = [{"role": "user", "content": "hello " * 80}, {"role": "assistant", "content": "fine " * 80}]
    x, y, stats = pack([render(tok, long)], 32, tok.special_id("<|pad|>"))
    assert stats["truncated"] == 1 and x.shape == (1, 32)


def test_row_loader_is_deterministic_and_covers_each_epoch():
    x = np.arange(10 * 4).reshape(10, 4)
    a, b = RowLoader(x, x, 5, seed=3), RowLoader(x, x, 5, seed=3)
    assert all((a.batch(s)[0] == b.batch(s)[0]).all() for s in range(4))
    seen = np.concatenate([a.batch(s)[0][:, 0].numpy() for s in range(2)])
    assert sorted(seen.tolist()) == list(range(0, 40, 4))  # one epoch = every row once
    with pytest.raises(C2CError):
        RowLoader(x[:0], x[:0], 5)


def test_answer_matching():
    from crawl2chat.evals import contains_answer, last_number
    assert contains_answer("Nune Ladi works as a pilot.", "a pilot")
    assert not contains_answer("Nune Ladi works as a pilots.", "a pilot")
    assert not contains_answer("She was born in 19567.", "1956")
    assert contains_answer("Born in 1956, she ...", "1956")
    assert last_number("5 * 4 = 20. The answer is 20.") == 20
    assert last_number("The total is 1,234 coins.") == 1234
    assert last_number("no number here") is None
    assert last_number("It drops to -7.") == -7
