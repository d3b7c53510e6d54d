"""Data stage speed: the whole pipeline (`run_data`) against trafilatura's extraction alone, on the same real
pages (the trafilatura test cache: 110 HTML pages from news sites, blogs and shops, in several languages)."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from crawl2chat.common import C2CError, shared_data
from crawl2chat.config import DataConfig

BASELINE_IS = "trafilatura.extract alone on the same pages"


def _pages(copies: int, folder: Path) -> list[Path]:
    """The cache pages, `copies` times (symlinks, so that a bigger run costs no disk)."""
    src = shared_data("web/trafilatura/cache")
    if src is None:
        raise C2CError("bench data: the shared pages web/trafilatura/cache are missing")
    pages = sorted(src.glob("*.html"))
    out = []
    for k in range(copies):
        (folder / f"copy{k}").mkdir(parents=True, exist_ok=True)
        for p in pages:
            link = folder / f"copy{k}" / p.name
            link.symlink_to(p)
            out.append(link)
    return out


def trafilatura_alone(pages: list[Path]) -> float:
    """docs/s of trafilatura.extract with the pipeline's settings, decoding included, one process."""
    import trafilatura

    from crawl2chat.data import EXTRACT_KW
    from crawl2chat.data_steps import decode_page
    t0 = time.perf_counter()
    for p in pages:
        trafilatura.extract(decode_page(p.read_bytes())[0], favor_precision=EXTRACT_KW["favour_precision"],
                            deduplicate=EXTRACT_KW["deduplicate"], include_comments=False)
    return len(pages) / (time.perf_counter() - t0)


def warm_up() -> None:
    """Imports and model loads (spaCy's tokenizer, the language ID model, trafilatura) happen once per process:
    do them before timing. Worker processes fork from a server that has them imported too."""
    import trafilatura
    from datatrove.utils.text import split_into_words

    from crawl2chat.data_steps import LanguageIDFilter
    split_into_words("warm up", "en")
    LanguageIDFilter().classify("warm up")
    trafilatura.extract("<html><body><p>warm up</p></body></html>")


def bench_data(workers=(1, 2), copies: int = 1) -> dict:
    from crawl2chat.data import run_data
    with tempfile.TemporaryDirectory(prefix="c2c-bench-data-") as tmp:
        tmp = Path(tmp)
        pages = _pages(copies, tmp / "pages")
        warm_up()
        runs = {}
        for w in workers:
            stats = run_data([tmp / "pages"], tmp / f"out_{w}", DataConfig(workers=w))
            runs[str(w)] = {"docs_per_s": stats["docs_per_s"], "wall_s": stats["wall_s"],
                            "documents_in": stats["documents_in"], "documents_out": stats["documents_out"]}
        base = trafilatura_alone(pages)
        n_bytes = sum(p.stat().st_size for p in pages)
    first = runs[str(workers[0])]["docs_per_s"]
    return {"ours": first, "baseline": base, "ratio": first / base, "unit": "docs/s",
            "ours_is": f"whole pipeline, {workers[0]} worker(s)", "baseline_is": BASELINE_IS,
            "workers": {w: r["docs_per_s"] for w, r in runs.items()}, "runs": runs,
            "input": {"pages": len(pages), "bytes": n_bytes, "copies": copies}}


def show(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"c2c data bench ({result['input']['pages']} pages, "
                        f"{result['input']['bytes'] / 1e6:.1f} MB of HTML)")
    for col in ("run", "docs/s", "wall s", "docs in → out", "vs baseline"):
        table.add_column(col)
    for w, r in result["runs"].items():
        table.add_row(f"pipeline, {w} worker(s)", f"{r['docs_per_s']:.1f}", f"{r['wall_s']:.1f}",
                      f"{r['documents_in']} → {r['documents_out']}", f"{r['docs_per_s'] / result['baseline']:.2f}×")
    table.add_row(BASELINE_IS, f"{result['baseline']:.1f}", "", "", "1.00×")
    Console().print(table)


if __name__ == "__main__":
    show(bench_data())
