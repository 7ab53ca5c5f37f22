"""Chat templates: the tiny processors have the llava-hf ones, conversions keep them, chat-style inputs work."""

import json

import pytest
import torch
from conftest import random_images
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

import sparse_llava
from sparse_llava.tiny import CHAT_TEMPLATES, build_tiny_processor, hand_written_prompt

QUESTION = "What is in the image ?"


def user_turn(text: str, image=None) -> list[dict]:
    image_part = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [image_part, {"type": "text", "text": text}]}]


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_tiny_processor_renders_the_llava_hf_prompt(base):
    processor = build_tiny_processor(base)
    for renderer in (processor, processor.tokenizer):
        assert renderer.chat_template == CHAT_TEMPLATES[base]
        rendered = renderer.apply_chat_template(user_turn(QUESTION), add_generation_prompt=True, tokenize=False)
        assert rendered == hand_written_prompt(base, QUESTION)
    # Every piece of the prompt is a real token of the tiny vocabulary (nothing falls back to <unk>).
    tokens = processor.tokenizer.tokenize(hand_written_prompt(base, QUESTION))
    assert processor.tokenizer.unk_token not in tokens


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_converted_folder_keeps_the_base_chat_template(base, converted):
    folder = converted(base)
    assert AutoProcessor.from_pretrained(folder).chat_template == CHAT_TEMPLATES[base]
    assert AutoTokenizer.from_pretrained(folder).chat_template == CHAT_TEMPLATES[base]


def test_conversion_gives_the_tokenizer_a_processor_only_template(base_checkpoints, tmp_path):
    """A base whose template sits only in the processor's chat_template.json (older llava-hf repos)."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(base_checkpoints[("llava", "hub")][0], base)
    template = (base / "chat_template.jinja").read_text()
    (base / "chat_template.jinja").unlink()
    (base / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    assert AutoTokenizer.from_pretrained(base).chat_template is None  # the situation the conversion repairs
    output = tmp_path / "converted"
    sparse_llava.convert(str(base), "p-mod", output, progress=False)
    assert AutoTokenizer.from_pretrained(output).chat_template == CHAT_TEMPLATES["llava"]
    assert AutoProcessor.from_pretrained(output).chat_template == CHAT_TEMPLATES["llava"]


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_chat_template_prompt_generates_as_the_hand_written_one(base, converted):
    folder = converted(base)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder)
    (image,) = random_images(1, size=(16, 12))

    hand_written = processor(images=image, text=hand_written_prompt(base, QUESTION), return_tensors="pt")
    # The template fed with the image itself, tokenised by apply_chat_template (as transformers serve does).
    templated = processor.apply_chat_template(
        user_turn(QUESTION, image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert templated["input_ids"].tolist() == hand_written["input_ids"].tolist()
    settings = dict(max_new_tokens=6, do_sample=False)
    expected = model.generate(**hand_written, **settings)
    assert model.generate(**templated, **settings).tolist() == expected.tolist()


def test_image_text_to_text_pipeline(converted):
    """`pipeline("image-text-to-text", trust_remote_code=True)`: chat messages, plain text, and a batch of two."""
    folder = converted("llava")
    pipe = pipeline("image-text-to-text", model=str(folder), trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder)
    images = random_images(2)
    questions = [QUESTION, "a cat ?"]
    settings = {"max_new_tokens": 4, "do_sample": False}

    def reference_words(image, question):
        inputs = processor(images=image, text=hand_written_prompt("llava", question), return_tensors="pt")
        with torch.no_grad():
            tokens = model.generate(**inputs, **settings)[0, inputs["input_ids"].shape[1] :]
        return processor.decode(tokens, skip_special_tokens=True).split()

    chat = pipe(text=user_turn(QUESTION, images[0]), generate_kwargs=settings)
    assert chat[0]["generated_text"][-1]["role"] == "assistant"
    assert chat[0]["generated_text"][-1]["content"].split() == reference_words(images[0], QUESTION)

    prompt = hand_written_prompt("llava", QUESTION)
    plain = pipe(images=images[0], text=prompt, generate_kwargs=settings, return_full_text=False)
    assert plain[0]["generated_text"].split() == reference_words(images[0], QUESTION)

    prompts = [hand_written_prompt("llava", question) for question in questions]
    batch = pipe(images=images, text=prompts, generate_kwargs=settings, return_full_text=False, batch_size=2)
    assert [
        output[0]["generated_text"].split() if isinstance(output, list) else output["generated_text"].split()
        for output in batch
    ] == [reference_words(image, question) for image, question in zip(images, questions)]
