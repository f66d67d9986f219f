# The training image: CUDA, the `gpu` extra of setup.py (Transformer Engine, flash-attn) and this checkout at
# /opt/echomotion (launcher/manifests.py IMAGE_WORKDIR), run as a non-root user (uid 1000, launcher IMAGE_UID).
# Build and push (docs/operations.md, "Kubernetes"); the tag is the package version (echomotion/__init__.py):
#   docker build -t registry.example.com/echomotion:0.1.0 .
#   docker push registry.example.com/echomotion:0.1.0
# devel, not runtime: flash-attn and Transformer Engine compile against nvcc and the CUDA headers.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    MAX_JOBS=8

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-dev python3-venv git build-essential ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

WORKDIR /opt/echomotion

# Dependencies first, from setup.py alone, so a source change does not rebuild them. The `gpu` extra builds against the
# installed torch, hence --no-build-isolation; the placeholder package is removed once its dependencies are in.
COPY setup.py README.md ./
COPY echomotion/__init__.py echomotion/__init__.py
# hadolint ignore=DL3013
RUN pip install --upgrade pip setuptools wheel packaging \
    && pip install . \
    && pip install --no-build-isolation ".[gpu]" \
    && pip uninstall -y echomotion

COPY . .
RUN pip install --no-deps --no-build-isolation -e . \
    && useradd --create-home --uid 1000 --user-group echomotion \
    && chown -R echomotion:echomotion /opt/echomotion

USER 1000:1000
CMD ["python", "-m", "echomotion.train", "--help"]
