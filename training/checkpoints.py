"""Committed training checkpoints.

The Trainer writes `checkpoint-N` in place; the checkpoint counts only once `checkpoint_complete.json` (written
atomically with `modeling_unimedvl.atomic_files.write_json`) is in it, after every other file. Resuming takes the last
committed checkpoint; folders without the commit file are what a killed save leaves behind and are removed. Folders
the training code writes itself (`final/`) go through `atomic_files.staged_folder`.
"""

import json
import os
import re
import shutil

from modeling_unimedvl.atomic_files import write_json


COMMIT_NAME = "checkpoint_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def commit_checkpoint(folder: str, global_step: int) -> None:
    """Marks a fully written checkpoint folder as complete."""
    write_json(os.path.join(folder, COMMIT_NAME), {"global_step": global_step, "complete": True})


def _checkpoints(output_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, name)) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return sorted(item for item in found if os.path.isdir(item[1]))


def committed_checkpoints(output_dir: str) -> list[str]:
    """The committed `checkpoint-N` folders of `output_dir`, oldest first."""
    return [path for _, path in _checkpoints(output_dir) if os.path.isfile(os.path.join(path, COMMIT_NAME))]


def last_committed_checkpoint(output_dir: str) -> str | None:
    committed = committed_checkpoints(output_dir)
    return committed[-1] if committed else None


def checkpoint_step(folder: str) -> int:
    """The global step recorded in a committed checkpoint."""
    with open(os.path.join(folder, COMMIT_NAME)) as handle:
        return int(json.load(handle)["global_step"])


def remove_uncommitted(output_dir: str) -> list[str]:
    """Deletes the `checkpoint-N` folders without a commit file (half-written saves); returns their paths."""
    removed = [path for _, path in _checkpoints(output_dir) if not os.path.isfile(os.path.join(path, COMMIT_NAME))]
    for path in removed:
        shutil.rmtree(path)
    return removed


__all__ = [
    "COMMIT_NAME",
    "checkpoint_step",
    "commit_checkpoint",
    "committed_checkpoints",
    "last_committed_checkpoint",
    "remove_uncommitted",
]
