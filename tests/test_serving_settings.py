"""The service's settings: defaults in one place, and a value it cannot use named at start."""

import pytest

from serving.settings import MAX_BATCH_IMAGES, ServingSettings, SettingsError


def test_defaults_and_overrides():
    defaults = ServingSettings.from_env({"BENTO_MODEL_TAG": "m:1"})
    assert (defaults.model_tag, defaults.device, defaults.max_batch_images) == ("m:1", "auto", MAX_BATCH_IMAGES)
    assert not defaults.trace_requests
    tuned = ServingSettings.from_env(
        {"BENTO_MODEL_TAG": "m:1", "SERVING_WORKERS": "3", "SERVING_DEVICE": "cpu", "SERVING_TRACE_REQUESTS": "yes"}
    )
    assert (tuned.workers, tuned.device, tuned.trace_requests) == (3, "cpu", True)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SERVING_WORKERS", "two", "SERVING_WORKERS='two': expected a whole number of at least 1"),
        ("SERVING_MAX_BATCH_SIZE", "0", "SERVING_MAX_BATCH_SIZE='0': expected a whole number of at least 1"),
        ("SERVING_DEVICE", "gpu", "SERVING_DEVICE='gpu': expected auto, cpu or cuda"),
        ("SERVING_TRACE_REQUESTS", "maybe", "SERVING_TRACE_REQUESTS='maybe': expected one of"),
    ],
)
def test_a_value_the_service_cannot_use_is_named(name, value, message):
    with pytest.raises(SettingsError) as error:
        ServingSettings.from_env({"BENTO_MODEL_TAG": "m:1", name: value})
    assert str(error.value).startswith(message)
