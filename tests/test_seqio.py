"""seqio interop (optional extra): the sources as seqio Tasks and Mixtures, and ``SeqioMixtureIterator`` feeding the
trainer; skipped when seqio is not installed."""
import json
from collections import Counter

import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from nanbeige_jax.data import sources as S  # noqa: E402
from nanbeige_jax.data.mixture import iter_eval_batches  # noqa: E402
from nanbeige_jax.data.packing import document_sequence, pack_sequences  # noqa: E402
from nanbeige_jax.data.seqio_feed import SeqioMixtureIterator, decoder_rows  # noqa: E402
from nanbeige_jax.data.seqio_tasks import register_tasks  # noqa: E402
from nanbeige_jax.data.tokenizer import Tokenizer  # noqa: E402

SEQ_LEN = 32  # shorter than most documents here, so documents are split into pieces


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  texts = {"plays": [S.ShakespeareSource().document(i)[:400] for i in range(20)],
           "math": [S.ArithmeticSource(num_train=40, num_eval=5).document(i) for i in range(45)]}
  tokenizer = Tokenizer.train([t for docs in texts.values() for t in docs],
                              tmp_path_factory.mktemp("tok") / "spm", 600)
  sources = {name: S.InMemorySource(name, docs, eval_fraction=0.2) for name, docs in texts.items()}
  names = register_tasks(sources, tokenizer.source, prefix="test_nb_", mixture_name="test_nb_mix",
                         weights={"plays": 1.0, "math": 3.0})
  return tokenizer, sources, names


@pytest.fixture(scope="module")
def piece_sets(setup):
  """Task name -> the set of its training pieces at SEQ_LEN (as token tuples): identifies a packed segment's
  source."""
  _, sources, _ = setup
  make_iterator(setup)  # registers the feed_* tasks
  out = {}
  for name in sources:
    task = seqio.get_mixture_or_task(f"feed_{name}")
    dataset = task.get_dataset(sequence_length={"targets": SEQ_LEN}, split="train", shuffle=False)
    out[name] = {tuple(e["targets"].tolist()) for e in dataset.as_numpy_iterator()}
  assert not out["plays"] & out["math"]
  return out


def make_iterator(setup, **kw):
  tokenizer, sources, _ = setup
  kw = {"batch_size": 4, "seed": 0, "task_prefix": "feed_", **kw}
  return SeqioMixtureIterator(sources, tokenizer, **kw)


def weighted_pairs(batches):
  pairs = Counter()
  for batch in batches:
    mask = batch["loss_weights"] > 0
    pairs.update(zip(batch["inputs"][mask].tolist(), batch["targets"][mask].tolist()))
  return pairs


def segments(batch):
  """The token tuples of every packed segment of a batch."""
  out = []
  for row in range(batch["inputs"].shape[0]):
    for segment in np.unique(batch["segment_ids"][row][batch["segment_ids"][row] > 0]):
      out.append(tuple(batch["inputs"][row][batch["segment_ids"][row] == segment].tolist()))
  return out


# ---- registration ---------------------------------------------------------------------------------------------------
def test_task_examples_match_native_tokenization(setup):
  tokenizer, sources, names = setup
  assert names == ["test_nb_plays", "test_nb_math"]
  task = seqio.get_mixture_or_task("test_nb_math")
  examples = list(task.get_dataset(sequence_length={"targets": 4096}, split="validation", shuffle=False)
                  .as_numpy_iterator())
  expected = [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id]
              for t in sources["math"].split_documents("eval")]
  assert [e["targets"].tolist() for e in examples] == expected


def test_long_documents_are_split_with_one_token_overlap(setup):
  tokenizer, sources, _ = setup
  task = seqio.get_mixture_or_task("test_nb_plays")
  pieces = [e["targets"].tolist() for e in task.get_dataset(sequence_length={"targets": SEQ_LEN},
                                                               split="validation", shuffle=False).as_numpy_iterator()]
  rebuilt, documents = [], []
  for text in sources["plays"].split_documents("eval"):
    documents.append([tokenizer.bos_id] + tokenizer.encode(text) + [tokenizer.eos_id])
  assert max(len(d) for d in documents) > 2 * SEQ_LEN
  for piece in pieces:
    assert 2 <= len(piece) <= SEQ_LEN
    if piece[0] == tokenizer.bos_id:
      rebuilt.append(piece)
    else:  # a continuation starts with the previous piece's last token
      assert rebuilt[-1][-1] == piece[0]
      rebuilt[-1] = rebuilt[-1] + piece[1:]
  assert rebuilt == documents


def test_mixture_packs_with_decoder_feature_converter(setup):
  dataset = seqio.get_dataset("test_nb_mix", task_feature_lengths={"targets": 64}, dataset_split="train",
                              shuffle=True, seed=0, feature_converter=seqio.DecoderFeatureConverter(pack=True),
                              batch_size=4)
  batch = next(dataset.as_numpy_iterator())
  assert batch["decoder_target_tokens"].shape == (4, 64)
  assert set(batch) >= {"decoder_input_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_weights"}
  assert np.all(batch["decoder_loss_weights"][batch["decoder_segment_ids"] == 0] == 0)
  # seqio's convention, which decoder_rows relies on: inputs are the targets shifted right within each segment,
  # with 0 at every segment start.
  tokens, segs, inputs = (batch[k] for k in ("decoder_target_tokens", "decoder_segment_ids", "decoder_input_tokens"))
  for row in range(4):
    for seg in np.unique(segs[row][segs[row] > 0]):
      piece = tokens[row][segs[row] == seg]
      assert inputs[row][segs[row] == seg].tolist() == [0] + piece[:-1].tolist()


def test_bad_weights_are_rejected(setup):
  tokenizer, sources, _ = setup
  with pytest.raises(ValueError, match="unknown sources"):
    register_tasks(sources, tokenizer.source, prefix="test_nb2_", mixture_name="test_nb2_mix", weights={"x": 1.0})


# ---- the feed -------------------------------------------------------------------------------------------------------
def test_batch_format_and_conventions(setup):
  tokenizer, _, _ = setup
  it = make_iterator(setup)
  assert it.source_names == ["plays", "math"]
  batch = it.next_batch({"plays": 1.0, "math": 1.0}, SEQ_LEN)
  assert sorted(batch) == ["inputs", "loss_weights", "positions", "segment_ids", "source_ids", "targets"]
  for key, value in batch.items():
    assert value.shape == (4, SEQ_LEN) and value.dtype == (np.float32 if key == "loss_weights" else np.int32), key
  assert np.all(batch["source_ids"] == -1)  # seqio packs tasks together: per-token source unknown
  seg, pos, w = batch["segment_ids"], batch["positions"], batch["loss_weights"]
  for row in range(4):
    ids = seg[row][seg[row] > 0]
    assert ids[0] == 1 and np.all(np.diff(ids) >= 0) and np.all(np.diff(np.unique(ids)) == 1)
    assert np.all(seg[row][len(ids):] == 0)  # padding only at the end
    for s in np.unique(ids):
      where = np.flatnonzero(seg[row] == s)
      assert pos[row][where].tolist() == list(range(len(where)))
      assert w[row][where].tolist() == [1.0] * (len(where) - 1) + [0.0]  # no target after a segment's last token
      assert batch["targets"][row][where[:-1]].tolist() == batch["inputs"][row][where[1:]].tolist()
  assert np.all(w[seg == 0] == 0) and np.all(batch["inputs"][seg == 0] == tokenizer.pad_id)
  assert it.batch_counter == 1
  bad = {"decoder_target_tokens": np.array([[5, 6, 7]]), "decoder_input_tokens": np.array([[5, 6, 7]]),
         "decoder_segment_ids": np.array([[1, 1, 1]]), "decoder_positions": np.array([[0, 1, 2]]),
         "decoder_loss_weights": np.array([[1, 1, 1]])}
  with pytest.raises(RuntimeError, match="convention"):
    decoder_rows(bad, 0)
  with pytest.raises(ValueError, match="unknown sources"):
    it.next_batch({"poetry": 1.0}, SEQ_LEN)


def test_same_weighted_pairs_as_native_pipeline(setup):
  """For the same documents, the native and seqio paths train on exactly the same (input, target) pairs."""
  tokenizer, sources, _ = setup
  it = make_iterator(setup, split="eval")
  for name in ("plays", "math"):
    native = weighted_pairs(iter_eval_batches(sources[name], tokenizer, batch_size=4, seq_len=SEQ_LEN))
    fed = list(it.eval_batches(name, SEQ_LEN))
    assert weighted_pairs(fed) == native and sum(native.values()) > 200
    assert all(np.all(b["source_ids"][b["segment_ids"] > 0] == it.source_names.index(name)) for b in fed)
  # Training batches: every weighted pair is one of the source's training pairs.
  train = make_iterator(setup)
  documents = [document_sequence(tokenizer.encode(t), tokenizer.bos_id, tokenizer.eos_id)
               for t in sources["math"].split_documents("train")]
  allowed = weighted_pairs([pack_sequences(documents, SEQ_LEN, tokenizer.pad_id)])
  drawn = weighted_pairs([train.next_batch({"math": 1.0}, SEQ_LEN) for _ in range(3)])
  assert sum(drawn.values()) > 200 and set(drawn) <= set(allowed)


def test_weights_change_between_calls(setup, piece_sets):
  it = make_iterator(setup, batch_size=8)

  def source_tokens(batch):
    counts = Counter()
    for piece in segments(batch):
      owner = [n for n, pieces in piece_sets.items() if piece in pieces]
      assert len(owner) == 1, piece
      counts[owner[0]] += len(piece)
    return counts
  assert set(source_tokens(it.next_batch({"plays": 1.0}, SEQ_LEN))) == {"plays"}
  assert set(source_tokens(it.next_batch({"math": 1.0, "plays": 0.0}, SEQ_LEN))) == {"math"}
  assert set(source_tokens(it.next_batch({"plays": 1.0}, SEQ_LEN))) == {"plays"}  # stream resumed, not restarted
  # Token shares follow the weights (rates are per example; rate_unit="tokens" divides by mean example length).
  mixed = Counter()
  for _ in range(12):
    mixed += source_tokens(it.next_batch({"plays": 1.0, "math": 3.0}, SEQ_LEN))
  share = mixed["math"] / (mixed["math"] + mixed["plays"])
  assert abs(share - 0.75) < 0.08, (share, mixed)
  assert it.batch_counter == 15
  assert [s["batches"] for s in it.get_state()["streams"]] == [2, 1, 12]


def test_exact_resume(setup):
  plan = [({"plays": 1.0, "math": 1.0}, SEQ_LEN), ({"math": 1.0}, SEQ_LEN), ({"plays": 1.0, "math": 1.0}, SEQ_LEN),
          ({"math": 1.0}, SEQ_LEN), ({"plays": 1.0, "math": 1.0}, 48)]
  it = make_iterator(setup, seed=3)
  before = [it.next_batch(w, n) for w, n in plan[:3]]
  state = json.loads(json.dumps(it.get_state()))
  after = [it.next_batch(w, n) for w, n in plan[3:]]
  resumed = make_iterator(setup, seed=3)
  resumed.set_state(state)
  assert resumed.batch_counter == 3
  for expected, (w, n) in zip(after, plan[3:]):
    got = resumed.next_batch(w, n)
    assert all(np.array_equal(got[k], expected[k]) for k in expected)
  assert resumed.get_state() == it.get_state()
  # A different seed is a different stream: the state records the seed and refuses it.
  other = make_iterator(setup, seed=4)
  assert not np.array_equal(other.next_batch(*plan[0])["inputs"], before[0]["inputs"])
  with pytest.raises(ValueError, match="seed"):
    other.set_state(state)
  with pytest.raises(ValueError, match="batch_size"):
    make_iterator(setup, seed=3, batch_size=2).set_state(state)
  with pytest.raises(ValueError, match="not a SeqioMixtureIterator state"):
    other.set_state({"format": "x"})


def test_process_sharding(setup, piece_sets):
  shards = [make_iterator(setup, batch_size=2, process_index=p, process_count=2) for p in range(2)]
  seen = []
  for it in shards:
    pieces = set()
    for _ in range(3):
      batch = it.next_batch({"math": 1.0}, SEQ_LEN)
      assert batch["inputs"].shape == (2, SEQ_LEN)
      pieces |= set(segments(batch))
    assert pieces <= piece_sets["math"]
    seen.append(pieces)
  assert not seen[0] & seen[1]  # disjoint examples per process
  assert shards[0].get_state()["streams"] == shards[1].get_state()["streams"]
  # Eval: the processes' slices concatenate to the single-process global batches.
  single = list(make_iterator(setup, batch_size=4, split="eval").eval_batches("plays", SEQ_LEN))
  parts = [list(make_iterator(setup, batch_size=2, process_index=p, process_count=2, split="eval")
                .eval_batches("plays", SEQ_LEN)) for p in range(2)]
  assert len(parts[0]) == len(parts[1]) == len(single)
  for whole, first, second in zip(single, *parts):
    assert all(np.array_equal(whole[k], np.concatenate([first[k], second[k]])) for k in whole)


def test_bad_construction_is_rejected(setup):
  tokenizer, sources, _ = setup
  with pytest.raises(ValueError, match="not registered"):
    SeqioMixtureIterator({"x": "no_such_task"}, tokenizer, batch_size=2, seed=0)
  with pytest.raises(ValueError, match="process_index"):
    SeqioMixtureIterator(sources, tokenizer, batch_size=2, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="model file"):
    SeqioMixtureIterator(sources, Tokenizer.from_serialized(tokenizer.serialized_model_proto()), batch_size=2, seed=0)
  # An already registered task can be named instead of a source.
  it = SeqioMixtureIterator({"math": "test_nb_math"}, tokenizer, batch_size=2, seed=0)
  assert it.next_batch({"math": 1.0}, SEQ_LEN)["inputs"].shape == (2, SEQ_LEN)


def test_trainer_learns_from_seqio_batches(setup):
  import jax

  from nanbeige_jax.model import get_preset
  from nanbeige_jax.optim.optimizer import OptimizerConfig, make_optimizer
  from nanbeige_jax.sharding import make_mesh
  from nanbeige_jax.objectives.lm import make_lm_loss
  from nanbeige_jax.train.step import Trainer

  tokenizer, _, _ = setup
  cfg = get_preset("test", dtype="float32", vocab_size=640)
  tokenizer.check_fits(cfg.vocab_size)
  small = {"math": S.InMemorySource("math_small", [S.ArithmeticSource(num_train=6, num_eval=2).document(i)
                                                   for i in range(8)], eval_fraction=0.25)}
  data = SeqioMixtureIterator(small, tokenizer, batch_size=8, seed=0, task_prefix="feed_small_")
  trainer = Trainer(cfg, make_optimizer(OptimizerConfig()), make_lm_loss(num_sources=1),
                    mesh=make_mesh(data=8, fsdp=1, tensor=1, devices=jax.devices()[:8]))
  state = trainer.init_state(seed=0)
  losses = []
  for _ in range(15):
    state, metrics = trainer.train_step(state, data.next_batch({"math": 1.0}, SEQ_LEN), lr=1e-2,
                                        rope_theta=cfg.rope_theta)
    losses.append(float(metrics["loss"]))
    assert float(metrics["sums"]["source_tokens"][0]) == 0.0  # source ids are -1 with seqio
  assert np.all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.7 * losses[0], " ".join(f"{x:.2f}" for x in losses)


def test_pretrain_launcher_with_seqio_backend(tmp_path):
  """``launch/pretrain.py`` with ``PretrainConfig.data_backend='seqio'``: 3 steps on the shared loop, finite
  losses, a checkpoint and a per-source eval from seqio's validation splits."""
  import importlib.util
  import pathlib
  spec = importlib.util.spec_from_file_location(
      "faults_harness_seqio", pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "faults.py")
  harness = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(harness)
  corpus = harness.write_corpus(tmp_path)
  tokenizer = harness.train_test_tokenizer(tmp_path, corpus)
  workdir = tmp_path / "run"
  proc = harness.run(workdir, harness.bindings(tokenizer, corpus, data_backend="seqio"), ["--max_steps", "3"],
                     timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "done: step 3/3" in proc.stdout and "resolved sharding on mesh" in proc.stderr
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in train)
  evals = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in evals] == [3] and np.isfinite(evals[0]["eval/loss"])
  assert {"eval/loss/a", "eval/loss/b"} <= set(evals[0])
  assert (workdir / "checkpoints" / "3").is_dir()
