"""`c2c bench`: every figure beside a baseline measured in the same run, written to bench.json."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from crawl2chat.common import atomic_write_json
from crawl2chat.config import get_preset

console = Console()


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), repeats: int = 10) -> float:
    """The machine's practical peak in `dtype`: the best FLOP/s of square matmuls of a few sizes."""
    best_flops = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best_flops = max(best_flops, 2 * n**3 / (time.perf_counter() - t0))
    return best_flops


def train_stepper(dtype: str, compile: bool, preset: str = "tiny"):
    """A full training step (forward, backward, the training loop's optimizer) of the preset's model on
    random tokens, as a function that runs one step and returns its seconds; and the model."""
    from crawl2chat.model import GPT, GPTConfig
    from crawl2chat.train import autocast, build_optimizers
    cfg = get_preset(preset)
    mcfg = GPTConfig.from_depth(cfg.model.depth, cfg.tokenizer.vocab_size, cfg.model.seq_len,
                                cfg.model.aspect_ratio, cfg.model.head_dim)
    torch.manual_seed(0)
    model = GPT(mcfg)
    opts = build_optimizers(model, cfg.pretrain, torch.device("cpu"))
    fwd = torch.compile(model) if compile else model
    B, T = cfg.pretrain.batch_size, mcfg.seq_len
    x = torch.randint(0, mcfg.vocab_size, (B, T))
    y = torch.randint(0, mcfg.vocab_size, (B, T))

    def step() -> float:
        t0 = time.perf_counter()
        with autocast(torch.device("cpu"), dtype):
            loss = fwd(x, y)
        loss.backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0
    return step, model, B * T


def train_throughput(configs: list[tuple[str, bool]], steps: int, preset: str = "tiny") -> dict:
    """Tokens/s and FLOP/s of each (dtype, compile) configuration. The configurations take turns, one
    step each, so a host whose speed drifts during the run slows them all alike (measured here: the
    same eager step ran at 2,842 and 3,940 tokens/s in two runs an hour apart); the median step counts."""
    steppers = {c: train_stepper(*c, preset=preset) for c in configs}
    for step, _, _ in steppers.values():  # two warm-up steps each (compilation happens there)
        step(), step()
    times: dict = {c: [] for c in configs}
    for _ in range(steps):
        for c, (step, _, _) in steppers.items():
            times[c].append(step())
    out = {}
    for c, (_, model, tokens) in steppers.items():
        tok_s = tokens / sorted(times[c])[len(times[c]) // 2]
        out[c] = {"tok_per_s": tok_s, "flops": model.flops_per_token() * tok_s, "params": model.num_params()}
    return out


def bench_train(steps: int) -> dict:
    from crawl2chat.train import resolve_dtype
    tc = get_preset("tiny").pretrain
    ours_dtype = resolve_dtype(tc.dtype, torch.device("cpu"))
    peaks = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    configs = [(dtype, comp) for dtype in ("fp32", "bf16") for comp in (False, True)]
    with console.status("bench train: fp32 and bf16, eager and compiled, taking turns"):
        measured = train_throughput(configs, steps)
    runs = {}
    for (dtype, comp), r in measured.items():
        r["share_of_peak"] = r["flops"] / peaks[dtype]
        runs[f"{dtype}{'+compile' if comp else ''}"] = r
    ours_name = f"{ours_dtype}{'+compile' if tc.compile else ''}"
    ours, base = runs[ours_name]["tok_per_s"], runs["fp32"]["tok_per_s"]
    return {"ours": ours, "baseline": base, "ratio": ours / base, "unit": "tok/s",
            "ours_is": f"tiny preset as configured ({ours_name})", "baseline_is": "fp32 eager, same model",
            "matmul_peak_flops": peaks, "runs": runs,
            "ours_share_of_bf16_peak": runs[ours_name]["flops"] / peaks["bf16"]}


def bench_tokenizer_world() -> dict:
    from crawl2chat import world
    from crawl2chat.bench_tokenizer import bench_tokenizer
    cfg = get_preset("tiny")
    texts = [d["text"] for d in world.build_world(cfg.world)["documents"]]
    with console.status("bench tokenizer"):
        return bench_tokenizer(texts, cfg.tokenizer.vocab_size)


def bench_rl(steps: int = 2) -> dict:
    """One GRPO step of the tiny preset (16 problems × 8 samples) on a random model: rollout tokens/s with
    the batched engine beside the same sampling one sequence at a time, and the step's time split."""
    from crawl2chat import world
    from crawl2chat.config import GRPOConfig
    from crawl2chat.model import GPT, GPTConfig
    from crawl2chat.problems import load_problems
    from crawl2chat.rl import completion_logp, grpo_token_loss, make_rollouts, sample_completions
    from crawl2chat.tokenizer import Tokenizer
    import tempfile
    cfg = get_preset("tiny")
    w = world.build_world(cfg.world)
    tok = Tokenizer.train([d["text"] for d in w["documents"]], cfg.tokenizer.vocab_size)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in w["problems"]["train"][:64]))
        problems = load_problems(path)
    mcfg = GPTConfig.from_depth(cfg.model.depth, tok.vocab_size, cfg.model.seq_len, cfg.model.aspect_ratio,
                                cfg.model.head_dim)
    torch.manual_seed(0)
    model = GPT(mcfg)
    for p in model.parameters():  # random weights everywhere, so every block does work
        torch.nn.init.normal_(p, std=0.02)
    ref = GPT(mcfg).eval()
    ref.load_state_dict(model.state_dict())
    g = GRPOConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    gen_s = train_s = 0.0
    gen_tokens = 0
    for step in range(steps):
        batch = problems[step * g.prompts_per_step:(step + 1) * g.prompts_per_step]
        with console.status(f"bench rl: rollouts, step {step + 1}"):
            ro = make_rollouts(model.eval(), ref, tok, batch, g, seed=step, device=torch.device("cpu"))
        gen_s += ro.stats["gen_s"]
        gen_tokens += sum(len(s) - p for s, p in zip(ro.seqs, ro.prompt_lens))
        t0 = time.perf_counter()
        model.train()
        logp, mask = completion_logp(model, ro.seqs, ro.prompt_lens, tok.special_id("<|pad|>"), torch.device("cpu"))
        loss, _ = grpo_token_loss(logp, logp.detach(), ro.advantages, mask, g.epsilon, g.epsilon_high)
        (loss / mask.sum()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        train_s += time.perf_counter() - t0
    ours = gen_tokens / gen_s
    with console.status("bench rl: the same sampling one sequence at a time"):
        t0 = time.perf_counter()
        one = [sample_completions(model.eval(), tok, [problems[0]["question"]], 1, g.max_new_tokens, 1.0, seed=i)
               for i in range(4)]
        base = sum(len(c[0][1]) for c in one) / (time.perf_counter() - t0)
    return {"ours": ours, "baseline": base, "ratio": ours / base, "unit": "rollout tok/s",
            "baseline_is": "the same sampling, one sequence at a time",
            "generate_share": gen_s / (gen_s + train_s), "train_share": train_s / (gen_s + train_s),
            "step_s": (gen_s + train_s) / steps, "rollouts_per_step": g.prompts_per_step * g.group_size}


def run_benchmarks(what: str, out: Path, steps: int = 10) -> dict:
    torch.set_num_threads(torch.get_num_threads())
    results = json.loads(out.read_text()) if out.exists() else {}
    if what in ("all", "train"):
        results["train"] = bench_train(steps)
    if what in ("all", "generate"):
        from crawl2chat.bench_generate import bench_generate_random
        with console.status("bench generate"):
            results["generate"] = bench_generate_random()
    if what in ("all", "tokenizer"):
        tok = bench_tokenizer_world()
        results["tokenizer"] = {**tok["train"], "encode": tok["encode"], "input": tok["input"]}
    if what in ("all", "data"):
        from crawl2chat.bench_data import bench_data
        results["data"] = bench_data()
    if what in ("all", "rl"):
        results["rl"] = bench_rl()
    atomic_write_json(out, results)
    show(results)
    console.print(f"wrote {out}")
    return results


def show(results: dict) -> None:
    table = Table(title="c2c bench")
    for col in ("benchmark", "ours", "baseline", "ratio", "unit", "baseline is"):
        table.add_column(col)

    def row(name, e):
        table.add_row(name, f"{e['ours']:.4g}", f"{e['baseline']:.4g}", f"{e['ratio']:.2f}×", e["unit"], e["baseline_is"])

    if "train" in results:
        t = results["train"]
        row("train (tiny)", t)
        for name, r in t["runs"].items():
            dt = name.split("+")[0]
            table.add_row(f"  {name}", f"{r['tok_per_s']:.0f} tok/s", f"{r['flops'] / 1e9:.1f} GFLOP/s",
                          f"{r['share_of_peak']:.1%}", f"of {dt} peak",
                          f"{t['matmul_peak_flops'][dt] / 1e9:.0f} GFLOP/s matmul")
    if "generate" in results:
        for B in (1, 32):
            e = results["generate"][f"batch{B}"]
            row(f"generate, batch {B} ({e['ours_is']})", e)
            for variant in ("eager", "compiled"):
                if variant in e and variant != e["ours_is"]:
                    table.add_row(f"  {variant}", f"{e[variant]['ours']:.4g}", "", f"{e[variant]['ratio']:.2f}×",
                                  "tok/s", "")
    if "tokenizer" in results:
        row("tokenizer train", results["tokenizer"])
        row("tokenizer encode", results["tokenizer"]["encode"])
    if "data" in results:
        row("data pipeline", results["data"])
    if "rl" in results:
        r = results["rl"]
        row("rl rollouts", r)
        table.add_row("  rl step time", f"{r['generate_share']:.0%} generating", f"{r['train_share']:.0%} training",
                      "", f"{r['step_s']:.1f} s/step", f"{r['rollouts_per_step']} rollouts per step")
    console.print(table)
