"""Writing query rows out as CSV, JSON or Parquet, for `fitscope export`, the dashboard's download
buttons and the Python API.

Parquet columns are typed from their values (whole numbers int64, other numbers float64, yes/no
bool, ``*_at`` timestamps in UTC, the rest text), so pandas, DuckDB or Spark read them as they are.
A value that is a list or a mapping (betas, milestones, a CSV data set) is JSON text, as in the CSV.
"""

from __future__ import annotations

import csv
import json
from datetime import datetime
from typing import IO, Any, TextIO

FORMATS = ("csv", "json", "parquet")
TEXT_FORMATS = ("csv", "json")


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """Every key that appears in any row, in first-seen order (trials of a grid differ in keys)."""
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def write_rows(rows: list[dict[str, Any]], stream: TextIO, fmt: str) -> None:
    """CSV or JSON text on ``stream``; Parquet is binary: :func:`write_parquet`."""
    if fmt == "json":
        json.dump(rows, stream, default=str)
        stream.write("\n")
        return
    writer = csv.DictWriter(stream, fieldnames=columns_of(rows), extrasaction="raise")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _cell(value) for key, value in row.items()})


def parquet_table(rows: list[dict[str, Any]], *, columns: list[str] | None = None):
    """A pyarrow Table of ``rows``, one typed column per key (``columns`` names them when there
    are no rows to take them from)."""
    import pyarrow as pa

    names = columns_of(rows) or list(columns or [])
    arrays, fields = [], []
    for name in names:
        values = [row.get(name) for row in rows]
        kind = _column_type(name, values)
        arrays.append(pa.array([_typed(value, kind) for value in values], type=kind))
        fields.append(pa.field(name, kind))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_parquet(rows: list[dict[str, Any]], target: str | IO[bytes], *, columns: list[str] | None = None) -> None:
    """Rows as one Parquet file (zstd) at a path or into a binary stream."""
    import pyarrow.parquet as pq

    pq.write_table(parquet_table(rows, columns=columns), target, compression="zstd")


def _column_type(name: str, values: list[Any]):
    import pyarrow as pa

    present = [value for value in values if value is not None]
    if not present:
        return pa.string()
    if all(isinstance(value, bool) for value in present):
        return pa.bool_()
    if all(isinstance(value, int) and not isinstance(value, bool) for value in present):
        return pa.int64()
    if all(isinstance(value, int | float) and not isinstance(value, bool) for value in present):
        return pa.float64()
    if name.endswith("_at") and all(isinstance(value, str) and _timestamp(value) for value in present):
        return pa.timestamp("us", tz="UTC")
    return pa.string()


def _typed(value: Any, kind) -> Any:
    import pyarrow as pa

    if value is None:
        return None
    if kind == pa.string():
        return _cell(value) if isinstance(value, dict | list) else str(value)
    if kind == pa.float64():
        return float(value)
    if isinstance(kind, pa.TimestampType):
        return _timestamp(value)
    return value


def _timestamp(text: str) -> datetime | None:
    from datetime import UTC

    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)  # the database stores UTC


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
