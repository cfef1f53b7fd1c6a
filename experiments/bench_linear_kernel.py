"""GPU benchmark of the chunked linear-attention Pallas kernel against flash-linear-attention.

Compares, in the same run and on the same inputs (bf16, B=4, H=16, D=128 by default; causal):
  - ours: `pallas_kernels.linear.chunked_linear_attention` with no decay (`pallas_linear`), a
    data-dependent scalar gate per head and step (`pallas_scalar`) and a per-key-dimension GLA gate
    (`pallas_gla`);
  - fla (torch + triton): `chunk_linear_attn` (normalize=False), `chunk_simple_gla` (g [B,T,H]) and
    `chunk_gla` (g [B,T,H,K]) — the matching peers of the three rows above;
  - cuDNN causal softmax attention (`jax.nn.dot_product_attention(implementation="cudnn")`);
  - beyond the issue's list: our gated delta rule (`pallas_delta`, forward and backward kernels)
    vs fla's `chunk_gated_delta_rule`, with L2-normalised keys, sigmoid beta, the scalar gate.
Modes: `fwd` (output and final state) and `fwd+bwd` (gradients of sum(o * w) w.r.t. q, k, v and
the gate). Gates are prepared outside the timed region like fla's benchmark:
logsigmoid(x) / 16 for GLA, logsigmoid(x) for the scalar gate. Time: median of `--repeats` timed
calls after `--warmup` calls (JAX: wall time to `block_until_ready`; torch: CUDA events). Writes
`<out>.json` and `<out>.md` with the device, versions, shapes, date and the exact command.

On the GPU machine (see ../shared/gpu/prepare_wheels.sh for fla-core):
  python -m experiments.bench_linear_kernel --out=benchmarks/linear_kernel_h100
A CPU smoke run (interpret mode, our kernel only; numbers meaningless, do not commit them):
  python -m experiments.bench_linear_kernel --impls=pallas_gla --seq_lens=64 --batch=1 \
      --heads=1 --head_dim=16 --repeats=1 --warmup=0 --out=/tmp/bench_linear_smoke
"""

from __future__ import annotations

import json
import statistics

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench_common as common
from pallas_kernels.linear import BlockSizes, chunked_linear_attention
from pallas_kernels.linear.delta import chunked_delta_rule

ALL_IMPLS = ["pallas_linear", "pallas_scalar", "pallas_gla", "fla_chunk_linear_attn",
             "fla_chunk_simple_gla", "fla_chunk_gla", "cudnn_softmax", "pallas_delta",
             "fla_chunk_gated_delta_rule"]
GATE_OF = {"pallas_linear": None, "pallas_scalar": "scalar", "pallas_gla": "vector",
           "fla_chunk_linear_attn": None, "fla_chunk_simple_gla": "scalar",
           "fla_chunk_gla": "vector", "cudnn_softmax": None, "pallas_delta": "scalar",
           "fla_chunk_gated_delta_rule": "scalar"}
DELTA_IMPLS = ("pallas_delta", "fla_chunk_gated_delta_rule")

_SEQ_LENS = flags.DEFINE_list("seq_lens", ["2048", "4096", "8192", "16384"], "Sequence lengths.")
_IMPLS = flags.DEFINE_list("impls", ALL_IMPLS, f"Subset of {ALL_IMPLS}.")
_MODES = flags.DEFINE_list("modes", ["fwd", "fwd+bwd"], "fwd and/or fwd+bwd.")
_BATCH = flags.DEFINE_integer("batch", 4, "B.")
_HEADS = flags.DEFINE_integer("heads", 16, "H.")
_HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Dk = Dv.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float16", "float32"], "Inputs.")
_CHUNK = flags.DEFINE_integer("chunk", 64, "Our chunk size.")
_SUB_CHUNK = flags.DEFINE_integer("sub_chunk", 16, "Our GLA sub-chunk size.")
_BLOCK_V = flags.DEFINE_integer("block_v", 64, "Our value block.")
_NUM_WARPS = flags.DEFINE_integer("num_warps", 4, "Triton num_warps of our kernels.")
_NUM_STAGES = flags.DEFINE_integer("num_stages", 2, "Triton num_stages of our kernels.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed calls before timing.")
_REPEATS = flags.DEFINE_integer("repeats", 20, "Timed calls (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/linear_kernel", "Output path without extension.")


def _inputs(t: int, seed: int = 0):
  """float32 numpy arrays shared by every implementation: q, k, v, w (cotangent), gates, and for
  the delta rule L2-normalised keys and beta = sigmoid(x)."""
  rng = np.random.default_rng(seed)
  b, h, d = _BATCH.value, _HEADS.value, _HEAD_DIM.value
  q, k, v, w = (rng.standard_normal((b, t, h, d), np.float32) for _ in range(4))
  logsig = lambda x: -np.logaddexp(0.0, -x)
  g_scalar = logsig(rng.standard_normal((b, t, h)).astype(np.float32))
  g_vector = (logsig(rng.standard_normal((b, t, h, d))) / 16.0).astype(np.float32)
  k_l2 = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = (1.0 / (1.0 + np.exp(-rng.standard_normal((b, t, h))))).astype(np.float32)
  return dict(q=q, k=k, v=v, w=w, scalar=g_scalar, vector=g_vector, k_l2=k_l2, beta=beta)


# --------------------------------------------------------------------------------------- JAX side


def _jax_fns(impl: str, data: dict):
  dtype = jnp.dtype(_DTYPE.value)
  q, k, v, w = (jnp.asarray(data[n], dtype) for n in ("q", "k", "v", "w"))
  gate = GATE_OF[impl]
  g = None if gate is None else jnp.asarray(data[gate])
  if impl == "pallas_delta":
    k, beta = jnp.asarray(data["k_l2"], dtype), jnp.asarray(data["beta"])

    def fwd(q, k, v, g, beta):
      return chunked_delta_rule(q, k, v, beta, log_decay=g, output_final_state=True,
                                chunk_size=_CHUNK.value)

    def loss(q, k, v, g, beta):
      return jnp.sum(fwd(q, k, v, g, beta)[0].astype(jnp.float32) * w.astype(jnp.float32))

    fns = {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(jax.grad(loss, (0, 1, 2, 3, 4)))}
    return fns, (q, k, v, g, beta)
  if impl == "cudnn_softmax":
    def fwd(q, k, v, g):
      del g
      return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
  else:
    sizes = BlockSizes(chunk=_CHUNK.value, sub_chunk=_SUB_CHUNK.value, block_v=_BLOCK_V.value,
                       num_warps=_NUM_WARPS.value, num_stages=_NUM_STAGES.value)

    def fwd(q, k, v, g):
      return chunked_linear_attention(q, k, v, log_decay=g, output_final_state=True,
                                      block_sizes=sizes)

  def loss(q, k, v, g):
    out = fwd(q, k, v, g)
    o = out[0] if isinstance(out, tuple) else out
    return jnp.sum(o.astype(jnp.float32) * w.astype(jnp.float32))

  argnums = (0, 1, 2) if g is None else (0, 1, 2, 3)
  fns = {"fwd": jax.jit(fwd), "fwd+bwd": jax.jit(jax.grad(loss, argnums))}
  return fns, (q, k, v, g)


def _time_jax(fn) -> list[float]:
  """Milliseconds of `--repeats` calls `fn()` after `--warmup` untimed ones."""
  return [1e3 * s for s in common.timings(fn, (), _REPEATS.value, warmup=_WARMUP.value)]


# --------------------------------------------------------------------------------------- torch side


def _torch_fns(impl: str, data: dict):
  import torch  # pylint: disable=import-outside-toplevel
  dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16,
           "float32": torch.float32}[_DTYPE.value]
  dev = "cuda"
  delta = impl in DELTA_IMPLS
  names = ("q", "k_l2" if delta else "k", "v", "w")
  q, k, v, w = (torch.from_numpy(data[n]).to(dev, dtype) for n in names)
  gate = GATE_OF[impl]
  g = None if gate is None else torch.from_numpy(data[gate]).to(dev, torch.float32)
  beta = torch.from_numpy(data["beta"]).to(dev, torch.float32) if delta else None
  if impl == "fla_chunk_linear_attn":
    from fla.ops.linear_attn import chunk_linear_attn  # pylint: disable=import-outside-toplevel
    call = lambda q, k, v, g: chunk_linear_attn(q, k, v, normalize=False,
                                                output_final_state=True)
  elif impl == "fla_chunk_simple_gla":
    from fla.ops.simple_gla import chunk_simple_gla  # pylint: disable=import-outside-toplevel
    call = lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g, output_final_state=True)
  elif impl == "fla_chunk_gla":
    from fla.ops.gla import chunk_gla  # pylint: disable=import-outside-toplevel
    call = lambda q, k, v, g: chunk_gla(q, k, v, g, output_final_state=True)
  elif impl == "fla_chunk_gated_delta_rule":
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # pylint: disable=import-outside-toplevel
    call = lambda q, k, v, g: chunk_gated_delta_rule(q, k, v, g=g, beta=beta,
                                                     output_final_state=True)
  else:
    raise ValueError(impl)
  leaves = [x for x in (q, k, v, g, beta) if x is not None]

  def fwd():
    with torch.no_grad():
      return call(q, k, v, g)

  def fwd_bwd():
    for x in leaves:
      x.grad = None
      x.requires_grad_(True)
    o, _ = call(q, k, v, g)
    o.backward(w)
    return o

  return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _time_torch(fn) -> list[float]:
  return common.cuda_event_times_ms(fn, _REPEATS.value, warmup=_WARMUP.value)


# --------------------------------------------------------------------------------------- driver


def _bench(impl: str, t: int, data: dict) -> list[dict]:
  records = []
  try:
    if impl.startswith("fla_"):
      fns = _torch_fns(impl, data)
      timer = _time_torch
    else:
      jfns, args = _jax_fns(impl, data)
      fns = {m: (lambda f=f: f(*args)) for m, f in jfns.items()}
      timer = _time_jax
  except Exception as e:  # pylint: disable=broad-except
    return [{"impl": impl, "T": t, "mode": m, "status": f"setup failed: {type(e).__name__}: "
             f"{str(e)[:300]}"} for m in _MODES.value]
  for mode in _MODES.value:
    rec = {"impl": impl, "T": t, "mode": mode}
    try:
      times = timer(fns[mode])
      rec.update(status="ok", median_ms=round(statistics.median(times), 4),
                 min_ms=round(min(times), 4), repeats=len(times),
                 tokens_per_ms=round(_BATCH.value * t / statistics.median(times), 1))
    except Exception as e:  # pylint: disable=broad-except
      rec["status"] = f"failed: {type(e).__name__}: {str(e)[:300]}"
    records.append(rec)
    print(json.dumps(rec), flush=True)
  return records


def _environment() -> dict:
  return common.environment(
      optional=("torch", "triton", "fla"),
      shape={"B": _BATCH.value, "H": _HEADS.value, "D": _HEAD_DIM.value},
      dtype=_DTYPE.value, causal=True,
      ours={"chunk": _CHUNK.value, "sub_chunk": _SUB_CHUNK.value, "block_v": _BLOCK_V.value,
            "num_warps": _NUM_WARPS.value, "num_stages": _NUM_STAGES.value},
      warmup=_WARMUP.value, repeats=_REPEATS.value)


PEERS = {"pallas_linear": "fla_chunk_linear_attn", "pallas_scalar": "fla_chunk_simple_gla",
         "pallas_gla": "fla_chunk_gla", "pallas_delta": "fla_chunk_gated_delta_rule"}


def _markdown(env: dict, records: list[dict]) -> str:
  lines = [
      f"# Chunked linear attention: ours vs fla vs cuDNN softmax ({env['device']})", "",
      f"- date (UTC): {env['date_utc']}", f"- command: `{env['command']}`",
      f"- versions: {common.version_summary(env, ('jax', 'torch', 'triton', 'fla', 'python'))}",
      f"- shape: B={env['shape']['B']}, H={env['shape']['H']}, Dk=Dv={env['shape']['D']}, "
      f"{env['dtype']}, causal; ours: {env['ours']}",
      f"- time: median of {env['repeats']} calls after {env['warmup']} warm-up calls, ms; "
      "`vs fla` = fla time / our time (> 1: we are faster)", "",
      "| T | impl | fwd ms | fwd+bwd ms | fwd vs fla | fwd+bwd vs fla | note |",
      "|---:|---|---:|---:|---:|---:|---|",
  ]
  by = {(r["T"], r["impl"], r["mode"]): r for r in records}
  for t in sorted({r["T"] for r in records}):
    for impl in dict.fromkeys(r["impl"] for r in records):
      cells, ratios, notes = [], [], []
      for mode in ("fwd", "fwd+bwd"):
        r = by.get((t, impl, mode), {})
        cells.append(str(r.get("median_ms", "")))
        peer = by.get((t, PEERS.get(impl), mode), {})
        ratio = ""
        if r.get("median_ms") and peer.get("median_ms"):
          ratio = f"{peer['median_ms'] / r['median_ms']:.2f}"
        ratios.append(ratio)
        if r and r.get("status") != "ok":
          notes.append(f"{mode}: {r['status'][:120]}")
      lines.append(f"| {t} | {impl} | {cells[0]} | {cells[1]} | {ratios[0]} | {ratios[1]} | "
                   f"{'; '.join(notes)} |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  unknown = set(_IMPLS.value) - set(ALL_IMPLS)
  if unknown:
    raise ValueError(f"--impls: unknown {sorted(unknown)}; choose from {ALL_IMPLS}")
  env = _environment()
  records = []
  for t in (int(x) for x in _SEQ_LENS.value):
    data = _inputs(t)
    for impl in _IMPLS.value:
      records.extend(_bench(impl, t, data))
      # After every case, so a run cut short by a time limit keeps what it measured.
      common.write_results(_OUT.value, env, records, _markdown)
  print(common.write_results(_OUT.value, env, records, _markdown))


if __name__ == "__main__":
  app.run(main)
