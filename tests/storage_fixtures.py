"""The team's object store in a test: `python -m common.storage`, what `make storage` runs, in a temp folder on
a free port, and an S3 client of its bucket."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import boto3
import botocore.exceptions

from benchmarks.local_server import ChildServer
from common.storage import BUCKET, credential_files, read_env_file


@dataclass
class Storage:
    server: ChildServer
    folder: Path
    env: dict[str, str]  # what credentials.env sets: every S3 client's endpoint, keys and the bucket's URL

    @property
    def env_file(self) -> Path:
        return credential_files(self.folder)["env"]

    def client(self):
        return s3_client(self.env)

    def keys(self, prefix: str) -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def close(self) -> None:
        self.server.close()


def s3_client(env: dict[str, str]):
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    )


def wait_for_bucket(env: dict[str, str], timeout: float = 60) -> None:
    """Until the bucket that SeaweedFS creates at start answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            s3_client(env).head_bucket(Bucket=BUCKET)
            return
        except (botocore.exceptions.ClientError, botocore.exceptions.EndpointConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def start_storage(folder: Path, port: int | None = None, host: str = "127.0.0.1") -> Storage:
    command = [sys.executable, "-m", "common.storage", "--dir", str(folder), "--host", host, "--port", "{port}"]
    folder.mkdir(parents=True, exist_ok=True)
    server = ChildServer(command, folder / "storage.log", "/healthz", port=port, host=host).wait_ready(timeout=120)
    env = read_env_file(credential_files(folder)["env"])
    wait_for_bucket(env)
    return Storage(server, folder, env)
