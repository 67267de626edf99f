"""Message types for reading bags: ROS 2 Jazzy's standard ones, plus custom ``.msg`` definitions.

Bags that carry their message definitions (mcap, ROS 1, sqlite3 of rosbag2 Iron and newer) need
nothing: rosbags registers the bag's own. Older sqlite3 bags name their types but do not define
them; for a custom type, pass the folder of its ``.msg`` files (``hiss-train --msg-path``):

    my_tactile_msgs/msg/TactileArray.msg   ->  my_tactile_msgs/msg/TactileArray

A file's package is the folder above its ``msg/`` folder (or its own folder when not in ``msg/``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from hiss_ros.errors import BagError, ConfigError


def msg_files(folder: Path) -> dict[str, Path]:
    """``package/msg/Name`` -> file, for every ``.msg`` file under ``folder``."""
    out = {}
    for f in sorted(folder.rglob("*.msg")):
        package = f.parent.parent.name if f.parent.name == "msg" else f.parent.name
        out[f"{package}/msg/{f.stem}"] = f
    return out


@lru_cache(maxsize=8)
def _store(folders: tuple[str, ...]) -> Typestore:
    store = get_typestore(Stores.ROS2_JAZZY)
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise ConfigError(f"--msg-path {folder}: no such folder (expected a folder of .msg files)")
        files = msg_files(folder)
        if not files:
            raise ConfigError(f"--msg-path {folder}: no .msg files in it (looked for <package>/msg/<Name>.msg)")
        types: dict[str, Any] = {}
        for name, f in files.items():
            try:
                types.update(get_types_from_msg(f.read_text(), name))
            except Exception as exc:  # rosbags' parser errors: name the file and the problem, one line
                raise ConfigError(f"{f}: not a valid .msg definition ({' '.join(str(exc).split())[:200]})") from None
        try:
            store.register(types)
        except Exception as exc:
            raise ConfigError(f"--msg-path {folder}: {' '.join(str(exc).split())[:200]}") from None
    return store


def typestore(msg_paths: Sequence[str | Path] = ()) -> Typestore:
    """Jazzy's standard types and those defined under ``msg_paths`` (cached: the same folders
    give the same store)."""
    return _store(tuple(str(Path(p).resolve()) for p in msg_paths))


def complete(reader: Any, store: Typestore, specs: Sequence[Any], paths: Sequence[Path]) -> None:
    """Give an open ``AnyReader`` the types of ``specs`` that the bag does not define itself
    (rosbags uses a bag's own definitions only, when it has any); BagError naming a type that
    neither the bag nor ``store`` defines, and how to provide it."""
    have = reader.typestore.fielddefs
    missing = {c.msgtype for c in reader.connections if c.topic in {s.topic for s in specs}} - set(have)
    if not missing:
        return
    extra = {name: store.fielddefs[name] for name in store.fielddefs if name not in have}
    if extra:
        reader.typestore.register(extra)
    unknown = sorted(missing - set(reader.typestore.fielddefs))
    if unknown:
        raise BagError(f"{', '.join(map(str, paths))}: the bag does not define message type(s) {', '.join(unknown)}, "
                       "and they are not standard ROS 2 Jazzy types: pass --msg-path <folder with "
                       f"{unknown[0].split('/')[0]}/msg/{unknown[0].split('/')[-1]}.msg>")
