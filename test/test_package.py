"""Packaging: the core imports without ROS, versions agree, entry points resolve, ROS wheels work."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from conftest import ROS_ENV

import hiss_ros

ROOT = Path(__file__).resolve().parents[1]


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
    assert {"rclpy", "sensor_msgs", "geometry_msgs", "std_msgs", "visualization_msgs", "diagnostic_msgs",
            "launch_ros"} <= deps
    assert root.find("export/build_type").text == "ament_python"


def test_console_scripts_resolve():
    scripts = {e.name: e for e in entry_points(group="console_scripts") if e.value.startswith("hiss_ros.")}
    assert {"demo", "hiss-demo", "train", "hiss-train", "eval", "hiss-eval"} <= set(scripts)
    for ep in scripts.values():
        assert callable(ep.load()), ep


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
