"""Publishes a converted UniMedVL folder with its model card to the Hugging Face Hub, or to a local folder.

    python model_cards/publish.py MODEL_DIR TARGET --card model_cards/UniMedVL-14B.md [--private]

TARGET is a Hub repository id (`org/name`) or, for an offline dry run of exactly the same file selection, a local
path (`./dir`, `/dir` or `file:///dir`). Only safetensors weights, JSON/Jinja configs, tokenizer files and the model
code are published; pickled files are refused.
"""

import argparse
import fnmatch
import os
import pathlib
import shutil
import sys

from huggingface_hub import HfApi, ModelCard


PUBLISHED_PATTERNS = ("*.safetensors", "*.json", "*.jinja", "*.py", "*.txt", "*.model", "*.md")
REFUSED_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.ckpt")


def files_to_publish(model_dir: pathlib.Path) -> list[str]:
    """Relative paths of the files that are published; raises on a folder that is not a converted model."""
    if not (model_dir / "config.json").is_file() or not list(model_dir.glob("*.safetensors")):
        raise ValueError(f"{model_dir} is not a converted UniMedVL folder (needs config.json and *.safetensors).")
    names = [str(path.relative_to(model_dir)) for path in sorted(model_dir.rglob("*")) if path.is_file()]
    refused = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in REFUSED_PATTERNS)]
    if refused:
        raise ValueError(f"Refusing to publish pickled files {refused}: only safetensors weights are published.")
    return [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in PUBLISHED_PATTERNS)]


def local_target(target: str) -> pathlib.Path | None:
    if target.startswith("file://"):
        return pathlib.Path(target[len("file://") :])
    if target.startswith((".", "/", "~")):
        return pathlib.Path(target).expanduser()
    return None


def publish(model_dir: str, target: str, card_path: str, private: bool = False, token: str | None = None) -> list[str]:
    """Uploads the model files and the card (as README.md); returns the published file names."""
    model_dir = pathlib.Path(model_dir)
    card = ModelCard.load(card_path)
    names = [name for name in files_to_publish(model_dir) if name != "README.md"]
    destination = local_target(target)
    if destination is not None:
        destination.mkdir(parents=True, exist_ok=True)
        for name in names:
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(model_dir / name, destination / name)
        card.save(destination / "README.md")
    else:
        api = HfApi(token=token)
        api.create_repo(target, private=private, exist_ok=True)
        api.upload_folder(repo_id=target, folder_path=str(model_dir), allow_patterns=names, commit_message="Upload UniMedVL")
        card.push_to_hub(target, token=token)
    return names + ["README.md"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("target", help="Hub repo id (org/name) or a local path for a dry run")
    parser.add_argument("--card", required=True, help="model card markdown (see model_cards/build_model_cards.py)")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args(argv)
    try:
        names = publish(args.model_dir, args.target, args.card, args.private, os.environ.get("HF_TOKEN"))
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"published {len(names)} files to {args.target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
