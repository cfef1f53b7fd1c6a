r"""A small Graph Transformer on generated stochastic-block-model node classification (CPU-sized).

Command:
  .venv/bin/python -m experiments.train --config=configs/graph_sbm.py --workdir=workdirs/graph_sbm
Edge-feature variant: `--config.model.edge_features=True`; the authors' clamped softmax:
`--config.model.score_clamp=5.0`; LayerNorm instead of BatchNorm: `--config.model.norm=layer`.

Setting: graphs of 20..40 nodes in 4 communities (p_in 0.5, p_out 0.1; one labelled seed node per
community, as in SBM CLUSTER), Laplacian PE of 8 columns with random sign flips per training batch,
4 layers, d_model 64, 4 heads, BatchNorm over real nodes, 2,000 training / 256 test graphs, batch
32, 300 steps of AdamW (lr 1e-3). Reports held-out node accuracy (chance 0.25). Measured (2-core CPU
shared with other jobs, 2026-12-03, node stream only): eval_accuracy 0.751 / 0.775 / 0.779 at steps
100 / 200 / 300 (eval_loss 0.601), 136,692 parameters, 5 min 9 s wall including compilation.
Edge variant, 100 steps (`--config.model.edge_features=True --config.train.steps=100
--config.train.eval_every=50`): eval_accuracy 0.628 / 0.723 at steps 50 / 100, 237,172
parameters, 7 min 55 s wall (the dense [B, N, N, d] edge stream costs ~5x the node stream).
"""

import ml_collections

from configs import mqar


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = mqar.get_config()
  c.task = "graph"
  c.data = ml_collections.ConfigDict()
  c.data.num_train = 2000
  c.data.num_test = 256
  c.data.min_nodes = 20
  c.data.max_nodes = 40
  c.data.num_classes = 4
  c.data.p_in = 0.5
  c.data.p_out = 0.1
  c.data.pe_dim = 8
  c.model = ml_collections.ConfigDict()
  c.model.mixer = "softmax"  # the neighbour softmax of the Graph Transformer (fixed)
  c.model.mixer_options = ml_collections.ConfigDict()
  c.model.d_model = 64
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.norm = "batch"
  c.model.edge_features = False
  c.model.score_clamp = ml_collections.config_dict.placeholder(float)
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 30
  c.optim.weight_decay = 0.0
  c.train.steps = 300
  c.train.batch_size = 32
  c.train.eval_every = 100
  if arg == "tiny":  # for tests: a few seconds
    c.data.num_train, c.data.num_test = 64, 16
    c.data.min_nodes, c.data.max_nodes, c.data.pe_dim = 6, 10, 3
    c.model.d_model, c.model.num_heads, c.model.num_layers = 16, 2, 1
    c.train.steps, c.train.eval_every, c.train.batch_size = 10, 5, 8
    c.train.progress = False
  elif arg:
    raise ValueError(f"unknown preset {arg!r} for configs/graph_sbm.py; known: 'tiny'")
  return c
