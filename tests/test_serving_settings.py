"""The service's settings: defaults in one place, and a value it cannot use named at start."""

import os

import pytest

from common.runtime import ModelFileError, ProviderError, choose_precision
from serving.settings import MAX_BATCH_IMAGES, ServingSettings, SettingsError


@pytest.fixture
def environment(monkeypatch):
    """The settings read from exactly the variables given, whatever the test runner's environment holds."""

    def settings(**env: str) -> ServingSettings:
        for name in os.environ:
            if name.startswith("SERVING_") or name == "BENTO_MODEL_TAG":
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return ServingSettings.from_env()

    return settings


def test_defaults_and_overrides(environment):
    defaults = environment(BENTO_MODEL_TAG="m:1")
    assert (defaults.model_tag, defaults.device, defaults.max_batch_images) == ("m:1", "auto", MAX_BATCH_IMAGES)
    assert not defaults.trace_requests and defaults.precision == "auto"
    assert defaults.workers == os.cpu_count() and defaults.threads == max(1, os.cpu_count() // defaults.workers)
    tuned = environment(BENTO_MODEL_TAG="m:1", SERVING_WORKERS="3", SERVING_DEVICE="cpu", SERVING_TRACE_REQUESTS="yes")
    assert (tuned.workers, tuned.device, tuned.trace_requests) == (3, "cpu", True)
    assert environment(SERVING_WORKERS="", SERVING_TOP_K="5").top_k == 5  # an empty variable keeps the default


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SERVING_WORKERS", "two", "SERVING_WORKERS='two': Input should be a valid integer"),
        ("SERVING_MAX_BATCH_SIZE", "0", "SERVING_MAX_BATCH_SIZE='0': Input should be greater than or equal to 1"),
        ("SERVING_DEVICE", "gpu", "SERVING_DEVICE='gpu': Input should be 'auto', 'cpu' or 'cuda'"),
        ("SERVING_PRECISION", "fp16", "SERVING_PRECISION='fp16': Input should be 'auto', 'fp32' or 'int8'"),
        ("SERVING_TRACE_REQUESTS", "maybe", "SERVING_TRACE_REQUESTS='maybe': Input should be a valid boolean"),
        ("SERVING_MAX_HEADER_BYTES", "-1", "SERVING_MAX_HEADER_BYTES='-1': Input should be greater than or equal"),
    ],
)
def test_a_value_the_service_cannot_use_is_named(environment, name, value, message):
    with pytest.raises(SettingsError) as error:
        environment(BENTO_MODEL_TAG="m:1", **{name: value})
    assert str(error.value).startswith(message)


@pytest.mark.parametrize(
    ("requested", "device", "available", "served"),
    [
        ("auto", "cpu", ["fp32", "int8"], "int8"),
        ("auto", "cuda", ["fp32", "int8"], "fp32"),  # the CUDA provider does not run QDQ int8
        ("auto", "cpu", ["fp32"], "fp32"),  # a model saved without an int8 file
        ("fp32", "cpu", ["fp32", "int8"], "fp32"),
        ("int8", "cpu", ["fp32", "int8"], "int8"),
    ],
)
def test_serving_precision_resolves_per_device(requested, device, available, served):
    assert choose_precision(requested, device, available) == served


def test_a_precision_the_model_or_device_cannot_serve_is_refused_with_the_way_out():
    with pytest.raises(ProviderError, match=r"SERVING_PRECISION=int8 on CUDA.*use SERVING_PRECISION=fp32"):
        choose_precision("int8", "cuda", ["fp32", "int8"])
    with pytest.raises(ModelFileError, match="SERVING_PRECISION=int8: this model has only fp32"):
        choose_precision("int8", "cpu", ["fp32"])
