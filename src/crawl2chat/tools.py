"""The assistant's tools: web search over our own crawl (SQLite FTS5, BM25) and a sandboxed Python.

Search: `build_index` puts JSONL documents {id, url, text} into out_dir/index.sqlite (title = the text's
first line); `search` turns any string the model writes into a safe FTS5 query and returns the top
results as one short string.

Python: `run_python` runs code in a fresh `python -I` process with an empty environment, a temporary
working directory (deleted afterwards), rlimits on CPU time, memory, file size and processes, a
wall-clock timeout, and no network (a new network namespace) where the OS allows it. It never raises:
errors come back as text, like a REPL would show them.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import resource
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

from crawl2chat.common import C2CError, iter_jsonl

INDEX_FILE = "index.sqlite"

# ---- web search ----------------------------------------------------------------------------------


def default_sources(run_dir: Path) -> list[Path]:
    """The clean corpus (data/corpus.jsonl, or the world's corpus before a data stage exists) and the
    world's search-only pages."""
    run_dir = Path(run_dir)
    corpus = run_dir / "data" / "corpus.jsonl"
    if not corpus.exists() and (run_dir / "world" / "corpus.jsonl").exists():
        corpus = run_dir / "world" / "corpus.jsonl"
    return [corpus, run_dir / "world" / "search_only.jsonl"]


def _title(text: str) -> str:
    first = text.strip().split("\n", 1)[0].strip() if text.strip() else ""
    return first[:120]


def build_index(sources: list[Path], out_dir: Path) -> dict:
    """Index every document of the JSONL `sources` into out_dir/index.sqlite (built in a temporary file,
    then renamed). Returns counts."""
    sources = [Path(s) for s in sources]
    for s in sources:
        if not s.is_file():
            raise C2CError(f"{s}: search source not found")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{INDEX_FILE}.", suffix=".tmp")
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        con = sqlite3.connect(tmp)
        con.execute("PRAGMA journal_mode=OFF")
        con.execute("CREATE VIRTUAL TABLE docs USING fts5(title, text, url UNINDEXED, doc_id UNINDEXED, "
                    "tokenize='porter unicode61')")
        for src in sources:
            rows = []
            for lineno, obj in iter_jsonl(src):
                text = obj.get("text")
                if not isinstance(text, str):
                    raise C2CError(f"{src}:{lineno}: expected a string field \"text\"")
                if not text.strip():
                    continue
                rows.append((_title(text), text, str(obj.get("url") or ""), str(obj.get("id", f"{src.name}:{lineno}"))))
            con.executemany("INSERT INTO docs(title, text, url, doc_id) VALUES (?, ?, ?, ?)", rows)
            counts[str(src)] = counts.get(str(src), 0) + len(rows)
        con.execute("INSERT INTO docs(docs) VALUES ('optimize')")
        con.commit()
        con.close()
        os.replace(tmp, out_dir / INDEX_FILE)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"documents": sum(counts.values()), "sources": counts,
            "index_bytes": (out_dir / INDEX_FILE).stat().st_size, "build_s": round(time.perf_counter() - t0, 3)}


_WORD = re.compile(r"\w+", re.UNICODE)


def fts_query(query: str, max_terms: int = 32) -> str:
    """Any text → an FTS5 query that cannot be a syntax error: each word quoted, OR-ed (BM25 ranks the
    documents that match more, and rarer, words first). Empty if the text has no words."""
    words = list(dict.fromkeys(w.lower() for w in _WORD.findall(query)))[:max_terms]
    return " OR ".join(f'"{w}"' for w in words)


def search(index_path: str | Path, query: str, k: int = 3, max_chars: int = 600) -> str:
    """The top-k documents for `query`, one line each: `title (url): …snippet…`, at most max_chars in
    all; "no results for: <query>" when nothing matches."""
    index_path = Path(index_path)
    if index_path.is_dir():
        index_path = index_path / INDEX_FILE
    if not index_path.is_file():
        raise C2CError(f"{index_path}: search index not found — run `c2c index` first")
    q = fts_query(query)
    rows = []
    if q:
        con = sqlite3.connect(f"file:{index_path}?mode=ro", uri=True)
        try:
            rows = con.execute(
                "SELECT title, url, snippet(docs, 1, '', '', '…', 24) FROM docs WHERE docs MATCH ? "
                "ORDER BY bm25(docs, 2.0, 1.0) LIMIT ?", (q, k)).fetchall()
        except sqlite3.DatabaseError as e:
            raise C2CError(f"{index_path}: not a usable search index ({e})") from None
        finally:
            con.close()
    if not rows:
        return f"no results for: {query.strip()}"[:max_chars]
    lines = []
    for title, url, snip in rows:
        snip = " ".join(snip.split())
        lines.append(f"{title} ({url}): {snip}" if url else f"{title}: {snip}")
    out = "\n".join(lines)
    return out if len(out) <= max_chars else out[:max_chars - 1] + "…"


def register_index(sub) -> None:
    """The `c2c index` subcommand."""
    text = "build the search index (SQLite FTS5) over the clean corpus and the search-only pages"
    p = sub.add_parser("index", help=text, description=text[0].upper() + text[1:] + ".")
    p.add_argument("--out", type=Path, default=Path("runs/tiny"), help="run directory (default: runs/tiny)")
    p.add_argument("--source", type=Path, action="append", default=None, metavar="FILE",
                   help="a JSONL file of {id, url, text} documents to index instead of the run's own "
                        "(repeatable)")


def cmd_index(args) -> None:
    sources = args.source or default_sources(args.out)
    print(json.dumps(build_index(sources, Path(args.out) / "search"), indent=2))


# ---- the Python sandbox --------------------------------------------------------------------------

CLONE_NEWUSER, CLONE_NEWNET = 0x10000000, 0x40000000
NOBODY = 65534
MAX_PROCS = 16          # processes the sandboxed code may start, beyond those its user already has
MAX_FILE_MB = 16
MAX_CODE_CHARS = 100_000
_LIBC = ctypes.CDLL(None, use_errno=True)

# Runs inside the sandbox: drop root, then exec the code, printing the last expression's value like a
# REPL, and an error as the last line(s) of its traceback. As root the stdlib may sit under a directory
# only root can read (/root/.pyenv): the modules a calculation needs are imported before dropping.
_DRIVER = r"""
import ast, os, sys, traceback
if os.getuid() == 0:
    import math, cmath, random, statistics, fractions, decimal, itertools, functools, collections
    import re, json, datetime, string, operator, heapq, bisect, socket, time
    os.setgroups([]); os.setgid(%(nobody)d); os.setuid(%(nobody)d)
src = sys.argv[1]
del sys.argv[1:]
ns = {"__name__": "__main__", "__builtins__": __builtins__}
try:
    tree = ast.parse(src, "<python>")
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, "<python>", "exec"), ns)
    if last is not None:
        value = eval(compile(last, "<python>", "eval"), ns)
        if value is not None:
            print(repr(value))
except SystemExit:
    raise
except BaseException as e:
    sys.stdout.flush()
    print("".join(traceback.format_exception_only(type(e), e)).rstrip(), file=sys.stderr)
    sys.exit(1)
""" % {"nobody": NOBODY}


def _sandbox_uid() -> int:
    return NOBODY if os.geteuid() == 0 else os.getuid()


def _count_processes(uid: int) -> int:
    n = 0
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                n += os.stat(f"/proc/{d}").st_uid == uid
            except OSError:
                pass
    return n


def _unshare_net() -> None:
    """A new network namespace (only a loopback interface, down). Root needs no user namespace."""
    flags = CLONE_NEWNET if os.geteuid() == 0 else CLONE_NEWUSER | CLONE_NEWNET
    if _LIBC.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _limits(cpu_s: int, memory_mb: int, nproc: int, isolate_net: bool):
    """The preexec_fn: runs in the child between fork and exec."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_MB << 20, MAX_FILE_MB << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if isolate_net:
            _unshare_net()
    return apply


@lru_cache(maxsize=1)
def network_isolation_available() -> bool:
    """Whether this OS lets us start the sandbox in a new network namespace (checked once)."""
    if not sys.platform.startswith("linux") or not hasattr(_LIBC, "unshare"):
        return False
    try:
        r = subprocess.run([sys.executable, "-I", "-c", "pass"], preexec_fn=_unshare_net, env={},
                           stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_python(code: str, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
               max_output: int = 2000) -> str:
    """Run `code` in the sandbox; return its stdout+stderr (the last expression's value printed like a
    REPL; an error as its traceback's last line), cut to max_output characters. Never raises."""
    if len(code) > MAX_CODE_CHARS:
        return f"error: code too long ({len(code)} characters, at most {MAX_CODE_CHARS})"
    if "\x00" in code:
        return "error: code contains a NUL character"
    isolate = network_isolation_available()
    uid = _sandbox_uid()
    workdir = tempfile.mkdtemp(prefix="c2c-python-")
    try:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)
        # output goes to an unlinked file, not a pipe: bounded by RLIMIT_FSIZE, and children left
        # behind cannot keep us waiting for a pipe to close
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _DRIVER, code], cwd=workdir, env={"PATH": "/usr/bin:/bin"},
                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_limits(cpu_s, memory_mb, _count_processes(uid) + 1 + MAX_PROCS, isolate))
            except (OSError, subprocess.SubprocessError) as e:
                return f"error: could not start Python ({e})"
            note = ""
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                note = f"timeout: the code ran longer than {timeout_s:g} s and was stopped"
            _kill_group(proc.pid)  # the code's own child processes too
            proc.wait()
            if not note and proc.returncode == -signal.SIGXCPU:
                note = f"timeout: the code used more than {cpu_s} s of CPU time and was stopped"
            elif not note and proc.returncode < 0:
                note = f"error: the code was killed by signal {signal.Signals(-proc.returncode).name}"
            out.seek(0)
            text = out.read(4 * max_output + 4).decode("utf-8", errors="replace")
            if not note and not text.strip() and proc.returncode > 0:
                note = f"(exit status {proc.returncode})"
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    text = text.rstrip("\n")
    if len(text) > max_output:
        text = text[:max_output] + f"\n[output cut at {max_output} characters]"
    return "\n".join(s for s in (text, note) if s)


def doctor() -> dict:
    """What the sandbox can enforce on this machine."""
    uid = _sandbox_uid()
    return {"python": sys.executable, "network_isolation": network_isolation_available(),
            "runs_as_uid": uid, "dropped_root": os.geteuid() == 0,
            "rlimits": {"cpu_s": 5, "memory_mb": 512, "file_mb": MAX_FILE_MB,
                        "extra_processes": MAX_PROCS}, "wall_timeout_s": 5.0}
