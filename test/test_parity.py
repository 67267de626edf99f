"""Train/serve parity on a real bag: what the trainer trains on is what the estimator serves.

The bag's messages go through ``StreamingEstimator`` one at a time in recorded order, read with
the node's own extraction code, exactly as the estimator node receives them. The chunks it builds
must equal the tensors the dataset trains and validates on, and its estimates must equal
``hiss-eval``'s offline forward pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from rosbags.highlevel import AnyReader
from test_train import config

from hiss_ros.data.streams import header_stamp_ns, value_reader
from hiss_ros.data.synthetic import contact_bag
from hiss_ros.serving import StreamingEstimator
from hiss_ros.train.cli import main as train_main
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import load_dataset
from hiss_ros.train.evaluate import evaluate_bags


def served_by_the_estimator(bag, est: StreamingEstimator) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Every message of ``bag`` pushed as the node pushes it -> ({stamp: chunk x}, {stamp: estimate})."""
    topics = [s.topic for s in est.spec.inputs]
    chunks, estimates, readers = {}, {}, {}
    with AnyReader([bag]) as reader:
        for conn, receive_ns, raw in reader.messages([c for c in reader.connections if c.topic in topics]):
            i = topics.index(conn.topic)
            msg = reader.deserialize(raw, conn.msgtype)
            values = readers.setdefault(i, value_reader(est.spec.inputs[i], msg))(msg)
            for chunk in est.pipeline.push(i, header_stamp_ns(msg) or receive_ns, values):
                chunks[chunk.stamp_ns] = chunk.x
                e = est.estimate(chunk)
                estimates[e.stamp_ns] = e.values
    return chunks, estimates


@pytest.mark.parametrize("strapdown", [False, True], ids=["inputs", "strapdown"])
def test_trained_tensors_and_hiss_eval_equal_what_the_estimator_serves(tmp_path, strapdown):
    bag = contact_bag(tmp_path / "bag", seconds=20.0)
    path = config(tmp_path, epochs=1)
    cfg = yaml.safe_load(path.read_text())
    cfg["filter"] = {"cutoff_hz": 40.0, "order": 2}  # the filter's state is part of the parity too
    if strapdown:  # and the derived channels' state
        cfg["strapdown"] = {"gyro": "/imu/data:angular_velocity", "accel": "/imu/data:linear_acceleration"}
    path.write_text(yaml.safe_dump(cfg))
    assert train_main(["--config", str(path), "--bag", str(bag), "--out", str(tmp_path / "run"), "--quiet",
                       "--cache-dir", str(tmp_path / "cache")]) == 0
    est = StreamingEstimator.from_checkpoint(tmp_path / "run" / "model.safetensors")
    chunks, estimates = served_by_the_estimator(bag, est)

    ds = load_dataset(TrainConfig.load(path), [bag], progress=False)
    trained = {int(t): x for part in (ds.train, ds.val) for xs, ts in zip(part.x, part.stamps, strict=True)
               for x, t in zip(xs, ts, strict=True)}
    assert len(trained) > 300 and set(trained) <= set(chunks)
    assert next(iter(trained.values())).shape[1] == est.model.config.input_dim == 9 + 3 * strapdown
    worst = max(np.abs(chunks[t] - x).max() for t, x in trained.items())
    assert worst <= 1e-6, f"the dataset's tensors differ from the served chunks by up to {worst:g}"

    ev = evaluate_bags(tmp_path / "run", [bag], "all", progress=False)
    assert len(ev.stamps_ns) > 300 and ev.stamps_ns[0] == min(chunks)  # the segment starts with the stream
    norm = est.spec.normalization
    served = norm.outputs(np.stack([estimates[int(t)] for t in ev.stamps_ns]))
    offline = norm.outputs(ev.pred)
    worst = np.abs(served - offline).max()
    assert worst <= 1e-6, f"streamed estimates differ from hiss-eval's by up to {worst:g} (normalised units)"
