"""Reading evaluation sets (JSON / JSONL) into validated records, with bad rows counted instead of crashing a run.

Supported layouts (field names are matched case-sensitively, first match wins):

- VQA: VQA-RAD (`qid, image_name, question, answer, answer_type, question_type, image_organ`), SLAKE
  (`qid, img_name, question, answer, answer_type, content_type, location`, English rows only when `q_lang` is set),
  and generic rows (`id, image, question, answer, answer_type, question_type, organ`).
- Reports: MedPix 2.0 `descriptions_*.jsonl` (image + `Description.Caption`), MedPix 2.0 `data_*.jsonl` (case images
  `TAC` + `MRI` + `Case.Findings`), and generic rows (`id, image, report`).
- Generation: generic rows (`id, prompt, image` = a real image of the same kind, optional `modality`); MedPix
  descriptions rows (prompt = caption, modality = `Description.Modality`).
- Image-to-image: generic rows (`id, image` = source, `target`, `instruction`, optional `task`).
"""

import json
import os
from collections import Counter
from dataclasses import dataclass, field

_MAX_EXAMPLES = 10
_IMAGE_SUFFIXES = ("", ".png", ".jpg", ".jpeg")


@dataclass
class InputReport:
    """Counts of rows read, kept and skipped (by reason), with the first few problems spelled out."""

    rows_read: int = 0
    rows_kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str, where: str) -> None:
        self.skipped[reason] += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{where}: {reason}")

    def to_dict(self) -> dict:
        return {
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rows_skipped": sum(self.skipped.values()),
            "skipped_by_reason": dict(sorted(self.skipped.items())),
            "examples": list(self.examples),
        }


def read_rows(path: str, report: InputReport) -> list[tuple[str, object]]:
    """Rows of a JSON list / JSONL file as `(location, row)`; unparsable JSONL lines are counted as `malformed_json`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Evaluation data file {path} does not exist.")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON ({error}); use a JSON list or a .jsonl file.") from error
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise ValueError(f"{path} must hold a JSON list of rows (or {{'data': [...]}}), got {type(data).__name__}.")
        report.rows_read += len(data)
        return [(f"{path}[{index}]", row) for index, row in enumerate(data)]
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        report.rows_read += 1
        try:
            rows.append((f"{path}:{number}", json.loads(line)))
        except json.JSONDecodeError:
            report.skip("malformed_json", f"{path}:{number}")
    return rows


def _first(row: dict, keys: tuple[str, ...]):
    for key in keys:
        value = row.get(key)
        if value not in (None, ""):
            return value
    return None


def _nested(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def resolve_image(name: str, image_dir: str) -> str | None:
    """Absolute path of an image given as a path or a bare name (MedPix names have no suffix); None if missing."""
    candidates = [name] if os.path.isabs(name) else [os.path.join(image_dir, name)]
    for candidate in candidates:
        for suffix in _IMAGE_SUFFIXES:
            if os.path.isfile(candidate + suffix):
                return os.path.abspath(candidate + suffix)
    return None


def default_image_dir(data_path: str) -> str:
    """`<data folder>/images` when it exists (VQA-RAD, MedPix layout), else the data folder itself."""
    folder = os.path.dirname(os.path.abspath(data_path))
    images = os.path.join(folder, "images")
    return images if os.path.isdir(images) else folder


def _require(row, where: str, report: InputReport, fields: dict[str, tuple[str, ...]]) -> dict | None:
    if not isinstance(row, dict):
        report.skip("row_not_an_object", where)
        return None
    values = {}
    for name, keys in fields.items():
        value = _first(row, keys) if not keys[0].count(".") else _nested(row, keys[0])
        if value is None:
            report.skip(f"missing_field:{name}", where)
            return None
        values[name] = value
    return values


def _with_image(values: dict, key: str, image_dir: str, where: str, report: InputReport) -> bool:
    path = resolve_image(str(values[key]), image_dir)
    if path is None:
        report.skip(f"missing_image:{key}", where)
        return False
    values[key] = path
    return True


class _UniqueRecords:
    """Collects records with distinct ids up to `limit`; a repeated id is skipped as `duplicate_id` in `report`."""

    def __init__(self, report: InputReport, limit: int | None):
        self.report, self.limit, self.items, self.seen = report, limit, [], set()

    def add(self, record: dict, where: str) -> bool:
        """Keeps `record` unless its id was seen; returns True once `limit` records are kept."""
        if record["id"] in self.seen:
            self.report.skip("duplicate_id", where)
            return False
        self.seen.add(record["id"])
        self.items.append(record)
        return self.limit is not None and len(self.items) >= self.limit

    def result(self) -> tuple[list[dict], InputReport]:
        self.report.rows_kept = len(self.items)
        return self.items, self.report


def load_vqa_records(path: str, image_dir: str | None = None, limit: int | None = None):
    """VQA records `{id, image, question, answer, answer_type, question_type, organ}` and an [`InputReport`].

    `answer_type` is upper-cased and stripped (VQA-RAD has `"CLOSED "` typos); rows whose type is neither CLOSED nor
    OPEN are skipped as `bad_answer_type`. Ids are `str(qid)`; a duplicate id is skipped as `duplicate_id`.
    """
    report, image_dir = InputReport(), image_dir or default_image_dir(path)
    records = _UniqueRecords(report, limit)
    fields = {
        "id": ("qid", "id", "question_id"),
        "image": ("image_name", "img_name", "image", "image_path"),
        "question": ("question",),
        "answer": ("answer",),
        "answer_type": ("answer_type",),
    }
    for where, row in read_rows(path, report):
        if isinstance(row, dict) and row.get("q_lang") not in (None, "en"):
            report.skip("not_english", where)
            continue
        values = _require(row, where, report, fields)
        if values is None or not _with_image(values, "image", image_dir, where, report):
            continue
        values["id"], values["answer"] = str(values["id"]), str(values["answer"])
        values["answer_type"] = str(values["answer_type"]).strip().upper()
        if values["answer_type"] not in ("CLOSED", "OPEN"):
            report.skip("bad_answer_type", where)
            continue
        values["question_type"] = _first(row, ("question_type", "content_type"))
        values["organ"] = _first(row, ("image_organ", "organ", "location"))
        if records.add(values, where):
            break
    return records.result()


def load_report_records(path: str, image_dir: str | None = None, max_images: int = 1, limit: int | None = None):
    """Image + report records `{id, images: [paths], report}` and an [`InputReport`].

    MedPix descriptions rows give caption pairs (`id` = image name); MedPix case rows give findings pairs with up to
    `max_images` of the case's CT (`TAC`) then MR (`MRI`) images (`id` = `U_id`); generic rows need `id, image, report`.
    """
    report, image_dir = InputReport(), image_dir or default_image_dir(path)
    records = _UniqueRecords(report, limit)
    for where, row in read_rows(path, report):
        if isinstance(row, dict) and "Case" in row:
            values = _require(row, where, report, {"id": ("U_id",), "report": ("Case.Findings",)})
            names = (row.get("TAC") or []) + (row.get("MRI") or [])
            if values is not None and not names:
                report.skip("missing_field:images", where)
                values = None
        elif isinstance(row, dict) and "Description" in row:
            values = _require(row, where, report, {"report": ("Description.Caption",)})
            if values is not None:
                values["id"] = row.get("image")
                names = [row.get("image")] if row.get("image") else []
                if not names:
                    report.skip("missing_field:image", where)
                    values = None
        else:
            values = _require(
                row, where, report, {"id": ("id",), "image": ("image",), "report": ("report", "findings", "caption")}
            )
            names = [values["image"]] if values else []
        if values is None:
            continue
        paths = [resolve_image(str(name), image_dir) for name in names[:max_images]]
        if any(image is None for image in paths):
            report.skip("missing_image:image", where)
            continue
        record = {"id": str(values["id"]), "images": paths, "report": str(values["report"]).strip()}
        if records.add(record, where):
            break
    return records.result()


def load_generation_records(path: str, image_dir: str | None = None, limit: int | None = None):
    """Text-to-image records `{id, prompt, image (real reference), modality}` and an [`InputReport`].

    MedPix descriptions rows: prompt = caption, modality = `Description.Modality` (e.g. "CT - noncontrast").
    Generic rows: `id, prompt, image`, optional `modality` (default "all").
    """
    report, image_dir = InputReport(), image_dir or default_image_dir(path)
    records = _UniqueRecords(report, limit)
    for where, row in read_rows(path, report):
        if isinstance(row, dict) and "Description" in row:
            values = _require(row, where, report, {"prompt": ("Description.Caption",)})
            if values is not None:
                values.update(
                    id=row.get("image"), image=row.get("image"), modality=_nested(row, "Description.Modality")
                )
                if not values["image"]:
                    report.skip("missing_field:image", where)
                    values = None
        else:
            values = _require(row, where, report, {"id": ("id",), "prompt": ("prompt", "caption"), "image": ("image",)})
            if values is not None:
                values["modality"] = row.get("modality")
        if values is None or not _with_image(values, "image", image_dir, where, report):
            continue
        values["id"], values["modality"] = str(values["id"]), str(values["modality"] or "all")
        if records.add(values, where):
            break
    return records.result()


def load_i2i_records(path: str, image_dir: str | None = None, limit: int | None = None):
    """Image-to-image records `{id, image (source), target, instruction, task}` and an [`InputReport`]."""
    report, image_dir = InputReport(), image_dir or default_image_dir(path)
    records = _UniqueRecords(report, limit)
    fields = {
        "id": ("id",),
        "image": ("image", "source"),
        "target": ("target",),
        "instruction": ("instruction", "prompt"),
    }
    for where, row in read_rows(path, report):
        values = _require(row, where, report, fields)
        if values is None:
            continue
        if not _with_image(values, "image", image_dir, where, report) or not _with_image(
            values, "target", image_dir, where, report
        ):
            continue
        values["id"], values["task"] = str(values["id"]), str(row.get("task") or "all")
        if records.add(values, where):
            break
    return records.result()


__all__ = [
    "InputReport",
    "read_rows",
    "resolve_image",
    "default_image_dir",
    "load_vqa_records",
    "load_report_records",
    "load_generation_records",
    "load_i2i_records",
]
