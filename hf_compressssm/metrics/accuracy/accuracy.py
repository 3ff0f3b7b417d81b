"""Accuracy: the fraction of predictions equal to their references (an offline ``evaluate`` module)."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = "Accuracy = (number of predictions equal to the reference) / (number of predictions)."
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of int): predicted class ids.
    references (list of int): true class ids.
    sample_weight (list of float, optional): a weight per example (default 1).
Returns:
    accuracy (float): the (weighted) fraction of correct predictions, in [0, 1].
Example:
    >>> evaluate.load("path/to/hf_compressssm/metrics/accuracy").compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


class Accuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None) -> dict:
        correct = np.asarray(predictions) == np.asarray(references)
        if correct.size == 0:
            raise ValueError("accuracy of an empty set of predictions")
        weights = np.ones(correct.shape) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        return {"accuracy": float((correct * weights).sum() / weights.sum())}
