"""Orbax checkpoints: the resumable train state and FP teacher variables.

Orbax owns the files and writes them atomically (a temporary directory
renamed on commit), so a crash mid-save leaves the previous checkpoint as the
latest good one. Restores go into an abstract target built with
``jax.eval_shape`` and fail with the lists of missing, unexpected and
mis-shaped keys instead of a deep Orbax traceback.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from absl import logging

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(ValueError):
  """A checkpoint is missing, corrupt or does not match the model."""


def _paths(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  out = {}
  for path, leaf in leaves:
    name = jax.tree_util.keystr(path, simple=True, separator="/")
    out[name] = (tuple(np.shape(leaf)), str(np.dtype(leaf.dtype)))
  return out


def compare_trees(found: Any, expected: Any) -> list[str]:
  """Lines describing missing / unexpected / mis-shaped leaves (empty: match)."""
  f, e = _paths(found), _paths(expected)
  problems = []
  missing = sorted(set(e) - set(f))
  extra = sorted(set(f) - set(e))
  shapes = sorted(k for k in set(e) & set(f) if e[k][0] != f[k][0])
  if missing:
    problems.append("missing keys: " + ", ".join(missing))
  if extra:
    problems.append("unexpected keys: " + ", ".join(extra))
  for k in shapes:
    problems.append(f"shape mismatch at {k}: checkpoint {f[k][0]}, model {e[k][0]}")
  return problems


def _read_metadata(path: str) -> Any:
  try:
    md = ocp.StandardCheckpointer().metadata(path)
  except Exception as err:  # orbax raises several types for broken files
    raise CheckpointError(
        f"cannot read the checkpoint at {path!r} ({type(err).__name__}: "
        f"{err}); it is missing or corrupt. Point the config at a directory "
        "written by this program (e.g. <workdir>/teacher/variables), or "
        "delete it to retrain"
    ) from err
  return getattr(md, "item_metadata", md)


def save_variables(path: str, variables: Any) -> None:
  """Saves a variables tree (e.g. FP ``{params, batch_stats}``) atomically."""
  path = os.path.abspath(path)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, jax.device_get(variables), force=True)
  checkpointer.wait_until_finished()


def restore_variables(path: str, target: Any, what: str = "checkpoint") -> Any:
  """Restores ``path`` into the structure of ``target`` after checking it.

  Args:
    path: an orbax checkpoint directory.
    target: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g. from
      ``jax.eval_shape(model.init, ...)``); dtypes and shardings follow it.
    what: a name for error messages ("teacher checkpoint").

  Raises:
    CheckpointError: the checkpoint is absent, unreadable or its tree differs
      from ``target`` (the message lists every difference).
  """
  path = os.path.abspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(
        f"{what} {path!r} does not exist; set the path to an orbax "
        "checkpoint directory or leave it empty to train one"
    )
  metadata = _read_metadata(path)
  tree = getattr(metadata, "tree", metadata)
  if not jax.tree_util.tree_leaves(tree):
    raise CheckpointError(
        f"{what} {path!r} holds no readable arrays; it is missing or corrupt."
        " Point the config at a directory written by this program, or "
        "delete it to retrain")
  problems = compare_trees(tree, target)
  if problems:
    raise CheckpointError(
        f"{what} {path!r} does not match the model:\n  "
        + "\n  ".join(problems)
        + "\nCheck that config.model matches the model that wrote it."
    )
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  try:
    return ocp.StandardCheckpointer().restore(path, abstract)
  except Exception as err:
    raise CheckpointError(
        f"{what} {path!r} is corrupt: {type(err).__name__}: {err}"
    ) from err


class StateCheckpointer:
  """Latest-N checkpoints of the full train state under one directory."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True,
            # Synchronous: the train step donates its state buffers, so a
            # background save must not outlive the step that follows it.
            enable_async_checkpointing=False,
        ),
    )

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def save_if_new(self, step: int, state: Any) -> None:
    """Saves ``step`` unless it is already the latest checkpoint.

    The final or preempted step of a loop, which the periodic saves may
    have written already.
    """
    if self.latest_step() != step:
      self.save(step, state)

  def restore_latest(self, abstract: Callable[[], Any]) -> Optional[Any]:
    """The latest checkpoint restored into ``abstract()``, or None if none.

    ``abstract`` builds the target structure (e.g. with ``jax.eval_shape``)
    and is only called when there is a checkpoint to restore.
    """
    latest = self.latest_step()
    if latest is None:
      return None
    state = self.restore(latest, abstract())
    logging.info("resumed from %s", self.step_dir(latest))
    return state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, target: Any) -> Any:
    """Restores ``step`` into ``target``'s structure, shapes and shardings."""
    self.wait()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      return self._manager.restore(
          step, args=ocp.args.StandardRestore(abstract)
      )
    except Exception as err:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} cannot be restored "
          f"({type(err).__name__}: {err}). It is corrupt or was written by a "
          "different config; move it away to start fresh"
      ) from err

  def restore_raw(self, step: int) -> Any:
    """Restores ``step`` as saved (numpy leaves), e.g. for inspection."""
    self.wait()
    return self._manager.restore(step, args=ocp.args.StandardRestore())

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
