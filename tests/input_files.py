"""Files the tests hand to the package and read back: writing a test input, editing a JSON file of a model or release
folder, and reading the rows of an append-only `predictions.jsonl`."""

import json


def write_file(path, data):
    """Writes `data` (bytes, else text) to `path`, creating its folder; returns `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def edit_json(name, function):
    """An edit of a folder: `function(data)` changes the object parsed from the folder's JSON file `name` in place,
    and the file is written back."""

    def edit(folder):
        data = json.loads((folder / name).read_text())
        function(data)
        (folder / name).write_text(json.dumps(data))

    return edit


def prediction_rows(path) -> list[dict]:
    """The rows of an append-only predictions file, in file order (a fragment left by a killed write is not a row)."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        lines = list(handle)  # split at line ends only, as the package reads it (not at U+2028 in an answer)
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


__all__ = ["write_file", "edit_json", "prediction_rows"]
