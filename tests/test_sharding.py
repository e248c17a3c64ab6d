"""Sharding rules, configs and the resolved-sharding report.

The snapshot test resolves the PartitionSpec of every parameter of the ``nanbeige4_3b`` preset on the fixed mesh
data 2 x fsdp 2 x tensor 2 (the 8 fake CPU devices) from abstract shapes only, and compares it with
``tests/golden/sharding_nanbeige4_3b.json``. After an intended change to the model's logical axes or the default
rules, regenerate the file and review its diff:

    python tests/test_sharding.py --regenerate
"""
import json
import os
import sys

import gin
import jax
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from nanbeige_jax.config import ConfigError, build, parse_gin
from nanbeige_jax.model import abstract_model, get_preset
from nanbeige_jax.sharding import (DEFAULT_RULES, RULE_TABLES, ShardingConfig, format_sharding_report,
                                   logical_axes_tree, logical_to_spec, normalize_rules, sharding_report,
                                   tree_shardings)

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "sharding_nanbeige4_3b.json")
SNAPSHOT_MESH = {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def resolved_snapshot() -> dict:
  """Resolved sharding of nanbeige4_3b's params and AdamW state on SNAPSHOT_MESH (nothing is allocated)."""
  cfg = get_preset("nanbeige4_3b")
  mesh = ShardingConfig(**SNAPSHOT_MESH, rules=DEFAULT_RULES).make_mesh(devices=jax.devices()[:8])
  state = nnx.state(abstract_model(cfg), nnx.Param)
  shapes = nnx.to_pure_dict(state)
  shardings = tree_shardings(logical_axes_tree(state), mesh, DEFAULT_RULES, shapes)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  opt = jax.eval_shape(optax.adamw(1e-3).init, params)
  opt = optax.tree_map_params(optax.adamw(1e-3), lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype,
                                                                                   sharding=p.sharding),
                              opt, params, transform_non_params=lambda s: s)
  return sharding_report(params, opt).to_json()


def test_snapshot_matches_golden():
  with open(GOLDEN) as f:
    golden = json.load(f)
  current = resolved_snapshot()
  assert sorted(current["params"]) == sorted(golden["params"]), "parameter set changed (see module docstring)"
  for path, entry in golden["params"].items():
    assert current["params"][path] == entry, f"{path}: {current['params'][path]} != golden {entry}"
  assert current == golden


def test_snapshot_totals_are_consistent():
  snap = resolved_snapshot()
  cfg = get_preset("nanbeige4_3b")
  assert snap["param_bytes_total"] == 4 * cfg.num_params()
  # Every big matrix is split 4 ways (fsdp x tensor) on this mesh; only the small norms are replicated.
  assert snap["param_bytes_per_device"] < snap["param_bytes_total"] / 4 * 1.01
  assert snap["opt_bytes_total"] >= 2 * snap["param_bytes_total"]


@pytest.mark.parametrize("name", sorted(RULE_TABLES))
def test_gin_tables_equal_named_tables(name):
  parse_gin([f"sharding/{name}.gin"])
  cfg = build(ShardingConfig)
  assert cfg.rules == RULE_TABLES[name]


def test_gin_overrides_and_validation():
  parse_gin(["sharding/fsdp_tp.gin"], ["ShardingConfig.tensor = 2", "ShardingConfig.data = 2"])
  cfg = build(ShardingConfig)
  mesh = cfg.make_mesh(devices=jax.devices()[:8])
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  parse_gin(["sharding/fsdp.gin"], ["ShardingConfig.data = -1"])
  with pytest.raises(ConfigError, match="at most one of data/fsdp/tensor may be -1"):
    build(ShardingConfig)
  parse_gin(["sharding/fsdp.gin"], ["ShardingConfig.rules = [('batch', 'model')]"])
  with pytest.raises(ConfigError, match="unknown mesh axis 'model'"):
    build(ShardingConfig)


@pytest.mark.parametrize("kwargs,match", [
    ({"fsdp": -1, "tensor": 3}, "8 devices cannot be split"),
    ({"fsdp": 3}, "needs 3 devices but 8 are available"),
    ({"fsdp": 2, "tensor": 2}, "needs 4 devices but 8 are available"),
    ({"fsdp": 0}, "positive int or -1"),
    ({"dcn_data": 3}, "not divisible into 3 DCN slices"),
])
def test_mesh_errors_are_specific(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ShardingConfig(**kwargs).make_mesh(devices=jax.devices()[:8])


def test_multi_slice_mesh():
  devices = jax.devices()[:8]
  mesh = ShardingConfig(fsdp=-1, dcn_data=2).make_mesh(devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # Slice-major along "data": the first 4 devices form slice 0.
  assert [d.id for d in mesh.devices[0].ravel()] == [d.id for d in devices[:4]]


@pytest.mark.parametrize("rules,match", [
    ("zero3", "unknown sharding rules table 'zero3'"),
    ((("batch", "data"),), "no rule for logical axis"),
    (RULE_TABLES["fsdp"] + (("batch", None),), "appears more than once"),
    ((("batch", ("data", "data")),), "uses a mesh axis twice"),
    ((("tokens", None),), "unknown logical axis 'tokens'"),
    ((("batch", 3),), "expected None, a mesh axis name"),
    (("batch",), "expected a \\(logical_name, mesh_axes\\) pair"),
])
def test_bad_rules_are_rejected(rules, match):
  with pytest.raises(ValueError, match=match):
    normalize_rules(rules)


def test_indivisible_dimension_stays_replicated():
  mesh = ShardingConfig(fsdp=1, tensor=8, data=1).make_mesh(devices=jax.devices()[:8])
  # 4 kv heads cannot be split 8 ways: replicated; 16 heads can.
  assert logical_to_spec(("embed", "kv_heads", "head_dim"), DEFAULT_RULES, mesh, (64, 4, 16)) == P()
  assert logical_to_spec(("embed", "heads", "head_dim"), DEFAULT_RULES, mesh, (64, 16, 16)) == P(None, "tensor")


def test_report_counts_bytes_per_device():
  cfg = get_preset("test")
  mesh = ShardingConfig(rules="fsdp").make_mesh(devices=jax.devices()[:8])
  state = nnx.state(abstract_model(cfg), nnx.Param)
  shapes = nnx.to_pure_dict(state)
  shardings = tree_shardings(logical_axes_tree(state), mesh, RULE_TABLES["fsdp"], shapes)
  params = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
  report = sharding_report(params)
  rows = {r.path: r for r in report.rows}
  q = rows["layers/attn/q_proj"]
  assert q.spec == "P(None, 'fsdp')" and q.bytes_per_device == q.bytes_total // 8
  norm = rows["final_norm/scale"]
  assert norm.spec == "P()" and norm.bytes_per_device == norm.bytes_total
  assert report.param_bytes_total == 4 * cfg.num_params()
  expected_dev = sum(r.bytes_per_device for r in report.rows)
  assert report.param_bytes_per_device == expected_dev
  text = format_sharding_report(report)
  assert "layers/attn/q_proj" in text and "P(None, 'fsdp')" in text and "per device" in text


if __name__ == "__main__":
  if "--regenerate" not in sys.argv:
    sys.exit("usage: python tests/test_sharding.py --regenerate")
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if jax.device_count() < 8:
    sys.exit("needs 8 devices: run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  with open(GOLDEN, "w") as f:
    json.dump(resolved_snapshot(), f, indent=1, sort_keys=True)
    f.write("\n")
  print(f"wrote {GOLDEN}")
