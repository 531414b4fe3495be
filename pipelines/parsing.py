"""Parse a file's bytes into a title and a text: plain text, Markdown, reStructuredText, HTML, PDF.

HTML and PDF parsers run in a child process with a deadline and a memory bound (``ParseLimits``): a
file within ``read.max_doc_mb`` can still take minutes or gigabytes to parse (a PDF whose pages share
one huge content stream, a decompression bomb, deeply nested HTML). Such a document fails with its
reason, the child is killed and replaced, and the read task goes on with the next file. The child is a
fresh interpreter that holds none of the Ray worker's memory or threads, so that the memory bound
(RLIMIT_AS) measures the parser alone.

This module imports only the standard library at the top: it is what the child loads.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from typing import Any, NamedTuple

TEXT_SUFFIXES = {".txt", ".text", ".md", ".markdown", ".rst"}
HTML_SUFFIXES = {".html", ".htm"}
PDF_SUFFIXES = {".pdf"}
FILE_SUFFIXES = TEXT_SUFFIXES | HTML_SUFFIXES | PDF_SUFFIXES


class ParseLimits(NamedTuple):
    """What parsing one HTML or PDF document may take; 0 is no bound. Both 0: parsed in-process."""

    timeout_s: float = 120
    memory_mb: float = 2048


class ParseError(ValueError):
    """A document that cannot be parsed: its message is the reason the run reports."""


def parse(suffix: str, data: bytes, limits: ParseLimits | None = None) -> tuple[str, str]:
    """The (title, text) of a file's bytes, by its lower-case suffix.

    Args:
        suffix: one of FILE_SUFFIXES.
        data: the file's bytes.
        limits: deadline and memory bound for HTML and PDF; None: ParseLimits() defaults.

    Raises:
        ParseError: not text (NUL bytes, not UTF-8), or the parser overran a limit, died or failed
            in the child; in this process, whatever the parser raises for a broken file.
    """
    if suffix in PDF_SUFFIXES or suffix in HTML_SUFFIXES:
        limits = limits or ParseLimits()
        if limits.timeout_s or limits.memory_mb:
            return _bounded(limits, suffix, data)
    return parse_unbounded(suffix, data)


def parse_unbounded(suffix: str, data: bytes) -> tuple[str, str]:
    """Parse in this process (what the child runs)."""
    if suffix in PDF_SUFFIXES:
        return pdf_text(data)
    if b"\x00" in data[:8192]:
        raise ParseError("binary content in a text file (NUL bytes)")
    try:
        raw = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ParseError(f"not valid UTF-8 at byte {exc.start}") from exc
    return html_text(raw) if suffix in HTML_SUFFIXES else (text_title(raw), raw)


_MD_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_RST_HEADING = re.compile(r"^(\S.*)\n([=\-~^\"'`#*+])\2{2,}\s*$", re.MULTILINE)


def text_title(text: str) -> str:
    """The first Markdown or reStructuredText heading near the top; "" if none."""
    head = text[:4000]
    match = _MD_HEADING.search(head) or _RST_HEADING.search(head)
    return match.group(1).strip() if match else ""


_BLOCKS = {"p", "div", "li", "tr", "br", "pre", "blockquote", "section"}
_SKIPPED = {"script", "style", "noscript", "template", "svg", "title"}


def html_text(raw: str) -> tuple[str, str]:
    """The title and the visible text of an HTML page; headings become Markdown headings so that the
    chunker can split at them, and block elements end lines.

    One walk over the tree with a stack of its own: time linear in the page (inserting a newline
    after every block costs a search of its parent's children, quadratic on a flat page of many
    paragraphs) and no recursion limit on deeply nested pages.
    """
    from bs4 import BeautifulSoup, CData, NavigableString, Tag

    soup = BeautifulSoup(raw, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    parts: list[str] = []
    stack: list[Any] = [iter(soup.contents)]
    ends: list[str] = [""]
    while stack:
        node = next(stack[-1], None)
        if node is None:
            stack.pop()
            parts.append(ends.pop())
        elif isinstance(node, Tag):
            if node.name in _SKIPPED:
                continue
            end = "\n" if node.name in _BLOCKS else ""
            if len(node.name) == 2 and node.name[0] == "h" and node.name[1] in "123456":
                parts.append(f"\n\n{'#' * int(node.name[1])} ")
                end = "\n\n"
            stack.append(iter(node.contents))
            ends.append(end)
        elif type(node) in (NavigableString, CData):  # not comments, doctypes or declarations
            parts.append(str(node))
    text = re.sub(r"\n\s*\n\s*(\n\s*)+", "\n\n", "".join(parts))
    text = re.sub(r"[ \t]+", " ", text).strip()
    return title, text


def pdf_text(data: bytes) -> tuple[str, str]:
    from pypdf import PdfReader

    reader = PdfReader(io.BytesIO(data))
    pages = [page.extract_text() or "" for page in reader.pages]
    title = ""
    if reader.metadata is not None and reader.metadata.title:
        title = str(reader.metadata.title)
    return title, "\n\n".join(p.strip() for p in pages if p.strip())


# --- the child process ---------------------------------------------------------------------------
#
# Started with `python -m pipelines.parsing`, not multiprocessing: a spawned or fork-server child of
# multiprocessing imports the parent's __main__ again (a user's script without a main guard, Ray's worker
# module), and a forked one shares the Ray worker's threads and memory. Messages are pickled tuples over
# the child's stdin and stdout, framed by multiprocessing.connection.


class _Child:
    """One parser process: started on first use, replaced after it overran a limit or died."""

    def __init__(self, memory_mb: float) -> None:
        self.memory_mb = memory_mb
        self.proc: subprocess.Popen[bytes] | None = None

    def parse(self, suffix: str, data: bytes, timeout_s: float) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        assert self.proc is not None
        try:
            self.to_child.send((suffix, data))
            answered = self.from_child.poll(timeout_s or None)
        except OSError:  # the pipe broke: the child is gone
            answered = True
        if not answered:
            peak_mb = _peak_mb(self.proc.pid)
            self.stop()
            reason = f"parsing took longer than read.parse_timeout_s={timeout_s:g} s"
            # A parser that reached the memory bound can fail to allocate in a loop rather than
            # raise: name the bound, which is what stopped it.
            if self.memory_mb and peak_mb >= 0.95 * self.memory_mb:
                reason += f" at read.parse_memory_mb={self.memory_mb:g} MB"
            raise ParseError(reason)
        try:
            title, text, error = self.from_child.recv()
        except (EOFError, OSError) as exc:  # killed by the kernel or a crash in C code, most often memory
            code = self.proc.wait()
            self.stop()
            how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
            bound = f"; out of read.parse_memory_mb={self.memory_mb:g}?" if self.memory_mb else ""
            raise ParseError(f"the parser process died ({how}{bound})") from exc
        if error is not None:
            raise ParseError(error)
        return title, text

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        self.proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(self.memory_mb), str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # the parsers' warnings; a reason comes back as a message
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.to_child = Connection(os.dup(self.proc.stdin.fileno()), readable=False)
        self.from_child = Connection(os.dup(self.proc.stdout.fileno()), writable=False)

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.proc.kill()
        self.proc.wait()
        for end in (self.to_child, self.from_child, self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                end.close()
        self.proc = None


def _peak_mb(pid: int) -> float:
    """A process's peak address space (VmPeak), in MB; 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmPeak:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


_children: dict[float, _Child] = {}
_children_lock = threading.Lock()


def _bounded(limits: ParseLimits, suffix: str, data: bytes) -> tuple[str, str]:
    # One child per process and memory bound, reused by every task this process runs; the read task
    # holds one CPU, so it parses one file at a time.
    with _children_lock:
        child = _children.get(limits.memory_mb)
        if child is None:
            child = _children[limits.memory_mb] = _Child(limits.memory_mb)
            atexit.register(child.stop)
        return child.parse(suffix, data, limits.timeout_s)


def _serve(memory_mb: float, parent: int) -> None:
    """The child's loop: (suffix, data) in, (title, text, error) out, until stdin closes."""
    from multiprocessing.connection import Connection

    if memory_mb:
        limit = int(memory_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()
    requests, answers = Connection(0, writable=False), Connection(1, readable=False)
    sys.stdout = sys.stderr  # a parser's print must not land in the answer pipe
    while True:
        try:
            suffix, data = requests.recv()
        except EOFError:
            return
        answers.send(_answer(suffix, data, memory_mb))


def _answer(suffix: str, data: bytes, memory_mb: float) -> tuple[str, str, str | None]:
    try:
        title, text = parse_unbounded(suffix, data)
    except MemoryError:
        return "", "", f"parsing needed more than read.parse_memory_mb={memory_mb:g} MB"
    except RecursionError:
        return "", "", "the document nests too deeply to parse (RecursionError)"
    except ParseError as exc:
        return "", "", str(exc)
    except Exception as exc:  # noqa: BLE001  (a broken file: its reason goes back to the parent)
        return "", "", f"{type(exc).__name__}: {exc}"
    return title, text, None


def _exit_with(parent: int) -> None:
    # A parent killed with SIGKILL closes no pipe while the child is busy: the child then stops on its own.
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(0)


if __name__ == "__main__":
    _serve(float(sys.argv[1]), int(sys.argv[2]))
