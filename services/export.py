"""Writing query rows out as CSV or JSON, for `fitscope export` and the dashboard's download button."""

from __future__ import annotations

import csv
import json
from typing import Any, TextIO


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every key that appears in any row, in first-seen order (trials of a grid differ in keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_rows(rows: list[dict[str, Any]], stream: TextIO, fmt: str) -> None:
    if fmt == "json":
        json.dump(rows, stream, default=str)
        stream.write("\n")
        return
    writer = csv.DictWriter(stream, fieldnames=columns_of(rows), extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
