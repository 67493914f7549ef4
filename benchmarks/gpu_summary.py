"""The headline of `run_gpu.sh`'s JSON-lines files: one line per timed row with its measured figure, the limit from
the ceilings measured in the same run, the ratio, the original's figure and the issue's target, then the peak memory.

    python -m benchmarks.gpu_summary outputs/gpu_benchmark/bf16.jsonl outputs/gpu_benchmark/nf4.jsonl [--output FILE]

A missing or partly written file (a phase cut short) contributes the rows it holds.
"""

import argparse
import json
import pathlib

from .measurement import JsonLinesReport


HEADLINE_FIELDS = (
    "seconds", "limit_seconds", "ratio", "tokens_per_s", "limit_tokens_per_s", "original_h100", "speedup_vs_original",
    "target", "meets_target", "peak_memory_gib",
)


def read_records(paths: list[str]) -> list[tuple[str, dict]]:
    """`(file stem, record)` of every complete JSON line of the files that exist."""
    records = []
    for path in map(pathlib.Path, paths):
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            try:
                records.append((path.stem, json.loads(line)))
            except json.JSONDecodeError:  # the last line of a run killed while writing
                continue
    return records


def summarize(records: list[tuple[str, dict]]) -> list[dict]:
    """The headline lines: the machine of each file, every timed row and every peak-memory row."""
    lines = []
    for source, record in records:
        if record.get("kind") == "header":
            lines.append({"file": source, "machine": record.get("machine"), "torch": record.get("torch"),
                          "transformers": record.get("transformers"), "date": record.get("date")})
        elif "seconds" in record:
            line = {"file": source, "name": record["name"]}
            line.update({key: record[key] for key in HEADLINE_FIELDS if key in record})
            lines.append(line)
        elif str(record.get("name", "")).startswith("peak_memory"):
            lines.append({"file": source, **record})
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="JSON-lines files of bench_inference")
    parser.add_argument("--output", default=None, help="also write the summary lines to this file")
    args = parser.parse_args(argv)
    report = JsonLinesReport(args.output)
    try:
        for line in summarize(read_records(args.files)):
            report.emit(line)
    finally:
        report.close()
    return report.records


if __name__ == "__main__":
    main()
