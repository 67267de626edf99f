"""Files the package ships: models (``models/<name>.safetensors``) and sample bags."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

DEFAULT_MODEL = "models/contact.safetensors"
SAMPLE_BAG = "data/sample/contact_sim"


def shipped_path(relative: str) -> Path:
    """A file the package ships (``models/...``, ``data/sample/...``): in the source tree when
    running from one (an editable install: its share copy may be stale), else in the package
    share of a colcon or pip install."""
    for root in _roots():
        if (root / relative).exists():
            return root / relative
    return Path(__file__).resolve().parents[1] / relative  # missing: whoever opens it names this path


def _roots() -> Iterator[Path]:
    yield Path(__file__).resolve().parents[1]
    try:
        from ament_index_python.packages import get_package_share_directory

        yield Path(get_package_share_directory("hiss_ros"))
    except (ImportError, LookupError, OSError):  # no ament index, no AMENT_PREFIX_PATH, or not in it
        pass
    yield Path(sys.prefix) / "share" / "hiss_ros"


def default_model_path() -> Path:
    """The shipped ``contact`` model."""
    return shipped_path(DEFAULT_MODEL)


def shipped_model(path_or_name: str) -> Path:
    """A checkpoint path as given, or for a bare name (``contact``, ``broad_velocity``) that is
    not a file or folder here, the shipped model of that name (a local ``contact/`` run folder is
    the user's, not the shipped model). Neither: the path as given, for the error to name."""
    given = Path(path_or_name)
    if "/" in path_or_name or path_or_name.endswith(".safetensors") or given.exists():
        return given
    shipped = shipped_path(f"models/{path_or_name}.safetensors")
    return shipped if shipped.exists() else given
