"""The drift suite: what must hold on every supported transformers release (CI runs it on each one in its matrix).

For every method and both bases: a conversion runs; the folder loads through the Auto class with its own code; in
its dense-equivalent setting it reproduces transformers' own LLaVA / LLaVA-NeXT (logits, and the tokens generated
with a cache); in its default, sparse setting, generating with a cache gives the tokens of generating without one.
"""

import pytest
import torch
from transformers import CONFIG_MAPPING, AutoModelForImageTextToText

import sparse_llava
from sparse_llava.tiny import tiny_inputs

DENSE_EQUIVALENT = {
    "dynamic-llava": {"vision_keep_ratio": 1.0, "text_sparsification": False},
    "p-mod": {"mod_layers": []},
    "yopo": {"neighbor_window": 0, "vision_head_mask": None, "vision_layer_cutoff": None, "ffn_vision_keep_ratio": 1.0},
}
SPARSE = {
    "dynamic-llava": {"vision_keep_ratio": 0.5},
    "p-mod": {},
    "yopo": {"neighbor_window": 3, "vision_layer_cutoff": 2, "ffn_vision_keep_ratio": 0.5},
}
NEW_TOKENS = 5


def convert_and_load(base_checkpoints, tmp_path, method, base, settings):
    output = tmp_path / f"{method}-{base}"
    sparse_llava.convert(str(base_checkpoints[(base, "hub")][0]), method, output, settings, progress=False)
    model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True).eval()
    # The folder's own code runs, unless a test registered the installed classes, which then take precedence.
    if model.config.model_type not in CONFIG_MAPPING:
        assert type(model).__module__.startswith("transformers_modules."), "the folder's own code must run"
    return model


@pytest.mark.parametrize("base", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["dynamic-llava", "p-mod", "yopo"])
def test_dense_equivalent_reproduces_the_base(method, base, base_checkpoints, tmp_path):
    model = convert_and_load(base_checkpoints, tmp_path, method, base, DENSE_EQUIVALENT[method])
    reference = base_checkpoints[(base, "hub")][1].eval()
    inputs = tiny_inputs(base)
    with torch.no_grad():
        expected = reference(**inputs).logits
        logits = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (logits - expected)[valid].abs().max() <= 1e-4
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    expected_tokens = reference.generate(**inputs, **settings)
    cache = model.new_cache()
    assert torch.equal(model.generate(**inputs, **settings, cache=cache), expected_tokens)
    assert int(cache.stored_tokens(0).max()) == expected_tokens.shape[1] - 1  # the last token is never fed back


@pytest.mark.parametrize("base", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["dynamic-llava", "p-mod", "yopo"])
def test_sparse_generation_with_a_cache_equals_recomputing(method, base, base_checkpoints, tmp_path):
    model = convert_and_load(base_checkpoints, tmp_path, method, base, SPARSE[method])
    inputs = tiny_inputs(base)
    settings = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
    cached = model.generate(**inputs, **settings, return_dict_in_generate=True)
    recomputed = model.generate(**inputs, **settings, use_cache=False)
    assert torch.equal(cached.sequences, recomputed)
    report = model(**inputs).sparsity_report()
    assert sum(report[-1]["image_kept"]) < sum(report[-1]["image_seen"]), "the sparse setting must drop something"
