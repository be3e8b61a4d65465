"""The training loop: seeded, device-agnostic, with early stopping that restores the best weights."""

from __future__ import annotations

import copy
import logging
import math
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from training.augment import augment_batch
from training.config import TrainConfig
from training.distributed import SINGLE_PROCESS, Distributed
from training.errors import ConfigError
from training.evaluation import loss_and_accuracy, predict_logits

log = logging.getLogger(__name__)


@dataclass
class TrainResult:
    model: torch.nn.Module  # with the best weights restored
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    stopped_early: bool = False
    train_seconds: float = 0.0
    images_per_second: float = 0.0


@dataclass(frozen=True)
class Distillation:
    """Soft targets: a teacher's logits for every training image (in the order of the training images),
    matched at `temperature`; `weight` is that term's share of the loss, the rest cross-entropy with the labels."""

    teacher_logits: torch.Tensor
    temperature: float
    weight: float

    def loss(self, logits: torch.Tensor, teacher: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
        """Hinton et al.'s blend: the KL divergence at the temperature, scaled by its square so that its gradients
        keep their size whatever the temperature, and `hard`, the labels' cross-entropy."""
        t = self.temperature
        soft = F.kl_div(
            F.log_softmax(logits / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean"
        )
        return self.weight * soft * t * t + (1 - self.weight) * hard


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("train.device asks for CUDA but no CUDA device is available")
    return torch.device(name)


def bf16_is_fast(device: torch.device) -> bool:
    """Whether bf16 autocast speeds training up here, rather than emulating bf16 slowly."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return (
        device.type == "cpu" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def make_optimizer(config: TrainConfig, params) -> torch.optim.Optimizer:
    wd = config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, weight_decay=wd)
    if config.optimizer == "sgd_momentum":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=True, weight_decay=wd)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(params, lr=config.lr, weight_decay=wd)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=wd)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=wd)


def make_scheduler(config: TrainConfig, optimizer, total_steps: int):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    if config.schedule == "onecycle":
        # cycle momentum only where the optimizer has some: it would turn plain SGD into momentum SGD
        has_momentum = "betas" in optimizer.defaults or optimizer.defaults.get("momentum", 0) > 0
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=config.lr, total_steps=total_steps, cycle_momentum=has_momentum
        )
    return None


def _verbosity(verbose: str | int) -> int:
    if verbose == "auto":
        return 1 if sys.stderr.isatty() else 2
    return int(verbose)


def _steps_per_epoch(n_images: int, batch_size: int, world_size: int) -> int:
    """Whole batches, plus the last partial one when every rank gets at least one image of it."""
    full, rest = divmod(n_images, batch_size)
    return max(1, full + (rest >= world_size))


@dataclass
class _Loop:
    """What every step of one training run uses: the device, the model as stepped, optimizer, schedule."""

    config: TrainConfig
    device: torch.device
    memory_format: torch.memory_format
    step_model: Callable[..., torch.Tensor]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    generator: torch.Generator
    steps_per_epoch: int
    use_amp: bool
    verbosity: int
    distributed: Distributed
    distillation: Distillation | None = None

    def run_epoch(self, x_train: torch.Tensor, y_train: torch.Tensor, title: str) -> tuple[float, float, int]:
        """One pass over a fresh shuffle: (summed loss, correct predictions, images), over every rank."""
        config, distributed = self.config, self.distributed
        order = torch.randperm(len(x_train), generator=self.generator, device=self.device)
        totals, count = torch.zeros(2, device=self.device), 0  # loss sum and correct: read once per epoch
        bar = tqdm(
            range(self.steps_per_epoch),
            desc=title,
            disable=self.verbosity != 1,
            leave=False,
            unit="batch",
            file=sys.stderr,
        )
        for step in bar:
            idx = order[step * config.batch_size : (step + 1) * config.batch_size]
            images = augment_batch(x_train[idx], self.generator, config.translate, config.hflip, config.erase)
            images = distributed.shard(images).contiguous(memory_format=self.memory_format)
            labels = distributed.shard(y_train[idx])
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_amp):
                logits = self.step_model(images)
                loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
                if self.distillation is not None:
                    teacher = distributed.shard(self.distillation.teacher_logits[idx])
                    loss = self.distillation.loss(logits.float(), teacher, loss)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            with torch.no_grad():
                totals += torch.stack([loss.detach() * len(labels), (logits.argmax(1) == labels).sum()])
            count += len(labels)
            if self.verbosity == 1 and step % 25 == 0:  # a host sync, so not every step
                loss_sum, correct = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.4f}")
        bar.close()
        loss_sum, correct, count = distributed.sum(torch.cat([totals, totals.new_tensor([count])])).tolist()
        return loss_sum, correct, int(count)

    def validate(self, model: torch.nn.Module, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[float, float]:
        """Validation loss and accuracy, computed by the main rank and shared, so every rank decides alike."""
        val = torch.zeros(2, device=self.device)
        if self.distributed.is_main:
            scores = loss_and_accuracy(predict_logits(model, x_val, self.config.eval_batch_size), y_val)
            val = torch.tensor(scores, device=self.device)
        val_loss, val_accuracy = self.distributed.from_main(val).tolist()
        return val_loss, val_accuracy


def _start(
    model: torch.nn.Module,
    n_images: int,
    config: TrainConfig,
    distributed: Distributed,
    distillation: Distillation | None,
) -> _Loop:
    """The model on its device and in its memory format, wrapped for DDP and compiled where asked."""
    device = resolve_device(config.device)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    else:
        torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)  # type: ignore[call-overload]  # torch's stub omits it
    step_model: Callable[..., torch.Tensor] = model
    if distributed.enabled:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:
        step_model = torch.compile(step_model)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = make_optimizer(config, model.parameters())
    steps_per_epoch = _steps_per_epoch(n_images, config.batch_size, distributed.world_size)
    scheduler = make_scheduler(config, optimizer, config.epochs * steps_per_epoch)
    return _Loop(
        config,
        device,
        memory_format,
        step_model,
        optimizer,
        scheduler,
        generator,
        steps_per_epoch,
        use_amp=config.amp and bf16_is_fast(device),
        verbosity=_verbosity(config.verbose) if distributed.is_main else 0,
        distributed=distributed,
        distillation=None
        if distillation is None
        else replace(distillation, teacher_logits=distillation.teacher_logits.to(device)),
    )


def _epoch_line(desc: str, epochs: int, record: dict) -> str:
    return (
        f"{desc} epoch {record['epoch']}/{epochs} - {record['seconds']:.1f}s - "
        f"loss {record['train_loss']:.4f} - acc {record['train_accuracy']:.4f} - "
        f"val_loss {record['val_loss']:.4f} - val_acc {record['val_accuracy']:.4f}"
    )


def train(
    model: torch.nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    config: TrainConfig,
    on_epoch_end: Callable[[dict], None] | None = None,
    desc: str = "train",
    distributed: Distributed = SINGLE_PROCESS,
    distillation: Distillation | None = None,
) -> TrainResult:
    """Train on uint8 images; keep the weights of the epoch with the best validation accuracy. With
    `distillation`, the loss also matches a teacher's answers for each training image.

    The fast path on every device: the whole dataset stays on the device as uint8, each batch is
    indexed and augmented there in one go (no per-sample DataLoader), channels_last, bf16 autocast
    where it is native, and the host reads the running loss once per epoch, not once per step.
    """
    loop = _start(model, len(x_train), config, distributed, distillation)
    x_train, y_train = x_train.to(loop.device), y_train.to(loop.device).long()
    x_val, y_val = x_val.to(loop.device), y_val.long()
    result = TrainResult(model=model)
    best_accuracy, best_state, waited = -math.inf, None, 0
    seen_images, started = 0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum, correct, count = loop.run_epoch(x_train, y_train, f"{desc} epoch {epoch}/{config.epochs}")
        seen_images += count
        val_loss, val_accuracy = loop.validate(model, x_val, y_val)
        record = {
            "epoch": epoch,
            "train_loss": loss_sum / count,
            "train_accuracy": correct / count,
            "val_loss": val_loss,
            "val_accuracy": val_accuracy,
            "lr": loop.optimizer.param_groups[0]["lr"],
            "seconds": time.perf_counter() - epoch_start,
        }
        result.history.append(record)
        if loop.verbosity:
            print(_epoch_line(desc, config.epochs, record), file=sys.stderr, flush=True)
        if on_epoch_end is not None and distributed.is_main:
            on_epoch_end(record)
        if val_accuracy > best_accuracy + config.min_delta:
            best_accuracy, result.best_epoch, waited = val_accuracy, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            waited += 1
            if config.patience and waited >= config.patience:
                result.stopped_early = True
                log.info("%s: early stop after epoch %d; best was epoch %d", desc, epoch, result.best_epoch)
                break
    result.train_seconds = time.perf_counter() - started
    result.images_per_second = seen_images / result.train_seconds if result.train_seconds else 0.0
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
