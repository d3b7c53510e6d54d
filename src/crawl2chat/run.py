"""Runs the stages in order; a stage whose metrics.json exists with the same fingerprint is skipped,
so an interrupted run resumes where it stopped."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from rich.console import Console

from crawl2chat.common import C2CError, atomic_write_json, is_main_process, read_json, shared_data
from crawl2chat.config import Config, fingerprint, from_dict, get_preset

console = Console(stderr=True)


def stage_world(run_dir: Path, cfg: Config, **_) -> dict:
    from crawl2chat import world
    from crawl2chat.crawl import write_crawl
    built = world.build_world(cfg.world)
    metrics = world.write_world(built, run_dir / "world")
    metrics["crawl"] = write_crawl(built, run_dir / "world", seed=cfg.world.seed)
    return metrics


def stage_data(run_dir: Path, cfg: Config, **_) -> dict:
    from crawl2chat.common import iter_jsonl
    from crawl2chat.data import run_data
    if cfg.data.inputs:
        stats = run_data([Path(p) for p in cfg.data.inputs], run_dir / "data", cfg.data)
    else:  # the world's crawl; its labels score the result, its val pages stay held out
        world_dir = run_dir / "world"
        val = {row["url"] for _, row in iter_jsonl(world_dir / "corpus.jsonl") if row.get("split") == "val"}
        stats = run_data([world_dir / "crawl"], run_dir / "data", cfg.data,
                         truth=world_dir / "crawl_truth.jsonl", val_urls=val)
    return {k: v for k, v in stats.items() if k not in ("read_errors", "steps", "funnel")}


def stage_index(run_dir: Path, cfg: Config, **_) -> dict:
    from crawl2chat.tools import build_index, default_sources
    return build_index(default_sources(run_dir), run_dir / "search")


def stage_tokenizer(run_dir: Path, cfg: Config, **_) -> dict:
    from crawl2chat.tokenizer import train_tokenizer_stage
    c4 = shared_data("text/llamafactory/c4_demo.jsonl")
    return train_tokenizer_stage(corpus_path(run_dir), run_dir / "tokenizer", cfg.tokenizer.vocab_size, c4,
                                 cfg.tokenizer.max_digits)


def stage_tokenize(run_dir: Path, cfg: Config, **_) -> dict:
    from crawl2chat.shards import tokenize_corpus
    from crawl2chat.tokenizer import Tokenizer
    return tokenize_corpus(corpus_path(run_dir), Tokenizer.load(run_dir / "tokenizer"), run_dir / "tokens")


def stage_pretrain(run_dir: Path, cfg: Config, resume: bool = False, **_) -> dict:
    from crawl2chat.pretrain import run_pretrain
    return run_pretrain(run_dir, cfg, resume=resume)


def stage_sft(run_dir: Path, cfg: Config, resume: bool = False, **_) -> dict:
    from crawl2chat.sft import run_sft
    return run_sft(run_dir, cfg, resume=resume)


def stage_idk(run_dir: Path, cfg: Config, resume: bool = False, **_) -> dict:
    from crawl2chat.idk import run_idk
    return run_idk(run_dir, cfg, cfg.idk, cfg.idk_train, resume=resume)


def stage_rl(run_dir: Path, cfg: Config, resume: bool = False, **_) -> dict:
    from crawl2chat.rl import run_rl
    return run_rl(run_dir, cfg, resume=resume)


def stage_rm(run_dir: Path, cfg: Config, resume: bool = False, **_) -> dict:
    from crawl2chat.rm import run_rm
    return run_rm(run_dir, cfg, cfg.rm, cfg.rm_train, resume=resume)


def stage_rlhf(run_dir: Path, cfg: Config, resume: bool = False, **_) -> dict:
    from crawl2chat.rlhf import run_rlhf
    return run_rlhf(run_dir, cfg, cfg.rlhf, cfg.rlhf_train, resume=resume)


def corpus_path(run_dir: Path) -> Path:
    return run_dir / "data" / "corpus.jsonl"


# name → (function, output folder, the config sections its result depends on)
STAGES: dict[str, tuple[Callable[..., dict], str, Callable[[Config], list]]] = {
    "world": (stage_world, "world", lambda c: [c.world]),
    "data": (stage_data, "data", lambda c: [c.data]),
    "index": (stage_index, "search", lambda c: []),
    "tokenizer": (stage_tokenizer, "tokenizer", lambda c: [c.tokenizer]),
    "tokenize": (stage_tokenize, "tokens", lambda c: []),
    "pretrain": (stage_pretrain, "base", lambda c: [c.model, c.pretrain]),
    "sft": (stage_sft, "sft", lambda c: [c.chat_data, c.sft]),
    "idk": (stage_idk, "idk", lambda c: [c.idk, c.idk_train]),
    "rl": (stage_rl, "rl", lambda c: [c.grpo, c.rl]),
    "rm": (stage_rm, "rm", lambda c: [c.rm, c.rm_train]),
    "rlhf": (stage_rlhf, "rlhf", lambda c: [c.rlhf, c.rlhf_train]),
}


def stage_fingerprints(cfg: Config) -> dict[str, str]:
    """Each stage's fingerprint chains those of the stages before it."""
    out, prev = {}, ""
    for name, (_, _, parts) in STAGES.items():
        prev = out[name] = fingerprint(prev, name, *parts(cfg))
    return out


def resolve_config(run_dir: Path, preset: str | None, overrides: list[str]) -> Config:
    """The preset (or the run's saved config, or tiny) with --set key=value overrides applied."""
    saved = run_dir / "config.json"
    if preset is None and saved.exists():
        cfg = from_dict(read_json(saved, "run config"))
    else:
        cfg = get_preset(preset or "tiny")
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: Config, item: str) -> None:
    if "=" not in item:
        raise C2CError(f"--set expects section.field=value, got {item!r}")
    key, value = item.split("=", 1)
    parts = key.split(".")
    obj = cfg
    for p in parts[:-1]:
        if not hasattr(obj, p):
            raise C2CError(f"--set {key}: no config section {p!r}")
        obj = getattr(obj, p)
    field = parts[-1]
    if not hasattr(obj, field):
        raise C2CError(f"--set {key}: no field {field!r} in {type(obj).__name__}")
    current = getattr(obj, field)
    try:
        if isinstance(current, bool):
            parsed = value.lower() in ("1", "true", "yes", "on")
        elif isinstance(current, (int, float, str)):
            parsed = type(current)(value)
        else:
            parsed = json.loads(value)
    except ValueError:
        raise C2CError(f"--set {key}: {value!r} is not a valid {type(current).__name__}") from None
    setattr(obj, field, parsed)


def run_stage(name: str, run_dir: Path, cfg: Config, force: bool = False, **kwargs) -> dict:
    fn, folder, _ = STAGES[name]
    fp = stage_fingerprints(cfg)[name]
    metrics_path = run_dir / folder / "metrics.json"
    if not force and not kwargs.get("resume") and metrics_path.exists():
        old = read_json(metrics_path)
        if old.get("fingerprint") == fp:
            console.print(f"[dim]{name}: complete, skipped ({metrics_path})[/dim]")
            return old
    console.print(f"[bold]{name}[/bold] → {run_dir / folder}")
    t0 = time.time()
    metrics = fn(run_dir, cfg, **kwargs)
    metrics = {**metrics, "wall_s": round(time.time() - t0, 3), "fingerprint": fp}
    if is_main_process():
        atomic_write_json(metrics_path, metrics)
        update_report(run_dir)
    return metrics


def update_report(run_dir: Path) -> dict:
    report = {}
    for name, (_, folder, _) in STAGES.items():
        p = run_dir / folder / "metrics.json"
        if p.exists():
            report[name] = {k: v for k, v in read_json(p).items() if k != "fingerprint"}
    atomic_write_json(run_dir / "report.json", report)
    return report


def save_config(run_dir: Path, cfg: Config) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "config.json", asdict(cfg))


def run_all(run_dir: Path, cfg: Config, until: str | None = None, force: bool = False) -> dict:
    save_config(run_dir, cfg)
    t0 = time.time()
    for name in STAGES:
        run_stage(name, run_dir, cfg, force=force)
        if name == until:
            break
    report = update_report(run_dir)
    from crawl2chat.report import write_report
    write_report(run_dir)
    console.print(f"[green]done[/green] in {time.time() - t0:.0f}s → {run_dir / 'report.json'}")
    return report
