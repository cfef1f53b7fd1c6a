"""LlamaFusion (Shi et al., 2024, arXiv 2412.15188): frozen text modules, trainable image modules.

Oracles from the paper's definition: (1) text-only input through the fused model is the base
text-only LM (its logits, bit for bit: the text path runs the same weights and operations);
(2) a training step (the project's trainer step and optimizer, given the task's labels) leaves every text
parameter bit-identical and moves the image parameters; (3) image tokens change text predictions
only through the shared attention (a text token before every image token is unaffected, causal).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from attnjax.models import DecoderLM
from attnjax.models.llamafusion import llamafusion_from_decoder, param_labels
from configs import llamafusion_digits
from experiments import tasks, trainer

V, D, H, L, P = 19, 16, 2, 2, 4


def _base(seed=0):
  dec = DecoderLM(vocab_size=V, d_model=D, num_layers=L, num_heads=H, mlp_ratio=1.5,
                  rngs=nnx.Rngs(seed))
  key = jax.random.key(seed + 1)
  for path, var in nnx.iter_graph(dec):
    if isinstance(var, nnx.Param) and path[-1] == "scale":
      key, sub = jax.random.split(key)
      var[...] = 1.0 + 0.3 * jax.random.normal(sub, var.shape)
  return dec


_TOKENS = np.random.default_rng(0).integers(0, V, (2, 7)).astype(np.int32)


def test_text_only_input_reproduces_the_base_lm_logits_exactly():
  dec = _base()
  want = np.asarray(jax.jit(lambda m, t: m(t))(dec, _TOKENS))
  fused = jax.jit(lambda m, t, mod: m(t, mod))
  for init in ("copy", "random"):  # the image weights play no part
    lf = llamafusion_from_decoder(dec, patch_dim=P, init_image=init, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(np.asarray(fused(lf, _TOKENS, np.zeros_like(_TOKENS))), want)


def _loss(model, batch):
  tokens, modality, patches, targets = batch
  logits = model(tokens, modality, patches=patches).astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return loss, {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == targets)}


def test_training_steps_leave_text_weights_bit_identical_and_train_the_image_weights():
  lf = llamafusion_from_decoder(_base(), patch_dim=P, rngs=nnx.Rngs(3))
  graphdef, params, rest = nnx.split(lf, nnx.Param, ...)
  cfg = llamafusion_digits.get_config("tiny")
  with cfg.unlocked():
    cfg.optim.warmup_steps, cfg.optim.lr = 0, 1e-2
  tx = trainer.make_optimizer(cfg, param_labels)  # what the trainer builds for this task
  task = tasks.Task("t", None, [], _loss, None)
  train_step, _ = trainer.make_steps(graphdef, task, tx)
  rng = np.random.default_rng(1)
  modality = np.tile(np.array([1, 1, 1, 0, 0, 0, 0], np.int32), (2, 1))
  batch = (_TOKENS, modality, rng.normal(size=(2, 7, P)).astype(np.float32),
           rng.integers(0, V, (2, 7)).astype(np.int32))
  # The trainer places the optimizer state (frozen leaves hold optax.MaskedNode) on its mesh.
  _, _, o_sh = trainer.state_shardings(cfg, trainer.make_mesh(cfg), params, rest, tx)
  new, opt_state = params, jax.jit(tx.init, out_shardings=o_sh)(params)
  guard = trainer.init_guard(0)
  for _ in range(2):
    new, rest, opt_state, metrics, guard = train_step(new, rest, opt_state, batch, guard)
  labels = dict(nnx.to_flat_state(param_labels(params)))
  before, after = dict(nnx.to_flat_state(params)), dict(nnx.to_flat_state(new))
  labels = {p: l.get_value() for p, l in labels.items()}
  assert set(labels.values()) == {"frozen", "trainable"}
  assert float(metrics["grad_norm"]) > 0
  for path, lab in labels.items():
    a, b = np.asarray(before[path][...]), np.asarray(after[path][...])
    if lab == "frozen":
      np.testing.assert_array_equal(a, b, err_msg=str(path))
    else:
      assert np.abs(a - b).max() > 0, path
  frozen = {p[:2] if p[0] == "blocks" else p[:1] for p, l in labels.items() if l == "frozen"}
  assert ("embed",) in frozen and ("final_norms",) in frozen and ("blocks", 0) in frozen


def test_image_tokens_reach_text_only_through_causal_attention():
  lf = llamafusion_from_decoder(_base(), patch_dim=P, init_image="random", rngs=nnx.Rngs(3))
  modality = np.array([[0, 0, 1, 1, 1, 0, 0]] * 2, np.int32)
  f = jax.jit(lambda m, p: m(_TOKENS, modality, patches=p))
  p1 = np.random.default_rng(2).normal(size=(2, 7, P)).astype(np.float32)
  p2 = p1.copy()
  p2[:, 3] += 1.0  # inside the image span
  a, b = np.asarray(f(lf, p1)), np.asarray(f(lf, p2))
  np.testing.assert_array_equal(a[:, :3], b[:, :3])  # tokens before the change: untouched
  assert np.abs(a[:, 5:] - b[:, 5:]).max() > 1e-4    # later text tokens read the image
