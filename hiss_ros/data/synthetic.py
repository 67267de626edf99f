"""A small synthetic contact recording (IMU + header-less tactile + ground-truth wrench) as a bag.

Not the physically grounded simulator (``hiss-sim``): a quick, deterministic stand-in whose
force needs memory across chunks (a leaky integral of acceleration and a lagged tactile
response), used by the tests: seconds to generate, quick to learn.
"""

from __future__ import annotations

import numpy as np

from hiss_ros.data.write import float_array, imu, wrench, write_bag

MS = 1_000_000


def contact_bag(path, seconds: float = 60.0, seed: int = 0):
    """IMU 200 Hz, header-less tactile 50 Hz, ground-truth wrench 100 Hz. The force is a leaky
    integral of acceleration plus a lagged tactile response: it needs memory across chunks."""
    rng = np.random.default_rng(seed)
    n = int(seconds * 200)
    t = np.arange(n) / 200
    accel = np.stack([np.sin(2 * np.pi * f * t + p) for f, p in rng.uniform([0.2, 0], [1.5, 6], (3, 2))], 1)
    press = np.clip(np.sin(2 * np.pi * 0.3 * t + rng.uniform(0, 6)), 0, None)
    force = np.zeros((n, 3))
    for i in range(1, n):
        force[i] = 0.98 * force[i - 1] + 0.02 * np.array([accel[i, 0] * 3, accel[i, 1] * 3, 5 * press[i]])
    recs = []
    for i in range(n):
        s = 1_000 * MS + i * 5 * MS
        recs.append(("/imu/data", s, imu(s, 0.1 * rng.standard_normal(3), accel[i] + 0.02 * rng.standard_normal(3))))
        if i % 4 == 0:
            taxels = [press[i] * k + 0.01 * rng.standard_normal() for k in (1.0, 0.5, 0.2)]
            recs.append(("/tactile", s + 2 * MS, float_array(taxels)))
        if i % 2 == 0:
            recs.append(("/wrench_gt", s + MS, wrench(s, force[i], (0, 0, 0))))
    return write_bag(path, recs)
