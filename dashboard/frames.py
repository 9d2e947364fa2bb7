"""Reads of one experiment's trials kept until the experiment changes.

The trials table of a 10,000-trial experiment takes about a second to read and shape (JSON configs,
metrics and diagnoses decoded into a frame), and so do the sibling verdicts and the final norms
derived from it. Streamlit's cache keeps a result for a fixed time (dashboard.data.REFRESH_SECONDS,
short, so that a running experiment's pages stay live), after which every page view would rebuild
them. Here they are kept per experiment for as long as its *stamp* is unchanged: one small aggregate
query over its trials (services.queries.trials_stamp) that moves whenever a trial is claimed,
records an epoch, finishes, is cancelled or re-queued. So a finished experiment's frame is built
once per process, and a running one's at most once per change.

Callers get a shallow copy of a kept frame (pandas copy-on-write: changing it leaves the kept one
as it was). A write made through the dashboard forgets everything (:func:`forget`).
"""

from __future__ import annotations

import gc
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pandas as pd

KEPT_EXPERIMENTS = 8  # the most recently used experiments whose frames stay in memory
# The collector's thresholds once settled: a young collection every 20,000 net allocations instead of
# 700, and a full one after 100 middle-generation sweeps instead of 10. A cold page builds millions of
# short-lived objects (10,000 trials' decoded configs and diagnoses, their columns); at the defaults it
# swept them ~170 times and walked everything not frozen once or twice per view (0.1-0.2 s of 1.4 s).
# Most of those objects are freed by reference counting anyway; cycles still get collected, later.
GC_THRESHOLDS = (20_000, 10, 100)

_lock = threading.Lock()
_settled = False
_kept: OrderedDict[tuple[str, int], tuple[tuple, dict[str, Any]]] = OrderedDict()


def per_change(url: str, experiment_id: int, name: str, stamp: tuple, build: Callable[[], Any]) -> Any:
    """The value ``build()`` returned for this experiment and ``name`` while its stamp was ``stamp``;
    built now (and kept) when the stamp moved or nothing is kept yet. A DataFrame comes back as a
    shallow copy."""
    key = (url, experiment_id)
    with _lock:
        entry = _kept.get(key)
        if entry is None or entry[0] != stamp:
            entry = (stamp, {})
            _kept[key] = entry
        _kept.move_to_end(key)
        while len(_kept) > KEPT_EXPERIMENTS:
            _kept.popitem(last=False)
        values = entry[1]
        found = values.get(name)
    if found is None:
        # Built outside the lock: another session's page need not wait for this one's read. Two
        # sessions may both build on a change; both results are the same rows.
        found = build()
        with _lock:
            values[name] = found
    return found.copy(deep=False) if isinstance(found, pd.DataFrame) else found


def settle() -> None:
    """Once per process, after a page has run: the objects alive then (mostly the libraries a page
    imports: plotly's validators, pandas, SQLAlchemy, Streamlit) are moved out of the garbage
    collector's sight (gc.freeze). Each full collection otherwise walked them all again, a fifth of
    a cold page's time at 10,000 trials. Later objects are collected as before, less often
    (GC_THRESHOLDS)."""
    global _settled
    with _lock:
        if not _settled:
            gc.freeze()
            gc.set_threshold(*GC_THRESHOLDS)
            _settled = True


def forget() -> None:
    """Drop every kept frame (after a write through the dashboard, and when the caches are cleared)."""
    with _lock:
        _kept.clear()
