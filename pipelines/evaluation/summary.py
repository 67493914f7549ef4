"""Markdown / JSON summaries of evaluation runs, ready to paste into a model card."""

import math
import os
import time

from modeling_unimedvl.atomic_files import write_json, write_text

METRICS_NAME = "metrics.json"
SUMMARY_NAME = "summary.md"


def format_value(value, scale: float = 1.0, digits: int = 2) -> str:
    """A number for a table (`scale` = 100 for percentages); None -> "n/a", infinity -> "inf"."""
    if value is None:
        return "n/a"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int) and scale == 1.0:
        return str(value)
    return f"{value * scale:.{digits}f}"


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def input_section(data_report: dict) -> str:
    """The data-quality lines: rows read / kept / skipped with reasons and the first problems."""
    lines = [
        f"Rows read: {data_report['rows_read']}, kept: {data_report['rows_kept']}, "
        f"skipped: {data_report['rows_skipped']}."
    ]
    for reason, count in data_report["skipped_by_reason"].items():
        lines.append(f"- skipped `{reason}`: {count}")
    if data_report["examples"]:
        lines.append("- first problems: " + "; ".join(data_report["examples"][:5]))
    return "\n".join(lines)


def input_and_timing_lines(result: dict, generated: str) -> list[str]:
    """The closing Markdown lines of a summary: the input section and the wall time, with how many `generated`
    items (e.g. "answers", "images") this run produced and how many were resumed from the predictions file."""
    timing = result["timing"]
    return [
        "",
        "### Input",
        "",
        input_section(result["input"]),
        "",
        f"Wall time {timing['wall_s']:.1f} s ({timing['generated']} {generated} generated this run, "
        f"{timing['resumed']} resumed from the predictions file).",
    ]


def write_summary(output_dir: str, result: dict, markdown: str) -> dict:
    """Writes `metrics.json` (the full result) and `summary.md`, each atomically; returns the paths written."""
    os.makedirs(output_dir, exist_ok=True)
    paths = {"metrics": os.path.join(output_dir, METRICS_NAME), "summary": os.path.join(output_dir, SUMMARY_NAME)}
    write_json(paths["metrics"], result, sort_keys=True)
    write_text(paths["summary"], markdown.rstrip() + "\n")
    return paths


def run_timing(started: float, generated: int, resumed: int) -> dict:
    """The `timing` of a result: wall seconds since `started` (a `time.perf_counter()` value), the items `generated`
    this run and those `resumed` from the predictions file."""
    return {"wall_s": time.perf_counter() - started, "generated": generated, "resumed": resumed}


def save_result(
    output_dir: str,
    summarise,
    task: str,
    settings: dict,
    metrics: dict,
    input_report: dict,
    timing: dict,
    predictions: str,
    definitions: dict | None = None,
    checkpoint: str | None = None,
    data: str | None = None,
) -> dict:
    """The result of an evaluation run, written as `metrics.json` beside its `summary.md` (`write_summary`).

    Args:
        summarise: `summarise(result) -> str`, the task's Markdown summary of the result.
        input_report: `InputReport.to_dict()` of the data read (or `PredictionStore.input_report()` when re-scoring).
        timing: `run_timing(...)`.
        predictions: path of the run's `predictions.jsonl`.
        definitions: the metrics' definitions; no `definitions` entry when None.
        checkpoint, data: default to `settings["checkpoint"]` and `settings["data"]`.
    Returns:
        `{task, checkpoint, data, settings, metrics, [definitions,] input, timing, predictions, files}`, `files` being
        the two paths written.
    """
    result = {
        "task": task,
        "checkpoint": settings["checkpoint"] if checkpoint is None else checkpoint,
        "data": settings["data"] if data is None else data,
        "settings": settings,
        "metrics": metrics,
    }
    if definitions is not None:
        result["definitions"] = definitions
    result.update(input=input_report, timing=timing, predictions=predictions)
    result["files"] = write_summary(output_dir, result, summarise(result))
    return result


__all__ = [
    "METRICS_NAME",
    "SUMMARY_NAME",
    "format_value",
    "markdown_table",
    "input_section",
    "input_and_timing_lines",
    "write_summary",
    "run_timing",
    "save_result",
]
