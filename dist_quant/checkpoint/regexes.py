"""The ``re:`` entries of a checkpoint's config matched as vLLM matches them (Python's ``re.match``), in bounded time:
for the compressed-tensors format's ``Matcher`` (checkpoint/formats/compressed_tensors.py), which both the loader
check and the read-back of a published checkpoint's types use.

A pattern such as ``(.*)*Q$`` backtracks exponentially in Python's ``re``: vLLM would hang at load, and a check that
ran it in this process would hang too (``re`` cannot be interrupted). The ``regex`` package's ``timeout=`` is no
answer: it finishes such patterns in microseconds, so it would pass a config that hangs vLLM. Each pattern is
therefore run by ``re`` itself in a child process, under a time limit per pattern and one for all of them; a
pattern that does not finish is reported, never waited for (and, for callers that need an answer rather than a
verdict, such as which group a module of a published checkpoint is in, matches nothing).
"""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import time
from typing import Optional

SECONDS_PER_PATTERN = 1.0  # one pattern against every layer name: a sane one takes milliseconds on 235B's 37k names
SECONDS_IN_ALL = 10.0  # every pattern of the config together (each one that hangs costs SECONDS_PER_PATTERN)
# the child: each pattern's matches, one JSON line per pattern, in order (a line per pattern tells which one hangs)
_CHILD = ("import json, re, sys\n"
          "patterns, names = json.load(sys.stdin)\n"
          "for p in patterns:\n"
          "    print(json.dumps([i for i, n in enumerate(names) if re.match(p, n)]), flush=True)\n")


def compile_error(pattern: str) -> Optional[str]:
    """Why Python's ``re`` (what vLLM compiles the entry with) refuses ``pattern``; None if it compiles."""
    try:
        re.compile(pattern)
    except re.error as error:
        return str(error)
    except (RecursionError, OverflowError, ValueError, MemoryError) as error:
        return f"{type(error).__name__}: {str(error)[:100]}"
    return None


def _lines(child: subprocess.Popen, count: int, deadline: float):
    """Up to ``count`` lines of the child's output, each arriving within SECONDS_PER_PATTERN and before ``deadline``
    (read from the descriptor: a buffered reader would hide lines it holds from ``select``)."""
    fd, pending = child.stdout.fileno(), bytearray()
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        for _ in range(count):
            until = min(time.monotonic() + SECONDS_PER_PATTERN, deadline)
            while b"\n" not in pending:
                wait = until - time.monotonic()
                chunk = os.read(fd, 1 << 16) if wait > 0 and selector.select(wait) else b""
                if not chunk:
                    return
                pending += chunk
            line, _, rest = bytes(pending).partition(b"\n")
            pending = bytearray(rest)
            yield line


def _run_child(patterns: list[str], names: list[str], deadline: float) -> list[frozenset[int]]:
    """The matches of the leading patterns the child finished in time; the child is killed when it overruns."""
    child = subprocess.Popen([sys.executable, "-I", "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL)
    try:
        child.stdin.write(json.dumps([patterns, names]).encode())
        child.stdin.close()
        return [frozenset(json.loads(line)) for line in _lines(child, len(patterns), deadline)]
    except (BrokenPipeError, ValueError):  # the child died: what it did not answer counts as unfinished
        return []
    finally:
        child.kill()
        child.wait()
        child.stdout.close()


def match_all(patterns: list[str], names: list[str]) -> list[Optional[frozenset[int]]]:
    """For each pattern (each one compiles), the indices of the ``names`` ``re.match`` matches; None for a pattern
    that did not finish in its time (or was not reached before the time for all ran out)."""
    if not patterns or not names:
        return [frozenset() for _ in patterns]
    deadline = time.monotonic() + SECONDS_IN_ALL
    results: list[Optional[frozenset[int]]] = []
    while len(results) < len(patterns):
        if time.monotonic() >= deadline:
            results += [None] * (len(patterns) - len(results))
            break
        results += _run_child(patterns[len(results):], names, deadline)
        if len(results) < len(patterns):
            results.append(None)  # the pattern the child was on when it overran
    return results
