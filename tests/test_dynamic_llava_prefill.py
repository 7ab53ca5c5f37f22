"""Dynamic-LLaVA prefill: exact against transformers' dense LLaVA where nothing is dropped, and against a masked
dense LLaVA where image tokens are dropped."""

import math

import pytest
import torch
from conftest import DENSE_EQUIVALENT, load_dynamic
from transformers import DynamicCache

from sparse_llava.compat_transformers import per_image_features
from sparse_llava.tiny import IMAGE_SIZE, IMAGE_TOKEN_ID, PAD_TOKEN_ID, tiny_inputs

NEXT_SIZES = [[2 * IMAGE_SIZE, 2 * IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE]]  # rows get different token counts


def inputs_for(base, left_padding=(0, 7), seed=0):
    if base == "llava":
        return tiny_inputs("llava", left_padding=list(left_padding), seed=seed)
    return tiny_inputs("llava_next", left_padding=list(left_padding), seed=seed, image_sizes=NEXT_SIZES)


def row_alone(inputs, row):
    """Row `row` of a padded batch, without its padding."""
    keep = inputs["attention_mask"][row].bool()
    single = {
        "input_ids": inputs["input_ids"][row : row + 1, keep],
        "pixel_values": inputs["pixel_values"][row : row + 1],
    }
    if "image_sizes" in inputs:
        single["image_sizes"] = inputs["image_sizes"][row : row + 1]
    return single


def spread_predictor_scores(model, seed=0):
    """Random but well-spread predictor weights (fresh conversions score every token almost the same)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.image_score_predictor.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_dense_equivalent_reproduces_base_logits(base, base_checkpoints, converted):
    base_model = base_checkpoints[(base, "hub")][1]
    model = load_dynamic(converted(base, **DENSE_EQUIVALENT))
    inputs = inputs_for(base)
    with torch.no_grad():
        expected = base_model(**inputs).logits
        actual = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert actual.shape == expected.shape
    assert (actual - expected)[valid].abs().max() <= 1e-4


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_default_setting_shortens_layers_from_sparse_layer(base, converted):
    model = load_dynamic(converted(base))
    inputs = inputs_for(base)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    valid = inputs["attention_mask"].bool()
    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    text_tokens = (valid & ~is_image).sum(-1)
    image_tokens = is_image.sum(-1)
    kept_image_tokens = torch.tensor([math.floor(int(n) * model.config.vision_keep_ratio) for n in image_tokens])
    for layer_idx in range(model.config.text_config.num_hidden_layers):
        stored = cache.stored_tokens(layer_idx)
        if layer_idx < model.config.sparse_layer:
            assert stored.tolist() == valid.sum(-1).tolist()
        else:
            assert stored.tolist() == (text_tokens + kept_image_tokens).tolist()
    # The cache's logical length is the input's, whatever each layer stores.
    assert cache.get_seq_length() == inputs["input_ids"].shape[1]


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_padded_batch_equals_each_sample_alone(base, converted):
    model = load_dynamic(converted(base))
    spread_predictor_scores(model)
    inputs = inputs_for(base)
    with torch.no_grad():
        batched = model(**inputs).logits[:, -1]
        batched_tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)[:, -6:]
        for row in range(2):
            alone = model(**row_alone(inputs, row)).logits[0, -1]
            assert (alone - batched[row]).abs().max() <= 1e-4
            alone_tokens = model.generate(**row_alone(inputs, row), max_new_tokens=6, do_sample=False)[0, -6:]
            assert alone_tokens.tolist() == batched_tokens[row].tolist()


def dropped_image_reference(base_model, model, inputs, keep_ratio):
    """
    Independent reference for `sparse_layer=0`: transformers' dense LLaVA with a 4-D mask that hides the image tokens
    the predictor drops (chosen here with `torch.topk` on the predictor's own scores), original positions.
    """
    with torch.no_grad():
        features = per_image_features(
            base_model.model,
            pixel_values=inputs["pixel_values"],
            **({"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}),
        )
        is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
        kept = torch.zeros_like(is_image)
        positions = [row.nonzero().flatten() for row in is_image]
        for row, feature in enumerate(features):  # one image per row in these inputs
            logits = model.image_score_predictor(feature[None], torch.ones(1, feature.shape[0], dtype=torch.bool))
            score = torch.log_softmax(logits[0], -1)[:, 0]
            top = score.topk(math.floor(feature.shape[0] * keep_ratio)).indices
            kept[row, positions[row][top]] = True
        key_visible = inputs["attention_mask"].bool() & (~is_image | kept)
        length = is_image.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        mask = causal[None, None] & key_visible[:, None, None, :]
        mask |= torch.eye(length, dtype=torch.bool)[None, None]  # no fully masked rows
        reference = base_model(**{k: v for k, v in inputs.items() if k != "attention_mask"}, attention_mask=mask).logits
    return reference, key_visible


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_dropped_tokens_match_masked_dense_llava(base, base_checkpoints, converted):
    base_model = base_checkpoints[(base, "hub")][1]
    model = load_dynamic(converted(base, sparse_layer=0, vision_keep_ratio=0.5))
    spread_predictor_scores(model)
    inputs = inputs_for(base)
    reference, kept = dropped_image_reference(base_model, model, inputs, 0.5)
    with torch.no_grad():
        actual = model(**inputs).logits
    text = kept & (inputs["input_ids"] != IMAGE_TOKEN_ID)
    assert (actual - reference)[text].abs().max() <= 1e-4
    # Dropped positions produce no prediction.
    assert actual[~kept & inputs["attention_mask"].bool()].abs().max() == 0


def test_several_images_per_sample(converted):
    """Each image keeps its own top-k, whatever row it is in."""
    model = load_dynamic(converted("llava", vision_keep_ratio=0.25))
    n = (IMAGE_SIZE // 2) ** 2
    row0 = [5, 6] + [IMAGE_TOKEN_ID] * n + [7] + [IMAGE_TOKEN_ID] * n + [8, 9]
    row1 = [PAD_TOKEN_ID] * (n + 1) + [5, 6] + [IMAGE_TOKEN_ID] * n + [8, 9]
    input_ids = torch.tensor([row0, row1])
    attention_mask = (input_ids != PAD_TOKEN_ID).long()
    pixel_values = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        cache = model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values, use_cache=True
        ).cache
        captured = {}
        original = model.select_image_tokens

        def capture(stream):
            keep = original(stream)
            captured["keep"], captured["image_index"] = keep, stream.image_index
            return keep

        model.select_image_tokens = capture
        model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values)
    image_index = captured["image_index"]
    kept_per_image = [int((captured["keep"] & (image_index == i)).sum()) for i in range(3)]
    assert kept_per_image == [n // 4] * 3
    assert cache.stored_tokens(3).tolist() == [5 + 2 * (n // 4), 4 + n // 4]


def test_generate_greedy_sampling_and_without_cache(converted):
    model = load_dynamic(converted("llava"))
    spread_predictor_scores(model)
    inputs = inputs_for("llava")
    greedy = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert greedy.tolist() == uncached.tolist()
    torch.manual_seed(3)
    sampled = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.0)
    torch.manual_seed(3)
    again = model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=0, temperature=1.0)
    assert sampled.shape == (2, inputs["input_ids"].shape[1] + 5)
    assert sampled.tolist() == again.tolist()


def test_dense_equivalent_beam_search_equals_base(base_checkpoints, converted):
    base_model = base_checkpoints[("llava", "hub")][1]
    model = load_dynamic(converted("llava", **DENSE_EQUIVALENT))
    inputs = inputs_for("llava")
    expected = base_model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    actual = model.generate(**inputs, max_new_tokens=4, num_beams=3, do_sample=False)
    assert actual.tolist() == expected.tolist()


def test_save_and_reload_round_trip(converted, tmp_path):
    model = load_dynamic(converted("llava"))
    spread_predictor_scores(model)
    inputs = inputs_for("llava")
    model.save_pretrained(tmp_path)
    reloaded = load_dynamic(tmp_path)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name]), name
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reloaded(**inputs).logits)


def test_bad_inputs_give_clear_errors(converted):
    model = load_dynamic(converted("llava"))
    inputs = inputs_for("llava")
    too_few = dict(inputs, input_ids=inputs["input_ids"].clone())
    too_few["input_ids"][:, -7] = 5  # one image token less in each row
    with pytest.raises(Exception, match="Image features and image tokens do not match"):
        model(**too_few)
    with pytest.raises(TypeError, match="need a SparseCache"):
        model(**inputs, past_key_values=DynamicCache(), use_cache=True)
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(**inputs, output_attentions=True)
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(pixel_values=inputs["pixel_values"])


def test_text_only_and_inputs_embeds(base_checkpoints, converted):
    base_model = base_checkpoints[("llava", "hub")][1]
    model = load_dynamic(converted("llava", **DENSE_EQUIVALENT))
    text_only = torch.randint(4, 90, (2, 10))
    expected = base_model.generate(input_ids=text_only, max_new_tokens=4, do_sample=False)
    assert model.generate(input_ids=text_only, max_new_tokens=4, do_sample=False).tolist() == expected.tolist()
    inputs = inputs_for("llava")
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    with torch.no_grad():
        from_ids = model(**inputs).logits
        from_embeds = model(
            inputs_embeds=embeds, pixel_values=inputs["pixel_values"], attention_mask=inputs["attention_mask"]
        ).logits
    assert torch.equal(from_ids, from_embeds)
