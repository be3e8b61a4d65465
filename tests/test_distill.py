"""Distillation on the CPU: the loss, what the soft targets teach, and the rule that exports the student."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import zoo_model
from tests.test_trainer import config, toy_data
from training import models
from training.config import Params, TtaSettings, load_params
from training.distill import exported_instead, student_config, teacher_logits
from training.trainer import Distillation, seed_everything, train


def test_the_loss_blends_the_teachers_term_with_the_labels():
    logits = torch.randn(8, 10)
    hard = F.cross_entropy(logits, torch.arange(8))
    same = Distillation(torch.empty(0), temperature=2.0, weight=1.0)
    assert same.loss(logits, logits, hard).item() == pytest.approx(0.0, abs=1e-6)  # the teacher matched exactly
    assert Distillation(torch.empty(0), 2.0, 0.0).loss(logits, torch.randn(8, 10), hard) == hard
    teacher = torch.randn(8, 10)
    half = Distillation(torch.empty(0), 2.0, 0.5).loss(logits, teacher, hard)
    soft = Distillation(torch.empty(0), 2.0, 1.0).loss(logits, teacher, hard)
    assert half.item() == pytest.approx(0.5 * soft.item() + 0.5 * hard.item(), rel=1e-6)


def test_the_student_learns_the_teachers_answers_not_the_labels():
    """A teacher that answers class (label + 1) mod 10 for every image, learned with the whole loss on the teacher:
    the student gives the teacher's answers."""
    x, y = toy_data(300)
    teacher = F.one_hot((y.long() + 1) % 10, 10).float() * 8
    seed_everything(0)
    result = train(
        zoo_model("mlp_512"),
        x,
        y,
        x,
        (y.long() + 1) % 10,  # validation against the teacher's answers, to keep the epoch that learned them best
        config(epochs=6, lr=1e-3),
        distillation=Distillation(teacher, temperature=2.0, weight=1.0),
    )
    with torch.no_grad():
        answers = result.model(x).argmax(1)
    assert (answers == (y.long() + 1) % 10).float().mean() > 0.9
    assert (answers == y.long()).float().mean() < 0.05


def test_teacher_answers_are_the_mean_over_its_views():
    seed_everything(0)
    net = zoo_model("cnn_basic").eval()
    x, _ = toy_data(20)
    augmented = models.TestTimeAugmented(net, TtaSettings(flip=True, shift=1))
    got = teacher_logits(augmented, x.numpy(), batch_size=30)
    with torch.no_grad():
        assert torch.allclose(got, augmented(x), atol=1e-5)
    assert got.shape == (20, 10)


def test_a_mirrored_image_gets_the_teachers_answer_for_the_image():
    """Why the student may train on mirror images: with the mirror among the views, an image and its mirror have
    the same views, so the teacher's answer holds for both."""
    seed_everything(0)
    x, _ = toy_data(20)
    augmented = models.TestTimeAugmented(zoo_model("cnn_basic").eval(), TtaSettings(flip=True, shift=1))
    shifts_only = models.TestTimeAugmented(augmented.net, TtaSettings(flip=False, shift=1))
    with torch.no_grad():
        assert torch.allclose(augmented(x.flip(-1)), augmented(x), atol=1e-5)
        assert not torch.allclose(shifts_only(x.flip(-1)), shifts_only(x), atol=1e-3)


@pytest.mark.parametrize(("flip", "hflip"), [(True, True), (False, False)])
def test_the_student_trains_with_its_models_recipe_and_only_the_mirror(flip, hflip):
    raw = load_params()
    raw["distill"].update(epochs=2, lr=0.01)
    raw["tta"]["flip"] = flip
    params = Params.from_dict(raw)
    student = student_config(params, "resnet")
    recipe = params.train_config("resnet")
    assert (student.epochs, student.lr, student.translate, student.hflip, student.erase) == (2, 0.01, 0, hflip, 0.0)
    assert (student.optimizer, student.batch_size, student.label_smoothing) == (
        recipe.optimizer,
        recipe.batch_size,
        recipe.label_smoothing,
    )


@pytest.mark.parametrize(
    ("student", "teacher", "tolerance", "exported"),
    [(0.94, 0.94, 0.0, True), (0.9391, 0.9400, 0.1, True), (0.9389, 0.9400, 0.1, False), (0.95, 0.94, 0.0, True)],
)
def test_the_student_is_exported_within_the_tolerance(student, teacher, tolerance, exported):
    assert exported_instead(student, teacher, tolerance) is exported
