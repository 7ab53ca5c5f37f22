"""The lmms-eval plugin: registration, scoring against direct computation, and lmms-eval's own CLI end to end."""

import importlib.metadata
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import random_images

from sparse_llava.evaluation import generate_with_cost, load_for_evaluation, user_turn_prompt
from sparse_llava.tiny import IMAGE_SIZE, PATCH_SIZE

pytest.importorskip("lmms_eval")

from lmms_eval.api.instance import Instance  # noqa: E402

from sparse_llava import lmms_eval_plugin  # noqa: E402
from sparse_llava.lmms_eval_plugin import SparseLlavaLmms  # noqa: E402

IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
QUESTIONS = ["What is in the image ?", "a cat ?", "red"]
ANSWERS = ["cat", "a red dog", "blue"]

TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


CHOICES = ["cat", "a red dog", "blue"]


def doc_to_choice(doc):
    return CHOICES


def doc_to_answer_index(doc):
    return CHOICES.index(doc["answer"])
"""

GENERATION_TASK = """task: tiny_vqa
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

# Scored with loglikelihood requests: one per choice, the answer with the highest log-probability is the model's pick.
# (lmms-eval 0.7's plain `output_type: loglikelihood` cannot take its own results apart; multiple_choice can.)
SCORING_TASK = """task: tiny_vqa_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_visual: !function tiny_utils.doc_to_visual
doc_to_text: !function tiny_utils.doc_to_text
doc_to_choice: !function tiny_utils.doc_to_choice
doc_to_target: !function tiny_utils.doc_to_answer_index
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def tiny_task(tmp_path_factory):
    """A local lmms-eval task folder (two task YAMLs, their functions, a JSONL file and images on disk)."""
    folder = tmp_path_factory.mktemp("tiny_task")
    images = random_images(len(QUESTIONS), seed=3)
    lines = []
    for index, (image, question, answer) in enumerate(zip(images, QUESTIONS, ANSWERS)):
        image.save(folder / f"{index}.png")
        lines.append(json.dumps({"image": str(folder / f"{index}.png"), "question": question, "answer": answer}))
    data = folder / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    (folder / "tiny_utils.py").write_text(TASK_UTILS)
    (folder / "tiny_vqa.yaml").write_text(GENERATION_TASK.format(data=data))
    (folder / "tiny_vqa_choice.yaml").write_text(SCORING_TASK.format(data=data))
    return folder, images


def test_entry_point_registers_the_plugin():
    (entry_point,) = [
        ep for ep in importlib.metadata.entry_points(group="lmms_eval.models") if ep.name == "sparse_llava"
    ]
    assert entry_point.value == "sparse_llava.lmms_eval_entry_point:model_manifest"
    from lmms_eval import models

    assert models.get_model("sparse_llava") is SparseLlavaLmms


def test_unknown_model_args_are_refused(converted):
    with pytest.raises(ValueError, match="unknown --model_args for sparse_llava: keep_ratio"):
        SparseLlavaLmms(pretrained=str(converted("llava")), keep_ratio=0.5)


@pytest.fixture
def loads(monkeypatch) -> list[dict]:
    """What each `SparseLlavaLmms` asks `load_for_evaluation` for; no model is loaded."""
    calls = []

    def record(pretrained, **settings):
        calls.append({"pretrained": pretrained, **settings})
        return object(), object()

    monkeypatch.setattr(lmms_eval_plugin, "load_for_evaluation", record)
    return calls


def test_model_args_as_lmms_eval_passes_them(loads):
    """Through lmms-eval's own parsing of `--model_args` (it turns true/false into bools and digits into ints)."""
    for written, meant in [("true", True), ("TRUE", True), ("1", True), ("yes", True), ("Yes", True)] + [
        ("false", False), ("False", False), ("0", False), ("no", False), ("NO", False)
    ]:  # fmt: skip
        plugin = SparseLlavaLmms.create_from_arg_string(
            f"pretrained=folder,trust_remote_code={written},measure_flops={written}"
        )
        assert loads[-1]["trust_remote_code"] is meant, written
        assert plugin.measure_flops is meant, written
    loads.clear()
    plugin = SparseLlavaLmms.create_from_arg_string(
        "pretrained=folder,max_new_tokens=7,dtype=float32", {"batch_size": "3", "device": "cpu"}
    )
    assert (plugin.batch_size, plugin.default_max_new_tokens, plugin.measure_flops) == (3, 7, True)
    assert loads == [
        {
            "pretrained": "folder",
            "revision": None,
            "device": "cpu",
            "dtype": "float32",
            "trust_remote_code": False,
            "attn_implementation": None,
        }
    ]


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("trust_remote_code=off", "trust_remote_code must be true or false (or 1/0, yes/no), got 'off'"),
        ("trust_remote_code=2", "trust_remote_code must be true or false (or 1/0, yes/no), got 2"),
        ("measure_flops=maybe", "measure_flops must be true or false (or 1/0, yes/no), got 'maybe'"),
        ("max_new_tokens=many", "max_new_tokens must be a positive integer, got 'many'"),
        ("max_new_tokens=0", "max_new_tokens must be a positive integer, got 0"),
        ("max_new_tokens=-3", "max_new_tokens must be a positive integer, got -3.0"),
        ("max_new_tokens=2.5", "max_new_tokens must be a positive integer, got 2.5"),
        ("batch_size=two", "batch_size must be a positive integer, got 'two'"),
        ("batch_size=0", "batch_size must be a positive integer, got 0"),
        ("dtype=float33", "unknown dtype 'float33': use 'auto' or a torch dtype name such as 'float32', 'bfloat16'"),
        ("device=gpu", "device must name a torch device such as cpu, cuda or cuda:0, got 'gpu'"),
    ],
)
def test_bad_model_args_are_refused_before_loading(model_args, message, loads):
    with pytest.raises(ValueError) as refusal:
        SparseLlavaLmms.create_from_arg_string(f"pretrained=folder,{model_args}")
    assert str(refusal.value) == message
    assert loads == []


def test_cuda_device_must_exist(monkeypatch, loads):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as refusal:
        SparseLlavaLmms.create_from_arg_string("pretrained=folder", {"device": "cuda"})
    assert str(refusal.value) == "device=cuda: this machine has no CUDA device; use device=cpu"

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError) as refusal:
        SparseLlavaLmms(pretrained="folder", device="cuda:2")
    assert str(refusal.value) == "device=cuda:2: this machine has 2 CUDA device(s), cuda:0 to cuda:1"
    assert loads == []
    SparseLlavaLmms(pretrained="folder", device="cuda:1")
    assert loads[-1]["device"] == "cuda:1"


def make_requests(kind, arguments) -> list[Instance]:
    return [
        Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": index, "repeats": 1})
        for index, args in enumerate(arguments)
    ]


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_loglikelihood_matches_direct_computation(base, converted):
    """Summed log-probabilities of each continuation, in a padded batch, against one forward per sample by hand."""
    plugin = SparseLlavaLmms(pretrained=str(converted(base)), batch_size=3)
    images = random_images(3, seed=4, size=(16, 12))
    docs = [{"image": image} for image in images]
    plugin.task_dict = {"t": {"test": docs}}
    requests = make_requests(
        "loglikelihood",
        [(q, " " + a, lambda doc: [doc["image"]], i, "t", "test") for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS))],
    )
    scores = [result.text for result in plugin.loglikelihood(requests)]

    model, processor = plugin.model, plugin.processor
    for (score, greedy), question, answer, image in zip(scores, QUESTIONS, ANSWERS, images):
        prompt = user_turn_prompt(processor, question, 1)
        prompt_ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"]
        inputs = processor(images=image, text=prompt + " " + answer, return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0].float()
        start = prompt_ids.shape[1]
        targets = inputs["input_ids"][0, start:]
        assert len(targets) == len(answer.split())
        log_probs = torch.log_softmax(logits[start - 1 : -1], dim=-1)
        assert score == pytest.approx(log_probs.gather(-1, targets[:, None]).sum().item(), abs=1e-4)
        assert greedy == bool((log_probs.argmax(-1) == targets).all())


def test_generate_until_batches_and_cuts_at_until(converted):
    plugin = SparseLlavaLmms(pretrained=str(converted("llava")), batch_size=2, measure_flops=False)
    images = random_images(3, seed=5)
    plugin.task_dict = {"t": {"test": [{"image": image} for image in images]}}
    alone = [
        generate_with_cost(
            plugin.model, plugin.processor, [user_turn_prompt(plugin.processor, q, 1)], [[image]], max_new_tokens=5
        )[0].text
        for q, image in zip(QUESTIONS, images)
    ]
    cut_word = alone[0].split()[2]
    settings = {"max_new_tokens": 5, "until": [cut_word]}
    requests = make_requests(
        "generate_until",
        [(q, dict(settings), lambda doc: [doc["image"]], i, "t", "test") for i, q in enumerate(QUESTIONS)],
    )
    results = plugin.generate_until(requests)
    assert [result.text for result in results] == [text.split(cut_word)[0] for text in alone]
    assert all(result.token_counts.output_tokens == 5 for result in results)
    with pytest.raises(ValueError, match="beam search"):
        plugin.generate_until(make_requests("generate_until", [("a", {"num_beams": 2}, None, 0, "t", "test")]))


def run_lmms_eval(checkpoint: str, task_folder: Path, output: Path) -> subprocess.Popen:
    lmms_eval = Path(sys.executable).parent / "lmms-eval"
    command = [
        str(lmms_eval),
        "eval",
        "--model", "sparse_llava",
        "--model_args", f"pretrained={checkpoint}",
        "--tasks", "tiny_vqa,tiny_vqa_choice",
        "--include_path", str(task_folder),
        "--batch_size", "2",
        "--output_path", str(output),
        "--log_samples",
        "--process_docs_parallel", "1",
    ]  # fmt: skip
    environment = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(output / "datasets"),
    }
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment)


def read_results(output: Path) -> dict:
    (results_file,) = output.rglob("*_results.json")
    return json.loads(results_file.read_text())


def test_lmms_eval_cli_on_sparse_and_dense(tiny_task, converted, base_checkpoints, tmp_path):
    task_folder, images = tiny_task
    checkpoints = {"sparse": str(converted("llava")), "dense": str(base_checkpoints[("llava", "hub")][0])}
    # Both evaluations at once: most of each run is lmms-eval starting up.
    runs = {name: run_lmms_eval(folder, task_folder, tmp_path / name) for name, folder in checkpoints.items()}
    for name, run in runs.items():
        printed, _ = run.communicate(timeout=600)
        # lmms-eval exits with 0 even when the evaluation failed: a run succeeded if it wrote its results.
        assert run.returncode == 0 and list((tmp_path / name).rglob("*_results.json")), printed[-5000:]
    for name, folder in checkpoints.items():
        results = read_results(tmp_path / name)
        print(name, json.dumps({key: results[key] for key in ("results", "throughput")}, indent=1))
        assert set(results["results"]) == {"tiny_vqa", "tiny_vqa_choice"}
        model, processor = load_for_evaluation(folder)

        # The answers lmms-eval logged are the model's own, asked directly with the same prompt.
        samples = results_samples(tmp_path / name, "tiny_vqa")
        direct = [
            generate_with_cost(model, processor, [user_turn_prompt(processor, q, 1)], [[image]], max_new_tokens=4)[0]
            for q, image in zip(QUESTIONS, images)
        ]
        assert [sample["filtered_resps"] for sample in samples] == [generation.text.strip() for generation in direct]
        exact = [generation.text.strip().lower() == answer for generation, answer in zip(direct, ANSWERS)]
        assert results["results"]["tiny_vqa"]["exact_match,none"] == pytest.approx(sum(exact) / len(exact))

        # Its pick among the choices is the one with the highest summed log-probability, scored here directly.
        picks = [pick_by_likelihood(model, processor, question, image) for question, image in zip(QUESTIONS, images)]
        accuracy = sum(pick == ANSWERS.index(answer) for pick, answer in zip(picks, ANSWERS)) / len(ANSWERS)
        assert results["results"]["tiny_vqa_choice"]["acc,none"] == pytest.approx(accuracy)
        logged = results_samples(tmp_path / name, "tiny_vqa_choice")
        choice_scores = [[float(score) for score, _greedy in sample["filtered_resps"]] for sample in logged]
        assert [scores.index(max(scores)) for scores in choice_scores] == picks

        # Its cost, as lmms-eval reports it: means over the generated answers.
        cost = results["throughput"]
        layers = model.config.text_config.num_hidden_layers
        mean = lambda values: sum(values) / len(values)  # noqa: E731
        assert cost["avg_prefill_flops"] == pytest.approx(mean([g.cost.prefill_flops for g in direct]))
        assert cost["avg_kv_cache_bytes"] == pytest.approx(mean([g.cost.kv_cache_bytes for g in direct]))
        assert cost["avg_image_tokens"] == IMAGE_TOKENS
        if name == "dense":
            assert all(cost[f"avg_image_tokens_kept_layer_{layer}"] == IMAGE_TOKENS for layer in range(layers))
        else:
            sparse_layer, kept = model.config.sparse_layer, math.floor(model.config.vision_keep_ratio * IMAGE_TOKENS)
            assert cost[f"avg_image_tokens_kept_layer_{sparse_layer - 1}"] == IMAGE_TOKENS
            assert cost[f"avg_image_tokens_kept_layer_{sparse_layer}"] == kept
    sparse, dense = (read_results(tmp_path / name)["throughput"] for name in ("sparse", "dense"))
    assert sparse["avg_kv_cache_bytes"] < dense["avg_kv_cache_bytes"]


def results_samples(output: Path, task: str) -> list[dict]:
    """The samples lmms-eval logged for `task`, in document order."""
    (samples_file,) = output.rglob(f"*samples_{task}.jsonl")
    samples = [json.loads(line) for line in samples_file.read_text().splitlines() if line.strip()]
    return sorted(samples, key=lambda sample: sample["doc_id"])


@torch.no_grad()
def pick_by_likelihood(model, processor, question, image) -> int:
    """The choice (index into ANSWERS) whose tokens after the templated prompt have the highest log-probability."""
    prompt = user_turn_prompt(processor, question, 1)
    start = processor(images=image, text=prompt, return_tensors="pt")["input_ids"].shape[1]
    scores = []
    for answer in ANSWERS:
        inputs = processor(images=image, text=f"{prompt} {answer}", return_tensors="pt")
        log_probs = torch.log_softmax(model(**inputs).logits[0, start - 1 : -1].float(), dim=-1)
        scores.append(log_probs.gather(-1, inputs["input_ids"][0, start:, None]).sum().item())
    return scores.index(max(scores))
