"""Tiny random LLaVA-1.5 / LLaVA-NeXT checkpoints, built with transformers' own classes, for the demo and the tests.

They are written in the key layout of the llava-hf repos on the Hub (`language_model.model.*`,
`language_model.lm_head.*`, `multi_modal_projector.*`, `vision_tower.vision_model.*`), which is what users download;
`layout="flat"` has transformers 5.x's own `save_pretrained` layout (`vision_tower.embeddings.*`) instead, whichever
transformers line builds it.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import (
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

from .convert_llava import set_clip_tower_layout

IMAGE_SIZE = 8  # pixels; with patch 2 an image (or a NeXT tile) is 4 x 4 = 16 tokens
PATCH_SIZE = 2
VOCAB_SIZE = 99
IMAGE_TOKEN_ID = VOCAB_SIZE - 1
PAD_TOKEN_ID = 1


def tiny_base_config(
    base: str = "llava", num_layers: int = 4, hidden_size: int = 32, num_heads: int = 4, num_kv_heads: int = 2
):
    text_config = dict(
        model_type="llama",
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=hidden_size * 2 + 3,
        max_position_embeddings=1024,
        pad_token_id=PAD_TOKEN_ID,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision_config = dict(
        model_type="clip_vision_model",
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        hidden_size=32,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
    )
    common = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=IMAGE_TOKEN_ID,
        vision_feature_layer=-1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        pad_token_id=PAD_TOKEN_ID,
    )
    if base == "llava":
        return LlavaConfig(**common)
    if base == "llava_next":
        # Base tile plus a 2x2 grid of tiles for a square image; wide/tall images get 1x2 / 2x1 grids.
        pinpoints = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]
        return LlavaNextConfig(**common, image_grid_pinpoints=pinpoints)
    raise ValueError(f"unknown base {base!r}")


def build_tiny_llava(
    path, base: str = "llava", layout: str = "hub", seed: int = 0, processor: bool = True, **config_kwargs
):
    """
    Save a random tiny LLaVA (`base="llava"`) or LLaVA-NeXT (`base="llava_next"`) to `path`, with a matching
    processor (a word-level tokenizer and a CLIP image processor, built offline) unless `processor=False`; return
    the model.
    """
    torch.manual_seed(seed)
    config = tiny_base_config(base, **config_kwargs)
    model_class = LlavaForConditionalGeneration if base == "llava" else LlavaNextForConditionalGeneration
    model = model_class(config).eval()
    _fill_parameters(model, seed)
    # A random model may well predict the image placeholder; a real one never does, so forbid it.
    model.generation_config.suppress_tokens = [IMAGE_TOKEN_ID]
    path = Path(path)
    model.save_pretrained(path)
    if processor:
        build_tiny_processor(base).save_pretrained(path)
    if layout not in ("hub", "flat"):
        raise ValueError(f"unknown layout {layout!r}")
    set_clip_tower_layout(path, nested=layout == "hub")
    return model


def _fill_parameters(model, seed: int) -> None:
    """
    Draw every parameter from `seed`, in an order and with a scheme that do not depend on the transformers line
    (4.57 and 5.x initialise differently, and name the CLIP tower's parameters differently), so that both build the
    same tiny model and the tests see the same numbers on both. Matrices ~ N(0, 1 / fan_in), which keeps activations
    of order one (distinct logits, well-separated scores); vectors ~ N(0, 0.02), plus one for norm weights.
    """
    generator = torch.Generator().manual_seed(seed)
    named = sorted(model.named_parameters(), key=lambda item: item[0].replace(".vision_model.", "."))
    with torch.no_grad():
        for name, parameter in named:
            std = parameter[0].numel() ** -0.5 if parameter.dim() > 1 else 0.02
            noise = torch.randn(parameter.shape, generator=generator) * std
            parameter.copy_(noise + (1.0 if "norm" in name and name.endswith(".weight") else 0.0))


WORDS = ["USER:", "ASSISTANT:", "What", "is", "in", "the", "image", "?", "a", "cat", "dog", "red", "blue"]
# The markers of LLaVA-NeXT-Mistral's prompt format; after WORDS so that the ids of the words above stay put.
NEXT_WORDS = ["[INST]", "[/INST]"]

# The chat templates of the llava-hf repos the tiny bases stand for, verbatim: llava-hf/llava-1.5-7b-hf (also
# llava-hf/llava-v1.6-vicuna-7b-hf's) renders `USER: <image>\n{text} ASSISTANT:`; llava-hf/llava-v1.6-mistral-7b-hf
# renders `[INST] <image>\n{text} [/INST]` (its user turn ends the prompt, so it ignores `add_generation_prompt`).
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
LLAVA_NEXT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
CHAT_TEMPLATES = {"llava": LLAVA_CHAT_TEMPLATE, "llava_next": LLAVA_NEXT_CHAT_TEMPLATE}


def hand_written_prompt(base: str, text: str) -> str:
    """The prompt the base's chat template gives for one user turn with one image, written out by hand."""
    if base == "llava":
        return f"USER: <image>\n{text} ASSISTANT:"
    return f"[INST] <image>\n{text} [/INST]"


def build_tiny_processor(base: str = "llava"):
    """
    A `LlavaProcessor` / `LlavaNextProcessor` for the tiny models: word-level tokenizer, 8-pixel images, and the
    chat template of the llava-hf base they stand for (see `CHAT_TEMPLATES`) in both the processor and the tokenizer.
    """
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import LlavaNextProcessor, LlavaProcessor, PreTrainedTokenizerFast

    if base not in CHAT_TEMPLATES:
        raise ValueError(f"unknown base {base!r}: expected one of {sorted(CHAT_TEMPLATES)}")

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    words = WORDS + NEXT_WORDS + [f"w{index}" for index in range(VOCAB_SIZE)]
    vocab = {token: index for index, token in enumerate((specials + words)[:IMAGE_TOKEN_ID])}
    vocab["<image>"] = IMAGE_TOKEN_ID
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in specials + ["<image>"]]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],  # as LLaMA's tokenizer: no token_type_ids
        chat_template=CHAT_TEMPLATES[base],
    )
    common = dict(
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATES[base],
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    if base == "llava":
        from transformers import CLIPImageProcessor

        image_processor = CLIPImageProcessor(
            size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        )
        return LlavaProcessor(image_processor=image_processor, **common)
    from transformers import LlavaNextImageProcessor

    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=tiny_base_config("llava_next").image_grid_pinpoints,
    )
    return LlavaNextProcessor(image_processor=image_processor, **common)


def tiny_inputs(
    base: str = "llava",
    batch_size: int = 2,
    text_before: int = 3,
    text_after: int = 5,
    left_padding: list[int] | None = None,
    seed: int = 0,
    image_sizes=None,
):
    """Random `input_ids` / `pixel_values` / `attention_mask` (/ `image_sizes`) with one image per row."""
    generator = torch.Generator().manual_seed(seed)
    left_padding = left_padding or [0] * batch_size
    if base == "llava":
        num_image_tokens = [(IMAGE_SIZE // PATCH_SIZE) ** 2] * batch_size
        pixel_values = torch.randn(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        extra = {}
    else:
        image_sizes = image_sizes or [[IMAGE_SIZE * 2, IMAGE_SIZE * 2]] * batch_size
        num_image_tokens = [next_image_tokens(size) for size in image_sizes]
        pixel_values = torch.randn(batch_size, 5, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        extra = {"image_sizes": torch.tensor(image_sizes)}
    lengths = [p + text_before + n + text_after for p, n in zip(left_padding, num_image_tokens, strict=True)]
    width = max(lengths)
    input_ids = torch.full((batch_size, width), PAD_TOKEN_ID)
    attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
    for row, n in enumerate(num_image_tokens):
        start = width - (text_before + n + text_after)
        ids = torch.randint(4, VOCAB_SIZE - 1, (text_before + n + text_after,), generator=generator)
        ids[text_before : text_before + n] = IMAGE_TOKEN_ID
        input_ids[row, start:] = ids
        attention_mask[row, start:] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values, **extra}


def next_image_tokens(image_size) -> int:
    """Number of image tokens transformers' LLaVA-NeXT produces for an image of `image_size` = (height, width)."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

    config = tiny_base_config("llava_next")
    side = IMAGE_SIZE // PATCH_SIZE
    rows, cols = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, IMAGE_SIZE)
    unpadded = unpad_image(torch.zeros(1, rows * side, cols * side), torch.tensor(image_size))
    height, width = unpadded.shape[1:]
    return side * side + height * (width + 1)


def read_weight_names(path) -> list[str]:
    """Names of the tensors stored in a checkpoint folder (single file or sharded)."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        return sorted(json.loads(index.read_text())["weight_map"])
    return sorted(load_file(path / "model.safetensors"))
