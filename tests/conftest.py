"""Test-wide settings: CPU threads, headless MuJoCo, and a shared JAX compilation cache."""

import os

# Tests run on the CPU with few threads: the machine has two cores shared by workers.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
os.environ.setdefault("MUJOCO_GL", "osmesa")
# Compiled XLA programs are cached on disk and shared by the test processes (the kill-and-
# resume test compiles the same agent in a subprocess): compilation dominates small tests.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(__file__)), ".venv", "jax-cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
