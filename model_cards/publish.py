"""Publishes a converted UniMedVL folder with its model card to the Hugging Face Hub, or to a local folder.

    python model_cards/publish.py MODEL_DIR TARGET --card model_cards/UniMedVL-14B.md [--private] [--include .gitattributes]

TARGET is a Hub repository id (`org/name`) or, for an offline dry run of exactly the same file selection, a local
path (`./dir`, `/dir` or `file:///dir`). Only safetensors weights, JSON/Jinja configs, tokenizer files and the model
code are published; pickled files are refused. Only regular files inside MODEL_DIR are considered: a symbolic link
that leads outside it, or anything that is not a regular file (a FIFO, a device), is refused with an error naming it;
dotfiles and dot-folders (`.env.json`, `.cache/`) are skipped unless named with `--include`. A local target is
written to a staging folder and renamed into place (`--overwrite` replaces a non-empty one); a Hub target receives
every file and the card in one commit.
"""

import argparse
import fnmatch
import os
import pathlib
import shutil
import stat
import sys

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard

from modeling_unimedvl.atomic_files import staged_folder


PUBLISHED_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.py", "*.txt", "*.model", "*.md")
REFUSED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def _is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in pathlib.PurePath(relative).parts)


def folder_entries(model_dir: pathlib.Path) -> list[str]:
    """Relative paths of every entry below `model_dir` that is not a folder (links not followed), sorted."""
    entries = []
    for root, folders, files in os.walk(model_dir, followlinks=False):
        for name in files + [folder for folder in folders if os.path.islink(os.path.join(root, folder))]:
            entries.append(os.path.relpath(os.path.join(root, name), model_dir))
    return sorted(entries)


def check_regular_file_inside(model_dir: pathlib.Path, relative: str) -> None:
    """Raises `ValueError` unless `relative` is a regular file inside `model_dir` (a link may point to one there)."""
    path = model_dir / relative
    root = os.path.realpath(model_dir)
    target = os.path.realpath(path)
    if path.is_symlink() and os.path.commonpath([root, target]) != root:
        raise ValueError(
            f"Refusing to publish {relative}: it is a symbolic link to {target}, outside {model_dir}. Copy the file "
            "into the folder (e.g. `cp -L`) if it belongs to the model."
        )
    mode = os.stat(path).st_mode if os.path.exists(path) else 0
    if not stat.S_ISREG(mode):
        kind = "a broken link" if not os.path.exists(path) else "a folder link" if stat.S_ISDIR(mode) else "not a regular file"
        raise ValueError(f"Refusing to publish {relative}: it is {kind}.")


def files_to_publish(model_dir: pathlib.Path, include: tuple[str, ...] = ()) -> list[str]:
    """Relative paths of the files that are published; raises on a folder that is not a converted model, on pickled
    files, and on links out of the folder or non-regular files among the candidates.

    Args:
        include: dotfiles (relative paths) to publish although hidden, e.g. `.gitattributes`.
    """
    model_dir = pathlib.Path(model_dir)
    if not (model_dir / "config.json").is_file() or not list(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} is not a converted UniMedVL folder (needs config.json and *.safetensors).")
    entries = folder_entries(model_dir)
    missing = [name for name in include if name not in entries]
    if missing:
        raise ValueError(f"--include names files that are not in {model_dir}: {missing}.")
    visible = [name for name in entries if not _is_hidden(name)]
    refused = [name for name in visible + list(include) if any(fnmatch.fnmatch(name, pattern) for pattern in REFUSED_PATTERNS)]
    if refused:
        raise ValueError(f"Refusing to publish pickled files {refused}: only safetensors weights are published.")
    names = [name for name in visible if any(fnmatch.fnmatch(name, pattern) for pattern in PUBLISHED_PATTERNS)]
    names = sorted(set(names) | set(include))
    for name in names:
        check_regular_file_inside(model_dir, name)
    return names


def hidden_entries(model_dir: pathlib.Path, include: tuple[str, ...] = ()) -> list[str]:
    """The dotfiles / files in dot-folders of `model_dir` that are skipped (not named in `include`)."""
    return [name for name in folder_entries(pathlib.Path(model_dir)) if _is_hidden(name) and name not in include]


def local_target(target: str) -> pathlib.Path | None:
    if target.startswith("file://"):
        return pathlib.Path(target[len("file://") :])
    if target.startswith((".", "/", "~")):
        return pathlib.Path(target).expanduser()
    return None


def publish(
    model_dir: str,
    target: str,
    card_path: str,
    private: bool = False,
    token: str | None = None,
    include: tuple[str, ...] = (),
    overwrite: bool = False,
) -> list[str]:
    """Uploads the model files and the card (as README.md); returns the published file names.

    A local target is staged and renamed into place; a non-empty one is replaced only with `overwrite=True`."""
    model_dir = pathlib.Path(model_dir)
    card = ModelCard.load(card_path)
    names = [name for name in files_to_publish(model_dir, tuple(include)) if name != "README.md"]
    destination = local_target(target)
    if destination is not None:
        with staged_folder(str(destination), overwrite=overwrite) as staging:
            for name in names:
                (pathlib.Path(staging) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(model_dir / name, pathlib.Path(staging) / name)
            card.save(pathlib.Path(staging) / "README.md")
    else:
        api = HfApi(token=token)
        api.create_repo(target, private=private, exist_ok=True)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(model_dir / name)) for name in names]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.content.encode("utf-8")))
        api.create_commit(repo_id=target, operations=operations, commit_message="Upload UniMedVL")
    return names + ["README.md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("target", help="Hub repo id (org/name) or a local path for a dry run")
    parser.add_argument("--card", required=True, help="model card markdown (see model_cards/build_model_cards.py)")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--include", action="append", default=[], help="a dotfile to publish (relative path); repeatable")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty local target folder")
    args = parser.parse_args(argv)
    try:
        names = publish(
            args.model_dir, args.target, args.card, args.private, os.environ.get("HF_TOKEN"), tuple(args.include), args.overwrite
        )
    except (ValueError, OSError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    skipped = hidden_entries(pathlib.Path(args.model_dir), tuple(args.include))
    print(f"published {len(names)} files to {args.target}")
    if skipped:
        print(f"skipped {len(skipped)} hidden files ({', '.join(skipped[:5])}); name one with --include to publish it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
