"""The assistant's tools: web search over our own crawl (SQLite FTS5, BM25) and a sandboxed Python.

Search: `build_index` puts JSONL documents {id, url, text} into out_dir/index.sqlite (title = the text's
first line); `search` turns any string the model writes into a safe FTS5 query and returns the top
pages, each as its title and the sentences closest to the query, in one short string.

Python: `run_python` runs code in a fresh `python -I` process with an empty environment, rlimits on CPU
time, memory, file size and processes, and a wall-clock timeout. Where the OS allows it (root, or
unprivileged user namespaces) the process runs in a jail: new mount, PID and network namespaces, chrooted
into a tmpfs that shows only /usr, /bin, /lib* and the interpreter's prefix read-only, /dev/null-like
devices and writable tmpfs /tmp and /sandbox (its working directory); as root it then runs as nobody.
Elsewhere it falls back to a temporary working directory, nobody (as root) and a network namespace.
It never raises: errors come back as text, like a REPL would show them.
"""
from __future__ import annotations

import ast
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
from collections.abc import Callable
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


_STOP = frozenset("a an the of in on at to is was be by for and or what who when where which how did does do "
                  "you me tell i about his her their with from".split())
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def _stem(word: str) -> str:
    """A crude suffix stripper, enough to match studied/study, works/work, employed/employ."""
    for suffix, repl in (("ies", "y"), ("ied", "y"), ("ing", ""), ("ed", ""), ("es", ""), ("s", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[:-len(suffix)] + repl
    return word


def _terms(text: str) -> set[str]:
    return {_stem(w) for w in _WORD.findall(text.lower()) if w not in _STOP}


def best_sentences(text: str, query: str, n: int = 2) -> str:
    """The n sentences of a document's body (after its title line) that share the most words with the
    query, in document order: a snippet that holds whole facts, not a window of words cut mid-sentence."""
    body = text.strip().split("\n", 1)[-1] if "\n" in text.strip() else text
    sentences = [s for s in _SENTENCE.split(" ".join(body.split())) if s]
    q = _terms(query)
    best = sorted(range(len(sentences)), key=lambda i: (-len(_terms(sentences[i]) & q), i))[:n]
    return " ".join(sentences[i] for i in sorted(best))


def search(index_path: str | Path, query: str, k: int = 3, max_chars: int = 600, sentences: int = 2,
           urls: bool = True) -> str:
    """The top-k documents for `query` (BM25), one line each: `title (url): best sentences` (the
    `sentences` sentences of the page closest to the query; without the url when urls=False), at most
    max_chars in all; "no results for: <query>" when nothing matches."""
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
            rows = con.execute("SELECT title, url, text FROM docs WHERE docs MATCH ? "
                               "ORDER BY bm25(docs, 2.0, 1.0) LIMIT ?", (q, k)).fetchall()
        except sqlite3.DatabaseError as e:
            raise C2CError(f"{index_path}: not a usable search index ({e})") from None
        finally:
            con.close()
    if not rows:
        return f"no results for: {query.strip()}"[:max_chars]
    lines = []
    for title, url, text in rows:
        snip = best_sentences(text, query, sentences)
        lines.append(f"{title} ({url}): {snip}" if url and urls else f"{title}: {snip}")
    out = "\n".join(lines)
    return out if len(out) <= max_chars else out[:max_chars - 1] + "…"


def model_search(index_path: str | Path) -> Callable[[str], str]:
    """The web search the model is trained with and answers with (idk, RL, chat, serve): the best page's
    one sentence closest to the query, no url — about 20 tokens, so it fits a small context and the
    answer is the only value in sight."""
    return lambda q: search(index_path, q, k=1, max_chars=300, sentences=1, urls=False)


def chat_tools(run_dir: Path, warn: Callable[[str], None]) -> dict[str, Callable[[str], str]]:
    """The tools a chat model may call: Python always, web search when the run has a search index
    (else `warn` is told)."""
    out = {"python": run_python}
    index = Path(run_dir) / "search" / INDEX_FILE
    if index.exists():
        out["search"] = model_search(index)
    else:
        warn(f"{index}: no search index (build it with `c2c index`): web search is off")
    return out


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
import ast, os, signal, sys, traceback
signal.signal(signal.SIGXCPU, lambda *_: os._exit(128 + signal.SIGXCPU))
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


# ---- the filesystem jail: new mount + PID + network namespaces, chroot into a minimal tree ----

CLONE_NEWNS, CLONE_NEWPID = 0x00020000, 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
JAIL_CWD = "/sandbox"   # the code's working directory inside the jail (a fresh tmpfs)
_LIBC.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def _mount(src, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    _check(_LIBC.mount(enc(src), enc(target), enc(fstype), flags, enc(data)), f"mount {target}")


def _visible_trees() -> list[str]:
    """What the jail shows, read-only: the system's libraries and the interpreter's own prefix."""
    trees = ["/usr", "/bin", "/sbin", "/lib", "/lib64", "/lib32", "/libx32",
             os.path.realpath(sys.base_prefix)]
    return [t for i, t in enumerate(trees) if os.path.lexists(t) and t not in trees[:i]]


def _bind_readonly(src: str, dst: str) -> None:
    _mount(src, dst, None, MS_BIND | MS_REC)
    f = os.statvfs(src).f_flag  # a user namespace may not clear flags it inherited (nosuid, nodev, ...)
    keep = (f & (MS_NOSUID | MS_NODEV | MS_NOEXEC | 1024 | 2048)) | ((1 << 21) if f & 4096 else 0)
    _mount(None, dst, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)


def _enter_jail(root: str) -> None:
    """Runs in the child before exec: new user (unless root), mount, network and PID namespaces; a
    tmpfs at `root` holding read-only binds of _visible_trees(), /dev/{null,zero,random,urandom} and
    writable tmpfs /tmp and JAIL_CWD; chroot into it. Forks once so that the code runs as PID 1 of
    its own PID namespace (it can see and signal no process outside); the middle process only waits
    and passes on the exit status (128 + N for a signal N, as a shell does). As PID 1 the code ignores
    signals it has no handler for, so the driver catches SIGXCPU itself."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if os.geteuid() == 0 else CLONE_NEWUSER)
    _check(_LIBC.unshare(flags), "unshare")
    if os.geteuid() != 0 or flags & CLONE_NEWUSER:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            fd = os.open(f"/proc/self/{name}", os.O_WRONLY)
            os.write(fd, text.encode())
            os.close(fd)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for tree in _visible_trees():
        dst = root + tree
        if os.path.islink(tree):
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.symlink(os.readlink(tree), dst)
        else:
            os.makedirs(dst, exist_ok=True)
            _bind_readonly(tree, dst)
    os.makedirs(root + "/dev")
    for dev in ("null", "zero", "random", "urandom"):
        open(root + "/dev/" + dev, "w").close()
        _mount("/dev/" + dev, root + "/dev/" + dev, None, MS_BIND)
    for d in ("/tmp", JAIL_CWD):
        os.makedirs(root + d)
    _mount(None, root, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for d in ("/tmp", JAIL_CWD):
        _mount("tmpfs", root + d, "tmpfs", MS_NOSUID | MS_NODEV, f"size={MAX_FILE_MB}m,mode=1777")
    os.chroot(root)
    os.chdir(JAIL_CWD)
    pid = os.fork()
    if pid == 0:
        return  # the code's process: PID 1 of the new namespace, goes on to exec
    os.closerange(0, 1 << 16)  # the parent must see exec's error pipe close when the child execs
    _, status = os.waitpid(pid, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status))


def _limits(cpu_s: int, memory_mb: int, nproc: int, isolate_net: bool, jail_root: str | None = None):
    """The preexec_fn: runs in the child between fork and exec."""
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_MB << 20, MAX_FILE_MB << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if jail_root is not None:
            _enter_jail(jail_root)
        elif isolate_net:
            _unshare_net()
    return apply


def _python() -> str:
    """The base interpreter (a virtual environment's python may live in a tree the jail hides)."""
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


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


@lru_cache(maxsize=1)
def jail_available() -> bool:
    """Whether this OS lets us run the sandbox in the filesystem jail (checked once)."""
    if not sys.platform.startswith("linux") or not hasattr(_LIBC, "unshare"):
        return False
    root = tempfile.mkdtemp(prefix="c2c-jail-")
    try:
        r = subprocess.run([_python(), "-I", "-c", "import os; assert not os.path.exists('/etc')"],
                           preexec_fn=_limits(10, 512, _count_processes(_sandbox_uid()) + 2 + MAX_PROCS, True, root),
                           env={}, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
        return r.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_ARITHMETIC = re.compile(r"[\d\s+\-*()]{1,200}")
_ARITH_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


def literal_arithmetic(code: str) -> str | None:
    """The value of code made only of integer literals, +, -, * and parentheses, exactly as the sandbox
    would print it; None for anything else. Such code cannot do anything but compute a number (no
    names, no calls, no powers; at most 200 characters bounds the result's size), so run_python
    answers it without starting a process: RL rollouts make hundreds of such calls a step."""
    if not _ARITHMETIC.fullmatch(code) or not code.strip() or code[0].isspace():  # indented: an error
        return None
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError):
        return None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH_OPS:
            return _ARITH_OPS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = value(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError("not literal arithmetic")
    try:
        return repr(value(tree.body))
    except ValueError:
        return None


def run_python(code: str, timeout_s: float = 5.0, cpu_s: int = 5, memory_mb: int = 512,
               max_output: int = 2000, fast: bool = True) -> str:
    """Run `code` in the sandbox; return its stdout+stderr (the last expression's value printed like a
    REPL; an error as its traceback's last line), cut to max_output characters. Never raises.
    With fast, literal integer arithmetic is answered in-process (literal_arithmetic), same output."""
    fast = literal_arithmetic(code) if fast else None
    if fast is not None:
        return fast[:max_output]
    if len(code) > MAX_CODE_CHARS:
        return f"error: code too long ({len(code)} characters, at most {MAX_CODE_CHARS})"
    if "\x00" in code:
        return "error: code contains a NUL character"
    isolate = network_isolation_available()
    jail = jail_available()
    uid = _sandbox_uid()
    workdir = tempfile.mkdtemp(prefix="c2c-python-")
    try:
        if os.geteuid() == 0:
            os.chown(workdir, NOBODY, NOBODY)
        # the jail's waiting middle process counts against a non-root user's process limit
        nproc = _count_processes(uid) + 1 + (jail and uid != NOBODY) + MAX_PROCS
        # output goes to an unlinked file, not a pipe: bounded by RLIMIT_FSIZE, and children left
        # behind cannot keep us waiting for a pipe to close
        with tempfile.TemporaryFile() as out:
            try:
                proc = subprocess.Popen(
                    [_python() if jail else sys.executable, "-I", "-c", _DRIVER, code], cwd=workdir,
                    env={"PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_limits(cpu_s, memory_mb, nproc, isolate, workdir if jail else None))
            except (OSError, subprocess.SubprocessError) as e:
                return f"error: could not start Python ({e})"
            note = ""
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                note = f"timeout: the code ran longer than {timeout_s:g} s and was stopped"
            _kill_group(proc.pid)  # the code's own child processes too
            proc.wait()
            rc = proc.returncode
            sig = -rc if rc < 0 else rc - 128 if rc > 128 and rc - 128 in signal.valid_signals() else 0
            if not note and sig == signal.SIGXCPU:
                note = f"timeout: the code used more than {cpu_s} s of CPU time and was stopped"
            elif not note and sig == signal.SIGXFSZ:
                note = f"error: the code wrote more than {MAX_FILE_MB} MB of output and was stopped"
            elif not note and sig:
                note = f"error: the code was killed by signal {signal.Signals(sig).name}"
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
            "filesystem_jail": jail_available(), "visible_trees": _visible_trees() if jail_available() else None,
            "runs_as_uid": uid, "dropped_root": os.geteuid() == 0,
            "rlimits": {"cpu_s": 5, "memory_mb": 512, "file_mb": MAX_FILE_MB,
                        "extra_processes": MAX_PROCS}, "wall_timeout_s": 5.0}
