"""The model zoo's architectures: the course's MLPs and CNNs and a small ResNet, each a builder of the
options that training.config validates (every value comes from the model's entry in params.yaml).

Every model starts with `Normalize`, so it takes raw pixels (uint8 or float, 0-255) of shape
[N,1,28,28]: the preprocessing lives inside the network and travels with it to MLflow and ONNX.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.config import CnnBasic, CnnDeep, Mlp, MlpLinear, ModelOptions, ResNet, TtaSettings
from training.datasets import IMAGE_SHAPE, NUM_PIXELS

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {  # the names training.config.Activation allows
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.01),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


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


def _conv_bn_act(c_in: int, c_out: int, activation: str, batch_norm: bool) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(c_out))
    return [*layers, ACTIVATIONS[activation]()]


def mlp_linear(options: MlpLinear, classes: int) -> nn.Sequential:
    """784 -> hidden -> classes with no activation: a linear model however many layers it has."""
    return nn.Sequential(nn.Flatten(), nn.Linear(NUM_PIXELS, options.hidden), nn.Linear(options.hidden, classes))


def mlp(options: Mlp, classes: int) -> nn.Sequential:
    """784 -> each hidden layer (optional batch norm, activation, dropout) -> classes."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = NUM_PIXELS
    for h in options.hidden:
        layers.append(nn.Linear(width, h, bias=not options.batch_norm))
        if options.batch_norm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(ACTIVATIONS[options.activation]())
        if options.dropout:
            layers.append(nn.Dropout(options.dropout))
        width = h
    return nn.Sequential(*layers, nn.Linear(width, classes))


def cnn_basic(options: CnnBasic, classes: int) -> nn.Sequential:
    """The course's first CNN: (conv-act-maxpool) x2, then a 128-unit dense layer."""
    return nn.Sequential(
        *_conv_bn_act(1, 32, options.activation, options.batch_norm),
        nn.MaxPool2d(2),
        *_conv_bn_act(32, 64, options.activation, options.batch_norm),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 128),
        ACTIVATIONS[options.activation](),
        nn.Dropout(options.dropout),
        nn.Linear(128, classes),
    )


def cnn_deep(options: CnnDeep, classes: int) -> nn.Sequential:
    """The course's "complex" CNNs: blocks of two convs + batch norm, max-pool and dropout."""
    layers: list[nn.Module] = []
    c_in, size = IMAGE_SHAPE[0], IMAGE_SHAPE[1]
    for width in options.widths:
        layers += _conv_bn_act(c_in, width, options.activation, options.batch_norm)
        layers += _conv_bn_act(width, width, options.activation, options.batch_norm)
        layers += [nn.MaxPool2d(2), nn.Dropout(options.dropout)]
        c_in, size = width, size // 2
    if options.global_pool:
        layers += [nn.AdaptiveAvgPool2d(1)]
        size = 1
    layers += [nn.Flatten(), nn.Linear(c_in * size * size, options.dense, bias=not options.batch_norm)]
    if options.batch_norm:
        layers.append(nn.BatchNorm1d(options.dense))
    layers += [ACTIVATIONS[options.activation](), nn.Dropout(options.dense_dropout), nn.Linear(options.dense, classes)]
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


def resnet(options: ResNet, classes: int) -> nn.Sequential:
    """A small ResNet: a 3x3 stem, then stages of residual blocks, each stage after the first halving the
    resolution, global average pooling and one linear layer. With `stem_stride` 1 the first stage works
    on the full 28x28 (what buys accuracy on small images), with 2 on 14x14 (a third cheaper)."""
    layers: list[nn.Module] = [
        nn.Conv2d(IMAGE_SHAPE[0], options.stem, 3, stride=options.stem_stride, padding=1, bias=False),
        nn.BatchNorm2d(options.stem),
        nn.ReLU(),
    ]
    c_in = options.stem
    for stage, (width, count) in enumerate(zip(options.widths, options.blocks, strict=True)):
        for index in range(count):
            layers.append(ResidualBlock(c_in, width, stride=2 if stage and not index else 1))
            c_in = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(options.dropout), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


# architecture (a zoo entry's `architecture` in params.yaml) -> its builder
BUILDERS: dict[str, Callable[[Any, int], nn.Sequential]] = {
    "mlp_linear": mlp_linear,
    "mlp": mlp,
    "cnn_basic": cnn_basic,
    "cnn_deep": cnn_deep,
    "resnet": resnet,
}


class TestTimeAugmented(nn.Module):
    """Test-time augmentation inside the graph: the mean of the logits over each image's views, that is
    the image, its copies shifted `tta.shift` pixels up, down, left and right (zero-filled, as training's
    random crop), and with `tta.flip` the mirror images of all of those. All views go through the network
    as one batch."""

    def __init__(self, net: nn.Sequential, tta: TtaSettings):
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

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The logits, as forward() gives them, and the embedding (what the network's last linear layer
        takes), both averaged over the views."""
        embedding = self.net[:-1](self.augmented(x))
        logits = self.net[-1](embedding)

        def mean(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(self.views, -1, t.shape[-1]).mean(0)

        return mean(logits), mean(embedding)


def init_weights(model: nn.Module, scheme: str) -> None:
    """He, Xavier or zeros; zeros makes every unit identical, so the net cannot learn."""
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


def build_model(options: ModelOptions, classes: int, mean: float, std: float) -> nn.Sequential:
    """A zoo model from its params.yaml entry, taking raw pixels (normalised with `mean` and `std` inside)."""
    net = BUILDERS[options.architecture](options, classes)  # type: ignore[attr-defined]
    init_weights(net, options.init)
    return nn.Sequential(Normalize(mean, std), *net)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
