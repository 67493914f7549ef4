"""Append-only JSONL prediction files that make evaluation runs resumable and re-scorable.

`predictions.jsonl` is only ever appended to (each batch flushed and fsync'ed, `atomic_files.append_lines`), never
rewritten: a run killed at any moment keeps every prediction written before; a partial last line is ended with a
newline before the next append and skipped when read. `run_config.json` is written atomically.
"""

import json
import os

from modeling_unimedvl.atomic_files import append_lines, save_image, write_json
from modeling_unimedvl.loading_checks import read_json_object
from modeling_unimedvl.safetensors_reader import CheckpointError

RUN_CONFIG_NAME = "run_config.json"
PREDICTIONS_NAME = "predictions.jsonl"
IMAGES_FOLDER = "images"


class PredictionStore:
    """Predictions of one run, one JSON object per line, keyed by the record's `id`.

    Existing lines are loaded on creation so a rerun skips finished items; lines that are not JSON (a write cut by a
    crash) are skipped and counted in `truncated_lines`. Each `add` is appended, flushed and fsync'ed, so a crash
    loses at most the batch being written, and nothing written before.

    Raises:
        ValueError: a line that is JSON but not an object with an `"id"` (not a prediction file of this package),
            naming the file and line.
    """

    def __init__(self, path: str):
        self.path = path
        self.items: dict[str, dict] = {}
        self.truncated_lines = 0
        if os.path.isfile(path):
            self._load()

    def _load(self) -> None:
        try:
            handle = open(self.path, encoding="utf-8", errors="strict")
            with handle:
                lines = list(handle)
        except UnicodeDecodeError as error:
            raise ValueError(f"{self.path} is not a UTF-8 predictions file ({error.reason} at byte {error.start}).") from None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                self.truncated_lines += 1
                continue
            if not isinstance(item, dict) or item.get("id") is None:
                what = "has no \"id\"" if isinstance(item, dict) else f"is a JSON {type(item).__name__}, not an object"
                raise ValueError(
                    f"{self.path}:{number}: the prediction row {what}; every line must be a JSON object with the item's "
                    '"id" (a predictions.jsonl written by unimedvl eval).'
                )
            self.items[str(item["id"])] = item

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self.items

    def finished(self, item_id: str, file_key: str | None = None) -> bool:
        """Whether `item_id` has a prediction and, with `file_key`, the file its prediction names under that key
        still exists (a generated image deleted since is made again)."""
        item = self.items.get(str(item_id))
        return item is not None and (file_key is None or os.path.isfile(item[file_key]))

    def __len__(self) -> int:
        return len(self.items)

    def input_report(self) -> dict:
        """The file's line counts in the shape of `records.InputReport.to_dict()` (for re-scoring runs)."""
        skipped = {"malformed_json": self.truncated_lines} if self.truncated_lines else {}
        return {
            "rows_read": len(self.items) + self.truncated_lines,
            "rows_kept": len(self.items),
            "rows_skipped": self.truncated_lines,
            "skipped_by_reason": skipped,
            "examples": [],
        }

    def add(self, items: list[dict]) -> None:
        """Appends `items` (dicts with an `"id"`) as one flushed and fsync'ed write."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        append_lines(self.path, [json.dumps(item, ensure_ascii=False) for item in items])
        for item in items:
            self.items[str(item["id"])] = item


def file_stem(item_id: str) -> str:
    """A file-name-safe version of an item id (characters other than letters, digits, `-_.` become `_`)."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in str(item_id))


def prediction_images_folder(output_dir: str) -> str:
    """`output_dir/images`, created when missing: the folder of the images a generation run writes."""
    folder = os.path.join(output_dir, IMAGES_FOLDER)
    os.makedirs(folder, exist_ok=True)
    return folder


def save_prediction_image(image, folder: str, item_id: str) -> str:
    """Writes the PIL `image` of prediction `item_id` atomically as `folder/<file_stem(item_id)>.png`; returns that
    path."""
    path = os.path.join(folder, f"{file_stem(item_id)}.png")
    save_image(image, path)
    return path


def load_run_config(folder: str) -> dict:
    """The `run_config.json` saved in `folder`, or {} when there is none."""
    path = os.path.join(folder, RUN_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    return _read_run_config(path)


def _read_run_config(path: str) -> dict:
    try:
        return read_json_object(path)
    except CheckpointError as error:
        raise ValueError(f"{error} Delete it or pass --overwrite.") from None


def open_run(output_dir: str, config: dict, overwrite: bool = False) -> PredictionStore:
    """The run's [`PredictionStore`] (`predictions.jsonl`) after checking `run_config.json`.

    A folder whose saved settings differ is refused (resuming would mix settings); `overwrite` deletes the old
    predictions and starts afresh.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output-dir {output_dir} is a file; give a folder.")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_CONFIG_NAME)
    predictions_path = os.path.join(output_dir, PREDICTIONS_NAME)
    if overwrite and os.path.isfile(predictions_path):
        os.remove(predictions_path)
    if os.path.isfile(path) and not overwrite:
        saved = _read_run_config(path)
        changed = sorted(key for key in set(saved) | set(config) if saved.get(key) != config.get(key))
        if changed:
            raise ValueError(
                f"{output_dir} holds predictions made with different settings ({', '.join(changed)}); resuming would "
                "mix them. Use a new output folder, or pass --overwrite to delete the old predictions."
            )
    write_json(path, config, sort_keys=True)
    return PredictionStore(predictions_path)


__all__ = [
    "PredictionStore",
    "file_stem",
    "prediction_images_folder",
    "save_prediction_image",
    "load_run_config",
    "open_run",
    "RUN_CONFIG_NAME",
    "PREDICTIONS_NAME",
    "IMAGES_FOLDER",
]
