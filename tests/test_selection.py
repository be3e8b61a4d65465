"""The champion is chosen on validation data only."""

import pytest

from training.errors import PipelineError
from training.selection import choose_champion, comparison_table


def row(model, val, test, params):
    return {
        "model": model,
        "val_accuracy": val,
        "test_accuracy": test,
        "parameters": params,
        "train_seconds": 1.0,
        "images_per_second": 100.0,
    }


def test_select_uses_validation_not_test_accuracy():
    rows = [row("peeks_at_test", 0.90, 0.99, 10), row("honest", 0.92, 0.91, 10)]
    assert choose_champion(rows)["model"] == "honest"


def test_ties_go_to_fewer_parameters():
    rows = [row("big", 0.92, 0.93, 1000), row("small", 0.92, 0.90, 10)]
    assert choose_champion(rows)["model"] == "small"


def test_no_models_is_an_error():
    with pytest.raises(PipelineError, match="no evaluated models"):
        choose_champion([])


def test_comparison_table_lists_every_model_best_first():
    table = comparison_table([row("a", 0.8, 0.8, 1234), row("b", 0.9, 0.85, 10)], champion="b")
    lines = table.splitlines()
    assert lines[2].startswith("| b (champion) | 10 | 0.9000 | 0.8500")
    assert lines[3].startswith("| a | 1,234 | 0.8000")
