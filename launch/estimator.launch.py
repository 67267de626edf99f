"""ros2 launch hiss_ros estimator.launch.py [model_path:=contact|broad_velocity|PATH] [params_file:=...]
[device:=auto|cpu|cuda] [namespace:=...] [use_sim_time:=true] [rviz:=true]"""

from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription


def generate_launch_description():
    share = FindPackageShare("hiss_ros")
    arguments = [
        DeclareLaunchArgument("model_path", default_value="contact",
                              description="checkpoint from hiss-train, or a shipped model: contact, broad_velocity"),
        DeclareLaunchArgument("params_file", default_value=PathJoinSubstitution([share, "config", "estimator.yaml"]),
                              description="node parameters (YAML, hiss_estimator: ros__parameters:)"),
        DeclareLaunchArgument("device", default_value="auto", description="auto | cpu | cuda"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace for the node and its topics"),
        DeclareLaunchArgument("use_sim_time", default_value="false",
                              description="true when replaying a bag that publishes /clock"),
        DeclareLaunchArgument("rviz", default_value="false", description="also start RViz with config/hiss.rviz"),
    ]
    sim_time = {"use_sim_time": LaunchConfiguration("use_sim_time")}
    estimator = Node(
        package="hiss_ros",
        executable="estimator",
        name="hiss_estimator",
        namespace=LaunchConfiguration("namespace"),
        parameters=[
            LaunchConfiguration("params_file"),
            {"model_path": LaunchConfiguration("model_path"), "device": LaunchConfiguration("device"), **sim_time},
        ],
        output="screen",
    )
    rviz = Node(
        package="rviz2",
        executable="rviz2",
        arguments=["-d", PathJoinSubstitution([share, "config", "hiss.rviz"])],
        parameters=[sim_time],
        condition=IfCondition(LaunchConfiguration("rviz")),
    )
    return LaunchDescription([*arguments, estimator, rviz])
