"""Exact match and token F1 of short answers (the SQuAD definitions), for the `evaluate` library.

Answers are normalised as SQuAD's evaluation does: lower case, punctuation removed, the articles a, an, the dropped,
whitespace collapsed. For each prediction:

* exact match: 1 if the normalised prediction equals a normalised reference, else 0;
* token F1: the harmonic mean of precision and recall of the prediction's tokens against a reference's (tokens
  counted with multiplicity); 1 when both are empty, 0 when only one is.

Each takes the best over the references of the prediction, and `compute` returns the means over predictions. Used
both against reference answers and to measure agreement with the dense model's answers (one reference: the dense
answer).

This file is an `evaluate` metric module: load it with `evaluate.load("path/to/answer_match")` (a local path, so
nothing is fetched from the Hub).
"""

import re
import string
from collections import Counter

import datasets
import evaluate

ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = str.maketrans("", "", string.punctuation)


def answer_tokens(answer: str) -> list[str]:
    """The normalised tokens of an answer (see the module docstring)."""
    return ARTICLES.sub(" ", answer.lower().translate(PUNCTUATION)).split()


def exact_match(prediction: str, reference: str) -> float:
    return float(answer_tokens(prediction) == answer_tokens(reference))


def token_f1(prediction: str, reference: str) -> float:
    predicted, expected = answer_tokens(prediction), answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


class AnswerMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Rajpurkar et al., SQuAD: 100,000+ Questions for Machine Comprehension of Text, EMNLP 2016.",
            inputs_description=(
                "predictions: list of answers (str); references: for each, the list of acceptable answers. "
                "Returns {'exact_match': mean, 'token_f1': mean}, both in [0, 1]."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("answer match of no predictions is undefined")
        exact, f1 = [], []
        for prediction, answers in zip(predictions, references):
            if not answers:
                raise ValueError("answer match needs at least one reference answer per prediction")
            exact.append(max(exact_match(prediction, answer) for answer in answers))
            f1.append(max(token_f1(prediction, answer) for answer in answers))
        return {"exact_match": sum(exact) / len(exact), "token_f1": sum(f1) / len(f1)}
