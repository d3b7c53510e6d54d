"""`c2c export --format hf`: a trained model as a Hugging Face Qwen3 checkpoint (for transformers, and any
engine that runs Qwen3 such as vLLM).

Our GPT has Qwen3's layout, so the export only renames tensors and writes configuration files:

    ours                              Hugging Face (Qwen3ForCausalLM)
    embed.weight                      model.embed_tokens.weight
    blocks.i.attn.{q,k,v,o}_proj      model.layers.i.self_attn.{q,k,v,o}_proj
    blocks.i.mlp.{gate,up,down}_proj  model.layers.i.mlp.{gate,up,down}_proj
    lm_head.weight                    lm_head.weight
    (parameter-free RMSNorms)         input_layernorm, post_attention_layernorm, q_norm, k_norm,
                                      model.norm: weights of ones

Only safetensors and json are needed here; transformers is not imported.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from crawl2chat.chat_template import CHAT_TEMPLATE
from crawl2chat.common import C2CError, atomic_write_bytes, atomic_write_json
from crawl2chat.model import GPT
from crawl2chat.tokenizer import FILE_NAME, SPECIAL_TOKENS, Tokenizer

STAGES = ("rlhf", "rl", "idk", "sft", "base")  # latest first
DTYPES = {"fp32": (torch.float32, "float32"), "bf16": (torch.bfloat16, "bfloat16"), "fp16": (torch.float16, "float16")}
ARCH = "Qwen3ForCausalLM"
EOS, PAD = "<|assistant_end|>", "<|pad|>"


def hf_state_dict(model: GPT, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our parameters under Hugging Face Qwen3 names, plus the norm weights (ones) Qwen3 expects."""
    cfg = model.cfg
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        if name == "surprisal_in.weight" or name.startswith("surprisal_model."):
            continue  # Qwen3 has no such input: see SURPRISAL_NOTE
        if name == "embed.weight":
            hf = "model.embed_tokens.weight"
        elif name == "lm_head.weight":
            hf = name
        elif parts[0] == "blocks" and parts[2] == "attn":
            hf = f"model.layers.{parts[1]}.self_attn.{'.'.join(parts[3:])}"
        elif parts[0] == "blocks" and parts[2] == "mlp":
            hf = f"model.layers.{parts[1]}.mlp.{'.'.join(parts[3:])}"
        else:
            raise C2CError(f"export: tensor {name!r} has no Qwen3 counterpart")
        out[hf] = t.detach().to("cpu", dtype).contiguous()
    ones = lambda n: torch.ones(n, dtype=dtype)  # noqa: E731 - a fresh tensor each time (no shared storage)
    for i in range(cfg.depth):
        out[f"model.layers.{i}.input_layernorm.weight"] = ones(cfg.n_embd)
        out[f"model.layers.{i}.post_attention_layernorm.weight"] = ones(cfg.n_embd)
        out[f"model.layers.{i}.self_attn.q_norm.weight"] = ones(cfg.head_dim)
        out[f"model.layers.{i}.self_attn.k_norm.weight"] = ones(cfg.head_dim)
    out["model.norm.weight"] = ones(cfg.n_embd)
    return out


def hf_config(model: GPT, dtype: str = "fp32", bos_id: int | None = None, eos_id: int | None = None,
              pad_id: int | None = None) -> dict:
    """config.json for Qwen3ForCausalLM. rope_theta is written both at the top level (transformers 4.x,
    vLLM) and in rope_parameters (transformers 5.x)."""
    c = model.cfg
    return {
        "architectures": [ARCH],
        "model_type": "qwen3",
        "vocab_size": c.vocab_size,
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.depth,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.n_head,  # no grouped-query attention: every head has its own keys/values
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": c.depth,
        "use_cache": True,
        "initializer_range": 0.02,
        "torch_dtype": DTYPES[dtype][1],
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
    }


def write_hf_model(model: GPT, out_dir: Path, dtype: str = "fp32", bos_id: int | None = None,
                   eos_id: int | None = None, pad_id: int | None = None) -> None:
    """model.safetensors + config.json only (what transformers needs to load the weights)."""
    if dtype not in DTYPES:
        raise C2CError(f"export: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / ".model.safetensors.tmp"
    save_file(hf_state_dict(model, DTYPES[dtype][0]), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out_dir / "model.safetensors")
    atomic_write_json(out_dir / "config.json", hf_config(model, dtype, bos_id, eos_id, pad_id))


SURPRISAL_NOTE = ("This model was trained to read a surprisal at each user token (crawl2chat's surprisal input, "
                  "which its abstentions rest on, read from the model itself or from a frozen copy of the model it "
                  "was fine-tuned from); Qwen3 has no such input, so the export leaves it out (and the copy): "
                  "it answers as crawl2chat does on prompts without user text, and abstains less on questions "
                  "about people it does not know.")



def abstain_note(threshold: float) -> str:
    return (f"crawl2chat decodes this model with an abstention threshold ({threshold:.3f}, set by `c2c idk` for a "
            "hallucination budget): a reply may open with \"I don't know\" only where the model gives that "
            "opening at least this probability. transformers' generate() has no such rule, so the export "
            "abstains wherever the opening is the most likely token: more often on people it knows.")


def _model_card(model: GPT, model_dir: Path, dtype: str, n_params: int) -> str:
    c = model.cfg
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [crawl2chat, qwen3]
---
# {model_dir.name} (crawl2chat)

A {n_params / 1e6:.2f}M-parameter chat model trained from a web crawl with crawl2chat, exported from
`{model_dir}` as a Qwen3 checkpoint ({ARCH}, {dtype}): depth {c.depth}, width {c.n_embd}, {c.n_head} heads
of {c.head_dim}, MLP {c.mlp_hidden}, vocabulary {c.vocab_size}, context {c.seq_len} tokens,
RoPE theta {c.rope_theta:g}, RMSNorm eps {c.norm_eps:g}.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained("path/to/this/folder")
model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
ids = tok.apply_chat_template([{{"role": "user", "content": "Hello!"}}], add_generation_prompt=True,
                              return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=64, do_sample=False)
print(tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

Notes
- The model was trained with parameter-free RMSNorms; here they are Qwen3 norms with weights of one
  (the same function). Keys and values have one head per query head (`num_key_value_heads` =
  `num_attention_heads`). Logits match crawl2chat's to float rounding.
- Chat format: `<|bos|>[<|system_start|>…<|system_end|>]<|user_start|>…<|user_end|><|assistant_start|>…<|assistant_end|>`;
  generation stops at `<|assistant_end|>`. Assistant content may be a list of parts
  (`text`, `python`, `search`, `output`) for tool calls and their results.
- crawl2chat encodes message text with special tokens disabled; the chat template here produces one
  string, so a special-token string typed inside a message (e.g. `<|user_end|>`) becomes a special id.
- The context is {c.seq_len} tokens (`max_position_embeddings`); the model never saw longer sequences.
""" + (f"- {SURPRISAL_NOTE}\n" if model.surprisal_in is not None else "") + (
        f"- {abstain_note(c.abstain_threshold)}\n" if c.abstain_threshold > 0 else "")


def export_hf(model_dir: Path, tokenizer_dir: Path, out_dir: Path, dtype: str = "fp32") -> dict:
    """Write a Hugging Face Qwen3 checkpoint of the model in `model_dir` with the tokenizer of
    `tokenizer_dir` into `out_dir`; returns a summary (files, parameter count, architecture)."""
    from crawl2chat.train import load_model
    model_dir, tokenizer_dir, out_dir = Path(model_dir), Path(tokenizer_dir), Path(out_dir)
    if dtype not in DTYPES:
        raise C2CError(f"export: unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    model = load_model(model_dir)
    tok = Tokenizer.load(tokenizer_dir)
    if tok.vocab_size > model.cfg.vocab_size:
        raise C2CError(f"{tokenizer_dir / FILE_NAME}: {tok.vocab_size} tokens, more than the model's "
                       f"vocabulary ({model.cfg.vocab_size} in {model_dir / 'config.json'})")
    if out_dir.resolve() in (model_dir.resolve(), tokenizer_dir.resolve()):
        raise C2CError(f"{out_dir}: export folder must differ from the model and tokenizer folders")
    bos, eos, pad = tok.bos_id, tok.special_id(EOS), tok.special_id(PAD)

    write_hf_model(model, out_dir, dtype, bos, eos, pad)
    atomic_write_json(out_dir / "generation_config.json", {
        "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False})
    shutil.copyfile(tokenizer_dir / FILE_NAME if tokenizer_dir.is_dir() else tokenizer_dir, out_dir / FILE_NAME)
    special = {"bos_token": "<|bos|>", "eos_token": EOS, "pad_token": PAD}
    others = [s for s in SPECIAL_TOKENS if s not in special.values()]
    atomic_write_json(out_dir / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", **special,
        "additional_special_tokens": others,
        "add_bos_token": False, "add_eos_token": False,  # the chat template writes <|bos|> itself
        "clean_up_tokenization_spaces": False,
        "model_max_length": model.cfg.seq_len,
        "chat_template": CHAT_TEMPLATE})
    atomic_write_json(out_dir / "special_tokens_map.json", {**special, "additional_special_tokens": others})
    n_params = model.num_params()
    atomic_write_bytes(out_dir / "README.md", _model_card(model, model_dir, dtype, n_params).encode("utf-8"))
    files = ["model.safetensors", "config.json", "generation_config.json", FILE_NAME, "tokenizer_config.json",
             "special_tokens_map.json", "README.md"]
    return {"format": "hf", "architecture": ARCH, "out_dir": str(out_dir), "source": str(model_dir),
            "dtype": dtype, "params": n_params, "vocab_size": model.cfg.vocab_size,
            "context": model.cfg.seq_len, "files": files,
            "surprisal_input_dropped": model.surprisal_in is not None,
            "abstain_threshold_dropped": model.cfg.abstain_threshold,
            "bytes": sum((out_dir / f).stat().st_size for f in files)}


# ---------------------------------------------------------------- CLI

def register(sub) -> None:
    text = "export a trained model as a Hugging Face checkpoint (Qwen3 architecture)"
    p = sub.add_parser("export", help=text, description=text[0].upper() + text[1:] + ": model.safetensors, "
                       "config.json, tokenizer files with the chat template, and a model card. It loads "
                       "with transformers' AutoModelForCausalLM / AutoTokenizer.")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--stage", default=None,
                   help=f"model folder in the run directory (default: the latest of {', '.join(STAGES)} present)")
    p.add_argument("--model", type=Path, default=None, help="a model folder (overrides --out/--stage)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder (default: the model folder if it has tokenizer.json, else <run>/tokenizer)")
    p.add_argument("--format", default="hf", choices=["hf"], help="hf: Hugging Face safetensors (default)")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="weight dtype (default: fp32)")
    p.add_argument("--to", type=Path, default=None, help="output folder (default: <run>/export/<stage>-hf)")


def _pick_stage(run_dir: Path) -> str:
    for stage in STAGES:
        if (run_dir / stage / "model.safetensors").exists():
            return stage
    raise C2CError(f"{run_dir}: no model to export (looked for {', '.join(STAGES)}) — "
                   "train one first, or pass --model")


def cmd_export(args) -> dict:
    if args.model is not None:
        model_dir, stage = args.model, args.stage or Path(args.model).resolve().name
    else:
        stage = args.stage or _pick_stage(args.out)
        model_dir = args.out / stage
    tok_dir = args.tokenizer
    if tok_dir is None:
        tok_dir = model_dir if (Path(model_dir) / FILE_NAME).exists() else args.out / "tokenizer"
    to = args.to or args.out / "export" / f"{stage}-{args.format}"
    summary = export_hf(model_dir, tok_dir, to, dtype=args.dtype)
    print(json.dumps(summary, indent=2))
    if summary["surprisal_input_dropped"]:
        print(f"note: {SURPRISAL_NOTE}", file=sys.stderr)
    if summary["abstain_threshold_dropped"]:
        print(f"note: {abstain_note(summary['abstain_threshold_dropped'])}", file=sys.stderr)
    return summary
