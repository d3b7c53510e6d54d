"""c2c data: crawl → clean corpus, the FineWeb recipe on datatrove.

readers (WARC, JSONL, parquet, .html files) → URL block list → trafilatura (HTML only) → language ID
→ Gopher repetition → Gopher quality → C4 → FineWeb quality → MinHash near-dedup (4 stages) → PII masking.

out_dir/
  clean/*.jsonl.gz     datatrove's output          corpus.jsonl   {id, url, text, split} per kept document
  removed/<filter>/    each filter's removals      stats.json     counts per step, read errors, timing
  logs/<stage>/        datatrove logs and stats    filtered/, minhash/   intermediate files
"""
from __future__ import annotations

import gzip
import ipaddress
import json
import os
import re
import shutil
import time
import zlib
from pathlib import Path

from crawl2chat.common import C2CError, atomic_write_json, iter_jsonl
from crawl2chat.config import DataConfig

FILTERS = ["url", "extraction", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb_quality",
           "minhash"]
EXTRACT_KW = dict(favour_precision=True, deduplicate=False)  # no cross-page dedup: results stay order-free
EXTRACT_TIMEOUT_S = 5.0
_KINDS = [("warc", (".warc.gz", ".warc", ".wet.gz", ".wet", ".arc.gz")),
          ("jsonl", (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")),
          ("parquet", (".parquet",)), ("html", (".html", ".htm"))]


def input_kind(path: Path) -> str | None:
    name = path.name.lower()
    return next((kind for kind, ends in _KINDS if name.endswith(ends)), None)


def collect_inputs(inputs: list) -> tuple[dict[str, list[Path]], int]:
    """{kind: [files]} from files and folders (searched recursively), and how many folder files were ignored."""
    if not inputs:
        raise C2CError("data: no inputs given (WARC, JSONL or parquet files, or folders of .html files)")
    files: dict[str, list[Path]] = {}
    ignored = 0
    for p in map(Path, inputs):
        if not p.exists():
            raise C2CError(f"{p}: input not found")
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file())
            for f in found:
                kind = input_kind(f)
                if kind:
                    files.setdefault(kind, []).append(f.resolve())
                ignored += kind is None
            if not any(input_kind(f) for f in found):
                raise C2CError(f"{p}: no .warc[.gz], .jsonl[.gz], .parquet or .html files in this folder")
        else:
            kind = input_kind(p)
            if kind is None:
                raise C2CError(f"{p}: unknown input type (expected .warc[.gz], .jsonl[.gz], .parquet or .html)")
            files.setdefault(kind, []).append(p.resolve())
    return files, ignored


QUALITY_FILTERS = ("gopher_repetition", "gopher_quality", "c4", "fineweb_quality")


def quality_kw(cfg: DataConfig, name: str) -> dict:
    """A quality filter's keyword arguments from cfg.quality (datatrove's defaults where absent)."""
    unknown = set(cfg.quality) - set(QUALITY_FILTERS)
    if unknown:
        raise C2CError(f"data.quality: unknown filter(s) {', '.join(sorted(unknown))}; "
                       f"choose from {', '.join(QUALITY_FILTERS)}")
    return dict(cfg.quality.get(name, {}))


def _pipelines(files: dict[str, list[Path]], out: Path, cfg: DataConfig):
    """The executors: the filtering stage and, with MinHash, its four dedup stages (the last one depends on
    the others). Returns (first, last)."""
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupBuckets
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    from datatrove.pipeline.formatters import PIIFormatter
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.hashing import HashConfig

    from crawl2chat import data_steps as ds

    def removed(name):
        return JsonlWriter(str(out / "removed" / name))

    readers = []
    for kind, paths in sorted(files.items()):
        paths_file = out / "logs" / "inputs" / f"{kind}.txt"
        paths_file.parent.mkdir(parents=True, exist_ok=True)
        paths_file.write_text("".join(str(p).lstrip("/") + "\n" for p in paths))
        args = ("/", str(paths_file), str(out / "logs" / "read_errors"))
        make = {"warc": ds.WarcDocReader, "jsonl": ds.JsonlDocReader, "html": ds.HtmlFileReader,
                "parquet": ds.parquet_reader}[kind]
        reader = make(*args)
        if reader is None:
            raise C2CError(f"{paths[0]}: reading parquet needs pyarrow (pip install pyarrow)")
        readers.append(reader)
    pii = [PIIFormatter(email_replacement="<EMAIL>", ip_replacement="<IP>"), ds.PhoneFormatter()] if cfg.pii else []
    clean = JsonlWriter(str(out / "clean"))
    filtering = [
        *readers,
        ds.OfflineURLFilter(exclusion_writer=removed("url")),
        ds.HtmlExtractor(**EXTRACT_KW, timeout=EXTRACT_TIMEOUT_S, exclusion_writer=removed("extraction")),
        ds.LanguageIDFilter(cfg.languages, cfg.language_threshold, exclusion_writer=removed("language")),
        GopherRepetitionFilter(**quality_kw(cfg, "gopher_repetition"), exclusion_writer=removed("gopher_repetition")),
        GopherQualityFilter(**quality_kw(cfg, "gopher_quality"), exclusion_writer=removed("gopher_quality")),
        C4QualityFilter(**{"filter_no_terminal_punct": False, **quality_kw(cfg, "c4")}, exclusion_writer=removed("c4")),
        FineWebQualityFilter(**quality_kw(cfg, "fineweb_quality"), exclusion_writer=removed("fineweb_quality")),
    ]
    tasks, logs = max(1, cfg.workers), out / "logs"

    def executor(name, pipeline, n_tasks=tasks, depends=None):
        return LocalPipelineExecutor(pipeline, tasks=n_tasks, workers=min(cfg.workers, n_tasks),
                                     logging_dir=str(logs / name), skip_completed=False, depends=depends)

    if not cfg.minhash:
        first = executor("1_filter", filtering + pii + [clean])
        return first, first
    first = executor("1_filter", filtering + [JsonlWriter(str(out / "filtered"))])
    mh = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, seed=cfg.seed,
                       hash_config=HashConfig(precision=64, hash_fc="sha1"))  # xxhash would be one more dependency
    sigs, buckets, remove_ids = (str(out / "minhash" / d) for d in ("signatures", "buckets", "remove_ids"))
    s2 = executor("2_signatures", [JsonlReader(str(out / "filtered")), MinhashDedupSignature(sigs, config=mh)],
                  depends=first)
    s3 = executor("3_buckets", [MinhashDedupBuckets(sigs, buckets, config=mh)], mh.num_buckets, depends=s2)
    s4 = executor("4_cluster", [MinhashDedupCluster(buckets, remove_ids, config=mh)], 1, depends=s3)
    last = executor("5_dedup", [JsonlReader(str(out / "filtered")),
                                MinhashDedupFilter(remove_ids, exclusion_writer=removed("minhash")),
                                *pii, clean], depends=s4)
    return first, last


def _stat(v) -> float:
    return v.get("total", 0) if isinstance(v, dict) else (v or 0)


def merge_step_stats(logs: Path) -> list[dict]:
    """One row per pipeline step, from each stage's merged datatrove stats.json."""
    rows = []
    for stage in sorted(p for p in logs.iterdir() if (p / "stats.json").is_file()):
        for step in json.loads((stage / "stats.json").read_text()):
            s = {k: _stat(v) for k, v in step["stats"].items()}
            row = {"stage": stage.name, "step": step["name"], "time_s": round(_stat(step["time_stats"]), 3)}
            if "documents" in s:  # readers
                row["out"] = int(s["documents"])
            if "total" in s:
                row["in"] = int(s["total"])
            if "forwarded" in s or "dropped" in s:
                row["out"] = int(s.get("forwarded", 0))
                row["dropped"] = int(s.get("dropped", 0))
            row.update({k: int(v) for k, v in s.items() if k.startswith(("dropped_", "skipped_", "read_errors",
                                                                         "phones_masked", "to_remove"))})
            rows.append(row)
    return rows


def iter_jsonl_gz(folder: Path):
    for f in sorted(folder.glob("*.jsonl.gz")) if folder.is_dir() else []:
        with gzip.open(f, "rt", encoding="utf-8") as fh:
            for line in fh:
                yield json.loads(line)


def _split(key: str, url: str | None, val_urls: set | None, val_fraction: float, seed: int) -> str:
    if val_urls and url in val_urls:
        return "val"
    if val_fraction > 0 and zlib.crc32(f"{seed}:{key}".encode()) / 2**32 < val_fraction:
        return "val"
    return "train"


def write_corpus(out_dir: Path, cfg: DataConfig, val_urls: set | None) -> dict:
    """corpus.jsonl from datatrove's clean output; returns counts per split and the bytes written."""
    tmp = out_dir / ".corpus.jsonl.tmp"
    counts, n_bytes = {"train": 0, "val": 0}, 0
    with open(tmp, "w", encoding="utf-8") as f:
        for doc in iter_jsonl_gz(out_dir / "clean"):
            url = doc.get("metadata", {}).get("url")
            split = _split(url or doc["id"], url, val_urls, cfg.val_fraction, cfg.seed)
            counts[split] += 1
            n_bytes += len(doc["text"].encode("utf-8"))
            f.write(json.dumps({"id": doc["id"], "url": url, "text": doc["text"], "split": split},
                               ensure_ascii=False) + "\n")
    os.replace(tmp, out_dir / "corpus.jsonl")
    return {"splits": counts, "bytes_out": n_bytes}


def read_errors(errors_dir: Path) -> list[dict]:
    rows = []
    for f in sorted(errors_dir.glob("*.jsonl")) if errors_dir.is_dir() else []:
        rows += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: (r["file"], r["offset"]))


def run_data(inputs: list[Path], out_dir: Path, cfg: DataConfig, truth: Path | None = None,
             val_urls: set[str] | None = None) -> dict:
    """Run the pipeline on `inputs` into `out_dir`; writes corpus.jsonl and stats.json and returns the stats.
    `truth` (the synthetic crawl's labels) is read only afterwards, to score the result."""
    from crawl2chat import data_steps
    files, ignored = collect_inputs(inputs)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for d in ("clean", "removed", "logs", "filtered", "minhash"):  # a rerun starts from scratch
        shutil.rmtree(out_dir / d, ignore_errors=True)
    for f in ("corpus.jsonl", "stats.json"):
        (out_dir / f).unlink(missing_ok=True)
    (out_dir / "logs").mkdir()
    t0 = time.time()
    if cfg.workers > 1:  # worker processes fork from a server that has imported the heavy modules once
        import multiprocess.forkserver
        multiprocess.forkserver.set_forkserver_preload(["crawl2chat.data_steps", "spacy", "trafilatura", "py3langid"])
    data_steps.silence_stderr_logs(str(out_dir / "logs" / "pipeline.log"))
    try:
        first, last = _pipelines(files, out_dir, cfg)
        first.run()
        if last is not first and any((out_dir / "filtered").glob("*.jsonl.gz")):
            last.run()
    except C2CError:
        raise
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [""])[0]
        raise C2CError(f"data pipeline failed: {type(e).__name__}: {first_line} (logs in {out_dir / 'logs'})") from e
    finally:
        data_steps.silence_stderr_logs(None)
    corpus = write_corpus(out_dir, cfg, val_urls)
    wall = time.time() - t0
    steps = merge_step_stats(out_dir / "logs")
    errors = read_errors(out_dir / "logs" / "read_errors")
    docs_in = sum(r.get("out", 0) for r in steps if r["stage"] == "1_filter" and "READER" in r["step"])
    docs_out = sum(corpus["splits"].values())
    stats = {
        "inputs": {k: len(v) for k, v in files.items()}, "ignored_files": ignored,
        "documents_in": docs_in, "documents_out": docs_out,
        "removed": {name: sum(1 for _ in iter_jsonl_gz(out_dir / "removed" / name)) for name in FILTERS},
        "bytes_in": sum(p.stat().st_size for v in files.values() for p in v), "bytes_out": corpus["bytes_out"],
        "splits": corpus["splits"], "workers": cfg.workers, "wall_s": round(wall, 3),
        "docs_per_s": round(docs_in / max(wall, 1e-9), 2),
        "read_error_count": len(errors), "read_errors": errors[:1000], "steps": steps,
    }
    if truth is not None:
        stats.update(evaluate_against_truth(truth, out_dir))
    atomic_write_json(out_dir / "stats.json", stats)
    print_summary(stats)
    return stats


# --- evaluation against the synthetic crawl's labels (never used by the pipeline itself)

EMAIL_RE = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
IP_RE = re.compile(r"(?<![\d.])\d{1,3}(?:\.\d{1,3}){3}(?![\d.])")
PHONE_EVAL_RE = re.compile(r"(?<![\w.])\+?\(?\d{2,4}\)?[ .-]\d{3,4}[ .-]\d{4}(?![\w])")


def find_pii(text: str) -> list[str]:
    """Emails, public IPv4 addresses and phone numbers, by regexes written apart from the masking ones."""
    def public(ip):
        try:
            return ipaddress.ip_address(ip).is_global
        except ValueError:
            return False
    return EMAIL_RE.findall(text) + [ip for ip in IP_RE.findall(text) if public(ip)] + PHONE_EVAL_RE.findall(text)


def evaluate_against_truth(truth: Path, out_dir: Path) -> dict:
    """Score the output with the crawl's labels. A truth row's fate: kept, removed by a filter, or not_read
    (the reader skipped it: not HTML, HTTP error, unreadable). A near-duplicate counts as removed unless more
    than one copy of its page survives (MinHash may keep the mirror and drop the original); a good page counts
    as kept when it or one of its mirrors survives."""
    out_dir = Path(out_dir)
    rows = [r for _, r in iter_jsonl(truth)]
    kept = {}
    for _, r in iter_jsonl(out_dir / "corpus.jsonl"):
        kept[r["url"]] = r["text"]
    fate = {}
    for name in FILTERS:
        for doc in iter_jsonl_gz(out_dir / "removed" / name):
            fate[doc.get("metadata", {}).get("url")] = name
    fate.update({u: "kept" for u in kept})
    status = {r["url"]: fate.get(r["url"], "not_read") for r in rows}
    mirrors: dict[str, list[str]] = {}
    for r in rows:
        if r["category"] == "near_duplicate":
            mirrors.setdefault(r.get("duplicate_of"), []).append(r["url"])

    by_cat: dict[str, list] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    removed_by = {c: {} for c in by_cat}
    for r in rows:
        if status[r["url"]] != "kept":
            d = removed_by[r["category"]]
            d[status[r["url"]]] = d.get(status[r["url"]], 0) + 1
    junk_removed = {}
    for cat, rs in by_cat.items():
        if cat in ("good", "pii"):
            continue
        if cat == "near_duplicate":
            extra = sum(max(0, sum(status.get(u) == "kept" for u in [orig, *dups]) - 1)
                        for orig, dups in mirrors.items())
            junk_removed[cat] = round(1 - extra / len(rs), 4)
        else:
            junk_removed[cat] = round(sum(status[r["url"]] != "kept" for r in rs) / len(rs), 4)
    good = by_cat.get("good", []) + by_cat.get("pii", [])
    good_kept = sum(any(status.get(u) == "kept" for u in [r["url"], *mirrors.get(r["url"], [])]) for r in good)
    pii_truth_left = sum(s in kept.get(r["url"], "") for r in by_cat.get("pii", []) for s in r.get("pii", []))
    return {"junk_removed": junk_removed, "good_kept": round(good_kept / max(1, len(good)), 4),
            "pii_left": sum(len(find_pii(t)) for t in kept.values()), "pii_truth_left": pii_truth_left,
            "removed_by": removed_by}


# --- checks and display

def wet_overlap(warc: Path, wet: Path) -> dict[str, float]:
    """For each page in both files: the share of our extracted words found in Common Crawl's WET text for it."""
    from warcio.archiveiterator import ArchiveIterator

    from crawl2chat.data_steps import HtmlExtractor, decode_page

    def pages(path, rec_type):
        with open(path, "rb") as f:
            for rec in ArchiveIterator(f):
                if rec.rec_type == rec_type:
                    ctype = rec.http_headers.get_header("Content-Type") if rec.http_headers else None
                    cs = re.search(r"charset=([\w.:-]+)", ctype or "")
                    yield rec.rec_headers.get_header("WARC-Target-URI"), decode_page(
                        rec.content_stream().read(), cs.group(1) if cs else None)[0]

    wet_words = {url: set(re.findall(r"\w+", text.lower())) for url, text in pages(wet, "conversion")}
    extractor = HtmlExtractor(**EXTRACT_KW)
    out = {}
    for url, html in pages(warc, "response"):
        if url in wet_words:
            words = re.findall(r"\w+", (extractor.extract(html) or "").lower())
            out[url] = sum(w in wet_words[url] for w in words) / max(1, len(words))
    return out


def print_summary(stats: dict) -> None:
    from rich.console import Console
    console = Console(stderr=True)
    removed = ", ".join(f"{k} −{v}" for k, v in stats["removed"].items() if v)
    console.print(f"data: {stats['documents_in']} → {stats['documents_out']} documents ({removed or 'none removed'})"
                  f" in {stats['wall_s']:.1f}s, {stats['docs_per_s']:.1f} docs/s; "
                  f"{stats['read_error_count']} read problems")
    if "good_kept" in stats:
        console.print(f"  vs truth: good kept {stats['good_kept']:.3f}, pii left {stats['pii_left']}, junk removed "
                      + ", ".join(f"{k} {v:.2f}" for k, v in stats["junk_removed"].items()))


def show_examples(out_dir: Path, n: int = 3) -> None:
    """Print a few removed documents per filter (URL and the first 300 characters)."""
    from rich.console import Console
    from rich.panel import Panel
    console = Console()
    for name in FILTERS:
        docs = []
        for doc in iter_jsonl_gz(Path(out_dir) / "removed" / name):
            docs.append(doc)
            if len(docs) == n:
                break
        if not docs:
            continue
        console.rule(f"[bold]removed by {name}")
        for doc in docs:
            meta = doc.get("metadata", {})
            reason = meta.get("filter_reason", "")
            title = f"{meta.get('url') or doc['id']}" + (f"  [dim]({reason})[/dim]" if reason else "")
            console.print(Panel(doc.get("text", "")[:300], title=title, title_align="left"))
