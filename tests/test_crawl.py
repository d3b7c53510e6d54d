"""The world rendered as a WARC crawl: records and headers, categories, determinism, and the junk
checked against the real datatrove filters (URL blocklist, Gopher / C4 / FineWeb quality, PII)."""
import functools
import re
from types import SimpleNamespace

import pytest
from lxml import html as lxml_html

from crawl2chat.common import iter_jsonl
from crawl2chat.config import WorldConfig
from crawl2chat.crawl import CATEGORIES, URL_JUNK, jaccard, write_crawl
from crawl2chat.world import build_world

SMOKE = WorldConfig(n_known=20, n_search_only=6, n_unknown=6, n_towns=8, n_companies=8, n_math_pages=20,
                    n_problems_train=40, n_problems_test=10, n_bignum_train=10, n_bignum_test=5)


def _read(out):
    from warcio.archiveiterator import ArchiveIterator
    files, records = sorted((out / "crawl").glob("crawl-*.warc.gz")), []
    for path in files:
        with open(path, "rb") as f:
            types = []
            for rec in ArchiveIterator(f):
                types.append(rec.rec_type)
                if rec.rec_type == "response":
                    records.append(SimpleNamespace(
                        url=rec.rec_headers.get_header("WARC-Target-URI"), warc=rec.rec_headers,
                        http=rec.http_headers, body=rec.content_stream().read()))
            assert types[0] == "warcinfo" and set(types[1:]) == {"response"}, path
    return files, records


@pytest.fixture(scope="module")
def crawl(tmp_path_factory):
    world = build_world(SMOKE)
    out = tmp_path_factory.mktemp("crawl")
    summary = write_crawl(world, out, seed=0)
    files, records = _read(out)
    truth = [row for _, row in iter_jsonl(out / "crawl_truth.jsonl")]
    return SimpleNamespace(world=world, out=out, summary=summary, files=files, records=records, truth=truth,
                           by_url={r.url: r for r in records}, docs={d["id"]: d for d in world["documents"]})


@pytest.fixture(scope="module")
def extracted(crawl):
    """url → trafilatura text (as datatrove's Trafilatura extractor calls it) for every HTML record."""
    import trafilatura
    from trafilatura.deduplication import LRU_TEST
    LRU_TEST.clear()  # its cross-document dedup cache is global to the process
    return {r.url: trafilatura.extract(r.body.decode(), favor_precision=True, include_comments=False,
                                       deduplicate=True) or ""
            for r in crawl.records if r.warc.get_header("WARC-Identified-Payload-Type") == "text/html"}


def _rows(crawl, *categories):
    return [t for t in crawl.truth if t["category"] in categories]


def _norm(s: str) -> str:
    return " ".join(s.split())


def test_warc_records_headers_and_truth(crawl):
    assert [r.url for r in crawl.records] == [t["url"] for t in crawl.truth]
    assert len(crawl.records) == crawl.summary["records"] == len({r.url for r in crawl.records})
    assert crawl.summary["warc_files"] == len(crawl.files)
    assert crawl.summary["warc_bytes"] == sum(p.stat().st_size for p in crawl.files)
    # every world document once, under its own URL; no search-only page
    kept = _rows(crawl, "good", "pii")
    assert sorted(t["doc_id"] for t in kept) == sorted(crawl.docs)
    assert all(crawl.docs[t["doc_id"]]["url"] == t["url"] for t in kept)
    assert all(crawl.docs[t["doc_id"]]["split"] == t["split"] for t in kept)
    assert not {d["url"] for d in crawl.world["search_only_documents"]} & set(crawl.by_url)
    for t in crawl.truth:
        r = crawl.by_url[t["url"]]
        assert r.http.protocol == "HTTP/1.1" and r.http.get_header("Date") and r.http.get_header("Server")
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", r.warc.get_header("WARC-Date"))
        if t["category"] != "not_html":
            assert r.http.get_statuscode() == "200"
            assert r.http.get_header("Content-Type") == "text/html; charset=utf-8"
            assert f'<html lang="{t["language"]}">' in r.body.decode()
    odd = {t["subkind"]: crawl.by_url[t["url"]] for t in _rows(crawl, "not_html")}
    assert odd["pdf"].http.get_header("Content-Type") == "application/pdf" and odd["pdf"].body.startswith(b"%PDF")
    assert odd["png"].body.startswith(b"\x89PNG")
    assert odd["404"].http.get_statuscode() == "404" and odd["301"].http.get_header("Location") in crawl.by_url


def test_every_category_present(crawl):
    counts = {c: len(_rows(crawl, c)) for c in CATEGORIES}
    assert counts == {c: crawl.summary[c] for c in CATEGORIES}
    assert all(n >= 3 for n in counts.values()), counts
    assert {t["subkind"] for t in _rows(crawl, "low_quality")} == {
        "keyword_list", "repetition", "fragments", "boilerplate_only", "all_caps"}
    assert {t["language"] for t in _rows(crawl, "non_english")} == {"fr", "de", "es"}
    assert all(t["duplicate_of"] in crawl.by_url for t in _rows(crawl, "near_duplicate"))
    assert all(len(t["pii"]) == 2 for t in _rows(crawl, "pii"))


def test_deterministic_for_a_seed(crawl, tmp_path):
    again = write_crawl(crawl.world, tmp_path / "a", seed=0)
    other = write_crawl(crawl.world, tmp_path / "b", seed=1)
    assert again == crawl.summary
    assert [p.read_bytes() for p in sorted((tmp_path / "a/crawl").iterdir())] == [p.read_bytes() for p in crawl.files]
    assert (tmp_path / "a/crawl_truth.jsonl").read_text() == (crawl.out / "crawl_truth.jsonl").read_text()
    assert (tmp_path / "b/crawl_truth.jsonl").read_text() != (crawl.out / "crawl_truth.jsonl").read_text()


def test_extraction_keeps_text_and_drops_boilerplate(crawl, extracted):
    leaked = 0
    for t in _rows(crawl, "good", "pii"):
        got = _norm(extracted[t["url"]])
        lines = [_norm(x) for x in crawl.docs[t["doc_id"]]["text"].split("\n") if x.strip()]
        missing = [x for x in lines if x not in got]
        assert not missing, (t["url"], missing)
        tree = lxml_html.fromstring(crawl.by_url[t["url"]].body)
        boiler = [_norm(e.text_content()) for e in tree.xpath(
            "//footer//p | //*[contains(@class, 'cookie')]//p | //aside//li | //nav//li")]
        assert len(boiler) >= 6
        own = _norm(crawl.docs[t["doc_id"]]["text"])  # a related link may carry the page's own title
        leaked += any(len(b) > 12 and b in got and b not in own for b in boiler)
    assert leaked <= 0.05 * len(_rows(crawl, "good", "pii")), leaked


def test_url_filter_blocks_url_junk_only(crawl):
    import tldextract
    from datatrove.data import Document
    from datatrove.pipeline.filters import URLFilter
    f = URLFilter()
    f.tldextractor = tldextract.TLDExtract(suffix_list_urls=())  # the bundled suffix list: no network

    def kept(url):
        verdict = f.filter(Document(text="x", id=url, metadata={"url": url}))
        return verdict[0] if isinstance(verdict, tuple) else verdict
    blocked = [t["url"] for t in _rows(crawl, *URL_JUNK)]
    others = [t["url"] for t in crawl.truth if t["category"] not in URL_JUNK]
    assert not [u for u in blocked if kept(u)]
    assert all(kept(u) for u in others), [u for u in others if not kept(u)]


@functools.cache
def _quality_filters() -> tuple:
    from datatrove.pipeline.filters import (C4QualityFilter, FineWebQualityFilter, GopherQualityFilter,
                                            GopherRepetitionFilter)
    return GopherRepetitionFilter(), GopherQualityFilter(), C4QualityFilter(), FineWebQualityFilter()


def _quality_verdicts(text: str) -> list[bool]:
    """Per filter (with its defaults): does it keep the text?"""
    from datatrove.data import Document
    out = []
    for f in _quality_filters():
        v = f.filter(Document(text=text, id="x"))
        out.append(v[0] if isinstance(v, tuple) else v)
    return out


def test_quality_filters(crawl, extracted):
    for t in _rows(crawl, "low_quality", "spam_quality"):  # an empty extraction is dropped by the extractor
        text = extracted[t["url"]]
        assert not text or not all(_quality_verdicts(text)), (t, text)
    # The filters judge a good page as they judge its world text: the rendering neither adds nor removes
    # anything they look at but the blank line after the title (trafilatura keeps one line break, which
    # moves Gopher's n-gram counts on a page at the edge). (How many world pages they remove is a
    # property of the world's text.)
    passing = 0
    for t in _rows(crawl, "good", "pii"):
        world_text = crawl.docs[t["doc_id"]]["text"].replace("\n\n", "\n")
        page, world = _quality_verdicts(extracted[t["url"]]), _quality_verdicts(world_text)
        if t["category"] == "good":
            assert page == world, (t["url"], page, world)
        else:
            assert all(page) or not all(world), (t["url"], page, world)
        passing += all(page)
    assert passing > 0


def test_near_duplicates_are_close_but_not_identical(crawl, extracted):
    for t in _rows(crawl, "near_duplicate"):
        copy, orig = extracted[t["url"]], extracted[t["duplicate_of"]]
        assert copy != orig and crawl.by_url[t["url"]].body != crawl.by_url[t["duplicate_of"]].body
        assert jaccard(copy, orig) >= 0.8, (t["url"], copy, orig)


def test_pii_present_and_emails_ips_maskable(crawl, extracted):
    from datatrove.pipeline.formatters import PIIFormatter
    masker = PIIFormatter()
    for t in _rows(crawl, "pii"):
        html, text = crawl.by_url[t["url"]].body.decode(), extracted[t["url"]]
        assert all(s in html and s in text for s in t["pii"]), t
        masked = masker.format(text)
        for s in t["pii"]:
            if "@" in s or re.fullmatch(r"[\d.]+", s):  # PIIFormatter has no phone pattern
                assert s not in masked, (s, masked)


def test_languages(crawl, extracted):
    from py3langid import langid
    ident = langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)
    for t in _rows(crawl, "non_english"):
        assert ident.classify(extracted[t["url"]])[0] == t["language"], t
    for t in _rows(crawl, "mixed_language"):
        text = extracted[t["url"]]
        lang, prob = ident.classify(text)
        assert lang == t["language"] and prob > 0.65, (t, lang, prob)
        sentences = [s for s in re.split(r"(?<=[.!?])\s+|\n", text) if s.strip()]
        english = [s for s in sentences if ident.classify(s)[0] == "en"]
        assert english and sum(map(len, english)) <= 0.3 * sum(map(len, sentences)), (t, english)
    for t in _rows(crawl, "good"):  # the data stage keeps English at probability >= 0.65
        lang, prob = ident.classify(extracted[t["url"]])
        assert lang == "en" and prob >= 0.65, (t, lang, prob)
