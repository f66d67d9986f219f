"""A real S3-compatible server (moto) on 127.0.0.1 for tests, which can be stopped and restarted with its data.

moto keeps objects in memory, so a plain restart comes back empty, and re-uploading after the restart leaves a window in
which readers see 404s. Here the server process fills its buckets from local folders *before* it opens the public port
(through a staging server on a private port in the same process), so a restart looks like a real store coming back with its
data.

    python tests/s3_server.py --port 5000 --seed s3://bucket/prefix=/local/folder ...
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def upload_folder(endpoint: str, url: str, folder: str | Path) -> None:
    """Upload every file under `folder` to `url` (s3://bucket/prefix), creating the bucket if needed."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    client = s3_client(endpoint)
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            key = "/".join(p for p in (prefix.strip("/"), path.relative_to(folder).as_posix()) if p)
            client.upload_file(str(path), bucket, key)


class S3Server:
    """Controls one seeded moto server process on a fixed port: start, stop (SIGKILL: connections die), restart."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.seeds: list[tuple[str, str]] = []
        self._proc: subprocess.Popen | None = None

    def upload(self, folder: str | Path, url: str) -> None:
        """Upload now and again on every restart."""
        upload_folder(self.endpoint, url, folder)
        self.seeds.append((url, str(folder)))

    def start(self, timeout: float = 60) -> None:
        args = [sys.executable, __file__, "--port", str(self.port)]
        for url, folder in self.seeds:
            args += ["--seed", f"{url}={folder}"]
        self._proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + timeout
        lines = []
        while time.time() < deadline:
            line = self._proc.stdout.readline()  # type: ignore[union-attr]
            if not line and self._proc.poll() is not None:
                break
            lines.append(line)
            if line.strip() == "ready":
                threading.Thread(target=self._proc.stdout.read, daemon=True).start()  # type: ignore[union-attr]
                return
        self.stop()
        raise RuntimeError(f"moto server on port {self.port} did not start:\n{''.join(lines)}")

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _serve(port: int, seeds: list[str]) -> None:
    from moto.server import ThreadedMotoServer

    if seeds:
        staging = ThreadedMotoServer("127.0.0.1", 0, verbose=False)
        staging.start()
        host, staging_port = staging.get_host_and_port()
        for seed in seeds:
            url, _, folder = seed.partition("=")
            upload_folder(f"http://{host}:{staging_port}", url, folder)
        staging.stop()
    server = ThreadedMotoServer("127.0.0.1", port, verbose=False)
    server.start()
    print("ready", flush=True)
    parent = os.getppid()
    while os.getppid() == parent:  # until killed, or orphaned by a test process that died
        time.sleep(0.5)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--seed", action="append", default=[], help="s3://bucket/prefix=/local/folder (repeatable)")
    cli = parser.parse_args()
    os.environ.update(CREDENTIALS)
    _serve(cli.port, cli.seed)
