"""The estimator node without a carried state: every estimate recomputes the last 10 s window.

What a sequence model deployed without streaming does: keep the recent input and rerun
``model(window)`` for each new chunk, reading the last output. Used by ``bench_latency.py`` as
the cost to beat; identical to ``hiss_ros.nodes.estimator`` in everything else (same pipeline,
same messages, same diagnostics).

    python bench/naive_estimator.py --ros-args -p model_path:=models/contact.safetensors
"""

from __future__ import annotations

from collections import deque

import torch

from hiss_ros.nodes.estimator import Estimator, main
from hiss_ros.pipeline import Chunk
from hiss_ros.serving import Estimate, StreamingEstimator

WINDOW_S = 10.0


class WindowEstimator(StreamingEstimator):
    def reset(self) -> None:
        super().reset()
        self.window: deque[torch.Tensor] = deque(maxlen=round(WINDOW_S * self.spec.pipeline.output_rate_hz))

    def estimate(self, chunk: Chunk) -> Estimate | None:
        """The model over the last WINDOW_S seconds of chunks; its last output."""
        self.follow_episode(chunk)  # a new episode empties the window (reset)
        self.window.append(torch.from_numpy(chunk.x)[None])
        with torch.inference_mode():
            y = self.model(torch.cat(tuple(self.window), dim=1))[0, -1]  # (W,)
        return self.to_estimate(chunk.stamp_ns, y, chunk.x)


class NaiveEstimator(Estimator):
    def _load(self, path: str) -> StreamingEstimator:
        return WindowEstimator.from_checkpoint(path, self.device, self.p["max_gap_s"] or None)


if __name__ == "__main__":
    raise SystemExit(main(node_class=NaiveEstimator))
