"""Training records of UniMedVL: loading (UniMedVL JSONL, LLaVA-style JSONL, Hugging Face chat rows, `datasets`
datasets, streaming `IterableDataset`s) and validation.

Every loader produces a `datasets.Dataset` with one normalised schema (`RECORD_FEATURES`):

- `task`: one of `TASKS` — `understanding` (VQA, reports: images → conversation), `text_to_image` (prompt → image),
  `image_to_image` (input image → instruction → optional text → target image; editing, super-resolution, modality
  translation) or `counterfactual` (input image → instruction → target image → explanation text);
- `input_images` / `output_images`: lists of `datasets.Image(decode=False)` entries (`{"path", "bytes"}`);
- `messages`: `[{"from": "human" | "gpt", "value": str}]`; `<image>` marks where an input image stands.

`validate_records` drops bad rows (missing or unreadable image — DICOM and NIfTI are read with
`unimedvl_pipelines.medical_images.load_medical_image` —, image above the size limits, empty text, placeholder
mismatch, sequence too long), the loaders drop malformed rows (not UTF-8, not JSON, a null text, an unknown chat role);
all are counted per reason in a `DataReport` and logged: bad rows never crash a run and never pass silently.
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
        item = item.get("path", item.get("image", item.get("url")))
    if not isinstance(item, str) or not item:
        raise ValueError(f"an image entry needs a 'path', got {item!r}")
    path = item if os.path.isabs(item) or image_dir is None else os.path.join(image_dir, item)
    return {"path": path, "bytes": None}


def _text(value, where: str) -> str:
    """A message text; `None` (JSON null) or a non-string is an error rather than the text "None"."""
    if not isinstance(value, str):
        raise ValueError(f"{where} has no text ({'null' if value is None else type(value).__name__} instead of a string)")
    return value


_ROLES = {"human": "human", "user": "human", "system": "human", "gpt": "gpt", "assistant": "gpt"}


def _chat_messages(messages: list, column_images: list) -> tuple[list[dict], list, list]:
    """Hugging Face chat messages (`role`, `content` as a string or as parts `{"type": "image" | "text", ...}`) →
    (`[{"from", "value"}]` with `<image>` placeholders, input images, output images). Image parts without their own
    image take the next image of the row's `images` / `image` column (TRL's layout); images in assistant turns are
    generation targets."""
    converted, inputs, outputs = [], [], []
    pending = list(column_images)

    def take(count: int, index: int) -> list:
        if count > len(pending):
            raise ValueError(f"message {index} has more image parts than the row has images")
        taken = pending[:count]
        del pending[:count]
        return taken

    for index, message in enumerate(messages):
        role = _ROLES.get(message.get("role"))
        if role is None:
            raise ValueError(f"message {index} has role {message.get('role')!r}; expected user, assistant or system")
        content = message.get("content")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) or content is None else content
        texts = []
        for part in parts:
            kind = part.get("type")
            if kind == "text":
                text = _text(part.get("text"), f"message {index}")
                inputs.extend(take(text.count(IMAGE_PLACEHOLDER), index))  # `<image>` typed into the text
                texts.append(text)
            elif kind == "image":
                image = next((part[key] for key in ("image", "path", "url") if part.get(key) is not None), None)
                image = take(1, index)[0] if image is None else image
                if role == "gpt":
                    outputs.append(image)
                else:
                    inputs.append(image)
                    texts.append(IMAGE_PLACEHOLDER)
            else:
                raise ValueError(f"message {index} has a content part of type {kind!r}; expected 'text' or 'image'")
        value = " ".join(text for text in texts if text)
        if value or role == "human":
            converted.append({"from": role, "value": value})
    if pending:
        raise ValueError(f"{len(pending)} image(s) of the row are not referenced by an image part of the messages")
    return converted, inputs, outputs


def _as_list(images) -> list:
    if images is None:
        return []
    return [images] if isinstance(images, (str, dict, bytes, Image.Image)) else list(images)


def normalize_record(record: dict, image_dir: str | None = None, task: str | None = None, source: str = "") -> dict:
    """One training row → the normalised schema. Accepted layouts: UniMedVL JSONL (`input_img`, `output_img`,
    `message`), LLaVA (`image`, `conversations`), and Hugging Face chat (`messages` with `role` / `content`, content
    parts with images, or `{"type": "image"}` parts with an `images` list / single `image` column). `task` overrides
    the inferred task (the loader chosen in the data config)."""
    messages = record.get("message", record.get("conversations", record.get("messages")))
    if not isinstance(messages, list):
        raise ValueError("the row has no 'message' / 'conversations' / 'messages' list")
    column_images = _as_list(record.get("input_img", record.get("image", record.get("images"))))
    outputs = _as_list(record.get("output_img"))
    if messages and isinstance(messages[0], dict) and "role" in messages[0]:
        messages, inputs, chat_outputs = _chat_messages(messages, column_images)
        outputs += chat_outputs
    else:
        inputs = column_images
        messages = [
            {"from": str(m.get("from", m.get("role", ""))), "value": _text(m.get("value", m.get("content")), f"message {i}")}
            for i, m in enumerate(messages)
        ]
    task = task or infer_task({"input_img": inputs, "output_img": outputs})
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    return {
        "task": task,
        "input_images": [_image_entry(item, image_dir) for item in inputs],
        "output_images": [_image_entry(item, image_dir) for item in outputs],
        "messages": messages,
        "source": source,
    }


def load_jsonl_records(
    jsonl_path: str, image_dir: str | None = None, task: str | None = None, report: DataReport | None = None
) -> datasets.Dataset:
    """Reads a JSONL file of training rows (any layout `normalize_record` takes); images resolve relative to
    `image_dir` (default: the file's folder). Lines that are not UTF-8, not valid JSON or lack required keys are
    counted in `report` as `malformed_row`; the other lines load."""
    image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(jsonl_path))
    report = report if report is not None else DataReport()
    rows = []
    with open(jsonl_path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            source = f"{os.path.basename(jsonl_path)}:{line_number}"
            try:
                rows.append(normalize_record(json.loads(raw.decode("utf-8")), image_dir, task, source))
            except UnicodeDecodeError as error:
                report.total += 1
                report.add("malformed_row", f"{source}: not UTF-8 (byte 0x{raw[error.start]:02x} at column {error.start + 1})")
            except (ValueError, TypeError, AttributeError) as error:
                report.total += 1
                report.add("malformed_row", f"{source}: {error}")
    return datasets.Dataset.from_list(rows, features=RECORD_FEATURES)


def _undecoded(dataset):
    """`dataset` with its image columns cast to `datasets.Image(decode=False)` (paths / bytes, decoded later)."""
    features = dataset.features or {}
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            dataset = dataset.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return dataset


def records_from_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset,
    task: str | None = None,
    name: str = "dataset",
    report: DataReport | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """A `datasets.Dataset` (or streaming `datasets.IterableDataset`) in any layout `normalize_record` takes (image
    columns as `Image` features, PIL images, bytes or paths) → the normalised schema. Rows that are already normalised
    pass unchanged. Malformed rows are counted in `report` (`malformed_row`) and left out; a streaming dataset is
    converted lazily and its malformed rows are skipped as they stream."""
    if set(dataset.column_names or []) == set(RECORD_FEATURES):
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        if dataset.features is not None:
            dataset = _undecoded(dataset)

        def convert(row, index):
            try:
                return normalize_record(row, None, task, f"{name}:{index}")
            except (ValueError, TypeError, AttributeError) as error:
                logger.warning("Skipping streamed row %s:%d: %s", name, index, error)
                return {"task": "", "input_images": [], "output_images": [], "messages": [], "source": f"{name}:{index}"}

        converted = dataset.map(convert, with_indices=True, remove_columns=dataset.column_names, features=RECORD_FEATURES)
        return converted.filter(lambda row: row["task"] != "" and (_check_structure(row) or _check_text(row)) is None)
    report = report if report is not None else DataReport()
    rows = []
    for index, row in enumerate(_undecoded(dataset)):
        try:
            rows.append(normalize_record(row, None, task, f"{name}:{index}"))
        except (ValueError, TypeError, AttributeError) as error:
            report.total += 1
            report.add("malformed_row", f"{name}:{index}: {error}")
    return datasets.Dataset.from_list(rows, features=RECORD_FEATURES)


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------


def _is_medical_file(entry: dict) -> bool:
    """A DICOM or NIfTI file path (by suffix, or the DICOM `DICM` magic)."""
    from unimedvl_pipelines.medical_images import DICOM_SUFFIXES, NIFTI_SUFFIXES

    path = entry.get("path")
    if entry.get("bytes") is not None or not path:
        return False
    if path.lower().endswith(DICOM_SUFFIXES + NIFTI_SUFFIXES):
        return True
    with open(path, "rb") as handle:
        handle.seek(128)
        return handle.read(4) == b"DICM"


def open_image(entry: dict) -> Image.Image:
    """Decodes a `datasets.Image(decode=False)` entry into a PIL image (fully loaded); DICOM and NIfTI files go
    through `unimedvl_pipelines.medical_images.load_medical_image` (file window, middle slice)."""
    if _is_medical_file(entry):
        from unimedvl_pipelines.medical_images import load_medical_image

        return load_medical_image(entry["path"])
    source = io.BytesIO(entry["bytes"]) if entry.get("bytes") is not None else entry["path"]
    image = Image.open(source)
    image.load()
    return image


def image_size(entry: dict) -> tuple[int, int]:
    """`(width, height)` of a `datasets.Image(decode=False)` entry, from the file header (DICOM / NIfTI: decoded)."""
    if _is_medical_file(entry):
        return open_image(entry).size
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
            width, height = image_size(entry)
            if max(width, height) >= limits.max_side or width * height > limits.max_pixels:
                result = ("image_too_large", f"{name} is {width}x{height} (limits: side < {limits.max_side}, pixels <= {limits.max_pixels})")
            elif min(width, height) < limits.min_side:
                result = ("image_too_small", f"{name} is {width}x{height} (min side {limits.min_side})")
            else:
                open_image(entry)
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as error:
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
