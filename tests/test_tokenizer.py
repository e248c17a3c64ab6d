"""Tokenizer: training with atomic Nanbeige specials, load round trip (file and Llama-style dir), fingerprint, checks."""
import pathlib
import shutil
import subprocess
import sys

import pytest

from nanbeige_jax.data.sources import ShakespeareSource
from nanbeige_jax.data.tokenizer import NANBEIGE_SPECIAL_TOKENS, Tokenizer, padded_vocab_size

REPO = pathlib.Path(__file__).resolve().parents[1]
CODE = "def add(a, b):\n    \"\"\"Adds.\"\"\"\n    return a + b  # sum\n\n\nclass Box:\n    pass\n"


@pytest.fixture(scope="module")
def corpus():
  plays = ShakespeareSource()
  return [plays.document(i) for i in range(3)] + [CODE] * 5


@pytest.fixture(scope="module")
def tokenizer(corpus, tmp_path_factory):
  return Tokenizer.train(corpus, tmp_path_factory.mktemp("tok") / "spm", 1000)


def test_ids_and_specials_layout(tokenizer):
  assert tokenizer.vocab_size == 1000
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 2, 3, 1)
  specials = tokenizer.special_ids
  assert [specials[t] for t in NANBEIGE_SPECIAL_TOKENS] == [4, 5, 6, 7, 8]
  assert specials["<s>"] == 2 and specials["</s>"] == 3 and specials["<pad>"] == 0


@pytest.mark.parametrize("special", NANBEIGE_SPECIAL_TOKENS)
def test_specials_are_atomic(tokenizer, special):
  ids = tokenizer.encode(f"x{special}y")
  assert tokenizer.special_ids[special] in ids
  pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(special)]
  assert [p for p in pieces if p != "▁"] == [special]  # one piece (after the optional dummy-prefix space)
  assert tokenizer.decode(ids) == f"x{special}y"


@pytest.mark.parametrize("text", [
    "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n<think>12+30=42</think>42<|im_end|>",
    CODE,
    "Unicode: naïve café, 数学, emoji 😀🚀, tabs\tand  double  spaces.",
    "  leading spaces and trailing  ",
])
def test_encode_decode_round_trip(tokenizer, text):
  ids = tokenizer.encode(text)
  assert all(0 <= i < tokenizer.vocab_size for i in ids)
  assert tokenizer.decode(ids) == text


def test_digits_are_split(tokenizer):
  ids = tokenizer.encode("12345")
  pieces = [tokenizer.id_to_piece(i) for i in ids]
  assert [p for p in pieces if p.strip("▁")] == ["1", "2", "3", "4", "5"]


def test_load_round_trip_and_fingerprint(tokenizer, tmp_path):
  reloaded = Tokenizer.load(tokenizer.source)
  assert reloaded.fingerprint() == tokenizer.fingerprint()
  assert len(tokenizer.fingerprint()) == 16 and int(tokenizer.fingerprint(), 16) >= 0
  assert reloaded.encode("To be, or not to be") == tokenizer.encode("To be, or not to be")
  # Llama/HF layout: a directory holding tokenizer.model.
  shutil.copy(tokenizer.source, tmp_path / "tokenizer.model")
  from_dir = Tokenizer.load(tmp_path)
  assert from_dir.fingerprint() == tokenizer.fingerprint()
  assert Tokenizer.from_serialized(tokenizer.serialized_model_proto()).fingerprint() == tokenizer.fingerprint()


def test_fingerprint_differs_between_models(corpus, tokenizer, tmp_path):
  other = Tokenizer.train(corpus, tmp_path / "other", 1100)
  assert other.fingerprint() != tokenizer.fingerprint()


def test_unigram_training(corpus, tmp_path):
  unigram = Tokenizer.train(corpus, tmp_path / "uni", 800, model_type="unigram")
  assert unigram.vocab_size == 800
  assert unigram.encode("<think>")[-1] == unigram.special_ids["<think>"]


def test_check_fits(tokenizer):
  tokenizer.check_fits(1000)
  tokenizer.check_fits(padded_vocab_size(tokenizer.vocab_size))
  with pytest.raises(ValueError, match=r"has 1000 pieces but the model's vocab_size is 512.*padded_vocab_size"):
    tokenizer.check_fits(512)


def test_padded_vocab_size():
  assert padded_vocab_size(1000) == 1024
  assert padded_vocab_size(1024) == 1024
  assert padded_vocab_size(1025) == 1152
  assert padded_vocab_size(100, multiple=64) == 128
  with pytest.raises(ValueError):
    padded_vocab_size(0)


def test_bad_inputs(tmp_path, corpus):
  with pytest.raises(ValueError, match="does not exist"):
    Tokenizer.load(tmp_path / "missing.model")
  garbage = tmp_path / "garbage.model"
  garbage.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    Tokenizer.load(garbage)
  with pytest.raises(ValueError, match="too small"):
    Tokenizer.train(corpus, tmp_path / "small", 100)
  with pytest.raises(ValueError, match="empty"):
    Tokenizer.train(["", "  \n"], tmp_path / "empty", 1000)
  with pytest.raises(ValueError, match="model_type"):
    Tokenizer.train(corpus, tmp_path / "bad", 1000, model_type="wordpiece")
  with pytest.raises(ValueError, match="missing.txt"):
    Tokenizer.train([tmp_path / "missing.txt"], tmp_path / "nofile", 1000)


def test_train_from_files(corpus, tmp_path):
  path = tmp_path / "corpus.txt"
  path.write_text("\n".join(corpus), encoding="utf-8")
  from_file = Tokenizer.train([path], tmp_path / "from_file", 1000)
  assert from_file.vocab_size == 1000


def test_launcher(tmp_path, corpus):
  corpus_file = tmp_path / "corpus.txt"
  corpus_file.write_text("\n\n".join(corpus), encoding="utf-8")
  prefix = tmp_path / "launched"
  result = subprocess.run([sys.executable, str(REPO / "launch" / "train_tokenizer.py"), f"--input={tmp_path}/*.txt",
                           f"--output={prefix}", "--vocab_size=700", "--model_type=bpe"],
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "vocab_size=700" in result.stdout and "padded_vocab_size=768" in result.stdout
  launched = Tokenizer.load(f"{prefix}.model")
  assert launched.vocab_size == 700 and launched.special_ids["<|im_end|>"] == 5
