#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with tools/gpu_kit/wheels.txt for the GPU machine's Python 3.12, then print their total size.
# Run here, where PyPI is reachable; the GPU machine has no network. docs/gpu-kit.md says how the run uses them.
set -euo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl -r tools/gpu_kit/wheels.txt
du -ch .whl/*.whl | tail -1
