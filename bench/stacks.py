#!/usr/bin/env python3
"""Summarise collapsed stacks (``py-spy record -f raw`` output, one ``frame;frame;... count`` per line).

Usage::

    py-spy record -r 500 -f raw -o small.txt -- python -m lamina --root R --runroot RR --driver vfs \\
        layer add bench/work/small.tar
    python bench/stacks.py small.txt [--top 25]

Prints the functions with the most samples on top of the stack (self) and anywhere in it (inclusive),
as a share of all samples. py-spy samples wall-clock time of the running thread, so time spent in system
calls is charged to the Python function that made them.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::(?P<line>\d+))?\)$")


def frame_key(frame: str, lines: bool = False) -> str:
    """``func (path/to/file.py:123)`` -> ``file.py:func`` (or ``file.py:123:func`` with ``lines``)."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip()
    where = f"{Path(m['file']).name}:{m['line']}" if lines and m["line"] else Path(m["file"]).name
    return f"{where}:{m['func']}"


def summarise(path: Path, lines: bool = False) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    self_c: Counter[str] = Counter()
    incl_c: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        n = int(m["count"])
        frames = [frame_key(f, lines) for f in m["stack"].split(";") if f]
        if not frames:
            continue
        total += n
        self_c[frames[-1]] += n
        for f in set(frames):
            incl_c[f] += n
    return total, self_c, incl_c


def main() -> None:
    ap = argparse.ArgumentParser(description="Summarise py-spy raw (collapsed) stack samples")
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--lines", action="store_true", help="keep line numbers (which call inside a function)")
    args = ap.parse_args()
    for path in args.files:
        total, self_c, incl_c = summarise(path, args.lines)
        print(f"== {path}: {total} samples")
        for title, counter in (("self", self_c), ("inclusive", incl_c)):
            print(f"-- top {args.top} by {title}")
            for key, n in counter.most_common(args.top):
                print(f"{100 * n / max(total, 1):6.1f}%  {n:7d}  {key}")
        print()


if __name__ == "__main__":
    main()
