import jax
import jax.numpy as jnp
import pytest


@pytest.fixture
def rand():
  """rand(seed, *shape, dtype=float32) -> normal array (fresh inputs per test)."""
  def make(seed, *shape, dtype=jnp.float32, scale=1.0):
    return (scale * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(dtype)
  return make
