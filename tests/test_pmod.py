"""p-MoD: schedule, routing, STRing, ragged cache, and cost against dense LLaVA."""

import copy
import math

import numpy
import pytest
import torch
from test_dynamic_llava_prefill import inputs_for, row_alone

import sparse_llava
from sparse_llava import PMoDConfig, PMoDLlavaForConditionalGeneration
from sparse_llava.flops import flop_counter
from sparse_llava.modeling_pmod import kept_token_count
from sparse_llava.tiny import IMAGE_TOKEN_ID, build_tiny_llava, tiny_base_config

# p_mod.md 2.2: the release schedule on 32 layers, and the tokens kept of a 576-token LLaVA-1.5 image.
REFERENCE_KEPT_OF_576 = {
    8: 486,
    9: 464,
    10: 440,
    11: 414,
    12: 388,
    13: 360,
    14: 331,
    15: 302,
    16: 273,
    17: 244,
    18: 215,
    19: 187,
    20: 161,
    21: 135,
    22: 111,
    23: 89,
    **{layer: 86 for layer in range(24, 32)},
}


def reference_kept(num_routed, ratio) -> int:
    """The reference's count `torch.trunc(int32 n * R)`, recomputed independently in numpy float32."""
    return int(numpy.trunc(numpy.float32(num_routed) * numpy.float32(ratio)))


@pytest.fixture(scope="module")
def deep_bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("pmod")
    return {base: build_tiny_llava(root / base, base=base, num_layers=32) for base in ("llava", "llava_next")}


def pmod_from(base_model, seed=0, **overrides):
    """A p-MoD model sharing `base_model`'s weights, with random (non-zero) routers so that routing matters."""
    config = PMoDConfig.from_base_config(base_model.config, **overrides)
    model = PMoDLlavaForConditionalGeneration(config).eval()
    missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("routers.") for key in missing)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.routers.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    # The base's generation settings, as a conversion carries them (they suppress the image placeholder token).
    model.generation_config = copy.deepcopy(base_model.generation_config)
    return model


def test_release_schedule_on_32_layers():
    config = PMoDConfig.from_base_config(tiny_base_config("llava", num_layers=32))
    assert config.mod_layers == list(range(8, 32))
    kept = {layer: reference_kept(576, config.retention_ratio(layer)) for layer in config.mod_layers}
    assert kept == REFERENCE_KEPT_OF_576
    assert [config.retention_ratio(layer) for layer in range(8)] == [1.0] * 8
    mean = sum(config.retention_ratio(layer) for layer in range(32)) / 32
    assert mean == pytest.approx(0.5375)


def test_kept_counts_use_the_reference_arithmetic_for_every_count():
    """Every n up to 10,000 on the 32-layer schedule: the reference's `trunc(int32 n * R_l)` (float32), with R_l
    recomputed from its formula (`cos(l * pi / 31) / 2 + 0.5`, MoD layers where that is <= 0.85, floored at 0.15)."""
    config = PMoDConfig.from_base_config(tiny_base_config("llava", num_layers=32))
    counts = numpy.arange(10_001, dtype=numpy.int32)
    reference_layers = [layer for layer in range(32) if math.cos(layer * math.pi / 31) / 2 + 0.5 <= 0.85]
    assert config.mod_layers == reference_layers
    for layer in reference_layers:
        ratio = max(math.cos(layer * math.pi / 31) / 2 + 0.5, 0.15)
        expected = numpy.trunc(counts.astype(numpy.float32) * numpy.float32(ratio)).astype(numpy.int64)
        kept = kept_token_count(torch.from_numpy(counts), config.retention_ratio(layer)).numpy()
        assert (kept == expected).all(), (layer, numpy.flatnonzero(kept != expected)[:5])
    # The float64 floor this replaces keeps one token fewer here (in float32, 2365 * R_10 rounds up to 1808).
    ratio = config.retention_ratio(10)
    assert math.floor(2365 * ratio) == 1807 and int(kept_token_count(torch.tensor([2365]), ratio)) == 1808


def test_router_keeps_the_reference_count_at_2365_tokens(deep_bases):
    """Through the model's own routing: 2,365 vision tokens (one sample), layer 10 keeps 1,808 of them."""
    model = pmod_from(deep_bases["llava"])
    num_text, num_vision = 4, 2365
    hidden = torch.randn(1, num_text + num_vision, model.config.text_config.hidden_size)
    image_index = torch.tensor([-1] * num_text + [0] * num_vision)[None]
    image_offset = torch.tensor([-1] * num_text + list(range(num_vision)))[None]
    stream = model.make_stream(hidden, None, None, None, (image_index, image_offset), (num_vision,), None, None)
    with torch.no_grad():
        kept = model.route(10, stream, model.routers["10"](stream.hidden_states).squeeze(-1))
    assert int((kept & stream.is_image).sum()) == 1808 and bool(kept[:, :num_text].all())


def test_schedule_generalises_to_other_depths_and_validates():
    config = PMoDConfig.from_base_config(tiny_base_config("llava", num_layers=8))
    expected = [layer for layer in range(8) if 0.5 + 0.5 * math.cos(math.pi * layer / 7) <= 0.85]
    assert config.mod_layers == expected == [2, 3, 4, 5, 6, 7]
    assert PMoDConfig.from_base_config(tiny_base_config("llava"), mod_layers=[]).mod_layers == []
    with pytest.raises(ValueError, match=r"mod_layers must be a list of layer indices in \[0, 4\)"):
        PMoDConfig.from_base_config(tiny_base_config("llava"), mod_layers=[4])
    with pytest.raises(ValueError, match="must not exceed mod_max_ratio"):
        PMoDConfig.from_base_config(tiny_base_config("llava"), mod_min_ratio=0.9)
    with pytest.raises(ValueError, match="routed_tokens must be one of"):
        PMoDConfig.from_base_config(tiny_base_config("llava"), routed_tokens="text")


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_dense_equivalent_reproduces_base_logits(base, base_checkpoints, converted_pmod):
    base_model = base_checkpoints[(base, "hub")][1]
    model = PMoDLlavaForConditionalGeneration.from_pretrained(converted_pmod(base, mod_layers=[])).eval()
    inputs = inputs_for(base)
    with torch.no_grad():
        difference = model(**inputs).logits - base_model(**inputs).logits
    assert difference[inputs["attention_mask"].bool()].abs().max() <= 1e-4


def test_zero_initialised_routers_weigh_every_token_one(base_checkpoints, converted_pmod):
    model = PMoDLlavaForConditionalGeneration.from_pretrained(converted_pmod("llava")).eval()
    for router in model.routers.values():
        assert router.weight.abs().sum() == 0 and router.bias.abs().sum() == 0
    assert sorted(int(name) for name in model.routers) == model.config.mod_layers


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_each_layer_stores_floor_n_times_retention(base, deep_bases):
    model = pmod_from(deep_bases[base])
    inputs = inputs_for(base)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
    valid = inputs["attention_mask"].bool()
    is_image = inputs["input_ids"] == IMAGE_TOKEN_ID
    text, vision = (valid & ~is_image).sum(-1), is_image.sum(-1)
    for layer_idx in range(32):
        kept_vision = [reference_kept(int(n), model.config.retention_ratio(layer_idx)) for n in vision]
        assert cache.stored_tokens(layer_idx).tolist() == (text + torch.tensor(kept_vision)).tolist(), layer_idx


def test_each_router_runs_once_per_prefill_and_never_while_decoding(deep_bases):
    """The router's logits both rank the tokens and weigh them (TanhNorm): computed once per MoD layer, not twice."""
    model = pmod_from(deep_bases["llava"])
    calls = {name: 0 for name in model.routers}
    for name, router in model.routers.items():
        router.register_forward_hook(lambda module, args, output, name=name: calls.__setitem__(name, calls[name] + 1))
    inputs = inputs_for("llava")
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).cache
        assert calls == {name: 1 for name in model.routers}
        step = {"input_ids": inputs["input_ids"][:, -1:], "attention_mask": torch.ones_like(inputs["input_ids"][:, :1])}
        model(**step, cache=cache, use_cache=True)  # a text-only decode step: no routed tokens, no router
    assert calls == {name: 1 for name in model.routers}


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_cached_uncached_and_padded_batch_agree(base, deep_bases):
    model = pmod_from(deep_bases[base])
    inputs = inputs_for(base)
    cached = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.tolist() == uncached.tolist()
    for row in range(2):
        alone = model.generate(**row_alone(inputs, row), max_new_tokens=8, do_sample=False)
        assert alone[0, -8:].tolist() == cached[row, -8:].tolist()


def test_routing_changes_the_result(deep_bases):
    """Guard: with these routers the skipped tokens matter, so the agreements above are not vacuous."""
    inputs = inputs_for("llava")
    with torch.no_grad():
        one = pmod_from(deep_bases["llava"], seed=0)(**inputs).logits[:, -1]
        other = pmod_from(deep_bases["llava"], seed=1)(**inputs).logits[:, -1]
    assert (one - other).abs().max() > 1e-3


def test_string_gives_routers_gradients_from_kept_and_skipped_tokens(deep_bases):
    model = pmod_from(deep_bases["llava"]).train()
    inputs = inputs_for("llava")
    layer_idx = 20
    captured = {}
    original = model.run_layer

    def capture(index, decoder_layer, stream, cache, **kwargs):
        output = original(index, decoder_layer, stream, cache, **kwargs)
        if index == layer_idx:
            captured["output"], captured["stream"] = output, stream
            assert stream.admit is not None
        return output

    model.run_layer = capture
    model(**inputs)
    routed = captured["stream"].is_image & captured["stream"].valid
    output, x = captured["output"], captured["stream"].hidden_states
    router = model.routers[str(layer_idx)]
    weight = 1 + 0.2 * torch.tanh(router(x))
    skipped = routed & torch.isclose(output, weight * x, atol=1e-6).all(-1)  # skipped tokens come out as w * x
    expected_skipped = int(routed.sum(-1)[0]) - reference_kept(int(routed.sum(-1)[0]), model.config.retention_ratio(20))
    assert int(skipped[0].sum()) == expected_skipped
    for selection in (skipped, routed & ~skipped):
        model.zero_grad()
        gradient = torch.autograd.grad(output[selection].sum(), router.weight, retain_graph=True)[0]
        assert gradient.abs().sum() > 0


def test_cost_near_the_papers_ratios(tmp_path):
    """A NeXT-shaped input (base tile, 2 x 2 high-resolution tiles, newline tokens) through 32 layers."""
    base = build_tiny_llava(
        tmp_path / "base", base="llava_next", num_layers=32, hidden_size=256, num_heads=4, num_kv_heads=4
    )
    model = pmod_from(base)
    inputs = inputs_for("llava_next", left_padding=(0, 0))
    inputs = {key: value[:1] for key, value in inputs.items()}
    with torch.no_grad():
        flops = {}
        for name, candidate in (("dense", base), ("pmod", model)):
            with flop_counter() as counter:
                output = candidate(**inputs, use_cache=True, logits_to_keep=1)
            flops[name] = counter.get_total_flops()
    ratio = flops["pmod"] / flops["dense"]
    assert 0.52 <= ratio <= 0.62, ratio  # paper: 55.6% (NeXT), 58.7% (1.5)
    vision = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    text = inputs["input_ids"].shape[1] - vision
    stored_vision = sum(int(output.cache.stored_tokens(i)[0]) - text for i in range(32))
    assert stored_vision / (32 * vision) == pytest.approx(0.5375, abs=0.02)  # paper: 53.8% of the vision KV


def test_conversion_writes_a_loadable_pmod_folder(converted_pmod):
    import json

    output = converted_pmod("llava_next")
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "pmod_llava"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_pmod.PMoDLlavaForConditionalGeneration"
    assert (output / "modeling_pmod.py").read_text() == (
        sparse_llava.resource_folder("modeling") / "modeling_pmod.py"
    ).read_text()
    model, info = PMoDLlavaForConditionalGeneration.from_pretrained(output, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_sparsity_report_counts_skipped_tokens(deep_bases):
    model = pmod_from(deep_bases["llava_next"])
    inputs = inputs_for("llava_next")
    with torch.no_grad():
        output = model(**inputs, use_cache=True)
    vision = (inputs["input_ids"] == IMAGE_TOKEN_ID).sum(-1)
    for layer_idx, counts in enumerate(output.sparsity_report()):
        kept = [reference_kept(int(n), model.config.retention_ratio(layer_idx)) for n in vision]
        assert counts["image_kept"] == kept and counts["image_seen"] == vision.tolist()
    assert output.cache.sparsity_report()[20]["image_kept"] == output.sparsity_report()[20]["image_kept"]


def test_gradient_checkpointing_gives_the_same_gradients(deep_bases):
    inputs = inputs_for("llava")
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    gradients = []
    for checkpointing in (False, True):
        model = pmod_from(deep_bases["llava"]).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            assert all(layer.gradient_checkpointing for layer in model.language_model.layers)
        output = model(**inputs, labels=labels, use_cache=True)
        # With checkpointing a cache would be half-written (checkpointed layers do not store K/V): none is made.
        assert (output.cache is None) == checkpointing
        output.loss.backward()
        gradients.append(torch.cat([router.weight.grad.flatten() for router in model.routers.values()]))
    assert gradients[0].abs().sum() > 0
    assert torch.allclose(gradients[0], gradients[1], atol=1e-6)
