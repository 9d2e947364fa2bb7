"""A JSON column's stored text, read as Python values and as columns: what the dashboard's reads of
10,000 trials spend most of their decoding in (services/queries.py), kept apart from the queries."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import Text, cast

# A top-level "seed" key and its integer value, as json, orjson and PostgreSQL's json write it. Inside a
# JSON string a quote is escaped, so the pattern can only meet a key.
_SEED = re.compile(r'"seed": ?(-?[0-9]+)(?=[,}])')


def configuration_columns(texts: Sequence[str | None]) -> dict[str, Any]:
    """The columns of the stored configs (:func:`dict_columns` of each decoded), each configuration
    decoded once: a grid's trials differ by their seed, and 10,000 of them are ~200 configurations.
    The configs are grouped by their text without the seed; one config of each group is decoded, its
    columns built once and repeated, and the seeds are read from the text. Texts that do not have
    exactly one integer seed (or whose decoded config disagrees) are all decoded, one by one."""
    import numpy as np
    import pandas as pd

    if not texts:
        return {}
    positions: dict[tuple[str, str], int] = {}
    chosen: list[str] = []  # one text per configuration
    chosen_seeds: list[int] = []  # the seed read from that text
    codes: list[int] = []
    seeds: list[int] = []
    for text in texts:
        parts = _SEED.split(text, maxsplit=2) if text is not None else ()
        if len(parts) != 3:  # no seed, or a second one (nested): decoded as it is
            return dict_columns([decode_json(text) or {} for text in texts])
        seed = int(parts[1])
        key = (parts[0], parts[2])
        position = positions.get(key)
        if position is None:
            position = positions[key] = len(chosen)
            chosen.append(text)
            chosen_seeds.append(seed)
        codes.append(position)
        seeds.append(seed)
    configurations = [decode_json(text) for text in chosen]
    for config, seed in zip(configurations, chosen_seeds, strict=True):
        decoded = config.get("seed") if isinstance(config, dict) else None
        if type(decoded) is not int or decoded != seed:  # the seed matched was not the top-level one
            return dict_columns([decode_json(text) or {} for text in texts])
    # Each column built from its few distinct values (pandas infers the same type from them as from all
    # 10,000) and repeated by position; shared list values are never changed in place.
    repeated = pd.DataFrame(dict_columns(configurations)).take(np.asarray(codes, dtype=np.intp))
    repeated = repeated.reset_index(drop=True)  # taken block by block, then handed out column by column
    columns: dict[str, Any] = {name: repeated[name] for name in repeated.columns}
    columns["seed"] = seeds
    return columns


def dict_columns(dicts: list[dict[str, Any]]) -> dict[str, list]:
    """One list per key of ``dicts`` (NaN where a dict lacks the key), keys in order of appearance.
    Dicts that share their keys (a grid's configs, most trials' metrics) are split in one pass."""
    first = dicts[0] if dicts else {}
    if len(first) > 1 and set(map(len, dicts)) == {len(first)}:
        # As many keys in every dict as in the first: when each has the first's keys too (whatever their
        # order), every dict's values are read in the first's key order at C speed, no tuple of keys
        # built and hashed per dict.
        try:
            rows = list(map(itemgetter(*first), dicts))
        except KeyError:  # another key somewhere: by sets of keys, below
            pass
        else:
            return {key: list(values) for key, values in zip(first, zip(*rows, strict=True), strict=True)}
    by_keys: dict[tuple, list[int]] = {}
    for position, values in enumerate(dicts):
        by_keys.setdefault(tuple(values), []).append(position)
    if len(by_keys) == 1:
        keys = next(iter(by_keys))
        return {key: list(values) for key, values in
                zip(keys, zip(*(values.values() for values in dicts), strict=True), strict=True)} if keys else {}
    columns: dict[str, list] = {}
    for keys, positions in by_keys.items():
        for key in keys:
            columns.setdefault(key, [math.nan] * len(dicts))  # as pandas fills a key a row lacks
        if not keys:
            continue
        for key, values in zip(keys, zip(*(dicts[p].values() for p in positions), strict=True), strict=True):
            column = columns[key]
            for position, value in zip(positions, values, strict=True):
                column[position] = value
    return columns


def decoded(texts: Sequence[str | None]) -> list[Any]:
    """``decode_json(text) or {}`` of each text: orjson called directly, one Python call fewer per
    value, and decode_json for all when one holds what orjson refuses (NaN, Infinity)."""
    try:
        return [(orjson.loads(text) or {}) if text is not None else {} for text in texts]
    except orjson.JSONDecodeError:
        return [decode_json(text) or {} for text in texts]


def decode_json(text: str | None) -> Any:
    """A JSON column's stored text as Python values: orjson (several times faster than json, which
    dominated reading 10,000 trials), and json for what orjson refuses (NaN and Infinity, which
    Python's json writes for a non-finite float on SQLite)."""
    if text is None:
        return None
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def as_text(column):
    # The JSON column's text as stored (SQLite TEXT, PostgreSQL json/jsonb cast to text), so that the
    # driver does not decode it with json.loads; decode_json does.
    return cast(column, Text).label(column.key)
