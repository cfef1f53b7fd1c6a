"""Scale-out: `sharding` (meshes, logical-axis rules, shardings, report), `context_parallel`
(ring attention, linear-attention state passing, per-shard `shard_map` wrappers) and
`checkpoint` (orbax). Import the submodules directly; nothing heavy is imported here."""
