"""Gin plumbing shared by every launcher: parse files and bindings, fail with one clear line on bad settings.

Configs are typed dataclasses registered with gin (``@gin_dataclass``); their ``__post_init__`` validates values,
so an unknown or mistyped parameter (gin) and a contradictory value (dataclass) both end as a ``ConfigError``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any, Sequence

import gin
from absl import flags as _absl_flags

# The flags defined by the helpers below belong to the launcher that calls them (absl's ``--help`` lists only the
# main module's flags), not to this module.
_absl_flags.disclaim_key_flags()

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(REPO_ROOT, "configs")


class ConfigError(ValueError):
  """A bad configuration: unknown parameter, wrong type, contradictory values, missing file."""


def gin_dataclass(cls=None, *, module: str = "nanbeige_jax"):
  """Register a dataclass with gin under ``module`` (bindings read ``ClassName.field = value``)."""
  def wrap(c):
    return gin.configurable(c, module=module)
  return wrap if cls is None else wrap(cls)


def _is_remote_gin_file(path: str) -> bool:
  from nanbeige_jax import paths  # pylint: disable=import-outside-toplevel
  return not paths.is_local(path) and paths.is_file(path)


def _open_remote_gin_file(path: str):
  from nanbeige_jax import paths  # pylint: disable=import-outside-toplevel
  return paths.open_file(path, "r")


gin.config.register_file_reader(_open_remote_gin_file, _is_remote_gin_file)  # gs://... gin files (path layer)


def resolve_config_path(path: str) -> str:
  """A gin file path as given (local or any path-layer scheme, e.g. ``gs://``), or relative to the repo's
  ``configs/`` directory."""
  if "://" in path:
    if _is_remote_gin_file(path):
      return path
    raise ConfigError(f"gin file not found: {path!r}")
  for candidate in (path, os.path.join(CONFIG_DIR, path), os.path.join(REPO_ROOT, path)):
    if os.path.exists(candidate):
      return candidate
  raise ConfigError(f"gin file not found: {path!r} (looked in ., {CONFIG_DIR})")


def parse_gin(files: Sequence[str], bindings: Sequence[str] = ()) -> None:
  """Parse gin files then bindings (bindings win). Any gin error becomes a one-line ConfigError."""
  gin.clear_config()
  paths = [resolve_config_path(f) for f in files]
  for p in paths:
    if "://" not in p:
      gin.add_config_file_search_path(os.path.dirname(os.path.abspath(p)))
  gin.add_config_file_search_path(CONFIG_DIR)
  try:
    with _quiet_gin_search():
      gin.parse_config_files_and_bindings(paths, list(bindings), finalize_config=False)
  except (ValueError, KeyError, TypeError, SyntaxError, IOError) as e:
    msg = " ".join(str(e).split())
    raise ConfigError(f"bad gin configuration: {msg}") from None


class _DropPathNotFound(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Path not found")


@contextlib.contextmanager
def _quiet_gin_search():
  """gin logs an ERROR for every search-path prefix an ``include`` is not under before it finds the file."""
  root = logging.getLogger()
  f = _DropPathNotFound()
  root.addFilter(f)
  try:
    yield
  finally:
    root.removeFilter(f)


def build(cls: type) -> Any:
  """Instantiate a gin-registered dataclass, turning validation errors into one-line ConfigErrors."""
  try:
    return cls()
  except (ValueError, TypeError) as e:
    msg = " ".join(str(e).split())
    raise ConfigError(f"invalid {cls.__name__}: {msg}") from None


def check_keys(what: str, given: dict[str, Any], allowed: Sequence[str], required: Sequence[str] = ()) -> None:
  unknown = sorted(set(given) - set(allowed))
  if unknown:
    raise ConfigError(f"{what}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
  missing = sorted(set(required) - set(given))
  if missing:
    raise ConfigError(f"{what}: missing required key(s) {missing}")


def as_dict(obj: Any) -> Any:
  """Dataclass (nested) -> plain JSON-able structure, for metadata."""
  if dataclasses.is_dataclass(obj):
    return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
  if isinstance(obj, dict):
    return {str(k): as_dict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [as_dict(v) for v in obj]
  return obj


def define_gin_flags(default_files: Sequence[str], example_binding: str, flag_values: Any = None) -> None:
  """The absl flags every launcher shares: ``--gin_file`` (repeatable) and ``--gin_param`` (repeatable), listed by
  the launcher's ``--help``. ``flag_values``: the FlagValues to define them in (default: absl's FLAGS)."""
  from absl import flags
  kw = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
  flags.DEFINE_multi_string("gin_file", list(default_files), "Gin files (relative to configs/ or a path).", **kw)
  flags.DEFINE_multi_string("gin_param", [], f"Gin bindings, e.g. {example_binding}.", **kw)


def define_run_flags(default_workdir: str, workdir_help: str, flag_values: Any = None) -> None:
  """The flags of a training launcher: ``--workdir``, ``--fresh``, ``--max_steps`` (listed by its ``--help``)."""
  from absl import flags
  kw = {"flag_values": flags.FLAGS if flag_values is None else flag_values}
  flags.DEFINE_string("workdir", default_workdir, workdir_help, **kw)
  flags.DEFINE_bool("fresh", False, "Start over even if the workdir holds checkpoints (they are moved aside).", **kw)
  flags.DEFINE_integer("max_steps", None, "Stop after this many steps in total (smoke runs).", **kw)
  flags.DEFINE_bool("allow_resume_changes", False, "Resume even though the global batch, sequence length or "
                    "schedule differ from the checkpoint's; the run continues at the checkpoint's token count.", **kw)


def run_flag_bindings(config_name: str, flag_values: Any = None) -> list[str]:
  """Gin bindings for the run flags a user set (``--max_steps``, ``--allow_resume_changes``) on ``config_name``."""
  from absl import flags
  values = flags.FLAGS if flag_values is None else flag_values
  bindings = []
  if values.max_steps is not None:
    bindings.append(f"{config_name}.max_steps = {values.max_steps}")
  if values.allow_resume_changes:
    bindings.append(f"{config_name}.allow_resume_changes = True")
  return bindings


def strict_replace(obj: Any, **changes: Any) -> Any:
  """``dataclasses.replace`` that refuses a field the dataclass does not have (one line naming the class)."""
  names = [f.name for f in dataclasses.fields(obj)]
  unknown = sorted(set(changes) - set(names))
  if unknown:
    raise ValueError(f"{type(obj).__name__} has no field(s) {unknown}; known fields: {names}")
  return dataclasses.replace(obj, **changes)


def key_name(entry: Any) -> str:
  """One key of a pytree key path (DictKey, SequenceKey, GetAttrKey, ...) as text."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def path_str(path: Any, root: str = "") -> str:
  """A pytree key path as ``a/b/0`` (``root`` for the empty path)."""
  return "/".join(key_name(k) for k in path) or root

