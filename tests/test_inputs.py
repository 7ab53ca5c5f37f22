"""Inputs the models cannot use get a clear ValueError naming the problem (all three methods, both bases)."""

import warnings

import pytest
import torch
from conftest import generated_cache

import sparse_llava
from sparse_llava.tiny import IMAGE_TOKEN_ID, tiny_inputs

METHODS = {
    "dynamic-llava": ("converted", sparse_llava.DynamicLlavaForConditionalGeneration),
    "p-mod": ("converted_pmod", sparse_llava.PMoDLlavaForConditionalGeneration),
    "yopo": ("converted_yopo", sparse_llava.YopoLlavaForConditionalGeneration),
}
BASES = ["llava", "llava_next"]


@pytest.fixture(params=list(METHODS))
def load(request):
    """`load(base)` -> the method's conversion of the tiny base, in eval mode."""
    fixture, model_class = METHODS[request.param]
    convert = request.getfixturevalue(fixture)
    return lambda base: model_class.from_pretrained(convert(base)).eval()


def text_ids(length: int, batch_size: int = 1) -> torch.Tensor:
    return torch.randint(4, IMAGE_TOKEN_ID, (batch_size, length), generator=torch.Generator().manual_seed(length))


@pytest.mark.parametrize("base", BASES)
def test_image_tokens_without_pixel_values(load, base):
    model = load(base)
    inputs = tiny_inputs(base)
    text_only = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"]}
    with pytest.raises(ValueError, match=r"input_ids holds image tokens \(id 98\) but no pixel_values were given"):
        model(**text_only)
    with pytest.raises(ValueError, match="holds image tokens"):
        model.generate(**text_only, max_new_tokens=2)
    # Text without image tokens needs no images; nor does a text-only turn that continues a cached conversation.
    with torch.no_grad():
        model(input_ids=text_ids(6, 2))
    first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    new_turn = torch.cat([first.sequences, text_ids(4, 2)], dim=1)
    mask = torch.cat(
        [inputs["attention_mask"], torch.ones(2, new_turn.shape[1] - inputs["attention_mask"].shape[1])], 1
    )
    second = model.generate(
        input_ids=new_turn, attention_mask=mask.long(), cache=generated_cache(first), max_new_tokens=2
    )
    assert second.shape == (2, new_turn.shape[1] + 2) and torch.equal(second[:, : new_turn.shape[1]], new_turn)


@pytest.mark.parametrize("base", BASES)
def test_pixel_values_of_the_wrong_shape(load, base):
    model = load(base)
    inputs = tiny_inputs(base)
    pixel_values = inputs["pixel_values"]
    if base == "llava":
        message = r"pixel_values has shape \(3, 8, 8\); a LLaVA-1.5 model takes \[images, channels, height, width\]"
        wrong = [(pixel_values[0], message), (pixel_values[:, :1], "with 3 channels")]
    else:
        message = r"pixel_values has shape \(3, 8, 8\); a LLaVA-NeXT model takes \[images, tiles, channels, height"
        wrong = [
            (pixel_values[0, 0], message),
            (pixel_values[0], r"pixel_values holds 5 tiles \(\[tiles, ...\]\), but image_sizes asks for 10"),
            (pixel_values[:, :3], r"image_sizes asks for 2 images of \[5, 5\] tiles"),
        ]
    for bad, message in wrong:
        with pytest.raises(ValueError, match=message):
            model(**{**inputs, "pixel_values": bad})
    if base == "llava_next":
        with pytest.raises(ValueError, match="LLaVA-NeXT models need image_sizes"):
            model(**{name: value for name, value in inputs.items() if name != "image_sizes"})
        # The flattened form transformers' LLaVA-NeXT takes too ([tiles, 3, H, W], each image's real tiles) works.
        with torch.no_grad():
            expected = model(**inputs).logits
            flattened = model(**{**inputs, "pixel_values": pixel_values.flatten(0, 1)}).logits
        assert torch.equal(flattened, expected)


@pytest.mark.parametrize("base", BASES)
def test_attention_mask_narrower_than_the_input_and_empty_input(load, base):
    model = load(base)
    inputs = tiny_inputs(base)
    width = inputs["input_ids"].shape[1]
    narrow = {**inputs, "attention_mask": inputs["attention_mask"][:, :5]}
    with pytest.raises(ValueError, match=rf"attention_mask has shape \(2, 5\), but the input is 2 rows of {width}"):
        model(**narrow)
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, "):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:1]})
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(**{**inputs, "attention_mask": inputs["attention_mask"][:, None]})
    for empty in (inputs["input_ids"][:, :0], inputs["input_ids"][:0]):
        with pytest.raises(ValueError, match=r"input_ids is empty or not batched: got shape \((2, 0|0, \d+)\)"):
            model(input_ids=empty)
    with pytest.raises(ValueError, match="inputs_embeds is empty"):
        model(inputs_embeds=torch.zeros(1, 0, model.config.text_config.hidden_size))


def test_input_longer_than_max_position_embeddings_warns_once(load):
    """The logical position counts the cache: a prompt just below the limit warns when generation crosses it."""
    model = load("llava")
    limit = model.config.text_config.max_position_embeddings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad():
            model(input_ids=text_ids(limit))
        assert caught == []
        model.generate(input_ids=text_ids(limit - 2), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            model(input_ids=text_ids(limit + 3))
    messages = [str(warning.message) for warning in caught if "max_position_embeddings" in str(warning.message)]
    assert messages == [
        f"the input reaches position {limit + 1} (cache included), beyond the model's max_position_embeddings "
        f"({limit}); outputs past that length are unreliable",
        f"the input reaches position {limit + 3} (cache included), beyond the model's max_position_embeddings "
        f"({limit}); outputs past that length are unreliable",
    ]


@pytest.mark.parametrize(
    "option", [{"prompt_lookup_num_tokens": 2}, {"assistant_early_exit": 2}, {"assistant_model": "the model itself"}]
)
def test_assisted_generation_is_refused_with_the_reason(load, option):
    model = load("llava")
    if "assistant_model" in option:
        option = {"assistant_model": model}
    inputs = {name: value[:1] for name, value in tiny_inputs("llava").items()}
    with pytest.raises(ValueError, match=r"assisted / speculative decoding is not supported .* cannot be cropped"):
        model.generate(**inputs, max_new_tokens=3, **option)
    # The same option set in the generation config is refused too.
    if "assistant_model" not in option:
        config = model.generation_config
        for name, value in option.items():
            setattr(config, name, value)
        with pytest.raises(ValueError, match=f"generate\\({next(iter(option))}=...\\)"):
            model.generate(**inputs, max_new_tokens=3, generation_config=config)
