"""The JSON-lines records of the GPU check (correct.json): written one object per line and flushed,
so that a killed stage leaves every finished record readable. No torch import: summary.py must
work when nothing else does."""

from __future__ import annotations

import json
import math
import os


def json_value(value):
    """Floats that JSON can hold: inf and NaN as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonLines:
    """One JSON object per line, flushed as it is written, so that a killed stage leaves every
    finished record readable."""

    def __init__(self, path: str, *, append: bool = False):
        self.path = path
        self.file = open(path, "a" if append else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        clean = {key: json_value(value) for key, value in record.items()}
        self.file.write(json.dumps(clean, sort_keys=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_json_lines(path: str) -> list:
    """The records of a JSON-lines file; a torn last line (a kill mid-write) is skipped."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
