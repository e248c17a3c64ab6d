"""seqio interop (optional extra): the sources as seqio Tasks and a Mixture; skipped when seqio is not installed."""
import numpy as np
import pytest

seqio = pytest.importorskip("seqio")

from nanbeige_jax.data import sources as S  # noqa: E402
from nanbeige_jax.data.seqio_tasks import register_tasks  # noqa: E402
from nanbeige_jax.data.tokenizer import Tokenizer  # noqa: E402


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


def test_task_examples_match_native_tokenization(setup):
  tokenizer, sources, names = setup
  assert names == ["test_nb_plays", "test_nb_math"]
  task = seqio.get_mixture_or_task("test_nb_math")
  examples = list(task.get_dataset(sequence_length={"targets": 4096}, split="validation", shuffle=False)
                  .as_numpy_iterator())
  expected = [[tokenizer.bos_id] + tokenizer.encode(t) + [tokenizer.eos_id]
              for t in sources["math"].split_documents("eval")]
  assert [e["targets"].tolist() for e in examples] == expected


def test_mixture_packs_with_decoder_feature_converter(setup):
  dataset = seqio.get_dataset("test_nb_mix", task_feature_lengths={"targets": 64}, dataset_split="train",
                              shuffle=True, seed=0, feature_converter=seqio.DecoderFeatureConverter(pack=True),
                              batch_size=4)
  batch = next(dataset.as_numpy_iterator())
  assert batch["decoder_target_tokens"].shape == (4, 64)
  assert set(batch) >= {"decoder_input_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_weights"}
  assert np.all(batch["decoder_loss_weights"][batch["decoder_segment_ids"] == 0] == 0)


def test_bad_weights_are_rejected(setup):
  tokenizer, sources, _ = setup
  with pytest.raises(ValueError, match="unknown sources"):
    register_tasks(sources, tokenizer.source, prefix="test_nb2_", mixture_name="test_nb2_mix", weights={"x": 1.0})
