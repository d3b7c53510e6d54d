import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crawl2chat.common import C2CError
from crawl2chat.config import TrainConfig
from crawl2chat.model import GPT, GPTConfig
from crawl2chat.train import build_optimizers, latest_checkpoint, load_checkpoint, train

RESUME_ARGS = ["--set", "pretrain.steps=40", "--set", "pretrain.ckpt_every=10", "--set", "pretrain.eval_every=1000"]


def losses(rows):
    return [(r["step"], r["loss"]) for r in rows]


def test_exact_resume_after_sigkill(prepared_run, copy_run, c2c, c2c_popen, metrics_rows):
    """Kill -9 a pretrain mid-way, --resume it: every step's loss is bit-identical to an uninterrupted run."""
    dir_a = copy_run(prepared_run, "a", without_fact_evals=True)
    dir_b = copy_run(prepared_run, "b", without_fact_evals=True)
    full = c2c_popen("pretrain", "--out", dir_a, *RESUME_ARGS)  # A runs beside the one we kill
    victim = c2c_popen("pretrain", "--out", dir_b, *RESUME_ARGS)
    pointer = dir_b / "base" / "checkpoints" / "latest"
    log = dir_b / "base" / "metrics.jsonl"

    def ckpt_step() -> int:
        name = pointer.read_text().strip() if pointer.exists() else ""
        return int(name.split("_")[1]) if name else 0

    # kill once checkpoint 20 exists and a few steps past it are logged (they must be dropped on resume)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if ckpt_step() >= 30 or (ckpt_step() >= 20 and log.read_text().count("\n") >= 23):
            victim.kill()
            break
        time.sleep(0.005)
    victim.wait()
    killed_at, logged = ckpt_step(), len(metrics_rows(log))
    assert victim.returncode == -9, (victim.returncode, victim.stderr_text()[-3000:])
    assert 20 <= killed_at < 40, f"killed at checkpoint {killed_at}"
    assert logged >= killed_at
    assert not (dir_b / "base" / "metrics.json").exists()
    ckpt = dir_b / "base" / "checkpoints" / f"step_{killed_at:07d}"
    assert all((ckpt / f).is_file() for f in ("model.safetensors", "optim.pt", "state.json"))

    resumed = c2c("pretrain", "--out", dir_b, "--resume", *RESUME_ARGS)
    assert resumed.returncode == 0, resumed.stderr
    assert full.wait(timeout=120) == 0, full.stderr_text()[-3000:]

    a, b = metrics_rows(dir_a / "base" / "metrics.jsonl"), metrics_rows(dir_b / "base" / "metrics.jsonl")
    assert [r["step"] for r in a] == list(range(1, 41))
    assert [r["step"] for r in b] == list(range(1, 41))
    assert losses(b) == losses(a)  # exact float equality, every step
    assert [r["lr"] for r in b] == [r["lr"] for r in a]
    summary = json.loads((dir_b / "base" / "metrics.json").read_text())
    assert summary["resumed_from"] == killed_at and summary["steps"] == 40
    wa = load_file(str(dir_a / "base" / "model.safetensors"))
    wb = load_file(str(dir_b / "base" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------- checkpoints, in process

SMALL = GPTConfig(vocab_size=64, depth=1, n_embd=32, n_head=2, head_dim=16, mlp_hidden=64, seq_len=16)


def small_batches(step, micro, rank, world):
    g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
    t = torch.randint(0, SMALL.vocab_size, (2, SMALL.seq_len + 1), generator=g)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def small_train(out, resume=False):
    torch.manual_seed(0)
    cfg = TrainConfig(steps=20, batch_size=2, warmup_steps=2, ckpt_every=10, eval_every=1000, dtype="fp32")
    return train(GPT(SMALL), cfg, out, small_batches, tokens_per_micro=2 * SMALL.seq_len, resume=resume)


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch, metrics_rows):
    calls = []
    real_save = torch.save

    def save_then_die(*args, **kwargs):
        calls.append(args[1])
        if len(calls) >= 2:
            raise OSError("No space left on device (simulated, halfway through the checkpoint)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_die)
    root = tmp_path / "checkpoints"
    with pytest.raises(OSError, match="simulated"):
        small_train(tmp_path)
    monkeypatch.undo()
    assert len(calls) == 2
    leftover = root / ".step_0000020.tmp"
    assert leftover.is_dir() and (leftover / "model.safetensors").exists()  # died halfway through step 20
    assert not (root / "step_0000020").exists()
    assert (root / "latest").read_text().strip() == "step_0000010"
    ckpt = latest_checkpoint(root)
    assert ckpt == root / "step_0000010"

    model = GPT(SMALL)
    opts = build_optimizers(model, TrainConfig(), torch.device("cpu"))
    state = load_checkpoint(ckpt, model, opts)
    assert state["step"] == 10
    saved = load_file(str(ckpt / "model.safetensors"))
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    adam = opts[0].state
    assert len(adam) == len(list(model.parameters()))
    assert all(int(s["step"]) == 10 and s["exp_avg"].abs().sum() > 0 for s in adam.values())

    other = GPT(GPTConfig(**{**SMALL.to_dict(), "mlp_hidden": 128}))
    with pytest.raises(C2CError, match="another model shape.*mlp_hidden 64 vs 128"):
        load_checkpoint(ckpt, other, build_optimizers(other, TrainConfig(), torch.device("cpu")))

    # the leftover temporary folder is ignored: --resume goes on from step 10 and finishes
    summary = small_train(tmp_path, resume=True)
    assert summary["resumed_from"] == 10
    assert latest_checkpoint(root) == root / "step_0000020"
    assert not leftover.exists()
    assert [r["step"] for r in metrics_rows(tmp_path / "metrics.jsonl")] == list(range(1, 21))
    assert (tmp_path / "model.safetensors").exists()


def test_resume_equals_uninterrupted_in_process(tmp_path, monkeypatch, metrics_rows):
    """The same property as the SIGKILL test, cheaply: stop after checkpoint 10 by a failing save."""
    small_train(tmp_path / "full")
    calls = []
    real_save = torch.save

    def save_once(*args, **kwargs):
        calls.append(1)
        if len(calls) >= 2:
            raise OSError("killed")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save_once)
    with pytest.raises(OSError):
        small_train(tmp_path / "cut")
    monkeypatch.undo()
    assert len(metrics_rows(tmp_path / "cut" / "metrics.jsonl")) == 20  # rows 11..20 logged, not checkpointed
    small_train(tmp_path / "cut", resume=True)
    a = metrics_rows(tmp_path / "full" / "metrics.jsonl")
    b = metrics_rows(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in b] == list(range(1, 21))
    assert losses(a) == losses(b)


def test_resume_without_checkpoint(tmp_path):
    with pytest.raises(C2CError, match="no checkpoint to resume from"):
        small_train(tmp_path, resume=True)


def test_resume_other_model_shape_cli(smoke_run, copy_run, c2c, assert_one_line_error):
    run = copy_run(smoke_run)
    assert latest_checkpoint(run / "base" / "checkpoints") is not None
    proc = c2c("pretrain", "--out", run, "--resume", "--set", "model.depth=1")
    assert_one_line_error(proc, "another model shape", "depth 2 vs 1", str(run / "base" / "checkpoints"))


def test_ddp_matches_grad_accum(prepared_run, copy_run, c2c, subprocess_env, metrics_rows, tmp_path):
    """torchrun with 2 processes × grad_accum 1 == one process × grad_accum 2 (the same global batch)."""
    ddp_dir = copy_run(prepared_run, "ddp", without_fact_evals=True)
    one_dir = copy_run(prepared_run, "one", without_fact_evals=True)
    common = ["--set", "pretrain.steps=8", "--set", "pretrain.eval_every=1000"]
    torchrun = Path(sys.executable).parent / "torchrun"
    assert torchrun.exists(), torchrun
    with open(tmp_path / "ddp.stderr", "w") as err:
        ddp = subprocess.Popen([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "crawl2chat", "pretrain",
                                "--out", str(ddp_dir), *common, "--set", "pretrain.grad_accum=1"],
                               cwd=tmp_path, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err)
    try:
        one = c2c("pretrain", "--out", one_dir, *common, "--set", "pretrain.grad_accum=2")
        ddp.wait(timeout=180)
    finally:
        if ddp.poll() is None:
            ddp.kill()
            ddp.wait()
    assert one.returncode == 0, one.stderr
    assert ddp.returncode == 0, (tmp_path / "ddp.stderr").read_text()[-3000:]
    a = metrics_rows(ddp_dir / "base" / "metrics.jsonl")
    b = metrics_rows(one_dir / "base" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5, abs=0), (ra["step"], ra["loss"], rb["loss"])
    assert a[-1]["loss"] < a[0]["loss"] - 0.05  # it did train
    sa = json.loads((ddp_dir / "base" / "metrics.json").read_text())
    sb = json.loads((one_dir / "base" / "metrics.json").read_text())
    assert (sa["world_size"], sb["world_size"]) == (2, 1)
    assert sa["tokens"] == sb["tokens"]  # the same global batch


def test_gpu_code_paths_run_on_cpu(prepared_run, copy_run, metrics_rows):
    """The GPU presets' settings — bf16 autocast and torch.compile — exercised on the CPU."""
    from crawl2chat import cli
    run = copy_run(prepared_run, without_fact_evals=True)
    cli.main(["pretrain", "--out", str(run), "--set", "pretrain.steps=3", "--set", "pretrain.dtype=bf16",
              "--set", "pretrain.compile=true", "--set", "pretrain.eval_every=3", "--set", "pretrain.batch_tokens=1024"])
    metrics = json.loads((run / "base" / "metrics.json").read_text())
    assert metrics["dtype"] == "bf16" and metrics["steps"] == 3
    assert metrics["tokens"] == 3 * 1024  # batch_tokens: 8 × 64 tokens per micro-batch, accumulated twice
    rows = metrics_rows(run / "base" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(rows[-1]["val_bpb"])


def test_batch_tokens_sets_grad_accum(monkeypatch):
    from crawl2chat.train import with_batch_tokens
    tc = TrainConfig(batch_size=8, grad_accum=3, batch_tokens=2**12)
    assert with_batch_tokens(tc, 8 * 64).grad_accum == 8
    monkeypatch.setenv("WORLD_SIZE", "4")  # the batch is over all processes
    assert with_batch_tokens(tc, 8 * 64).grad_accum == 2
    assert with_batch_tokens(TrainConfig(grad_accum=3), 8 * 64).grad_accum == 3  # 0: grad_accum as given
    with pytest.raises(C2CError, match="multiple of batch_size × seq_len × processes"):
        with_batch_tokens(TrainConfig(batch_tokens=1000), 8 * 64)


def test_only_the_stage_that_adds_the_surprisal_input_boosts_it():
    """The input starts at zero in the stage that adds it (idk, rm) and learns at SURPRISAL_IN_LR_MULT × lr;
    every other stage trains it at the plain learning rate."""
    from crawl2chat.train import SURPRISAL_IN_LR_MULT
    model = GPT(SMALL).with_surprisal_input(1, 2)
    surprisal_in = {id(p) for p in model.surprisal_in.parameters()}

    def lr_of_input(opts):
        (lr,) = {g["lr"] for o in opts for g in o.param_groups if {id(p) for p in g["params"]} & surprisal_in}
        return lr

    cfg = TrainConfig(lr=1e-4)
    assert lr_of_input(build_optimizers(model, cfg, torch.device("cpu"))) == pytest.approx(1e-4)
    boosted = build_optimizers(model, cfg, torch.device("cpu"), SURPRISAL_IN_LR_MULT)
    assert lr_of_input(boosted) == pytest.approx(1e-4 * SURPRISAL_IN_LR_MULT)
    others = [g["lr"] for o in boosted for g in o.param_groups if not {id(p) for p in g["params"]} & surprisal_in]
    assert others and all(lr == pytest.approx(1e-4) for lr in others)
