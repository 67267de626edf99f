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

WINDOW_S = 10.0


class NaiveEstimator(Estimator):
    def _install(self, new) -> None:
        super()._install(new)
        self.window: deque[torch.Tensor] = deque(maxlen=round(WINDOW_S * self.pipeline.config.output_rate_hz))
        self.window_episode = self.episode

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        """x (1, chunk, I) -> (1, O): model over the last WINDOW_S seconds of chunks, last output."""
        if self.window_episode != self.episode:  # the input broke: the window starts afresh
            self.window.clear()
            self.window_episode = self.episode
        self.window.append(x)
        return self.model(torch.cat(tuple(self.window), dim=1))[:, -1]


if __name__ == "__main__":
    raise SystemExit(main(node_class=NaiveEstimator))
