import gzip
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
# A clone's team store (`make storage`; the Makefile exports its settings) is not the tests': those that use a
# bucket start one of their own.
for _name in ("STORAGE_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"):
    os.environ.pop(_name, None)
SHARED_DATASETS = Path(os.environ.get("SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> Path:
    """An idx file as the official ones are laid out: big-endian magic, sizes, then uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def copy_repo(dest: Path) -> Path:
    """A git copy of the repo's files (as a clean clone would have them), without pipeline outputs."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        )
        .stdout.decode()
        .split("\0")
    )
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    for generated in ("dvc.lock", "challenger.json", "champion.json"):
        (dest / generated).unlink(missing_ok=True)
    for generated in ("metrics", "plots", "reports", "export"):
        shutil.rmtree(dest / generated, ignore_errors=True)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "copy"], cwd=dest, check=True)
    return dest


def zoo_model(name: str, mean: float = 0.0, std: float = 1.0, **changes):
    """Zoo model `name` as the committed params.yaml defines it, with `changes` to its options, for 10 classes."""
    from training.config import Params, load_params
    from training.models import build_model

    raw = load_params(REPO / "params.yaml")
    raw["models"][name].update(changes)
    return build_model(Params.from_dict(raw).model_entry(name), 10, mean, std)


def require_shared_datasets() -> Path:
    if not (SHARED_DATASETS / "fashion-mnist").is_dir():
        pytest.skip(f"the offline dataset copies are not at {SHARED_DATASETS}")
    return SHARED_DATASETS


@pytest.fixture
def shared_datasets() -> Path:
    return require_shared_datasets()


@pytest.fixture(scope="session")
def storage(tmp_path_factory):
    """The team's object store (`make storage`'s command) in a temp folder, for every test that uses a bucket."""
    from tests.storage_fixtures import start_storage

    store = start_storage(tmp_path_factory.mktemp("storage"))
    yield store
    store.close()


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> dict:
    """A small model trained briefly, exported as the export stage exports and saved in a throwaway BentoML
    store: for serving tests. `offline`: every output of each file for the first 1,000 test images."""
    from common.runtime import onnx_outputs
    from tests.serving_fixtures import small_model, store_model

    folder = tmp_path_factory.mktemp("serving")
    files, small = small_model(folder)
    home = folder / "bentoml"
    tag = store_model(files, home)
    x, y = small.x_test[:1000], small.y_test[:1000]
    offline = {precision: onnx_outputs(files[precision], x) for precision in ("fp32", "int8")}
    return {"files": files, "home": home, "tag": tag, "x": x, "y": y, "offline": offline, "small": small}


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory):
    """The tiny pipeline (`dvc repro` in a copy of the repo), run once for every test that looks at it."""
    from tests.pipeline_fixtures import VENV_BIN, run, stage_env, tiny_params

    shared_datasets = require_shared_datasets()
    root = tmp_path_factory.mktemp("pipeline")
    repo = copy_repo(root / "repo")
    tiny_params(repo)
    env = stage_env(shared_datasets, root / "bentoml")
    log = run([str(VENV_BIN / "dvc"), "repro"], repo, env)
    return repo, env, log
