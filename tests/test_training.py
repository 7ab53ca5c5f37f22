"""Training: Dynamic-LLaVA's Gumbel/masked-attention forward, p-MoD's routed forward, the Trainer helpers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_PREDICTOR
from PIL import Image
from transformers import AutoModelForImageTextToText, Trainer, TrainerCallback, TrainingArguments

import sparse_llava
from sparse_llava import DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, PMoDLlavaForConditionalGeneration
from sparse_llava.compat_transformers import IS_TRANSFORMERS_V5
from sparse_llava.modeling_dynamic_llava import last_answer_tokens
from sparse_llava.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, PATCH_SIZE, build_tiny_processor, tiny_base_config
from sparse_llava.training import (
    GumbelTemperatureCallback,
    LlavaConversationCollator,
    SparseLlavaTrainer,
    freeze_vision_tower,
    parameter_groups,
)

REPO = Path(__file__).resolve().parents[1]


def answer_labels(input_ids, attention_mask, answer_lengths):
    """Labels keeping only the last `answer_lengths[row]` tokens of each (left-padded) row."""
    labels = torch.full_like(input_ids, -100)
    for row, length in enumerate(answer_lengths):
        labels[row, -length:] = input_ids[row, -length:]
    return labels.masked_fill(attention_mask == 0, -100)


def training_batch(base="llava", answer_lengths=(6, 3), left_padding=(0, 2), seed=0):
    inputs = sparse_llava.tiny.tiny_inputs(
        base, batch_size=len(answer_lengths), text_after=8, left_padding=list(left_padding), seed=seed
    )
    inputs["labels"] = answer_labels(inputs["input_ids"], inputs["attention_mask"], answer_lengths)
    return inputs


def keep_where_keep_logit_wins(logits):
    """Deterministic stand-in for the Gumbel sample: keep iff the keep logit beats the drop logit."""
    return (logits[..., 0] > logits[..., 1]).float()


# ----------------------------------------------------------------------------------------------------------------------
# Dynamic-LLaVA's training forward
# ----------------------------------------------------------------------------------------------------------------------


def test_last_answer_is_the_last_run_of_labelled_tokens():
    x = -100
    labels = torch.tensor(
        [
            [x, x, 5, 6, x, x, 7, 8, 9, x],  # two answers, then right padding
            [x, x, x, x, x, 4, 5, 6, 7, 8],  # one answer up to the end
            [x, x, x, x, x, x, x, x, x, x],  # no answer
        ]
    )
    expected = torch.zeros_like(labels, dtype=torch.bool)
    expected[0, 6:9] = True
    expected[1, 5:] = True
    assert torch.equal(last_answer_tokens(labels), expected)


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_training_attention_hides_dropped_keys_as_inference_removes_them(converted, attn_implementation):
    """
    With the decisions the inference top-k makes, the training forward (every token kept, the policy multiplied into
    attention) gives the tokens that remain the logits that inference gives them after removing the others.
    """
    model = DynamicLlavaForConditionalGeneration.from_pretrained(
        converted("llava"), attn_implementation=attn_implementation
    )
    inputs = sparse_llava.tiny.tiny_inputs("llava", left_padding=[0, 3])
    with torch.no_grad():
        sparse = model.eval()(**inputs).logits
    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    num_kept = math.floor(16 * model.config.vision_keep_ratio)

    def inference_top_k(logits):  # the top `num_kept` keep scores of each image, as inference selects
        keep_score = F.log_softmax(logits.float(), dim=-1)[..., 0]
        rank = keep_score.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1, stable=True)
        return (rank < num_kept).float()

    model.sample_keep_decisions = inference_top_k
    with torch.no_grad():
        training = model.train()(**inputs).logits
    remaining = (sparse.abs().sum(-1) > 0) & inputs["attention_mask"].bool()
    assert int((remaining & is_image).sum()) == 2 * num_kept  # inference dropped the others (zero logits)
    assert int((remaining & ~is_image).sum()) == int((inputs["attention_mask"].bool() & ~is_image).sum())
    torch.testing.assert_close(training[remaining], sparse[remaining], rtol=1e-4, atol=1e-4)
    # and the dropped tokens did change what the others compute (the comparison is not vacuous)
    dense = DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava"), vision_keep_ratio=1.0)
    with torch.no_grad():
        dense_logits = dense.eval()(**inputs).logits
    assert not torch.allclose(dense_logits[remaining & ~is_image], sparse[remaining & ~is_image], atol=1e-3)


def test_training_loss_is_lm_loss_plus_weighted_keep_ratio_gaps(converted):
    model = DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava"), output_text_min_length=5).train()
    model.sample_keep_decisions = keep_where_keep_logit_wins
    captured = {}
    model.output_text_score_predictor.register_forward_hook(lambda module, args, out: captured.update(text=out))
    inputs = training_batch(answer_lengths=(6, 3))
    with torch.no_grad():
        out = model(**inputs)

    config, terms = model.config, out.loss_terms
    assert set(terms) == {"lm_loss", "image_mask_loss", "output_text_mask_loss"}
    torch.testing.assert_close(out.loss, terms["lm_loss"] + terms["image_mask_loss"] + terms["output_text_mask_loss"])
    logits = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    torch.testing.assert_close(terms["lm_loss"], F.cross_entropy(logits, inputs["labels"][:, 1:].reshape(-1)))

    counts = out.sparsity_report()[config.sparse_layer]
    kept_fraction = torch.tensor(counts["image_kept"]) / torch.tensor(counts["image_seen"])
    expected_image = config.mask_loss_weight * ((config.vision_keep_ratio - kept_fraction) ** 2).mean()
    torch.testing.assert_close(terms["image_mask_loss"], expected_image.float())

    # The output-text predictor saw each row's last answer (6 + 3 tokens); only the 6-token answer is long enough.
    assert captured["text"].shape[0] == 6 + 3
    kept_of_long_answer = keep_where_keep_logit_wins(captured["text"][:6]).mean()
    expected_text = config.mask_loss_weight * (config.output_text_keep_ratio - kept_of_long_answer) ** 2 / 2
    torch.testing.assert_close(terms["output_text_mask_loss"], expected_text)


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_gradients_reach_both_predictors_through_the_attention(converted, base):
    """With the regulariser off, only the LM loss through the masked attention can train the predictors."""
    model = DynamicLlavaForConditionalGeneration.from_pretrained(
        converted(base), output_text_min_length=5, mask_loss_weight=0.0
    ).train()
    out = model(**training_batch(base, answer_lengths=(6, 3)))
    assert out.loss_terms["image_mask_loss"].item() == 0.0
    out.loss.backward()
    for name in ("image_score_predictor", "output_text_score_predictor"):
        for parameter_name, parameter in getattr(model, name).named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{name}.{parameter_name}"


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated")  # its new name is 5.x only
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("method", ["dynamic-llava", "p-mod"])
def test_gradient_checkpointing_gives_the_same_gradients(converted, converted_pmod, method, use_reentrant):
    folder = converted("llava", output_text_min_length=5) if method == "dynamic-llava" else converted_pmod("llava")
    inputs = training_batch(answer_lengths=(6, 3))
    gradients = []
    for checkpointing in (False, True):
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": use_reentrant})
        torch.manual_seed(0)  # the same Gumbel noise
        model(**inputs).loss.backward()
        gradients.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys()
    assert any("predictor" in name or "router" in name for name in gradients[0])
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, msg=name)


def test_eval_forward_ignores_the_training_path(converted):
    """Labels in eval mode give the plain LM loss (no policy, no regularisers)."""
    model = DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava")).eval()
    with torch.no_grad():
        out = model(**training_batch())
    assert set(out.loss_terms) == {"lm_loss"}


# ----------------------------------------------------------------------------------------------------------------------
# p-MoD's routed forward
# ----------------------------------------------------------------------------------------------------------------------


def test_pmod_routers_get_gradients_from_kept_and_skipped_tokens(converted_pmod):
    model = PMoDLlavaForConditionalGeneration.from_pretrained(converted_pmod("llava")).train()
    router_outputs = {}

    def keep_output(layer):
        def hook(module, args, output):
            output.retain_grad()
            router_outputs[layer] = output

        return hook

    for layer, router in model.routers.items():
        router.register_forward_hook(keep_output(int(layer)))
    inputs = sparse_llava.tiny.tiny_inputs("llava", left_padding=[0, 2])
    # Every position is a target, so every token's output at every layer reaches the loss: a token skipped by the
    # last layers would otherwise influence nothing the loss sees.
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs)
    assert set(out.loss_terms) == {"lm_loss"}
    out.loss.backward()
    report = out.sparsity_report()
    is_image = (inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()
    for layer, logits in router_outputs.items():
        kept, seen = report[layer]["image_kept"], report[layer]["image_seen"]
        assert all(0 < k < s for k, s in zip(kept, seen))  # the layer keeps some routed tokens and skips others
        token_gradient = logits.grad.squeeze(-1).abs()
        # A gradient reaches the router from each routed token, kept or skipped (STRing), and from no text token.
        assert bool((token_gradient[is_image] > 0).all()), layer
        assert bool((token_gradient[~is_image] == 0).all()), layer
        assert model.routers[str(layer)].weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------------
# Trainer helpers
# ----------------------------------------------------------------------------------------------------------------------


class TensorDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors["input_ids"])

    def __getitem__(self, index):
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def quick_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "run"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
    )
    return TrainingArguments(**{**settings, **overrides})


def test_gumbel_temperature_callback_decays_the_temperature(converted, tmp_path):
    model = DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava"))
    seen = []

    class Recorder(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            seen.append((state.global_step, model.gumbel_tau))

    trainer = Trainer(
        model=model,
        args=quick_args(tmp_path, max_steps=5),
        train_dataset=TensorDataset(training_batch(answer_lengths=(6, 3, 4, 5), left_padding=(0, 2, 1, 0))),
        callbacks=[GumbelTemperatureCallback(), Recorder()],
    )
    trainer.train()
    start, end = model.config.gumbel_tau_start, model.config.gumbel_tau_end
    assert (start, end) == (1.0, 0.1)
    assert [step for step, _ in seen] == [0, 1, 2, 3, 4]
    for step, tau in seen:
        assert tau == pytest.approx(start * (end / start) ** (step / 5))
    assert seen[0][1] == 1.0 and seen[-1][1] < 0.2


def test_parameter_groups_give_the_new_modules_their_own_learning_rate(converted_pmod, tmp_path):
    model = PMoDLlavaForConditionalGeneration.from_pretrained(converted_pmod("llava"))
    freeze_vision_tower(model)
    trainer = SparseLlavaTrainer(
        model=model,
        args=quick_args(tmp_path, learning_rate=5e-6, weight_decay=0.1),
        train_dataset=TensorDataset(training_batch()),
        sparse_learning_rate=2e-4,
    )
    optimizer = trainer.create_optimizer()
    by_parameter = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        if name.startswith("model.vision_tower."):
            assert id(parameter) not in by_parameter, name  # frozen
        elif name.startswith("routers."):
            assert (by_parameter[id(parameter)]["lr"], by_parameter[id(parameter)]["weight_decay"]) == (2e-4, 0.0)
        else:
            assert by_parameter[id(parameter)]["lr"] == 5e-6, name
            expected_decay = 0.0 if name.endswith("bias") or "norm" in name else 0.1
            assert by_parameter[id(parameter)]["weight_decay"] == expected_decay, name
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    # Without the decay names every LLM parameter decays.
    groups = parameter_groups(model, 1e-5, 1e-3, weight_decay=0.1)
    assert [(group["lr"], group["weight_decay"]) for group in groups] == [(1e-5, 0.1), (1e-3, 0.0)]


def test_collator_labels_only_the_assistant_answers():
    processor = build_tiny_processor("llava")
    collator = LlavaConversationCollator(processor, system_prompt="")
    image = Image.fromarray(np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8))
    examples = [
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is in the image ?"},
                {"from": "gpt", "value": "a cat"},
                {"from": "human", "value": "What is the cat ?"},
                {"from": "gpt", "value": "red"},
            ],
            "images": [image],
        },
        {"conversations": [{"from": "human", "value": "What ?"}, {"from": "gpt", "value": "a dog"}], "images": []},
    ]
    batch = collator(examples)
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    labelled = [
        [token for token, label in zip(row_tokens, row_labels) if label != -100]
        for row_tokens, row_labels in zip(tokens, batch["labels"].tolist())
    ]
    assert labelled == [["a", "cat", "</s>", "red", "</s>"], ["a", "dog", "</s>"]]
    first = [token for token, mask in zip(tokens[0], batch["attention_mask"][0]) if mask]
    assert first == ["<s>", "USER:"] + ["<image>"] * 16 + "What is in the image ? ASSISTANT: a cat </s>".split() + (
        "USER: What is the cat ? ASSISTANT: red </s>".split()
    )
    assert batch["pixel_values"].shape == (1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="more <image> placeholders than images"):
        collator([{**examples[0], "images": []}])


def test_collated_llava_next_batch_trains(converted):
    """Images of different sizes give different tile counts; the collator pads them and the model trains on it."""
    processor = build_tiny_processor("llava_next")
    collator = LlavaConversationCollator(processor, system_prompt="")
    conversation = [{"from": "human", "value": "<image>\nWhat is in the image ?"}, {"from": "gpt", "value": "a cat"}]
    sizes = [(IMAGE_SIZE, IMAGE_SIZE * 2), (IMAGE_SIZE * 2, IMAGE_SIZE * 2)]  # (height, width)
    images = [Image.fromarray(np.full((height, width, 3), 100, np.uint8)) for height, width in sizes]
    batch = collator([{"conversations": conversation, "images": [image]} for image in images])
    assert batch["pixel_values"].shape == (2, 5, 3, IMAGE_SIZE, IMAGE_SIZE)  # base tile + 1x2 / 2x2 grid, padded
    assert batch["image_sizes"].tolist() == [list(size) for size in sizes]
    image_tokens = (batch["input_ids"] == IMAGE_TOKEN_ID).sum(-1).tolist()
    assert image_tokens == [sparse_llava.tiny.next_image_tokens(size) for size in sizes]

    model = DynamicLlavaForConditionalGeneration.from_pretrained(converted("llava_next")).train()
    out = model(**batch)
    assert set(out.loss_terms) == {"lm_loss", "image_mask_loss", "output_text_mask_loss"}
    out.loss.backward()
    assert model.image_score_predictor.output_mlp[-1].weight.grad.abs().sum() > 0


def write_llava_dataset(folder: Path, count: int = 8) -> Path:
    """A LLaVA-format JSON file with `count` one-image conversations and their PNG images."""
    rng = np.random.default_rng(0)
    records = []
    for index in range(count):
        name = f"image{index}.png"
        pixels = rng.integers(0, 255, (IMAGE_SIZE * 2, IMAGE_SIZE * 2, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / name)
        answer = "a cat" if index % 2 else "a red dog"
        conversation = [{"from": "human", "value": "<image>\nWhat is in the image ?"}, {"from": "gpt", "value": answer}]
        records.append({"id": str(index), "image": name, "conversations": conversation})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_example_script_trains_and_saves_a_loadable_model(converted, tmp_path):
    source = converted("llava")
    data = write_llava_dataset(tmp_path)
    output = tmp_path / "trained"
    command = [
        sys.executable,
        str(REPO / "examples" / "train.py"),
        "--model", str(source), "--data", str(data), "--output-dir", str(output),
        "--max-steps", "3", "--batch-size", "4", "--learning-rate", "1e-3", "--sparse-learning-rate", "1e-2",
        "--gradient-checkpointing", "--use-cpu", "--logging-steps", "1",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "image_mask_loss" in result.stdout + result.stderr  # the parts of the loss are logged

    trained = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    original = AutoModelForImageTextToText.from_pretrained(source, trust_remote_code=True).eval()
    assert type(trained).__name__ == "DynamicLlavaForConditionalGeneration"
    changed = lambda prefix: any(  # noqa: E731
        not torch.equal(parameter, original.state_dict()[name])
        for name, parameter in trained.state_dict().items()
        if name.startswith(prefix)
    )
    assert changed("image_score_predictor.") and changed("model.language_model.")
    assert not changed("model.vision_tower.")
    inputs = sparse_llava.tiny.tiny_inputs("llava", batch_size=1)
    generated = trained.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 4)


# ----------------------------------------------------------------------------------------------------------------------
# Learning: the image predictor learns to keep the patches the answer depends on
# ----------------------------------------------------------------------------------------------------------------------

GRID = IMAGE_SIZE // PATCH_SIZE  # 4 x 4 patches, one image token each
MARKED_PATCHES = 3
COLOURS = torch.tensor([[2.0, -2.0, -2.0], [-2.0, -2.0, 2.0]])  # the answer: which colour the marked patches have
ANSWER_IDS = torch.tensor([13, 14])
PROMPT_IDS, QUESTION_IDS = [2, 4], [6, 7, 8, 9, 10, 11, 5]


def marked_patch_task(count: int, seed: int):
    """
    Images of low-amplitude noise with `MARKED_PATCHES` patches painted in one of two colours; the answer is the
    colour. Returns the model inputs (the only label is the answer) and the marked patches' indices `[count, 3]`.
    """
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 0.5
    marked = torch.stack([torch.randperm(GRID * GRID, generator=generator)[:MARKED_PATCHES] for _ in range(count)])
    colour = torch.randint(0, 2, (count,), generator=generator)
    patches = pixels.view(count, 3, GRID, PATCH_SIZE, GRID, PATCH_SIZE)  # a view: painting it paints `pixels`
    for row in range(count):
        for patch in marked[row].tolist():
            patches[row, :, patch // GRID, :, patch % GRID, :] = COLOURS[colour[row]][:, None, None]
    ids = PROMPT_IDS + [IMAGE_TOKEN_ID] * GRID * GRID + QUESTION_IDS
    input_ids = torch.cat([torch.tensor(ids).repeat(count, 1), ANSWER_IDS[colour][:, None]], dim=1)
    labels = torch.full_like(input_ids, -100)
    labels[:, -1] = input_ids[:, -1]
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels}
    return {**inputs, "labels": labels}, marked


@pytest.fixture(scope="module")
def trained_on_marked_patches(tmp_path_factory):
    """A tiny Dynamic-LLaVA trained from scratch with the Trainer to answer from the marked patches, keeping 25%."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead, and the test runs on a shared machine
    try:
        base = tiny_base_config("llava", num_layers=2)
        # The predictors act before the first layer, so information can only reach the answer through the kept
        # tokens, and the image features are the patch embeddings (a one-layer tower's input), so each token carries
        # only its own patch.
        base.vision_config.num_hidden_layers, base.vision_feature_layer = 1, -2
        config = DynamicLlavaConfig.from_base_config(
            base, sparse_layer=0, vision_keep_ratio=0.25, attn_implementation="eager", **SMALL_PREDICTOR
        )
        torch.manual_seed(0)
        model = DynamicLlavaForConditionalGeneration(config)
        freeze_vision_tower(model)
        train_inputs, _ = marked_patch_task(2048, seed=0)
        args = TrainingArguments(
            output_dir=str(tmp_path_factory.mktemp("marked") / "run"),
            max_steps=300,
            per_device_train_batch_size=32,
            learning_rate=3e-3,
            lr_scheduler_type="cosine",
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            disable_tqdm=True,
            logging_steps=50,
            seed=0,
        )
        trainer = SparseLlavaTrainer(
            model=model, args=args, train_dataset=TensorDataset(train_inputs), sparse_learning_rate=3e-3
        )
        trainer.train()
        yield model
    finally:
        torch.set_num_threads(threads)


def task_loss(model, inputs, vision_keep_ratio, replace_scores=None):
    model.eval()
    model.config.vision_keep_ratio = vision_keep_ratio
    hook = None
    if replace_scores is not None:
        hook = model.image_score_predictor.register_forward_hook(lambda module, args, output: replace_scores(output))
    try:
        with torch.no_grad():
            return float(model(**inputs).loss)
    finally:
        model.config.vision_keep_ratio = 0.25
        if hook is not None:
            hook.remove()


def test_image_predictor_learns_to_keep_the_informative_patches(trained_on_marked_patches):
    model = trained_on_marked_patches
    inputs, marked = marked_patch_task(256, seed=1)
    scores = {}
    hook = model.image_score_predictor.register_forward_hook(lambda module, args, output: scores.update(logits=output))
    sparse = task_loss(model, inputs, 0.25)
    hook.remove()
    # Inference keeps each image's 4 best-scored tokens (token i = patch i, row-major).
    kept = F.log_softmax(scores["logits"].float(), dim=-1)[..., 0].topk(4, dim=-1).indices
    informative_kept = (marked[:, :, None] == kept[:, None, :]).any(-1).float().mean()
    chance = 4 / 16
    print(f"informative patches kept: {float(informative_kept):.3f} (chance {chance})")
    assert informative_kept > chance + 0.4

    # Task loss with 25% of the image tokens: close to dense, far below keeping a random 25%.
    dense = task_loss(model, inputs, 1.0)
    generator = torch.Generator().manual_seed(0)
    random_keep = task_loss(model, inputs, 0.25, lambda output: torch.randn(output.shape, generator=generator))
    print(f"task loss: 25% kept {sparse:.4f}, dense {dense:.4f}, random 25% kept {random_keep:.4f}")
    assert sparse < dense + 0.1
    assert random_keep > sparse + 0.2


def test_training_kept_fraction_reaches_the_target(trained_on_marked_patches):
    model = trained_on_marked_patches.train()
    inputs, _ = marked_patch_task(256, seed=2)
    with torch.no_grad():
        counts = model(**inputs).sparsity_report()[model.config.sparse_layer]
    kept_fraction = sum(counts["image_kept"]) / sum(counts["image_seen"])
    print(f"kept fraction in training: {kept_fraction:.3f} (target {model.config.vision_keep_ratio})")
    assert model.gumbel_tau == pytest.approx(0.1, rel=0.05)  # the schedule ran to its end
    assert abs(kept_fraction - model.config.vision_keep_ratio) <= 0.05


# ----------------------------------------------------------------------------------------------------------------------
# Scaling out: DDP across two CPU processes
# ----------------------------------------------------------------------------------------------------------------------


def run_distributed(models, output: Path, fsdp: bool = False) -> Path:
    """Train `models` a few steps in two CPU processes with `tests/distributed_worker.py`; returns `output`."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(REPO / "tests" / "distributed_worker.py"), "--models", *map(str, models), "--output", str(output),
    ] + (["--fsdp"] if fsdp else [])  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def distributed_models(converted, converted_pmod):
    return [converted("llava", output_text_min_length=3), converted_pmod("llava")]


@pytest.fixture(scope="module")
def ddp_run(distributed_models, tmp_path_factory):
    return run_distributed(distributed_models, tmp_path_factory.mktemp("ddp"))


def test_ddp_training_keeps_the_ranks_in_sync(ddp_run):
    for model_index in range(2):
        initial = torch.load(ddp_run / f"model{model_index}-initial.pt")
        ranks = [torch.load(ddp_run / f"model{model_index}-rank{rank}.pt") for rank in range(2)]
        info = [json.loads((ddp_run / f"model{model_index}-rank{rank}.json").read_text()) for rank in range(2)]
        assert [entry["world_size"] for entry in info] == [2, 2]
        assert info[0]["first_batch"] != info[1]["first_batch"]  # each rank trained on its own shard of the data
        # the parts of the loss are gathered from both processes and logged the same on each
        step_logs = [[entry for entry in entry_info["logs"] if "loss" in entry] for entry_info in info]
        assert len(step_logs[0]) == 3 and step_logs[0] == step_logs[1]
        assert all("lm_loss" in entry for entry in step_logs[0])
        assert ranks[0].keys() == ranks[1].keys() == initial.keys()
        for name in ranks[0]:
            assert torch.equal(ranks[0][name], ranks[1][name]), name
        # it did train, the method's new modules included
        new_modules = [name for name in initial if name.startswith(("image_score_predictor", "routers"))]
        assert new_modules and any(not torch.equal(ranks[0][name], initial[name]) for name in new_modules)


@pytest.mark.skipif(
    not IS_TRANSFORMERS_V5,
    reason="transformers 4.57's Trainer builds accelerate's FSDP plugin, which refuses a machine without accelerators",
)
def test_fsdp_training_matches_ddp(distributed_models, ddp_run, tmp_path_factory):
    """FSDP 2 shards the weights but computes the same steps: its gathered weights are DDP's."""
    fsdp_run = run_distributed(distributed_models, tmp_path_factory.mktemp("fsdp"), fsdp=True)
    for model_index in range(len(distributed_models)):
        sharded = AutoModelForImageTextToText.from_pretrained(
            fsdp_run / f"model{model_index}-fsdp", trust_remote_code=True
        )
        reference = torch.load(ddp_run / f"model{model_index}-rank0.pt")
        initial = torch.load(ddp_run / f"model{model_index}-initial.pt")
        weights = sharded.state_dict()
        assert weights.keys() == reference.keys()
        for name, tensor in weights.items():
            torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-5, msg=name)
        assert any(
            not torch.equal(weights[name], initial[name]) for name in weights if "predictor" in name or "router" in name
        )
