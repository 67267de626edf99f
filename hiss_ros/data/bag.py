"""Read configured streams out of ROS 1 / ROS 2 bags with rosbags (no ROS install needed).

    data = read_streams([Path("run1.mcap")], [StreamSpec("/imu/data", "sensor_msgs/msg/Imu", (...))])
    data.streams["/imu/data"].stamps_ns   # int64 (n,), strictly increasing
    data.streams["/imu/data"].values      # float64 (n, channels)
    data.report                           # what the hygiene rule dropped, messages/s

Samples go through the live pipeline's hygiene rule (``hiss_ros.data.streams.verdict``) in the order
they were recorded: non-finite, duplicate-stamp and late samples are dropped and counted, as the
estimator node drops them, so training never sees data the live node would discard.

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
CACHE_VERSION = 3  # 2: late samples dropped (the pipeline's rule), not sorted; 3: stamp sources, any type


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
    streams: dict[str, StreamData]
    report: dict[str, StreamReport] = field(default_factory=dict)
    messages_per_s: float = 0.0
    from_cache: bool = False


def _cache_key(paths: Sequence[Path], specs: Sequence[StreamSpec], msg_paths: Sequence[str | Path]) -> str:
    parts: list[Any] = [CACHE_VERSION, [str(Path(m).resolve()) for m in msg_paths]]
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
) -> BagData:
    """Extract ``specs`` from the bags at ``paths`` (files or ROS 2 bag folders). Message types
    are those the bag defines (mcap and ROS 1 bags carry their definitions; so do sqlite3 bags of
    rosbag2 Iron and newer), else those of ``msg_paths`` (folders of ``.msg`` files), else ROS 2
    Jazzy's standard ones."""
    paths = [Path(p) for p in paths]
    for p in paths:
        if not p.exists():
            raise BagError(f"{p}: no such bag")
    store = typestore(msg_paths)
    cache = Path(cache_dir) / f"{_cache_key(paths, specs, msg_paths)}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        cached = _load_cache(cache, specs)
        if cached is not None:
            return cached
    by_topic = {s.topic: s for s in specs}
    raw = {s.topic: _Raw() for s in specs}
    t0 = time.perf_counter()
    try:
        with AnyReader(paths, default_typestore=store) as reader:
            _check_topics(reader, specs, paths)
            complete(reader, store, specs, paths)
            conns = [c for c in reader.connections if c.topic in by_topic]
            total = sum(c.msgcount for c in conns)
            readers: dict[str, Callable[[Any], np.ndarray]] = {}
            bar = tqdm(total=total, unit="msg", desc="reading bag", disable=not progress, leave=False)
            for conn, receive_ns, data in reader.messages(connections=conns):
                spec, r = by_topic[conn.topic], raw[conn.topic]
                msg = reader.deserialize(data, conn.msgtype)
                if spec.topic not in readers:
                    check_fields(spec, msg)
                    readers[spec.topic] = value_reader(spec, msg)
                    r.has_header = header_stamp_ns(msg) is not None
                try:
                    row = readers[spec.topic](msg)
                except (AttributeError, TypeError, ValueError, LookupError) as exc:
                    raise BagError(f"{spec.topic}: message {len(r.values)} does not fit fields {list(spec.fields)} "
                                   f"as the first one did ({type(exc).__name__}: {exc})") from None
                if r.values and row.shape != r.values[0].shape:
                    raise BagError(f"{spec.topic}: message {len(r.values)} has {row.size} values, "
                                   f"earlier ones {r.values[0].size}")
                bar.update()
                r.values.append(row)
                r.receive.append(receive_ns)
                if r.has_header:
                    r.header.append(header_stamp_ns(msg))
            bar.close()
    except (BagError, ConfigError):
        raise
    except Exception as exc:  # rosbags raises its own errors for truncated/corrupt files
        raise BagError(explain(exc, paths)) from None
    seconds = time.perf_counter() - t0
    streams, report = {}, {}
    for t, spec in by_topic.items():
        streams[t], report[t] = _apply_rule(spec, raw[t], paths)
    n = sum(r.messages for r in report.values())
    for t, spec in by_topic.items():
        if spec.derive:
            if len(streams[t].stamps_ns) < 5:
                raise BagError(f"{spec.topic}: {len(streams[t].stamps_ns)} poses are too few to derive {spec.derive}")
            streams[t] = StreamData(streams[t].stamps_ns,
                                    velocity_from_pose(streams[t].stamps_ns, streams[t].values, spec.derive,
                                                       where=spec.topic, msgtype=spec.type))
    data = BagData(streams, report, n / seconds if seconds > 0 else 0.0)
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


def _apply_rule(spec: StreamSpec, raw: _Raw, paths: Sequence[Path]) -> tuple[StreamData, StreamReport]:
    """The samples the live hygiene rule uses, in arrival order (so in stamp order by
    construction), and what it dropped."""
    source = _stamp_source(spec, raw)
    rep = StreamReport(messages=len(raw.values), stamp_source=source)
    stamps, values, bad = [], [], None
    last = None
    for stamp, row in zip(raw.header if source == "header" else raw.receive, raw.values, strict=True):
        reason = verdict(last, stamp, row)
        if reason is not None:
            setattr(rep, _REPORT_FIELD[reason], getattr(rep, _REPORT_FIELD[reason]) + 1)
            if reason == "nonfinite":
                bad = ~np.isfinite(row) + (0 if bad is None else bad)
            continue
        last = stamp
        stamps.append(stamp)
        values.append(row)
    if not stamps:
        raise BagError(_nothing_usable(spec, rep, np.zeros(0) if bad is None else bad, paths))
    for what, n in (("non-finite", rep.nonfinite_dropped), ("out-of-order", rep.out_of_order),
                    ("duplicate-stamp", rep.duplicate_stamps_dropped)):
        if n:
            log.warning("%s: %d %s sample(s) of %d dropped", spec.topic, n, what, rep.messages)
    return StreamData(np.asarray(stamps, dtype=np.int64), np.stack(values)), rep


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
    for i, s in enumerate(data.streams.values()):
        arrays[f"t{i}"], arrays[f"v{i}"] = s.stamps_ns, s.values
    meta = {"topics": list(data.streams), "report": {t: vars(r) for t, r in data.report.items()}}
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
            streams = {t: StreamData(z[f"t{i}"], z[f"v{i}"]) for i, t in enumerate(meta["topics"])}
        report = {t: StreamReport(**r) for t, r in meta["report"].items()}
        missing = [s.topic for s in specs if s.topic not in streams]
        if missing:
            raise KeyError(f"no arrays of {missing}")
    except Exception as exc:  # whatever a damaged file makes numpy, zipfile or json raise: the cache is disposable
        log.warning("discarding the corrupt bag cache entry %s (%s: %s); reading the bag again",
                    path, type(exc).__name__, " ".join(str(exc).split())[:120])
        with suppress(OSError):  # a read-only cache: rebuilt in memory every time, warned again on saving
            path.unlink(missing_ok=True)
        return None
    log.info("read %s from cache %s", ", ".join(s.topic for s in specs), path)
    return BagData(streams, report, from_cache=True)
