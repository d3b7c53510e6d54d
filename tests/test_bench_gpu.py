"""`c2c bench gpu`: variant names, the baseline's FLOP count, and every code path at a tiny shape on the CPU."""
from __future__ import annotations

import json
import math

import pytest
import torch

from crawl2chat.bench_gpu import PlainGPT, parse_variant, shape_of
from crawl2chat.common import C2CError
from crawl2chat.model import GPT, GPTConfig


def test_parse_variant():
    assert parse_variant("ours-d12") == {"name": "ours-d12", "model": "ours", "preset": "gpu-d12"}
    spec = parse_variant("ours-d20+hd64+b8+cudnn+ddp1")
    assert (spec["head_dim"], spec["batch"], spec["cudnn"], spec["ddp1"]) == (64, 8, True, True)
    assert shape_of(spec, tiny=False)["head_dim"] == 64 and shape_of(spec, tiny=False)["batch"] == 8
    for bad, needle in (("ours-d16", "starts with"), ("gpt-d12", "starts with"), ("ours-d12+fast", "fast"),
                        ("plain-d12+ddp1", "ddp1")):
        with pytest.raises(C2CError, match=needle):
            parse_variant(bad)


@pytest.mark.parametrize("preset", ["gpu-d12", "gpu-d20"])
def test_plain_baseline_counts_flops_like_ours(preset):
    """MFU compares like with like: at the GPU presets' shapes the plain GPT's matmul FLOPs per token
    are within 2% of ours (at d12 the SwiGLU hidden width makes them equal)."""
    s = shape_of(parse_variant(f"ours-{preset[4:]}"), tiny=False)
    with torch.device("meta"):
        ours = GPT(GPTConfig.from_depth(s["depth"], s["vocab"], s["seq_len"], s["width"] // s["depth"], s["head_dim"]))
        plain = PlainGPT(s["vocab"], s["depth"], s["width"], s["width"] // s["head_dim"], s["seq_len"])
    assert plain.flops_per_token() == pytest.approx(ours.flops_per_token(), rel=0.02)
    if preset == "gpu-d12":
        assert plain.flops_per_token() == ours.flops_per_token()


def test_bench_gpu_tiny_on_cpu(c2c, tmp_path):
    """The driver, a variant of each model, and DDP with one rank under torchrun, at a tiny shape."""
    out = tmp_path / "bench.json"
    proc = c2c("bench", "gpu", "--tiny", "--no-compile", "--steps", "2", "--warmup", "1",
               "--variants", "plain-d12,ours-d12+ddp1", "--out", out, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    gpu = json.loads(out.read_text())["gpu"]
    assert gpu["errors"] == {}
    plain, ours = gpu["variants"]["plain-d12"], gpu["variants"]["ours-d12+ddp1"]
    assert (plain["ddp"], ours["ddp"]) == (False, True)
    for r in (plain, ours):
        assert r["steps_timed"] == 2 and r["tok_per_s"] > 0 and math.isfinite(r["final_loss"])
        assert r["mfu"] is None  # no GPU, so no peak to divide by
        assert (r["depth"], r["seq_len"]) == (2, 64)
    assert "| ours-d12+ddp1 |" in proc.stdout


def test_bench_gpu_needs_a_gpu_without_tiny(c2c, assert_one_line_error):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_one_line_error(c2c("bench", "gpu"), "no CUDA GPU", "--tiny")


def test_bench_train_reports_flops_of_the_timed_steps():
    """`c2c bench train` (full steps with the training loop's optimizer): FLOP/s follow from the
    measured tokens/s and the model's FLOPs per token."""
    from crawl2chat.bench import train_throughput
    both = train_throughput([("fp32", False), ("fp32", True)], steps=1, preset="smoke")
    assert set(both) == {("fp32", False), ("fp32", True)}
    r = both[("fp32", False)]
    assert r["tok_per_s"] > 0 and r["params"] > 0 and both[("fp32", True)]["params"] == r["params"]
    with torch.device("meta"):
        from crawl2chat.config import get_preset
        c = get_preset("smoke")
        flops = GPT(GPTConfig.from_depth(c.model.depth, c.tokenizer.vocab_size, c.model.seq_len, c.model.aspect_ratio,
                                         c.model.head_dim)).flops_per_token()
    assert r["flops"] == pytest.approx(flops * r["tok_per_s"])
