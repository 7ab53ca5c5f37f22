"""YOPO: exact against transformers' dense LLaVA and against a straightforward masked implementation, with the
savings real (no vision K/V past the cutoff, fewer FLOPs)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_dynamic_llava_prefill import inputs_for, row_alone
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from sparse_llava import modeling_yopo
from sparse_llava.configuration_yopo import YopoConfig, preset_settings
from sparse_llava.flops import flop_counter
from sparse_llava.modeling_yopo import WINDOW_BLOCK, YopoLlavaForConditionalGeneration
from sparse_llava.tiny import IMAGE_TOKEN_ID, PATCH_SIZE, build_tiny_llava, tiny_base_config

DENSE_EQUIVALENT = {
    "neighbor_window": 0,
    "vision_head_mask": None,
    "vision_layer_cutoff": None,
    "ffn_vision_keep_ratio": 1.0,
}
# 4 layers x 4 heads (2 key/value groups): whole groups pruned, so both semantics apply.
HEAD_MASK = [[True] * 4, [True, True, False, False], [False, False, True, True], [False] * 4]
ALL_KNOBS = {
    "neighbor_window": 3,
    "vision_head_mask": HEAD_MASK,
    "vision_layer_cutoff": 2,
    "ffn_vision_keep_ratio": 0.5,
}


def yopo_from(base_model, **settings) -> YopoLlavaForConditionalGeneration:
    """A YOPO model with `base_model`'s weights (YOPO adds none)."""
    model = YopoLlavaForConditionalGeneration(YopoConfig.from_base_config(base_model.config, **settings)).eval()
    missing, unexpected = model.load_state_dict(base_model.state_dict(), strict=False)
    assert not missing and not unexpected
    model.generation_config = base_model.generation_config  # never generates the image token
    return model


def text_positions(inputs):
    return inputs["attention_mask"].bool() & (inputs["input_ids"] != IMAGE_TOKEN_ID)


# ---------------------------------------------------------------------------------------------------------------
# Independent references.
# ---------------------------------------------------------------------------------------------------------------


def image_cells(base_model, embeddings, is_image):
    """
    `[batch, seq, 3]` (image number in its row, row, column) of each image token, from the data alone: a LLaVA image
    is a square grid; a LLaVA-NeXT image is the base tile's square grid followed by the high-resolution rows, each
    ended by a token equal to `image_newline` (grid ids 2k and 2k+1 for the k-th image of the row).
    """
    side = base_model.config.vision_config.image_size // PATCH_SIZE
    cells = torch.full((*is_image.shape, 3), -1)
    newline = getattr(base_model.model, "image_newline", None)
    for row in range(is_image.shape[0]):
        positions = is_image[row].nonzero().flatten().tolist()
        runs = []  # consecutive image positions = one image
        for position in positions:
            if runs and position == runs[-1][-1] + 1:
                runs[-1].append(position)
            else:
                runs.append([position])
        for number, run in enumerate(runs):
            for offset, position in enumerate(run[: side * side]):
                cells[row, position] = torch.tensor([2 * number, offset // side, offset % side])
            grid_row = grid_column = 0
            for position in run[side * side :]:
                cells[row, position] = torch.tensor([2 * number + 1, grid_row, grid_column])
                grid_column += 1
                if newline is not None and torch.equal(embeddings[row, position], newline):
                    grid_row, grid_column = grid_row + 1, 0
    return cells


def window_allowed(cells, is_image, window):
    """`[batch, seq, seq]`: vision query i may read vision key j (same grid, within the window)."""
    radius = window // 2
    same_grid = cells[:, :, None, 0] == cells[:, None, :, 0]
    near = ((cells[:, :, None, 1:] - cells[:, None, :, 1:]).abs() <= radius).all(-1)
    return same_grid & near & is_image[:, :, None] & is_image[:, None, :]


def masked_yopo(base_model, inputs, settings, semantics):
    """
    YOPO written as the reference writes it: the dense model with masks (every token through every layer). A vision
    query sees the text before it and its window; in a pruned head (all heads past the cutoff) weights on vision keys
    are removed, before the softmax ("renormalize") or zeroed after it ("reference"); vision rows drop the pruned
    heads' outputs; vision tokens use the first FFN neurons. Returns logits.
    """
    config = base_model.config.text_config
    language_model = base_model.model.language_model
    with torch.no_grad():
        embeddings = base_model(**inputs, output_hidden_states=True).hidden_states[0]
    valid = inputs["attention_mask"].bool()
    is_image = (inputs["input_ids"] == IMAGE_TOKEN_ID) & valid
    length = is_image.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    allowed = causal[None] & valid[:, None, :]
    if settings["neighbor_window"]:
        vision_pair = is_image[:, :, None] & is_image[:, None, :]
        window = window_allowed(image_cells(base_model, embeddings, is_image), is_image, settings["neighbor_window"])
        allowed = torch.where(vision_pair, window, allowed)
    allowed |= torch.eye(length, dtype=torch.bool)[None]  # padding rows
    position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = language_model.rotary_emb(embeddings, position_ids)
    cutoff = settings["vision_layer_cutoff"]
    neurons = int(settings["ffn_vision_keep_ratio"] * config.intermediate_size)
    hidden = embeddings
    with torch.no_grad():
        for layer_idx, layer in enumerate(language_model.layers):
            heads = torch.tensor(settings["vision_head_mask"][layer_idx], dtype=torch.bool)
            reads_vision = heads & (cutoff is None or layer_idx < cutoff)  # per head
            attention = layer.self_attn
            normed = layer.input_layernorm(hidden)
            shape = (*normed.shape[:2], -1, attention.head_dim)
            query = attention.q_proj(normed).view(shape).transpose(1, 2)
            key = attention.k_proj(normed).view(shape).transpose(1, 2)
            value = attention.v_proj(normed).view(shape).transpose(1, 2)
            query, key = apply_rotary_pos_emb(query, key, cos, sin)
            key, value = (
                repeat_kv(key, attention.num_key_value_groups),
                repeat_kv(value, attention.num_key_value_groups),
            )
            scores = query @ key.transpose(-1, -2) * attention.scaling
            removed = is_image[:, None, None, :] & ~reads_vision[None, :, None, None]
            head_allowed = allowed[:, None] & ~removed if semantics == "renormalize" else allowed[:, None]
            weights = torch.softmax(scores.masked_fill(~head_allowed, -torch.inf), dim=-1).nan_to_num()
            if semantics == "reference":
                weights = weights.masked_fill(removed, 0.0)
            output = weights @ value  # [batch, heads, seq, head_dim]
            output = output * torch.where(is_image[:, None, :, None], heads[None, :, None, None], True)
            hidden = hidden + attention.o_proj(output.transpose(1, 2).flatten(2))
            normed = layer.post_attention_layernorm(hidden)
            mlp = layer.mlp
            gate, up = mlp.gate_proj(normed), mlp.up_proj(normed)
            dropped = torch.arange(config.intermediate_size) >= neurons
            zero = is_image[:, :, None] & dropped[None, None, :]
            gate, up = gate.masked_fill(zero, 0.0), up.masked_fill(zero, 0.0)
            hidden = hidden + mlp.down_proj(mlp.act_fn(gate) * up)
        return base_model.lm_head(language_model.norm(hidden))


# ---------------------------------------------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------------------------------------------


def test_config_validates_and_presets_follow_depth():
    base = tiny_base_config("llava")
    assert preset_settings("12%", 32) == {"neighbor_window": 5, "vision_layer_cutoff": 8, "ffn_vision_keep_ratio": 0.5}
    assert preset_settings("25%", 32)["vision_layer_cutoff"] == 16
    with pytest.raises(ValueError, match="unknown YOPO preset '50%'"):
        preset_settings("50%", 32)
    with pytest.raises(ValueError, match="neighbor_window must be odd"):
        YopoConfig.from_base_config(base, neighbor_window=4)
    with pytest.raises(ValueError, match="vision_layer_cutoff must be <= num_hidden_layers"):
        YopoConfig.from_base_config(base, vision_layer_cutoff=5)
    with pytest.raises(ValueError, match="vision_head_mask must be a list of 4 lists of 4 booleans"):
        YopoConfig.from_base_config(base, vision_head_mask=[[True] * 3] * 4)
    with pytest.raises(ValueError, match="attention_semantics must be one of"):
        YopoConfig.from_base_config(base, attention_semantics="masked")
    mixed = [[True, False, True, True]] * 4
    with pytest.raises(ValueError, match="prune whole key/value groups"):
        YopoLlavaForConditionalGeneration(
            YopoConfig.from_base_config(base, vision_head_mask=mixed, attention_semantics="reference")
        )


# ---------------------------------------------------------------------------------------------------------------
# Exactness.
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_dense_equivalent_reproduces_base_logits(base, base_checkpoints):
    base_model = base_checkpoints[(base, "hub")][1]
    model = yopo_from(base_model, **DENSE_EQUIVALENT)
    inputs = inputs_for(base)
    with torch.no_grad():
        expected, actual = base_model(**inputs).logits, model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (actual - expected)[valid].abs().max() <= 1e-5


@pytest.fixture(params=[8, 2], ids=["block8", "block2"])
def window_block(request, monkeypatch):
    """The window tile size: the default, and 2 so that the tiny grids span several tiles (windows cross tiles)."""
    monkeypatch.setattr(modeling_yopo, "WINDOW_BLOCK", request.param)
    return request.param


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_window_equals_dense_llava_with_window_mask(base, base_checkpoints, window_block):
    """`neighbor_window=3` alone == transformers' LLaVA with the vision block of its 4-D mask replaced by the window."""
    base_model = base_checkpoints[(base, "hub")][1]
    model = yopo_from(base_model, **{**DENSE_EQUIVALENT, "neighbor_window": 3})
    inputs = inputs_for(base)
    valid = inputs["attention_mask"].bool()
    is_image = (inputs["input_ids"] == IMAGE_TOKEN_ID) & valid
    with torch.no_grad():
        embeddings = base_model(**inputs, output_hidden_states=True).hidden_states[0]
        cells = image_cells(base_model, embeddings, is_image)
        length = is_image.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).tril()[None] & valid[:, None, :]
        mask = torch.where(is_image[:, :, None] & is_image[:, None, :], window_allowed(cells, is_image, 3), mask)
        mask |= torch.eye(length, dtype=torch.bool)[None]
        position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)
        unmasked = {key: value for key, value in inputs.items() if key != "attention_mask"}
        expected = base_model(**unmasked, attention_mask=mask[:, None], position_ids=position_ids).logits
        actual = model(**inputs).logits
        dense = base_model(**inputs).logits
    assert (actual - expected)[valid].abs().max() <= 1e-5
    assert (dense - expected)[text_positions(inputs)].abs().max() > 1e-3  # the window changes the answer


# Renormalize semantics also prune single heads of a key/value group (2 query heads per group here).
MIXED_GROUPS = {
    **ALL_KNOBS,
    "vision_head_mask": [[True] * 4, [True, False, True, False], [False, True, False, False], [False] * 4],
}


@pytest.mark.parametrize("base", ["llava", "llava_next"])
@pytest.mark.parametrize(
    ("semantics", "settings"),
    [("reference", ALL_KNOBS), ("renormalize", ALL_KNOBS), ("renormalize", MIXED_GROUPS)],
    ids=["reference", "renormalize", "renormalize-mixed-groups"],
)
def test_every_knob_equals_masked_implementation(base, semantics, settings, base_checkpoints, window_block):
    base_model = base_checkpoints[(base, "hub")][1]
    model = yopo_from(base_model, **settings, attention_semantics=semantics)
    inputs = inputs_for(base)
    expected = masked_yopo(base_model, inputs, settings, semantics)
    with torch.no_grad():
        actual = model(**inputs).logits
    text = text_positions(inputs)  # with "renormalize", vision tokens leave at the cutoff: no logits for them
    assert (actual - expected)[text].abs().max() <= 1e-5
    other = "renormalize" if semantics == "reference" else "reference"
    assert (masked_yopo(base_model, inputs, settings, other) - expected)[text].abs().max() > 1e-4


@pytest.mark.parametrize(
    "semantics, backend", [("reference", "sdpa"), ("renormalize", "sdpa"), ("renormalize", "eager")]
)
def test_decoding_with_cache_equals_recomputing(semantics, backend, base_checkpoints):
    """
    Greedy tokens with the cache == without it (each step recomputes the prefix) == the masked implementation. Decode
    steps in layers with pruned heads run transformers' own layer with a per-head mask, in the backend's format.
    """
    base_model = base_checkpoints[("llava_next", "hub")][1]
    model = yopo_from(base_model, **ALL_KNOBS, attention_semantics=semantics)
    model.set_attn_implementation(backend)
    inputs = inputs_for("llava_next")
    with torch.no_grad():
        cached = model.generate(
            **inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        recomputed = model.generate(
            **inputs,
            max_new_tokens=6,
            do_sample=False,
            use_cache=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert (torch.stack(cached.logits) - torch.stack(recomputed.logits)).abs().max() <= 1e-4
    cached = cached.sequences
    width = inputs["input_ids"].shape[1]
    extended = {
        **inputs,
        "input_ids": cached[:, :-1],
        "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(cached[:, width:-1])], dim=-1),
    }
    expected_logits = masked_yopo(base_model, extended, ALL_KNOBS, semantics)[:, width - 1 :]
    expected_logits[..., IMAGE_TOKEN_ID] = -torch.inf  # suppressed in generate()
    expected_tokens = expected_logits.argmax(-1)
    assert torch.equal(cached[:, width:], expected_tokens)


@pytest.mark.parametrize("base", ["llava", "llava_next"])
def test_padded_batch_equals_rows_alone(base, base_checkpoints):
    base_model = base_checkpoints[(base, "hub")][1]
    model = yopo_from(base_model, **ALL_KNOBS)
    inputs = inputs_for(base, left_padding=(0, 7))
    with torch.no_grad():
        batch_logits = model(**inputs).logits
        batch_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
        for row in range(2):
            single = row_alone(inputs, row)
            keep = inputs["attention_mask"][row].bool()
            text = (single["input_ids"] != IMAGE_TOKEN_ID)[0]
            alone = model(**single).logits[0]
            assert (batch_logits[row, keep][text] - alone[text]).abs().max() <= 1e-5
            tokens = model.generate(**single, max_new_tokens=4, do_sample=False)
            assert torch.equal(batch_tokens[row, -4:], tokens[0, -4:])


# ---------------------------------------------------------------------------------------------------------------
# Savings.
# ---------------------------------------------------------------------------------------------------------------


def test_cut_layers_hold_no_vision_keys_and_values(base_checkpoints):
    base_model = base_checkpoints[("llava_next", "hub")][1]
    inputs = inputs_for("llava_next")
    vision = ((inputs["input_ids"] == IMAGE_TOKEN_ID) & inputs["attention_mask"].bool()).sum(-1)
    for semantics, vision_after_cutoff in (("renormalize", 0), ("reference", vision)):
        model = yopo_from(base_model, **ALL_KNOBS, attention_semantics=semantics)
        with torch.no_grad():
            output = model(**inputs, use_cache=True)
        cache = output.cache
        for layer_idx in range(4):
            expected = vision if layer_idx < 2 else vision_after_cutoff
            stored = cache.stored_image_tokens(layer_idx)
            assert stored.tolist() == (stored * 0 + expected).tolist(), (semantics, layer_idx)
        text = inputs["attention_mask"].sum(-1) - vision
        assert cache.stored_tokens(3).tolist() == (text + vision_after_cutoff).tolist()


def language_model_flops(model, inputs) -> int:
    """FLOPs of a prefill, without the vision tower and projector (the same in every model)."""
    with torch.no_grad(), flop_counter() as counter:
        model(**inputs, logits_to_keep=1)
    counts = counter.get_flop_counts()
    vision = sum(
        sum(ops.values()) for name, ops in counts.items() if name.endswith((".vision_tower", ".multi_modal_projector"))
    )
    return counter.get_total_flops() - vision


def test_twelve_percent_preset_flops_on_576_vision_tokens(tmp_path):
    """LLaVA-1.5 geometry (24 x 24 patch grid): the 12% preset's language-model prefill costs <= 0.3 of dense, and a
    pruned head saves its four projections for every vision token."""
    base_model = build_tiny_llava(
        tmp_path / "base", base="llava", num_layers=8, hidden_size=128, num_heads=4, num_kv_heads=4, processor=False
    )
    # A 48-pixel image with 2-pixel patches: 576 tokens, as LLaVA-1.5's 336 / 14.
    base_model.config.vision_config.image_size = 48
    base_model = type(base_model)(base_model.config).eval()
    ids = torch.cat([torch.arange(4, 39), torch.full((576,), IMAGE_TOKEN_ID), torch.arange(4, 20)])[None]
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 48, 48)}
    dense = language_model_flops(base_model, inputs)
    preset = language_model_flops(yopo_from(base_model, **preset_settings("12%", 8)), inputs)
    assert preset / dense <= 0.3, preset / dense

    # Half the heads of layers 2..7 pruned: each pruned head saves, per vision token, its q, k, v, o slices
    # (4 x 2 * d * head_dim) and its attention over the 51 text keys and its window block's keys (2 x 2 * head_dim
    # each; a block's keys are its 8 x 8 tile widened by the radius 2 of the 5 x 5 window: 12 x 12).
    head_mask = [[True] * 4 if layer < 2 else [True, True, False, False] for layer in range(8)]
    all_heads = language_model_flops(yopo_from(base_model, neighbor_window=5), inputs)
    half_heads = language_model_flops(yopo_from(base_model, neighbor_window=5, vision_head_mask=head_mask), inputs)
    pruned_heads, head_dim = 6 * 2, 32
    block_keys = (WINDOW_BLOCK + 2 * 2) ** 2
    expected = pruned_heads * 576 * (4 * 2 * 128 * head_dim + 2 * 2 * head_dim * (51 + block_keys))
    assert all_heads - half_heads == pytest.approx(expected, rel=0.01)


# ---------------------------------------------------------------------------------------------------------------
# Conversion.
# ---------------------------------------------------------------------------------------------------------------


def test_cli_preset_converts_and_fresh_process_loads(base_checkpoints, tmp_path):
    import json
    import os
    import subprocess
    import sys

    from sparse_llava.convert_llava import main

    base_folder, base_model = base_checkpoints[("llava_next", "hub")]
    output = tmp_path / "yopo"
    assert main(["--base", str(base_folder), "--method", "yopo", "--output", str(output), "--preset", "25%"]) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "yopo_llava" and config["vision_layer_cutoff"] == 2
    assert config["neighbor_window"] == 5 and config["ffn_vision_keep_ratio"] == 0.5
    inputs = inputs_for("llava_next")
    expected = yopo_from(base_model, **preset_settings("25%", 4)).generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.save(inputs, tmp_path / "inputs.pt")
    probe = (
        "import torch\n"
        "from transformers import AutoModelForImageTextToText\n"
        f"model = AutoModelForImageTextToText.from_pretrained({str(output)!r}, trust_remote_code=True)\n"
        f"inputs = torch.load({str(tmp_path / 'inputs.pt')!r})\n"
        "print(type(model).__module__, model.generate(**inputs, max_new_tokens=4, do_sample=False).tolist())\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    module, tokens = result.stdout.split(" ", 1)
    assert module.startswith("transformers_modules.") and json.loads(tokens) == expected.tolist()

    assert main(["--base", str(base_folder), "--method", "p-mod", "--output", str(tmp_path / "x"), "--preset", "12%"])
    assert not (tmp_path / "x").exists()


def test_calibration_writes_the_reference_rules_head_mask(base_checkpoints, tmp_path, capsys):
    """The mask follows the rule recomputed here from transformers' own LLaVA: last prompt row's vision/other mass
    ratio > alpha in more than 40% of the samples, layers 0 and 1 always kept."""
    from PIL import Image
    from transformers import AutoProcessor

    from sparse_llava.calibrate_yopo import main
    from sparse_llava.convert_llava import convert

    base_folder, base_model = base_checkpoints[("llava", "hub")]
    eager = type(base_model).from_pretrained(base_folder, attn_implementation="eager").eval()
    output = convert(str(base_folder), "yopo", tmp_path / "yopo", progress=False)
    generator = torch.Generator().manual_seed(0)
    images = []
    for index in range(5):
        pixels = (torch.rand(12, 12, 3, generator=generator) * 255).to(torch.uint8).numpy()
        images.append(str(tmp_path / f"{index}.png"))
        Image.fromarray(pixels).save(images[-1])
    prompt = "What is in the image ?"

    processor = AutoProcessor.from_pretrained(base_folder)
    ratios = []
    for path in images:
        inputs = processor(images=Image.open(path), text=f"USER: <image>\n{prompt} ASSISTANT:", return_tensors="pt")
        with torch.no_grad():
            attentions = eager(**inputs, output_attentions=True).attentions
        is_image = inputs["input_ids"][0] == IMAGE_TOKEN_ID
        rows = torch.stack([attention[0, :, -1] for attention in attentions])  # [layers, heads, keys]
        ratios.append(rows[..., is_image].sum(-1) / rows[..., ~is_image].sum(-1))
    ratios = torch.stack(ratios)
    alpha = float(ratios[:, 2:].median())
    expected = ((ratios > alpha).sum(0) > 0.4 * len(images)).tolist()
    expected[0] = expected[1] = [True] * 4

    assert main(["--model", str(output), "--images", *images, "--prompts", prompt, "--alpha", str(alpha)]) == 0
    config = YopoConfig.from_pretrained(output)
    assert config.vision_head_mask == expected
    assert "heads kept per layer (of 4)" in capsys.readouterr().out
    assert any(not all(row) for row in expected[2:])  # the threshold prunes something here

    assert main(["--model", str(output), "--images", *images, "--prompts", prompt, "--keep-fraction", "0.75"]) == 0
    kept = [sum(row) for row in YopoConfig.from_pretrained(output).vision_head_mask]
    assert kept[:2] == [4, 4] and abs(sum(kept) / 4 - 3) <= 0.5
    assert main(["--model", str(base_folder), "--images", *images, "--prompts", prompt]) == 2
    assert "is not a YOPO model" in capsys.readouterr().err


def two_image_conversation():
    """One row: text, image, text, image, text (LLaVA-1.5 tiny images: 16 tokens each)."""
    generator = torch.Generator().manual_seed(3)
    pieces = [torch.randint(4, IMAGE_TOKEN_ID, (n,), generator=generator) for n in (3, 4, 5)]
    image = torch.full((16,), IMAGE_TOKEN_ID)
    first = torch.cat([pieces[0], image, pieces[1]])[None]
    second = torch.cat([image, pieces[2]])[None]
    pixels = torch.randn(2, 3, 8, 8, generator=generator)
    return first, second, pixels


def test_two_images_per_row_and_a_second_turn_on_the_cache(base_checkpoints):
    """Several images in one row match the masked implementation; a second turn (an image, then text only) run on the
    cache of the first gives the logits of the whole conversation run at once."""
    base_model = base_checkpoints[("llava", "hub")][1]
    model = yopo_from(base_model, **MIXED_GROUPS)
    first, second, pixels = two_image_conversation()
    whole = {"input_ids": torch.cat([first, second], dim=1), "pixel_values": pixels}
    whole["attention_mask"] = torch.ones_like(whole["input_ids"])
    text = text_positions(whole)
    expected = masked_yopo(base_model, whole, MIXED_GROUPS, "renormalize")
    with torch.no_grad():
        assert (model(**whole).logits - expected)[text].abs().max() <= 1e-5
        cache = model(input_ids=first, pixel_values=pixels[:1], use_cache=True).cache
        second_turn = model(input_ids=second, pixel_values=pixels[1:], cache=cache, use_cache=True).logits
        width = first.shape[1]
        assert (second_turn - expected[:, width:])[text[:, width:]].abs().max() <= 1e-5
        # A text-only turn of several tokens reads the cached vision slots through the per-head masks.
        follow_up = torch.randint(4, IMAGE_TOKEN_ID, (1, 4), generator=torch.Generator().manual_seed(5))
        third_turn = model(input_ids=follow_up, cache=cache, use_cache=True).logits
        longer = {**whole, "input_ids": torch.cat([whole["input_ids"], follow_up], dim=1)}
        longer["attention_mask"] = torch.ones_like(longer["input_ids"])
        expected_longer = masked_yopo(base_model, longer, MIXED_GROUPS, "renormalize")
    assert (third_turn - expected_longer[:, -4:]).abs().max() <= 1e-5


def test_gradient_checkpointing_gives_the_same_gradients(base_checkpoints):
    base_model = base_checkpoints[("llava_next", "hub")][1]
    inputs = inputs_for("llava_next")
    labels = torch.where(text_positions(inputs), inputs["input_ids"], -100)
    gradients = []
    for checkpointing in (False, True):
        model = yopo_from(base_model, **ALL_KNOBS).train()
        if checkpointing:
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model(**inputs, labels=labels).loss.backward()
        gradients.append(model.language_model.layers[0].self_attn.q_proj.weight.grad)
    assert gradients[0].abs().sum() > 0 and torch.allclose(gradients[0], gradients[1], atol=1e-6)


def test_pruning_applies_in_training(base_checkpoints):
    """Fine-tuning with YOPO on (as the reference trains): the loss is the masked implementation's, and gradients
    reach the weights vision tokens use."""
    base_model = base_checkpoints[("llava", "hub")][1]
    model = yopo_from(base_model, **ALL_KNOBS).train()
    inputs = inputs_for("llava")
    # As in LLaVA training, labels are predicted from text positions only (image positions leave the sequence at the
    # cutoff; padding predicts nothing).
    after_text = torch.nn.functional.pad(text_positions(inputs)[:, :-1], (1, 0))
    labels = torch.where(text_positions(inputs) & after_text, inputs["input_ids"], -100)
    loss = model(**inputs, labels=labels).loss
    expected_logits = masked_yopo(base_model, inputs, ALL_KNOBS, "renormalize")
    expected = torch.nn.functional.cross_entropy(
        expected_logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    loss.backward()
    first_layer = model.language_model.layers[0]
    assert first_layer.self_attn.q_proj.weight.grad.abs().sum() > 0
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def _calibration_images(folder: Path, count: int = 3) -> list[str]:
    from PIL import Image

    generator = torch.Generator().manual_seed(1)
    paths = []
    for index in range(count):
        pixels = (torch.rand(12, 12, 3, generator=generator) * 255).to(torch.uint8).numpy()
        paths.append(str(folder / f"calibration-{index}.png"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_calibration_runs_the_folders_code_only_when_trusted(base_checkpoints, tmp_path):
    """The folder's configuration code writes a marker when imported: absent unless --trust-remote-code is given."""
    from sparse_llava.convert_llava import convert

    output = convert(str(base_checkpoints[("llava", "hub")][0]), "yopo", tmp_path / "yopo", progress=False)
    marker = tmp_path / "folder-code-ran"
    code_file = output / "configuration_yopo.py"
    code_file.write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + code_file.read_text())
    images = _calibration_images(tmp_path)
    script = Path(__file__).resolve().parents[1] / "conversion" / "calibrate_yopo.py"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"))
    command = [sys.executable, str(script), "--model", str(output), "--images", *images, "--prompts", "What ?"]
    untrusted = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    assert untrusted.returncode == 0, untrusted.stderr
    assert not marker.exists() and "heads kept per layer" in untrusted.stdout
    assert YopoConfig.from_pretrained(output).vision_head_mask is not None
    trusted = subprocess.run([*command, "--trust-remote-code"], capture_output=True, text=True, env=env)
    assert trusted.returncode == 0, trusted.stderr
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600])
def test_calibration_keeps_the_config_files_mode(mode, converted_yopo, tmp_path):
    from sparse_llava.calibrate_yopo import main

    folder = tmp_path / "yopo"
    shutil.copytree(converted_yopo("llava"), folder)
    (folder / "config.json").chmod(mode)
    assert main(["--model", str(folder), "--images", *_calibration_images(tmp_path), "--prompts", "What ?"]) == 0
    assert (folder / "config.json").stat().st_mode & 0o777 == mode
    assert YopoConfig.from_pretrained(folder).vision_head_mask is not None
    assert sorted(path.name for path in folder.iterdir()) == sorted(
        path.name for path in converted_yopo("llava").iterdir()
    )  # no temporary file left beside it
