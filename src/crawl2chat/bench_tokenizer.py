"""Tokenizer speed against the reference tools, on the same texts in one run.

Training: ours (HF `tokenizers` BpeTrainer via Tokenizer.train) vs `rustbpe` (karpathy's Rust GPT-4-style
BPE trainer), same split regex and the same number of merges. Encoding: ours (HF encode_batch) vs
`tiktoken` running the merges rustbpe learned (built locally, nothing downloaded). Best of `repeats`.
"""
from __future__ import annotations

import time

from crawl2chat.common import C2CError
from crawl2chat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer


def _best(fn, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9), out


def bench_tokenizer(texts: list[str], vocab_size: int, repeats: int = 3) -> dict:
    try:
        import rustbpe
        import tiktoken
    except ImportError as e:
        raise C2CError(f"the tokenizer benchmark needs rustbpe and tiktoken ({e.name} is missing): "
                       f"pip install rustbpe tiktoken") from None
    texts = [t for t in texts if t]
    if not texts:
        raise C2CError("bench_tokenizer: no text to benchmark on")
    n_chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    n_merges_vocab = vocab_size - len(SPECIAL_TOKENS)  # rustbpe: 256 bytes + merges, no special tokens

    # --- training
    ours_train_s, ours = _best(lambda: Tokenizer.train(texts, vocab_size), repeats)

    def train_rustbpe():
        r = rustbpe.Tokenizer()
        r.train_from_iterator(iter(texts), vocab_size=n_merges_vocab, pattern=SPLIT_PATTERN)
        return r

    base_train_s, rb = _best(train_rustbpe, repeats)

    # --- encoding
    ranks = {bytes(k): v for k, v in rb.get_mergeable_ranks()}
    enc = tiktoken.Encoding(name="c2c_bench", pat_str=rb.get_pattern(), mergeable_ranks=ranks,
                            special_tokens={s: len(ranks) + k for k, s in enumerate(SPECIAL_TOKENS)})
    ours_enc_s, ours_ids = _best(lambda: ours.encode_batch(texts), repeats)
    base_enc_s, base_ids = _best(lambda: enc.encode_ordinary_batch(texts), repeats)

    def entry(ours_v, base_v, unit, baseline_is):
        return {"ours": ours_v, "baseline": base_v, "ratio": ours_v / base_v, "unit": unit, "baseline_is": baseline_is}

    return {
        "train": entry(n_chars / ours_train_s, n_chars / base_train_s, "chars/s", "rustbpe"),
        "encode": entry(n_bytes / 1e6 / ours_enc_s, n_bytes / 1e6 / base_enc_s, "MB/s", "tiktoken"),
        "input": {"texts": len(texts), "chars": n_chars, "bytes": n_bytes, "vocab_size": vocab_size,
                  "repeats": repeats},
        # Both sides learn the same algorithm; similar compression shows the comparison is like for like.
        "bytes_per_token": {"ours": n_bytes / max(1, sum(map(len, ours_ids))),
                            "baseline": n_bytes / max(1, sum(map(len, base_ids)))},
    }
