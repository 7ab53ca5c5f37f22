"""benchmarks/accuracy.py: its samples as read from the data file, and every bad input refused in one line before
any model loads."""

import re
import sys
from pathlib import Path

import pytest
from conftest import random_images

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import accuracy  # noqa: E402


@pytest.fixture
def data_folder(tmp_path) -> Path:
    """A folder with an image and a file named like one that is not an image."""
    random_images(1)[0].save(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but no chunks follow")
    return tmp_path


@pytest.fixture(autouse=True)
def no_model_loads(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(accuracy, "load_for_evaluation", load)


def refusal(capsys, *options: str) -> str:
    """The one line `accuracy.py` exits with for `options` (after --base and --variants)."""
    with pytest.raises(SystemExit) as exit:
        accuracy.main(["--base", "dense", "--variants", "sparse", *options])
    if isinstance(exit.value.code, str):
        return exit.value.code
    # argparse prints its usage, then the error on the last line.
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_answers_as_one_string_are_one_reference(data_folder):
    data = data_folder / "data.jsonl"
    data.write_text(
        '{"image": "good.png", "question": "colour?", "answers": "red"}\n'
        '{"question": "colour?", "answers": ["red", "dark red"]}\n'
        '{"question": "colour?", "answer": "blue"}\n'
        '{"question": "colour?"}\n'
    )
    samples = accuracy.read_samples(data)
    assert [sample["references"] for sample in samples] == [["red"], ["red", "dark red"], ["blue"], []]
    assert samples[0]["images"] == [data_folder / "good.png"]
    assert len(accuracy.read_samples(data, limit=2)) == 2


def test_an_answer_equal_to_its_one_reference_is_exact(data_folder):
    pytest.importorskip("evaluate")
    data = data_folder / "data.jsonl"
    data.write_text('{"question": "colour?", "answers": "red"}\n')
    assert accuracy.score(["red"], ["red"], accuracy.read_samples(data))["exact_match"] == 1.0


@pytest.mark.parametrize(
    "options, message",
    [
        (["--limit", "0"], "argument --limit: must be at least 1, got 0"),
        (["--limit", "-1"], "argument --limit: must be at least 1, got -1"),
        (["--limit", "ten"], "argument --limit: expected a positive integer, got 'ten'"),
        (["--max-new-tokens", "0"], "argument --max-new-tokens: must be at least 1, got 0"),
        (["--batch-size", "0"], "argument --batch-size: must be at least 1, got 0"),
    ],
)
def test_bad_numbers_are_refused(options, message, data_folder, capsys):
    data = data_folder / "data.jsonl"
    data.write_text('{"question": "colour?"}\n')
    assert refusal(capsys, "--data", str(data), *options).endswith(f": error: {message}")


def test_a_data_file_that_cannot_be_read(data_folder, capsys):
    missing = data_folder / "missing.jsonl"
    assert (
        refusal(capsys, "--data", str(missing)) == f"{missing}: cannot read the data file (No such file or directory)"
    )
    assert refusal(capsys, "--data", str(data_folder)) == f"{data_folder}: is a folder; --data takes a JSON-lines file"
    latin1 = data_folder / "latin1.jsonl"
    latin1.write_bytes('{"question": "colour?"}\n{"question": "couleur ?"}\n{"question": "ça ?"}\n'.encode("latin-1"))
    assert refusal(capsys, "--data", str(latin1)) == f"{latin1}:3: not UTF-8 text; save the data file as UTF-8"


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("{oops", r"not JSON \(Expecting property name enclosed in double quotes\)"),
        ('"a question"', re.escape('a sample must be a JSON object {...}, got "a question"')),
        ("[1, 2]", re.escape("a sample must be a JSON object {...}, got [1, 2]")),
        ('{"image": "good.png"}', "a sample needs a 'question' string"),
        ('{"question": 3}', "a sample needs a 'question' string"),
        ('{"question": "q", "image": 3}', r"'image' must be an image path \(a string\)"),
        ('{"question": "q", "images": "good.png"}', r"'images' must be a list of image paths \(strings\)"),
        ('{"question": "q", "image": "absent.png"}', "image not found: .*absent.png"),
        ('{"question": "q", "image": "broken.png"}', r"not a readable image: .*broken.png \(.+\)"),
        ('{"question": "q", "images": ["good.png", "broken.png"]}', r"not a readable image: .*broken.png \(.+\)"),
        ('{"question": "q", "answers": 3}', "'answers' must be a string or a list of strings"),
        ('{"question": "q", "answers": [{"answer": "red"}]}', "'answers' must be a string or a list of strings"),
        ('{"question": "q", "answer": 2}', "'answer' must be a string"),
    ],
)
def test_a_bad_sample_is_named_by_its_line(bad_line, problem, data_folder, capsys):
    data = data_folder / "data.jsonl"
    data.write_text(f'{{"image": "good.png", "question": "colour?"}}\n\n{bad_line}\n')
    message = refusal(capsys, "--data", str(data))
    assert re.fullmatch(re.escape(f"{data}:3: ") + problem, message), message
