"""The prediction log's closed files, copied to the team's bucket (`<STORAGE_URL>/prediction-log/`, the same
relative key as in the local folder, so a copy made twice is the same object) by a thread of each worker.

While the bucket is unreachable the service answers as ever: files wait in the local folder, in order, and go
when it answers again (each failure counted in `serving_prediction_log_upload_failures_total`); a file that
went gets an empty `.uploaded` marker beside it, which retention reads. The S3 endpoint and keys come from
the AWS SDKs' variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: common/storage.py).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from common.log_layout import PREFIX

log = logging.getLogger("bentoml.serving")
UPLOADED = ".uploaded"
RETRY_S = (0.5, 1, 2, 5)  # the waits between tries of one file, the last repeated while the bucket is away


def bucket_filesystem() -> pafs.S3FileSystem:
    """An S3 client with short timeouts (a file waits rather than a thread hangs), at AWS_ENDPOINT_URL."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return pafs.S3FileSystem(
        endpoint_override=endpoint,
        scheme=urlsplit(endpoint).scheme if endpoint else "https",
        region=os.environ.get("AWS_REGION", "us-east-1"),
        connect_timeout=2,
        request_timeout=10,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )


class Uploader:
    def __init__(self, root: Path, storage_url: str, on_failure: Callable[[], None]):
        self.root = root
        self.url = f"{storage_url.rstrip('/')}/{PREFIX}"
        self.destination = self.url.removeprefix("s3://")
        self.on_failure = on_failure
        self.waiting: collections.deque[Path] = collections.deque()
        self.changed = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._upload_forever, name="prediction-log-upload", daemon=True)
        self.thread.start()

    def enqueue(self, path: Path) -> None:
        with self.changed:
            self.waiting.append(path)
            self.changed.notify()

    def resume(self, paths: Iterable[Path]) -> None:
        """Files a previous process closed and never uploaded."""
        for path in paths:
            if not path.with_name(path.name + UPLOADED).exists():
                self.enqueue(path)

    def close(self, timeout: float) -> None:
        """Upload what waits, for at most `timeout` seconds (the rest waits for the next start), then stop."""
        with self.changed:
            self.stopping = True
            self.changed.notify()
        self.thread.join(timeout)

    def _upload_forever(self) -> None:
        filesystem = bucket_filesystem()
        failures = 0
        while True:
            with self.changed:
                while not self.waiting and not self.stopping:
                    self.changed.wait()
                if not self.waiting:
                    return
                path = self.waiting[0]
            try:
                if path.exists():
                    key = f"{self.destination}/{path.relative_to(self.root).as_posix()}"
                    pafs.copy_files(str(path), key, destination_filesystem=filesystem)
                    path.with_name(path.name + UPLOADED).touch()
            except OSError as exc:
                self.on_failure()
                if failures == 0:
                    log.warning("prediction log: uploading to %s failed, retrying (%s)", self.url, exc)
                time.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
                failures += 1
                continue
            if failures:
                log.info("prediction log: uploading to %s again", self.url)
            failures = 0
            with self.changed:
                self.waiting.popleft()
