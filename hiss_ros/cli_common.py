"""What every hiss- command does with an expected failure, and how it writes output a later run may trust.

``fail`` ends a command on a ``HissError`` (bad config, bag, checkpoint, data) or an
``OSError`` (output folder is a file, read-only, disk full) with one line on stderr,
``<prog>: error: <what> ; <how to fix it>``, and exit status 2: the one place where file-system
errors become messages, so the four CLIs word them alike.

``staged_folder`` writes a command's output files into a temporary folder beside the target
and moves them in at the end, ``metrics.json`` last: a run that fails half-way leaves no file
behind, and a folder with a ``metrics.json`` is always complete.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hiss_ros.errors import HissError

MARKER = "metrics.json"  # written last: its presence says the folder's other files are complete

# errno -> (what happened, how to fix it): the wording for the file system errors a user can fix.
_OS_ERRORS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on the device", "free some space or write somewhere else"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or write somewhere else"),
    errno.EROFS: ("read-only file system", "write somewhere else"),
    errno.EACCES: ("permission denied", "make it writable (and readable) for this user or use another path"),
    errno.EPERM: ("operation not permitted", "make it writable for this user or use another path"),
    errno.ENOTDIR: ("a part of this path is a file, not a folder", "remove that file or use another path"),
    errno.EEXIST: ("exists and is not a folder", "remove it or use another path"),
    errno.EISDIR: ("is a folder, not a file", "use another path"),
    errno.ENOENT: ("no such file or folder", "check the path"),
}


def os_error_message(exc: OSError, place: Path | None = None) -> str:
    """One line for ``exc``: the file it names (a rename's destination, not the temporary file it
    moves; a failed ``write`` names none: then ``place``, the command's output), what went wrong
    and what would fix it."""
    where = next((f for f in (exc.filename2, exc.filename, place) if f is not None), None)
    what, fix = _OS_ERRORS.get(exc.errno or 0, (exc.strerror or str(exc), "check the path and try again"))
    return f"{where if where is not None else 'output'}: {what}; {fix}"


def fail(prog: str, exc: HissError | OSError, place: Path | None = None) -> int:
    """Print ``exc`` as the one line ``<prog>: error: ...`` on stderr and return exit status 2;
    ``place`` (the command's output) stands in for the file an ``OSError`` does not name."""
    message = os_error_message(exc, place) if isinstance(exc, OSError) else str(exc)
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def strict_json(data: Any, what: str) -> bytes:
    """``data`` as JSON, refusing the NaN and Infinity that ``json.dumps`` would write (they are
    not JSON, and a metric that overflowed is no result); ``what`` names the file for the error."""
    bad = [key for key, value in _leaves(data) if isinstance(value, float) and not math.isfinite(value)]
    if bad:
        raise HissError(f"{what}: not written, {', '.join(bad[:5])} not finite (the data overflowed float "
                        "precision); check the ground truth and input values for absurd magnitudes")
    return json.dumps(data, indent=2).encode()


def _leaves(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _leaves(v, f"{prefix}{k}" if not prefix else f"{prefix}.{k}")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, data


@contextmanager
def staged_folder(target: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``target`` to write into; on success its files move into
    ``target`` (created if need be; other files there are kept), ``metrics.json`` last, and an
    old ``metrics.json`` is removed before the first move, so no mix of old and new output ever
    looks complete. On failure the temporary folder is deleted and ``target`` is untouched."""
    if target.exists() and not target.is_dir():
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    tmp = temp_folder_beside(target)
    try:
        yield tmp
        target.mkdir(exist_ok=True)
        (target / MARKER).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda f: f.name == MARKER):
            os.replace(f, target / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def temp_folder_beside(target: Path) -> Path:
    """A new empty hidden folder next to ``target`` (the same file system, so moving out of it is a
    rename). Errors name the parent folder the user chose, not the temporary name."""
    target.parent.mkdir(parents=True, exist_ok=True)  # fails naming the parent when it is a file
    tmp = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise type(exc)(exc.errno, exc.strerror, str(target.parent)) from None
    return tmp
