"""The FastV baseline of the benchmarks keeps what FastV's rule says, checked against transformers' own attentions."""

import sys
from pathlib import Path

import torch
from test_dynamic_llava_prefill import inputs_for

from sparse_llava import SparseLlavaConfig
from sparse_llava.tiny import IMAGE_TOKEN_ID

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fastv import FastVLlava  # noqa: E402


def test_fastv_keeps_the_most_attended_half_of_the_image(base_checkpoints):
    base_model = base_checkpoints[("llava", "hub")][1]
    base_model.set_attn_implementation("eager")
    model = FastVLlava(SparseLlavaConfig.from_base_config(base_model.config)).eval()
    model.load_state_dict(base_model.state_dict())
    inputs = inputs_for("llava")
    captured = {}
    original = model.before_layer

    def capture(layer_idx, stream, cache):
        result = original(layer_idx, stream, cache)
        if layer_idx == 2:
            captured["kept"] = result.source_index[result.valid & result.is_image]
        return result

    model.before_layer = capture
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        attentions = base_model(**inputs, output_attentions=True).attentions[1]  # layer K-1 = 1
    base_model.set_attn_implementation("sdpa")
    last_row = attentions[:, :, -1].mean(1)  # [batch, keys]: the last prompt token, averaged over heads
    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    expected = []
    for row in range(2):
        image_columns = is_image[row].nonzero().flatten()
        top = last_row[row, image_columns].topk(len(image_columns) // 2).indices
        expected.extend(sorted(image_columns[top].tolist()))
    assert sorted(captured["kept"].tolist()) == sorted(expected)
    text = (inputs["attention_mask"].bool() & ~is_image).sum(-1)
    assert cache.stored_tokens(2).tolist() == (text + is_image.sum(-1) // 2).tolist()
