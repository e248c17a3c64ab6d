"""SentencePiece tokenizer: load (incl. Llama-style ``tokenizer.model``), train with atomic Nanbeige specials, encode.

Trained models use the fixed id layout ``<pad>=0, <unk>=1, <s>=2 (bos), </s>=3 (eos)`` followed by the Nanbeige
chat/reasoning specials as user-defined symbols (ids 4..8), so they are never split. Byte fallback keeps every
string encodable; digits are split one per token (helps arithmetic); normalisation is the identity and whitespace
runs are kept (code survives an encode/decode round trip). Training reads documents line by line, so a newline
encodes as the byte piece ``<0x0A>`` (as in Llama's tokenizer).

``encode`` maps the literal text of a user-defined symbol (``<|im_start|>``, ``<think>``, ...) to its id, as
SentencePiece does. ``encode_text`` is for text that must stay text (chat message content: web, code and agent data
quote chat markup): every occurrence of a user-defined symbol is encoded as its first character followed by the
rest, each encoded on its own, so ``<|im_end|>`` in a message becomes ordinary pieces (``<`` + ``|im_end|>``) that
decode back to the same string and never a control id (control symbols such as ``<s>`` are never matched in text
by SentencePiece). ``find_special_text`` counts such occurrences (the SFT data report counts the conversations).
"""
from __future__ import annotations

import hashlib
import math
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Sequence

import sentencepiece as spm

PAD_PIECE = "<pad>"
UNK_PIECE = "<unk>"
BOS_PIECE = "<s>"
EOS_PIECE = "</s>"
NANBEIGE_SPECIAL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>")
MODEL_TYPES = ("bpe", "unigram", "char", "word")
# SentencePiece refuses training sentences longer than this many bytes; longer lines are chunked before training.
MAX_TRAIN_SENTENCE_BYTES = 16384


def _is_markup(piece: str) -> bool:
  return len(piece) >= 3 and piece.startswith("<") and piece.endswith(">")


def padded_vocab_size(n: int, multiple: int = 128) -> int:
  """Smallest multiple of ``multiple`` that is >= ``n`` (model vocab sizes are padded for efficient matmuls)."""
  if n <= 0 or multiple <= 0:
    raise ValueError(f"padded_vocab_size needs n > 0 and multiple > 0, got n={n}, multiple={multiple}")
  return int(math.ceil(n / multiple) * multiple)


def _training_sentences(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
  """Lines of the given texts (``str``) and files (``os.PathLike``), empty lines dropped, long lines chunked."""
  for item in texts_or_files:
    if isinstance(item, os.PathLike):
      path = pathlib.Path(item)
      if not path.is_file():
        raise ValueError(f"tokenizer training input {str(path)!r} does not exist or is not a file")
      text = path.read_text(encoding="utf-8", errors="replace")
    elif isinstance(item, str):
      text = item
    else:
      raise ValueError(f"tokenizer training input must be str (a text) or os.PathLike (a file), got {type(item).__name__}")
    for line in text.split("\n"):
      if not line.strip():
        continue
      encoded = line.encode("utf-8")
      if len(encoded) <= MAX_TRAIN_SENTENCE_BYTES:
        yield line
        continue
      # Chunk on character boundaries so that each chunk stays under the byte limit.
      chunk_chars = MAX_TRAIN_SENTENCE_BYTES // 4
      for start in range(0, len(line), chunk_chars):
        yield line[start:start + chunk_chars]


class Tokenizer:
  """A SentencePiece model with the ids and checks the trainer needs."""

  def __init__(self, processor: spm.SentencePieceProcessor, source: str = "<memory>"):
    self._sp = processor
    self.source = source
    self._special_ids = self._find_special_ids()
    markup = {p for p in self._user_defined_symbols() if _is_markup(p)}
    markup |= set(NANBEIGE_SPECIAL_TOKENS) & set(self._special_ids)
    user_defined = sorted(markup, key=lambda p: (-len(p), p))
    self._user_defined = tuple(user_defined)
    self._user_defined_re = re.compile("|".join(map(re.escape, user_defined))) if user_defined else None

  # ---- construction -------------------------------------------------------------------------------------------
  @classmethod
  def load(cls, path: str | os.PathLike) -> "Tokenizer":
    """Loads a ``.model`` file, or a directory holding ``tokenizer.model`` (Llama/HF layout), on local disk or any
    path-layer scheme (``gs://...``): the bytes are read through ``nanbeige_jax.paths`` and parsed in memory."""
    from nanbeige_jax import paths  # pylint: disable=import-outside-toplevel
    model_path = os.fspath(path)
    if paths.is_dir(model_path):
      model_path = paths.join(model_path, "tokenizer.model")
    if not paths.is_file(model_path):
      raise ValueError(f"tokenizer model {model_path!r} does not exist")
    processor = spm.SentencePieceProcessor()
    try:
      processor.Load(model_proto=paths.read_bytes(model_path))
    except (OSError, RuntimeError) as err:
      raise ValueError(f"{model_path!r} is not a valid SentencePiece model: {err}") from err
    return cls(processor, source=model_path)

  @classmethod
  def from_serialized(cls, model_proto: bytes) -> "Tokenizer":
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(model_proto)
    return cls(processor)

  @classmethod
  def train(cls, texts_or_files: Iterable[str | os.PathLike], model_prefix: str | os.PathLike, vocab_size: int,
            model_type: str = "bpe", *, character_coverage: float = 1.0, input_sentence_size: int = 2_000_000,
            special_tokens: Sequence[str] = NANBEIGE_SPECIAL_TOKENS, split_digits: bool = True,
            num_threads: int = 2, seed_sentencepiece_size: int = 200_000) -> "Tokenizer":
    """Trains a SentencePiece model and writes ``<model_prefix>.model`` / ``.vocab``.

    ``texts_or_files``: ``str`` items are texts; ``os.PathLike`` items (e.g. ``pathlib.Path``) are UTF-8 files.
    """
    if model_type not in MODEL_TYPES:
      raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    min_vocab = 4 + len(special_tokens) + 256 + 1  # ids 0-3, the specials, 256 byte pieces, at least one piece
    if vocab_size < min_vocab:
      raise ValueError(f"vocab_size={vocab_size} is too small: byte fallback and {len(special_tokens)} specials need "
                       f">= {min_vocab}")
    prefix = pathlib.Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    sentences = list(_training_sentences(texts_or_files))
    if not sentences:
      raise ValueError("tokenizer training input is empty (no non-blank lines)")
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=iter(sentences), model_prefix=str(prefix), vocab_size=vocab_size, model_type=model_type,
          character_coverage=character_coverage, input_sentence_size=input_sentence_size,
          shuffle_input_sentence=True, seed_sentencepiece_size=seed_sentencepiece_size,
          pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=PAD_PIECE, unk_piece=UNK_PIECE, bos_piece=BOS_PIECE,
          eos_piece=EOS_PIECE, user_defined_symbols=list(special_tokens), byte_fallback=True,
          split_digits=split_digits, normalization_rule_name="identity", remove_extra_whitespaces=False,
          allow_whitespace_only_pieces=True, add_dummy_prefix=False, max_sentence_length=MAX_TRAIN_SENTENCE_BYTES,
          num_threads=num_threads, minloglevel=2)
    except RuntimeError as err:
      raise ValueError(f"sentencepiece training of {str(prefix)!r} (vocab_size={vocab_size}, "
                       f"{len(sentences)} sentences) failed: {err}") from err
    return cls.load(f"{prefix}.model")

  # ---- ids ----------------------------------------------------------------------------------------------------------
  def _find_special_ids(self) -> dict[str, int]:
    special_ids: dict[str, int] = {}
    for piece in (PAD_PIECE, UNK_PIECE, BOS_PIECE, EOS_PIECE, *NANBEIGE_SPECIAL_TOKENS):
      piece_id = self._sp.PieceToId(piece)
      if piece == UNK_PIECE or not self._sp.IsUnknown(piece_id):
        special_ids[piece] = int(piece_id)
    return special_ids

  @property
  def vocab_size(self) -> int:
    return int(self._sp.GetPieceSize())

  @property
  def bos_id(self) -> int:
    return int(self._sp.bos_id())

  @property
  def eos_id(self) -> int:
    return int(self._sp.eos_id())

  @property
  def pad_id(self) -> int:
    """The pad id; Llama-style models define none (-1), in which case 0 is used for padding."""
    pad = int(self._sp.pad_id())
    return pad if pad >= 0 else 0

  @property
  def unk_id(self) -> int:
    return int(self._sp.unk_id())

  @property
  def special_ids(self) -> dict[str, int]:
    """Piece -> id for ``<pad> <unk> <s> </s>`` and those Nanbeige specials the model defines."""
    return dict(self._special_ids)

  def id_to_piece(self, token_id: int) -> str:
    return self._sp.IdToPiece(int(token_id))

  def piece_to_id(self, piece: str) -> int:
    return int(self._sp.PieceToId(piece))

  # ---- encode/decode -------------------------------------------------------------------------------------------
  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no bos/eos added); special tokens in the text come out as single ids."""
    return self._sp.EncodeAsIds(text)

  def _user_defined_symbols(self) -> set[str]:
    from sentencepiece import sentencepiece_model_pb2
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(self._sp.serialized_model_proto())
    user_defined = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
    return {p.piece for p in proto.pieces if p.type == user_defined}

  @property
  def user_defined_pieces(self) -> tuple[str, ...]:
    """The markup-like user-defined symbols (``<...>``, matched atomically in text by ``encode``) that
    ``encode_text`` keeps from matching, longest first. Other user-defined pieces (e.g. whitespace runs some
    vocabularies define) encode as usual."""
    return self._user_defined

  def find_special_text(self, text: str) -> list[str]:
    """The user-defined symbols written literally in ``text``, in order (left to right, longest match)."""
    return self._user_defined_re.findall(text) if self._user_defined_re is not None else []

  def encode_text(self, text: str) -> list[int]:
    """Token ids of ``text`` as plain text: a user-defined symbol written in it never yields its id (see the module
    docstring); text without one encodes exactly as ``encode``."""
    if self._user_defined_re is None:
      return self._sp.EncodeAsIds(text)
    ids: list[int] = []
    start = 0
    for match in self._user_defined_re.finditer(text):
      if match.start() > start:
        ids.extend(self._sp.EncodeAsIds(text[start:match.start()]))
      piece = match.group()
      ids.extend(self._sp.EncodeAsIds(piece[0]))
      ids.extend(self.encode_text(piece[1:]))  # the rest may itself hold a (shorter) symbol
      start = match.end()
    if start < len(text):
      ids.extend(self._sp.EncodeAsIds(text[start:]))
    return ids

  def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    return self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)

  def encode_text_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
    """``encode_text`` of each text (documents: quoted chat markup stays text); texts without a user-defined
    symbol are encoded together in one batched call."""
    texts = list(texts)
    plain = [i for i, t in enumerate(texts) if self._user_defined_re is None or not self._user_defined_re.search(t)]
    out: list[list[int]] = [[] for _ in texts]
    for i, ids in zip(plain, self._sp.Encode([texts[i] for i in plain], out_type=int, num_threads=num_threads)):
      out[i] = ids
    for i in sorted(set(range(len(texts))) - set(plain)):
      out[i] = self.encode_text(texts[i])
    return out

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in ids])

  # ---- identity and checks -------------------------------------------------------------------------------------
  def serialized_model_proto(self) -> bytes:
    return self._sp.serialized_model_proto()

  def fingerprint(self) -> str:
    """First 16 hex chars of the sha256 of the serialized model proto (identifies the vocabulary exactly)."""
    return hashlib.sha256(self.serialized_model_proto()).hexdigest()[:16]

  def check_fits(self, model_vocab_size: int) -> None:
    """Raises ValueError when the tokenizer can emit ids the model's embedding table does not have."""
    if self.vocab_size > model_vocab_size:
      raise ValueError(f"tokenizer {self.source!r} has {self.vocab_size} pieces but the model's vocab_size is "
                       f"{model_vocab_size}; set the model vocab_size >= {self.vocab_size} "
                       f"(e.g. padded_vocab_size({self.vocab_size}) = {padded_vocab_size(self.vocab_size)})")

  def __repr__(self) -> str:
    return f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, fingerprint={self.fingerprint()})"
