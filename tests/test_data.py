"""The data stage: robustness of the readers, each filter's effect on a crawl we build here, real WARCs."""
from __future__ import annotations

import gzip
import io
import json
import random
import re
import tracemalloc
from pathlib import Path

import pytest
from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter

from crawl2chat.common import C2CError, shared_data
from crawl2chat.config import DataConfig, get_preset
from crawl2chat.data import find_pii, run_data, show_examples, wet_overlap

# --- a small crawl with known outcomes: real English prose (Wikipedia articles) in synthetic HTML


@pytest.fixture(scope="module")
def articles() -> list[str]:
    path = shared_data("text/llamafactory/wiki_demo.txt")
    assert path is not None, "shared data missing"
    return path.read_text().splitlines()


def prose(article: str, n_chars: int = 2500) -> str:
    """The start of an article as paragraphs of three sentences."""
    sents = re.split(r"(?<=[.!?])\s+", article)
    paras, cur, total = [], [], 0
    for s in sents:
        cur.append(s)
        total += len(s)
        if len(cur) == 3:
            paras.append(" ".join(cur))
            cur = []
        if total > n_chars:
            break
    return "\n".join(paras)


GERMAN = ("Die kleine Stadt liegt am Ufer eines breiten Flusses und ist für ihre alten Brücken bekannt. "
          "Im Sommer kommen viele Besucher, um die Märkte und die Kirche aus dem zwölften Jahrhundert zu sehen. "
          "Die Bewohner arbeiten meistens in der Landwirtschaft oder in kleinen Handwerksbetrieben.\n"
          "Jedes Jahr im Herbst findet ein großes Fest statt, bei dem die ganze Gemeinde zusammenkommt. "
          "Man isst gemeinsam, hört Musik und erzählt sich Geschichten aus der Vergangenheit. "
          "Die Schule wurde vor einigen Jahren renoviert und hat jetzt eine neue Bibliothek.\n"
          "Der Bürgermeister möchte, dass die Stadt auch in Zukunft lebendig bleibt und junge Familien anzieht. "
          "Deshalb wurden neue Wohnungen gebaut und die Verbindungen mit dem Zug verbessert.")
LOW_QUALITY = "\n".join(["best cheap shoes buy now"] * 30 + ["shoes shoes shoes discount"] * 20)
PII = ("You can write to the author at jane.doe@mailbox.org or call +1 555-123-4567 on weekdays, "
       "or (555) 987-6543 after six. The old server answered at 93.184.216.34 for many years.")


def html_page(title: str, text: str, lang: str = "en") -> str:
    body = "".join(f"<p>{p}</p>\n" for p in text.split("\n"))
    return (f'<!DOCTYPE html><html lang="{lang}"><head><meta charset="utf-8"><title>{title}</title></head><body>'
            f'<nav><a href="/">Home</a> <a href="/about">About</a> <a href="/contact">Contact</a></nav>'
            f"<main><article><h1>{title}</h1>\n{body}</article></main>"
            f"<footer>Copyright 2024 Example Media. All rights reserved.</footer></body></html>")


def write_warc(path: Path, pages: list[tuple[str, bytes]], content_type: str = "text/html; charset=utf-8"):
    """A WARC of response records, one gzip member per record (compression level 1: the 50 MB page is quick)."""
    def member(write):
        buf = io.BytesIO()
        write(WARCWriter(buf, gzip=False))
        return gzip.compress(buf.getvalue(), compresslevel=1)

    records = [member(lambda w: w.write_record(w.create_warcinfo_record(path.name, {"software": "crawl2chat"})))]
    for url, body in pages:
        http = StatusAndHeaders("200 OK", [("Content-Type", content_type)], protocol="HTTP/1.1")
        records.append(member(lambda w: w.write_record(
            w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=http))))
    path.write_bytes(b"".join(records))


def big_page(n_bytes: int) -> bytes:
    """Text that compresses like a real page (random words), not a million copies of one word."""
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    chunk = " ".join(rng.choice(words) for _ in range(200_000)).encode()
    return b"<html><body><p>" + (chunk * (n_bytes // len(chunk) + 1))[:n_bytes] + b"</p></body></html>"


def banned_url_word() -> str:
    from datatrove.utils._import_utils import ASSETS_PATH
    words = (Path(ASSETS_PATH) / "banned_words.txt").read_text().split()
    return next(w for w in words if w.isalpha() and len(w) > 4)


@pytest.fixture(scope="module")
def crawl(tmp_path_factory, articles):
    """Input files and the expected fate of each page."""
    root = tmp_path_factory.mktemp("crawl")
    text = iter(prose(articles[i]) for i in [6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22])
    good = {f"https://site{i}.example.org/article-{i}": prose(articles[i]) for i in range(6)}
    dup_of = "https://site0.example.org/article-0"
    mirror_text = good[dup_of].replace(" the ", " a ", 2) + "\nMirrored with permission."
    pages = {
        **{u: html_page(f"Article {i}", t) for i, (u, t) in enumerate(good.items())},
        f"http://www.{banned_url_word()}.example.com/gallery": html_page("Gallery", next(text)),
        "https://stadt.example.de/geschichte": html_page("Geschichte", GERMAN, lang="de"),
        "https://shoes.example.net/cheap": html_page("Cheap shoes", LOW_QUALITY),
        "https://mirror.example.info/copy": html_page("Copy", mirror_text),
        "https://people.example.org/contact": html_page("Contact", next(text) + "\n" + PII),
    }
    write_warc(root / "main.warc.gz", [(u, h.encode()) for u, h in pages.items()])
    # latin-1 bytes served as UTF-8, and a 50 MB page
    latin = html_page("Café", "The café on the corner served crème brûlée and naïve visitors loved it. "
                      + next(text)).encode("latin-1", errors="ignore")
    huge = big_page(50 * 2**20)
    odd_urls = ["https://latin.example.org/cafe", "https://huge.example.org/page", "https://after.example.org/ok"]
    write_warc(root / "odd.warc.gz", list(zip(odd_urls, [latin, huge, html_page("After", next(text)).encode()])))
    # a WARC cut in half: the records before the cut are kept
    cut_pages = [(f"https://cut.example.org/{i}", html_page(f"Cut {i}", next(text)).encode()) for i in range(6)]
    write_warc(root / "full.warc.gz", cut_pages)
    data = (root / "full.warc.gz").read_bytes()
    (root / "cut.warc.gz").write_bytes(data[: len(data) // 2])
    (root / "full.warc.gz").unlink()
    (root / "empty.warc.gz").write_bytes(b"")
    (root / "empty.jsonl").write_bytes(b"")
    lines = [json.dumps({"text": next(text), "id": "j1"}), "{not json", json.dumps({"text": next(text)})]
    (root / "texts.jsonl").write_text("\n".join(lines) + "\n")
    (root / "notes.txt").write_text("not an input")
    pages_dir = root / "saved_pages"
    pages_dir.mkdir()
    canonical = '<link rel="canonical" href="https://saved.example.org/canonical-page">'
    (pages_dir / "a.html").write_text(html_page("Saved", next(text)).replace("<title>", canonical + "<title>"))
    (pages_dir / "b.htm").write_text(html_page("Saved too", next(text)))
    return {"root": root, "good": set(good), "dup_of": dup_of, "mirror": "https://mirror.example.info/copy",
            "cut_pages": [u for u, _ in cut_pages], "odd_urls": odd_urls,
            "html_files": [pages_dir / "a.html", pages_dir / "b.htm"],
            "banned": next(u for u in pages if "www." in u)}


@pytest.fixture(scope="module")
def smoke_crawl(tmp_path_factory) -> Path:
    """The smoke world rendered as a labelled crawl (crawl/*.warc.gz + crawl_truth.jsonl)."""
    from crawl2chat.config import get_preset
    from crawl2chat.crawl import write_crawl
    from crawl2chat.world import build_world
    out = tmp_path_factory.mktemp("smoke_world")
    write_crawl(build_world(get_preset("smoke").world), out)
    return out


@pytest.fixture(scope="module")
def result(crawl, smoke_crawl, tmp_path_factory):
    """One pipeline run over our crawl, the smoke world's crawl and the real WARCs (one run keeps the tests fast;
    the truth file only scores the smoke world's records)."""
    out = tmp_path_factory.mktemp("data") / "data"
    real = [shared_data("web/warc/resiliparse"), shared_data("web/warc/commoncrawl-whirlwind/whirlwind.warc.gz")]
    assert all(real), "shared data missing"
    stats = run_data([crawl["root"], smoke_crawl / "crawl", *real], out, DataConfig(),
                     truth=smoke_crawl / "crawl_truth.jsonl", val_urls={"https://site1.example.org/article-1"})
    corpus = [json.loads(line) for line in (out / "corpus.jsonl").read_text().splitlines()]
    return {"out": out, "stats": stats, "corpus": {r["url"]: r for r in corpus}, "rows": corpus}


def removed_urls(out: Path, name: str) -> set:
    urls = set()
    for f in (out / "removed" / name).glob("*.jsonl.gz"):
        urls |= {json.loads(line)["metadata"].get("url") for line in gzip.open(f, "rt")}
    return urls


def test_each_filter_removes_its_page(crawl, result):
    out, kept = result["out"], result["corpus"]
    assert crawl["banned"] in removed_urls(out, "url")
    assert "https://stadt.example.de/geschichte" in removed_urls(out, "language")
    quality = set().union(*(removed_urls(out, f) for f in
                            ("gopher_repetition", "gopher_quality", "c4", "fineweb_quality")))
    assert "https://shoes.example.net/cheap" in quality
    # exactly one of the near-duplicate pair survives, removed by MinHash
    pair = {crawl["dup_of"], crawl["mirror"]}
    assert len(pair & set(kept)) == 1 and len(pair & removed_urls(out, "minhash")) == 1
    # every other good page is kept, with its boilerplate gone
    for url in crawl["good"] - pair:
        assert url in kept, url
        assert "All rights reserved" not in kept[url]["text"] and "About" not in kept[url]["text"]


def test_html_files_are_read_with_their_canonical_url(crawl, result):
    a, b = crawl["html_files"]
    assert result["corpus"]["https://saved.example.org/canonical-page"]["id"] == str(a)
    assert result["corpus"][b.resolve().as_uri()]["id"] == str(b)


def test_pii_is_masked_and_the_page_kept(result):
    text = result["corpus"]["https://people.example.org/contact"]["text"]
    assert "jane.doe@mailbox.org" not in text and "555-123-4567" not in text and "987-6543" not in text
    assert "93.184.216.34" not in text
    assert text.count("<PHONE>") == 2 and "<EMAIL>" in text and "<IP>" in text
    assert all(find_pii(r["text"]) == [] for r in result["rows"])


def test_bad_input_is_counted_and_good_documents_kept(crawl, result):
    stats, kept, root = result["stats"], result["corpus"], str(crawl["root"])
    errors = [e for e in stats["read_errors"] if e["file"].startswith(root)]
    by_file = {}
    for e in errors:
        by_file.setdefault(Path(e["file"]).name, []).append(e)
    # the cut WARC: its first pages survive, the cut record is reported with its byte offset
    survivors = [u for u in crawl["cut_pages"] if u in kept]
    assert 1 <= len(survivors) < len(crawl["cut_pages"])
    assert survivors == crawl["cut_pages"][: len(survivors)]
    assert len(by_file["cut.warc.gz"]) == 1 and by_file["cut.warc.gz"][0]["offset"] > 0
    # latin-1 served as UTF-8: decoded (not dropped) and reported; the 50 MB page skipped and reported
    latin, huge, after = crawl["odd_urls"]
    assert "café" in kept[latin]["text"] and "crème brûlée" in kept[latin]["text"]
    notes = {e["action"]: e for e in by_file["odd.warc.gz"]}
    assert "decoded as" in notes["kept"]["error"] and "larger than" in notes["skipped"]["error"]
    assert huge not in kept and after in kept
    assert {e["error"] for e in by_file["empty.warc.gz"] + by_file["empty.jsonl"]} == {"empty file"}
    # JSONL: the bad line is reported by number, the two others are read
    assert [(e["offset"], e["unit"]) for e in by_file["texts.jsonl"]] == [(2, "line")]
    assert "j1" in {r["id"] for r in result["rows"]}
    assert stats["ignored_files"] == 2 and stats["read_error_count"] == len(stats["read_errors"])


def test_big_page_is_streamed_not_loaded(crawl, tmp_path):
    from crawl2chat.data_steps import WarcDocReader
    paths = tmp_path / "paths.txt"
    paths.write_text(str(crawl["root"] / "odd.warc.gz").lstrip("/") + "\n")
    reader = WarcDocReader("/", str(paths), str(tmp_path / "errors"))
    tracemalloc.start()
    urls = [d.metadata["url"] for d in reader.run()]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert urls == [crawl["odd_urls"][0], crawl["odd_urls"][2]]
    assert peak < 20 * 2**20, peak  # the page is 50 MB


def test_stats_and_outputs(result):
    stats, out = result["stats"], result["out"]
    saved = json.loads((out / "stats.json").read_text())
    assert saved["documents_out"] == len(result["rows"]) == stats["documents_out"] > 0
    assert stats["documents_in"] == sum(stats["removed"].values()) + stats["documents_out"]
    url_step = next(r for r in stats["steps"] if "Url-filter" in r["step"])
    assert url_step["in"] == stats["documents_in"] == sum(
        r["out"] for r in stats["steps"] if "READER" in r["step"] and r["stage"] == "1_filter")
    assert stats["splits"]["val"] == 1 and result["corpus"]["https://site1.example.org/article-1"]["split"] == "val"
    assert list((out / "clean").glob("*.jsonl.gz")) and stats["bytes_out"] > 0 and stats["docs_per_s"] > 0
    assert {r["stage"] for r in stats["steps"]} == {"1_filter", "2_signatures", "3_buckets", "4_cluster", "5_dedup"}


def test_real_warcs_run_through(result):
    stats = result["stats"]
    assert stats["inputs"] == {"warc": 8, "jsonl": 2, "html": 2}  # main, odd, cut, empty, smoke, 3 real
    # ClueWeb (WARC 0.18, EUC-JP) and Common Crawl pages are read: 29 + 16 + 1 responses besides ours
    removed_lang = removed_urls(result["out"], "language")
    assert sum("uraharajuku" in (u or "") for u in removed_lang) >= 25
    assert "https://an.wikipedia.org/wiki/Escopete" in removed_lang


def test_smoke_world_junk_removed_and_pii_masked(result):
    stats = result["stats"]
    junk = stats["junk_removed"]
    assert set(junk) == {"adult", "malware", "spam_url", "spam_quality", "non_english", "mixed_language",
                         "low_quality", "near_duplicate", "not_html"}
    for category, share in junk.items():
        assert share >= (0.90 if category == "near_duplicate" else 0.98), (category, share, stats["removed_by"])
    assert stats["pii_left"] == 0 and stats["pii_truth_left"] == 0
    assert set(stats["removed_by"]["adult"]) == {"url"}  # the block list catches them, not a later filter
    assert set(stats["removed_by"]["not_html"]) == {"not_read"}  # PDF, PNG, 404, 301: the reader skips them


def test_smoke_world_with_its_preset_thresholds(smoke_crawl, tmp_path):
    """The world presets relax FineWeb's thresholds for the world's short templated pages
    (config.WORLD_QUALITY); junk must still go and good pages stay."""
    stats = run_data([smoke_crawl / "crawl"], tmp_path / "out", get_preset("smoke").data,
                     truth=smoke_crawl / "crawl_truth.jsonl")
    assert stats["good_kept"] >= 0.97, stats["removed_by"]["good"]
    for category, share in stats["junk_removed"].items():
        assert share >= (0.90 if category == "near_duplicate" else 0.98), (category, stats["removed_by"][category])
    assert stats["pii_left"] == 0


def test_examples_show_removed_pages(result, capsys):
    show_examples(result["out"], n=2)
    printed = capsys.readouterr().out
    assert "removed by language" in printed and "stadt.example.de" in printed


def test_phone_masking_leaves_numbers_alone():
    from crawl2chat.data_steps import PhoneFormatter
    f = PhoneFormatter()
    for phone in ["+1 555-123-4567", "(555) 123-4567", "555.123.4567", "020 7946 0958", "+44 20 7946 0958"]:
        assert f.format(f"Call {phone} today.") == "Call <PHONE> today.", phone
    for text in ["born in 1987", "$1,234,567", "3 + 4 = 7", "on 2023-05-17", "12 345 678 people", "version 1.2.3"]:
        assert f.format(text) == text


def test_input_errors(tmp_path):
    with pytest.raises(C2CError, match="no inputs"):
        run_data([], tmp_path / "out", DataConfig())
    with pytest.raises(C2CError, match="missing.warc.gz: input not found"):
        run_data([tmp_path / "missing.warc.gz"], tmp_path / "out", DataConfig())
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(C2CError, match="x.csv: unknown input type"):
        run_data([tmp_path / "x.csv"], tmp_path / "out", DataConfig())


def test_parquet_needs_pyarrow_or_is_read(tmp_path, articles):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "t.parquet").write_bytes(b"PAR1")
        with pytest.raises(C2CError, match="t.parquet: reading parquet needs pyarrow"):
            run_data([tmp_path / "t.parquet"], tmp_path / "out", DataConfig(minhash=False))
        return
    pq.write_table(pa.table({"text": [prose(articles[0]), prose(articles[1])], "url": ["https://a.org/1", None]}),
                   tmp_path / "t.parquet")
    stats = run_data([tmp_path / "t.parquet"], tmp_path / "out", DataConfig(minhash=False))
    assert stats["documents_in"] == 2 and stats["documents_out"] == 2


def test_whirlwind_extraction_matches_common_crawl_wet():
    folder = shared_data("web/warc/commoncrawl-whirlwind")
    assert folder is not None, "shared data missing"
    shares = wet_overlap(folder / "whirlwind.warc.gz", folder / "whirlwind.warc.wet.gz")
    assert shares["https://an.wikipedia.org/wiki/Escopete"] >= 0.9


def test_language_filter_on_real_pages():
    """Of the trafilatura cache pages, German ones are removed by language ID and English ones pass it."""
    import trafilatura

    from crawl2chat.data import EXTRACT_KW
    from crawl2chat.data_steps import LanguageIDFilter, decode_page
    folder = shared_data("web/trafilatura/cache")
    assert folder is not None, "shared data missing"
    lang_filter = LanguageIDFilter(["en"], 0.65)
    passed = {"de": [], "en": []}
    for page in sorted(folder.glob("*.html")):
        raw = page.read_bytes()
        m = re.search(rb"<html[^>]*\blang=[\"']?([a-zA-Z]+)", raw[:20000])
        lang = m.group(1).decode().lower() if m else None
        if lang in passed:
            text = trafilatura.extract(decode_page(raw)[0], favor_precision=EXTRACT_KW["favour_precision"],
                                       deduplicate=EXTRACT_KW["deduplicate"], include_comments=False) or ""
            lang_id, score = lang_filter.classify(text) if text else ("", 0.0)
            passed[lang].append(lang_id == "en" and score >= 0.65)
    assert len(passed["de"]) >= 40 and len(passed["en"]) >= 20
    assert 1 - sum(passed["de"]) / len(passed["de"]) >= 0.95
    assert sum(passed["en"]) / len(passed["en"]) >= 0.80
