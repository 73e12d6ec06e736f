"""Shared test fixtures: the environments every conformance test runs on."""

import os

# Tests run on the CPU with few threads: the machine has two cores shared by workers.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("MUJOCO_GL", "osmesa")
