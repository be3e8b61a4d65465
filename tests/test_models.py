"""The zoo: output shapes, parameter counts (worked out by hand), options."""

import typing

import pytest
import torch

from tests.conftest import REPO, zoo_model
from training.config import PRESETS_DIR, Activation, Params, TtaSettings, apply_overrides, load_params, preset_overrides
from training.errors import ConfigError
from training.models import ACTIVATIONS, BUILDERS, ResidualBlock, TestTimeAugmented, build_model, count_parameters

ZOO = load_params(REPO / "params.yaml")["models"]

# weights + biases, layer by layer (BN: 2 per channel; convs/dense before BN have no bias)


def residual_block(c_in: int, c_out: int) -> int:
    """Two 3x3 convs + BNs, and a 1x1 conv + BN shortcut where the width changes."""
    return 9 * c_in * c_out + 9 * c_out * c_out + 4 * c_out + (c_in * c_out + 2 * c_out if c_in != c_out else 0)


EXPECTED_PARAMETERS = {
    "mlp_linear_1": (784 * 1 + 1) + (1 * 10 + 10),
    "mlp_linear_10": (784 * 10 + 10) + (10 * 10 + 10),
    "mlp_relu_10": (784 * 10 + 10) + (10 * 10 + 10),
    "mlp_512": (784 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10),
    "cnn_basic": (9 * 32 + 32) + (9 * 32 * 64 + 64) + (64 * 7 * 7 * 128 + 128) + (128 * 10 + 10),
    "cnn_deep_a": (9 * 32 + 64)
    + (9 * 32 * 32 + 64)
    + (9 * 32 * 64 + 128)
    + (9 * 64 * 64 + 128)
    + (64 * 7 * 7 * 512 + 1024)
    + (512 * 10 + 10),
    "cnn_deep_b": (9 * 32 + 64)
    + (9 * 32 * 32 + 64)
    + (9 * 32 * 64 + 128)
    + (9 * 64 * 64 + 128)
    + (9 * 64 * 128 + 256)
    + (9 * 128 * 128 + 256)
    + (128 * 3 * 3 * 256 + 512)
    + (256 * 10 + 10),
    # stem 32, one block per stage at 32, 64, 128, 256 channels
    "resnet": (9 * 32 + 64)
    + residual_block(32, 32)
    + residual_block(32, 64)
    + residual_block(64, 128)
    + residual_block(128, 256)
    + (256 * 10 + 10),
}


def test_every_zoo_model_has_an_expected_parameter_count():
    assert set(EXPECTED_PARAMETERS) == set(ZOO)


def test_every_architecture_and_activation_the_params_allow_has_a_builder():
    assert set(ACTIVATIONS) == set(typing.get_args(Activation))
    assert {entry["architecture"] for entry in ZOO.values()} == set(BUILDERS)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_output_shape_and_parameter_count(name):
    model = zoo_model(name).eval()
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert model(images).shape == (3, 10)
    assert count_parameters(model) == EXPECTED_PARAMETERS[name]


def test_normalisation_is_inside_the_model():
    model = zoo_model("mlp_linear_10", mean=0.5, std=0.25).eval()
    assert torch.allclose(model[0](torch.full((1, 1, 28, 28), 255, dtype=torch.uint8)), torch.tensor(2.0))
    assert set(model.state_dict()) >= {"0.mean", "0.std"}


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_option(activation):
    model = zoo_model("cnn_deep_a", activation=activation)
    assert any(type(m) is type(ACTIVATIONS[activation]()) for m in model.modules())


def test_batch_norm_and_dropout_options():
    model = zoo_model("cnn_basic", batch_norm=True, dropout=0.3)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.3 for m in model.modules())
    plain = zoo_model("mlp_512", dropout=0.0)
    assert not any(isinstance(m, torch.nn.Dropout) for m in plain.modules())


def test_zero_init_zeroes_every_weight():
    model = zoo_model("mlp_512", init="zeros")
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert all(torch.count_nonzero(w) == 0 for w in weights)


def test_bad_options_are_clear_errors():
    with pytest.raises(ConfigError, match=r"models\.mlp_512\.activation is 'swish': Input should be 'relu'"):
        zoo_model("mlp_512", activation="swish")
    with pytest.raises(ConfigError, match=r"models\.mlp_512\.init is 'orthogonal': Input should be 'he'"):
        zoo_model("mlp_512", init="orthogonal")
    with pytest.raises(ConfigError, match=r"models\.resnet\.architecture is 'resnet50'; choose one of \['mlp_linear'"):
        zoo_model("resnet", architecture="resnet50")
    with pytest.raises(ConfigError, match=r"models\.resnet: widths \[8, 16\] and blocks \[1, 1, 1, 1\] must have one"):
        zoo_model("resnet", widths=[8, 16])


@pytest.mark.parametrize("preset", [None, "full"])
def test_residual_network_stays_within_its_parameter_budget(preset):
    """At most 3M parameters, with the committed and with the `full` settings."""
    params = load_params(REPO / "params.yaml")
    if preset:
        params = apply_overrides(params, preset_overrides(preset, REPO / PRESETS_DIR))
    model = build_model(Params.from_dict(params).model_entry("resnet"), 10, 0.0, 1.0)
    assert count_parameters(model) <= 3_000_000
    assert any(isinstance(m, ResidualBlock) for m in model.modules())


def test_residual_network_resolution_and_identity_start():
    """The stem halves 28x28 to 14x14, each later stage halves again; every block starts as the identity."""
    model = zoo_model("resnet", widths=[16, 32, 64], blocks=[2, 1, 1], stem=8).eval()
    sizes = []
    model.apply(
        lambda m: (
            isinstance(m, ResidualBlock)
            and m.register_forward_hook(lambda _m, _i, out: sizes.append(tuple(out.shape[1:])))
        )
    )
    assert model(torch.zeros(2, 1, 28, 28, dtype=torch.uint8)).shape == (2, 10)
    assert sizes == [(16, 14, 14), (16, 14, 14), (32, 7, 7), (64, 4, 4)]
    block = ResidualBlock(8, 8).eval()
    x = torch.rand(1, 8, 5, 5)
    assert torch.equal(block(x), torch.relu(x))  # the zero-initialised last BN silences the branch


SHIFTS_OF_2 = ((-2, 0), (2, 0), (0, -2), (0, 2))


def test_flip_averaging_sees_an_image_and_its_mirror_alike():
    net = zoo_model("cnn_basic").eval()
    tta = TestTimeAugmented(net, TtaSettings(flip=True, shift=0))
    images = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(tta(images), tta(images.flip(-1)), atol=1e-5)
        assert torch.allclose(tta(images), (net(images) + net(images.flip(-1))) / 2, atol=1e-6)


def test_shift_averaging_is_the_mean_over_the_shifted_copies():
    net = zoo_model("cnn_basic").eval()
    settings = TtaSettings(flip=True, shift=2)
    tta = TestTimeAugmented(net, settings)
    images = torch.randint(1, 256, (3, 1, 28, 28), dtype=torch.uint8)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    shifted = [images] + [padded[..., 2 + dy : 30 + dy, 2 + dx : 30 + dx] for dy, dx in SHIFTS_OF_2]
    views = shifted + [view.flip(-1) for view in shifted]
    assert settings.views == len(views) == 10 and settings.describe() == "mirror and 2-pixel shifts: 10 views"
    assert torch.equal(shifted[1][:, :, 2:, :], images[:, :, :-2, :])  # content moved 2 rows down, top zeroed
    assert torch.all(shifted[1][:, :, :2, :] == 0)
    with torch.no_grad():
        expected = torch.stack([net(view) for view in views]).mean(0)
        assert torch.allclose(tta(images), expected, atol=1e-5)
    assert TtaSettings(flip=False, shift=0).views == 1 and TtaSettings(flip=False, shift=0).describe() == "none"
