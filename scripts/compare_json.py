"""Compare the JSON files two runs of scripts/same_numbers.sh wrote, timings aside (paths read relative to each folder).

Usage: python scripts/compare_json.py BEFORE_DIR AFTER_DIR   (exit 1 and the differing keys when they differ)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def timing(key: str) -> bool:
    return "seconds" in key or key in ("elapsed", "images_per_s")


def strip(value: Any, before: str, after: str) -> Any:
    if isinstance(value, dict):
        return {k: strip(v, before, after) for k, v in value.items() if not timing(k)}
    if isinstance(value, list):
        return [strip(v, before, after) for v in value]
    if isinstance(value, str):
        return value.replace(after, before)
    return value


def load(path: Path) -> list[Any]:
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines()] if path.suffix == ".jsonl" else [json.loads(text)]


def main(before: str, after: str) -> int:
    files = ["eval.json", "analysis/analysis.json", "metrics.jsonl"]
    bad = 0
    for name in files:
        a = strip(load(Path(before) / name), before, after)
        b = strip(load(Path(after) / name), before, after)
        same = a == b
        print(f"{name}: {'identical' if same else 'DIFFERENT'}")
        if not same:
            bad += 1
            for i, (x, y) in enumerate(zip(a, b)):
                for k in sorted(set(x) | set(y)):
                    if x.get(k) != y.get(k):
                        print(f"  [{i}] {k}: {str(x.get(k))[:100]} != {str(y.get(k))[:100]}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
