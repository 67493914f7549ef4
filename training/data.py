"""Training records of UniMedVL: loading (UniMedVL JSONL, LLaVA-style JSONL, `datasets` datasets) and validation.

Every loader produces a `datasets.Dataset` with one normalised schema (`RECORD_FEATURES`):

- `task`: one of `TASKS` — `understanding` (VQA, reports: images → conversation), `text_to_image` (prompt → image),
  `image_to_image` (input image → instruction → optional text → target image; editing, super-resolution, modality
  translation) or `counterfactual` (input image → instruction → target image → explanation text);
- `input_images` / `output_images`: lists of `datasets.Image(decode=False)` entries (`{"path", "bytes"}`);
- `messages`: `[{"from": "human" | "gpt", "value": str}]`; `<image>` marks where an input image stands.

`validate_records` drops bad rows (missing or unreadable image, image above the size limits, empty text, placeholder
mismatch, sequence too long), counts them per reason in a `DataReport` and logs it: bad rows never crash a run and
never pass silently.
"""

import collections
import io
import json
import logging
import os
from dataclasses import dataclass, field

import datasets
from PIL import Image


logger = logging.getLogger(__name__)

TASKS = ("understanding", "text_to_image", "image_to_image", "counterfactual")
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_T2I_ANSWER = "This is the resulting image."
"""The reply that UniMedVL's text-to-image samples put between the prompt and the image."""

RECORD_FEATURES = datasets.Features(
    {
        "task": datasets.Value("string"),
        "input_images": datasets.List(datasets.Image(decode=False)),
        "output_images": datasets.List(datasets.Image(decode=False)),
        "messages": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "source": datasets.Value("string"),
    }
)


@dataclass
class ImageLimits:
    """Images with a side of `max_side` pixels or more, or more than `max_pixels` pixels, are skipped (as the original)."""

    max_side: int = 4096
    max_pixels: int = 20_000_000
    min_side: int = 8


@dataclass
class DataReport:
    """Counts of kept and dropped rows, per reason, with a few examples (`source: detail`) per reason."""

    total: int = 0
    kept: int = 0
    dropped: collections.Counter = field(default_factory=collections.Counter)
    examples: dict = field(default_factory=dict)
    max_examples: int = 3

    def add(self, reason: str, detail: str) -> None:
        self.dropped[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append(detail)

    def merge(self, other: "DataReport") -> "DataReport":
        self.total += other.total
        self.kept += other.kept
        self.dropped.update(other.dropped)
        for reason, examples in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(examples[: max(0, self.max_examples - len(mine))])
        return self

    def summary(self) -> str:
        lines = [f"{self.kept}/{self.total} rows kept, {sum(self.dropped.values())} dropped"]
        for reason, count in sorted(self.dropped.items()):
            lines.append(f"  {reason}: {count} (e.g. {'; '.join(self.examples.get(reason, []))})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "dropped": dict(self.dropped), "examples": self.examples}


# ----------------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------------


def infer_task(record: dict) -> str:
    """The task of a UniMedVL JSONL record: output images with input images → `image_to_image`, output images only →
    `text_to_image`, none → `understanding`."""
    if record.get("output_img"):
        return "image_to_image" if record.get("input_img") else "text_to_image"
    return "understanding"


def _image_entry(item, image_dir: str | None) -> dict:
    """`{"path": ...}` / a path string / a PIL image / raw bytes → a `datasets.Image` entry `{"path", "bytes"}`."""
    if isinstance(item, Image.Image):
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        return {"path": None, "bytes": buffer.getvalue()}
    if isinstance(item, (bytes, bytearray)):
        return {"path": None, "bytes": bytes(item)}
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return {"path": item.get("path"), "bytes": item["bytes"]}
        item = item.get("path")
    if not isinstance(item, str) or not item:
        raise ValueError(f"an image entry needs a 'path', got {item!r}")
    path = item if os.path.isabs(item) or image_dir is None else os.path.join(image_dir, item)
    return {"path": path, "bytes": None}


def normalize_record(record: dict, image_dir: str | None = None, task: str | None = None, source: str = "") -> dict:
    """One UniMedVL JSONL line (`input_img`, `output_img`, `message`) or LLaVA line (`image`, `conversations`) → the
    normalised schema. `task` overrides the inferred task (the loader chosen in the data config)."""
    messages = record.get("message", record.get("conversations", record.get("messages")))
    if messages is None:
        raise ValueError("the row has no 'message' (or 'conversations') list")
    inputs = record.get("input_img", record.get("image", record.get("images", [])))
    if inputs is None or isinstance(inputs, (str, dict, Image.Image)):
        inputs = [] if inputs is None else [inputs]
    outputs = record.get("output_img") or []
    task = task or infer_task({"input_img": inputs, "output_img": outputs})
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return {
        "task": task,
        "input_images": [_image_entry(item, image_dir) for item in inputs],
        "output_images": [_image_entry(item, image_dir) for item in outputs],
        "messages": [{"from": str(m.get("from", m.get("role", ""))), "value": str(m.get("value", m.get("content", "")))} for m in messages],
        "source": source,
    }


def load_jsonl_records(
    jsonl_path: str, image_dir: str | None = None, task: str | None = None, report: DataReport | None = None
) -> datasets.Dataset:
    """Reads a JSONL file of UniMedVL (or LLaVA-style) rows; images resolve relative to `image_dir` (default: the
    file's folder). Lines that are not valid JSON or lack required keys are counted in `report` as `malformed_row`."""
    image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(jsonl_path))
    report = report if report is not None else DataReport()
    rows = []
    with open(jsonl_path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            source = f"{os.path.basename(jsonl_path)}:{line_number}"
            try:
                rows.append(normalize_record(json.loads(line), image_dir, task, source))
            except (ValueError, TypeError, AttributeError) as error:
                report.total += 1
                report.add("malformed_row", f"{source}: {error}")
    return datasets.Dataset.from_list(rows, features=RECORD_FEATURES)


def records_from_dataset(dataset: datasets.Dataset, task: str | None = None, name: str = "dataset") -> datasets.Dataset:
    """A `datasets.Dataset` whose rows follow the JSONL layout (`input_img` / `output_img` as lists of `Image`
    features or paths, `message`) → the normalised schema."""
    image_columns = [c for c in ("input_img", "output_img", "image", "images") if c in dataset.column_names]
    undecoded = dataset.cast_column(image_columns[0], datasets.List(datasets.Image(decode=False))) if image_columns else dataset
    for column in image_columns[1:]:
        undecoded = undecoded.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return undecoded.map(
        lambda row, index: normalize_record(row, None, task, f"{name}:{index}"),
        with_indices=True,
        remove_columns=undecoded.column_names,
        features=RECORD_FEATURES,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def open_image(entry: dict) -> Image.Image:
    """Decodes a `datasets.Image(decode=False)` entry into a PIL image (fully loaded)."""
    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]
    image = Image.open(source)
    image.load()
    return image


def image_size(entry: dict) -> tuple[int, int]:
    """`(width, height)` of a `datasets.Image(decode=False)` entry, read from the file header only."""
    with Image.open(io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]) as image:
        return image.size


def _check_image(entry: dict, limits: ImageLimits, cache: dict) -> tuple[str, str] | None:
    """`(reason, detail)` if the image is unusable, else `None`; results are cached per path."""
    key = entry.get("path") if entry.get("bytes") is None else None
    if key is not None and key in cache:
        return cache[key]
    name = entry.get("path") or "<bytes>"
    result = None
    if entry.get("bytes") is None and not os.path.isfile(entry["path"]):
        result = ("missing_image", f"{name} does not exist")
    else:
        try:
            with Image.open(io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]) as image:
                width, height = image.size
                if max(width, height) >= limits.max_side or width * height > limits.max_pixels:
                    result = ("image_too_large", f"{name} is {width}x{height} (limits: side < {limits.max_side}, pixels <= {limits.max_pixels})")
                elif min(width, height) < limits.min_side:
                    result = ("image_too_small", f"{name} is {width}x{height} (min side {limits.min_side})")
                else:
                    image.load()
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            result = ("unreadable_image", f"{name}: {error}")
    if key is not None:
        cache[key] = result
    return result


def _check_text(row: dict) -> tuple[str, str] | None:
    messages = row["messages"]
    human = [m["value"] for m in messages if m["from"] == "human"]
    gpt = [m["value"] for m in messages if m["from"] == "gpt"]
    stripped = [value.replace(IMAGE_PLACEHOLDER, "").strip() for value in human]
    if any(m["from"] not in ("human", "gpt") for m in messages):
        return "malformed_row", f"message roles must be 'human' or 'gpt', got {[m['from'] for m in messages]}"
    if row["task"] == "understanding" and (not gpt or not all(value.strip() for value in gpt)):
        return "empty_text", "an understanding sample needs non-empty 'gpt' answers"
    if row["task"] != "understanding" and not any(stripped):
        return "empty_text", f"a {row['task']} sample needs a non-empty 'human' prompt"
    if row["task"] == "counterfactual" and not any(value.strip() for value in gpt):
        return "empty_text", "a counterfactual sample needs a 'gpt' explanation"
    return None


def _check_structure(row: dict) -> tuple[str, str] | None:
    num_inputs, num_outputs = len(row["input_images"]), len(row["output_images"])
    placeholders = sum(m["value"].count(IMAGE_PLACEHOLDER) for m in row["messages"])
    if row["task"] == "understanding" and placeholders not in (0, num_inputs):
        return "placeholder_mismatch", f"{placeholders} <image> placeholders for {num_inputs} input images"
    if row["task"] in ("text_to_image", "image_to_image", "counterfactual") and num_outputs == 0:
        return "missing_image", f"a {row['task']} sample has no output image"
    if row["task"] in ("image_to_image", "counterfactual") and num_inputs == 0:
        return "missing_image", f"a {row['task']} sample has no input image"
    return None


def validate_records(
    records: datasets.Dataset,
    limits: ImageLimits | None = None,
    length_fn=None,
    max_tokens: int | None = None,
    report: DataReport | None = None,
) -> tuple[datasets.Dataset, DataReport]:
    """Keeps the usable rows of `records`; returns them and the `DataReport` (also logged as a warning if rows dropped).

    `length_fn(row) -> int` (e.g. `SequenceBuilder.num_tokens`) with `max_tokens` drops rows whose sequence is too
    long (`too_long`). Raises `ValueError` only when no row at all is usable.
    """
    limits = limits or ImageLimits()
    report = report if report is not None else DataReport()
    cache, keep = {}, []
    for index, row in enumerate(records):
        report.total += 1
        problem = _check_structure(row) or _check_text(row)
        for entry in row["input_images"] + row["output_images"]:
            problem = problem or _check_image(entry, limits, cache)
        if problem is None and length_fn is not None and max_tokens is not None:
            length = length_fn(row)
            if length > max_tokens:
                problem = ("too_long", f"{length} tokens > max_tokens_per_sample {max_tokens}")
        if problem is not None:
            report.add(problem[0], f"{row['source'] or index}: {problem[1]}")
            continue
        keep.append(index)
    report.kept += len(keep)
    if report.dropped:
        logger.warning("Training data check:\n%s", report.summary())
    if not keep:
        raise ValueError(f"No usable training rows:\n{report.summary()}")
    return records.select(keep), report


__all__ = [
    "DEFAULT_T2I_ANSWER",
    "DataReport",
    "IMAGE_PLACEHOLDER",
    "ImageLimits",
    "RECORD_FEATURES",
    "TASKS",
    "image_size",
    "infer_task",
    "load_jsonl_records",
    "normalize_record",
    "open_image",
    "records_from_dataset",
    "validate_records",
]
