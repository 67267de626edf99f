"""The estimator feeding robot_localization's EKF (example; needs ros-jazzy-robot-localization).

ros2 launch hiss_ros ekf_velocity.launch.py [model_path:=broad_velocity_uncertainty|PATH] [namespace:=NS]
    [use_sim_time:=true]

The estimator comes from estimator.launch.py with config/ekf_velocity.yaml as its parameters file,
which picks the shipped broad_velocity_uncertainty model (each estimate's own predicted variance
on the twist's covariance diagonal) and sets velocity_covariance:=true (for a model without the
variance head: the EKF rejects a twist without covariance); the EKF
(ekf_filter_node) reads the same file and fuses hiss_estimator/twist (twist0) with imu/data (imu0),
both relative so namespace:= moves the pair together. It publishes no transform: the EKF drops IMU
messages it cannot transform into its base_link_frame (tool), so with the sample data (IMU frame_id
imu, the same frame) also run
    ros2 run tf2_ros static_transform_publisher --frame-id tool --child-frame-id imu
"""

from __future__ import annotations

from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

PACKAGE = "hiss_ros"


def generate_launch_description() -> LaunchDescription:
    share = FindPackageShare(PACKAGE)
    params_file = PathJoinSubstitution([share, "config/ekf_velocity.yaml"])
    estimator = IncludeLaunchDescription(
        PythonLaunchDescriptionSource(PathJoinSubstitution([share, "launch/estimator.launch.py"])),
        launch_arguments={
            "params_file": params_file,
            "model_path": LaunchConfiguration("model_path"),
            "namespace": LaunchConfiguration("namespace"),
            "use_sim_time": LaunchConfiguration("use_sim_time"),
        }.items(),
    )
    ekf = Node(package="robot_localization", executable="ekf_node", name="ekf_filter_node",
               namespace=LaunchConfiguration("namespace"), output="screen",
               parameters=[params_file,
                           {"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)}])
    return LaunchDescription([
        DeclareLaunchArgument("model_path", default_value="",
                              description="a shipped model or a checkpoint; empty: config/ekf_velocity.yaml's "
                                          "(broad_velocity_uncertainty)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of both nodes and their topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="true when replaying a bag that publishes /clock"),
        estimator,
        ekf,
    ])
