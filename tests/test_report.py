"""report.md and its plots are built from the run directory alone."""
import json

import pytest

from crawl2chat.common import C2CError
from crawl2chat.report import _fmt, write_report


def test_report_of_the_smoke_run(smoke_run, copy_run):
    run = copy_run(smoke_run)
    for png in run.glob("*.png"):
        png.unlink()
    path = write_report(run)
    text = path.read_text()
    report = json.loads((run / "report.json").read_text())
    for stage, metrics in report.items():
        assert f"## {stage}" in text
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                assert f"| {key} | {_fmt(value)} |" in text, key
    for png_name in ["data_funnel.png"] + [f"{s}_curves.png" for s in ("pretrain", "sft", "idk", "rl", "rm", "rlhf")]:
        assert (run / png_name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png_name
        assert f"({png_name})" in text
    assert write_report(run).read_text() == text


def test_report_without_a_run_is_a_clear_error(tmp_path):
    with pytest.raises(C2CError, match="no report.json"):
        write_report(tmp_path)
