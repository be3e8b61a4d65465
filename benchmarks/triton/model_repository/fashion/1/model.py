"""Triton's python-backend model for `make bench`: each execute() gets the requests Triton's dynamic batcher
gathered, runs the exported file once on all their images and answers each with its probabilities."""

from __future__ import annotations

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from benchmarks.answers import PeerModel


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.model = PeerModel(os.path.join(folder, "model.onnx"))

    def execute(self, requests: list) -> list:
        images = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        probabilities = self.model.probabilities(np.concatenate(images))
        replies, start = [], 0
        for batch in images:
            output = pb_utils.Tensor("probabilities", probabilities[start : start + len(batch)])
            replies.append(pb_utils.InferenceResponse(output_tensors=[output]))
            start += len(batch)
        return replies
