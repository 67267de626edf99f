"""Simulated sensorized end-effector (hiss-sim): IMU + magnetic tactile skin + ground truth.

    from hiss_ros.sim import SimConfig, simulate
    res = simulate(SimConfig(seconds=60, seed=0))     # numpy arrays, no ROS (see endeffector.py)
    # bags: hiss_ros.sim.bag.write_sim_bag(path, res) or the hiss-sim command (cli.py)

Modules: config (SimConfig), trajectory (scripted motion), contact (wrench, vibration),
imu (IMU errors), skin (magnet-in-elastomer taxels), endeffector (all of it together),
bag (ROS 2 records), cli (hiss-sim), train_config (a hiss-train config for the bags).
"""

from hiss_ros.sim.config import SimConfig
from hiss_ros.sim.endeffector import SimResult, simulate
from hiss_ros.sim.train_config import TRAIN_YAML, train_config_dict

__all__ = ["TRAIN_YAML", "SimConfig", "SimResult", "simulate", "train_config_dict"]
