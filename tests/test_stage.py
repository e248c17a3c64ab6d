"""The stage template with a spec shaped like the post-training stages: a frozen teacher of a bigger preset loaded
from a checkpoint of this project (``init_params(role=...)``), a two-term objective, ``next_inputs(run, step,
state)``; run through ``run_stage``, every term logged, resumed exactly after an interruption."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nanbeige_jax.checkpoint import build_metadata, save_params_checkpoint
from nanbeige_jax.model import Decoder, get_preset
from nanbeige_jax.objectives import Objective
from nanbeige_jax.optim.schedules import FGWSDSchedule
from nanbeige_jax.train import stage
from nanbeige_jax.train.checkpointing import init_params

CFG = get_preset("test")
TEACHER = get_preset("test", num_layers=3, hidden_size=96, intermediate_size=128)
ROWS, SEQ = 8, 16


@dataclasses.dataclass(frozen=True)
class ToyConfig(stage.RunConfig):
  teacher_dir: str = ""

  def __post_init__(self):
    stage.validate_run_config(self)


def kd_objective():
  def fn(model, batch, rope_theta, frozen):
    s = model(batch["inputs"], batch["positions"], batch["segment_ids"], rope_theta=rope_theta).astype(jnp.float32)
    t = frozen["teacher"](batch["inputs"], batch["positions"], batch["segment_ids"]).astype(jnp.float32)
    w = batch["loss_weights"]
    ls = jax.nn.log_softmax(s)
    nll = -jnp.take_along_axis(ls, batch["targets"][..., None], -1)[..., 0]
    kl = jnp.sum(jnp.exp(jax.nn.log_softmax(t)) * (jax.nn.log_softmax(t) - ls), -1)
    return {"ce": (jnp.sum(nll * w), jnp.sum(w)), "kd": (jnp.sum(kl[:, -1] * w[:, -1]), jnp.sum(w[:, -1]))}, {}
  return Objective(fn, {"ce": 1.0, "kd": 0.5}, frozen_roles=("teacher",))


class Counter:
  def __init__(self):
    self.cursor = 0

  def get_state(self):
    return {"cursor": self.cursor}

  def set_state(self, state):
    self.cursor = int(state["cursor"])

  def next_batch(self):
    rng = np.random.default_rng(self.cursor)
    self.cursor += 1
    tokens = rng.integers(0, CFG.vocab_size, (ROWS, SEQ + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_weights": np.ones((ROWS, SEQ), np.float32),
            "segment_ids": np.ones((ROWS, SEQ), np.int32), "positions": np.tile(np.arange(SEQ, dtype=np.int32),
                                                                                (ROWS, 1))}


class DistillStage(stage.Stage):
  name = "toy_distill"

  def prepare(self, run):
    run.model_cfg = CFG

  def objective(self, run):
    return kd_objective()

  def frozen_configs(self, run):
    return {"teacher": TEACHER}

  def frozen_params(self, run):
    params, meta = init_params(run.trainer, checkpoint_dir=run.cfg.teacher_dir, role="teacher")
    assert meta["stage"] == "teacher"
    return {"teacher": params}

  def build_data(self, run):
    return Counter()

  def metadata(self, run):
    return build_metadata(run.model_cfg, stage=self.name)

  def next_inputs(self, run, step, state):
    assert int(state.step) == step  # the loop hands the current state
    return run.schedule_inputs(step, run.data.next_batch(), tokens=ROWS * SEQ)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("teacher")
  params = nnx.to_pure_dict(nnx.state(Decoder(TEACHER, rngs=nnx.Rngs(3)), nnx.Param))
  save_params_checkpoint(path, params, build_metadata(TEACHER, stage="teacher"))
  return str(path)


def config(teacher_dir, **kw):
  tokens = ROWS * SEQ
  schedule = FGWSDSchedule(warmup_tokens=tokens, peak_lr=1e-2, final_lr=0.0, decay_shape="linear",
                           stable_phases=[{"name": "s", "tokens": 3 * tokens, "mixture": {"toy": 1.0}}],
                           decay_tokens=2 * tokens)
  return ToyConfig(schedule=schedule, sources={"toy": {"kind": "toy"}}, seq_len=SEQ, global_batch_size=ROWS,
                   log_every_steps=1, eval_every_steps=100, checkpoint_every_steps=2, async_checkpointing=False,
                   mesh={"data": 2, "fsdp": 4, "tensor": 1}, teacher_dir=teacher_dir, **kw)


def rows(workdir):
  return [json.loads(line) for line in open(workdir / "metrics.jsonl") if "grad_norm" in line]


def test_a_distillation_shaped_stage_runs_logs_every_term_and_resumes_exactly(teacher_dir, tmp_path):
  full = stage.run_stage(config(teacher_dir), tmp_path / "full", DistillStage())
  assert full["final_step"] == 6 and full["stopped"] is None
  logged = rows(tmp_path / "full")
  assert [r["step"] for r in logged] == list(range(1, 7))
  for r in logged:
    assert {"loss", "objective", "objective/ce", "objective/kd", "phase", "lr"} <= set(r)
    assert r["loss"] == r["objective/ce"]
    np.testing.assert_allclose(r["objective"], r["objective/ce"] + 0.5 * r["objective/kd"], rtol=1e-6)
  # Interrupted after 3 steps (checkpoint at 2), then resumed: the same losses, bit for bit.
  stage.run_stage(config(teacher_dir, max_steps=3), tmp_path / "resumed", DistillStage())
  resumed = stage.run_stage(config(teacher_dir), tmp_path / "resumed", DistillStage())
  assert resumed["start_step"] == 3
  again = rows(tmp_path / "resumed")
  assert [(r["step"], r["loss"], r["objective/kd"]) for r in again] == [
      (r["step"], r["loss"], r["objective/kd"]) for r in logged]

