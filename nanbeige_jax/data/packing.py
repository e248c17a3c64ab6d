"""Packing tokenized documents into fixed-length rows (greedy concatenate-and-split).

Each document becomes ``[bos] + tokens + [eos]``. Documents are laid end to end in a row; when the next document does
not fit, its first part fills the rest of the row and the remainder continues at the start of the next row of the
same stream (so training rows carry no padding). Per position:

* ``inputs``: the token; ``targets``: the next token *of the same document*, 0 where there is none;
* ``loss_weights``: 1.0 where a target exists, 0.0 on each document's last token (its eos: nothing is predicted across
  a document boundary) and on padding;
* ``segment_ids``: 1, 2, ... per document piece within the row, 0 on padding;
* ``positions``: 0, 1, ... restarting at every piece.

A document split across rows becomes two pieces: the continuation gets a new segment id and its positions restart
at 0 (it loses attention to its beginning). The last token of a cut piece keeps its real target (the next token of
the document, which starts the next row) with weight 1: that prediction stays inside the document.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

ROW_FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_weights")
_POSITIONS_CACHE: dict[int, np.ndarray] = {}


def document_sequence(token_ids: Sequence[int], bos_id: int, eos_id: int) -> np.ndarray:
  """``[bos] + token_ids + [eos]`` as int32."""
  sequence = np.empty(len(token_ids) + 2, dtype=np.int32)
  sequence[0] = bos_id
  sequence[1:-1] = token_ids
  sequence[-1] = eos_id
  return sequence


def empty_rows(num_rows: int, seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """All-padding rows: inputs ``pad_id``, targets 0, segment_ids 0, positions 0, loss_weights 0."""
  if num_rows < 0 or seq_len <= 0:
    raise ValueError(f"need num_rows >= 0 and seq_len > 0, got num_rows={num_rows}, seq_len={seq_len}")
  return {"inputs": np.full((num_rows, seq_len), pad_id, np.int32),
          "targets": np.zeros((num_rows, seq_len), np.int32),
          "segment_ids": np.zeros((num_rows, seq_len), np.int32),
          "positions": np.zeros((num_rows, seq_len), np.int32),
          "loss_weights": np.zeros((num_rows, seq_len), np.float32)}


def _arange(length: int) -> np.ndarray:
  positions = _POSITIONS_CACHE.get(length)
  if positions is None:
    positions = _POSITIONS_CACHE[length] = np.arange(length, dtype=np.int32)
  return positions


def write_piece(rows: dict[str, np.ndarray], row: int, start: int, sequence: np.ndarray, offset: int, take: int,
                segment_id: int) -> None:
  """Writes ``sequence[offset:offset+take]`` at ``rows[...][row, start:start+take]`` as one segment."""
  stop = start + take
  rows["inputs"][row, start:stop] = sequence[offset:offset + take]
  targets = sequence[offset + 1:offset + take + 1]  # one shorter when the piece ends the document
  rows["targets"][row, start:start + len(targets)] = targets
  rows["loss_weights"][row, start:start + len(targets)] = 1.0
  rows["segment_ids"][row, start:stop] = segment_id
  rows["positions"][row, start:stop] = _arange(take)


def fill_row(rows: dict[str, np.ndarray] | None, row: int, seq_len: int, fetch: Callable[[int], np.ndarray],
             cursor: int, offset: int) -> tuple[int, int]:
  """Fills one row from an infinite document stream, greedily, and returns the advanced ``(cursor, offset)``.

  ``fetch(cursor)`` is the packed sequence (``document_sequence``) of the ``cursor``-th document of the stream;
  ``offset`` is how much of that document earlier rows consumed. With ``rows=None`` only the cursor advances (used
  for the rows other processes build).
  """
  filled = 0
  segment_id = 0
  while filled < seq_len:
    sequence = fetch(cursor)
    remaining = len(sequence) - offset
    take = remaining if remaining < seq_len - filled else seq_len - filled
    if rows is not None:
      segment_id += 1
      write_piece(rows, row, filled, sequence, offset, take, segment_id)
    filled += take
    offset += take
    if offset == len(sequence):
      cursor, offset = cursor + 1, 0
  return cursor, offset


def pack_sequences(sequences: Sequence[np.ndarray], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """Packs a finite list of document sequences in order; the last row is padded. Returns (num_rows, seq_len)."""
  total = sum(len(s) for s in sequences)
  num_rows = -(-total // seq_len)
  rows = empty_rows(num_rows, seq_len, pad_id)
  row, filled, segment_id = 0, 0, 0
  for sequence in sequences:
    offset = 0
    while offset < len(sequence):
      take = min(len(sequence) - offset, seq_len - filled)
      segment_id += 1
      write_piece(rows, row, filled, sequence, offset, take, segment_id)
      offset += take
      filled += take
      if filled == seq_len:
        row, filled, segment_id = row + 1, 0, 0
  return rows
