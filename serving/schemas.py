"""The request and response bodies, as the OpenAPI document describes them."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

from serving.settings import MAX_BATCH_IMAGES

EXAMPLE_IMAGE = [[0] * 28 for _ in range(28)]
VERSION_HEADER = "X-Model-Version"  # on every answer: the version of the model that produced it


class ClassProbability(BaseModel):
    class_name: str
    probability: float


class Prediction(BaseModel):
    prediction_id: str = Field(description="the prediction's id in the prediction log: what POST /feedback takes")
    label: int = Field(description="index of the predicted class")
    class_name: str
    confidence: float = Field(description="probability of the predicted class")
    top_k: list[ClassProbability]
    ood_score: float = Field(description="how unlike the training images the input is (higher: less alike)")
    out_of_distribution: bool = Field(
        description="the score is over the threshold calibrated at export on the validation images "
        "(export.ood.false_positive_rate of them are flagged)"
    )
    model_version: str = Field(
        description="the model that answered: its registered version (the X-Model-Version header says the same)"
    )


class Details(Prediction):
    probabilities: list[ClassProbability] = Field(description="every class, in class order")
    model_input: list[list[int]] = Field(description="the grey image the model took, rows of pixels 0-255")


PREDICTION_ID = r"^[0-9a-f]{32}$"


class Feedback(BaseModel):
    """A prediction's true class, for live accuracy and for training data."""

    model_config = {"extra": "forbid", "strict": True}  # strict: `false` is not the class 0
    prediction_id: str = Field(pattern=PREDICTION_ID, description="`prediction_id` of the answer")
    label: int | str = Field(description="the true class: its index, or its name", examples=[3, "Dress"])


class FeedbackStored(BaseModel):
    prediction_id: str
    label: int
    class_name: str
    predicted_label: int
    correct: bool


class Error(BaseModel):
    error: str = Field(description="what is wrong with the request")


Pixel = Annotated[int, Field(ge=0, le=255)]
Rows = Annotated[
    list[Annotated[list[Pixel], Field(min_length=28, max_length=28)]],
    Field(min_length=28, max_length=28, description="28 rows of 28 pixels"),
]
Flat = Annotated[list[Pixel], Field(min_length=784, max_length=784, description="784 pixels, row after row")]
LIMIT = dict(min_length=1, max_length=MAX_BATCH_IMAGES, examples=[[EXAMPLE_IMAGE]])
Images = Annotated[
    list[Rows | Flat],
    Field(
        description=f"images, each 28x28 (or 784) integers 0-255; at most {MAX_BATCH_IMAGES} per request "
        "(SERVING_MAX_BATCH_IMAGES)",
        **LIMIT,
    ),
]
# BentoML's clients encode nested lists by walking the schema, which takes no alternatives: rows only
ImageRows = Annotated[
    list[Rows],
    Field(description=f"images, each 28 rows of 28 integers 0-255; at most {MAX_BATCH_IMAGES} per request", **LIMIT),
]


class Batch(BaseModel):
    images: Images


ERRORS: dict[int | str, dict[str, Any]] = {status: {"model": Error} for status in (400, 413, 415)}
