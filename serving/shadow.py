"""The challenger tried on live traffic: a share of the requests a worker answers is also run by the registry's
`challenger` version, in a child process of that worker that runs only on CPU time nothing else wants
(SCHED_IDLE), and its answers are logged beside the champion's under the same prediction ids (role
`challenger`), for `make monitor` and `make promote`.

Nothing of it is on the request path: the event loop only drops a sampled request's images into a bounded
queue (a full queue, or a challenger that failed, counts the request in serving_shadow_dropped_total and
shadows nothing); a thread writes them to the child's stdin; the child runs the challenger and writes its own
prediction-log folder. A challenger that is slow falls behind, one that raises is counted in
serving_shadow_failures_total and goes on with the next batch, one that crashes takes only its own process.

The child: `python -m serving.shadow <model file> ...` (started by Shadow, never by hand). Its stdin carries
frames: a 4-byte little-endian length, a JSON header ({"requests": [{"ids", "time", "route"}...]}), then the
requests' images as uint8 bytes; its stdout, one JSON line per event: ready, failed (with the reason),
batch_failed, dropped (records its prediction log could not keep) or upload_failed (a try to upload one of its
log files).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

import numpy as np

from common.log_layout import CHALLENGER
from common.log_records import ModelName, Outputs, Pending, Request
from common.runtime import OnnxClassifier, ProbeError
from serving.metrics import LOG_UPLOAD_FAILURES
from serving.prediction_log import PredictionLog

log = logging.getLogger("bentoml.serving")
GATHER_S = 0.05  # how long requests gather before the writer thread sends them


Offered = tuple[list[str], float, str, np.ndarray]  # a request offered: its prediction ids, time, route and images


class Shadow:
    """A worker's side of shadowing: sampling, the bounded queue, the child process and what it reports."""

    def __init__(
        self,
        share: float,
        queue_requests: int,
        batch_images: int,
        log_args: list[str],
        on_drop: Callable[[int], None],
        on_batch_failure: Callable[[], None],
        on_ready: Callable[[ModelName], None],
        on_failure: Callable[[ModelName, str, str], None],
    ):
        """`share`: percent of requests shadowed; `batch_images`: the images of one run of the challenger, at most
        (as the champion's batches); `log_args`: the child's prediction-log options; `on_failure(model,
        reason, message)`: the challenger did not load (reason load or probe) or crashed (reason crash)."""
        self.share, self.credit, self.queue_requests = share, 0.0, queue_requests
        self.batch_images = batch_images
        self.log_args = log_args
        self.on_drop, self.on_batch_failure = on_drop, on_batch_failure
        self.on_ready, self.on_failure = on_ready, on_failure
        self.lock = threading.Lock()
        self.child: subprocess.Popen | None = None
        self.queue: queue.Queue[Offered | None] = queue.Queue(queue_requests)
        self.model: ModelName | None = None  # the challenger in the child, once it said it is ready

    # the event loop's side: one call per answered request, never blocking

    def offer(self, ids: list[str], route: str, images: np.ndarray) -> None:
        """Shadow this request if it falls in the sampled share and the challenger is up."""
        self.credit += self.share
        if self.credit < 100:
            return
        self.credit -= 100
        if self.model is None:
            return
        try:
            self.queue.put_nowait((ids, time.time(), route, images))
        except queue.Full:
            self.on_drop(len(ids))

    # the follower's side

    def start(self, model: ModelName, path: Path, sha256: str) -> None:
        """Run `model` (its file at `path`, verified to have `sha256`) as the challenger, in place of any other."""
        self.stop()
        command = [sys.executable, "-m", "serving.shadow", str(path), sha256, model.tag, model.version, *self.log_args]
        child = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        requests: queue.Queue[Offered | None] = queue.Queue(self.queue_requests)
        with self.lock:
            self.child, self.queue = child, requests
        events, feed = cast(IO[bytes], child.stdout), cast(IO[bytes], child.stdin)
        threading.Thread(
            target=self._read_events, args=(child, events, model), name="shadow-events", daemon=True
        ).start()
        threading.Thread(target=self._feed, args=(feed, requests), name="shadow-feed", daemon=True).start()

    def stop(self) -> None:
        """Stop shadowing: the child writes what it has and exits (or is killed after 10 s)."""
        with self.lock:
            child, requests, self.child, self.model = self.child, self.queue, None, None
        if child is None:
            return
        with contextlib.suppress(queue.Full):
            requests.put(None, timeout=1)  # the feeder closes the child's stdin
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    # the threads that talk to the child

    def _read_events(self, child: subprocess.Popen, events: IO[bytes], model: ModelName) -> None:
        failed_batches = 0
        for line in events:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event["event"] == "ready":
                with self.lock:
                    if self.child is child:
                        self.model = model
                self.on_ready(model)
            elif event["event"] == "failed":
                self.on_failure(model, event["reason"], event["message"])
            elif event["event"] == "dropped":  # records its prediction log could not keep
                self.on_drop(int(event["count"]))
            elif event["event"] == "upload_failed":
                LOG_UPLOAD_FAILURES.inc()
            elif event["event"] == "batch_failed":
                self.on_batch_failure()
                failed_batches += 1
                if failed_batches == 1:
                    log.warning(
                        "challenger version %s failed a batch (the next are counted in serving_shadow_failures_total): "
                        "%s",
                        model.version,
                        event["message"],
                    )
        code = child.wait()
        with self.lock:
            crashed = self.child is child and self.model is not None
            if self.child is child:
                self.model = None
        if crashed:
            self.on_failure(model, "crash", f"its process ended with exit code {code}")

    def _feed(self, stdin: IO[bytes], requests: queue.Queue[Offered | None]) -> None:
        with contextlib.suppress(OSError):  # the child is gone: what is queued is dropped below
            while (first := requests.get()) is not None:
                time.sleep(GATHER_S)  # one wake-up per interval, not one per request: the worker's GIL is shared
                gathered, images = [first], len(first[0])
                while images < self.batch_images:
                    try:
                        more = requests.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        requests.put_nowait(None)  # stop after this frame
                        break
                    gathered.append(more)
                    images += len(more[0])
                write_frame(stdin, gathered)
        with contextlib.suppress(OSError):
            stdin.close()
        while True:  # requests queued for a child that is gone
            try:
                left = requests.get_nowait()
            except queue.Empty:
                return
            if left is not None:
                self.on_drop(len(left[0]))


def write_frame(stream: IO[bytes], requests: list[Offered]) -> None:
    """Requests as one frame: their ids, times and routes in the header, their images after it."""
    header = json.dumps(
        {"requests": [{"ids": ids, "time": when, "route": route} for ids, when, route, _ in requests]}
    ).encode()
    images = np.concatenate([request[3] for request in requests]).astype(np.uint8, copy=False)
    stream.write(len(header).to_bytes(4, "little") + header + images.tobytes())
    stream.flush()


def read_frame(stream: IO[bytes], image_shape: tuple[int, ...]) -> tuple[list[dict], np.ndarray] | None:
    """A frame's requests and images [N, *image_shape], or None at the end of the stream."""
    size = stream.read(4)
    if len(size) < 4:
        return None
    requests = json.loads(stream.read(int.from_bytes(size, "little")))["requests"]
    count = sum(len(request["ids"]) for request in requests)
    data = stream.read(count * int(np.prod(image_shape)))
    return requests, np.frombuffer(data, np.uint8).reshape(count, *image_shape)


# the child


def report(event: str, **fields: str) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="the challenger of one worker (started by serving.shadow.Shadow)")
    parser.add_argument("model", help="the challenger's model file")
    parser.add_argument("sha256", help="the file's checksum, as registered")
    parser.add_argument("tag", help="its BentoML tag")
    parser.add_argument("version", help="its registered version")
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("--log-queue", type=int, required=True)
    parser.add_argument("--log-max-bytes", type=int, required=True)
    parser.add_argument("--log-max-age-s", type=float, required=True)
    parser.add_argument("--log-file-s", type=float, required=True)
    parser.add_argument("--log-bucket", help="the bucket its closed log files go to")
    args = parser.parse_args()
    # only CPU time the champion leaves idle: SCHED_IDLE runs it when nothing else wants the CPU and gives way at
    # once when something does (a nice value alone still takes its slice of a busy CPU)
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the worker stops it (its stdin closes) when it stops itself
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        model = OnnxClassifier(args.model, device="cpu", threads=1, expected_sha256=args.sha256)
    except ProbeError as exc:
        report("failed", reason="probe", message=str(exc))
        return
    except Exception as exc:  # any file onnxruntime cannot load
        report("failed", reason="load", message=str(exc))
        return
    name = ModelName(args.tag, args.version, model.precision)
    prediction_log = PredictionLog(
        args.log_dir,
        secrets.token_hex(8),
        model.class_names,
        keep_inputs=False,
        queue_requests=args.log_queue,
        max_bytes=args.log_max_bytes,
        max_age_s=args.log_max_age_s,
        on_drop=lambda count: report("dropped", count=str(count)),
        role=CHALLENGER,
        file_s=args.log_file_s,
        storage_url=args.log_bucket,
        on_upload_failure=lambda: report("upload_failed"),
    )
    report("ready")
    columns = model.columns
    while (frame := read_frame(sys.stdin.buffer, model.image_shape)) is not None:
        requests, images = frame
        started = time.perf_counter()
        try:
            rows = model.outputs(images)
        except Exception as exc:
            report("batch_failed", message=f"{type(exc).__name__}: {exc}")
            continue
        model_ms = (time.perf_counter() - started) * 1000
        answered = time.time()
        outputs = Outputs(columns.probabilities(rows), columns.ood_score(rows), model.out_of_distribution(rows), None)
        # each request at the champion's answer, its latency from there to the challenger's
        logged = [Request(len(r["ids"]), r["time"], r["route"], (answered - r["time"]) * 1000) for r in requests]
        ids = [i for request in requests for i in request["ids"]]
        prediction_log.record(Pending(ids, logged, model_ms, name, None, outputs))
    prediction_log.close()


if __name__ == "__main__":
    main()
