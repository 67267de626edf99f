"""hiss_ros: ament_python package; also a plain pip package (see README)."""

import os
from glob import glob

from setuptools import find_packages, setup

package_name = "hiss_ros"


def _version() -> str:
    with open(f"{package_name}/__init__.py") as f:
        return next(line.split('"')[1] for line in f if line.startswith("__version__"))


# The ROS 2 Jazzy client library and messages as PyPI wheels, for machines without a ROS
# install. Never installed where a real rclpy is importable (the Makefile checks), so the
# wheels cannot shadow a ROS distribution.
ROS_WHEELS = [
    "ros-jazzy-rclpy[fastrtps]==7.1.6",
    "ros-jazzy-std-msgs==5.3.6",
    "ros-jazzy-sensor-msgs==5.3.6",
    "ros-jazzy-geometry-msgs==5.3.6",
    "ros-jazzy-nav-msgs==5.3.6",
    "ros-jazzy-visualization-msgs==5.3.6",
    "ros-jazzy-diagnostic-msgs==5.3.6",
    "ros-jazzy-std-srvs==5.3.6",
    # From the rcl_interfaces repository, versioned apart from common_interfaces' 5.3.x; rclpy 7.1.6 needs
    # the same 2.0.3 (rclpy.lifecycle uses lifecycle_msgs, the replay node publishes rosgraph_msgs/Clock).
    "ros-jazzy-lifecycle-msgs==2.0.3",
    "ros-jazzy-rosgraph-msgs==2.0.3",
]

# `ros2 run hiss_ros <name>` runs lib/hiss_ros/<name>. These wrappers go there as data files, never
# as scripts or console scripts, so a pip install does not put short names such as `train` on PATH.
ROS2_RUN_SCRIPTS = ["scripts/estimator", "scripts/replay", "scripts/demo", "scripts/train"]

setup(
    name=package_name,
    version=_version(),
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{package_name}"]),
        (f"lib/{package_name}", ROS2_RUN_SCRIPTS),
        (f"share/{package_name}", ["package.xml"]),
        (f"share/{package_name}/launch", glob("launch/*.launch.py")),
        (f"share/{package_name}/config", glob("config/*")),
        (f"share/{package_name}/models", glob("models/*.safetensors") + glob("models/*.json") + glob("models/*.md")),
        *((f"share/{package_name}/{d}", glob(f"{d}/*")) for d in sorted(glob("data/sample/*")) if os.path.isdir(d)),
    ],
    python_requires=">=3.10",
    # torch: any release from 2.2 on; a CPU or CUDA build already installed is kept.
    install_requires=[
        "torch>=2.2",
        "numpy>=1.24",
        "safetensors>=0.4",
        "pyyaml>=6.0",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "tqdm>=4.60",
        "rosbags>=0.11,<0.12",  # its reader/writer API changed between minor releases
    ],
    extras_require={
        "test": ["pytest==9.2.0", "ruff==0.17.5", "mambapy==1.2.0", "tensorboard>=2.14"],
        "tensorboard": ["tensorboard>=2.14"],
        "ros": ROS_WHEELS,
        "cuda": ["mamba-ssm>=2.2"],
    },
    zip_safe=True,
    maintainer="hiss_ros maintainers",
    maintainer_email="maintainers@hiss-ros.dev",
    description="Hierarchical State Space Models for real-time state estimation from raw robot sensors (ROS 2).",
    license="Apache-2.0",
    entry_points={
        # Only hiss- names: a pip install puts these on PATH (colcon into lib/hiss_ros, setup.cfg).
        "console_scripts": [
            "hiss-train = hiss_ros.train.cli:main",
            "hiss-eval = hiss_ros.train.evaluate:main",
            "hiss-sim = hiss_ros.sim.cli:main",
            "hiss-import = hiss_ros.importers.cli:main",
            "hiss-demo = hiss_ros.nodes.demo:main",
            "hiss-estimator = hiss_ros.nodes.estimator:main",
            "hiss-replay = hiss_ros.nodes.replay:main",
            "hiss-train-node = hiss_ros.nodes.trainer:main",
        ],
    },
)
