#!/usr/bin/env python3
"""Every performance target of lamina in one run: each harness in turn, then one table of all of them.

Usage::

    python bench/all.py [--work DIR] [--repeat N] [--skip NAME ...] [--out DIR]

Runs, one after the other (never two at once: each needs the machine to itself), with ``--json`` into
``--out`` (default ``WORK/all``):

- ``bench/containers.py``: start-up (``--version``, ``--help``), the read verbs, create + rm, diff, commit
  against podman, and the same container work in process through ``ImageService``;
- ``bench/images.py``: ``load`` (docker-archive against ``podman load``, gzip OCI layout against ``umoci
  unpack``) and ``save`` against ``tar -cf``;
- ``bench/registry.py``: ``pull`` against ``podman pull``, ``push`` against ``skopeo copy``;
- ``bench/run.py``: ``layer add`` against ``tar -x`` (the Debian rootfs, 50k small files, 4 x 256 MB);
- ``bench/scale.py``: a store of 10,000 images against one of 10;
- ``bench/memory.py``: peak memory of load, save, push and pull of an image with a 4 GiB layer.

Then it prints one row per target: what was measured, the ratio (or the absolute figure), the target and
PASS, MISS or info, and writes the same as ``OUT/summary.json``. A harness that fails is reported as such
and the others still run. The limits are those of the performance issue; where a harness keeps an older,
looser limit for its own verdict (``layer add`` of the rootfs and small files: 1.3x), the summary applies
the issue's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
HARNESSES = ("containers", "images", "registry", "run", "scale", "memory")
LAYER_ADD_LIMIT = 1.1  # the target for every layer add workload

Row = dict[str, Any]


def log(msg: str) -> None:
    print(f"[all {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def verdict(value: float | None, limit: float | None) -> str:
    if value is None or limit is None:
        return "info"
    return "PASS" if value <= limit else "MISS"


def row(area: str, what: str, peer: str, ratio: float | None, limit: float | None, detail: str = "",
        absolute: str = "") -> Row:
    return {"area": area, "what": what, "peer": peer, "ratio": ratio, "limit": limit, "absolute": absolute,
            "detail": detail, "verdict": "info" if limit is None else verdict(ratio, limit)}


def from_containers(doc: dict[str, Any]) -> list[Row]:
    out = []
    for c in doc["comparisons"]:
        if c.get("target_seconds") is not None:
            r = row("start-up", c["op"].removeprefix("python -m "), "", None, None,
                    f"{c['lamina_median'] * 1000:.0f} ms", f"<= {c['target_seconds'] * 1000:.0f} ms")
            r["verdict"] = c["verdict"]
            out.append(r)
            continue
        area = "in process" if c["op"].startswith("inprocess") else \
            "read verbs" if c["op"] in ("images", "ps", "inspect", "layers") else "containers"
        out.append(row(area, c["op"], "podman", c["ratio"], c["target"],
                       f"{c['lamina_median']:.4f} s vs {c['podman_median']:.3f} s"))
    return out


def from_comparisons(area: str) -> Callable[[dict[str, Any]], list[Row]]:
    def rows(doc: dict[str, Any]) -> list[Row]:
        return [row(area, f"{c['workload']} ({c['variant']})", c["baseline"], c["ratio"], c["target"])
                for c in doc["comparisons"]]
    return rows


def from_run(doc: dict[str, Any]) -> list[Row]:
    out = []
    for r in doc["results"]:
        if r.get("ratio") is None or r.get("baseline") is None:
            continue
        limit = LAYER_ADD_LIMIT if r["variant"] == "lamina-vfs" and r["workload"] in doc["targets"] else None
        out.append(row("layer add", f"{r['workload']} ({r['variant']})", r["baseline"], r["ratio"], limit,
                       f"{r['median']:.2f} s"))
    return out


def from_scale(doc: dict[str, Any]) -> list[Row]:
    out = []
    for c in doc["comparisons"]:
        if "per_row_us" in c:  # a listing: its cost per row beyond the 10-image store's
            r = row("scale", c["op"], "", None, None, f"{c['per_row_us']:.1f} us/row", c["target"])
        else:
            r = row("scale", c["op"], "10-image store", c["ratio"], doc["targets"]["ratio"],
                    f"{c['small']:.3f} s vs {c['big']:.3f} s")
        r["verdict"] = c["verdict"]
        out.append(r)
    return out


def from_memory(doc: dict[str, Any]) -> list[Row]:
    out = []
    for r in doc["results"]:
        x = row("memory", f"{r['command']} ({doc['size'] / 2**30:.0f} GiB layer)", "", None, None,
                f"{r['peak_rss_mb']:.0f} MB peak RSS", f"< {r['target_mb']:.0f} MB")
        x["verdict"] = r["verdict"]
        out.append(x)
    return out


READERS: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "containers": from_containers, "images": from_comparisons("images"),
    "registry": from_comparisons("registry"), "run": from_run, "scale": from_scale, "memory": from_memory,
}


def command(name: str, work: Path, out: Path, repeat: int) -> list[str]:
    cmd = [sys.executable, str(BENCH_DIR / f"{name}.py"), "--work", str(work), "--json", str(out)]
    if name in ("containers", "images", "registry", "run", "scale"):
        cmd += ["--repeat", str(repeat)]
    if name == "images":
        cmd += ["--driver", "overlay"]
    return cmd


def print_summary(rows: list[Row], failed: dict[str, str]) -> None:
    headers = ["AREA", "WHAT", "PEER", "RATIO / FIGURE", "TARGET", "RESULT"]
    table = []
    for r in rows:
        figure = f"{r['ratio']:.2f}x" if r["ratio"] is not None else r["detail"]
        target = f"<= {r['limit']:.1f}x" if r["limit"] is not None else r["absolute"]
        table.append([r["area"], r["what"], r["peer"], figure, target, r["verdict"]])
    widths = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(headers)]
    print()
    for t in [headers, *table]:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())
    for name, why in failed.items():
        print(f"{name}: FAILED ({why})")
    counts = {v: sum(1 for r in rows if r["verdict"] == v) for v in ("PASS", "MISS", "info")}
    print(f"\n{counts['PASS']} targets met, {counts['MISS']} missed, {counts['info']} rows for information")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--work", type=Path, default=BENCH_DIR / "work", help="work directory (default: bench/work)")
    ap.add_argument("--out", type=Path, help="where the JSON results go (default: WORK/all)")
    ap.add_argument("--repeat", type=int, default=5, help="repetitions per timed command (default 5)")
    ap.add_argument("--skip", nargs="+", choices=HARNESSES, default=[], metavar="NAME",
                    help=f"harnesses not to run (of {', '.join(HARNESSES)})")
    ap.add_argument("--summary-only", action="store_true", help="only print the summary of the JSON in OUT")
    args = ap.parse_args(argv)
    work = args.work.resolve()
    out = (args.out or work / "all").resolve()
    out.mkdir(parents=True, exist_ok=True)
    failed: dict[str, str] = {}
    t0 = time.perf_counter()
    for name in HARNESSES:
        if name in args.skip or args.summary_only:
            continue
        target = out / f"{name}.json"
        target.unlink(missing_ok=True)
        log(f"{name}: {' '.join(command(name, work, target, args.repeat)[1:])}")
        t1 = time.perf_counter()
        with open(out / f"{name}.log", "wb") as logf:
            proc = subprocess.run(command(name, work, target, args.repeat), stdout=logf, stderr=subprocess.STDOUT)
        log(f"{name}: exit {proc.returncode} after {time.perf_counter() - t1:.0f}s (output in {out / name}.log)")
        if proc.returncode != 0:
            failed[name] = f"exit {proc.returncode}; see {out / name}.log"
    rows: list[Row] = []
    for name in HARNESSES:
        path = out / f"{name}.json"
        if name in args.skip or not path.exists():
            if name not in args.skip and name not in failed:
                failed[name] = "no results"
            continue
        try:
            rows += READERS[name](json.loads(path.read_text()))
        except (KeyError, TypeError, ValueError) as e:
            failed[name] = f"unreadable results: {e!r}"
    print_summary(rows, failed)
    (out / "summary.json").write_text(json.dumps({"rows": rows, "failed": failed,
                                                  "seconds": round(time.perf_counter() - t0)}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
