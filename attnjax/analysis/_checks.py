"""Argument checks shared by the probes (clear errors naming the argument and expected shape)."""

from __future__ import annotations

import jax.numpy as jnp


def check_ndim(x, ndim: int | tuple[int, ...], name: str, shape_doc: str):
  x = jnp.asarray(x)
  ok = (x.ndim,) if isinstance(ndim, int) else ndim
  if x.ndim not in (ok if isinstance(ok, tuple) else (ok,)):
    raise ValueError(f"{name} must be {shape_doc}, got shape {x.shape}")
  return x


def check_attention(a, name: str = "attn", *, min_ndim: int = 4, shape_doc: str = "[..., H, Tq, Tk]"):
  a = jnp.asarray(a)
  if a.ndim < min_ndim:
    raise ValueError(f"{name} must be {shape_doc} attention weights, got shape {a.shape}")
  return a


def check_range(value, lo, hi, name: str, *, lo_open=False, hi_open=False):
  lo_bad = value <= lo if lo_open else value < lo
  hi_bad = value >= hi if hi_open else value > hi
  if lo_bad or hi_bad:
    lb = "(" if lo_open else "["
    rb = ")" if hi_open else "]"
    raise ValueError(f"{name} must be in {lb}{lo}, {hi}{rb}, got {value}")


def xlogx(p):
  """`p log p` with `0 log 0 = 0` and a zero gradient there (no NaN)."""
  safe = jnp.where(p > 0, p, 1.0)
  return jnp.where(p > 0, p * jnp.log(safe), 0.0)
