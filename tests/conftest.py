"""Shared fixtures: a real S3-compatible server (moto) on 127.0.0.1; a time limit on every test."""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from tests.s3_server import CREDENTIALS, S3Server


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    """A moto S3 server for the test module; S3_ENDPOINT_URL and dummy AWS credentials are exported for this process and
    its children. `s3_server.upload(folder, "s3://bucket/prefix")` puts data there (kept across `restart()`)."""
    server = S3Server()
    server.start()
    saved = {k: os.environ.get(k) for k in (*CREDENTIALS, "S3_ENDPOINT_URL")}
    os.environ.update(CREDENTIALS, S3_ENDPOINT_URL=server.endpoint)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread() -> Iterator[None]:
    """The test models are tiny: a second intra-op thread buys nothing and, on a busy 2-core machine, makes every small
    op wait for the other thread (measured 25-50x slower forwards). Child processes get OMP_NUM_THREADS=1 too."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(saved)


TEST_TIME_LIMIT_S = 900  # the slowest test takes about a minute on 2 cores


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that hangs fails alone after TEST_TIME_LIMIT_S (pytest-timeout) instead of holding CI until its 90-minute
    limit; a test may set its own `@pytest.mark.timeout`."""
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(TEST_TIME_LIMIT_S))
