"""IMU measurement model: gyro and accelerometer with bias random walk and white noise.

    gyro  = w_b + b_g + n_g                      w_b: body angular velocity
    accel = R^T (a - g) + vib + b_a + n_a        g = (0, 0, -9.81): at rest accel = +9.81 "up"
    b(t)  = b0 + random walk,  b0 ~ N(0, bias_init^2),  db ~ N(0, walk^2 dt)
    n     ~ N(0, density^2 rate)                 (Kalibr convention)

Simplified: the IMU sits at the tool frame origin with its axes aligned to the tool (no lever
arm, no misalignment), no scale-factor error, no g-sensitivity, no quantisation; the
anti-aliasing filter is ideal (the motion is band-limited; the texture vibration is attenuated
near the Nyquist rate by ``contact.texture_vibration``).
"""

from __future__ import annotations

import numpy as np

GRAVITY = np.array([0.0, 0.0, -9.81])  # world frame, m/s^2


def noisy_imu(rng: np.random.Generator, gyro_true: np.ndarray, accel_true: np.ndarray, rate_hz: float,
              gyro_noise_density: float, accel_noise_density: float, gyro_bias_walk: float,
              accel_bias_walk: float, gyro_bias_init: float, accel_bias_init: float) -> tuple[np.ndarray, np.ndarray]:
    """(m, 3) true angular rate [rad/s] and specific force [m/s^2] -> measured (gyro, accel)."""
    m = len(gyro_true)
    dt = 1.0 / rate_hz

    def corrupt(true: np.ndarray, init: float, walk: float, density: float) -> np.ndarray:
        bias = rng.normal(0.0, init, 3) + np.cumsum(rng.normal(0.0, walk * np.sqrt(dt), (m, 3)), axis=0)
        return true + bias + rng.normal(0.0, density * np.sqrt(rate_hz), (m, 3))

    gyro = corrupt(gyro_true, gyro_bias_init, gyro_bias_walk, gyro_noise_density)
    accel = corrupt(accel_true, accel_bias_init, accel_bias_walk, accel_noise_density)
    return gyro, accel
