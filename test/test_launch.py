"""The launch file, parameters file and RViz config, checked statically (launch_ros is not
installable without a ROS distribution; where `launch` imports, its description is loaded too)."""

from __future__ import annotations

import ast
import importlib.util
import re
from glob import glob
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch" / "estimator.launch.py"


def declared_parameters() -> set[str]:
    """The estimator's parameters: the keys of its PARAMETERS table (each one declared)."""
    tree = ast.parse((ROOT / "hiss_ros" / "nodes" / "estimator.py").read_text())
    (table,) = [n.value for n in tree.body if isinstance(n, ast.AnnAssign | ast.Assign)
                and "PARAMETERS" in [t.id for t in getattr(n, "targets", [getattr(n, "target", None)])]]
    return set(ast.literal_eval(table)) | {"use_sim_time"}


def launch_tree() -> ast.Module:
    return ast.parse(LAUNCH.read_text())


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == name]


def test_launch_arguments():
    names = {c.args[0].value for c in calls(launch_tree(), "DeclareLaunchArgument")}
    assert names == {"model_path", "params_file", "device", "namespace", "use_sim_time", "rviz"}


def test_launched_executables_are_console_scripts():
    setup = (ROOT / "setup.py").read_text()
    scripts = set(re.findall(r'"([\w-]+) = hiss_ros\.', setup))
    for node in calls(launch_tree(), "Node"):
        kw = {k.arg: k.value for k in node.keywords}
        if kw["package"].value == "hiss_ros":
            assert kw["executable"].value in scripts


def test_parameters_passed_by_the_launch_file_exist_on_the_node():
    params = declared_parameters()
    for node in calls(launch_tree(), "Node"):
        kw = {k.arg: k.value for k in node.keywords}
        if kw["package"].value != "hiss_ros":
            continue
        for d in ast.walk(kw["parameters"]):
            if isinstance(d, ast.Dict):
                keys = {k.value for k in d.keys if isinstance(k, ast.Constant)}
                assert keys <= params, keys - params


def test_referenced_files_are_installed():
    tree = launch_tree()
    refs = [[e.value for e in c.args[0].elts[1:]] for c in calls(tree, "PathJoinSubstitution")]
    installed = {Path(p) for p in glob(str(ROOT / "config" / "*")) + glob(str(ROOT / "launch" / "*.launch.py"))}
    assert "glob(\"config/*\")" in (ROOT / "setup.py").read_text()
    for ref in refs:
        path = ROOT.joinpath(*ref)
        if ref[0] == "config":
            assert path in installed, path
    assert (ROOT / "models" / "contact.safetensors").is_file()  # the default, model_path:=contact
    assert "glob(\"models/*.safetensors\")" in (ROOT / "setup.py").read_text()


def test_params_file_has_only_declared_parameters():
    data = yaml.safe_load((ROOT / "config" / "estimator.yaml").read_text())
    assert set(data["hiss_estimator"]["ros__parameters"]) <= declared_parameters()


def test_rviz_config_shows_the_estimates():
    rviz = yaml.safe_load((ROOT / "config" / "hiss.rviz").read_text())
    displays = {d["Class"]: d for d in rviz["Visualization Manager"]["Displays"]}
    assert displays["rviz_default_plugins/Wrench"]["Topic"]["Value"].startswith("/hiss/")
    assert "rviz_default_plugins/TwistStamped" in displays
    assert displays["rviz_default_plugins/MarkerArray"]["Topic"]["Value"] == "/hiss/markers"
    assert rviz["Visualization Manager"]["Global Options"]["Fixed Frame"]


def test_launch_description_loads_where_launch_is_installed():
    """Without ROS 2 `launch` (not installable from PyPI here) the module must fail only on that import."""
    spec = importlib.util.spec_from_file_location("estimator_launch", LAUNCH)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as exc:
        assert exc.name.split(".")[0] in ("launch", "launch_ros"), exc  # (the repo's launch/ folder may shadow it)
        return
    assert len(module.generate_launch_description().entities) >= 7
