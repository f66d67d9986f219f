"""The docs stand alone in the repository, and the 8-GPU training page names only files, flags and tests that exist."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
GUIDE = ROOT / "docs" / "train-1.3b-on-8-gpus.md"
# The command a page runs -> the source that declares its flags.
FLAG_SOURCES = {
    "tools/prepare_humove.py": "echomotion/data/prepare.py",
    "tools/plan.py": "tools/plan.py",
    "tools/export_checkpoint.py": "tools/export_checkpoint.py",
    "echomotion.sample": "echomotion/sample.py",
    "echomotion.train": "echomotion/train.py",
}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_no_path_outside_the_repository(doc: Path) -> None:
    text = doc.read_text()
    outside = re.findall(r"(?<![\w.])\.\./[\w./-]+|/work/[\w./-]+", text)
    assert not outside, f"{doc.name} points outside the repository: {outside}"


def commands(page: Path) -> list[str]:
    """Each shell command of the page's ```bash blocks, continuation lines joined, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    joined = re.sub(r"\\\n\s*", " ", "\n".join(blocks))
    return [re.sub(r"\s+#.*$", "", line).strip() for line in joined.splitlines() if line.strip()]


def test_guide_commands_use_flags_their_tools_declare() -> None:
    checked = set()
    for command in commands(GUIDE):
        for tool, source in FLAG_SOURCES.items():
            if f" {tool} " in f" {command} ":
                declared = (ROOT / source).read_text()
                flags = [f for f in re.findall(r"(?<=\s)--[\w-]+", command) if f != "--nproc_per_node"]
                unknown = [f for f in flags if f'"{f}"' not in declared]
                assert not unknown, f"{command}: {source} declares no {unknown}"
                checked.add(tool)
    assert checked == set(FLAG_SOURCES)


def test_guide_names_existing_files_and_tests() -> None:
    text = GUIDE.read_text()
    for path in set(re.findall(r"\b((?:configs|tools|docs|tests)/[\w./-]+\.(?:py|yaml|md))\b", text)):
        assert (ROOT / path).is_file(), path
    for path, name in re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text):
        assert f"def {name}(" in (ROOT / path).read_text(), f"{path}::{name}"
