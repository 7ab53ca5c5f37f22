"""Answers with their costs (sparse_llava.evaluation), the answer metrics, and benchmarks/accuracy.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import generated_cache, random_images

from sparse_llava.evaluation import SampleCost, generate_with_cost, load_for_evaluation, user_turn_prompt
from sparse_llava.flops import flop_counter
from sparse_llava.tiny import IMAGE_SIZE, PATCH_SIZE, tiny_base_config

REPO = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is in the image ?", "a cat ?", "red"]
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def ask(model, processor, questions, images, **settings):
    prompts = [user_turn_prompt(processor, question, 1) for question in questions]
    return generate_with_cost(model, processor, prompts, [[image] for image in images], **settings)


@pytest.fixture
def dense(base_checkpoints):
    return load_for_evaluation(str(base_checkpoints[("llava", "hub")][0]))


@pytest.fixture
def dynamic(converted):
    return load_for_evaluation(str(converted("llava")))


def kv_bytes_per_token_and_layer() -> int:
    text = tiny_base_config("llava").text_config
    head_dim = text.hidden_size // text.num_attention_heads
    return 2 * text.num_key_value_heads * head_dim * 4  # keys and values, float32


def test_dense_costs(dense):
    model, processor = dense
    layers = model.config.text_config.num_hidden_layers
    (generation,) = ask(model, processor, QUESTIONS[:1], random_images(1), max_new_tokens=5)
    cost = generation.cost
    assert cost.output_tokens == len(generation.token_ids) == 5
    assert cost.image_tokens == IMAGE_TOKENS and cost.image_tokens_kept == [IMAGE_TOKENS] * layers
    assert cost.output_text_tokens_kept == [4] * layers  # the last token is never run through the model
    # Every prompt token and every generated token but the last is cached in every layer.
    assert cost.kv_cache_bytes == (cost.prompt_tokens + 4) * layers * kv_bytes_per_token_and_layer()
    inputs = processor(
        images=random_images(1), text=[user_turn_prompt(processor, QUESTIONS[0], 1)], return_tensors="pt"
    )
    with torch.no_grad(), flop_counter() as counter:
        model(**inputs, logits_to_keep=1)
    assert cost.prefill_flops == counter.get_total_flops() > 0


def test_dynamic_llava_costs_match_its_cache(dynamic):
    model, processor = dynamic
    config = model.config
    (generation,) = ask(model, processor, QUESTIONS[:1], random_images(1), max_new_tokens=5)
    cost = generation.cost
    kept = math.floor(config.vision_keep_ratio * IMAGE_TOKENS)
    layers = config.text_config.num_hidden_layers
    expected_image = [IMAGE_TOKENS] * config.sparse_layer + [kept] * (layers - config.sparse_layer)
    assert cost.image_tokens_kept == expected_image
    # The same generation, read from the cache it leaves behind.
    prompt = user_turn_prompt(processor, QUESTIONS[0], 1)
    inputs = processor(images=random_images(1), text=[prompt], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    assert output.sequences[0, inputs["input_ids"].shape[1] :].tolist() == generation.token_ids
    assert cost.kv_cache_bytes == generated_cache(output).memory_bytes()
    report = generated_cache(output).sparsity_report()
    assert cost.output_text_tokens_kept == [layer["output_text_kept"][0] for layer in report]


@pytest.mark.parametrize("model_name", ["dense", "dynamic"])
def test_costs_in_a_batch_are_each_samples_own(model_name, request):
    """Rows of different lengths, one of which stops early: each row's answer and cost as when asked alone."""
    model, processor = request.getfixturevalue(model_name)
    images = random_images(3, seed=4)
    alone = [
        ask(model, processor, [question], [image], max_new_tokens=6)[0] for question, image in zip(QUESTIONS, images)
    ]
    # Make a token of one answer the end of sequence: that row finishes early while another row goes on.
    answers = [generation.token_ids for generation in alone]
    stop_token = next(
        token
        for answer in answers
        for position, token in enumerate(answer[1:4], start=1)
        if token not in answer[:position] and any(token not in other for other in answers)
    )
    original_eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = stop_token
    try:
        alone = [ask(model, processor, [q], [image], max_new_tokens=6)[0] for q, image in zip(QUESTIONS, images)]
        batch = ask(model, processor, QUESTIONS, images, max_new_tokens=6)
    finally:
        model.generation_config.eos_token_id = original_eos
    assert min(generation.cost.output_tokens for generation in alone) < 6
    assert max(generation.cost.output_tokens for generation in alone) == 6
    for together, single in zip(batch, alone):
        assert together.token_ids == single.token_ids
        assert together.cost == single.cost


def test_bad_prompts_are_refused(dense):
    model, processor = dense
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        user_turn_prompt(processor, "<image> <image> What ?", 1)
    with pytest.raises(ValueError, match="3 prompts but 1 image lists"):
        generate_with_cost(model, processor, ["a", "b", "c"], [[]])
    processor_without_template = type(processor)(
        image_processor=processor.image_processor, tokenizer=processor.tokenizer, chat_template=None
    )
    processor_without_template.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        user_turn_prompt(processor_without_template, "What ?", 1)


# ---------------------------------------------------------------------------------------------------------------
# Metric modules, against values worked out by hand
# ---------------------------------------------------------------------------------------------------------------


def test_vqa_accuracy_by_hand():
    pytest.importorskip("evaluate")
    from sparse_llava import metrics

    ten = lambda answer, count, other="no": [answer] * count + [other] * (10 - count)  # noqa: E731
    cases = [
        # (prediction, annotators' answers, accuracy): with k of 10 annotators matching, the mean over the 10
        # leave-one-out subsets of min(1, matches / 3) is (k min(1, (k-1)/3) + (10-k) min(1, k/3)) / 10.
        ("cat", ten("cat", 0), 0.0),
        ("cat", ten("cat", 1), 0.3),  # (1*0 + 9*(1/3)) / 10
        ("cat", ten("cat", 2), 0.6),  # (2*(1/3) + 8*(2/3)) / 10
        ("cat", ten("cat", 3), 0.9),  # (3*(2/3) + 7*1) / 10
        ("cat", ten("cat", 4), 1.0),
        # Normalisation: number words, articles, case, punctuation, a period ending the answer, contractions.
        ("Two.", ten("2", 10), 1.0),
        ("the Red bus", ten("red bus", 3), 0.9),
        ("dont know", ten("don't know", 4), 1.0),
        ("yes/no", ten("yes no", 4), 1.0),
        ("3.5", ten("35", 4), 0.0),  # a decimal point is kept
    ]
    module = metrics.load("vqa_accuracy")
    for prediction, answers, expected in cases:
        result = module.compute(predictions=[prediction], references=[answers])["vqa_accuracy"]
        assert result == pytest.approx(expected), prediction
    everything = module.compute(predictions=[c[0] for c in cases], references=[c[1] for c in cases])
    assert everything["vqa_accuracy"] == pytest.approx(sum(c[2] for c in cases) / len(cases))
    with pytest.raises(ValueError, match="at least one reference"):
        module.compute(predictions=["cat"], references=[[]])


def test_answer_match_by_hand():
    pytest.importorskip("evaluate")
    from sparse_llava import metrics

    predictions = ["The cat.", "a red bus", "red red", "", "dog"]
    references = [["cat"], ["blue bus", "red car"], ["red"], [""], ["a dog", "cat"]]
    # exact match: "cat" == "cat"; no; "red red" != "red"; both empty; "dog" == "dog".
    expected_exact = [1, 0, 0, 1, 1]
    # token F1, best reference: 1; "red bus" vs "blue bus" and vs "red car": 1 common of 2 and 2 -> 0.5;
    # "red red" vs "red": precision 1/2, recall 1 -> 2/3; both empty -> 1; 1.
    expected_f1 = [1, 0.5, 2 / 3, 1, 1]
    result = metrics.load("answer_match").compute(predictions=predictions, references=references)
    assert result["exact_match"] == pytest.approx(sum(expected_exact) / 5)
    assert result["token_f1"] == pytest.approx(sum(expected_f1) / 5)
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.load("bleu")


# ---------------------------------------------------------------------------------------------------------------
# benchmarks/accuracy.py, end to end
# ---------------------------------------------------------------------------------------------------------------


def vqa_accuracy_with_k_matches(k: int) -> float:
    return (k * min(1, (k - 1) / 3) + (10 - k) * min(1, k / 3)) / 10 if k else 0.0


def test_accuracy_command(dense, base_checkpoints, converted, tmp_path):
    pytest.importorskip("evaluate")
    model, processor = dense
    images = random_images(4, seed=2)
    questions = QUESTIONS + ["blue ?"]
    dense_answers = [g.text.strip() for g in ask(model, processor, questions, images, max_new_tokens=3)]
    # References: the dense answer given by k of 10 annotators (k = 0, 1, 3, 4), so the dense model's accuracy is known.
    matches = [0, 1, 3, 4]
    lines = []
    for index, (image, question, answer, k) in enumerate(zip(images, questions, dense_answers, matches)):
        image.save(tmp_path / f"{index}.png")
        answers = [answer] * k + ["zzz"] * (10 - k)
        lines.append(json.dumps({"image": f"{index}.png", "question": question, "answers": answers}))
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(lines) + "\n")
    base = str(base_checkpoints[("llava", "hub")][0])
    equivalent = str(converted("llava", vision_keep_ratio=1.0, text_sparsification=False))
    sparse = str(converted("llava"))
    result_file = tmp_path / "results.json"
    command = [
        sys.executable,
        str(REPO / "benchmarks" / "accuracy.py"),
        "--base",
        base,
        "--variants",
        equivalent,
        sparse,
        "--data",
        str(data),
        "--batch-size",
        "3",
        "--max-new-tokens",
        "3",
        "--json",
        str(result_file),
    ]
    printed = subprocess.run(command, capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    print(printed)
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    assert "agree EM" in header and "VQA acc" in header and "prefill FLOPs" in header
    report = json.loads(result_file.read_text())["models"]
    assert report[base]["answers"] == dense_answers
    expected_vqa = sum(vqa_accuracy_with_k_matches(k) for k in matches) / len(matches)
    assert report[base]["scores"]["vqa_accuracy"] == pytest.approx(expected_vqa)
    assert report[base]["scores"]["exact_match"] == pytest.approx(3 / 4)  # every sample but the k = 0 one
    for name in (base, equivalent):
        row = report[name]["row"]
        assert row["agreement_exact_match"] == row["agreement_token_f1"] == 1.0
        assert row["image_keep_rate"] == 1.0
    assert report[equivalent]["answers"] == dense_answers
    # The sparse variant's agreement, recomputed directly from the answers.
    agreement = [a.lower().split() == b.lower().split() for a, b in zip(report[sparse]["answers"], dense_answers)]
    assert report[sparse]["row"]["agreement_exact_match"] == pytest.approx(sum(agreement) / len(agreement))
    config = json.loads((Path(sparse) / "config.json").read_text())
    layers, sparse_layer = config["text_config"]["num_hidden_layers"], config["sparse_layer"]
    kept = math.floor(config["vision_keep_ratio"] * IMAGE_TOKENS)
    expected_rate = (sparse_layer * IMAGE_TOKENS + (layers - sparse_layer) * kept) / layers / IMAGE_TOKENS
    assert report[sparse]["row"]["image_keep_rate"] == pytest.approx(expected_rate)
    assert report[sparse]["row"]["kv_cache_bytes_ratio"] < 1.0
    for name in report:
        costs = [SampleCost(**cost) for cost in report[name]["costs"]]
        assert report[name]["row"]["prefill_flops"] == pytest.approx(sum(c.prefill_flops for c in costs) / len(costs))
