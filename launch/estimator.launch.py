"""The HiSS estimator (a managed lifecycle node), optionally with RViz.

ros2 launch hiss_ros estimator.launch.py [model_path:=contact|broad_velocity|contact_uncertainty|
    broad_velocity_uncertainty|PATH] [params_file:=YAML] [device:=auto|cpu|cuda] [namespace:=NS]
    [use_sim_time:=true] [autostart:=false] [publish_markers:=true] [step_backend:=auto|eager|compile|graph]
    [rviz:=true]

model_path, device, use_sim_time, autostart, publish_markers and step_backend override the parameters
file only when given on the command line: their default "" leaves the file's value (or the node's
default) in place.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from ament_index_python.packages import PackageNotFoundError, get_package_prefix, get_package_share_directory
from launch.actions import DeclareLaunchArgument, LogInfo, OpaqueFunction
from launch.conditions import evaluate_condition_expression
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import LifecycleNode, Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchContext, LaunchDescription, LaunchDescriptionEntity

PACKAGE = "hiss_ros"
NODE_NAME = "hiss_estimator"
DEFAULT_MODEL = "contact"  # the node's own default model_path
# One RViz config per shipped model, showing what that model publishes. Any other model (your own
# checkpoint) gets the contact one: wrench + twist covers every output kind a model can publish, and
# a display whose topic stays silent costs nothing.
RVIZ_CONFIGS = {"contact": "config/hiss_contact.rviz", "broad_velocity": "config/hiss_broad_velocity.rviz",
                "contact_uncertainty": "config/hiss_contact_uncertainty.rviz",
                "broad_velocity_uncertainty": "config/hiss_broad_velocity_uncertainty.rviz"}
# The estimator's private outputs, which the RViz configs name without a namespace.
OUTPUTS = ("wrench", "twist", "markers")


def generate_launch_description() -> LaunchDescription:
    return LaunchDescription([
        DeclareLaunchArgument("model_path", default_value="",
                              description="a shipped model (contact, broad_velocity, contact_uncertainty, "
                                          "broad_velocity_uncertainty) or a checkpoint from hiss-train; "
                                          "empty: the parameters file's"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([FindPackageShare(PACKAGE),
                                                                                 "config/estimator.yaml"]),
                              description="node parameters (YAML under /**: ros__parameters:)"),
        DeclareLaunchArgument("device", default_value="",
                              description="auto | cpu | cuda; empty: the parameters file's"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="",
                              description="true when replaying a bag that publishes /clock; empty: false"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="false: wait for a lifecycle manager to configure and activate; "
                                          "empty: the parameters file's (true)"),
        DeclareLaunchArgument("publish_markers", default_value="",
                              description="true: also publish MarkerArray arrows on ~/markers (the *_uncertainty "
                                          "RViz views show them); empty: the parameters file's (false)"),
        DeclareLaunchArgument("step_backend", default_value="",
                              description="auto | eager | compile (the step compiled ahead of time, needs g++; "
                                          "auto: in the background) | graph (CUDA only: the step replayed from a "
                                          "CUDA graph); empty: the parameters file's (auto)"),
        DeclareLaunchArgument("rviz", default_value="false", description="also start RViz showing the estimates"),
        OpaqueFunction(function=launch_setup),
    ])


def launch_setup(context: LaunchContext) -> list[LaunchDescriptionEntity]:
    """The estimator, and RViz when asked for: both depend on argument values, known only now."""
    params_file = LaunchConfiguration("params_file").perform(context)
    namespace = LaunchConfiguration("namespace").perform(context)
    estimator = LifecycleNode(package=PACKAGE, executable="estimator", name=NODE_NAME, namespace=namespace,
                              parameters=[params_file, overrides(context)], output="screen")
    if not evaluate_condition_expression(context, [LaunchConfiguration("rviz")]):
        return [estimator]
    return [estimator, rviz(context, model_path(context, params_file), namespace)]


def overrides(context: LaunchContext) -> dict[str, ParameterValue]:
    """The parameter-valued arguments given on the command line, typed as the node declares them."""
    given = {
        "model_path": (LaunchConfiguration("model_path"), str),
        "device": (LaunchConfiguration("device"), str),
        "autostart": (LaunchConfiguration("autostart"), bool),
        "use_sim_time": (LaunchConfiguration("use_sim_time"), bool),
        "publish_markers": (LaunchConfiguration("publish_markers"), bool),
        "step_backend": (LaunchConfiguration("step_backend"), str),
    }
    return {name: ParameterValue(value, value_type=kind) for name, (value, kind) in given.items()
            if value.perform(context)}


def model_path(context: LaunchContext, params_file: str) -> str:
    """The model_path the node will load: the argument, else the parameters file's, else the node's default."""
    return LaunchConfiguration("model_path").perform(context) or file_model_path(params_file) or DEFAULT_MODEL


def file_model_path(params_file: str) -> str:
    """model_path from the parameters file's first section that sets it (only picks the RViz view)."""
    sections = yaml.safe_load(Path(params_file).read_text()) or {}
    for section in sections.values():
        value = (section.get("ros__parameters") or {}).get("model_path")
        if value:
            return str(value)
    return ""


def rviz(context: LaunchContext, model: str, namespace: str) -> LaunchDescriptionEntity:
    """RViz with the model's view, or a notice when rviz2 is missing: the estimator runs either way."""
    try:
        get_package_prefix("rviz2")
    except PackageNotFoundError:
        return LogInfo(msg="rviz:=true, but rviz2 is not installed (sudo apt install ros-jazzy-rviz2): "
                           "the estimator runs without it")
    config = RVIZ_CONFIGS.get(Path(model).stem, RVIZ_CONFIGS[DEFAULT_MODEL])
    # The configs name /hiss_estimator/<output>; a namespace moves the outputs, so follow them.
    ns = namespace.strip("/")
    remappings = [(f"/{NODE_NAME}/{o}", f"/{ns}/{NODE_NAME}/{o}") for o in OUTPUTS] if ns else []
    sim_time = LaunchConfiguration("use_sim_time")
    parameters = [{"use_sim_time": ParameterValue(sim_time, value_type=bool)}] if sim_time.perform(context) else []
    return Node(package="rviz2", executable="rviz2", name="rviz2", namespace=namespace,
                arguments=["-d", os.path.join(get_package_share_directory(PACKAGE), config)],
                parameters=parameters, remappings=remappings, output="screen")
