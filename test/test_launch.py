"""The launch files, their parameters files and the RViz configs.

ROS 2 `launch` / `launch_ros` are not installable without a ROS distribution, so the files are
parsed and checked statically; where the real `launch` imports, their descriptions are also loaded
and visited. The repository's `launch/` folder is never allowed to stand in for the `launch`
package: on sys.path it imports as an empty namespace package, and a check that tolerates the
resulting ImportError passes whatever the launch file says.
"""

from __future__ import annotations

import ast
import json
import os
import struct
import subprocess
import sys
import textwrap
from functools import cache
from importlib.machinery import ModuleSpec, PathFinder
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_package import installed_files

ROOT = Path(__file__).resolve().parents[1]
SHARE = "share/hiss_ros"
MAIN = ROOT / "launch" / "estimator.launch.py"
EKF = ROOT / "launch" / "ekf_velocity.launch.py"
# What the README documents for each launch file.
ARGUMENTS = {
    MAIN: {"model_path", "params_file", "device", "namespace", "use_sim_time", "rviz", "autostart",
           "publish_markers", "step_backend"},
    EKF: {"model_path", "namespace", "use_sim_time"},
}
LAUNCH_IDS = [p.name for p in ARGUMENTS]
# The RViz display for each estimate message type, and the private topic the node publishes it on.
DISPLAYS = {
    "geometry_msgs/msg/WrenchStamped": ("rviz_default_plugins/Wrench", "/hiss_estimator/wrench"),
    "geometry_msgs/msg/TwistStamped": ("rviz_default_plugins/TwistStamped", "/hiss_estimator/twist"),
}


def tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text())


def calls(node: ast.AST, name: str) -> list[ast.Call]:
    """Calls of ``name`` whether written ``name(...)`` or ``module.name(...)``."""
    return [n for n in ast.walk(node) if isinstance(n, ast.Call)
            and (getattr(n.func, "id", None) == name or getattr(n.func, "attr", None) == name)]


def first_string(call: ast.Call) -> str:
    """The call's first argument, which must be a string literal for a static check to see it."""
    assert call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str), \
        f"line {call.lineno}: {ast.unparse(call)} does not name a literal string"
    return call.args[0].value


def constants(path: Path) -> dict[str, Any]:
    """The launch file's module-level constants (NAME = literal)."""
    found = {}
    for node in tree(path).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue  # not a literal
    return found


def literal(node: ast.expr, path: Path) -> Any:
    """A keyword's value: a literal, or a module-level constant of the launch file."""
    return constants(path)[node.id] if isinstance(node, ast.Name) else ast.literal_eval(node)


def declared_arguments(path: Path) -> set[str]:
    return {first_string(c) for c in calls(tree(path), "DeclareLaunchArgument")}


def used_configurations(path: Path) -> set[str]:
    return {first_string(c) for c in calls(tree(path), "LaunchConfiguration")}


def share_references(path: Path) -> set[str]:
    """Files named relative to the package share: every "config/..." or "launch/..." string literal."""
    return {n.value for n in ast.walk(tree(path)) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value.split("/")[0] in ("config", "launch") and "." in n.value}


def node_parameters() -> dict[str, Any]:
    """The estimator's declared parameters and defaults: its module-level ``PARAMETERS = {...}``."""
    for node in tree(ROOT / "hiss_ros" / "nodes" / "estimator.py").body:
        target = node.target if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [None])[0]
        if getattr(target, "id", None) == "PARAMETERS":
            return ast.literal_eval(node.value)
    raise AssertionError("hiss_ros/nodes/estimator.py has no PARAMETERS table")


def ros_parameters(path: Path) -> dict[str, dict[str, Any]]:
    """A parameters file as {node key: its ros__parameters}."""
    data = yaml.safe_load(path.read_text())
    assert all(set(section) == {"ros__parameters"} for section in data.values()), path
    return {key: section["ros__parameters"] for key, section in data.items()}


@cache
def checkpoint_metadata(model: str) -> dict[str, Any]:
    """A shipped model's hiss_ros metadata (model config, data spec) from its safetensors header,
    read without torch."""
    with open(ROOT / "models" / f"{model}.safetensors", "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return json.loads(header["__metadata__"]["hiss_ros"])


def checkpoint_data(model: str) -> dict[str, Any]:
    """A shipped model's data spec (streams, rates, ...)."""
    return checkpoint_metadata(model)["data"]


def shipped_models() -> list[str]:
    return sorted(p.stem for p in (ROOT / "models").glob("*.safetensors"))


@pytest.mark.parametrize("path", list(ARGUMENTS), ids=LAUNCH_IDS)
def test_launch_arguments_are_the_documented_ones(path: Path):
    assert declared_arguments(path) == ARGUMENTS[path]


@pytest.mark.parametrize("path", list(ARGUMENTS), ids=LAUNCH_IDS)
def test_every_launch_configuration_is_declared(path: Path):
    """An undeclared name resolves to nothing at launch time (or fails only then): catch it here."""
    undeclared = used_configurations(path) - declared_arguments(path)
    assert not undeclared, f"LaunchConfiguration without DeclareLaunchArgument: {sorted(undeclared)}"


@pytest.mark.parametrize("path", list(ARGUMENTS), ids=LAUNCH_IDS)
def test_every_declared_argument_is_used(path: Path):
    """A declared argument nothing reads is accepted and silently ignored (a misspelt use leaves one)."""
    unused = declared_arguments(path) - used_configurations(path)
    assert not unused, f"declared but never read: {sorted(unused)}"


@pytest.mark.parametrize("path", list(ARGUMENTS), ids=LAUNCH_IDS)
def test_referenced_files_are_installed(path: Path):
    """Every share-relative file the launch file names is in the install tree setup.py produces."""
    installed = installed_files()
    assert f"{SHARE}/launch/{path.name}" in installed
    references = share_references(path)
    assert references, "the launch file names no installed file: the check would prove nothing"
    missing = sorted(r for r in references if f"{SHARE}/{r}" not in installed)
    assert not missing, f"not installed by setup.py: {missing}"


def test_launched_estimator_is_installed_for_ros2_run():
    """LifecycleNode(package="hiss_ros", executable=X) runs lib/hiss_ros/X of the install tree."""
    nodes = [{k.arg: k.value for k in n.keywords} for n in calls(tree(MAIN), "LifecycleNode")]
    assert [(literal(n["package"], MAIN), literal(n["executable"], MAIN), literal(n["name"], MAIN))
            for n in nodes] == [("hiss_ros", "estimator", "hiss_estimator")]
    assert "lib/hiss_ros/estimator" in installed_files()


def test_params_file_matches_the_node():
    """config/estimator.yaml sets exactly the node's parameters, to the node's defaults, for any node."""
    params = ros_parameters(ROOT / "config" / "estimator.yaml")
    assert list(params) == ["/**"]
    expected = node_parameters()
    assert set(params["/**"]) == set(expected)
    assert {k: (type(v), v) for k, v in params["/**"].items()} == {k: (type(v), v) for k, v in expected.items()}


def test_launch_overrides_are_node_parameters():
    """Only parameters the node declares are passed as overrides (and the launch file's default model)."""
    parameters = node_parameters() | {"use_sim_time": False}
    function = next(f for f in tree(MAIN).body if isinstance(f, ast.FunctionDef) and f.name == "overrides")
    (table,) = [n for n in ast.walk(function) if isinstance(n, ast.Dict)]
    keys = {k.value for k in table.keys}
    assert keys == {"model_path", "device", "autostart", "use_sim_time", "publish_markers", "step_backend"}
    assert keys <= set(parameters)
    for key, value in zip(table.keys, table.values, strict=True):  # "name": (LaunchConfiguration("name"), type)
        configuration, kind = value.elts
        assert first_string(configuration) == key.value
        assert kind.id == type(parameters[key.value]).__name__, f"{key.value}: typed {kind.id}"
    assert constants(MAIN)["DEFAULT_MODEL"] == parameters["model_path"]


def test_rviz_config_per_shipped_model_shows_what_it_publishes():
    rviz_configs = constants(MAIN)["RVIZ_CONFIGS"]
    assert sorted(rviz_configs) == shipped_models()
    frame = node_parameters()["frame_id"]
    for model, config in rviz_configs.items():
        rviz = yaml.safe_load((ROOT / config).read_text())
        displays = {d["Class"]: d for d in rviz["Visualization Manager"]["Displays"]}
        # a model with the variance head publishes its twist with covariance, which RViz cannot show
        variance = checkpoint_metadata(model)["model"].get("variance", False)
        types = [o["type"] for o in checkpoint_data(model)["outputs"]]
        published = {DISPLAYS[t] for t in types if not (variance and t == "geometry_msgs/msg/TwistStamped")}
        assert published or variance, model
        for cls, topic in published:
            assert displays[cls]["Topic"]["Value"] == topic, (model, cls)
        unpublished = {cls for cls, _ in DISPLAYS.values()} - {cls for cls, _ in published}
        assert not unpublished & set(displays), f"{config}: displays for outputs {model} lacks"
        assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/hiss_estimator/markers"
        assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"] == frame


def test_rviz_topics_are_remapped_under_a_namespace():
    """The configs name /hiss_estimator/<output>; the launch file remaps exactly those outputs."""
    outputs = {f"/hiss_estimator/{o}" for o in constants(MAIN)["OUTPUTS"]}
    for config in constants(MAIN)["RVIZ_CONFIGS"].values():
        rviz = yaml.safe_load((ROOT / config).read_text())
        topics = {d["Topic"]["Value"] for d in rviz["Visualization Manager"]["Displays"] if "Topic" in d}
        assert topics <= outputs, topics - outputs


def test_ekf_example_fuses_the_estimators_twist_with_covariance():
    params = ros_parameters(ROOT / "config" / "ekf_velocity.yaml")
    assert set(params) == {"/**/hiss_estimator", "/**/ekf_filter_node"}
    estimator, ekf = params["/**/hiss_estimator"], params["/**/ekf_filter_node"]
    assert set(estimator) <= set(node_parameters())
    assert estimator["velocity_covariance"] is True  # robot_localization rejects a twist without covariance
    # a shipped model with the variance head: each estimate's own covariance, not one constant
    assert estimator["model_path"] in shipped_models()
    assert checkpoint_metadata(estimator["model_path"])["model"]["variance"] is True
    assert ekf["twist0"] == "hiss_estimator/twist"  # relative: the node's ~/twist in the same namespace
    imu_topics = {s["topic"].lstrip("/") for m in shipped_models() for s in checkpoint_data(m)["inputs"]
                  if s["type"] == "sensor_msgs/msg/Imu"}
    assert imu_topics == {ekf["imu0"]}
    for key in ("twist0_config", "imu0_config"):
        assert len(ekf[key]) == 15 and all(isinstance(v, bool) for v in ekf[key]), key
    assert any(ekf["twist0_config"][6:9])  # some linear velocity is fused
    assert ekf["base_link_frame"] == estimator["twist_frame_id"]


def test_ekf_launch_gives_the_estimator_its_params_file():
    """The example's estimator runs with config/ekf_velocity.yaml (velocity_covariance:=true)."""
    (include,) = calls(tree(EKF), "IncludeLaunchDescription")
    (arguments,) = [n for n in ast.walk(include) if isinstance(n, ast.Dict)]
    assert "params_file" in {k.value for k in arguments.keys}
    assert {"config/ekf_velocity.yaml", "launch/estimator.launch.py"} <= share_references(EKF)
    nodes = [{k.arg: k.value for k in n.keywords} for n in calls(tree(EKF), "Node")]
    assert [(n["package"].value, n["executable"].value, n["name"].value) for n in nodes] == [
        ("robot_localization", "ekf_node", "ekf_filter_node")]


def real_launch_spec() -> ModuleSpec | None:
    """Where the ROS 2 `launch` package is, looked up with the repository's folders off the path."""
    path = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "test")]
    spec = PathFinder.find_spec("launch", path)
    return spec if spec is not None and spec.origin is not None else None  # origin None: a bare folder


def test_the_repository_launch_folder_is_not_the_launch_package():
    """The lookup ignores the repository even though pytest and PYTHONPATH put it on sys.path."""
    shadow = PathFinder.find_spec("launch", [str(ROOT)])
    assert shadow is not None and shadow.origin is None  # what a plain `import launch` would find here
    spec = real_launch_spec()
    assert spec is None or ROOT not in Path(spec.origin).parents


# Loads a launch file under its own module name with the real `launch`, visits its description with
# the given arguments without starting any process, and prints what it would run as JSON.
VISIT = textwrap.dedent("""
    import importlib.util, json, sys
    from launch import LaunchContext
    from launch.actions import LogInfo
    from launch_ros.actions import Node

    path, name, arguments = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    context = LaunchContext()
    context.launch_configurations.update(arguments)
    nodes, logs = [], []

    def visit(entity):
        if isinstance(entity, Node):  # substitutions only: Node.execute would start the process
            entity._perform_substitutions(context)
            nodes.append([entity.node_package, entity.node_executable, entity.node_name])
            return
        if isinstance(entity, LogInfo):
            logs.append("".join(s.perform(context) for s in entity.msg))
        for child in entity.visit(context) or []:
            visit(child)

    visit(module.generate_launch_description())
    overrides = {k: v.evaluate(context) for k, v in module.overrides(context).items()} \\
        if hasattr(module, "overrides") else {}
    print(json.dumps({"nodes": nodes, "logs": logs, "overrides": overrides}))
""")


def install_prefix(prefix: Path) -> Path:
    """The install tree setup.py produces, as links into the repository (an ament prefix for launch)."""
    for dest, source in installed_files().items():
        (prefix / dest).parent.mkdir(parents=True, exist_ok=True)
        (prefix / dest).symlink_to(source)
    return prefix


def visit(path: Path, arguments: dict[str, str], prefix: Path) -> dict[str, Any]:
    entries = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != ROOT]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(entries),
           "AMENT_PREFIX_PATH": os.pathsep.join([str(prefix), os.environ.get("AMENT_PREFIX_PATH", "")])}
    name = path.name.removesuffix(".py").replace(".", "_")
    out = subprocess.run([sys.executable, "-c", VISIT, str(path), name, json.dumps(arguments)], cwd=prefix,
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_launch_descriptions_visit_where_launch_is_installed(tmp_path: Path):
    if real_launch_spec() is None:
        pytest.skip("ROS 2 `launch` is not importable here (no PyPI release): the files are checked statically")
    prefix = install_prefix(tmp_path / "install")
    plain = visit(MAIN, {}, prefix)
    assert plain["nodes"] == [["hiss_ros", "estimator", "/hiss_estimator"]] and plain["overrides"] == {}
    given = visit(MAIN, {"namespace": "robot1", "model_path": "broad_velocity", "autostart": "false",
                         "publish_markers": "true", "step_backend": "compile", "rviz": "true"}, prefix)
    assert given["overrides"] == {"model_path": "broad_velocity", "autostart": False, "publish_markers": True,
                                  "step_backend": "compile"}
    assert given["nodes"][0] == ["hiss_ros", "estimator", "/robot1/hiss_estimator"]
    if len(given["nodes"]) == 1:  # no rviz2 in the ament index: a notice, and the estimator still runs
        assert any("rviz2 is not installed" in line for line in given["logs"]), given["logs"]
    ekf = visit(EKF, {"namespace": "robot1"}, prefix)
    assert ekf["nodes"] == [["hiss_ros", "estimator", "/robot1/hiss_estimator"],
                            ["robot_localization", "ekf_node", "/robot1/ekf_filter_node"]]
