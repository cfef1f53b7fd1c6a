"""Local Hugging Face checkpoints into `DecoderLM` / `ViT` (`attnjax.models.hf_import`).

The oracle is the reference library itself: `tests/fixtures/hf/make_fixtures.py` saved tiny random
llama, llama3 (Llama 3 RoPE scaling), qwen2, qwen3 (QK-norm), mistral, vit and deit models with transformers 5.24.0 / torch 2.13.0 (eager
attention) and their float32 logits on fixed inputs; here the imported models must reproduce those
logits to 1e-4 (absolute and relative; the logits are O(1-10), the float32 gap seen is ~5e-6).
The safetensors files written below are built byte by byte from the format's description
(huggingface/safetensors, README "Format"), independently of the reader.
"""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from attnjax.analysis import capture as cap
from attnjax.models import DecoderLM, ViT
from attnjax.models.hf_import import (CheckpointError, load_llama, load_pretrained, load_vit,
                                      read_safetensors)
from attnjax.ops.rope import apply_rope

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "hf")
NAMES = ("llama", "llama3", "qwen2", "qwen3", "mistral", "vit", "deit")
_call = nnx.jit(lambda m, x: m(x))
_capture = nnx.jit(lambda m, x: cap.run(m, x))


@functools.lru_cache(maxsize=None)
def _model(name, dtype=jnp.float32):
  return load_pretrained(os.path.join(FIXTURES, name), dtype=dtype)


def _inputs(name):
  ref = np.load(os.path.join(FIXTURES, f"{name}.npz"))
  if "input_ids" in ref:
    return jnp.asarray(ref["input_ids"], jnp.int32), ref["logits"]
  return jnp.asarray(ref["pixel_values"].transpose(0, 2, 3, 1)), ref["logits"]  # NCHW -> NHWC


def _write_safetensors(path, tensors, *, dtype_tag=None, header_extra=None):
  """`{name: array}` -> a safetensors file: u64 LE header size, JSON header, concatenated bytes."""
  tags = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
          np.dtype("<i8"): "I64"}
  header, blobs, offset = {"__metadata__": {"format": "np"}}, [], 0
  for name, arr in tensors.items():
    raw = np.ascontiguousarray(arr).tobytes()
    header[name] = {"dtype": dtype_tag or tags[arr.dtype], "shape": list(arr.shape),
                    "data_offsets": [offset, offset + len(raw)]}
    blobs.append(raw)
    offset += len(raw)
  header.update(header_extra or {})
  text = json.dumps(header).encode()
  text += b" " * (-len(text) % 8)
  with open(path, "wb") as f:
    f.write(len(text).to_bytes(8, "little") + text + b"".join(blobs))


@pytest.mark.parametrize("name", NAMES)
def test_fixture_logits_match_reference(name):
  """mistral and deit run under attention capture (one compile serves both checks): the captured
  weights are probabilities that obey the mask (causal, the last 4 keys including the query)."""
  model = _model(name)
  assert isinstance(model, ViT if name in ("vit", "deit") else DecoderLM)
  x, want = _inputs(name)
  if name not in ("mistral", "deit"):
    np.testing.assert_allclose(np.asarray(_call(model, x)), want, atol=1e-4, rtol=1e-4)
    return
  with cap.capturing(model, ("weights",)):
    out, inter = _capture(model, x)
  np.testing.assert_allclose(np.asarray(out), want, atol=1e-4, rtol=1e-4)
  w = np.asarray(cap.stack(inter, "weights"))                       # [L, B, H, T, T]
  t = w.shape[-1]
  assert w.shape == (2, x.shape[0], 4, t, t)
  np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)
  if name == "mistral":
    i, j = np.arange(t)[:, None], np.arange(t)[None]
    assert np.all(w[..., (j > i) | (j <= i - 4)] == 0)
    assert np.all(w[..., (j <= i) & (j > i - 4)] > 0)


def test_decode_matches_reference():
  """Token-by-token decoding with the KV cache (one compile) gives the llama3 reference logits
  (the rescaled RoPE frequencies must reach the decode path too)."""
  model = load_pretrained(os.path.join(FIXTURES, "llama3"))        # fresh: init_cache mutates it
  x, want = _inputs("llama3")
  model.init_cache(batch_size=x.shape[0], max_len=12)
  step = nnx.jit(lambda m, t: m(t, decode=True))
  got = [step(model, x[:, i:i + 1]) for i in range(x.shape[1])]
  np.testing.assert_allclose(np.concatenate(got, axis=1), want, atol=1e-4, rtol=1e-4)


def test_loaders_keep_config_details():
  """The details the fixtures exercise landed where they should (sharded llama, tied qwen2)."""
  llama, qwen, mistral, deit = (_model(n) for n in ("llama", "qwen2", "mistral", "deit"))
  assert len(os.listdir(os.path.join(FIXTURES, "llama"))) > 4      # several shards + index
  att = llama.blocks[0].mixer
  assert (att.num_heads, att.num_kv_heads, att.rope_base) == (4, 2, 500.0)
  assert llama.blocks[0].norm1.eps == 0.02 and llama.head is not None
  assert qwen.head is None and qwen.blocks[1].mixer.q_proj.bias is not None
  assert qwen.blocks[1].mixer.o_proj.bias is None
  assert mistral.blocks[0].mixer.window == 3                        # sliding_window=4 keys incl. self
  assert deit.dist is not None and deit.pos.shape == (16 + 2, 32)


def test_qwen2_sliding_layers_follow_layer_types(tmp_path):
  """qwen2 with use_sliding_window: layer_types picks the sliding layers; window counts the query."""
  d = _copy(tmp_path, "qwen2")
  _edit_config(d, use_sliding_window=True, sliding_window=3,
               layer_types=["full_attention", "sliding_attention"])
  model = load_pretrained(d)
  assert [blk.mixer.window for blk in model.blocks] == [None, 2]
  _edit_config(d, use_sliding_window=False)
  assert [blk.mixer.window for blk in load_pretrained(d).blocks] == [None, None]


def test_bf16_load_runs(tmp_path):
  """A checkpoint stored in BF16 (as most released ones are), loaded with bf16 parameters."""
  d = _copy(tmp_path, "qwen2")
  tensors = read_safetensors(d / "model.safetensors")
  _write_safetensors(d / "model.safetensors",
                     {k: np.asarray(v).astype(ml_dtypes.bfloat16) for k, v in tensors.items()})
  assert {v.dtype for v in read_safetensors(d / "model.safetensors").values()} == {
      np.dtype(ml_dtypes.bfloat16)}
  model = load_pretrained(d, dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.bfloat16 for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
  x, want = _inputs("qwen2")
  got = np.asarray(_call(model, x).astype(jnp.float32))
  assert np.all(np.isfinite(got))
  assert np.max(np.abs(got - want)) < 0.05 * np.max(np.abs(want))


def test_read_safetensors_dtypes(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32),
            "b": rng.standard_normal((4,)).astype(np.float16),
            "c": rng.standard_normal((2, 1, 3)).astype(ml_dtypes.bfloat16),
            "d": np.arange(6, dtype=np.int64).reshape(2, 3), "e": np.zeros((0, 2), np.float32)}
  _write_safetensors(tmp_path / "t.safetensors", arrays)
  got = read_safetensors(tmp_path / "t.safetensors")
  assert sorted(got) == sorted(arrays)
  for k, v in arrays.items():
    assert got[k].dtype == v.dtype and got[k].shape == v.shape
    np.testing.assert_array_equal(got[k].astype(np.float64), v.astype(np.float64))


def _copy(tmp_path, name):
  dst = tmp_path / f"{name}{len(os.listdir(tmp_path))}"
  shutil.copytree(os.path.join(FIXTURES, name), dst)
  return dst


def _edit_config(directory, **changes):
  cfg = json.loads((directory / "config.json").read_text())
  cfg.update(changes)
  (directory / "config.json").write_text(json.dumps(cfg))


def test_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match="checkpoint directory not found: .*nowhere"):
    load_pretrained(tmp_path / "nowhere")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no config.json in .*empty"):
    load_pretrained(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="safetensors file not found: .*x.safetensors"):
    read_safetensors(tmp_path / "x.safetensors")

  d = _copy(tmp_path, "vit")
  _edit_config(d, model_type="gpt2")
  with pytest.raises(CheckpointError, match=r"model_type 'gpt2' is not supported; supported: "
                     r"\['deit', 'llama', 'mistral', 'qwen2', 'qwen3', 'vit'\]"):
    load_pretrained(d)
  with pytest.raises(CheckpointError, match="load_vit takes model_type"):
    load_vit(d)

  d = _copy(tmp_path, "qwen2")
  os.remove(d / "model.safetensors")
  (d / "pytorch_model.bin").write_bytes(b"")
  with pytest.raises(FileNotFoundError, match=r"no model.safetensors .*found \['pytorch_model.bin'\]"):
    load_llama(d)

  d = _copy(tmp_path, "qwen2")
  _edit_config(d, intermediate_size=65)
  with pytest.raises(CheckpointError, match=r"tensor 'model.layers.0.mlp.gate_proj.weight' has shape "
                     r"\[64, 32\], expected \[65, 32\]"):
    load_pretrained(d)

  d = _copy(tmp_path, "qwen2")
  tensors = {k: np.array(v) for k, v in read_safetensors(d / "model.safetensors").items()}
  tensors["model.layers.1.self_attn.o_proj.bias"] = np.zeros(32, np.float32)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(4, np.float32)
  _write_safetensors(d / "model.safetensors", tensors)
  with pytest.warns(UserWarning, match=r"1 checkpoint tensors are not used by the model: "
                    r"\['model.layers.1.self_attn.o_proj.bias'\]"):
    load_pretrained(d)
  del tensors["model.layers.1.self_attn.k_proj.bias"]
  _write_safetensors(d / "model.safetensors", tensors)
  with pytest.raises(CheckpointError, match=r"missing tensor 'model.layers.1.self_attn.k_proj.bias' "
                     r"\(expected shape \[8\]\)"):
    load_pretrained(d)

  d = _copy(tmp_path, "llama3")
  _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0})
  with pytest.raises(CheckpointError, match=r"rope_type 'yarn' is not supported; supported: "
                     r"\('default', 'llama3'\)"):
    load_pretrained(d)
  with pytest.raises(ValueError, match=r"inv_freq must have shape \[rotary_dim // 2\]=\(4,\)"):
    apply_rope(jnp.zeros((1, 3, 2, 8)), jnp.arange(3), inv_freq=jnp.ones(3))

  _write_safetensors(tmp_path / "f8.safetensors", {"w": np.zeros((2,), np.float32)}, dtype_tag="F4")
  with pytest.raises(CheckpointError, match=r"tensor 'w' has unknown dtype 'F4'; supported: \["):
    read_safetensors(tmp_path / "f8.safetensors")
  _write_safetensors(tmp_path / "bad.safetensors", {"w": np.zeros((2,), np.float32)},
                     header_extra={"v": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})
  with pytest.raises(CheckpointError, match=r"tensor 'v' \(F32 \[3\]\) needs 12 bytes"):
    read_safetensors(tmp_path / "bad.safetensors")
