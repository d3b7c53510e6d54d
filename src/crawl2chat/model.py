"""The GPT: rotary embeddings, parameter-free RMSNorm, QK-norm, SwiGLU MLP, untied embeddings,
scaled_dot_product_attention and a preallocated KV cache. The layout matches Qwen3 (norm weights of
one, no biases), so a checkpoint exports to Hugging Face unchanged."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from crawl2chat.common import C2CError


@dataclass
class GPTConfig:
    vocab_size: int
    depth: int
    n_embd: int
    n_head: int
    head_dim: int
    mlp_hidden: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    # surprisal input (GPT.input_surprisal): the ids of the tokens that open and close a user message;
    # -1 = off, and the model is a plain Qwen3-layout GPT
    surprisal_open: int = -1
    surprisal_close: int = -1
    surprisal_all: bool = False  # read it at every token after the first (a reward model judging replies)
    # read it from a frozen copy of the model the input was added to (GPT.surprisal_model, saved with
    # the weights), not from the weights being trained
    surprisal_frozen: bool = False
    # the abstention threshold (idk.calibrate_abstention, engine.gate_abstention): at a reply's first
    # token (after the id `reply_open`) the first tokens of "I don't know" (`abstain_ids`) stay possible
    # only where the model gives them at least `abstain_threshold` together; 0 = off
    reply_open: int = -1
    abstain_ids: list = field(default_factory=list)
    abstain_threshold: float = 0.0

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, seq_len: int, aspect_ratio: int = 64, head_dim: int = 64):
        """Width and heads follow from depth, as in nanochat: width = depth * aspect_ratio."""
        n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
        mlp_hidden = -(-(8 * n_embd // 3) // 128) * 128
        return cls(vocab_size=vocab_size, depth=depth, n_embd=n_embd, n_head=n_embd // head_dim,
                   head_dim=head_dim, mlp_hidden=mlp_hidden, seq_len=seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        try:
            return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
        except TypeError as e:
            raise C2CError(f"model config is incomplete: {e}") from None


def plain_config(cfg: GPTConfig) -> GPTConfig:
    """The GPT shape of cfg (a subclass's extra fields dropped) with no surprisal input."""
    base = GPTConfig(**{f.name: getattr(cfg, f.name) for f in fields(GPTConfig)})
    return replace(base, surprisal_open=-1, surprisal_close=-1, surprisal_all=False, surprisal_frozen=False,
                   reply_open=-1, abstain_ids=[], abstain_threshold=0.0)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),), eps=eps)


# centres (nats) of the soft bins a token's surprisal is read through: the input can then express any
# smooth function of it, a threshold included
SURPRISAL_BINS = (0.0, 1.0, 2.0, 3.0, 4.5, 6.0, 8.0, 11.0)


def surprisal_bins(s: torch.Tensor, on: torch.Tensor) -> torch.Tensor:
    """Surprisal [B, T] (nats) and where it counts [B, T] → features [B, T, len(SURPRISAL_BINS)]:
    Gaussian bumps one nat wide, zero where `on` is False; beyond the last centre it reads as the last."""
    c = torch.tensor(SURPRISAL_BINS, device=s.device, dtype=torch.float32)
    return torch.exp(-(s.float().clamp(max=c[-1])[..., None] - c) ** 2) * on[..., None]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class DecodeWeights:
    """The matmul weights laid out for decoding: transposed to [in, out] and contiguous, with each layer's
    q|k|v and gate|up stacked into one matrix. A decode step at small batch is bound by op count and by
    reading the weights: one matmul where there were three, and x @ w reads faster than F.linear(x, W)
    on a CPU (measured: 35 vs 53 µs for a 256×768 matrix)."""
    qkv: list
    o: list
    gate_up: list
    down: list
    lm_head: torch.Tensor


class KVCache:
    """Preallocated keys/values for every layer: [depth, batch, heads, max_len, head_dim]. With `fused`
    (GPT.decode_weights()), the cached forward uses the decoding layout of the weights."""

    def __init__(self, cfg: GPTConfig, batch_size: int, max_len: int, device, dtype,
                 fused: DecodeWeights | None = None):
        shape = (cfg.depth, batch_size, cfg.n_head, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers = [self.k[i] for i in range(cfg.depth)]  # per-layer views (not unbind: written in place)
        self.v_layers = [self.v[i] for i in range(cfg.depth)]
        self.pos = 0
        self.max_len = max_len
        self.key_mask: torch.Tensor | None = None  # [batch, max_len], False on left padding (ragged batches)
        # per-row rotary positions: the real (key_mask True) tokens each row holds. With it, a row may have
        # masked columns anywhere (a chunk left-padded mid-sequence, a row waiting while others decode)
        # and still sees its own tokens at their true distances. None: the column is the position
        self.row_pos: torch.Tensor | None = None
        self.fused = fused

    def reset(self):
        self.pos = 0

    def keep_rows(self, rows: torch.Tensor):
        """Keep only these batch rows (the others finished generating)."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self.k_layers = list(self.k.unbind(0))  # views into the new storage, written in place as before
        self.v_layers = list(self.v.unbind(0))
        if self.key_mask is not None:
            self.key_mask = self.key_mask[rows]
        if self.row_pos is not None:
            self.row_pos = self.row_pos[rows]

    def reserve(self, columns: int):
        """Room for at least `columns` columns (reallocated, contents kept, new key_mask columns True)."""
        if columns <= self.max_len:
            return
        grow = columns - self.max_len
        pad = lambda t: torch.cat([t, t.new_zeros(*t.shape[:3], grow, t.shape[4])], dim=3)
        self.k, self.v = pad(self.k), pad(self.v)
        self.k_layers, self.v_layers = list(self.k.unbind(0)), list(self.v.unbind(0))
        if self.key_mask is not None:
            self.key_mask = torch.cat([self.key_mask, self.key_mask.new_ones(self.key_mask.size(0), grow)], 1)
        self.max_len = columns


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        inner = cfg.n_head * cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, inner, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, inner, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, inner, bias=False)
        self.o_proj = nn.Linear(inner, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None, doc_mask: torch.Tensor | None = None):
        B, T, _ = x.shape
        H, D, eps = self.cfg.n_head, self.cfg.head_dim, self.cfg.norm_eps
        if cache is not None and cache.fused is not None:  # sin is signed here: see GPT.rope_sin_signed
            q, k, v = self.fused_qkv(x, cache.fused.qkv[self.layer], cos, sin)
        else:
            q = rms_norm(self.q_proj(x).view(B, T, H, D), eps).transpose(1, 2)
            k = rms_norm(self.k_proj(x).view(B, T, H, D), eps).transpose(1, 2)
            v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
        if cache is None:
            y = (F.scaled_dot_product_attention(q, k, v, is_causal=True) if doc_mask is None
                 else F.scaled_dot_product_attention(q, k, v, attn_mask=doc_mask))
        else:
            p = cache.pos
            k_all, v_all = cache.k_layers[self.layer], cache.v_layers[self.layer]
            k_all[:, :, p:p + T] = k
            v_all[:, :, p:p + T] = v
            k, v = k_all[:, :, :p + T], v_all[:, :, :p + T]
            if cache.key_mask is not None:  # left-padded rows: padding keys are never attended to
                seen = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
                own = torch.zeros_like(seen)
                own[:, p:] = torch.eye(T, dtype=torch.bool, device=x.device)  # padding queries see themselves: no NaN
                mask = (seen & cache.key_mask[:, None, None, :p + T]) | own
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            elif T == 1:
                y = F.scaled_dot_product_attention(q, k, v)
            elif p == 0:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:  # a chunk appended after a prefix: query i sees keys up to p + i
                mask = torch.ones(T, p + T, dtype=torch.bool, device=x.device).tril(diagonal=p)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(1, 2).reshape(B, T, H * D)
        return self.o_proj(y) if cache is None or cache.fused is None else y @ cache.fused.o[self.layer]

    def fused_qkv(self, x, w_qkv, cos, sin_signed):
        """q, k, v [B, H, T, D] from one matmul with the stacked weight; q and k normed and rotated together."""
        B, T, _ = x.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        qkv = (x @ w_qkv).view(B, T, 3 * H, D)
        qk = rms_norm(qkv[:, :, :2 * H], self.cfg.norm_eps).transpose(1, 2)
        qk = qk * cos + qk.roll(D // 2, -1) * sin_signed  # rotate_half(x) * sin == roll(x) * signed sin
        q, k = qk.split(H, dim=1)
        return q, k, qkv[:, :, 2 * H:].transpose(1, 2)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x, fused: tuple | None = None):
        if fused is not None:  # decoding layout: ([gate | up], down), transposed
            g, u = (x @ fused[0]).chunk(2, dim=-1)
            return (F.silu(g) * u) @ fused[1]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, layer: int):
        super().__init__()
        self.eps = cfg.norm_eps
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache, doc_mask=None):
        x = x + self.attn(rms_norm(x, self.eps), cos, sin, cache, doc_mask)
        i, fused = self.attn.layer, cache.fused if cache is not None else None
        return x + self.mlp(rms_norm(x, self.eps), (fused.gate_up[i], fused.down[i]) if fused is not None else None)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.depth)])
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        # reads the model's own surprisal at each user token (input_surprisal); zero at first, so turning
        # it on changes nothing until it is trained
        self.surprisal_in = (nn.Linear(len(SURPRISAL_BINS), cfg.n_embd, bias=False)
                             if cfg.surprisal_open >= 0 else None)
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32) / cfg.head_dim))
        freqs = torch.outer(torch.arange(cfg.seq_len, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rope_cos", emb.cos(), persistent=False)
        self.register_buffer("rope_sin", emb.sin(), persistent=False)
        sign = torch.cat((-torch.ones(cfg.head_dim // 2), torch.ones(cfg.head_dim // 2)))
        self.register_buffer("rope_sin_signed", emb.sin() * sign, persistent=False)
        self.doc_start: int | None = None  # see document_mask
        self.surprisal_source: GPT | None = None  # see set_surprisal_source
        self.reset_parameters()
        # the model the surprisal input is read from, as it was when the input was added (with_surprisal_input):
        # fine-tuning on questions about people the model does not know teaches it their names, and its own
        # surprisal at names of that kind falls (held-out unknown people: median 9.7 → 8.1 nats) while the
        # reply it learned stays "I don't know"; the frozen copy keeps seeing them as the strangers they are,
        # in training and in use. Never trained; not counted in num_params
        self.surprisal_model = (GPT(plain_config(cfg)).requires_grad_(False)
                                if cfg.surprisal_open >= 0 and cfg.surprisal_frozen else None)

    @torch.no_grad()
    def reset_parameters(self):
        nn.init.normal_(self.embed.weight, std=1.0)
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.q_proj, block.attn.k_proj, block.attn.v_proj, block.mlp.gate_proj, block.mlp.up_proj):
                bound = math.sqrt(3.0 / lin.in_features)
                nn.init.uniform_(lin.weight, -bound, bound)
            nn.init.zeros_(block.attn.o_proj.weight)
            nn.init.zeros_(block.mlp.down_proj.weight)
        if self.surprisal_in is not None:
            nn.init.zeros_(self.surprisal_in.weight)

    def document_mask(self, idx: torch.Tensor) -> torch.Tensor | None:
        """With `doc_start` set (a token id that opens every document, e.g. <|bos|>), the attention mask
        [B, 1, T, T] of rows that pack several documents: causal, and no token sees an earlier document.
        Fine-tuning packs several conversations into a row; without the mask the last one sees the
        search results of the others, where the same sentence shape holds other values, and copying
        from the context is what the model learns not to do."""
        if self.doc_start is None:
            return None
        doc = (idx == self.doc_start).cumsum(1)
        T = idx.size(1)
        causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
        return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

    def user_mask(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, T] True on the tokens strictly inside a user message (between surprisal_open and _close),
        or on every token after the first with surprisal_all."""
        if self.cfg.surprisal_all:
            return torch.arange(idx.size(1), device=idx.device).expand_as(idx) > 0
        opened = (idx == self.cfg.surprisal_open).long().cumsum(1)
        closed = (idx == self.cfg.surprisal_close).long().cumsum(1)
        return (opened > closed) & (idx != self.cfg.surprisal_open)

    @torch.no_grad()
    def input_surprisal(self, idx: torch.Tensor, attn_mask: torch.Tensor | None, cos, sin) -> torch.Tensor:
        """-log p(token | the tokens before it), [B, T] (0 at the first position), from a pass of this
        model with the surprisal input off (or of `surprisal_source`, when set). The signal of whether the
        model knows a name lives only in its next-token predictions (no hidden state carries it); as an
        input, the model can act on it."""
        src = self.surprisal_source if self.surprisal_source is not None else (
            self.surprisal_model if self.surprisal_model is not None else self)
        x = src.embed(idx)
        for block in src.blocks:
            x = block(x, cos, sin, None, attn_mask)
        logp = src.lm_head(rms_norm(x, self.cfg.norm_eps))[:, :-1].float().log_softmax(-1)
        s = torch.zeros(idx.shape, device=idx.device)
        s[:, 1:] = -logp.gather(-1, idx[:, 1:, None])[..., 0]
        return s

    def embed_input(self, idx: torch.Tensor, cos, sin, attn_mask: torch.Tensor | None, pos: int = 0,
                    key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings, plus the surprisal input on user tokens when the model has one. Only a
        sequence given from its start (pos 0) gets it: a continuation chunk never holds user text in
        generation."""
        x = self.embed(idx)
        if self.surprisal_in is None:
            return x
        on = self.user_mask(idx) if pos == 0 else torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
        if on.any():
            T = idx.size(1)
            if key_mask is not None:  # left-padded rows: the padding is never attended to
                eye = torch.eye(T, dtype=torch.bool, device=idx.device)
                attn_mask = ((torch.ones_like(eye).tril() & key_mask[:, None, :T]) | eye)[:, None]
            # the pass is causal: it need not go past the last user token (the rest of a conversation
            # is often longer than its user messages: RL's completions, a reply being generated). Not
            # under torch.compile: a length read from the data would break the graph (packed rows hold
            # user messages to their end anyway)
            end = T if torch.compiler.is_compiling() else int(on.any(0).nonzero().max()) + 1
            if end == T:
                s = self.input_surprisal(idx, attn_mask, cos, sin)
            else:
                s = torch.zeros(idx.shape, device=idx.device)
                s[:, :end] = self.input_surprisal(idx[:, :end], attn_mask[..., :end, :end] if attn_mask is not None
                                                  else None, cos[:end], sin[:end])
        else:  # still through the layer, so every step gives its weight a (zero) gradient under DDP
            s = torch.zeros(idx.shape, device=idx.device)
        return x + self.surprisal_in(surprisal_bins(s, on).to(x.dtype))

    def forward(self, idx, targets=None, cache: KVCache | None = None, reduction: str = "mean"):
        """idx [B, T] → logits [B, T, V]; with targets (-1 = ignored) → the loss instead."""
        B, T = idx.shape
        pos = cache.pos if cache is not None else 0
        dtype = self.embed.weight.dtype
        sin_table = self.rope_sin_signed if cache is not None and cache.fused is not None else self.rope_sin
        if cache is not None and cache.row_pos is not None:
            if pos + T > cache.max_len:
                raise ValueError(f"{pos + T} columns do not fit the cache ({cache.max_len}): KVCache.reserve")
            real = cache.key_mask[:, pos:pos + T]
            at = (cache.row_pos[:, None] + real.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
            cache.row_pos = cache.row_pos + real.sum(1)
            if int(cache.row_pos.max()) > self.cfg.seq_len:
                raise ValueError(f"a row of {int(cache.row_pos.max())} tokens is longer than the context ({self.cfg.seq_len})")
            cos, sin = self.rope_cos[at][:, None], sin_table[at][:, None]  # [B, 1, T, D]: per row
        else:
            if pos + T > self.cfg.seq_len:
                raise ValueError(f"sequence of {pos + T} tokens is longer than the context ({self.cfg.seq_len})")
            cos, sin = self.rope_cos[pos:pos + T], sin_table[pos:pos + T]
        if cos.dtype != dtype:
            cos, sin = cos.to(dtype), sin.to(dtype)
        doc_mask = self.document_mask(idx) if cache is None else None
        if self.surprisal_in is None:
            x = self.embed(idx)
        else:  # the surprisal pass runs on the plain weights: rotary sin unsigned
            x = self.embed_input(idx, self.rope_cos[pos:pos + T].to(dtype), self.rope_sin[pos:pos + T].to(dtype),
                                 doc_mask, pos, cache.key_mask if cache is not None else None)
        for block in self.blocks:
            x = block(x, cos, sin, cache, doc_mask)
        if cache is not None:
            cache.pos += T
        x = rms_norm(x, self.cfg.norm_eps)
        logits = self.lm_head(x) if cache is None or cache.fused is None else x @ cache.fused.lm_head
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1, reduction=reduction)

    def decode_step(self, idx: torch.Tensor, pos: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """One new token per row: idx [B, 1] at position pos (a one-element LongTensor) → logits [B, V].
        The whole preallocated cache is attended under a position mask, so no shape depends on the
        position and torch.compile builds one graph for every step (engine.generate_batch(compile=True))."""
        c, B, L = self.cfg, idx.size(0), cache.max_len
        visible = torch.arange(L, device=idx.device) <= pos
        mask = (visible.view(1, 1, 1, L) if cache.key_mask is None
                else (visible & cache.key_mask).view(B, 1, 1, L))
        dtype = self.embed.weight.dtype
        cos = self.rope_cos.index_select(0, pos).to(dtype)
        sin = self.rope_sin_signed.index_select(0, pos).to(dtype)
        x = self.embed(idx)
        w = cache.fused
        for i, block in enumerate(self.blocks):
            q, k, v = block.attn.fused_qkv(rms_norm(x, c.norm_eps), w.qkv[i], cos, sin)
            cache.k_layers[i].index_copy_(2, pos, k)
            cache.v_layers[i].index_copy_(2, pos, v)
            y = F.scaled_dot_product_attention(q, cache.k_layers[i], cache.v_layers[i], attn_mask=mask)
            x = x + y.transpose(1, 2).reshape(B, 1, c.n_head * c.head_dim) @ w.o[i]
            x = x + block.mlp(rms_norm(x, c.norm_eps), (w.gate_up[i], w.down[i]))
        return (rms_norm(x, c.norm_eps) @ w.lm_head)[:, -1]

    @torch.no_grad()
    def decode_weights(self) -> DecodeWeights:
        """A copy of the matmul weights in the decoding layout (DecodeWeights), for a KVCache."""
        def t(*ws):
            return torch.cat(ws).t().contiguous()
        a = [b.attn for b in self.blocks]
        m = [b.mlp for b in self.blocks]
        return DecodeWeights(qkv=[t(x.q_proj.weight, x.k_proj.weight, x.v_proj.weight) for x in a],
                             o=[t(x.o_proj.weight) for x in a],
                             gate_up=[t(x.gate_proj.weight, x.up_proj.weight) for x in m],
                             down=[t(x.down_proj.weight) for x in m], lm_head=t(self.lm_head.weight))

    def with_surprisal_input(self, open_id: int, close_id: int, everywhere: bool = False,
                             frozen: bool = False) -> "GPT":
        """A copy of this model that also reads its own surprisal at the tokens between open_id and
        close_id (a user message's delimiters), or at every token (everywhere); it predicts exactly as
        this one until trained (a surprisal input it already has is kept). With frozen, the surprisal is
        read from a frozen copy of this model as it is now (surprisal_model), however the copy's own
        weights are trained later; a frozen copy it already has is kept."""
        frozen = frozen or self.cfg.surprisal_frozen
        new = type(self)(replace(self.cfg, surprisal_open=open_id, surprisal_close=close_id, surprisal_all=everywhere,
                                 surprisal_frozen=frozen))
        missing, unexpected = new.load_state_dict(self.state_dict(), strict=False)
        copied = {f"surprisal_model.{k}" for k in new.surprisal_model.state_dict()} if self.surprisal_model is None and frozen else set()
        assert set(missing) <= {"surprisal_in.weight"} | copied and not unexpected, (missing, unexpected)
        if copied:
            new.surprisal_model.load_state_dict({k: v for k, v in self.state_dict().items() if not k.startswith("surprisal_in.")
                                                 and k in new.surprisal_model.state_dict()})
        new.doc_start = self.doc_start
        return new.to(self.embed.weight.device)

    def set_surprisal_source(self, model: "GPT | None") -> None:
        """Read the surprisal input from a frozen `model` instead of this one (None: this one again).
        Fine-tuning on questions about people the model does not know teaches it their names, and
        its own surprisal at them falls while the reply to learn stays "I don't know"; the model it
        started from keeps seeing them as the strangers they are. Not a submodule: no weights of it
        are trained or saved."""
        if model is not None:
            model = model.eval().requires_grad_(False)
        object.__setattr__(self, "surprisal_source", model)

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("surprisal_model."))
        return n - self.embed.weight.numel() if non_embedding else n

    def flops_per_token(self) -> float:
        """Training FLOPs per token, as nanochat counts them: 6 × matmul weights + the attention term."""
        c = self.cfg
        return 6 * self.num_params(non_embedding=True) + 12 * c.depth * c.n_head * c.head_dim * c.seq_len
