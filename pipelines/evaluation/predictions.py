"""Append-only JSONL prediction files that make evaluation runs resumable and re-scorable."""

import json
import os

RUN_CONFIG_NAME = "run_config.json"
PREDICTIONS_NAME = "predictions.jsonl"


class PredictionStore:
    """Predictions of one run, one JSON object per line, keyed by the record's `id`.

    Existing lines are loaded on creation so a rerun skips finished items; a truncated last line (a run killed while
    writing) is dropped and counted in `truncated_lines`. Each `add` is flushed so a crash loses at most one batch.
    """

    def __init__(self, path: str):
        self.path = path
        self.items: dict[str, dict] = {}
        self.truncated_lines = 0
        if os.path.isfile(path):
            self._load()

    def _load(self) -> None:
        valid_lines = []
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError:
                    self.truncated_lines += 1
                    continue
                self.items[str(item["id"])] = item
                valid_lines.append(json.dumps(item, ensure_ascii=False))
        if self.truncated_lines:  # rewrite without the broken lines so later appends stay parseable
            with open(self.path, "w", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in valid_lines)

    def __contains__(self, item_id: str) -> bool:
        return str(item_id) in self.items

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
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for item in items:
                self.items[str(item["id"])] = item
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")
            handle.flush()


def file_stem(item_id: str) -> str:
    """A file-name-safe version of an item id (characters other than letters, digits, `-_.` become `_`)."""
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in str(item_id))


def load_run_config(folder: str) -> dict:
    """The `run_config.json` saved in `folder`, or {} when there is none."""
    path = os.path.join(folder, RUN_CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def open_run(output_dir: str, config: dict, overwrite: bool = False) -> PredictionStore:
    """The run's [`PredictionStore`] (`predictions.jsonl`) after checking `run_config.json`.

    A folder whose saved settings differ is refused (resuming would mix settings); `overwrite` deletes the old
    predictions and starts afresh.
    """
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, RUN_CONFIG_NAME)
    predictions_path = os.path.join(output_dir, PREDICTIONS_NAME)
    if overwrite and os.path.isfile(predictions_path):
        os.remove(predictions_path)
    if os.path.isfile(path) and not overwrite:
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        changed = sorted(key for key in set(saved) | set(config) if saved.get(key) != config.get(key))
        if changed:
            raise ValueError(
                f"{output_dir} holds predictions made with different settings ({', '.join(changed)}); resuming would "
                "mix them. Use a new output folder, or pass --overwrite to delete the old predictions."
            )
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)
    return PredictionStore(predictions_path)


__all__ = ["PredictionStore", "file_stem", "load_run_config", "open_run", "RUN_CONFIG_NAME", "PREDICTIONS_NAME"]
