"""Markdown / JSON summaries of evaluation runs, ready to paste into a model card."""

import math
import os

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


__all__ = ["METRICS_NAME", "SUMMARY_NAME", "format_value", "markdown_table", "input_section", "input_and_timing_lines", "write_summary"]
