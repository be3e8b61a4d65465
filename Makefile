# Two commands on a fresh machine: `make run` (set up + pipeline) and `make test` (set up + tests).
SHELL := /bin/bash
PYTHON ?= python3
# The uv that creates .venv is the one .venv itself declares (pyproject.toml).
UV_VERSION := $(shell sed -n 's/^ *"uv==\([0-9.]*\)".*/\1/p' pyproject.toml)
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
# torch (pyproject.toml's extras): PyPI's build where a GPU is present; the CPU build where the local wheel folder of
# pyproject.toml's `torch-cpu-wheels` index holds it; PyPI's build anywhere else (CUDA-enabled: it runs on a CPU too).
# `make -n -B setup TORCH_WHEELS=/nowhere` shows the choice a machine without that folder makes.
TORCH_VERSION := $(shell sed -n 's/^cpu = \["torch==\([^"]*\)"\]/\1/p' pyproject.toml)
TORCH_WHEELS ?= $(shell sed -n '/name = "torch-cpu-wheels"/,/^url/s/^url = "\(.*\)"/\1/p' pyproject.toml)
CPU_WHEEL := $(firstword $(wildcard $(TORCH_WHEELS)/torch-$(TORCH_VERSION)+cpu-*.whl))
ifneq ($(TORCH_EXTRA),)
TORCH_CHOICE := torch $(TORCH_VERSION): TORCH_EXTRA=$(TORCH_EXTRA), as given
else ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
TORCH_EXTRA := pypi
TORCH_CHOICE := torch $(TORCH_VERSION): PyPI's CUDA build (TORCH_EXTRA=pypi), for the GPU that nvidia-smi lists
else ifneq ($(CPU_WHEEL),)
TORCH_EXTRA := cpu
TORCH_CHOICE := torch $(TORCH_VERSION): the CPU build $(CPU_WHEEL) (TORCH_EXTRA=cpu)
else
TORCH_EXTRA := pypi
TORCH_CHOICE := torch $(TORCH_VERSION): PyPI's build (TORCH_EXTRA=pypi; CUDA-enabled, it runs on a CPU too), as no GPU is present and $(or $(TORCH_WHEELS),the local wheel folder) holds no torch-$(TORCH_VERSION)+cpu wheel
endif
# The offline copies of the official files, tried first by the fetch stage when that folder exists.
SHARED_DATASETS := $(abspath ../shared/datasets)
export DATASET_MIRROR ?= $(if $(wildcard $(SHARED_DATASETS)),$(SHARED_DATASETS)/{dataset})
# DVC stages call `python`: the project's environment.
export PATH := $(CURDIR)/$(BIN):$(PATH)
MLFLOW_DB := sqlite:///$(CURDIR)/mlflow.db
# Telemetry off for every tool a target runs (docs/security.md, "Telemetry").
include common/telemetry.env
export $(shell sed -n 's/^\([A-Z_]*\) ?=.*/\1/p' common/telemetry.env)
HOST ?= 127.0.0.1
PORT ?= 3000
# The team's object store (`make storage`, common/storage.py): where its credentials file exists, every target
# here uses the bucket it names (the DVC remote `storage`, MLflow's artifacts, the prediction log); `STORAGE_ENV=`
# (empty) for the local folders, `STORAGE_ENV=<file>` for a copy of another host's.
STORAGE_DIR ?= .storage
STORAGE_HOST ?= 127.0.0.1
STORAGE_PORT ?= 8333
STORAGE_ENV ?= $(STORAGE_DIR)/credentials.env
ifneq ($(wildcard $(STORAGE_ENV)),)
include $(STORAGE_ENV)
export AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY AWS_ENDPOINT_URL AWS_REGION STORAGE_URL
endif
DVC_REMOTE ?= $(if $(STORAGE_URL),storage)
UI_PORT ?= 5000

.PHONY: setup requirements audit test-tools run run-full storage container push pull lint test test-fast ui mlflow-server serve monitor feedback-data retrain promote rollback doctor bench \
	bench-sweep bench-train bench-photos bench-headers bench-profile bench-connections bench-views docs clean

setup: $(VENV)/.installed

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.installed: $(UV) uv.lock pyproject.toml
	@echo "$(TORCH_CHOICE)"
	$(UV) sync --frozen --extra pipeline --extra $(TORCH_EXTRA) --python $(PYTHON)
	touch $@

# The bento's Python requirements (bentofile.yaml): the service's dependencies, pyproject.toml's `dependencies`,
# with every package they pull in pinned to the version in uv.lock. Run after `uv lock`; a test checks it.
requirements: $(UV)
	$(UV) export --quiet --frozen --no-dev --no-hashes --no-header --no-emit-project --output-file serving/requirements.txt

# Known vulnerabilities in every locked package (pip-audit, PyPI's advisories; pipelines/audit.py). AUDIT_ARGS
# reaches pip-audit, e.g. `AUDIT_ARGS="-s osv --osv-url https://osv.example/v1/query"` for an OSV mirror.
audit: setup
	@mkdir -p build
	$(UV) export --quiet --frozen --extra pipeline --extra cpu --all-groups --no-hashes --no-header --no-emit-project --output-file build/requirements-audit.txt
	$(BIN)/python -m pipelines.audit build/requirements-audit.txt

run: setup
	$(BIN)/dvc repro

# The `full` preset (pipelines/presets/full.yaml) as a DVC experiment: the configuration for a GPU.
run-full: setup
	$(BIN)/dvc exp run $$($(BIN)/python -m pipelines.preset full)

# SeaweedFS's S3 API on $(STORAGE_HOST):$(STORAGE_PORT) (0.0.0.0: every interface), its data and credentials in
# $(STORAGE_DIR).
storage: setup
	$(BIN)/python -m common.storage --dir $(STORAGE_DIR) --host $(STORAGE_HOST) --port $(STORAGE_PORT)

# The champion's bento as an OCI image with buildah and no registry, on a Debian base it makes once with debootstrap
# (as root); build/container/image.json names it. Running it: docs/serving.md#a-container-image.
container: setup
	$(BIN)/python -m pipelines.container

# What a run made (data, models, the export) to and from the team's DVC remote (.dvc/config): `shared`, a folder,
# or `storage`, the bucket, where its credentials are set. After `make pull`, `make serve` answers with no training.
push: setup
	$(BIN)/dvc push $(if $(DVC_REMOTE),--remote $(DVC_REMOTE))

pull: setup
	$(BIN)/dvc pull $(if $(DVC_REMOTE),--remote $(DVC_REMOTE))

# Debian's Chromium, ChromeDriver, Prometheus, nginx, buildah and debootstrap for the browser, monitoring, replica
# and container tests (skipped, saying why, where they can't be installed).
test-tools:
	tests/install_debian_packages.sh

# Lint and format (ruff), types (mypy), every imported package declared (deptry), and Markdown that renders
# (rumdl: README.md and docs/, fences closed, links and #anchors resolving): all configured in pyproject.toml.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/deptry .
	$(BIN)/rumdl check

# Screenshots of the browser tests land in test-artifacts/screenshots.
test: lint test-tools
	$(BIN)/pytest

# The unit tests, in-process: no `bentoml serve`, browser, database, MLflow server or `dvc repro`.
test-fast: setup
	$(BIN)/pytest -m "not slow"

ui: setup
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_DB) --host $(HOST) --port $(UI_PORT)

# MLflow for a team: a tracking server on PostgreSQL with proxied artifacts, in the bucket where storage is set
# (training/tracking_server.py); every clone logs to it with MLFLOW_TRACKING_URI=http://<host>:5000.
mlflow-server: setup
	$(BIN)/python -m training.tracking_server --host $(HOST)

serve: setup
	$(BIN)/bentoml serve serving.service:Classifier --host $(HOST) --port $(PORT)

# A drift and quality report on the served traffic: the last 24 h, `SINCE=<ISO time>` or `LAST=<N>` predictions;
# every replica's, from the bucket where storage is set (`LOG_DIR=<folder or s3:// URL>` for another log).
monitor: setup
	$(BIN)/python -m monitoring.report $(if $(SINCE),--since $(SINCE)) $(if $(LAST),--last $(LAST)) $(if $(LOG_DIR),--log-dir $(LOG_DIR))

# The labelled predictions of the prediction log as images, data/extra/feedback/<class>/<sha256>.png (DVC-tracked).
feedback-data: setup
	$(BIN)/python -m pipelines.feedback_data $(if $(LOG_DIR),--log-dir $(LOG_DIR))
	$(BIN)/dvc add --quiet data/extra/feedback

# Feedback data, then the pipeline with it (params.yaml's data.extra lists data/extra/feedback). A challenger that
# passes the gate becomes the registry's `challenger`, tried on live traffic beside the champion (GATE_MODE=promote
# to promote it at once, as `dvc repro` does).
GATE_MODE ?= shadow
retrain: feedback-data
	GATE_MODE=$(GATE_MODE) $(BIN)/dvc repro

# The challenger becomes the champion if the live evidence meets params.yaml's `promote` rule; else it says why.
promote: setup
	$(BIN)/python -m pipelines.promote $(if $(LOG_DIR),--log-dir $(LOG_DIR))

# The registry's champion back to the previous version: a running `make serve` follows it within seconds.
rollback: setup
	$(BIN)/python -m pipelines.rollback

# What this machine offers the served model: torch and CUDA, onnxruntime's providers, what SERVING_DEVICE and
# SERVING_PRECISION resolve to, and a 3-second throughput probe per usable provider and precision.
doctor: setup
	$(BIN)/python -m serving.doctor

# Our service against TorchServe, Triton, BentoML's own batching and FastAPI apps on the same file, side by side
# (TorchServe and Triton installed under .bench/; TorchServe needs Java 17); then the prediction log's cost: on
# against off, a 60-s soak, an unwritable log folder; and shadowing's: a challenger tried on every request.
bench: setup
	$(BIN)/python -m benchmarks.serving
	$(BIN)/python -m benchmarks.prediction_log
	$(BIN)/python -m benchmarks.shadow

# Our service under other splits of the CPUs into workers and threads, and other batch caps.
bench-sweep: setup
	$(BIN)/python -m benchmarks.serving_sweep

# The served champion on phone photos stored upright and sideways (EXIF orientation).
bench-photos: setup
	$(BIN)/python -m benchmarks.phone_photos

# What 64 connections with 8 MB header lines do to the workers' memory.
bench-headers: setup
	$(BIN)/python -m benchmarks.header_flood

# Where a worker's CPU time goes under load, by layer, with flame graphs (py-spy, installed under .bench/).
bench-profile: setup
	$(BIN)/python -m benchmarks.profile

# How the workers share the clients' connections, beside each run's latencies.
bench-connections: setup
	$(BIN)/python -m benchmarks.connections

# The challenger re-exported with each set of test-time views (1, 2, 5, 10) beside the distilled one-view file:
# served accuracy and requests/s.
bench-views: setup
	$(BIN)/python -m benchmarks.views

# Our trainer against a tutorial-style DataLoader loop; needs the prepared data (`make run`).
bench-train: setup
	$(BIN)/python -m benchmarks.training

# The figures in README.md and docs/, rewritten from champion.json, metrics/ and benchmarks/results/.
docs: setup
	$(BIN)/python -m pipelines.docs

clean:
	rm -rf $(VENV) $(TOOLS)
