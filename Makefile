# Two entry points: `make demo` (the main job on sample data) and `make test`.
# Both create .venv and install what they need; re-running reuses it.
#
# Install order matters: torch==2.13.0 (CPU wheel) goes in first, and only when no torch is
# importable, so a GPU user's CUDA torch (visible through --system-site-packages) survives.
# The ROS 2 wheels (extra "ros") go in only when rclpy (with std_srvs, lifecycle_msgs) is not importable (a sourced
# ROS 2 install provides it).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.hiss_ros-installed

.PHONY: venv demo test lint bench gpu-check gpu-wheels clean

venv: $(STAMP)

$(STAMP): setup.py setup.cfg package.xml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install $(TORCH_SPEC)
	$(PIP) install -e ".[test]"
	$(PY) -c "import rclpy, std_srvs.srv, lifecycle_msgs.msg" 2>/dev/null || $(PIP) install -e ".[ros]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hiss-demo --out out/demo

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/bench_mamba.py
	$(PY) bench/bench_streaming.py
	$(PY) bench/bench_bag.py
	$(PY) bench/bench_latency.py
	$(PY) bench/bench_cold_cache.py

# The GPU check (docs/GPU.md): for a GPU machine, so it uses that machine's python3 and torch and
# no venv. Its logs and report go to $OUT (a device run's folder), else out/gpu_check. Here:
# make gpu-check GPU_PYTHON=.venv/bin/python GPU_CHECK_ARGS=--dry-run
GPU_PYTHON ?= python3
GPU_CHECK_ARGS ?=
gpu-check:
	PYTHONPATH=$(CURDIR) $(GPU_PYTHON) bench/gpu_check.py --out "$${OUT:-out/gpu_check}" --wheels .whl $(GPU_CHECK_ARGS)

# Here, with network, before a device run: the wheels the GPU check carries (bench/gpu_wheels.txt) into .whl/.
gpu-wheels: $(STAMP)
	PYTHONPATH=$(CURDIR) $(PY) bench/gpu_check.py --download-wheels .whl

clean:
	rm -rf $(VENV) out build *.egg-info
