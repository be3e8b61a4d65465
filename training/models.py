"""The model zoo: the course's MLPs and CNNs, each a named builder with its own options.

Every model starts with `Normalize`, so it takes raw pixels (uint8 or float, 0-255) of shape
[N,1,28,28]: the preprocessing lives inside the network and travels with it to MLflow and ONNX.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from training.config import TtaSettings
from training.datasets import IMAGE_SHAPE, NUM_PIXELS
from training.errors import ConfigError

NUM_CLASSES = 10
ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}
INITS = ("he", "xavier", "zeros")


class Normalize(nn.Module):
    """Raw pixels 0-255 to standardised floats, with the training set's mean and std."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(float(mean)))
        self.register_buffer("std", torch.tensor(float(std)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() / 255.0 - self.mean) / self.std


def _act(name: str) -> nn.Module:
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ConfigError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}") from None


def _conv_bn_act(c_in: int, c_out: int, activation: str, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    return [*layers, _act(activation)]


def mlp_linear(hidden: int, **_) -> nn.Sequential:
    """784 -> hidden -> 10 with no activation: a linear model however many layers it has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(NUM_PIXELS, hidden), nn.Linear(hidden, NUM_CLASSES))


def mlp(hidden: list[int], activation: str = "relu", dropout: float = 0.0, batch_norm: bool = False, **_):
    layers: list[nn.Module] = [nn.Flatten()]
    width = NUM_PIXELS
    for h in hidden:
        layers.append(nn.Linear(width, h, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(_act(activation))
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers, nn.Linear(width, NUM_CLASSES))


def cnn_basic(activation: str = "relu", batch_norm: bool = False, dropout: float = 0.0, **_):
    """The course's first CNN: (conv-act-maxpool) x2, then a 128-unit dense layer."""
    return nn.Sequential(
        *_conv_bn_act(1, 32, activation, batch_norm),
        nn.MaxPool2d(2),
        *_conv_bn_act(32, 64, activation, batch_norm),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        _act(activation),
        nn.Dropout(dropout),
        nn.Linear(128, NUM_CLASSES),
    )


def cnn_deep(
    widths: list[int],
    dense: int,
    activation: str = "relu",
    batch_norm: bool = True,
    dropout: float = 0.25,
    dense_dropout: float = 0.5,
    global_pool: bool = False,
    **_,
):
    """The course's "complex" CNNs: blocks of two convs + batch norm, max-pool and dropout."""
    layers: list[nn.Module] = []
    c_in, size = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    for width in widths:
        layers += _conv_bn_act(c_in, width, activation, batch_norm)
        layers += _conv_bn_act(width, width, activation, batch_norm)
        layers += [nn.MaxPool2d(2), nn.Dropout(dropout)]
        c_in, size = width, size // 2
    if global_pool:
        layers += [nn.AdaptiveAvgPool2d(1)]
        size = 1
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, dense, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(dense))
    layers += [_act(activation), nn.Dropout(dense_dropout), nn.Linear(dense, NUM_CLASSES)]
    return nn.Sequential(*layers)


class ResidualBlock(nn.Module):
    """Two 3x3 conv + batch-norm layers added to a shortcut (a strided 1x1 conv where the shape changes).

    The second batch norm starts at zero, so each block starts as the identity: that is what lets a
    short one-cycle schedule train the whole stack from the first steps.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        nn.init.zeros_(self.bn2.weight)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def resnet(
    stem: int = 32,
    widths: Sequence[int] = (64, 128, 256),
    blocks: Sequence[int] = (1, 1, 1),
    stem_stride: int = 2,
    dropout: float = 0.0,
    **_,
):
    """A small ResNet: a 3x3 stem, then stages of residual blocks, each stage after the first halving the
    resolution, global average pooling and one linear layer. With `stem_stride` 1 the first stage works
    on the full 28x28 (what buys accuracy on small images), with 2 on 14x14 (a third cheaper)."""
    layers: list[nn.Module] = [
        nn.Conv2d(IMAGE_SHAPE[0], stem, 3, stride=stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(stem),
        nn.ReLU(),
    ]
    c_in = stem
    for stage, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        for index in range(count):
            layers.append(ResidualBlock(c_in, width, stride=2 if stage and not index else 1))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, NUM_CLASSES)]
    return nn.Sequential(*layers)


# name -> (builder, the architecture's fixed shape); params.yaml adds the tunable options
ZOO: dict[str, tuple[Callable[..., nn.Sequential], dict]] = {
    "mlp_linear_1": (mlp_linear, {"hidden": 1}),
    "mlp_linear_10": (mlp_linear, {"hidden": 10}),
    "mlp_relu_10": (mlp, {"hidden": [10]}),
    "mlp_512": (mlp, {"hidden": [512, 512], "dropout": 0.2}),
    "cnn_basic": (cnn_basic, {}),
    "cnn_deep_a": (cnn_deep, {"widths": [32, 64], "dense": 512}),
    "cnn_deep_b": (cnn_deep, {"widths": [32, 64, 128], "dense": 256, "global_pool": False}),
    "resnet": (resnet, {}),
}


class TestTimeAugmented(nn.Module):
    """Test-time augmentation inside the graph: the mean of the logits over each image's views, that is
    the image, its copies shifted `tta.shift` pixels up, down, left and right (zero-filled, as training's
    random crop), and with `tta.flip` the mirror images of all of those. All views go through the network
    as one batch."""

    def __init__(self, net: nn.Module, tta: TtaSettings):
        super().__init__()
        self.net, self.flip, self.shift, self.views = net, tta.flip, tta.shift, tta.views

    def augmented(self, x: torch.Tensor) -> torch.Tensor:
        """The views of a batch [N,C,H,W], stacked view by view: [views*N,C,H,W]."""
        views = [x]
        if self.shift:
            s, (h, w) = self.shift, x.shape[-2:]
            padded = F.pad(x, (s, s, s, s))
            for dy, dx in ((-s, 0), (s, 0), (0, -s), (0, s)):
                views.append(padded[..., s + dy : s + dy + h, s + dx : s + dx + w])
        if self.flip:
            views += [view.flip(-1) for view in views]
        return torch.cat(views)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(self.augmented(x))
        return logits.reshape(self.views, -1, logits.shape[-1]).mean(0)


def init_weights(model: nn.Module, scheme: str) -> None:
    """He (default), Xavier or zeros; zeros makes every unit identical, so the net cannot learn."""
    if scheme not in INITS:
        raise ConfigError(f"unknown init {scheme!r}; choose one of {list(INITS)}")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            if scheme == "he":
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            elif scheme == "xavier":
                nn.init.xavier_uniform_(module.weight)
            else:
                nn.init.zeros_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(name: str, options: dict | None = None, mean: float = 0.0, std: float = 1.0) -> nn.Sequential:
    """A zoo model with its options (activation, init, dropout, batch_norm) applied."""
    if name not in ZOO:
        raise ConfigError(f"unknown model {name!r}; the zoo has {sorted(ZOO)}")
    builder, shape = ZOO[name]
    options = dict(options or {})
    init = options.pop("init", "he")
    net = builder(**{**shape, **options})
    init_weights(net, init)
    return nn.Sequential(Normalize(mean, std), *net)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
