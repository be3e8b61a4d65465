"""A stage reports an expected failure as one line and exits 1; a bug keeps its traceback."""

import logging
import signal

import pytest

from pipelines._stage import run
from training.config import Params, load_params
from training.errors import ConfigError, PipelineError


@pytest.fixture(autouse=True)
def _keep_sigterm():
    """run() makes SIGTERM act like Ctrl-C, as a stage process wants; the test runner keeps its own."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def test_an_expected_failure_is_one_line_and_exit_1(caplog):
    def main() -> None:
        raise ConfigError("params.yaml has no entry models.vgg")

    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        run(main)
    assert exited.value.code == 1
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "params.yaml has no entry models.vgg"
    ]


def test_a_bug_is_not_swallowed():
    def main() -> None:
        raise ValueError("a bug, not bad input")

    with pytest.raises(ValueError, match="a bug"):
        run(main)


def test_params_are_validated_once_with_the_key_named():
    raw = load_params()
    raw["evaluate"]["batch_size"] = "big"
    with pytest.raises(
        PipelineError, match=r"^params\.yaml: evaluate\.batch_size is 'big': Input should be a valid integer$"
    ):
        Params.from_dict(raw)
    raw = load_params()
    raw["data"]["dataset"] = "cifar"
    with pytest.raises(ConfigError, match=r"data\.dataset is 'cifar': unknown dataset 'cifar'"):
        Params.from_dict(raw)
    raw = load_params()
    raw["zoo"].append("vgg")
    with pytest.raises(ConfigError, match=r"zoo names \['vgg'\], with no entry under models"):
        Params.from_dict(raw)


def test_a_typo_in_a_model_entry_names_the_key_its_group_and_the_keys_allowed():
    raw = load_params()
    raw["models"]["cnn_deep_a"]["dropuot"] = 0.5
    with pytest.raises(ConfigError) as refused:
        Params.from_dict(raw)
    assert str(refused.value) == (
        "params.yaml: unknown key 'dropuot' in models.cnn_deep_a; allowed: activation, architecture, batch_norm, "
        "dense, dense_dropout, dropout, global_pool, init, train, widths"
    )
