"""Test-wide JAX settings: float32 by default, strict dtype promotion, 8 CPU devices."""

import jax

# Must run before any JAX backend is initialised.
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", False)
jax.config.update("jax_numpy_dtype_promotion", "strict")
