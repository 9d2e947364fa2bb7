"""Where a spec may read files from: its CSV paths stay inside the spec's folder, or inside
FITSCOPE_DATA_ROOT, unless FITSCOPE_ALLOW_ANY_CSV_PATH says otherwise. A spec shared by a teammate
(or pasted from the internet) then cannot make `fitscope submit` read ~/.ssh or /etc and store it in
the shared database."""

from __future__ import annotations

from pathlib import Path


def confine_csv_path(name: str, path: Path, *, spec_dir: Path, data_root: Path | None, any_path: bool) -> None:
    """Raise DatasetError unless ``path`` (the CSV ``name`` as resolved, links followed) lies inside
    ``spec_dir`` or ``data_root``, or ``any_path`` allows every readable file."""
    from services.datasets import DatasetError

    if any_path:
        return
    try:
        real = path.resolve()
    except (OSError, RuntimeError):  # a loop of links; the read reports the rest
        real = path
    roots = [root for root in (spec_dir, data_root) if root is not None]
    if any(real.is_relative_to(_resolved(root)) for root in roots):
        return
    where = f"the spec's folder {_resolved(spec_dir)}" + (f" or FITSCOPE_DATA_ROOT {_resolved(data_root)}"
                                                          if data_root is not None else "")
    raise DatasetError(f"CSV file {name[:200]!r} is outside {where}; move the file there, set "
                       "FITSCOPE_DATA_ROOT to the folder that holds your data, or set "
                       "FITSCOPE_ALLOW_ANY_CSV_PATH=true to let specs read any file")


def _resolved(folder: Path) -> Path:
    try:
        return Path(folder).expanduser().resolve()
    except (OSError, RuntimeError):
        return Path(folder)
