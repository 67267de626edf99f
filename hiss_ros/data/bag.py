"""Read configured streams out of ROS 1 / ROS 2 bags with rosbags (no ROS install needed).

    data = read_streams([Path("run1.mcap")], [StreamSpec("/imu/data", "sensor_msgs/msg/Imu", (...))])
    data.streams["/imu/data"].stamps_ns   # int64 (n,), strictly increasing
    data.streams["/imu/data"].values      # float64 (n, channels)
    data.report                           # what the hygiene rule dropped, messages/s
    data.timelines[j][i]                  # spec i's samples in time line j (two specs may share a topic)

Samples go through the live pipeline's hygiene rule (``hiss_ros.data.streams.verdict``) in the order
they were recorded: non-finite, duplicate-stamp and late samples are dropped and counted, as the
estimator node drops them, so training never sees data the live node would discard.

With ``restart_gap_s``, a bag whose first stream jumps back in time by more than that (a restarted
simulation, a looped recording: header stamps that start over) is split there, in arrival order,
into time lines, each read as a bag of its own: the live pipeline starts a new episode there, where
one hygiene rule over the whole bag would drop every sample after the jump as late.

Messages are streamed (a bag larger than memory is fine; only the extracted numbers are kept)
and the result is cached as .npz keyed by the bags' paths, sizes and mtimes and the specs, so a
second run does not re-read the bags.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.highlevel import AnyReader
from tqdm import tqdm

from hiss_ros.data.bag_errors import explain
from hiss_ros.data.derive import velocity_from_pose
from hiss_ros.data.streams import (
    StreamSpec,
    canonical_type,
    check_fields,
    header_stamp_ns,
    unusable_header_stamps,
    value_reader,
    verdict,
)
from hiss_ros.data.types import complete, msg_files, typestore
from hiss_ros.errors import BagError, ConfigError

log = logging.getLogger(__name__)
# 2: late samples dropped (the pipeline's rule), not sorted; 3: stamp sources, any type; 4: per spec, time lines
CACHE_VERSION = 4


@dataclass
class StreamData:
    stamps_ns: np.ndarray  # (n,) int64, strictly increasing
    values: np.ndarray  # (n, channels) float64, finite


@dataclass
class StreamReport:
    messages: int = 0
    nonfinite_dropped: int = 0
    out_of_order: int = 0  # stamped before the stream's last used sample: dropped
    duplicate_stamps_dropped: int = 0
    stamp_source: str = "header"  # header | receive: where the used stamps came from


@dataclass
class BagData:
    """Per time line, per spec (in the order given: two specs on one topic, e.g. a wrench's force
    and its torque, are two streams) the samples used; per spec what the hygiene rule dropped."""

    timelines: list[list[StreamData]]
    reports: list[StreamReport]
    topics: list[str]  # per spec
    messages_per_s: float = 0.0
    from_cache: bool = False

    @property
    def streams(self) -> dict[str, StreamData]:
        """By topic, the first spec of each (one time line only: ``timelines`` holds several)."""
        if len(self.timelines) != 1:
            raise ValueError(f"{len(self.timelines)} time lines: read them from BagData.timelines")
        return {t: self.timelines[0][self.topics.index(t)] for t in self.topics}

    @property
    def report(self) -> dict[str, StreamReport]:
        """By topic, the first spec of each."""
        return {t: self.reports[self.topics.index(t)] for t in self.topics}


def _cache_key(paths: Sequence[Path], specs: Sequence[StreamSpec], msg_paths: Sequence[str | Path],
               restart_gap_s: float | None) -> str:
    parts: list[Any] = [CACHE_VERSION, restart_gap_s, [str(Path(m).resolve()) for m in msg_paths]]
    for p in paths:
        st = p.stat() if p.is_file() else None
        files = [p] if st else sorted(q for q in p.rglob("*") if q.is_file())
        parts += [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    parts += [s.as_read() for s in specs]
    for folder in msg_paths:  # an edited definition decodes the same bytes otherwise
        parts += [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in msg_files(Path(folder)).values()]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def _topics_listing(reader: AnyReader) -> str:
    return ", ".join(f"{t} [{i.msgtype}]" for t, i in sorted(reader.topics.items())) or "(none)"


def _check_topics(reader: AnyReader, specs: Sequence[StreamSpec], paths: Sequence[Path]) -> None:
    names = ", ".join(str(p) for p in paths)
    for spec in specs:
        info = reader.topics.get(spec.topic)
        if info is None:
            raise BagError(f"{names}: no topic {spec.topic!r}; the bag has: {_topics_listing(reader)}")
        if info.msgtype is None or canonical_type(info.msgtype) != spec.type:
            raise BagError(f"{names}: topic {spec.topic!r} is {info.msgtype}, but the config says {spec.type}")
        if not info.msgcount:
            raise BagError(f"{names}: topic {spec.topic!r} has no messages")


_REPORT_FIELD = {"nonfinite": "nonfinite_dropped", "out_of_order": "out_of_order",
                 "duplicate": "duplicate_stamps_dropped"}


def read_streams(
    paths: Sequence[str | Path],
    specs: Sequence[StreamSpec],
    cache_dir: str | Path | None = None,
    progress: bool = True,
    msg_paths: Sequence[str | Path] = (),
    restart_gap_s: float | None = None,
) -> BagData:
    """Extract ``specs`` from the bags at ``paths`` (files or ROS 2 bag folders). Message types
    are those the bag defines (mcap and ROS 1 bags carry their definitions; so do sqlite3 bags of
    rosbag2 Iron and newer), else those of ``msg_paths`` (folders of ``.msg`` files), else ROS 2
    Jazzy's standard ones. ``restart_gap_s``: split into time lines where ``specs[0]`` jumps back
    by more than this (see the module); None: one time line."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise BagError(f"{p}: no such bag")
    store = typestore(msg_paths)
    cache = Path(cache_dir) / f"{_cache_key(paths, specs, msg_paths, restart_gap_s)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        cached = _load_cache(cache, specs)
        if cached is not None:
            return cached
    by_topic: dict[str, list[int]] = {}  # a topic's specs (several: each its own fields of one message)
    for i, s in enumerate(specs):
        by_topic.setdefault(s.topic, []).append(i)
    raw = [_Raw() for _ in specs]
    t0 = time.perf_counter()
    try:
        with AnyReader(paths, default_typestore=store) as reader:
            _check_topics(reader, specs, paths)
            complete(reader, store, specs, paths)
            conns = [c for c in reader.connections if c.topic in by_topic]
            total = sum(c.msgcount for c in conns)
            readers: dict[int, Callable[[Any], np.ndarray]] = {}
            bar = tqdm(total=total, unit="msg", desc="reading bag", disable=not progress, leave=False)
            for arrival, (conn, receive_ns, data) in enumerate(reader.messages(connections=conns)):
                msg = reader.deserialize(data, conn.msgtype)
                for i in by_topic[conn.topic]:
                    spec, r = specs[i], raw[i]
                    if i not in readers:
                        check_fields(spec, msg)
                        readers[i] = value_reader(spec, msg)
                        r.has_header = header_stamp_ns(msg) is not None
                    try:
                        row = readers[i](msg)
                    except (AttributeError, TypeError, ValueError, LookupError) as exc:
                        raise BagError(f"{spec.topic}: message {len(r.values)} does not fit fields "
                                       f"{list(spec.fields)} as the first one did ({type(exc).__name__}: {exc})"
                                       ) from None
                    if r.values and row.shape != r.values[0].shape:
                        raise BagError(f"{spec.topic}: message {len(r.values)} has {row.size} values, "
                                       f"earlier ones {r.values[0].size}")
                    r.values.append(row)
                    r.receive.append(receive_ns)
                    r.arrival.append(arrival)
                    if r.has_header:
                        r.header.append(header_stamp_ns(msg))
                bar.update()
            bar.close()
    except (BagError, ConfigError):
        raise
    except Exception as exc:  # rosbags raises its own errors for truncated/corrupt files
        raise BagError(explain(exc, paths)) from None
    seconds = time.perf_counter() - t0
    sources = [_stamp_source(spec, r) for spec, r in zip(specs, raw, strict=True)]
    timelines, reports = _apply_rules(specs, raw, sources, restart_gap_s, paths)
    n = max((r.arrival[-1] + 1 for r in raw if r.arrival), default=0)
    data = BagData(timelines, reports, [s.topic for s in specs], n / seconds if seconds > 0 else 0.0)
    log.info("read %d messages from %d bag(s) in %.1f s (%.0f msg/s)", n, len(paths), seconds, data.messages_per_s)
    if cache is not None:
        _save_cache(cache, data)
    return data


@dataclass
class _Raw:
    """One stream's messages as recorded, in arrival order, before the hygiene rule."""

    values: list[np.ndarray] = field(default_factory=list)
    receive: list[int] = field(default_factory=list)
    header: list[int] = field(default_factory=list)
    arrival: list[int] = field(default_factory=list)  # index among all messages read: the order across streams
    has_header: bool = False


def _stamp_source(spec: StreamSpec, raw: _Raw) -> str:
    """``header`` or ``receive`` for this stream: its ``stamp`` setting, with ``auto`` falling back
    to the receive time (said once) where the header stamps are zero or repeat."""
    spec.require_header(raw.has_header)
    if not raw.has_header:
        return "receive"
    if spec.stamp != "auto":
        return spec.stamp
    why = unusable_header_stamps(np.asarray(raw.header, dtype=np.int64))
    if why is None:
        return "header"
    log.warning("%s: %s (a driver that does not set them?): using the bag's receive time instead; set "
                "stamp: receive on this stream to say so (and silence this), or stamp: header to keep them",
                spec.topic, why)
    return "receive"


def _restarts(raw: _Raw, source: str, gap_s: float | None) -> list[tuple[int, int]]:
    """(arrival index, stamp) of each message of the clock stream ``raw`` that starts a new time
    line: stamped before the time line's last used sample by more than ``gap_s``, the rule by
    which the live pipeline restarts its episode ("time_backwards")."""
    if gap_s is None:
        return []
    gap, last, starts = int(gap_s * 1e9), None, []
    for stamp, row, arrival in zip(raw.header if source == "header" else raw.receive, raw.values, raw.arrival,
                                   strict=True):
        reason = verdict(last, stamp, row)
        if reason == "out_of_order" and last - stamp > gap:
            starts.append((arrival, stamp))
            last = stamp
        elif reason is None:
            last = stamp
    return starts


def _hygiene(stamps: Sequence[int], values: Sequence[np.ndarray], rep: StreamReport,
             bad: np.ndarray | None) -> tuple[list[int], list[np.ndarray], np.ndarray | None]:
    """The samples the live hygiene rule uses, in arrival order (so in stamp order by
    construction); what it dropped is counted in ``rep``, non-finite values per channel in ``bad``."""
    used_stamps, used, last = [], [], None
    for stamp, row in zip(stamps, values, strict=True):
        reason = verdict(last, stamp, row)
        if reason is not None:
            setattr(rep, _REPORT_FIELD[reason], getattr(rep, _REPORT_FIELD[reason]) + 1)
            if reason == "nonfinite":
                bad = ~np.isfinite(row) + (0 if bad is None else bad)
            continue
        last = stamp
        used_stamps.append(stamp)
        used.append(row)
    return used_stamps, used, bad


def _apply_rules(specs: Sequence[StreamSpec], raw: Sequence[_Raw], sources: Sequence[str], gap_s: float | None,
                 paths: Sequence[Path]) -> tuple[list[list[StreamData]], list[StreamReport]]:
    """Per time line (split where ``specs[0]`` restarts, see ``_restarts``) the samples each spec
    uses, and per spec what was dropped. Within a time line, a stream's first samples stamped more
    than ``gap_s`` after the restarted clock, before one that is not, continue the previous time
    line (they arrived just after the restart): counted out of order, as the live pipeline, whose
    episode restarted, drops them. A time line lacking a stream is left out, with a warning."""
    starts = _restarts(raw[0], sources[0], gap_s)
    gap = None if gap_s is None else int(gap_s * 1e9)
    n_lines = len(starts) + 1
    lines: list[list[StreamData | None]] = [[None] * len(specs) for _ in range(n_lines)]
    reports = []
    for i, (spec, r, source) in enumerate(zip(specs, raw, sources, strict=True)):
        rep = StreamReport(messages=len(r.values), stamp_source=source)
        stamps = np.asarray(r.header if source == "header" else r.receive, dtype=np.int64)
        line = np.searchsorted([a for a, _ in starts], np.asarray(r.arrival, dtype=np.int64), side="right")
        bad, width = None, r.values[0].size
        for j in range(n_lines):
            idx = np.flatnonzero(line == j)
            if j and i and gap is not None:
                back = np.flatnonzero(stamps[idx] - starts[j - 1][1] <= gap)
                late = back[0] if len(back) else 0  # none comes back: the stream is on another clock, kept
                rep.out_of_order += int(late)
                idx = idx[late:]
            used_stamps, used, bad = _hygiene(stamps[idx].tolist(), [r.values[k] for k in idx], rep, bad)
            lines[j][i] = StreamData(np.asarray(used_stamps, dtype=np.int64),
                                     np.stack(used) if used else np.zeros((0, width)))
        if not any(len(line[i].stamps_ns) for line in lines):
            raise BagError(_nothing_usable(spec, rep, np.zeros(0) if bad is None else bad, paths))
        for what, n in (("non-finite", rep.nonfinite_dropped), ("out-of-order", rep.out_of_order),
                        ("duplicate-stamp", rep.duplicate_stamps_dropped)):
            if n:
                log.warning("%s: %d %s sample(s) of %d dropped", spec.topic, n, what, rep.messages)
        reports.append(rep)
    if starts:
        log.info("%s: %s jumps back in time %d time(s) (a restarted clock): %d time lines, each its own episodes",
                 ", ".join(map(str, paths)), specs[0].topic, len(starts), n_lines)
    kept = []
    for j, line in enumerate(lines):
        try:
            kept.append([_derived(spec, data, single=n_lines == 1) for spec, data in zip(specs, line, strict=True)])
        except _Unusable as exc:
            log.warning("%s: leaving out time line %d of %d: %s", ", ".join(map(str, paths)), j + 1, n_lines, exc)
    if not kept:
        raise BagError(f"{', '.join(map(str, paths))}: none of its {n_lines} time lines has every stream "
                       f"({', '.join(s.topic for s in specs)})")
    return kept, reports


class _Unusable(Exception):
    """A time line of a split bag without some stream's samples (or too few poses to derive from)."""


def _derived(spec: StreamSpec, data: StreamData | None, single: bool) -> StreamData:
    """``data`` with the derivation ``spec`` asks for applied; _Unusable where ``data`` is empty or
    has too few poses (BagError instead for a bag of one time line, as it cannot be trained on)."""
    n = 0 if data is None else len(data.stamps_ns)
    if data is None or not n:
        raise _Unusable(f"no {spec.topic} sample")
    if not spec.derive:
        return data
    if n < 5:
        if single:
            raise BagError(f"{spec.topic}: {n} poses are too few to derive {spec.derive}")
        raise _Unusable(f"{n} {spec.topic} poses are too few to derive {spec.derive}")
    return StreamData(data.stamps_ns, velocity_from_pose(data.stamps_ns, data.values, spec.derive,
                                                         where=spec.topic, msgtype=spec.type))


def _nothing_usable(spec: StreamSpec, rep: StreamReport, bad: np.ndarray, paths: Sequence[Path]) -> str:
    """Why a stream of which every sample was dropped (only non-finite values can do that: the
    first finite sample is always used) cannot be trained on, naming its non-finite fields."""
    names = list(spec.fields) if len(spec.fields) == len(bad) else [f"channel {k}" for k in range(len(bad))]
    fields = ", ".join(f"{names[k]} {int(bad[k])}" for k in np.flatnonzero(bad)[:6])
    return (f"{spec.topic}: {rep.nonfinite_dropped} of {rep.messages} samples non-finite (NaN or inf values per "
            f"field: {fields}) in {', '.join(map(str, paths))}; no usable sample is left: fix the recording, "
            "or leave the stream out of the config")


def _save_cache(path: Path, data: BagData) -> None:
    """Cache ``data`` at ``path``; a cache that cannot be written (read-only folder, disk full) is
    skipped with a warning: it only saves time."""
    arrays = {}
    for j, line in enumerate(data.timelines):
        for i, st in enumerate(line):
            arrays[f"t{j}_{i}"], arrays[f"v{j}_{i}"] = st.stamps_ns, st.values
    meta = {"topics": data.topics, "timelines": len(data.timelines), "reports": [vars(r) for r in data.reports]}
    tmp = path.with_suffix(".tmp.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
        tmp.replace(path)
    except OSError as exc:
        log.warning("not caching the bag arrays in %s (%s); make it writable or pass another --cache-dir to "
                    "save re-reading the bag next time", path.parent, exc.strerror or exc)
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def _load_cache(path: Path, specs: Sequence[StreamSpec]) -> BagData | None:
    """The cached arrays, or None (after a warning, with the entry deleted so it is rebuilt) when
    the entry is unreadable: truncated by a crash or a full disk, or not a cache file at all."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            n = len(meta["topics"])
            timelines = [[StreamData(z[f"t{j}_{i}"], z[f"v{j}_{i}"]) for i in range(n)]
                         for j in range(meta["timelines"])]
        reports = [StreamReport(**r) for r in meta["reports"]]
        if meta["topics"] != [s.topic for s in specs] or len(reports) != n or not timelines:
            raise KeyError(f"arrays of {meta['topics']}, not of {[s.topic for s in specs]}")
    except Exception as exc:  # whatever a damaged file makes numpy, zipfile or json raise: the cache is disposable
        log.warning("discarding the corrupt bag cache entry %s (%s: %s); reading the bag again",
                    path, type(exc).__name__, " ".join(str(exc).split())[:120])
        with suppress(OSError):  # a read-only cache: rebuilt in memory every time, warned again on saving
            path.unlink(missing_ok=True)
        return None
    log.info("read %s from cache %s", ", ".join(s.topic for s in specs), path)
    return BagData(timelines, reports, meta["topics"], from_cache=True)
