"""Bad input to `model_cards/publish.py`, one row per case: a model folder with links out, non-regular files,
dotfiles or pickles, or a bad target → exit status, the one-line error, and exactly which files were published.
Faults: a publish killed mid-copy leaves the earlier target whole and the re-run publishes the same files."""

import os
import re
import shutil
import sys

import pytest

from conftest import REPO_ROOT
from fault_injection import kill_after_calls, run_killed


sys.path.insert(0, str(REPO_ROOT / "model_cards"))
import build_model_cards  # noqa: E402
import publish  # noqa: E402


def link(name, target):
    def make(folder, tmp_path):
        os.symlink(target(tmp_path) if callable(target) else target, folder / name)

    return make


def outside_folder_link(folder, tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "secret.json").write_text('{"token": "x"}')
    os.symlink(tmp_path / "elsewhere", folder / "sub")


def write(name, text="{}"):
    def make(folder, tmp_path):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)

    return make


def fifo(name):
    return lambda folder, tmp_path: os.mkfifo(folder / name)


def target_with(name):
    def make(folder, tmp_path):
        (tmp_path / "target").mkdir()
        (tmp_path / "target" / name).write_text("earlier")

    return make


def target_file(folder, tmp_path):
    (tmp_path / "target").write_text("a file")


def strip_model(folder, tmp_path):
    (folder / "model.safetensors").unlink()


# id, change to the model folder / target, extra arguments, exit status, expected stderr (regex) or None, what the
# target holds afterwards: ("base", extra names) = a clean publish of the folder plus those, ("exact", names), or None
CASES = [
    ("link-to-a-system-file", link("leak.json", "/etc/hostname"), [], 1,
     r"Refusing to publish leak\.json: it is a symbolic link to /etc/hostname, outside", None),
    ("link-to-an-outside-folder-is-not-followed", outside_folder_link, [], 0, None, ("base", set())),
    ("broken-link", link("gone.json", "/nonexistent/file.json"), [], 1, r"Refusing to publish gone\.json: it is a symbolic link", None),
    ("broken-link-inside", link("gone.json", lambda tmp: tmp / "model" / "nothing.json"), [], 1,
     r"Refusing to publish gone\.json: it is a broken link", None),
    ("fifo", fifo("weights.json"), [], 1, r"Refusing to publish weights\.json: it is not a regular file", None),
    ("link-inside-is-published-as-a-copy", link("alias.json", lambda tmp: tmp / "model" / "config.json"), [], 0, None,
     ("base", {"alias.json"})),
    ("dotfile-skipped", write(".env.json", '{"HF_TOKEN": "secret"}'), [], 0, None, ("base", set())),
    ("dot-folder-skipped", write(".cache/huggingface/download/x.json"), [], 0, None, ("base", set())),
    ("dotfile-named", write(".env.json"), ["--include", ".env.json"], 0, None, ("base", {".env.json"})),
    ("include-missing", lambda folder, tmp_path: None, ["--include", ".absent"], 1, r"--include names files that are not in", None),
    ("include-pickle", write(".optimizer.pt", "x"), ["--include", ".optimizer.pt"], 1,
     r"Refusing to publish pickled files \['\.optimizer\.pt'\]", None),
    ("pickle", write("optimizer.pt", "x"), [], 1, r"Refusing to publish pickled files \['optimizer\.pt'\]", None),
    ("not-a-model-folder", strip_model, [], 1, r"is not a converted UniMedVL folder \(needs config\.json and \*\.safetensors\)", None),
    ("target-not-empty", target_with("old.txt"), [], 1, r"target exists and is not empty; pass overwrite=True \(--overwrite\)", ("exact", {"old.txt"})),
    ("target-replaced", target_with("old.txt"), ["--overwrite"], 0, None, ("base", set())),
    ("target-is-a-file", target_file, [], 1, r"target exists and is not a folder", None),
]


@pytest.fixture(scope="module")
def card(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cards")
    build_model_cards.main(["--output-dir", str(folder)])
    return str(folder / "UniMedVL-14B.md")


@pytest.fixture(scope="module")
def base(converted_dir, card, tmp_path_factory):
    """The files a clean converted folder publishes (the card becomes README.md)."""
    target = tmp_path_factory.mktemp("clean") / "target"
    assert publish.main([str(converted_dir), str(target), "--card", card]) == 0
    names = published(target)
    assert {"config.json", "model.safetensors", "modeling_unimedvl.py", "tokenizer.json", "README.md"} <= names
    return names


def published(target):
    if not target.is_dir():
        return None
    return {os.path.relpath(os.path.join(root, name), target) for root, _, names in os.walk(target) for name in names}


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_publish_sends_only_regular_files_inside_the_folder(case, converted_dir, card, base, tmp_path, capsys):
    _, change, extra, status, message, outcome = case
    expected = None if outcome is None else (base | outcome[1] if outcome[0] == "base" else outcome[1])
    folder = tmp_path / "model"
    shutil.copytree(converted_dir, folder)
    change(folder, tmp_path)
    target = tmp_path / "target"
    assert publish.main([str(folder), str(target), "--card", card, *extra]) == status
    captured = capsys.readouterr()
    if message is None:
        assert captured.err == ""
    else:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(message, lines[0]), captured.err
    assert published(target) == expected
    if expected is not None and ".env.json" not in expected and (folder / ".env.json").exists():
        assert "skipped 1 hidden files (.env.json); name one with --include to publish it" in captured.out
    for name in expected or ():
        assert not os.path.islink(target / name)  # links are published as their content
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".target")]  # no staging folder left


KILLED_PUBLISH = """
import sys
sys.path.insert(0, {cards!r})
import publish
publish.main([{model!r}, {target!r}, "--card", {card!r}, "--overwrite"])
"""


def test_publish_killed_mid_copy_keeps_the_earlier_target_and_reruns_identically(converted_dir, card, tmp_path):
    target = tmp_path / "target"
    assert publish.main([str(converted_dir), str(target), "--card", card]) == 0
    earlier = {name: (target / name).read_bytes() for name in published(target)}
    script = KILLED_PUBLISH.format(cards=str(REPO_ROOT / "model_cards"), model=str(converted_dir), target=str(target), card=card)
    run_killed(kill_after_calls("shutil", "copyfile", 3), script)
    assert {name: (target / name).read_bytes() for name in published(target)} == earlier
    assert publish.main([str(converted_dir), str(target), "--card", card, "--overwrite"]) == 0
    assert {name: (target / name).read_bytes() for name in published(target)} == earlier
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]  # the killed run's staging was removed
