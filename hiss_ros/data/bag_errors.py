"""What is wrong with a bag that cannot be read: rosbags' exception -> one line naming the cause
and the fix (``ros2 bag reindex``, the rosbag2 release needed, a truncated file, ...).

rosbags (0.11) wraps most of its readers' errors in ``AnyReaderError`` with the original text, so
the causes are told apart by the text (``RULES``: a pattern searched in the exception's message,
optionally restricted to exception types, then the cause and the fix). Errors raised while
iterating messages are not wrapped: an ``apsw`` error from a damaged sqlite3 file, a ``KeyError``
naming a message type the type store lacks.
"""

from __future__ import annotations

import ast
import re
import sqlite3
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path
from typing import NamedTuple

SHORT = 160  # characters of rosbags' message kept in the line

MCAP_FIX = "if the recording is over, rebuild it with `mcap recover <file> -o <fixed.mcap>` then `ros2 bag reindex`"
SQLITE_FIX = ("if the recording is over, rebuild it with `sqlite3 <file.db3> .recover | sqlite3 <fixed.db3>` "
              "then `ros2 bag reindex`")
MSG_PATH_FIX = "pass --msg-path <folder of .msg files> holding its definition"


class Rule(NamedTuple):
    """``pattern`` (a regex searched in the message; its named groups fill ``cause`` and ``hint``)
    and, when given, the exception ``types`` it applies to. ``cause`` may instead be a function of
    the match and the paths giving (cause, hint): a cause found by looking at the file."""

    pattern: str
    cause: str | Callable[[re.Match[str], Sequence[Path]], tuple[str, str]]
    hint: str
    types: tuple[type[BaseException], ...] = ()


def _missing_tables(m: re.Match[str], paths: Sequence[Path]) -> tuple[str, str]:
    """Why rosbags found no ``topics`` and ``messages`` tables in a .db3: an empty file or database
    (a recording that wrote nothing), or a database of another layout (its tables named)."""
    db = Path(m["file"])
    tables = [] if db.is_file() and db.stat().st_size == 0 else _tables(db)
    if not tables:
        return ("the database is empty, without tables (still being recorded, or copied incompletely?)"
                if tables is not None else "the file is not an SQLite database rosbags can open",
                "wait for the recording to finish, or copy the bag again")
    # rosbags reads every layout rosbag2 releases wrote, the first (topics without
    # offered_qos_profiles) included: all have both tables.
    return (f"the database lacks the 'topics' and 'messages' tables of every rosbag2 release (it has: "
            f"{', '.join(tables[:8])}): an unknown rosbag2 database layout (pre-release), or not a rosbag2 bag",
            "re-record it, or convert it with the rosbag2 that wrote it (`ros2 bag convert`) to a current "
            "layout; `ros2 bag reindex` only rebuilds metadata.yaml and cannot add the tables")


def _tables(db: Path) -> list[str] | None:
    """The table names of an SQLite file opened read-only, or None if it cannot be read."""
    try:
        with closing(sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro&immutable=1", uri=True)) as conn:
            return sorted(r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
    except (sqlite3.Error, OSError, ValueError):
        return None


def _unknown_suffix(m: re.Match[str], paths: Sequence[Path]) -> tuple[str, str]:
    suffix = m["suffix"]
    if suffix == "'.bag'":
        return ("a ROS 1 bag (.bag) was given together with ROS 2 bags, and one run reads only one kind",
                "convert it (`rosbags-convert --src <file.bag> --dst <folder>`) or pass each kind separately")
    if suffix == "'.active'":
        return "a ROS 1 recording that did not finish (.bag.active)", "`rosbag reindex` it, then rename it to .bag"
    return (f"unknown file suffix {suffix}",
            "rosbags reads ROS 1 .bag files, .mcap and .db3 files, and rosbag2 folders (with metadata.yaml)")


def _missing_files(m: re.Match[str], paths: Sequence[Path]) -> tuple[str, str]:
    try:
        names = ", ".join(Path(f).name for f in ast.literal_eval(m["files"]))
    except (ValueError, SyntaxError, TypeError):
        names = m["files"]
    return (f"storage files listed in metadata.yaml are missing: {names}",
            "a split bag needs all its files: copy the missing ones into the folder")


def _storage_kind(paths: Sequence[Path]) -> str:
    return "a ROS 1 bag" if any(p.suffix == ".bag" for p in paths) else "an MCAP file"


def _bad_magic(m: re.Match[str], paths: Sequence[Path]) -> tuple[str, str]:
    return (f"the file does not start as {_storage_kind(paths)} does: not a bag of that format "
            "(renamed, or overwritten?)", "check that this is the bag you meant")


_DAMAGED = "truncated or damaged (still being recorded, or copied incompletely?)"
_TYPE = r"(?P<type>[\w.]+/(?:msg|srv|action)/\w+)"

RULES: tuple[Rule, ...] = (
    # rosbag2 folders and their metadata.yaml
    Rule(r"Expected metadata file '(?P<folder>[^']*)' does not exist",
         "the rosbag2 folder has no metadata.yaml",
         "rebuild it with `ros2 bag reindex <folder>`, or pass the single .db3 / .mcap file itself "
         "(rosbags reads bare storage files)",
         (FileNotFoundError,)),
    Rule(r"Rosbag2 version (?P<version>\d+) not supported",
         "the bag was written by a newer rosbag2 (metadata version {version}) than the installed rosbags reads",
         "upgrade rosbags (`pip install -U rosbags`)"),
    Rule(r"Some database files are missing: (?P<files>.*)", _missing_files, ""),
    Rule(r"Could not load YAML|A metadata key is missing|Invalid bag metadata|Could not read metadata",
         "its metadata.yaml is damaged or incomplete",
         "move metadata.yaml aside and rebuild it with `ros2 bag reindex <folder>`"),
    Rule(r"Storage plugin (?P<what>'[^']*') not supported",
         "storage plugin {what} is unsupported (rosbags reads mcap and sqlite3)",
         "convert the bag to mcap with `ros2 bag convert`"),
    Rule(r"Compression format (?P<what>'[^']*') is not supported",
         "compression format {what} is unsupported (rosbags reads zstd)",
         "convert the bag without compression, or with zstd, with `ros2 bag convert`"),
    Rule(r"Serialization format (?P<what>.*) is not supported",
         "serialization format {what} is unsupported (rosbags reads cdr)",
         "record with the default cdr serialization"),
    Rule(r"Unrecognized storage format (?P<suffix>'[^']*')", _unknown_suffix, ""),
    # sqlite3 (.db3)
    Rule(r"Cannot open database (?P<file>.*) or database missing tables", _missing_tables, ""),
    Rule(r"database disk image is malformed|file is not a database",
         f"the sqlite3 database is {_DAMAGED}", SQLITE_FIX),
    # mcap
    Rule(r"Truncated record|File end magic is invalid|Invalid MCAP (?:footer|summary)|Chunk size mismatch"
         r"|Chunk checksum mismatch|Invalid (?:message|chunk) record length|exceeds its chunk record boundary",
         f"the MCAP file is {_DAMAGED}", MCAP_FIX),
    Rule(r"Unsupported chunk compression (?P<what>'[^']*')",
         "the MCAP file's chunk compression {what} is unsupported (rosbags reads zstd and lz4)",
         "rewrite it with `mcap compress --compression zstd` or `ros2 bag convert`"),
    Rule(r"Unindexed MCAP messages are not in timestamp order",
         "the MCAP file has no index (its recording did not finish?) and its messages are out of order",
         MCAP_FIX),
    Rule(r"Profile is not ros2", "the MCAP file is not a ROS 2 recording (its profile is not ros2), unsupported",
         "record it with rosbag2, or convert it to a ROS 2 bag"),
    Rule(r"Nested MCAP chunks are not supported", "the MCAP file nests chunks, which is unsupported",
         "rewrite it with `mcap convert` or `ros2 bag convert`"),
    # ROS 1
    Rule(r"Bag is not indexed", "the ROS 1 bag has no index (its recording did not finish?)",
         "`rosbag reindex <file.bag>` (ROS 1)"),
    Rule(r"Bag index looks damaged|Header could not be read|Got only \d+ of requested"
         r"|Could not read (?:uint|string|time)|Expected to find message data",
         f"the ROS 1 bag is {_DAMAGED}", "`rosbag reindex <file.bag>` (ROS 1) may recover its intact part"),
    Rule(r"Bag version (?P<version>\d+) is not supported",
         "the ROS 1 bag format (version {version}) is unsupported (rosbags reads format 2.0)",
         "rewrite it with ROS 1's rosbag (`rosbag filter in.bag out.bag True`)"),
    Rule(r"Bag encryption (?P<what>'[^']*') is not supported", "the ROS 1 bag is encrypted ({what}), unsupported",
         "decrypt it with `rosbag decrypt`"),
    Rule(r"(?:Compression|CHUNK_INFO version|IDXDATA version) (?P<what>\S+) (?:is )?not supported",
         "the ROS 1 bag uses an unsupported feature ({what})",
         "rewrite it with ROS 1's `rosbag compress`/`decompress`"),
    # any storage
    Rule(r"seems to be empty", "the file is empty (still being recorded, or copied incompletely?)",
         "wait for the recording to finish, or copy the bag again"),
    Rule(r"File magic is invalid", _bad_magic, ""),
    # message types
    Rule(r"Bag contains no type definitions",
         "the bag carries no message definitions and no type store was given", MSG_PATH_FIX),
    Rule(rf"^'{_TYPE}'$|Type '{_TYPE.replace('type>', 'type2>')}' is unknown",
         "the bag does not carry the definition of {type}", MSG_PATH_FIX),
    Rule(r"Message type (?P<type>'[^']*') hash mismatch",
         "the bag's definition of {type} does not match the hash recorded with it",
         "pass --msg-path <folder of .msg files> with the definitions used when recording"),
    Rule(r"Could not deserialize|CDR message size mismatch|ROS1 message size mismatch|Invalid or unsupported CDR",
         "a message does not decode with its type's definition (a damaged message, or a definition of "
         "another version of the type)",
         "pass --msg-path <folder of .msg files> with the definitions used when recording"),
    Rule(r"", "permission denied", "make the bag readable (`chmod -R u+r <bag>`)", (PermissionError,)),
)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= SHORT else text[: SHORT - 3] + "..."
    return f"{type(exc).__name__}: {text}"


def _match(exc: BaseException) -> tuple[Rule, re.Match[str]] | None:
    text = " ".join(str(exc).split())
    for rule in RULES:
        if rule.types and not isinstance(exc, rule.types):
            continue
        m = re.search(rule.pattern, text)
        if m:
            return rule, m
    return None


def explain(exc: BaseException, paths: Sequence[Path]) -> str:
    """One line for a ``BagError``: which bag, what rosbags said, and the likely cause and fix."""
    names = ", ".join(map(str, paths))
    found = _match(exc)
    if found is None:
        return f"{names}: cannot read bag ({_short(exc)}); is it truncated or still being recorded?"
    rule, m = found
    groups = {k: v for k, v in m.groupdict().items() if v is not None}
    groups.setdefault("type", groups.get("type2", ""))
    if callable(rule.cause):
        cause, hint = rule.cause(m, paths)
    else:
        cause, hint = rule.cause.format_map(groups), rule.hint.format_map(groups)
    line = f"{names}: cannot read bag ({_short(exc)}): {cause}" + (f"; {hint}" if hint else "")
    return " ".join(line.split())
