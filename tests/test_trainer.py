"""The trainer on CPU: learning, early stopping, determinism, augmentation, optimizers."""

import copy
import typing

import pytest
import torch

from tests.conftest import zoo_model
from training.augment import augment_batch, random_erase, random_hflip, random_translate
from training.config import Optimizer, Params, Schedule, TrainConfig, load_params
from training.errors import ConfigError
from training.trainer import seed_everything, train


def toy_data(n: int, seed: int = 0):
    """Ten classes told apart by where a bright square sits: learnable in a few epochs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = torch.randint(0, 30, (n, 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 5)
        images[i, 0, 4 + row * 12 : 10 + row * 12, 2 + col * 5 : 7 + col * 5] = 255
    return images, labels.to(torch.uint8)


def config(**overrides) -> TrainConfig:
    """The committed train params with a fast CPU run's overrides."""
    return TrainConfig.model_validate(
        {
            **load_params()["train"],
            "epochs": 3,
            "batch_size": 32,
            "verbose": 0,
            "seed": 0,
            "patience": 0,
            "device": "cpu",
            **overrides,
        }
    )


def test_overfits_a_tiny_batch():
    seed_everything(0)
    x, y = toy_data(64)
    model = zoo_model("mlp_512")
    result = train(model, x, y, x, y, config(epochs=30, lr=1e-3, schedule="none"))
    assert result.history[-1]["train_accuracy"] == 1.0
    assert result.history[-1]["train_loss"] < 0.05


def test_zero_init_visibly_fails_to_learn():
    x, y = toy_data(200)
    accuracies = {}
    for init in ("he", "zeros"):
        seed_everything(0)
        result = train(zoo_model("mlp_512", init=init), x, y, x, y, config(epochs=5, lr=1e-3))
        accuracies[init] = max(r["val_accuracy"] for r in result.history)
    assert accuracies["he"] > 0.9
    assert accuracies["zeros"] <= 0.2  # chance is 0.1: every hidden unit stays identical


def test_early_stopping_fires_and_restores_the_best_weights():
    seed_everything(0)
    x, y = toy_data(200)
    x_val, _ = toy_data(100, seed=1)
    y_val = torch.randint(0, 10, (100,), generator=torch.Generator().manual_seed(3)).to(torch.uint8)  # noise
    model = zoo_model("mlp_512")
    snapshots = {}
    result = train(
        model,
        x,
        y,
        x_val,
        y_val,
        config(epochs=30, patience=2, lr=3e-3),
        on_epoch_end=lambda r: snapshots.__setitem__(r["epoch"], copy.deepcopy(model.state_dict())),
    )
    assert result.stopped_early
    assert len(result.history) == result.best_epoch + 2 < 30
    best = max(result.history, key=lambda r: r["val_accuracy"])
    assert best["epoch"] == result.best_epoch
    restored = result.model.state_dict()
    assert all(torch.equal(restored[k], snapshots[result.best_epoch][k]) for k in restored)
    assert not all(torch.equal(restored[k], snapshots[len(result.history)][k]) for k in restored)


def test_same_seed_gives_identical_results_on_cpu():
    x, y = toy_data(256)
    histories = []
    for _ in range(2):
        seed_everything(5)
        result = train(zoo_model("cnn_basic"), x, y, x[:64], y[:64], config(epochs=2, translate=2, hflip=True, seed=5))
        histories.append([{k: v for k, v in r.items() if k != "seconds"} for r in result.history])
    assert histories[0] == histories[1]


@pytest.mark.parametrize("optimizer", typing.get_args(Optimizer))
@pytest.mark.parametrize("schedule", typing.get_args(Schedule))
def test_every_optimizer_and_schedule_trains(optimizer, schedule):
    seed_everything(0)
    x, y = toy_data(100)
    lr = 0.05 if optimizer.startswith("sgd") or optimizer == "adagrad" else 1e-3
    result = train(
        zoo_model("mlp_relu_10"),
        x,
        y,
        x,
        y,
        config(epochs=4, optimizer=optimizer, schedule=schedule, lr=lr, weight_decay=1e-4, label_smoothing=0.1),
    )
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_unknown_settings_are_rejected_with_the_key_and_group_named():
    def error(edit) -> str:
        raw = load_params()
        edit(raw)
        with pytest.raises(ConfigError) as refused:
            Params.from_dict(raw)
        return str(refused.value)

    assert error(lambda p: p["train"].update(optimizer="lbfgs")).startswith(
        "params.yaml: train.optimizer is 'lbfgs': Input should be 'sgd', 'sgd_momentum', 'adagrad', 'adam' or 'adamw'"
    )
    assert error(lambda p: p["train"].update(epoch=3)).startswith(
        "params.yaml: unknown key 'epoch' in train; allowed: amp, batch_size, channels_last, compile, device, epochs,"
    )
    assert error(lambda p: p["models"]["resnet"]["train"].update(lrr=0.1)).startswith(
        "params.yaml: unknown key 'lrr' in models.resnet.train; allowed: amp, batch_size,"
    )
    assert error(lambda p: p["train"].pop("lr")) == "params.yaml: train is missing 'lr'"
    assert error(lambda p: p["train"].update(epochs="ten")) == (
        "params.yaml: train.epochs is 'ten': Input should be a valid integer"
    )
    assert error(lambda p: p["models"]["resnet"]["train"].update(epochs=0)) == (
        "params.yaml: models.resnet.train.epochs is 0: Input should be greater than or equal to 1"
    )


def test_translation_moves_pixels_without_changing_shape():
    images = torch.zeros(50, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 10:18, 10:18] = 200  # an object well inside the frame: shifts keep every pixel
    out = random_translate(images, 3, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out.sum(dim=(1, 2, 3)), images.sum(dim=(1, 2, 3)))
    assert (out != images).any(dim=(1, 2, 3)).sum() > 30


def test_hflip_mirrors_some_images_exactly():
    images = torch.randint(0, 256, (100, 1, 28, 28), dtype=torch.uint8)
    out = random_hflip(images, torch.Generator().manual_seed(0))
    flipped = (out == images.flip(-1)).all(dim=(1, 2, 3))
    unchanged = (out == images).all(dim=(1, 2, 3))
    assert torch.all(flipped | unchanged) and 20 < flipped.sum() < 80


def test_augmentation_off_is_the_identity():
    images = torch.randint(0, 256, (8, 1, 28, 28), dtype=torch.uint8)
    assert torch.equal(augment_batch(images, torch.Generator(), translate=0, hflip=False), images)


def test_random_erasing_blacks_out_one_rectangle_in_a_fraction_of_the_images():
    images = torch.full((400, 1, 28, 28), 100, dtype=torch.uint8)
    out = random_erase(images, 0.5, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == torch.uint8
    erased = out == 0
    touched = erased.any(dim=(1, 2, 3))
    assert 160 < touched.sum() < 240
    assert torch.equal(out[~erased], images[~erased])  # nothing but the rectangle changes
    for mask in erased[touched, 0]:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        height, width = len(rows), len(cols)
        assert rows[-1] - rows[0] + 1 == height and cols[-1] - cols[0] + 1 == width  # one block
        assert mask.sum() == height * width  # a full rectangle
        assert height * width <= 0.3 * 28 * 28


def test_augmentation_keeps_every_image_in_its_place_in_the_batch():
    """Labels are indexed with the batch's order, so image i must still be image i (and in the frame)."""
    values = torch.arange(1, 65, dtype=torch.uint8)
    images = torch.zeros(64, 1, 28, 28, dtype=torch.uint8)
    images[:, 0, 6:22, 8:20] = values[:, None, None]  # image i is a block of value i
    moved = augment_batch(images, torch.Generator().manual_seed(1), translate=2, hflip=True)
    assert torch.equal(moved.flatten(1).sum(1), images.flatten(1).sum(1))  # every block stays in the frame
    erased = augment_batch(images, torch.Generator().manual_seed(1), translate=2, hflip=True, erase=0.5)
    assert erased.shape == images.shape
    for i, image in enumerate(erased):
        assert torch.all(image[image > 0] == values[i])


def test_mnist_never_flips():
    raw = load_params()
    raw["data"]["dataset"] = "mnist"
    raw["train"]["hflip"] = True
    params = Params.from_dict(raw)
    assert not params.train_config("resnet").hflip
    assert not params.tta_for("resnet").flip and params.tta_for("resnet").shift == raw["tta"]["shift"]
    raw["data"]["dataset"] = "fashion-mnist"
    params = Params.from_dict(raw)
    assert params.train_config("resnet").hflip and params.tta_for("resnet").flip
    raw["tta"]["flip"] = False  # not asked for
    assert not Params.from_dict(raw).tta_for("resnet").flip
    raw["tta"]["flip"] = True
    raw["train"]["hflip"] = False  # a model that never saw a mirror image is not averaged over one
    params = Params.from_dict(raw)
    assert not params.tta_for("cnn_basic").flip and params.tta_for("resnet").flip


def test_models_are_averaged_only_over_shifts_they_learned():
    raw = load_params()
    raw["tta"]["shift"] = 2
    raw["train"]["translate"] = 0
    raw["models"]["resnet"]["train"]["translate"] = 2
    raw["models"]["cnn_basic"]["train"] = {"translate": 1}
    params = Params.from_dict(raw)
    assert params.tta_for("resnet").shift == 2
    assert params.tta_for("cnn_basic").shift == 0 and params.tta_for("mlp_512").shift == 0
    raw["tta"]["shift"] = -1
    with pytest.raises(ConfigError, match=r"tta\.shift is -1: Input should be greater than or equal to 0"):
        Params.from_dict(raw)
