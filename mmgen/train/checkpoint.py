"""Orbax checkpoints of the training state and the input pipeline's position.

One ``CheckpointManager`` per workdir (``workdir/checkpoints/<step>/``) with two
items: ``state`` (the sharded NNX state, written asynchronously by every process)
and ``data`` (each process's iterator state as ``process_<i>-of-<n>.json``).
Keeps the newest ``keep_last`` and the best ``keep_best`` by ``best_metric``.
Orbax writes a step into a temporary directory and renames it only when every
item is complete, so a save killed half-way leaves no directory that looks like a
checkpoint; ``cleanup_tmp_directories`` removes such leftovers at the next start.
Restoring takes the target shardings, so a checkpoint written on one mesh loads on
any other (resharding restore).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from orbax.checkpoint import checkpoint_managers as policies

log = logging.getLogger(__name__)


class DataIteratorHandler(ocp.CheckpointHandler):
    """Saves/restores an iterator's ``get_state()`` (bytes or JSON-able) per process."""

    def save(self, directory: epath.Path, args: "DataIteratorSave"):
        state = args.iterator.get_state()
        payload = {"bytes": state.decode()} if isinstance(state, bytes) else {"json": state}
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (directory / name).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataIteratorRestore"):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        path = directory / name
        if not path.exists():
            # Written by a different number of processes: the caller re-positions the
            # pipeline from the step count instead.
            return False
        payload = json.loads(path.read_text())
        state = payload["bytes"].encode() if "bytes" in payload else payload["json"]
        args.iterator.set_state(state)
        return True

    def metadata(self, directory):
        return None

    def structure(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataIteratorHandler, for_save=True)
@dataclasses.dataclass
class DataIteratorSave(ocp.args.CheckpointArgs):
    iterator: Any


@ocp.args.register_with_handler(DataIteratorHandler, for_restore=True)
@dataclasses.dataclass
class DataIteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any


class Checkpointer:
    """The workdir's checkpoints: save (async), keep last/best N, restore onto any mesh."""

    def __init__(self, workdir: str, *, keep_last: int = 3, keep_best: int = 0,
                 best_metric: str | None = None, best_mode: str = "min", async_save: bool = True,
                 read_only: bool = False):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.best_metric = best_metric
        keep = [policies.LatestN(n=max(int(keep_last), 1))]
        if keep_best and best_metric:
            keep.append(policies.BestN(
                get_metric_fn=lambda m: m[best_metric], reverse=(best_mode == "min"),
                n=int(keep_best), keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policies.AnyPreservationPolicy(keep),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=not read_only,
            create=not read_only,
            read_only=read_only,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": DataIteratorHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state, data_iterator=None, metrics: dict | None = None, force: bool = False) -> bool:
        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None and hasattr(data_iterator, "get_state"):
            items["data"] = DataIteratorSave(data_iterator)
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        return self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=force)

    def restore(self, step: int, abstract_state, data_iterator=None):
        """Restore ``state`` into the shapes/shardings of ``abstract_state``.

        Returns ``(state, data_restored)``; ``data_restored`` is False when the
        checkpoint holds no iterator state for this process layout.
        """
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        step_dir = epath.Path(self.directory) / str(step)
        has_data = (step_dir / "data").exists()
        if data_iterator is not None and has_data and hasattr(data_iterator, "set_state"):
            items["data"] = DataIteratorRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], bool(restored.get("data", False)) if "data" in items else False

    def restore_parts(self, step: int, abstract_state, parts) -> nnx.State:
        """Only the entries ``parts`` of a saved state (e.g. ``("model", "ema")``), into the
        shapes/shardings of ``abstract_state[part]``.

        Reads just those arrays (an Orbax partial restore), from a whole training state or
        from a weights-only one (``adapters merge``); a part the checkpoint lacks is an error.
        """
        item = nnx.State({p: abstract_state[p] for p in parts})
        restore_args = ocp.checkpoint_utils.construct_restore_args(item)
        item_dir = os.path.join(self.directory, str(step), "state")
        restored = ocp.PyTreeCheckpointer().restore(
            item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True))
        missing = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(restored)
                   if isinstance(leaf, jax.ShapeDtypeStruct)]  # targets a partial restore did not find
        if missing:
            raise ValueError(f"checkpoint {item_dir} lacks {len(missing)} arrays of {list(parts)}, e.g. {missing[0]}")
        return restored

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def reached_preemption(self, step: int) -> bool:
        try:
            return self.manager.reached_preemption(step)
        except Exception:  # no preemption service outside multi-process jobs
            return False

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
