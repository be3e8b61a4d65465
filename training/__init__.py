"""Data, models, training, evaluation and tracking code behind the DVC pipeline stages."""
