"""c2c: one subcommand per stage, plus run, sample, show-tokens and bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from crawl2chat.common import C2CError

STAGE_HELP = {
    "world": "generate the synthetic world: people, pages, problems and their ground truth",
    "data": "crawl → clean corpus on datatrove (FineWeb's recipe): URL filter, extraction, language, quality, "
            "MinHash dedup, PII masking",
    "tokenizer": "train the byte-level BPE tokenizer on the corpus (tokenizer/tokenizer.json)",
    "tokenize": "turn the corpus into train/val token shards, documents joined by <|bos|>",
    "pretrain": "train the base GPT by next-token prediction (torchrun-able for DDP)",
    "sft": "fine-tune the base model on conversations, loss on the assistant's tokens only",
    "idk": "probe what the model knows, train \"I don't know\" where it is wrong, and tool use (search, Python)",
    "rl": "reinforcement learning with GRPO on problems with known answers (pass@1 before/after)",
    "rm": "train a reward model (Bradley-Terry) on preference pairs: the world's rubric-labelled subset or yours",
    "rlhf": "GRPO against the reward model, with a KL penalty and a guard that stops before reward hacking",
}


def add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<preset>)")
    p.add_argument("--preset", default=None,
                   help="tiny (CPU default), smoke (seconds, for tests), gpu-d12, gpu-d20; "
                        "default: the run directory's saved config, else tiny")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set pretrain.steps=500 (repeatable)")
    p.add_argument("--force", action="store_true", help="redo the stage even if it is complete")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="c2c", description="crawl2chat: from a raw web crawl to a chat assistant. "
        "`c2c run` runs every stage in order into one run directory; each stage also runs alone.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run every stage in order, skipping the ones already complete",
                       description="Run world → data → index → tokenizer → tokenize → pretrain → sft → idk "
                       "→ rl → rm → rlhf into the run directory, then write report.md. "
                       "A stage whose metrics.json matches the current configuration is skipped, "
                       "so an interrupted run resumes.")
    add_run_args(p)
    p.add_argument("--until", default=None, help="stop after this stage")

    for name, text in STAGE_HELP.items():
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        add_run_args(p)
        if name == "data":
            p.add_argument("inputs", nargs="*", type=Path,
                           help="WARC / JSONL / parquet files or folders of .html (default: the world's crawl)")
            p.add_argument("--workers", type=int, default=None, help="parallel datatrove tasks")
            p.add_argument("--examples", action="store_true",
                           help="show a few removed documents per filter from the last data run and exit")
        if name == "sft":
            p.add_argument("--corrections", default=None, metavar="FILE",
                           help="a review file from `c2c correct` whose corrected answers join the SFT data")
        if name == "idk":
            p.add_argument("--questions", action="append", default=[], metavar="FILE",
                           help="extra {question, answer} JSONL to probe (repeatable)")
        if name == "rm":
            p.add_argument("--pairs", action="append", default=[], metavar="FILE",
                           help="{prompt, chosen, rejected} JSONL (TRL format; repeatable)")
            p.add_argument("--hh", default=None, metavar="FILE", help="an HH-RLHF {chosen, rejected} transcript file")
            p.add_argument("--max-pairs", type=int, default=None)
        if name == "rlhf":
            p.add_argument("--no-guard", action="store_true",
                           help="never stop early, to watch reward hacking: trains into <run>/rlhf_noguard/ (the "
                                "guarded rlhf/ and the saved config stay as they are); report.md plots it. With "
                                "--kl 0 --set rlhf_train.steps=300 the tiny run's gold falls as the proxy rises")
            p.add_argument("--kl", type=float, default=None, metavar="BETA", help="KL penalty to the start policy")
        if name in ("pretrain", "sft", "idk", "rl", "rm", "rlhf"):
            p.add_argument("--resume", action="store_true",
                           help=f"continue from the latest checkpoint in <run>/{'base' if name == 'pretrain' else name}/checkpoints")

    p = sub.add_parser("sample", help="print continuations of a prompt from a model checkpoint",
                       description="Print continuations of --prompt from a trained model.")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--stage", default="base", help="model folder in the run directory (default: base)")
    p.add_argument("--model", type=Path, default=None, help="a model folder (overrides --out/--stage)")
    p.add_argument("--prompt", default="", help="text to continue (default: start of a document)")
    p.add_argument("-n", "--num-samples", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("show-tokens", help="show how a tokenizer splits text, with token ids",
                       description="Print TEXT with each token's boundary coloured, then the ids.")
    p.add_argument("text", help="the text to tokenize")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--tokenizer", type=Path, default=None, help="a tokenizer.json or its folder")

    p = sub.add_parser("correct", help="sample the model's answers into a review file for an expert to correct",
                       description="Sample the model's answers to fact questions about known people of half A "
                       "into a JSONL review file {prompt, model_answer, corrected}. An expert fills in "
                       "`corrected` (in an editor); --oracle lets the world's ground truth correct the wrong "
                       "answers. Then `c2c sft --corrections FILE` trains on them.")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--stage", default="sft", help="model folder to review (default: sft)")
    p.add_argument("--review", type=Path, default=None, help="review file (default: <run>/<stage>/review.jsonl)")
    p.add_argument("--oracle", action="store_true", help="fill in corrections from the world's ground truth")
    p.add_argument("--limit", type=int, default=None, help="review at most this many people")

    from crawl2chat.chat import build_chat_parser, register_serve
    from crawl2chat.export import register as register_export
    from crawl2chat.tools import register_index
    build_chat_parser(sub)
    register_index(sub)
    register_serve(sub)
    register_export(sub)
    from crawl2chat.label import register_label
    register_label(sub)

    sub.add_parser("doctor", help="what this machine offers: torch, devices, bf16 speed, the Python sandbox",
                   description="Print what this machine offers crawl2chat: torch version, CUDA devices, whether "
                   "bf16 is faster than fp32 here, and what the Python tool's sandbox can enforce (network "
                   "namespace, filesystem jail, limits).")

    p = sub.add_parser("report", help="write <run>/report.md with every stage's metrics and PNG plots",
                       description="Write report.md and PNG plots (loss curves, data funnel, RL reward and "
                       "pass@1, RLHF proxy vs gold) from the run directory. `c2c run` does this at the end.")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")

    p = sub.add_parser("bench", help="benchmarks, each beside a baseline measured in the same run",
                       description="Run benchmarks and write bench.json: each figure beside a baseline "
                       "measured in the same run, as a ratio.")
    p.add_argument("what", nargs="?", default="all", choices=["all", "train", "tokenizer", "generate", "data", "rl", "gpu"],
                   help="which benchmark; `all` is every CPU one, `gpu` the GPU presets' MFU beside a plain "
                   "nanoGPT-style baseline (needs a CUDA GPU; --tiny runs its code paths anywhere)")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="where to write the JSON (default: bench.json)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps per configuration")
    p.add_argument("--variants", default=None,
                   help="gpu: comma-separated variants, in order, named <ours|plain>-<d12|d20>[+hd<N>][+b<N>][+cudnn][+ddp1] "
                   "(default: bench_gpu.DEFAULT_VARIANTS)")
    p.add_argument("--warmup", type=int, default=3, help="gpu: untimed steps first (compilation happens there)")
    p.add_argument("--budget-s", type=float, default=480, help="gpu: start no variant after this many seconds")
    p.add_argument("--tiny", action="store_true", help="gpu: every variant at a tiny shape (a check of the code paths)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="gpu: without torch.compile")
    return parser


def cmd_stage(args) -> None:
    from crawl2chat.run import resolve_config, run_all, run_stage, save_config
    run_dir = args.out or Path("runs") / (args.preset or "tiny")
    cfg = resolve_config(run_dir, args.preset, args.overrides)
    if args.command == "data":
        if args.examples:
            from crawl2chat.data import show_examples
            show_examples(run_dir / "data")
            return
        if args.inputs:
            cfg.data.inputs = [str(p.resolve()) if p.exists() else str(p) for p in args.inputs]
        if args.workers:
            cfg.data.workers = args.workers
    if args.command == "rm":
        if args.pairs:
            cfg.rm.pairs = [str(Path(p).resolve()) for p in args.pairs]
        if args.hh:
            cfg.rm.hh = str(Path(args.hh).resolve())
        if args.max_pairs:
            cfg.rm.max_pairs = args.max_pairs
    if args.command == "rlhf":
        if args.no_guard:
            cfg.rlhf.guard = False
        if args.kl is not None:
            cfg.rlhf.beta = args.kl
    if getattr(args, "questions", None):
        cfg.idk.questions = [str(Path(q).resolve()) for q in args.questions]
    if getattr(args, "corrections", None):
        cfg.chat_data.corrections = str(Path(args.corrections).resolve())
    if args.command == "run":
        run_all(run_dir, cfg, until=args.until, force=args.force)
        return
    if args.command == "rlhf" and args.no_guard:
        noguard_rlhf(run_dir, cfg, resume=args.resume)
        return
    if int(os.environ.get("RANK", 0)) == 0:
        save_config(run_dir, cfg)
    metrics = run_stage(args.command, run_dir, cfg, force=args.force, resume=getattr(args, "resume", False))
    if int(os.environ.get("RANK", 0)) == 0:
        shown = {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}
        print(json.dumps(shown, indent=2))


def cmd_sample(args) -> None:
    import torch

    from crawl2chat.engine import generate
    from crawl2chat.tokenizer import Tokenizer
    from crawl2chat.train import load_model
    model_dir = args.model or args.out / args.stage
    model = load_model(model_dir).eval()
    tok_dir = args.out / "tokenizer" if args.model is None else model_dir
    if not (Path(tok_dir) / "tokenizer.json").exists():
        tok_dir = args.out / "tokenizer"
    tok = Tokenizer.load(tok_dir)
    prompt = [tok.bos_id] + tok.encode(args.prompt)
    gen = torch.Generator().manual_seed(args.seed)
    outs = generate(model, [prompt] * args.num_samples, args.max_tokens, temperature=args.temperature,
                    top_k=args.top_k, stop_ids=[tok.bos_id], generator=gen)
    for i, ids in enumerate(outs):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(args.prompt + tok.decode([t for t in ids if t != tok.bos_id]))


def cmd_show_tokens(args) -> None:
    from crawl2chat.tokenizer import Tokenizer, show_tokens
    show_tokens(Tokenizer.load(args.tokenizer or args.out / "tokenizer"), args.text)


def cmd_correct(args) -> None:
    from crawl2chat.corrections import run_correct
    print(json.dumps(run_correct(args.out, args.stage, args.oracle, args.review, args.limit), indent=2))


def cmd_doctor(args) -> None:
    import torch

    from crawl2chat.tools import doctor
    from crawl2chat.train import cpu_bf16_is_faster
    info = {"torch": torch.__version__, "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
            "cpu_threads": torch.get_num_threads(), "cpu_bf16_faster_than_fp32": cpu_bf16_is_faster(),
            "sandbox": doctor()}
    print(json.dumps(info, indent=2))
    if not info["sandbox"]["network_isolation"]:
        print("warning: the Python tool cannot be cut off from the network here (no network namespaces)",
              file=sys.stderr)


def cmd_report(args) -> None:
    from crawl2chat.report import write_report
    print(write_report(args.out))


def cmd_bench(args) -> None:
    if args.what == "gpu":
        from crawl2chat.bench_gpu import DEFAULT_VARIANTS, run_gpu_benchmarks
        names = args.variants.split(",") if args.variants else DEFAULT_VARIANTS
        run_gpu_benchmarks(names, args.out, args.steps, args.warmup, args.budget_s, tiny=args.tiny,
                           compile=args.compile)
        return
    from crawl2chat.bench import run_benchmarks
    run_benchmarks(args.what, args.out, steps=args.steps)


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    from crawl2chat.chat import cmd_chat
    from crawl2chat.export import cmd_export
    from crawl2chat.tools import cmd_index

    def cmd_serve(args):
        from crawl2chat.serve import cmd_serve
        cmd_serve(args)

    handlers = {"sample": cmd_sample, "show-tokens": cmd_show_tokens, "bench": cmd_bench, "chat": cmd_chat,
                "correct": cmd_correct, "index": cmd_index, "report": cmd_report, "doctor": cmd_doctor, "serve": cmd_serve, "export": cmd_export}
    try:
        handlers.get(args.command, getattr(args, "func", cmd_stage))(args)
    except C2CError as e:
        print(f"c2c: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        hint = "" if args.command == "chat" else " (training saves a checkpoint when interrupted; continue with --resume)"
        print(f"c2c: interrupted{hint}", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()


def noguard_rlhf(run_dir: Path, cfg, resume: bool = False) -> None:
    """RLHF with the guard off into <run>/rlhf_noguard/, then report.md again (it plots that curve)."""
    from crawl2chat.common import atomic_write_json
    from crawl2chat.report import write_report
    from crawl2chat.rlhf import run_rlhf
    from crawl2chat.run import console
    console.print(f"[bold]rlhf, no guard[/bold] → {run_dir / 'rlhf_noguard'}")
    metrics = run_rlhf(run_dir, cfg, cfg.rlhf, cfg.rlhf_train, resume=resume, out_name="rlhf_noguard")
    if int(os.environ.get("RANK", 0)) != 0:
        return
    atomic_write_json(run_dir / "rlhf_noguard" / "metrics.json", metrics)
    if (run_dir / "report.json").exists():
        write_report(run_dir)
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}, indent=2))
