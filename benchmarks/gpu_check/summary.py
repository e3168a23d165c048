"""What gpu_check.sh appends to summary.md after each stage: the stage's worst cases, read from the
files the stage wrote (the stage's own pass / fail / timeout line is written by the shell).

    summary.py STAGE     details of env, build, correct, bandwidth or sanitizer, to stdout
    summary.py digest    the digest of correct.json (counts, every failure), to stdout

Lines starting with "summary: " in a stage's text file are copied as they are.
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
from collections import Counter
from typing import Optional

from records import read_json_lines

OUT = os.environ.get("BENCH_OUT", os.path.join(os.path.dirname(__file__), "..", "..", "bench-out"))
WORST = 8


def out_path(name: str) -> str:
    return os.path.join(OUT, name)


def read_text(name: str) -> Optional[str]:
    """The text of a file the stages wrote (torn or non-UTF-8 bytes replaced), None when there is none."""
    path = out_path(name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8", errors="replace") as file:
        return file.read()


def marked_lines(name: str) -> list:
    text = read_text(name)
    if text is None:
        return []
    return ["  - " + line[len("summary: "):].rstrip() for line in text.splitlines() if line.startswith("summary: ")]


def ratio(record: dict) -> float:
    """err / tol, the closeness to the tolerance (≥ 1 fails)."""
    try:
        err, tolerance = float(record["err"]), float(record["tol"])
    except (KeyError, TypeError, ValueError):
        return 0.0
    if tolerance > 0:
        return err / tolerance
    return 0.0 if err == 0 else float("inf")


def reason(record: dict) -> str:
    return record.get("error") or "; ".join(record.get("failed", [])) or record.get("reason", "")


def correct_lines() -> list:
    records = [r for r in read_json_lines(out_path("correct.json")) if r.get("group") != "deadline"]
    not_run = sum(r.get("count", 0) for r in read_json_lines(out_path("correct.json"))
                  if r.get("status") == "not_run")
    if not records:
        return ["  - no correctness record"]
    counts = Counter(r.get("status") for r in records)
    lines = ["  - " + ", ".join(f"{n} {status}" for status, n in counts.most_common())
             + (f"; {not_run} not run (deadline)" if not_run else "")]
    bad = [r for r in records if r.get("status") in ("fail", "error")]
    by_kind = Counter((r.get("op", r.get("group")), r.get("backend"), r.get("dtype", "")) for r in bad)
    if by_kind:
        lines.append("  - failing (op, backend, dtype): " + ", ".join(
            f"{op}/{backend}{'/' + dtype if dtype else ''} ×{n}" for (op, backend, dtype), n in by_kind.most_common(12)))
    for r in sorted(bad, key=ratio, reverse=True)[:WORST]:
        lines.append(f"  - {r['status'].upper()} {r['case']}: {reason(r)[:200]}")
    for r in records:
        if r.get("sticky_cuda_error"):
            lines.append(f"  - sticky CUDA error in {r['case']}")
    closest = sorted((r for r in records if r.get("status") == "pass" and ratio(r) > 0), key=ratio, reverse=True)
    if closest:
        lines.append("  - closest to their tolerance: " + ", ".join(
            f"{r['case']} ({ratio(r):.2f})" for r in closest[:5]))
    return lines


def correct_digest() -> list:
    records = read_json_lines(out_path("correct.json"))
    lines = ["", "## digest of correct.json", ""]
    table = Counter((r.get("group"), r.get("backend"), r.get("status")) for r in records if r.get("group") != "deadline")
    groups = sorted({(g, b) for g, b, _ in table}, key=str)
    statuses = sorted({s for _, _, s in table}, key=str)
    lines.append("| group | backend | " + " | ".join(statuses) + " |")
    lines.append("|---|---|" + "---|" * len(statuses))
    for group, backend in groups:
        lines.append(f"| {group} | {backend} | " + " | ".join(str(table.get((group, backend, s), "")) for s in statuses) + " |")
    lines.append("")
    for r in records:
        if r.get("status") in ("fail", "error"):
            lines.append(f"{r['status']}: {r['case']}: {reason(r)}")
        elif r.get("status") == "not_run":
            lines.append(f"not run (stage deadline): {r.get('count')} cases, from {r.get('first')}")
    skipped = Counter(reason(r) for r in records if r.get("status") == "skipped")
    for text, n in skipped.most_common():
        lines.append(f"skipped ×{n}: {text}")
    return lines


def bandwidth_lines() -> list:
    text = read_text("bench.csv")
    if text is None:
        return ["  - no bench.csv"]
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    errors = [r for r in rows if r.get("note", "").startswith("error")]
    lines = [f"  - {len(rows)} rows, {len(errors)} errors"]
    for r in errors[:WORST]:
        lines.append(f"  - ERROR {r['id']}: {r['note'][:160]}")

    def number(row, key):
        try:
            return float(row[key])
        except (KeyError, TypeError, ValueError):
            return None

    kernels = [r for r in rows if r.get("section") == "kernels" and number(r, "fraction_of_copy") is not None]
    for backend in sorted({r["backend"] for r in kernels}):
        mine = sorted((r for r in kernels if r["backend"] == backend), key=lambda r: number(r, "fraction_of_copy"))
        if mine:
            best = mine[-1]
            lines.append(f"  - {backend}: lowest fraction of copy bandwidth " + ", ".join(
                f"{r['op']} {r['dtype']} {r['shape']} {r['layout']} {number(r, 'fraction_of_copy'):.2g}" for r in mine[:4])
                + f"; highest {best['op']} {best['dtype']} {best['shape']} {best['layout']} "
                  f"{number(best, 'fraction_of_copy'):.2g}")
    min_norm = [r for r in rows if r.get("op") == "min_norm" and number(r, "median_us") is not None]
    if min_norm:
        lines.append("  - min_norm µs: " + ", ".join(f"{r['backend']} {r['shape']} {number(r, 'median_us'):.3g}"
                                                     for r in min_norm))
    launches = [r for r in rows if number(r, "launches") is not None and r.get("section") == "kernels"]
    if launches:
        most = max(launches, key=lambda r: number(r, "launches"))
        lines.append(f"  - most launches per call: {most['op']}/{most['backend']}/{most['layout']} "
                     f"{number(most, 'launches'):.0f}")
    return lines


def sanitizer_lines() -> list:
    text = read_text("sanitizer.txt")
    if text is None:
        return ["  - no sanitizer.txt"]
    lines = ["  - " + line.lstrip("# ").strip() for line in text.splitlines() if re.match(r"^## [\w ]+: ", line)]
    lines += ["  - " + line.strip("= ").strip() for line in text.splitlines() if "ERROR SUMMARY" in line]
    return lines or ["  - no tool ran"]


def main(argv) -> int:
    what = argv[1] if len(argv) > 1 else ""
    if what == "digest":
        lines = correct_digest()
    elif what == "env":
        lines = marked_lines("env.txt")
    elif what == "build":
        lines = marked_lines("build.txt")
    elif what == "correct":
        lines = correct_lines()
    elif what == "bandwidth":
        lines = bandwidth_lines()
    elif what == "sanitizer":
        lines = sanitizer_lines()
    else:
        print(__doc__, file=sys.stderr)
        return 2
    if lines:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
