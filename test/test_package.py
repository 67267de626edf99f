"""Packaging: the core imports without ROS, versions agree, commands and dependencies are declared
where they must be, ROS wheels work."""

from __future__ import annotations

import ast
import importlib
import os
import runpy
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import setuptools
from conftest import ROS_ENV

import hiss_ros

ROOT = Path(__file__).resolve().parents[1]
# `ros2 run hiss_ros <name>` -> the console script a pip install puts on PATH for the same program.
ROS2_RUN = {"estimator": "hiss-estimator", "replay": "hiss-replay", "demo": "hiss-demo", "train": "hiss-train-node"}


@cache
def setup_kwargs() -> dict[str, Any]:
    """What setup.py passes to setuptools.setup: setup.py run with setup() captured, nothing built."""
    captured: dict[str, Any] = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
        patch.chdir(ROOT)  # setup.py globs relative paths, as setuptools runs it from the source tree
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    return captured


def installed_files() -> dict[str, Path]:
    """The data files' install tree: {path under the prefix: source file}, as setuptools lays it out."""
    return {f"{dest}/{Path(src).name}": ROOT / src for dest, sources in setup_kwargs()["data_files"]
            for src in sources}


def console_scripts() -> dict[str, str]:
    """{command: module:function} of setup.py's console scripts."""
    pairs = (entry.split("=") for entry in setup_kwargs()["entry_points"]["console_scripts"])
    return {name.strip(): target.strip() for name, target in pairs}


def ros_imports() -> set[str]:
    """ROS packages the Python sources import (client library, messages, services, ament index)."""
    found = set()
    for path in (ROOT / "hiss_ros").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return {n for n in found if n == "rclpy" or n.endswith(("_msgs", "_srvs")) or n.startswith("ament_")}


def core_modules() -> list[str]:
    """Every module of the package outside ``hiss_ros/nodes/``, found by walking the source tree."""
    found = []
    for path in sorted((ROOT / "hiss_ros").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if "nodes" not in parts:
            found.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return found


def test_core_module_walk_finds_every_layer():
    mods = core_modules()
    assert {"hiss_ros", "hiss_ros.serving", "hiss_ros.sim.imu", "hiss_ros.models.streaming",
            "hiss_ros.train.loop", "hiss_ros.importers.broad"} <= set(mods)
    assert not [m for m in mods if ".nodes" in m]


def test_core_imports_with_rclpy_unimportable():
    code = textwrap.dedent(f"""
        import sys
        sys.modules["rclpy"] = None  # any `import rclpy` now raises ImportError
        import importlib
        for name in {core_modules()!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("rclpy", "rosidl_runtime_py", "launch"))
        assert loaded == ["rclpy"], loaded  # only our blocker
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_versions_agree():
    xml_version = ET.parse(ROOT / "package.xml").getroot().findtext("version")
    assert xml_version == hiss_ros.__version__


def test_package_xml_declares_ros_dependencies():
    root = ET.parse(ROOT / "package.xml").getroot()
    assert root.get("format") == "3"
    deps = {e.text for e in root.findall("exec_depend")}
    assert ros_imports() <= deps, ros_imports() - deps
    # Needed without an import in hiss_ros: rclpy.lifecycle's messages, message types a checkpoint may
    # name (nav_msgs/Odometry ground truth), the launch files', and torch (pip when too old, README).
    assert {"lifecycle_msgs", "nav_msgs", "launch", "launch_ros", "ament_index_python", "python3-numpy",
            "python3-yaml", "python3-scipy", "python3-tqdm", "python3-matplotlib", "python3-torch"} <= deps
    assert root.find("export/build_type").text == "ament_python"


def test_ros_wheels_cover_the_imported_ros_packages():
    """Without a ROS install, the 'ros' extra must provide every message package the nodes import."""
    pins = setup_kwargs()["extras_require"]["ros"]
    wheels = {w.split("==")[0].split("[")[0] for w in pins}
    wanted = {f"ros-jazzy-{n.replace('_', '-')}" for n in ros_imports() - {"ament_index_python"}}
    wanted |= {"ros-jazzy-lifecycle-msgs", "ros-jazzy-nav-msgs"}
    assert wanted <= wheels, wanted - wheels
    assert all("==" in w for w in pins)  # one tested version series, not whatever PyPI has today


def test_only_hiss_commands_go_on_path():
    """A pip install puts console scripts (and `scripts=`) on PATH: none may take a generic name."""
    scripts = console_scripts()
    assert set(scripts) == {"hiss-train", "hiss-eval", "hiss-sim", "hiss-import", *ROS2_RUN.values()}
    assert "scripts" not in setup_kwargs()
    for target in scripts.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target


def test_ros2_run_names_are_installed_into_lib():
    """`ros2 run hiss_ros estimator|replay|demo|train` runs lib/hiss_ros/<name>: wrappers installed there as
    data files (never on PATH), executable, run by the active environment's python3, each calling what
    its hiss- command calls."""
    installed = installed_files()
    assert {k for k in installed if k.startswith("lib/")} == {f"lib/hiss_ros/{name}" for name in ROS2_RUN}
    for name, command in ROS2_RUN.items():
        source = installed[f"lib/hiss_ros/{name}"]
        assert os.access(source, os.X_OK), f"{source} is not executable (git mode 755)"
        text = source.read_text()
        assert text.startswith("#!/usr/bin/env python3\n"), source
        (imported,) = [n for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom)]
        assert f"{imported.module}:{imported.names[0].name}" == console_scripts()[command], source


def test_ament_resource_marker_exists():
    assert (ROOT / "resource" / "hiss_ros").is_file()


def test_rclpy_pub_sub_over_real_dds():
    """The ROS 2 client library (system install or the 'ros' extra) delivers messages over DDS."""
    code = textwrap.dedent("""
        import time
        import rclpy
        from sensor_msgs.msg import Imu
        rclpy.init()
        node = rclpy.create_node("hiss_ros_test_pubsub")
        got = []
        node.create_subscription(Imu, "/hiss_test/imu", lambda m: got.append(m.angular_velocity.x), 10)
        pub = node.create_publisher(Imu, "/hiss_test/imu", 10)
        deadline = time.monotonic() + 20.0
        sent = 0
        while len(got) < 5 and time.monotonic() < deadline:
            msg = Imu()
            msg.angular_velocity.x = float(sent)
            pub.publish(msg)
            sent += 1
            rclpy.spin_once(node, timeout_sec=0.05)  # waits on the executor, not a sleep
        node.destroy_node()
        rclpy.shutdown()
        assert len(got) >= 5, f"received {len(got)} of {sent} messages"
        assert got == sorted(got)
        print("ok")
    """)
    env = {**os.environ, **ROS_ENV}
    try:
        import rclpy  # noqa: F401
    except ImportError:
        pytest.fail("rclpy is not importable: install the 'ros' extra (make test does) or source ROS 2 Jazzy")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
