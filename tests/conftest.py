"""Test setup: 4 fake CPU devices, set before JAX initialises its backend."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  os.environ["XLA_FLAGS"] = (
      _flags + " --xla_force_host_platform_device_count=4"
  ).strip()

from absl import flags  # pylint: disable=g-import-not-at-top

# absltest helpers (create_tempdir, ...) read absl flags; pytest never parses
# them, so mark the defaults as parsed.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

import tempfile  # pylint: disable=g-import-not-at-top

import jax  # pylint: disable=g-import-not-at-top

# Many tests compile the same small programs (train / eval steps of the tiny
# config); a persistent compilation cache shared by the test processes turns
# the repeats into cache hits.
jax.config.update(
    "jax_compilation_cache_dir",
    os.path.join(tempfile.gettempdir(), "gdnsq_jax_test_compile_cache"),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
