"""Our datatrove steps: fault-tolerant readers (WARC, JSONL, a folder of HTML files), HTML-only extraction,
an offline URL filter, language ID with py3langid, and phone-number masking.

Readers never stop on bad input: each unreadable record is appended to `<errors_dir>/<pid>.jsonl` as
{file, offset, unit, error, action} and the pipeline goes on with the next record.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import re
import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np

import datatrove.executor.base as _executor_base
import datatrove.pipeline.dedup.minhash as _minhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.extractors import Trafilatura
from datatrove.pipeline.extractors.base import ExtractorSandbox
from datatrove.pipeline.filters import URLFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.formatters.base import BaseFormatter
from datatrove.pipeline.readers import ParquetReader
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.utils.typeshelper import StatHints
from loguru import logger
from tqdm import tqdm

MAX_PAGE_BYTES = 5 * 2**20  # larger pages are skipped, and counted as read errors
HTML_TYPES = {"text/html", "application/xhtml+xml"}

# --- quiet logs: datatrove sends every task's log to stderr as well as to its log file; keep the file only.
# Patched at import, so that tasks run in worker processes (which import this module to unpickle our steps)
# are quiet too. MAIN_LOG, when set, is the file that gets the executor's own messages between tasks.
MAIN_LOG: str | None = None
_LOG_FORMAT = "{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <8} | {name}:{function}:{line} - {message}"


def _task_logger(logging_dir, rank: int, local_rank: int = 0, node_rank: int = -1):
    logger.remove()
    logfile = logging_dir.open(f"logs/task_{rank:05d}.log", "w")
    logger.add(logfile, level="DEBUG", format=_LOG_FORMAT, colorize=False)
    logger.info(f"Launching pipeline for {rank=}")
    return logfile


def _close_task_logger(logfile) -> None:
    logger.complete()
    logger.remove()
    if MAIN_LOG:
        logger.add(MAIN_LOG, level="INFO", format=_LOG_FORMAT, colorize=False)
    logfile.close()


_executor_base.add_task_logger = _task_logger
_executor_base.close_task_logger = _close_task_logger
_minhash.tqdm = functools.partial(tqdm, disable=True)  # MinHash clustering draws a progress bar of its own


# --- decoding

_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)


def _codec(name: str | None) -> str | None:
    import codecs
    try:
        return codecs.lookup(name).name if name else None
    except LookupError:
        return None


def decode_page(data: bytes, declared: str | None = None) -> tuple[str, str | None]:
    """(text, note): decode with the declared charset (HTTP header), else the <meta> charset, else UTF-8;
    when that fails, detect the charset (charset_normalizer) and note it. Never raises."""
    meta = _META_CHARSET.search(data[:4096])
    expected = _codec(declared) or _codec(meta.group(1).decode("ascii", "ignore") if meta else None) or "utf-8"
    try:
        return data.decode(expected), None
    except UnicodeDecodeError:
        pass
    if expected != "utf-8":
        with contextlib.suppress(UnicodeDecodeError):
            return data.decode("utf-8"), f"not valid {expected}; decoded as utf-8"
    from charset_normalizer import from_bytes
    matches = list(from_bytes(data[:200_000]))
    enc = None
    if matches:
        # Western text fits several single-byte code pages equally well; prefer windows-1252, the web's usual
        # legacy charset (browsers read "latin-1" as it), among the least chaotic candidates.
        least = min(m.chaos for m in matches)
        tied = [m for m in matches if m.chaos <= least + 0.005]
        pick = next((m for m in tied if "cp1252" in m.could_be_from_charset), min(tied, key=lambda m: m.chaos))
        enc = _codec("cp1252" if "cp1252" in pick.could_be_from_charset else pick.encoding)
    if enc:
        return data.decode(enc, errors="replace"), f"not valid {expected}; decoded as {enc} (detected)"
    return data.decode("utf-8", errors="replace"), f"not valid {expected}; decoded as utf-8 with replacement"


# --- readers

def _local_path(reader, filepath: str) -> str:
    return os.path.join(reader.data_folder.path, filepath)  # (resolve_paths would give "//x" under "/")


class ReadErrors:
    """Records unreadable input in `errors_dir` (one JSONL file per process) instead of failing."""

    errors_dir: str

    def read_error(self, path: str, offset: int, error: str, unit: str = "byte", kept: bool = False) -> None:
        self.stat_update("read_errors")
        row = {"file": path, "offset": offset, "unit": unit, "error": error, "action": "kept" if kept else "skipped"}
        os.makedirs(self.errors_dir, exist_ok=True)
        with open(os.path.join(self.errors_dir, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


class _ErrorCountingReader(ReadErrors, BaseDiskReader):
    """A disk reader that counts bad input instead of failing, and tags documents with their format."""

    def __init__(self, data_folder, paths_file, errors_dir: str, **kwargs):
        super().__init__(data_folder, paths_file=paths_file, **kwargs)
        self.errors_dir = errors_dir

    def make_doc(self, text: str, doc_id: str, path: str, offset: int, fmt: str, **metadata) -> Document | None:
        doc = self.get_document_from_dict({"text": text, "id": doc_id, "format": fmt, **metadata}, path, offset)
        if doc is None:
            self.stat_update("empty")
        return doc

    def empty_file(self, filepath: str) -> bool:
        path = _local_path(self, filepath)
        if self.data_folder.size(filepath) == 0:
            self.read_error(path, 0, "empty file")
            return True
        return False


class WarcDocReader(_ErrorCountingReader):
    """WARC/WET records → documents (HTML responses, WET text conversions). Follows datatrove's WarcReader, and
    adds record offsets in errors, HTTP status and charset handling, a size cap and truncation checks."""

    name = "🕷 Warc"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        from warcio.archiveiterator import ArchiveIterator
        path = _local_path(self, filepath)
        if self.empty_file(filepath):
            return
        offset = 0
        with self.data_folder.open(filepath, "rb", compression=None) as f:  # warcio inflates per record
            try:
                it = ArchiveIterator(f, arc2warc=True)
                for record in it:
                    with self.track_time():
                        doc = self._record_doc(record, path, it)
                        offset = it.get_record_offset()  # (reads the record to its end)
                    if doc is not None:
                        yield doc
            except Exception as e:  # a broken header or compressed stream: the rest of the file is lost
                self.read_error(path, offset, f"unreadable from here on: {type(e).__name__}: {e}"[:300])

    def _record_doc(self, record, path: str, it) -> Document | None:
        if record.rec_type not in ("response", "conversion"):
            return None
        http = record.http_headers
        if record.rec_type == "response" and http is not None:
            status = http.get_statuscode() or ""
            if not status.startswith("2"):
                self.stat_update("skipped_http_status")
                return None
        ctype = (http.get_header("Content-Type") if http is not None else None) or ""
        mime = (record.rec_headers.get_header("WARC-Identified-Payload-Type") or ctype.split(";")[0]).strip().lower()
        data = record.content_stream().read(MAX_PAGE_BYTES + 1)
        truncated = getattr(record.raw_stream, "limit", 0)  # fewer bytes than its Content-Length: a cut file
        offset = it.get_record_offset()
        if len(data) > MAX_PAGE_BYTES:
            self.read_error(path, offset, f"page larger than {MAX_PAGE_BYTES} bytes")
            return None
        if truncated:
            self.read_error(path, offset, f"record truncated ({truncated} bytes missing)")
            return None
        if record.rec_type == "conversion":
            fmt = "text"
        elif mime in HTML_TYPES or (not mime and re.search(rb"<html|<!doctype html", data[:2048], re.I)):
            fmt = "html"
        else:
            self.stat_update("skipped_not_html")
            return None
        charset = re.search(r"charset=([\w.:-]+)", ctype, re.I)
        text, note = decode_page(data, charset.group(1) if charset else None)
        if note:
            self.read_error(path, offset, note, kept=True)
        h = record.rec_headers
        url = h.get_header("WARC-Target-URI") or h.get_header("uri")
        doc_id = h.get_header("WARC-Record-ID") or f"{path}#{offset}"
        return self.make_doc(text, doc_id, path, offset, fmt, url=url, date=h.get_header("WARC-Date"))


class JsonlDocReader(_ErrorCountingReader):
    """JSONL (optionally .gz/.zst) with a `text` field and optional `url`/`id`; a bad line is counted, not fatal."""

    name = "🐿 Jsonl"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        path = _local_path(self, filepath)
        if self.empty_file(filepath):
            return
        lineno = 0
        with self.data_folder.open(filepath, "rt", compression="infer", encoding="utf-8", errors="replace") as f:
            while True:
                line = f.readline(MAX_PAGE_BYTES + 1)
                if not line:
                    break
                lineno += 1
                if len(line) > MAX_PAGE_BYTES and not line.endswith("\n"):
                    while (rest := f.readline(2**20)) and not rest.endswith("\n"):
                        pass  # skip the rest of an oversized line without holding it in memory
                    self.read_error(path, lineno, f"line longer than {MAX_PAGE_BYTES} characters", unit="line")
                    continue
                if not line.strip():
                    continue
                with self.track_time():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        self.read_error(path, lineno, f"not valid JSON ({e.msg})", unit="line")
                        continue
                    if not isinstance(row, dict) or not isinstance(row.get(self.text_key), str):
                        self.read_error(path, lineno, f"no string field {self.text_key!r}", unit="line")
                        continue
                    row = {**row, "format": "text"}
                    if "id" in row:
                        row["id"] = str(row["id"])
                    doc = self.get_document_from_dict(row, filepath, lineno)
                if doc is not None:
                    yield doc


_CANONICAL = re.compile(r"""<link\b[^>]*\brel=["']?canonical["']?[^>]*>""", re.I)
_HREF = re.compile(r"""\bhref=["']?([^"'\s>]+)""", re.I)


class HtmlFileReader(_ErrorCountingReader):
    """Each .html/.htm file is one document; its URL is the page's <link rel=canonical> or file://path."""

    name = "📄 Html files"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        path = _local_path(self, filepath)
        if self.empty_file(filepath):
            return
        if self.data_folder.size(filepath) > MAX_PAGE_BYTES:
            self.read_error(path, 0, f"page larger than {MAX_PAGE_BYTES} bytes")
            return
        with self.track_time():
            with self.data_folder.open(filepath, "rb", compression=None) as f:
                text, note = decode_page(f.read())
            if note:
                self.read_error(path, 0, note, kept=True)
            link = _CANONICAL.search(text[:65536])
            href = _HREF.search(link.group(0)) if link else None
            url = href.group(1) if href and "://" in href.group(1) else Path(path).resolve().as_uri()
            doc = self.make_doc(text, path, path, 0, "html", url=url)
        if doc is not None:
            yield doc


class ParquetDocReader(ReadErrors, ParquetReader):
    """datatrove's ParquetReader (needs pyarrow), with an unreadable file counted like the other readers' errors."""

    def __init__(self, data_folder, paths_file, errors_dir: str, **kwargs):
        super().__init__(data_folder, paths_file=paths_file, **kwargs)
        self.errors_dir = errors_dir

    def read_file(self, filepath: str) -> DocumentsPipeline:
        path = _local_path(self, filepath)
        try:
            for doc in super().read_file(filepath):
                doc.metadata.setdefault("format", "text")
                yield doc
        except Exception as e:
            self.read_error(path, 0, f"unreadable parquet: {type(e).__name__}: {e}"[:300])


def parquet_reader(data_folder, paths_file, errors_dir: str) -> ParquetDocReader | None:
    """A ParquetDocReader, or None without pyarrow."""
    if importlib.util.find_spec("pyarrow") is None:
        return None
    return ParquetDocReader(data_folder, paths_file, errors_dir)


# --- processing steps

def _h64(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little")


class HashedDomains:
    """Membership in the shipped 4.5M-domain block list, as a sorted array of 64-bit hashes cached beside the
    list: loading it takes milliseconds, where parsing the 120 MB text file into a set takes 10+ s per process."""

    def __init__(self, path: str, extra=()):
        st = os.stat(path)
        cache = f"{path}.{st.st_size}.{int(st.st_mtime)}.b2u64.npy"
        if not os.path.exists(cache):
            with open(path) as f:
                hashes = np.unique(np.fromiter((_h64(x.strip()) for x in f if x[:1] != "#"), dtype=np.uint64))
            tmp = f"{cache}.{os.getpid()}.tmp.npy"
            np.save(tmp, hashes)
            os.replace(tmp, cache)
        self.hashes = np.load(cache, mmap_mode="r")
        self.extra = set(extra)

    def __contains__(self, domain: str) -> bool:
        if not domain:
            return False
        if domain in self.extra:
            return True
        h = np.uint64(_h64(domain))
        i = int(np.searchsorted(self.hashes, h))
        return i < len(self.hashes) and self.hashes[i] == h


class OfflineURLFilter(URLFilter):
    """datatrove's URLFilter with its shipped block lists, using tldextract's bundled suffix list (no network)
    and the domain list as HashedDomains. Documents without a URL (plain JSONL text) pass."""

    def __init__(self, **kwargs):
        from tldextract import TLDExtract
        super().__init__(**kwargs)
        self.tldextractor = TLDExtract(suffix_list_urls=())

    def download_data(self):  # URLFilter.download_data, with the domain list loaded as HashedDomains
        if self._downloaded or not self.use_integrated_lists:
            return
        from datatrove.io import safely_create_file
        from datatrove.pipeline.filters.url_filter import get_list
        from datatrove.utils._import_utils import ASSETS_PATH
        from huggingface_hub import cached_assets_path
        folder = cached_assets_path(library_name="datatrove", namespace="filters", subfolder="url_filter")
        archive = "url_filterblacklistsv0_3_0.tar.gz"

        def extract():
            with tarfile.open(os.path.join(ASSETS_PATH, archive), "r:gz") as tar:
                tar.extractall(folder)

        safely_create_file(os.path.join(folder, archive), extract)
        self.block_listed_domains = HashedDomains(os.path.join(folder, "domains"), self.block_listed_domains)
        self.block_listed_url = get_list(folder, "urls", self.block_listed_url, do_normalize=False)
        self.banned_words = get_list(ASSETS_PATH, "banned_words.txt", self.banned_words)
        self.banned_subwords = get_list(ASSETS_PATH, "banned_subwords.txt", self.banned_subwords)
        self.soft_banned_words = get_list(ASSETS_PATH, "soft_banned_words.txt", self.soft_banned_words)
        for word in self.banned_subwords:
            self.banned_subwords_automaton.add_word(word, len(self.banned_subwords_automaton))
        self.banned_subwords_automaton.make_automaton()
        self._downloaded = True

    def filter(self, document: Document) -> bool | tuple[bool, str]:
        if not document.metadata.get("url"):
            return True
        with warnings.catch_warnings():  # URLFilter reads tldextract's deprecated `registered_domain`
            warnings.simplefilter("ignore", DeprecationWarning)
            return super().filter(document)


class HtmlExtractor(Trafilatura):
    """Trafilatura on HTML documents only (JSONL/parquet text passes through); documents with no text left go
    to the exclusion writer, like a filter's."""

    def __init__(self, exclusion_writer=None, **kwargs):
        super().__init__(**kwargs)
        self.exclusion_writer = exclusion_writer

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        ew = self.exclusion_writer
        with ExtractorSandbox(timeout=self.timeout) as sandbox, (ew if ew else contextlib.nullcontext()) as writer:
            for doc in data:
                if doc.metadata.get("format") != "html":
                    self.stat_update("passed_as_text")
                    yield doc
                    continue
                self.stat_update(StatHints.total)
                reason = None
                with self.track_time():
                    try:
                        text = sandbox.process_document(doc.text, self.extract) or ""
                        reason = None if text.strip() else "no_text"
                    except TimeoutError:
                        reason = "timeout"
                    except EOFError:
                        reason = "extractor_died"
                    except Exception:
                        reason = "extractor_error"
                if reason is None:  # (a removed document keeps its HTML, for `c2c data --examples`)
                    doc.text = text
                    doc.metadata["format"] = "text"
                    self.stat_update(StatHints.forwarded)
                    self.update_doc_stats(doc)
                    yield doc
                else:
                    self.stat_update(StatHints.dropped, f"dropped_{reason}")
                    if writer:
                        doc.metadata["filter_reason"] = reason
                        writer.write(doc, rank)


class LanguageIDFilter(BaseFilter):
    """Keeps documents whose py3langid language is in `languages` with probability ≥ `threshold`
    (datatrove's LanguageFilter needs a fastText model download)."""

    name = "🌍 Language ID"

    def __init__(self, languages=("en",), threshold: float = 0.65, exclusion_writer=None):
        super().__init__(exclusion_writer)
        self.languages = list(languages)
        self.threshold = threshold

    @staticmethod
    @functools.cache
    def identifier():  # loaded once per process (a second), shared by every copy of the step
        from py3langid import langid
        return langid.LanguageIdentifier.from_model_file(langid.MODEL_FILE, norm_probs=True)

    def classify(self, text: str) -> tuple[str, float]:
        lang, score = self.identifier().classify(text)
        return lang, float(score)

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        lang, score = self.classify(doc.text)
        doc.metadata["language"], doc.metadata["language_score"] = lang, round(score, 4)
        if lang in self.languages and score >= self.threshold:
            return True
        return False, "low_score" if lang in self.languages else f"lang_{lang}"


# +1 555-123-4567, (555) 123-4567, 555.123.4567, 020 7946 0958, +44 20 7946 0958. The last group has 4 digits,
# so thousands (12 345 678, $1,234,567), years and dates (2023-05-17) are left alone.
PHONE_RE = re.compile(r"(?<![\w+.-])(?:\+\d{1,3}[ .-]?)?"         # country code
                      r"(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"          # area code
                      r"\d{3,4}[ .-]\d{4}(?![\w-]|\.\d)")


class PhoneFormatter(BaseFormatter):
    """Masks phone numbers, which datatrove's PIIFormatter (emails, IPs) does not cover."""

    name = "📞 Phones"

    def __init__(self, replacement: str = "<PHONE>"):
        super().__init__()
        self.replacement = replacement

    def format(self, text: str) -> str:
        text, n = PHONE_RE.subn(self.replacement, text)
        if n:
            self.stat_update("phones_masked", value=n)
        return text


def silence_stderr_logs(main_log: str | None) -> None:
    """Route loguru (datatrove's logger) to `main_log` only, or restore datatrove's default stderr sink."""
    global MAIN_LOG
    MAIN_LOG = main_log
    logger.remove()
    if main_log:
        logger.add(main_log, level="INFO", format=_LOG_FORMAT, colorize=False)
    else:
        logger.add(sys.stderr, level="WARNING")
