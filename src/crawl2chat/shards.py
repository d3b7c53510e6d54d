"""Token shards: a 128-byte header (magic, version, itemsize, tokens, vocab) then the tokens,
uint16 when the vocabulary fits. Batches are a pure function of (seed, step), so training resumes
mid-epoch and every DDP rank reads its own slice of the same global batch."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from crawl2chat.common import C2CError, atomic_write_bytes

MAGIC = 0xC2C70C
VERSION = 1
HEADER_INTS = 16  # int64 → 128 bytes


def dtype_for(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    tokens = np.asarray(tokens, dtype=dtype_for(vocab_size))
    header = np.zeros(HEADER_INTS, dtype=np.int64)
    header[:5] = [MAGIC, VERSION, tokens.itemsize, len(tokens), vocab_size]
    atomic_write_bytes(path, header.tobytes() + tokens.tobytes())


def read_shard(path: Path, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a shard after checking its header against its size (and the vocabulary)."""
    path = Path(path)
    if not path.exists():
        raise C2CError(f"{path}: shard not found — run `c2c tokenize` first")
    size = path.stat().st_size
    if size < HEADER_INTS * 8:
        raise C2CError(f"{path}: too short to be a token shard ({size} bytes)")
    header = np.fromfile(path, dtype=np.int64, count=HEADER_INTS)
    magic, version, itemsize, ntok, vocab = (int(v) for v in header[:5])
    if magic != MAGIC or version != VERSION:
        raise C2CError(f"{path}: not a crawl2chat token shard (bad magic or version)")
    if itemsize not in (2, 4):
        raise C2CError(f"{path}: unsupported token size {itemsize} bytes")
    if size != HEADER_INTS * 8 + ntok * itemsize:
        raise C2CError(f"{path}: length {size} bytes does not match its header ({ntok} tokens of {itemsize} bytes)")
    if vocab_size is not None and vocab != vocab_size:
        raise C2CError(f"{path}: written for a vocabulary of {vocab}, the tokenizer has {vocab_size}")
    if itemsize != np.dtype(dtype_for(vocab)).itemsize:
        raise C2CError(f"{path}: dtype of {itemsize} bytes does not fit a vocabulary of {vocab}")
    dtype = np.uint16 if itemsize == 2 else np.uint32
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_INTS * 8, shape=(ntok,))


def shard_paths(tokens_dir: Path, split: str) -> list[Path]:
    paths = sorted(Path(tokens_dir).glob(f"{split}_*.bin"))
    if not paths:
        raise C2CError(f"{tokens_dir}: no {split} shards — run `c2c tokenize` first")
    return paths


class TokenStream:
    """The shards of one split seen as one stream of tokens."""

    def __init__(self, paths: list[Path], vocab_size: int | None = None):
        self.parts = [read_shard(p, vocab_size) for p in paths]
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])
        self.n = int(self.starts[-1])

    def read(self, a: int, b: int) -> np.ndarray:
        out, i = [], int(np.searchsorted(self.starts, a, side="right") - 1)
        while a < b:
            part, start = self.parts[i], int(self.starts[i])
            take = min(b, start + len(part)) - a
            out.append(np.asarray(part[a - start:a - start + take], dtype=np.int64))
            a += take
            i += 1
        return np.concatenate(out)


def corpus_rows(stream: TokenStream, n: int, seq_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n windows of seq_len + 1 tokens from random places in the stream as (x, y) rows [n, seq_len], a
    target at every position: pretraining text to mix into a fine-tune, so that it keeps what pretraining
    stored."""
    if stream.n < seq_len + 1:
        raise C2CError(f"too few tokens ({stream.n}) for a row of {seq_len + 1}")
    starts = np.random.default_rng(seed).integers(0, stream.n - seq_len, n)
    rows = np.stack([stream.read(int(a), int(a) + seq_len + 1) for a in starts]) if n else np.zeros((0, seq_len + 1))
    return rows[:, :-1].astype(np.int64), rows[:, 1:].astype(np.int64)


def first_sample(step: int, micro: int, grad_accum: int, rank: int, world: int, batch_size: int) -> int:
    """Index of the first sample of a micro-batch in the stream of samples. Micro-batches of one process
    and ranks of a DDP group cut the same global batch the same way, so their losses match."""
    return (step * grad_accum * world + micro * world + rank) * batch_size


class RowLoader:
    """Fixed rows (x, y) — packed conversations — visited in a random order per epoch, drawn from (seed, epoch)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
        if len(x) == 0:
            raise C2CError("no training rows")
        self.x, self.y, self.B, self.seed = x, y, batch_size, seed
        self._epoch, self._perm = -1, None

    def _row(self, i: int) -> int:
        epoch, j = divmod(i, len(self.x))
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.x))
        return int(self._perm[j])

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        first = first_sample(step, micro, grad_accum, rank, world, self.B)
        idx = [self._row(first + r) for r in range(self.B)]
        return torch.from_numpy(self.x[idx]).long(), torch.from_numpy(self.y[idx]).long()

    def epoch_of(self, step: int, grad_accum: int = 1, world: int = 1) -> float:
        return step * grad_accum * world * self.B / len(self.x)


class BatchLoader:
    """Windows of seq_len + 1 tokens. Each epoch shifts the window grid by a random offset and visits
    the windows in a random order, both drawn from (seed, epoch)."""

    def __init__(self, stream: TokenStream, seq_len: int, batch_size: int, seed: int = 0):
        self.stream, self.T, self.B, self.seed = stream, seq_len, batch_size, seed
        self.n_windows = (stream.n - 1 - seq_len) // seq_len
        if self.n_windows < 1:
            raise C2CError(f"corpus has {stream.n} tokens, too few for one window of {seq_len + 1}")
        self._epoch, self._perm, self._shift = -1, None, 0

    def _window(self, i: int) -> np.ndarray:
        epoch, j = divmod(i, self.n_windows)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch, self._shift, self._perm = epoch, int(rng.integers(0, self.T)), rng.permutation(self.n_windows)
        a = self._shift + int(self._perm[j]) * self.T
        return self.stream.read(a, a + self.T + 1)

    def batch(self, step: int, micro: int = 0, grad_accum: int = 1, rank: int = 0, world: int = 1):
        """The micro-batch `micro` of optimizer step `step` for `rank`: one slice of the global batch."""
        first = first_sample(step, micro, grad_accum, rank, world, self.B)
        rows = np.stack([self._window(first + r) for r in range(self.B)])
        t = torch.from_numpy(rows)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

    def epoch_of(self, step: int, grad_accum: int = 1, world: int = 1) -> float:
        return step * grad_accum * world * self.B / self.n_windows


def val_batches(stream: TokenStream, seq_len: int, batch_size: int, n_batches: int):
    """The first n_batches batches of consecutive windows: the same every evaluation."""
    n_windows = (stream.n - 1) // seq_len
    n_batches = max(1, min(n_batches, n_windows // batch_size)) if n_windows >= batch_size else 1
    out = []
    for b in range(n_batches):
        rows = [stream.read(w * seq_len, w * seq_len + seq_len + 1)
                for w in range(b * batch_size, min((b + 1) * batch_size, n_windows))]
        if not rows:
            raise C2CError(f"validation split has {stream.n} tokens, too few for one window of {seq_len + 1}")
        t = torch.from_numpy(np.stack(rows))
        out.append((t[:, :-1].contiguous(), t[:, 1:].contiguous()))
    return out


def tokenize_corpus(corpus_path: Path, tok, out_dir: Path, shard_tokens: int = 50_000_000,
                    batch_docs: int = 1024) -> dict:
    """corpus.jsonl ({"text", "split"}) → {train,val}_NNNNNN.bin, every document preceded by <|bos|>."""
    from tqdm.auto import tqdm

    from crawl2chat.common import iter_jsonl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.bin"):
        old.unlink()
    buffers = {"train": [], "val": []}
    counts = {"train": 0, "val": 0}
    docs = {"train": 0, "val": 0}
    shard_idx = {"train": 0, "val": 0}

    def flush(split: str, final: bool = False):
        buf = buffers[split]
        while buf and (final or sum(len(b) for b in buf) >= shard_tokens):
            tokens = np.concatenate(buf)
            write_shard(out_dir / f"{split}_{shard_idx[split]:06d}.bin", tokens[:shard_tokens], tok.vocab_size)
            shard_idx[split] += 1
            buffers[split] = buf = [tokens[shard_tokens:]] if len(tokens) > shard_tokens else []

    pending: list[tuple[str, str]] = []

    def encode_pending():
        for (split, _), ids in zip(pending, tok.encode_batch([t for _, t in pending])):
            buffers[split].append(np.asarray([tok.bos_id] + ids, dtype=np.int64))
            counts[split] += len(ids) + 1
            docs[split] += 1
        pending.clear()
        for s in buffers:
            flush(s)

    for lineno, doc in tqdm(iter_jsonl(corpus_path), desc="tokenize", unit="doc", leave=False):
        text = doc.get("text")
        if not isinstance(text, str):
            raise C2CError(f"{corpus_path}:{lineno}: document has no \"text\" string")
        if text.strip():
            pending.append(("val" if doc.get("split") == "val" else "train", text))
        if len(pending) >= batch_docs:
            encode_pending()
    encode_pending()
    if counts["train"] == 0:
        raise C2CError(f"{corpus_path}: no training text in the corpus")
    if counts["val"] == 0:
        raise C2CError(f"{corpus_path}: no validation documents (split == \"val\") in the corpus")
    for s in buffers:
        flush(s, final=True)
    return {"train_tokens": counts["train"], "val_tokens": counts["val"], "train_docs": docs["train"],
            "val_docs": docs["val"], "dtype": np.dtype(dtype_for(tok.vocab_size)).name,
            "shards": {s: shard_idx[s] for s in shard_idx}}
