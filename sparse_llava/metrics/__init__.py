"""The answer metrics of sparse-llava's evaluations, as `evaluate` metric modules shipped with the package.

`evaluate.load("vqa_accuracy")` would fetch a script from the Hub; these are loaded from their folder here instead:

* `vqa_accuracy`: the VQAv2 accuracy rule against several annotators' answers;
* `answer_match`: exact match and token F1 (SQuAD's definitions), against reference answers or a dense model's.
"""

from pathlib import Path

METRICS_FOLDER = Path(__file__).resolve().parent
METRIC_NAMES = ("answer_match", "vqa_accuracy")


def load(name: str):
    """The `evaluate` module of metric `name` (one of `METRIC_NAMES`), loaded from this package, not the Hub."""
    if name not in METRIC_NAMES:
        raise ValueError(f"unknown metric {name!r}: expected one of {', '.join(METRIC_NAMES)}")
    import evaluate

    return evaluate.load(str(METRICS_FOLDER / name))
