"""What is wrong with a bag that cannot be read: rosbags' exception -> one line naming the cause
and the fix (``ros2 bag reindex``, the rosbag2 release needed, a truncated file, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def explain(exc: BaseException, paths: Sequence[Path]) -> str:
    """One line for a ``BagError``: which bag, what rosbags said, and the likely cause and fix."""
    return (f"{', '.join(map(str, paths))}: cannot read bag ({type(exc).__name__}: {exc}); "
            "is it truncated or still being recorded?")
