"""Shared fixtures: one smoke run built once per session, copies of it, and the CLI as a subprocess."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crawl2chat import cli


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    env["OMP_NUM_THREADS"] = "1"  # one thread per process: steadier on 2 cores, and the same in every run
    env["COLUMNS"] = "1000"  # rich would wrap the stage banners (long tmp paths) at 80 columns
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory) -> Path:
    """`c2c run --preset smoke` done once: world, tokenizer, tokens, base model, report.json.
    Read-only for the tests: take a copy (copy_run) before changing anything in it."""
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    cli.main(["run", "--preset", "smoke", "--out", str(run_dir)])
    assert (run_dir / "base" / "metrics.json").is_file()
    return run_dir


@pytest.fixture(scope="session")
def prepared_run(smoke_run, tmp_path_factory) -> Path:
    """The smoke run with world, tokenizer and tokens done but no base model (read-only)."""
    run_dir = tmp_path_factory.mktemp("prepared") / "run"
    shutil.copytree(smoke_run, run_dir, ignore=shutil.ignore_patterns("base"))
    report = json.loads((run_dir / "report.json").read_text())
    report.pop("pretrain", None)
    (run_dir / "report.json").write_text(json.dumps(report))
    return run_dir


@pytest.fixture
def copy_run(tmp_path):
    """copy_run(src, name) → a private copy of a run directory under tmp_path (mtimes preserved)."""
    def copy(src: Path, name: str = "run", without_fact_evals: bool = False) -> Path:
        dst = tmp_path / name
        shutil.copytree(src, dst)
        if without_fact_evals:  # base_model_evals skips when the world has no facts.json: saves seconds
            (dst / "world" / "facts.json").unlink()
        return dst
    return copy


@pytest.fixture
def c2c(tmp_path):
    """c2c(*args) runs `python -m crawl2chat args` in tmp_path and returns the CompletedProcess."""
    def run(*args, timeout: float = 120, **env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "crawl2chat", *map(str, args)], cwd=tmp_path,
                              env=_env(**env), capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture
def c2c_popen(tmp_path):
    """c2c_popen(*args) starts `python -m crawl2chat args` without waiting. Its stderr goes to a file
    (a pipe nobody reads could fill up and stall it); p.stderr_text() reads it."""
    procs = []

    def start(*args, **env) -> subprocess.Popen:
        err_path = tmp_path / f"popen_{len(procs)}.stderr"
        with open(err_path, "w") as err:
            p = subprocess.Popen([sys.executable, "-m", "crawl2chat", *map(str, args)], cwd=tmp_path,
                                 env=_env(**env), stdout=subprocess.DEVNULL, stderr=err)
        p.stderr_text = err_path.read_text
        procs.append(p)
        return p
    yield start
    for p in procs:  # never leave a child behind when a test fails
        if p.poll() is None:
            p.kill()
        p.wait()


@pytest.fixture
def subprocess_env():
    return _env


@pytest.fixture
def assert_one_line_error():
    """Check a failed CLI call: exit 2, no traceback, and one error line 'c2c: error: ...' containing
    each of `needles`. The only other stderr lines allowed are the stage banners ('<stage> → <dir>')."""
    def check(proc: subprocess.CompletedProcess, *needles: str) -> str:
        err = proc.stderr
        assert proc.returncode == 2, (proc.returncode, err)
        assert "Traceback" not in err and "Traceback" not in proc.stdout, err
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if "error:" in line.lower() or "traceback" in line.lower()]
        assert len(errors) == 1 and errors[0] == lines[-1], err
        others = [line for line in lines[:-1] if " → " not in line]
        assert others == [], err
        msg = lines[-1]
        assert msg.startswith("c2c: error: "), msg
        for n in needles:
            assert n in msg, (n, msg)
        return msg
    return check


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture
def metrics_rows():
    return read_metrics
