"""The checkpoint layer's errors, and the line between corruption (a step's bytes are bad: fall back past it) and a
storage failure (permission, network filesystem, timeout: retry; never move the step aside)."""
from __future__ import annotations


class CheckpointError(RuntimeError):
  """A checkpoint is missing, incomplete, corrupt, or does not match what the caller asked for."""


class CorruptCheckpointError(CheckpointError):
  """The step's bytes are bad: an array's checksum differs, array data cannot be decoded, an item is missing or its
  JSON is unreadable. Fallback may move such a step aside."""


class CheckpointReadError(CheckpointError):
  """Reading failed for a reason that says nothing about the step's bytes (permission denied, network filesystem
  unavailable, timeout): retry later; never a reason to move the step aside."""


_TRANSIENT_TYPES = (PermissionError, ConnectionError, TimeoutError, InterruptedError, BlockingIOError)
_TRANSIENT_CODES = ("PERMISSION_DENIED", "UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED",
                    "CANCELLED", "UNAUTHENTICATED")


def is_transient(err: BaseException) -> bool:
  """Whether ``err`` (or an exception it was raised from) is an I/O failure of the storage, not of the data:
  the OS's permission/connection/timeout errors, or tensorstore's statuses with those codes."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, _TRANSIENT_TYPES) or any(code in str(err) for code in _TRANSIENT_CODES):
      return True
    err = err.__cause__ or err.__context__
  return False


def read_failure(message: str, err: BaseException) -> CheckpointError:
  """The error for a failed read of checkpoint bytes: transient (CheckpointReadError) or corruption."""
  if is_transient(err):
    return CheckpointReadError(f"{message}: {type(err).__name__}: {err} (a storage error, not corruption: the step "
                               f"is left in place; retry once the filesystem is reachable)")
  return CorruptCheckpointError(f"{message}: {type(err).__name__}: {err}")
