"""The path layer: every non-orbax file a run reads or writes goes through here, on local disk or any URI scheme.

Built on ``etils.epath`` (what orbax and grain use): ``gs://``, ``s3://``, ``az://`` and ``hf://`` go to fsspec
(``gs://`` needs ``gcsfs``: ``pip install nanbeige-jax[gcs]``; with TensorFlow installed epath uses ``tf.io.gfile``
instead). ``register_fsspec_scheme`` adds any other fsspec protocol; ``memory://`` (fsspec's in-memory filesystem,
one per process) is registered at import, so tests exercise the non-local code paths without a network.

Semantics the callers rely on:

* ``write_text``/``write_bytes`` are atomic: a reader sees the old content or the new one, never a part. On local
  disk the data goes to a temporary file in the same directory, is fsynced, then ``os.replace``d over the target.
  On an object store one object upload is already atomic (the object appears when the upload completes; a rename
  there would be a copy), so the object is written directly.
* ``append_text`` appends in place on local disk; an object store has no append, so there it rewrites the object
  (O(size): fine for occasional appends; writers that append often stage locally, see ``metrics.MetricsWriter``).
* ``glob`` supports ``**`` on local disk only (on object stores a recursive glob is one listing per prefix).
* ``orbax_directory`` is what a checkpoint manager must be given: local paths made absolute, URIs unchanged.
"""
from __future__ import annotations

import functools
import glob as glob_lib
import os
import shutil
import tempfile
from typing import Any, ClassVar, Union

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath as epath_gpath

PathLike = Union[str, os.PathLike]
Path = epath.Path


def scheme(path: PathLike) -> str | None:
  """``"gs"`` for ``gs://b/x``, None for a local path."""
  text = os.fspath(path)
  return text.split("://", 1)[0] if "://" in text else None


def is_local(path: PathLike) -> bool:
  return scheme(path) in (None, "file")


def _strip_file_scheme(path: PathLike) -> PathLike:
  text = os.fspath(path) if not isinstance(path, str) else path
  return text[len("file://"):] if isinstance(text, str) and text.startswith("file://") else path


def as_path(path: PathLike) -> epath.Path:
  """An ``epath.Path`` for a local path or URI; ``~`` is expanded on local paths. Raises ValueError for a scheme
  no backend handles."""
  if isinstance(path, epath_gpath._GPath) and not is_local(path):  # pylint: disable=protected-access
    return path
  path = _strip_file_scheme(path)
  if is_local(path):
    return epath.Path(os.path.expanduser(os.fspath(path)))
  try:
    return epath.Path(os.fspath(path))
  except KeyError:
    known = sorted(p[:-3] for p in epath.register._URI_PREFIXES_TO_CLS)  # pylint: disable=protected-access
    raise ValueError(f"path {os.fspath(path)!r}: unknown scheme {scheme(path)!r}:// (known: {known}); register an "
                     "fsspec protocol with nanbeige_jax.paths.register_fsspec_scheme") from None


def join(path: PathLike, *parts: str) -> str:
  """``path/part/...`` as a string, keeping the scheme (``join("gs://b", "x")`` is ``"gs://b/x"``)."""
  return os.fspath(as_path(path).joinpath(*parts))


def orbax_directory(path: PathLike) -> epath.Path:
  """The directory to give orbax: a local path expanded and made absolute, a URI unchanged (``gs://b/x`` stays
  ``gs://b/x``; ``pathlib.Path("gs://b/x").absolute()`` would be a local folder ``./gs:/b/x``)."""
  if is_local(path):
    return epath.Path(os.path.abspath(os.path.expanduser(os.fspath(_strip_file_scheme(path)))))
  return as_path(path)


def same_path(a: PathLike, b: PathLike) -> bool:
  """Whether ``a`` and ``b`` name the same file (local: after resolving links and ``..``; URIs: as written)."""
  if is_local(a) and is_local(b):
    return os.path.realpath(os.fspath(as_path(a))) == os.path.realpath(os.fspath(as_path(b)))
  return os.fspath(as_path(a)).rstrip("/") == os.fspath(as_path(b)).rstrip("/")


# ---- queries --------------------------------------------------------------------------------------------------------
def exists(path: PathLike) -> bool:
  return as_path(path).exists()


def is_file(path: PathLike) -> bool:
  p = as_path(path)
  return p.exists() and not p.is_dir()


def is_dir(path: PathLike) -> bool:
  return as_path(path).is_dir()


def has_magic(pattern: PathLike) -> bool:
  return glob_lib.has_magic(os.fspath(pattern))


def glob(pattern: PathLike) -> list[str]:
  """Sorted matches of ``pattern`` (files and directories), with the pattern's scheme kept."""
  text = os.fspath(_strip_file_scheme(pattern))
  if is_local(text):
    return sorted(glob_lib.glob(os.path.expanduser(text), recursive=True))
  if "**" in text:
    raise ValueError(f"glob {text!r}: recursive '**' is supported on local paths only")
  head, _, _ = text.partition("://")
  parts = text[len(head) + 3:].split("/")
  root_parts: list[str] = []
  for part in parts:
    if glob_lib.has_magic(part):
      break
    root_parts.append(part)
  rest = "/".join(parts[len(root_parts):])
  root = as_path(f"{head}://" + "/".join(root_parts))
  if not rest:
    return [os.fspath(root)] if root.exists() else []
  return sorted(os.fspath(p) for p in root.glob(rest))


def size(path: PathLike) -> int:
  return int(as_path(path).stat().length)


# ---- directories and files ------------------------------------------------------------------------------------------
def mkdir(path: PathLike) -> epath.Path:
  """Creates ``path`` and its parents (no-op when it exists; object stores have no directories to create)."""
  p = as_path(path)
  p.mkdir(parents=True, exist_ok=True)
  return p


def remove(path: PathLike, missing_ok: bool = True) -> None:
  as_path(path).unlink(missing_ok=missing_ok)


def rmtree(path: PathLike) -> None:
  p = as_path(path)
  if p.exists():
    p.rmtree()


def open_file(path: PathLike, mode: str = "r") -> Any:
  """A file object (``r``/``w``/``a`` with optional ``b``); plain writes through it are not atomic."""
  return as_path(path).open(mode)


def read_bytes(path: PathLike) -> bytes:
  return as_path(path).read_bytes()


def read_text(path: PathLike) -> str:
  return as_path(path).read_text(encoding="utf-8")


def write_bytes(path: PathLike, data: bytes, *, atomic: bool = True) -> None:
  """Writes ``data`` to ``path`` (parents created); atomic by default (see the module docstring)."""
  p = as_path(path)
  if not is_local(p):
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as handle:  # one object upload: visible only once complete
      handle.write(data)
    return
  directory = os.path.dirname(os.path.abspath(os.fspath(p)))
  os.makedirs(directory, exist_ok=True)
  if not atomic:
    with open(os.fspath(p), "wb") as handle:
      handle.write(data)
    return
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{p.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as handle:
      handle.write(data)
      handle.flush()
      os.fsync(handle.fileno())
    os.replace(tmp, os.fspath(p))
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def write_text(path: PathLike, text: str, *, atomic: bool = True) -> None:
  write_bytes(path, text.encode("utf-8"), atomic=atomic)


def append_text(path: PathLike, text: str) -> None:
  """Appends ``text`` (e.g. JSONL lines) to ``path``, creating it; on object stores the object is rewritten."""
  p = as_path(path)
  if is_local(p):
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(p))), exist_ok=True)
    with open(os.fspath(p), "a", encoding="utf-8") as handle:
      handle.write(text)
    return
  old = p.read_bytes() if p.exists() else b""
  write_bytes(p, old + text.encode("utf-8"))


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves a file or directory tree ``src`` to ``dst`` (parents of ``dst`` created). Local: ``os.replace`` (atomic
  on one filesystem). Object stores have no rename: the objects are copied, then the source deleted, so a reader may
  briefly see both; callers move only what no other process is reading (a quarantined checkpoint, a run set aside)."""
  source, target = as_path(src), as_path(dst)
  if is_local(source) and is_local(target):
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(target))), exist_ok=True)
    os.replace(os.fspath(source), os.fspath(target))
    return
  if scheme(source) != scheme(target):
    raise ValueError(f"rename {os.fspath(source)!r} -> {os.fspath(target)!r}: across schemes (copy instead)")
  target.parent.mkdir(parents=True, exist_ok=True)
  source.rename(target)


def copy(src: PathLike, dst: PathLike) -> None:
  """Copies one file across any two schemes (streamed; parents of ``dst`` created; ``dst`` overwritten). The
  destination is written atomically when local (temporary file, then rename) and as one object upload otherwise."""
  source, target = as_path(src), as_path(dst)
  if is_local(target):
    directory = os.path.dirname(os.path.abspath(os.fspath(target)))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
      with source.open("rb") as reader, os.fdopen(fd, "wb") as writer:
        shutil.copyfileobj(reader, writer, 16 << 20)
      os.replace(tmp, os.fspath(target))
    except BaseException:
      if os.path.exists(tmp):
        os.unlink(tmp)
      raise
    return
  target.parent.mkdir(parents=True, exist_ok=True)
  with source.open("rb") as reader, target.open("wb") as writer:
    shutil.copyfileobj(reader, writer, 16 << 20)


def local_copy(path: PathLike, cache_dir: PathLike) -> str:
  """A local file with ``path``'s content: ``path`` itself when local, else a copy under ``cache_dir`` (kept and
  reused: the name encodes the full URI, and a cached copy is only ever complete, since ``copy`` renames it into
  place)."""
  if is_local(path):
    return os.fspath(_strip_file_scheme(path))
  text = os.fspath(path)
  name = text.replace("://", "/").replace("/", "__")
  target = os.path.join(os.fspath(cache_dir), name)
  if not os.path.exists(target):
    copy(text, target)
  return target


# ---- run directories ------------------------------------------------------------------------------------------------
def resolve_run_dirs(path: PathLike, *, what: str = "checkpoint directory") -> tuple[epath.Path, epath.Path]:
  """``(checkpoint directory, run workdir)`` of ``path``, which names either a run workdir (holding
  ``checkpoints/``) or a checkpoint directory (its parent is then the run workdir); ValueError when ``path`` does not
  exist. The one resolution the trainers' ``init_from``, ``launch/eval.py`` and the refinement models use."""
  p = as_path(path)
  if not p.is_dir():
    raise ValueError(f"{what} {os.fspath(path)!r} does not exist")
  if (p / "checkpoints").is_dir():
    return p / "checkpoints", p
  return p, p.parent


# ---- extra fsspec schemes -------------------------------------------------------------------------------------------
class _SchemeBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  """epath's fsspec backend bound to one protocol."""

  def __init__(self, protocol: str):
    self.protocol = protocol

  def fs(self, path: PathLike) -> Any:
    del path
    return self._get_filesystem(self.protocol)


@functools.cache
def register_fsspec_scheme(protocol: str) -> type:
  """Makes ``<protocol>://`` paths work in ``epath.Path`` (hence in this module) through fsspec's filesystem of
  that protocol. epath dispatches a URI by its prefix to a registered Path class; its own class serves a fixed set of
  schemes, so this registers a subclass that maps ``<protocol>://a/b`` to the same internal form and binds the
  fsspec backend to ``protocol``. Returns the class; registering twice is a no-op."""
  if protocol in ("gs", "s3", "az", "hf", "file") or not protocol.isidentifier():
    raise ValueError(f"register_fsspec_scheme: {protocol!r} is built in or not a protocol name")
  backend = _SchemeBackend(protocol)
  prefix = f"{protocol}://"

  class SchemePath(epath_gpath.PosixGPath):
    _SCHEME: ClassVar[str] = protocol

    def __new__(cls, *parts: PathLike):
      full = "/".join(os.fspath(p) for p in parts)
      if full.startswith(prefix):
        full = f"/{protocol}/" + full[len(prefix):]
      return super().__new__(cls, full)

    @property
    def _uri_scheme(self) -> str | None:
      if len(self.parts) >= 2 and self.parts[0] == "/" and self.parts[1] == protocol:
        return protocol
      return None

    @property
    def _backend(self) -> epath_backend.Backend:
      return backend if self._uri_scheme else epath_backend.os_backend

  SchemePath.__name__ = SchemePath.__qualname__ = f"{protocol.capitalize()}Path"
  epath.register_path_cls(prefix)(SchemePath)
  return SchemePath


register_fsspec_scheme("memory")
