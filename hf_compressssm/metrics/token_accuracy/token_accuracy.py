"""Token accuracy of a causal LM on the labelled positions of each sequence (an offline ``evaluate`` module)."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = (
    "Accuracy over the scored positions of token sequences, as in the synthetic memory tasks (MQAR, selective "
    "copying): with the causal shift (the default) predictions[t] is compared with references[t + 1], and positions "
    "whose reference equals ignore_index (-100) are not counted."
)
_KWARGS_DESCRIPTION = """
Args:
    predictions (list of list of int): predicted token id at every position (argmax of the logits), one list per
        sequence.
    references (list of list of int): labels aligned with the inputs (Hugging Face causal-LM convention), -100 where
        a position is not scored; same lengths as the predictions.
    shift (bool, default True): compare predictions[:-1] with references[1:] (False: position by position).
    ignore_index (int, default -100).
Returns:
    accuracy (float): correct scored positions / scored positions (nan when none is scored).
    scored (int): number of scored positions.
"""


class TokenAccuracy(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        ids = datasets.Sequence(datasets.Value("int64"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": ids, "references": ids}),
        )

    def _compute(self, predictions, references, shift=True, ignore_index=-100) -> dict:
        correct = scored = 0
        for pred, ref in zip(predictions, references):
            pred, ref = np.asarray(pred), np.asarray(ref)
            if pred.shape != ref.shape:
                raise ValueError(f"a prediction of length {pred.size} for a reference of length {ref.size}")
            if shift:
                pred, ref = pred[:-1], ref[1:]
            mask = ref != ignore_index
            correct += int((pred[mask] == ref[mask]).sum())
            scored += int(mask.sum())
        return {"accuracy": correct / scored if scored else float("nan"), "scored": scored}
