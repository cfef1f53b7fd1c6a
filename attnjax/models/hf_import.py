"""Pretrained Hugging Face checkpoints from a local directory, into `DecoderLM` and `ViT`.

A directory in the `save_pretrained` layout: `config.json` plus `model.safetensors`, or shards
listed by `model.safetensors.index.json` (`{"weight_map": {tensor name: file name}}`). Nothing is
downloaded and neither torch nor transformers is needed: `read_safetensors` parses the format
with numpy (an 8-byte little-endian header length, a JSON header `{name: {"dtype", "shape",
"data_offsets": [begin, end]}}`, then the raw little-endian bytes; offsets count from the end of
the header) and memory-maps the file, so a tensor is read only when it is converted.

```python
from attnjax.models.hf_import import load_pretrained
lm = load_pretrained("/path/to/Qwen2.5-0.5B")             # model_type llama | qwen2 | qwen3 | mistral
logits = lm(tokens)                                         # [B, T, vocab], tokens [B, T] int32
vit = load_pretrained("/path/to/vit-base-patch16-224")    # model_type vit | deit
logits = vit(images)                                        # [B, num_labels], images [B, H, W, C]
```
The model is built abstractly (`nnx.eval_shape`) and its parameters are filled from the
checkpoint, so no random initialisation is spent on a large model. Every parameter of the built
model must come from the checkpoint (a missing tensor is an error naming its key); checkpoint
tensors the architecture does not use (a pooler, a duplicate tied head) are ignored with a
warning naming them (an old `rotary_emb.inv_freq` buffer silently).

Inputs follow the project's conventions, not the library's: `ViT` takes channels-last images
`[B, H, W, C]` (transpose `pixel_values [B, C, H, W]` with `(0, 2, 3, 1)`), already normalised
as the checkpoint's image processor would.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from attnjax.models.decoder import DecoderLM
from attnjax.models.vit import ViT


class CheckpointError(ValueError):
  """A checkpoint directory or file that cannot be loaded (the message says which part and why)."""


# safetensors dtype tag -> numpy dtype (little-endian).
SAFETENSORS_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """All tensors of one `.safetensors` file, `{name: array}` (read-only memory-mapped views).

  Arrays keep the stored dtype (`F32/F16/BF16/...`; bf16 and fp8 as `ml_dtypes` types) and shape.
  Raises `FileNotFoundError` for a missing file and `CheckpointError` for a malformed header, an
  unknown dtype, or offsets that disagree with the shape.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file not found: {path}")
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise CheckpointError(f"{path}: too short for a safetensors file ({size} bytes)")
    n = int.from_bytes(head, "little")
    if n > size - 8:
      raise CheckpointError(f"{path}: header length {n} exceeds the file size {size}")
    try:
      header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise CheckpointError(f"{path}: header is not valid JSON ({e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path}: header must be a JSON object, got {type(header).__name__}")
  data_start = 8 + n
  buf = np.memmap(path, dtype=np.uint8, mode="r") if size > data_start else np.zeros(0, np.uint8)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      tag, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError):
      raise CheckpointError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets, "
                            f"got {info!r}") from None
    if tag not in SAFETENSORS_DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {tag!r}; supported: "
                            f"{sorted(SAFETENSORS_DTYPES)}")
    dt = SAFETENSORS_DTYPES[tag]
    want = math.prod(shape) * dt.itemsize
    if end - begin != want or begin < 0 or data_start + end > size:
      raise CheckpointError(f"{path}: tensor {name!r} ({tag} {list(shape)}) needs {want} bytes, "
                            f"data_offsets [{begin}, {end}] give {end - begin} (file {size} bytes)")
    out[name] = buf[data_start + begin:data_start + end].view(dt).reshape(shape)
  return out


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`(config, tensors)` of a `save_pretrained` directory: `config.json` and every safetensors file.

  Shards come from `model.safetensors.index.json`'s `weight_map` when present, else the single
  `model.safetensors`.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"checkpoint directory not found: {directory}")
  cfg_path = os.path.join(directory, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(cfg_path) as f:
    config = json.load(f)
  index = os.path.join(directory, "model.safetensors.index.json")
  single = os.path.join(directory, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
    if not isinstance(weight_map, dict):
      raise CheckpointError(f"{index}: needs a 'weight_map' object {{tensor name: file name}}")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(single):
    files = ["model.safetensors"]
  else:
    others = sorted(f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".h5")))
    hint = f" (found {others}: only safetensors is read; re-save with safe_serialization=True)" \
        if others else ""
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}{hint}")
  tensors: dict[str, np.ndarray] = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(directory, name)))
  return config, tensors


# --- filling a built model's parameters -----------------------------------------------------------

def _linear(w: np.ndarray) -> np.ndarray:
  """torch `Linear.weight [out, in]` -> nnx kernel `[in, out]`."""
  return w.T


def _same(w: np.ndarray) -> np.ndarray:
  return w


class _Filler:
  """Collects `(parameter path, checkpoint key, expected checkpoint shape, transform)` entries,
  checks each tensor's presence and shape, and returns the filled model."""

  def __init__(self, tensors: Mapping[str, np.ndarray], source: str, dtype):
    self.tensors, self.source, self.dtype = tensors, source, np.dtype(dtype)
    self.values: dict[tuple, np.ndarray] = {}
    self.used: set[str] = set()

  def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
    if key not in self.tensors:
      raise CheckpointError(f"{self.source}: missing tensor {key!r} (expected shape {list(shape)})")
    t = self.tensors[key]
    self.used.add(key)
    if tuple(t.shape) != tuple(shape):
      raise CheckpointError(f"{self.source}: tensor {key!r} has shape {list(t.shape)}, expected "
                            f"{list(shape)} from config.json")
    return t

  def put(self, path: str, key: str, shape: tuple[int, ...], fn: Callable = _same) -> None:
    arr = fn(np.asarray(self.get(key, shape)))
    self.values[tuple(int(p) if p.isdigit() else p for p in path.split("."))] = arr

  def linear(self, path: str, key: str, d_in: int, d_out: int, bias: bool) -> None:
    """`key.weight [d_out, d_in]` (and `key.bias [d_out]`) -> `path.kernel [d_in, d_out]`, `path.bias`."""
    self.put(f"{path}.kernel", f"{key}.weight", (d_out, d_in), _linear)
    if bias:
      self.put(f"{path}.bias", f"{key}.bias", (d_out,))

  def build(self, make: Callable[[], nnx.Module]) -> nnx.Module:
    unused = sorted(k for k in set(self.tensors) - self.used if not k.endswith("rotary_emb.inv_freq"))
    if unused:  # often harmless (a duplicate tied head, a pooler), but worth a look: a config flag
      warnings.warn(f"{self.source}: {len(unused)} checkpoint tensors are not used by the model: "
                    f"{unused[:6]}{' ...' if len(unused) > 6 else ''}", stacklevel=3)
    abstract = nnx.eval_shape(make)
    graphdef, state = nnx.split(abstract)
    flat = list(nnx.to_flat_state(state))
    missing = [p for p, _ in flat if tuple(p) not in self.values]
    if missing:  # a mapping that forgot a parameter: a bug here, not in the checkpoint
      raise RuntimeError(f"hf_import: no checkpoint tensor mapped to parameters {missing[:8]}")
    for path, var in flat:
      arr = self.values[tuple(path)]
      want = var.get_value()
      if arr.shape != want.shape:
        raise RuntimeError(f"hf_import: parameter {path} has shape {want.shape}, mapped {arr.shape}")
      var.set_value(jnp.asarray(arr.astype(self.dtype)))
    return nnx.merge(graphdef, state)


def _need(config: Mapping[str, Any], key: str, source: str):
  if config.get(key) is None:
    raise CheckpointError(f"{source}: config.json has no {key!r}")
  return config[key]


# --- Llama family -------------------------------------------------------------------------------

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "llama3")


def _rope(config: Mapping[str, Any], head_dim: int, source: str) -> tuple[float, tuple | None]:
  """`(theta, inv_freq)`: `rope_theta` (transformers < 5: top level and `rope_scaling`; 5:
  `rope_parameters`) and, for a rescaled RoPE, its `[head_dim // 2]` inverse frequencies.

  `rope_type` `"default"`: `theta ** (-2i / head_dim)` (inv_freq None); `"llama3"` (the
  frequency-dependent rule of meta-llama's reference `apply_scaling`): wavelengths
  `2 pi / f` shorter than `original_max_position_embeddings / high_freq_factor` are kept, longer
  than `... / low_freq_factor` divided by `factor`, and in between interpolated with
  `s = (original / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)` as
  `(1 - s) f / factor + s f`.
  """
  params = dict(config.get("rope_scaling") or {})
  params.update(config.get("rope_parameters") or {})
  kind = params.get("rope_type", params.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise CheckpointError(f"{source}: rope_type {kind!r} is not supported; supported: {ROPE_TYPES}")
  if params.get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)) != 1.0:
    raise CheckpointError(f"{source}: partial_rotary_factor != 1 is not supported")
  theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
  if kind == "default":
    return theta, None
  # float32 throughout, as the reference computes its frequencies.
  f = (theta ** (-np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim))).astype(np.float32)
  factor = np.float32(params["factor"])
  low, high = np.float32(params["low_freq_factor"]), np.float32(params["high_freq_factor"])
  old = np.float32(params["original_max_position_embeddings"])
  wavelen = np.float32(2 * np.pi) / f
  smooth = (old / wavelen - low) / (high - low)
  mid = (1 - smooth) * f / factor + smooth * f
  out = np.where(wavelen < old / high, f, np.where(wavelen > old / low, f / factor, mid))
  return theta, tuple(out.astype(np.float32))


def _sliding_layers(config: Mapping[str, Any], n_layers: int, source: str) -> list[int | None]:
  """Per layer: `None` (full causal attention) or the sliding window in keys including the query."""
  window = config.get("sliding_window")
  types = config.get("layer_types")
  if config.get("model_type") in ("qwen2", "qwen3"):
    if not config.get("use_sliding_window"):
      return [None] * n_layers
    if types is None:
      raise CheckpointError(f"{source}: use_sliding_window without layer_types is not supported")
  if window is None:
    return [None] * n_layers
  if types is None:
    return [int(window)] * n_layers
  if len(types) != n_layers or set(types) - {"full_attention", "sliding_attention"}:
    raise CheckpointError(f"{source}: layer_types must be {n_layers} of 'full_attention' / "
                          f"'sliding_attention', got {types}")
  return [int(window) if t == "sliding_attention" else None for t in types]


def load_llama(path: str | os.PathLike, *, dtype=jnp.float32) -> DecoderLM:
  """A Llama / Mistral / Qwen2 / Qwen3 causal LM directory -> `DecoderLM` (`tokens [B, T] -> [B, T, vocab]`).

  config.json: `vocab_size`, `hidden_size` (D), `num_hidden_layers`, `num_attention_heads` (H),
  `num_key_value_heads` (Hk, GQA), `head_dim` (default D / H), `intermediate_size` (SwiGLU
  width), `rms_norm_eps`, `rope_theta` / `rope_parameters` / `rope_scaling` (rotate-half RoPE;
  `rope_type` default or llama3, see `_rope`),
  `tie_word_embeddings`, `hidden_act` (`silu`), `attention_bias` (llama: bias on q, k, v, o),
  qwen2 always has q/k/v biases, qwen3 has QK-norm (RMSNorm over head_dim on q and k before RoPE,
  `self_attn.{q,k}_norm.weight [hd]` -> `blocks[i].mixer.{q,k}_norm.scale`) and `attention_bias`
  on q, k, v, o, `sliding_window` (mistral; qwen2 / qwen3 with `use_sliding_window`,
  per `layer_types`): a key is seen when `q - window < k <= q` (our `window` is one less: keys
  before the query).

  Tensors (`Linear.weight [out, in]` is transposed into the kernel `[in, out]`):
  `model.embed_tokens.weight [V, D]` -> `embed.embedding`;
  `model.layers.{i}.input_layernorm.weight [D]` -> `blocks[i].norm1.scale`;
  `model.layers.{i}.self_attn.{q,k,v,o}_proj.{weight,bias}` -> `blocks[i].mixer.{q,k,v,o}_proj`
  (`q [H*hd, D]`, `k, v [Hk*hd, D]`, `o [D, H*hd]`);
  `model.layers.{i}.post_attention_layernorm.weight` -> `blocks[i].norm2.scale`;
  `model.layers.{i}.mlp.{gate,up,down}_proj.weight` -> `blocks[i].mlp.{gate,up,down}`
  (`[I, D], [I, D], [D, I]`); `model.norm.weight` -> `final_norm.scale`;
  `lm_head.weight [V, D]` -> `head` (absent when `tie_word_embeddings`: logits use the embedding).
  """
  source = os.fspath(path)
  config, tensors = read_checkpoint(source)
  kind = config.get("model_type")
  if kind not in LLAMA_TYPES:
    raise CheckpointError(f"{source}: load_llama takes model_type {LLAMA_TYPES}, got {kind!r}")
  c = lambda key: _need(config, key, source)
  vocab, d, n_layers, h = c("vocab_size"), c("hidden_size"), c("num_hidden_layers"), c("num_attention_heads")
  hk = config.get("num_key_value_heads") or h
  hd = config.get("head_dim") or d // h
  inter = c("intermediate_size")
  if config.get("hidden_act", "silu") != "silu":
    raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (silu only)")
  if config.get("mlp_bias"):
    raise CheckpointError(f"{source}: mlp_bias=true is not supported")
  theta, inv_freq = _rope(config, hd, source)
  eps = float(config.get("rms_norm_eps", 1e-6))
  # An older config.json leaves tie_word_embeddings out when it equals the library's default.
  tie = bool(config.get("tie_word_embeddings", "lm_head.weight" not in tensors))
  qkv_bias = kind == "qwen2" or bool(config.get("attention_bias"))
  out_bias = kind in ("llama", "qwen3") and bool(config.get("attention_bias"))
  qk_norm = kind == "qwen3"
  windows = _sliding_layers(config, n_layers, source)
  mixers = ["softmax" if w is None else "sliding_window" for w in windows]
  base = dict(num_kv_heads=hk, head_dim=hd, rope_base=theta, rope_inv_freq=inv_freq,
              qkv_bias=qkv_bias, out_bias=out_bias)
  if qk_norm:
    base.update(qk_norm=True, qk_norm_eps=eps)
  options = [dict(base) if w is None else dict(base, window=w - 1) for w in windows]

  fill = _Filler(tensors, source, dtype)
  fill.put("embed.embedding", "model.embed_tokens.weight", (vocab, d))
  for i in range(n_layers):
    pre, blk = f"model.layers.{i}", f"blocks.{i}"
    fill.put(f"{blk}.norm1.scale", f"{pre}.input_layernorm.weight", (d,))
    fill.put(f"{blk}.norm2.scale", f"{pre}.post_attention_layernorm.weight", (d,))
    for name, d_out in (("q", h * hd), ("k", hk * hd), ("v", hk * hd)):
      fill.linear(f"{blk}.mixer.{name}_proj", f"{pre}.self_attn.{name}_proj", d, d_out, qkv_bias)
    fill.linear(f"{blk}.mixer.o_proj", f"{pre}.self_attn.o_proj", h * hd, d, out_bias)
    if qk_norm:
      fill.put(f"{blk}.mixer.q_norm.scale", f"{pre}.self_attn.q_norm.weight", (hd,))
      fill.put(f"{blk}.mixer.k_norm.scale", f"{pre}.self_attn.k_norm.weight", (hd,))
    for name, d_in, d_out in (("gate", d, inter), ("up", d, inter), ("down", inter, d)):
      fill.linear(f"{blk}.mlp.{name}", f"{pre}.mlp.{name}_proj", d_in, d_out, False)
  fill.put("final_norm.scale", "model.norm.weight", (d,))
  if not tie:
    fill.linear("head", "lm_head", d, vocab, False)
  return fill.build(lambda: DecoderLM(
      vocab_size=vocab, d_model=d, num_layers=n_layers, num_heads=h, mixer=mixers,
      mixer_options=options, mlp_hidden=inter, norm_eps=eps, tie_embeddings=tie,
      max_len=int(config.get("max_position_embeddings", 2048)), rngs=nnx.Rngs(0)))


# --- ViT / DeiT ---------------------------------------------------------------------------------

VIT_TYPES = ("deit", "vit")
_VIT_ARCHITECTURES = ("ViTForImageClassification", "DeiTForImageClassificationWithTeacher")


def load_vit(path: str | os.PathLike, *, dtype=jnp.float32) -> ViT:
  """A ViT / DeiT image classifier directory -> `ViT` (`images [B, H, W, C] -> [B, num_labels]`).

  Architectures: `ViTForImageClassification` (class-token head) and
  `DeiTForImageClassificationWithTeacher` (class and distillation tokens, logits the mean of the two
  heads). config.json: `hidden_size` (D), `num_hidden_layers`, `num_attention_heads`,
  `intermediate_size` (GELU MLP width), `hidden_act` (`gelu`: exact erf), `layer_norm_eps`,
  `image_size`, `patch_size` (p), `num_channels` (C), `qkv_bias`. `num_labels` is read from the
  classifier's shape.

  Tensors (prefix `vit.` or `deit.`; `Linear.weight [out, in]` transposed):
  `embeddings.patch_embeddings.projection.weight [D, C, p, p]` -> `patch.kernel [p*p*C, D]` (rows
  ordered `(row, col, channel)` as `ViT.patchify`), `.bias [D]` -> `patch.bias`;
  `embeddings.cls_token [1, 1, D]` -> `cls`; `embeddings.distillation_token` -> `dist`;
  `embeddings.position_embeddings [1, N, D]` -> `pos [N, D]`;
  `encoder.layer.{i}.layernorm_before.{weight,bias}` -> `blocks[i].norm1.{scale,bias}`;
  `encoder.layer.{i}.attention.attention.{query,key,value}` -> `blocks[i].mixer.{q,k,v}_proj`;
  `encoder.layer.{i}.attention.output.dense` -> `blocks[i].mixer.o_proj`;
  `encoder.layer.{i}.layernorm_after` -> `blocks[i].norm2`;
  `encoder.layer.{i}.intermediate.dense` / `output.dense` -> `blocks[i].mlp.fc1` / `fc2`;
  `layernorm` -> `norm`; `classifier` (ViT) or `cls_classifier` / `distillation_classifier` (DeiT)
  -> `classifier` / `dist_classifier`.
  """
  source = os.fspath(path)
  config, tensors = read_checkpoint(source)
  kind = config.get("model_type")
  if kind not in VIT_TYPES:
    raise CheckpointError(f"{source}: load_vit takes model_type {VIT_TYPES}, got {kind!r}")
  archs = config.get("architectures") or [_VIT_ARCHITECTURES[kind == "deit"]]
  if archs[0] not in _VIT_ARCHITECTURES:
    raise CheckpointError(f"{source}: architecture {archs[0]!r} is not supported; supported: "
                          f"{_VIT_ARCHITECTURES}")
  distill = archs[0] == "DeiTForImageClassificationWithTeacher"
  c = lambda key: _need(config, key, source)
  d, n_layers, h, inter = c("hidden_size"), c("num_hidden_layers"), c("num_attention_heads"), c("intermediate_size")
  image, p, ch = c("image_size"), c("patch_size"), config.get("num_channels", 3)
  if config.get("hidden_act", "gelu") != "gelu":
    raise CheckpointError(f"{source}: hidden_act {config['hidden_act']!r} is not supported (gelu only)")
  eps = float(config.get("layer_norm_eps", 1e-12))
  qkv_bias = bool(config.get("qkv_bias", True))
  hw = (image, image) if isinstance(image, int) else tuple(image)
  n_tokens = (hw[0] // p) * (hw[1] // p) + 1 + distill
  head_key = "cls_classifier" if distill else "classifier"
  if f"{head_key}.weight" not in tensors:
    raise CheckpointError(f"{source}: missing tensor {head_key + '.weight'!r} (a {archs[0]} "
                          "checkpoint has a classifier head)")
  n_cls = tensors[f"{head_key}.weight"].shape[0]

  fill = _Filler(tensors, source, dtype)
  pre = f"{kind}."
  emb = pre + "embeddings."
  fill.put("patch.kernel", emb + "patch_embeddings.projection.weight", (d, ch, p, p),
           lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * ch, d))
  fill.put("patch.bias", emb + "patch_embeddings.projection.bias", (d,))
  fill.put("cls", emb + "cls_token", (1, 1, d))
  if distill:
    fill.put("dist", emb + "distillation_token", (1, 1, d))
  fill.put("pos", emb + "position_embeddings", (1, n_tokens, d), lambda w: w[0])
  for i in range(n_layers):
    lay, blk = f"{pre}encoder.layer.{i}", f"blocks.{i}"
    for ours, theirs in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
      fill.put(f"{blk}.{ours}.scale", f"{lay}.{theirs}.weight", (d,))
      fill.put(f"{blk}.{ours}.bias", f"{lay}.{theirs}.bias", (d,))
    for ours, theirs in (("q", "query"), ("k", "key"), ("v", "value")):
      fill.linear(f"{blk}.mixer.{ours}_proj", f"{lay}.attention.attention.{theirs}", d, d, qkv_bias)
    fill.linear(f"{blk}.mixer.o_proj", f"{lay}.attention.output.dense", d, d, True)
    fill.linear(f"{blk}.mlp.fc1", f"{lay}.intermediate.dense", d, inter, True)
    fill.linear(f"{blk}.mlp.fc2", f"{lay}.output.dense", inter, d, True)
  fill.put("norm.scale", pre + "layernorm.weight", (d,))
  fill.put("norm.bias", pre + "layernorm.bias", (d,))
  fill.linear("classifier", head_key, d, n_cls, True)
  if distill:
    fill.linear("dist_classifier", "distillation_classifier", d, n_cls, True)
  return fill.build(lambda: ViT(
      image_size=hw, patch_size=p, num_classes=n_cls, d_model=d, num_layers=n_layers, num_heads=h,
      in_channels=ch, mixer_options={"rope": False, "qkv_bias": qkv_bias, "out_bias": True},
      norm="layernorm", norm_eps=eps, mlp="gelu", mlp_hidden=inter, distill_token=distill,
      rngs=nnx.Rngs(0)))


LOADERS: dict[str, Callable[..., nnx.Module]] = {
    **{k: load_llama for k in LLAMA_TYPES}, **{k: load_vit for k in VIT_TYPES}}


def load_pretrained(path: str | os.PathLike, *, dtype=jnp.float32) -> nnx.Module:
  """The model in a local Hugging Face directory, by its config.json `model_type`.

  `llama`, `mistral`, `qwen2`, `qwen3` -> `DecoderLM` (`load_llama`); `vit`, `deit` -> `ViT` (`load_vit`).
  `dtype` is the parameters' dtype (e.g. `jnp.bfloat16`), whatever the stored one.
  """
  source = os.fspath(path)
  cfg_path = os.path.join(source, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"no config.json in {source}" if os.path.isdir(source)
                            else f"checkpoint directory not found: {source}")
  with open(cfg_path) as f:
    kind = json.load(f).get("model_type")
  if kind not in LOADERS:
    raise CheckpointError(f"{source}: model_type {kind!r} is not supported; supported: {sorted(LOADERS)}")
  return LOADERS[kind](source, dtype=dtype)
