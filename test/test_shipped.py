"""The shipped sample bags and models: present, small, and as good as their model cards say."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from hiss_ros.checkpoint import load_checkpoint
from hiss_ros.serving import load_model
from hiss_ros.train.evaluate import evaluate_bags

REPO = Path(__file__).resolve().parents[1]
SHIPPED = ["contact", "broad_velocity", "contact_uncertainty", "broad_velocity_uncertainty"]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def test_sample_data_is_small_and_attributed():
    sample = REPO / "data" / "sample"
    assert folder_mb(sample) <= 10.0, f"data/sample holds {folder_mb(sample):.1f} MB"
    assert {p.name for p in sample.iterdir() if p.is_dir()} >= {"contact_sim", "broad_excerpt"}
    attribution = (sample / "broad_excerpt" / "ATTRIBUTION.md").read_text()
    assert "CC BY 4.0" in attribution and "10.3390/data6070072" in attribution


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_reproduces_its_card(name):
    path = REPO / "models" / f"{name}.safetensors"
    assert path.stat().st_size <= 5e6, f"{path} is {path.stat().st_size / 1e6:.1f} MB"
    card = json.loads((REPO / "models" / f"{name}.metrics.json").read_text())
    ckpt = load_checkpoint(path)
    assert ckpt.data["validation"]["mse_per_channel"], "no validation error for the velocity covariance"
    ev = evaluate_bags(path, [REPO / card["bag"]], "all", None, progress=False)
    assert ev.metrics["chunks"] == card["chunks"]
    assert ev.metrics["mse_normalised"] == pytest.approx(card["mse_normalised"], rel=1e-3)
    for channel, rmse in card["rmse"].items():
        assert ev.metrics["rmse"][channel] == pytest.approx(rmse, rel=1e-3, abs=1e-6), channel
    # The card's numbers are in the card that people read.
    readme = (REPO / "models" / "README.md").read_text()
    assert f"## {name}\n" in readme and f"{card['mse_normalised']:.4g}" in readme
    uncertain = name.endswith("_uncertainty")
    assert ckpt.config.variance is uncertain and (ev.std is not None) is uncertain
    if uncertain:  # its variance: calibrated, raised on novel input, and a calibration table in its card
        spec = load_model(path).spec
        assert spec.variance_scale is not None and spec.novelty is not None and spec.novelty.inflate
        section = readme.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        assert "### Calibration on the held-out test data" in section and "| within 2 sigma |" in section
        assert np.isfinite(ev.std).all() and (ev.std > 0).all()


def test_estimator_defaults_to_the_shipped_contact_model():
    from hiss_ros.shipped import default_model_path, shipped_model

    assert default_model_path() == REPO / "models" / "contact.safetensors"
    params = yaml.safe_load((REPO / "config" / "estimator.yaml").read_text())["/**"]["ros__parameters"]
    assert params["model_path"] == "contact"  # the launch file leaves it to the params file unless given
    assert shipped_model("contact") == REPO / "models" / "contact.safetensors"
    from hiss_ros.nodes.estimator import PARAMETERS

    assert PARAMETERS["model_path"] == "contact"


def test_demo_runs_the_shipped_model_on_the_sample_bag(tmp_path):
    """``make demo``'s program: estimator + replay over DDS on the sample bag (at 3x speed)."""
    import os
    import subprocess
    import sys

    from conftest import ROS_ENV

    proc = subprocess.run([sys.executable, "-m", "hiss_ros.nodes.demo", "--out", str(tmp_path), "--rate", "3"],
                          env={**os.environ, **ROS_ENV}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["estimates"] >= 0.9 * summary["expected"] and (tmp_path / "demo.png").stat().st_size > 10_000
    # auto picks the CPU here (no CUDA); the step compiled ahead of the node is the one it runs
    assert (summary["device"], summary["step_backend"]) == ("cpu", "compile")
    assert summary["compile"].startswith("in use")


def test_demo_refuses_cuda_where_torch_sees_none(tmp_path):
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    proc = subprocess.run([sys.executable, "-m", "hiss_ros.nodes.demo", "--out", str(tmp_path), "--device", "cuda"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "device cuda, but torch sees no CUDA device" in proc.stdout
    assert not (tmp_path / "summary.json").exists()
