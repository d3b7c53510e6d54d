"""Byte-level BPE tokenizer (Hugging Face `tokenizers`), its special tokens, and the `c2c tokenizer` stage.

The format is GPT-4 style: text is pre-split with the cl100k regex, each piece is mapped to its UTF-8
bytes (the 256 byte symbols are always in the vocabulary, so every string round-trips exactly), and
BPE merges are learned on top. No normalizer.

Token ids:
  0 .. 13                    the special tokens, in the order of SPECIAL_TOKENS (so bos_id == 0, pad == 13)
  14 .. 269                  the 256 byte symbols
  270 .. vocab_size - 1      the learned merges, in the order they were learned
If the training text is too small to learn that many merges, the rest of the ids are filled with unused
special tokens "<|reserved_0|>", "<|reserved_1|>", ... so the vocabulary size is always exactly the one asked for.

Plain-text encoding never produces special ids: a string such as "<|bos|>" inside a document is encoded
as ordinary bytes. Special ids are only ever inserted by code, via `bos_id` / `special_id(name)`.
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

from crawl2chat.common import C2CError, atomic_write_bytes, iter_jsonl

SPECIAL_TOKENS = ["<|bos|>", "<|system_start|>", "<|system_end|>", "<|user_start|>", "<|user_end|>",
                  "<|assistant_start|>", "<|assistant_end|>", "<|python_start|>", "<|python_end|>",
                  "<|search_start|>", "<|search_end|>", "<|output_start|>", "<|output_end|>", "<|pad|>"]



def split_pattern(max_digits: int = 3) -> str:
    """The GPT-4 (cl100k_base) pre-split pattern; numbers are split into groups of at most max_digits
    digits (3 in GPT-4; 1, as in Llama 2 and DeepSeek, makes arithmetic learnable by small models)."""
    return (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,%d}|""" % max_digits
            + r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")


SPLIT_PATTERN = split_pattern(3)

FILE_NAME = "tokenizer.json"


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes→printable-unicode map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _empty_hf(max_digits: int = 3) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE(ignore_merges=False))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split_pattern(max_digits)), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


class Tokenizer:
    """A thin wrapper around a `tokenizers.Tokenizer`; see the module docstring for the id layout."""

    def __init__(self, hf: tokenizers.Tokenizer):
        # Special tokens are registered as special AddedTokens (so they are saved, decoded and
        # recognised by other tools), but they must not be matched inside plain text:
        # encode_special_tokens=True makes HF encode their strings as ordinary text. Not serialized.
        hf.encode_special_tokens = True
        self._hf = hf
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        self._added = {i: t.content for i, t in hf.get_added_tokens_decoder().items()}
        self._special = {name: hf.token_to_id(name) for name in SPECIAL_TOKENS}
        self.bos_id: int = self._special["<|bos|>"]
        self._pieces: list[bytes] | None = None

    # HF does not serialize encode_special_tokens, so a pickled copy (multiprocessing, DataLoader workers)
    # would start matching special strings in plain text again: rebuild through __init__ instead.
    def __getstate__(self) -> dict:
        return {"json": self._hf.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]))

    # ---- construction ------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, max_digits: int = 3) -> "Tokenizer":
        n_min = len(SPECIAL_TOKENS) + 256
        if vocab_size < n_min:
            raise C2CError(f"vocab_size {vocab_size} is too small: it must be at least {n_min} "
                           f"({len(SPECIAL_TOKENS)} special tokens + 256 bytes)")
        hf = _empty_hf(max_digits)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=0, show_progress=False,
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        short = vocab_size - hf.get_vocab_size(with_added_tokens=True)
        if short > 0:  # not enough distinct pairs in the text to learn all merges
            hf.add_special_tokens([AddedToken(f"<|reserved_{k}|>", special=True, normalized=False)
                                   for k in range(short)])
        tok = cls(hf)
        assert tok.vocab_size == vocab_size, (tok.vocab_size, vocab_size)
        return tok

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        file = path / FILE_NAME if path.is_dir() else path
        if not file.is_file():
            raise C2CError(f"{path}: {FILE_NAME} not found — run `c2c tokenizer` first")
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises plain Exception with its parser message
            msg = (str(e).strip().splitlines() or ["unknown error"])[0]
            raise C2CError(f"{file}: not a valid tokenizer file ({msg})") from None
        added = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
        missing = [s for s in SPECIAL_TOKENS if s not in added or hf.token_to_id(s) is None]
        if missing:
            raise C2CError(f"{file}: special token(s) missing: {', '.join(missing)} — retrain with `c2c tokenizer`")
        vocab = hf.get_vocab(with_added_tokens=False)
        n_bytes = sum(ch in vocab for ch in _byte_decoder())
        if n_bytes != 256:
            raise C2CError(f"{file}: not a byte-level BPE tokenizer ({256 - n_bytes} of the 256 byte tokens missing)")
        return cls(hf)

    def save(self, dir: str | Path) -> None:
        atomic_write_bytes(Path(dir) / FILE_NAME, self._hf.to_str(pretty=True).encode("utf-8"))

    # ---- ids ---------------------------------------------------------------------------------------

    def special_id(self, name: str) -> int:
        try:
            return self._special[name]
        except KeyError:
            raise C2CError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    @property
    def hf(self) -> tokenizers.Tokenizer:
        """The underlying Hugging Face tokenizer (for export)."""
        return self._hf

    def encode(self, text: str) -> list[int]:
        """Plain text → ids. Special-token strings inside `text` are encoded as ordinary bytes."""
        # encode_batch_fast skips offset tracking: ~1.4x faster than encode() for the same ids
        return self._hf.encode_batch_fast([text], add_special_tokens=False)[0].ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Same as encode, for many texts at once (parallel in Rust)."""
        return [e.ids for e in self._hf.encode_batch_fast(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        """ids → text; special ids render as their strings; invalid UTF-8 becomes U+FFFD."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        return self._hf.decode(list(ids), skip_special_tokens=False)

    def _all_pieces(self) -> list[bytes]:
        if self._pieces is None:
            dec = _byte_decoder()
            pieces = []
            for i in range(self.vocab_size):
                if i in self._added:
                    pieces.append(self._added[i].encode("utf-8"))
                else:
                    pieces.append(bytes(dec[c] for c in self._hf.id_to_token(i)))
            self._pieces = pieces
        return self._pieces

    def id_to_piece(self, i) -> bytes:
        """The raw bytes of token `i` (for a special token: its string, UTF-8 encoded)."""
        i = int(i)
        if not 0 <= i < self.vocab_size:
            raise C2CError(f"token id {i} out of range (vocab size {self.vocab_size})")
        return self._all_pieces()[i]

    def is_special(self, i) -> bool:
        return int(i) in self._added

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: UTF-8 length of each token, 0 for special tokens (for bits per byte)."""
        pieces = self._all_pieces()
        return np.array([0 if i in self._added else len(p) for i, p in enumerate(pieces)], dtype=np.int32)


# ---- the `c2c tokenizer` stage ---------------------------------------------------------------------

def _texts(path: Path, lines: Iterator[tuple[int, dict]]) -> Iterator[tuple[str, str]]:
    for lineno, obj in lines:
        text = obj.get("text")
        if not isinstance(text, str):
            raise C2CError(f"{path}:{lineno}: expected a string field \"text\"")
        yield obj.get("split", "train"), text


def _bytes_per_token(tok: Tokenizer, texts: list[str]) -> float | None:
    texts = [t for t in texts if t]
    if not texts:
        return None
    n_tokens = sum(len(ids) for ids in tok.encode_batch(texts))
    return sum(len(t.encode("utf-8")) for t in texts) / max(n_tokens, 1)


def train_tokenizer_stage(corpus_path: Path, out_dir: Path, vocab_size: int, shared_c4: Path | None,
                          max_digits: int = 3) -> dict:
    """Train on the split=="train" documents of corpus.jsonl, save out_dir/tokenizer.json, return metrics.

    A row without "split" counts as train; bytes_per_token is measured on the split=="val" rows
    (None if there are none), bytes_per_token_c4 on `shared_c4` (None if that file does not exist).
    """
    corpus_path, out_dir = Path(corpus_path), Path(out_dir)
    stats = {"docs": 0, "train_docs": 0, "train_chars": 0}
    val: list[str] = []

    def train_texts() -> Iterator[str]:
        for split, text in _texts(corpus_path, iter_jsonl(corpus_path)):
            stats["docs"] += 1
            if split == "train":
                if text:
                    stats["train_docs"] += 1
                    stats["train_chars"] += len(text)
                    yield text
            elif split == "val":
                val.append(text)

    # Look at the first training text before starting, so that an empty corpus is a clear error.
    it = train_texts()
    first = next(it, None)
    if first is None:
        if stats["docs"] == 0:
            raise C2CError(f"{corpus_path}: corpus is empty — nothing to train the tokenizer on")
        raise C2CError(f"{corpus_path}: no non-empty documents with split \"train\" "
                       f"(read {stats['docs']} documents)")

    def chained() -> Iterator[str]:
        yield first
        yield from it

    t0 = time.perf_counter()
    tok = Tokenizer.train(chained(), vocab_size, max_digits)
    train_s = time.perf_counter() - t0
    tok.save(out_dir)

    c4 = None
    if shared_c4 is not None and Path(shared_c4).is_file():
        c4 = _bytes_per_token(tok, [t for _, t in _texts(Path(shared_c4), iter_jsonl(shared_c4))])
    n_reserved = sum(1 for s in tok._added.values() if s.startswith("<|reserved_"))
    return {
        "vocab_size": tok.vocab_size,
        "max_digits": max_digits,
        "train_docs": stats["train_docs"],
        "train_chars": stats["train_chars"],
        "train_s": round(train_s, 4),
        "train_chars_per_s": stats["train_chars"] / max(train_s, 1e-9),
        "bytes_per_token": _bytes_per_token(tok, val),
        "bytes_per_token_c4": c4,
        "n_special": len(SPECIAL_TOKENS),
        "n_reserved": n_reserved,
    }


# ---- showing tokens ------------------------------------------------------------------------------

_COLOURS = ["on #3b4a6b", "on #5b3b6b", "on #3b6b4a", "on #6b5b3b", "on #6b3b3b", "on #3b6b6b"]


def show_tokens(tok: Tokenizer, text: str, console=None) -> None:
    """Print `text` with one background colour per token (like the tiktokenizer page), then the ids.

    A token that is not a whole UTF-8 sequence (part of a multi-byte character) is shown as its
    bytes in hex, e.g. ‹e2 80›, in that token's colour; newlines are shown as ↵ before the line break.
    """
    from rich.console import Console
    from rich.text import Text

    console = console or Console()
    ids = tok.encode(text)
    out = Text()
    for k, i in enumerate(ids):
        piece = tok.id_to_piece(i)
        try:
            s = piece.decode("utf-8")
        except UnicodeDecodeError:
            s = "‹" + " ".join(f"{b:02x}" for b in piece) + "›"
        s = s.replace("\t", "→").replace("\r", "␍").replace("\n", "↵\n")
        out.append(s, style=_COLOURS[k % len(_COLOURS)])
    console.print(out, soft_wrap=True)
    n_bytes = len(text.encode("utf-8"))
    console.print(Text(f"ids: {json.dumps(ids)}"), soft_wrap=True)
    console.print(Text(f"{len(ids)} tokens, {n_bytes} bytes, {n_bytes / max(len(ids), 1):.2f} bytes/token"))
