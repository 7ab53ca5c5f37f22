"""VQA accuracy (Antol et al., VQA, ICCV 2015), as the VQAv2 evaluation computes it, for the `evaluate` library.

An answer counts as fully correct when at least 3 of the human annotators gave it. The evaluation averages
`min(1, matches / 3)` over the leave-one-out subsets of the annotators: for each annotator, `matches` counts how many
of the *other* annotators gave the predicted answer. With VQAv2's 10 answers per question this gives 0, 0.3, 0.6,
0.9 or 1 for 0, 1, 2, 3 or 4+ matching annotators. With fewer reference answers the rule is harsher (a single
reference scores 0 whatever the prediction), so use it on data with several annotators per question.

Prediction and answers are first normalised as the evaluation does (and as lmms-eval's VQAv2 task does, on both
sides): newlines and tabs become spaces; punctuation is removed (replaced by a space between words), except
apostrophes, colons and decimal points; lower case; number words zero..ten become digits; the articles a, an, the
are dropped; apostrophe-less contractions get their apostrophe back ("dont" -> "don't").

This file is an `evaluate` metric module: load it with `evaluate.load("path/to/vqa_accuracy")` (a local path, so
nothing is fetched from the Hub).
"""

import re

import datasets
import evaluate

PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!*#%^&$'
COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_IN_NUMBER = re.compile(r"(?<!\d)\.(?!\d)")
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = {"a", "an", "the"}
# Contractions, keyed by their form without apostrophes; forms that are English words themselves ("its", "well",
# "were", "ill", "id", "hell", "shell", "wed", "lets") are left alone.
CONTRACTIONS = {
    word.replace("'", ""): word
    for word in (
        "ain't aren't can't couldn't couldn't've could've didn't doesn't don't hadn't hasn't haven't he'd he'd've "
        "he's how'd how'll how's i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't mightn't've might've "
        "mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she's should've shouldn't "
        "shouldn't've somebody'd somebody'll somebody's someone'd someone'll someone's something'd something'll "
        "that's there'd there'd've there're there's they'd they'd've they'll they're they've wasn't we'd've we've "
        "weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll who're who's "
        "who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'd've you'd you'd've you'll "
        "you're you've"
    ).split()
}


def normalize_answer(answer: str) -> str:
    """An answer as the VQA evaluation compares it (see the module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    # A punctuation mark touching a space, or any in a string with a comma between digits ("1,000"), is removed;
    # elsewhere ("yes/no") it separates words.
    glue = COMMA_BETWEEN_DIGITS.search(text) is not None
    for mark in PUNCTUATION:
        if glue or f"{mark} " in text or f" {mark}" in text:
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = PERIOD_NOT_IN_NUMBER.sub("", text)
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA accuracy of one prediction against the annotators' answers."""
    if not answers:
        raise ValueError("VQA accuracy needs at least one reference answer per question")
    predicted = normalize_answer(prediction)
    normalized = [normalize_answer(answer) for answer in answers]
    scores = []
    for left_out in range(len(normalized)):
        others = normalized[:left_out] + normalized[left_out + 1 :]
        scores.append(min(1.0, sum(answer == predicted for answer in others) / 3))
    return sum(scores) / len(scores)


class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=__doc__,
            citation="Antol et al., VQA: Visual Question Answering, ICCV 2015; Goyal et al., VQAv2, CVPR 2017.",
            inputs_description=(
                "predictions: list of answers (str); references: for each, the list of annotators' answers. "
                "Returns {'vqa_accuracy': mean over questions, in [0, 1]}."
            ),
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references):
        if not predictions:
            raise ValueError("VQA accuracy of no predictions is undefined")
        scores = [vqa_accuracy(prediction, answers) for prediction, answers in zip(predictions, references)]
        return {"vqa_accuracy": sum(scores) / len(scores)}
