"""Crash-safe writing: every file and folder the package writes appears complete or not at all.

    from modeling_unimedvl.atomic_files import atomic_write, write_json, save_image, staged_folder, append_lines

    with atomic_write("metrics.json", "w") as handle:       # a temporary name next to the target, then os.replace
        handle.write(text)
    write_json("run_config.json", config)                   # the same for a JSON document
    save_image(pil_image, "out.png")                        # the same for a PIL image (format from the suffix)
    with staged_folder("converted", overwrite=True) as staging:  # a whole folder, swapped in when the block ends
        save_file(tensors, os.path.join(staging, "model.safetensors"))
    append_lines("predictions.jsonl", ['{"id": "1"}'])     # an append-only log, flushed and fsync'ed per call

A process killed (SIGKILL, power loss after fsync) at any moment leaves either the old file / folder or the new one,
never a mixture; the temporary names (`.NAME.tmp-*`, `.NAME.staging-*`) are what a killed run leaves behind, and
`staged_folder` removes the ones whose writing process no longer runs.
"""

import contextlib
import json
import os
import shutil
import tempfile


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()
_FILE_MODE, _FOLDER_MODE = 0o666 & ~_UMASK, 0o777 & ~_UMASK
"""Permissions of new files / folders as `open()` / `os.makedirs` create them (mkstemp / mkdtemp give 0o600 / 0o700)."""


def fsync_folder(path: str) -> None:
    """Makes a rename or a new entry in folder `path` durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def _parent(path: str) -> str:
    return os.path.dirname(os.path.abspath(path))


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb", fsync: bool = True, encoding: str | None = None):
    """Opens a temporary file next to `path` for writing (`mode` "w" or "wb") and renames it to `path` when the block
    ends without an exception; on an exception the temporary file is removed and `path` is untouched.

    The file is created with the usual permissions (0o666 minus the umask), as `open()` would."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write writes whole files: mode must be 'w' or 'wb', got {mode!r}.")
    folder = _parent(path)
    descriptor, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        os.chmod(temporary, _FILE_MODE)
        encoding = encoding or ("utf-8" if mode == "w" else None)
        with os.fdopen(descriptor, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            if fsync:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    if fsync:
        fsync_folder(folder)


def write_text(path: str, text: str, fsync: bool = True) -> None:
    """Writes `text` (UTF-8) to `path` atomically."""
    with atomic_write(path, "w", fsync=fsync) as handle:
        handle.write(text)


def write_json(path: str, data, fsync: bool = True, **dump_kwargs) -> None:
    """Writes `data` as JSON to `path` atomically (`dump_kwargs` go to `json.dump`, default `indent=2`)."""
    dump_kwargs.setdefault("indent", 2)
    with atomic_write(path, "w", fsync=fsync) as handle:
        json.dump(data, handle, **dump_kwargs)
        handle.write("\n")


def save_image(image, path: str, format: str | None = None, fsync: bool = True, **save_kwargs) -> None:
    """Saves a PIL image to `path` atomically; the format comes from the suffix unless `format` is given.

    Raises:
        ValueError: the suffix names no format PIL can write.
    """
    from PIL import Image

    if format is None:
        extension = os.path.splitext(path)[1].lower()
        format = Image.registered_extensions().get(extension)
        if format is None or format not in Image.SAVE:
            raise ValueError(f"{path}: unknown image format {extension or '(no suffix)'!r}; use e.g. .png, .jpg or .tif.")
    with atomic_write(path, "wb", fsync=fsync) as handle:
        image.save(handle, format=format, **save_kwargs)


def append_lines(path: str, lines: list[str], fsync: bool = True) -> None:
    """Appends `lines` (each without its newline) to the append-only log `path` in one write, then flushes and fsyncs.

    Nothing written earlier is ever rewritten or removed. A process killed during the call can leave an unterminated
    last line; the next call ends it with a newline first, so new lines are never glued to a fragment (readers skip
    the fragment as a malformed line)."""
    prefix = "" if _ends_with_newline(path) else "\n"
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(prefix + "".join(line + "\n" for line in lines))
        handle.flush()
        if fsync:
            os.fsync(handle.fileno())


def _ends_with_newline(path: str) -> bool:
    """True for a missing or empty file, or one whose last byte is a newline."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return True
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def _staging_prefix(path: str) -> str:
    return f".{os.path.basename(os.path.abspath(path))}.staging-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_staging(path: str) -> list[str]:
    """Removes the staging folders of `path` left by processes that no longer run (a killed earlier attempt)."""
    folder, prefix, removed = _parent(path), _staging_prefix(path), []
    if not os.path.isdir(folder):
        return removed
    for name in os.listdir(folder):
        if not name.startswith(prefix):
            continue
        pid_text = name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(name)
    return removed


def folder_is_empty(path: str) -> bool:
    return not os.path.exists(path) or (os.path.isdir(path) and not os.listdir(path))


@contextlib.contextmanager
def staged_folder(path: str, overwrite: bool = False, fsync: bool = True):
    """Yields a fresh staging folder next to `path`; when the block ends without an exception the staging folder
    becomes `path`, replacing an earlier folder there. Nothing of an earlier folder survives in the new one.

    Args:
        path: the folder to produce; it must not be a file. An existing non-empty folder is replaced only with
            `overwrite=True` (otherwise `FileExistsError` before anything is written).
        fsync: fsync every file written into the staging folder before it is swapped in.

    The swap is two renames (old folder aside, staging folder in) followed by deleting the old folder; a crash
    between the renames leaves the old folder complete under `.NAME.old-*`. On an exception the staging folder is
    removed and `path` is untouched.
    """
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder; choose another output path.")
    if not overwrite and not folder_is_empty(path):
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
    parent = _parent(path)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(path)
    staging = tempfile.mkdtemp(prefix=f"{_staging_prefix(path)}{os.getpid()}-", dir=parent)
    try:
        yield staging
        os.chmod(staging, _FOLDER_MODE)
        if fsync:
            for root, _, names in os.walk(staging):
                for name in names:
                    with open(os.path.join(root, name), "rb") as handle:
                        os.fsync(handle.fileno())
                fsync_folder(root)
        old = None
        if os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.replace(path, os.path.join(old, "folder"))
        os.replace(staging, path)
        if fsync:
            fsync_folder(parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


__all__ = [
    "append_lines",
    "atomic_write",
    "folder_is_empty",
    "fsync_folder",
    "remove_stale_staging",
    "save_image",
    "staged_folder",
    "write_json",
    "write_text",
]
