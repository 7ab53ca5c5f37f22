"""Import of checkpoints in the original LLaVA-repo layout: plain LLaVA-1.5, Dynamic-LLaVA's and p-MoD's releases.

The fakes are written from tiny transformers models in the exact original layout (key names, config fields,
shapes), so the imported model can be compared with the transformers model it came from.
"""

import json
from pathlib import Path

import pytest
import torch
from conftest import SMALL_PREDICTOR
from safetensors.torch import save_file
from transformers import CLIPVisionConfig

import sparse_llava
from sparse_llava.convert_llava import ConversionError, convert
from sparse_llava.tiny import IMAGE_SIZE, PATCH_SIZE, build_tiny_llava

ORIGINAL_VOCAB = 64  # the original tokenizer's vocabulary; <image> = 64 and <pad> = 65 are added on import
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2


def original_tensors(model, prefix_layers=lambda index: f"model.layers.{index}."):
    """The tensors of a transformers LLaVA under the original LLaVA-repo names, vocabulary cut to the original."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.startswith("model.language_model.layers."):
            index, rest = name[len("model.language_model.layers.") :].split(".", 1)
            tensors[prefix_layers(int(index)) + rest] = tensor
        elif name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            key = "model.embed_tokens.weight" if name.startswith("model.") else "lm_head.weight"
            tensors[key] = tensor[:ORIGINAL_VOCAB]
        elif name == "model.language_model.norm.weight":
            tensors["model.norm.weight"] = tensor
        elif name.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[name.split("linear_")[1][0]]
            tensors[f"model.mm_projector.{index}." + name.rsplit(".", 1)[1]] = tensor
        elif name == "model.image_newline":
            tensors["model.image_newline"] = tensor
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # old checkpoints carry these
    return {name: tensor.clone().contiguous() for name, tensor in tensors.items()}


def tower_tensors(model, prefix):
    return {
        prefix + name[len("model.vision_tower.") :]: tensor.clone().contiguous()
        for name, tensor in model.state_dict().items()
        if name.startswith("model.vision_tower.")
    }


def original_config(model, **extra):
    text = model.config.text_config
    config = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        "vocab_size": ORIGINAL_VOCAB,
        "hidden_size": text.hidden_size,
        "intermediate_size": text.intermediate_size,
        "num_hidden_layers": text.num_hidden_layers,
        "num_attention_heads": text.num_attention_heads,
        "num_key_value_heads": text.num_key_value_heads,
        "max_position_embeddings": text.max_position_embeddings,
        "rms_norm_eps": text.rms_norm_eps,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "mm_vision_tower": "tiny-clip",
        "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -1,
        "mm_vision_select_feature": "patch",
        "image_aspect_ratio": "pad",
        "mm_patch_merge_type": "flat",
        "mm_use_im_start_end": False,
    }
    if model.config.model_type == "llava_next":
        config.update(
            image_aspect_ratio="anyres",
            mm_patch_merge_type="spatial_unpad",
            image_grid_pinpoints=model.config.image_grid_pinpoints,
        )
    config.update(extra)
    return config


def write_checkpoint(folder: Path, config: dict, tensors: dict, layout: str = "safetensors"):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    if layout == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
    elif layout == "sharded":
        names = sorted(tensors)
        shards = {
            "model-00001-of-00002.safetensors": names[: len(names) // 2],
            "model-00002-of-00002.safetensors": names[len(names) // 2 :],
        }
        for shard, keys in shards.items():
            save_file({key: tensors[key] for key in keys}, folder / shard, metadata={"format": "pt"})
        weight_map = {key: shard for shard, keys in shards.items() for key in keys}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("originals")
    models = {
        base: build_tiny_llava(root / f"hf-{base}", base=base, processor=False) for base in ("llava", "llava_next")
    }
    clip = root / "clip"
    clip.mkdir()
    CLIPVisionConfig(**models["llava"].config.vision_config.to_dict()).save_pretrained(clip)
    clip_tensors = tower_tensors(models["llava"], "vision_model.")
    save_file(
        {
            **clip_tensors,
            "text_model.embeddings.token_embedding.weight": torch.zeros(3, 2),
            "logit_scale": torch.ones(()),
        },
        clip / "model.safetensors",
        metadata={"format": "pt"},
    )
    return root, models, clip


def inputs(base_model, rows=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, ORIGINAL_VOCAB, (rows, 3 + IMAGE_TOKENS + 4), generator=generator)
    ids[:, 3 : 3 + IMAGE_TOKENS] = ORIGINAL_VOCAB
    return {"input_ids": ids, "pixel_values": torch.randn(rows, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)}


def test_plain_llava_original_with_vision_tower(sources, tmp_path):
    root, models, clip = sources
    source = tmp_path / "liuhaotian-llava"
    write_checkpoint(source, original_config(models["llava"]), original_tensors(models["llava"]))
    output = convert(
        str(source),
        "dynamic-llava",
        tmp_path / "out",
        {**SMALL_PREDICTOR, "vision_keep_ratio": 1.0, "text_sparsification": False},
        vision_tower=str(clip),
        progress=False,
    )
    model = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(output).eval()
    assert model.config.image_token_id == ORIGINAL_VOCAB and model.config.text_config.vocab_size == 128
    assert model.config.text_config.pad_token_id == ORIGINAL_VOCAB + 1
    # The added rows follow the old rows' statistics; the old rows are untouched.
    embeddings = model.get_input_embeddings().weight
    reference = models["llava"].get_input_embeddings().weight
    assert torch.equal(embeddings[:ORIGINAL_VOCAB], reference[:ORIGINAL_VOCAB])
    assert (embeddings[ORIGINAL_VOCAB:] - reference[:ORIGINAL_VOCAB].mean(0)).abs().max() < 0.1
    # Dense-equivalent: the transformers model it was written from, on the original vocabulary.
    batch = inputs(models["llava"])
    reference_batch = dict(
        batch,
        input_ids=torch.where(
            batch["input_ids"] == ORIGINAL_VOCAB, models["llava"].config.image_token_id, batch["input_ids"]
        ),
    )
    with torch.no_grad():
        actual = model(**batch).logits[..., :ORIGINAL_VOCAB]
        expected = models["llava"](**reference_batch).logits[..., :ORIGINAL_VOCAB]
    assert (actual - expected).abs().max() <= 1e-4


def test_missing_vision_tower_is_a_clear_error(sources, tmp_path):
    root, models, clip = sources
    source = tmp_path / "liuhaotian-llava"
    write_checkpoint(source, original_config(models["llava"]), original_tensors(models["llava"]))
    with pytest.raises(ConversionError, match="pass --vision-tower"):
        convert(str(source), "p-mod", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_dynamic_llava_release_sharded(sources, tmp_path, capsys):
    root, models, clip = sources
    sparse_config = {
        "sparse_layer": 1,
        "vision_keep_rate": 0.25,
        "d_model": 32,
        "nhead": 4,
        "dim_feedforward": 64,
        "num_layers": 2,
        "use_vision_predictor": True,
        "use_text_predictor": True,
        "use_output_text_predictor": True,
        "use_instruct_predictor": False,
        "output_text_keep_rate": 0.5,
        "output_text_len_for_training": 40,
        "mask_loss_weight": 100.0,
        "maskclip": None,
        "instruct_keep_rate": 0.7,
    }
    config = sparse_llava.DynamicLlavaConfig.from_base_config(models["llava"].config, **SMALL_PREDICTOR)
    predictors = sparse_llava.DynamicLlavaForConditionalGeneration(config)
    predictor_tensors = {
        f"model.{name}": tensor.clone() for name, tensor in predictors.state_dict().items() if "score_predictor" in name
    }
    extra = {"model.instruct_score_predictor.output_mlp.1.weight": torch.zeros(32, 32)}
    source = tmp_path / "Dynamic-LLaVA-7B"
    write_checkpoint(
        source,
        original_config(models["llava"], sparse_config=sparse_config),
        {**original_tensors(models["llava"]), **predictor_tensors, **extra},
        layout="sharded",
    )
    output = convert(str(source), "dynamic-llava", tmp_path / "out", vision_tower=str(clip))
    log = capsys.readouterr().err
    for ignored in (
        "model.instruct_score_predictor.output_mlp.1.weight",
        "rotary_emb.inv_freq",
        "clip::text_model.embeddings.token_embedding.weight",
        "clip::logit_scale",
    ):
        assert ignored in log
    model = sparse_llava.DynamicLlavaForConditionalGeneration.from_pretrained(output)
    settings = {
        key: getattr(model.config, key)
        for key in (
            "sparse_layer",
            "vision_keep_ratio",
            "text_sparsification",
            "predictor_hidden_size",
            "output_text_min_length",
        )
    }
    assert settings == {
        "sparse_layer": 1,
        "vision_keep_ratio": 0.25,
        "text_sparsification": True,
        "predictor_hidden_size": 32,
        "output_text_min_length": 40,
    }
    for name, tensor in predictor_tensors.items():
        assert torch.equal(model.state_dict()[name[len("model.") :]], tensor), name
    with pytest.raises(ConversionError, match="is a dynamic-llava checkpoint; convert it with --method dynamic-llava"):
        convert(str(source), "p-mod", tmp_path / "wrong", vision_tower=str(clip), progress=False)


def test_pmod_release_next_bin_with_tower_inside(sources, tmp_path):
    root, models, clip = sources
    base = models["llava_next"]
    config = sparse_llava.PMoDConfig.from_base_config(base.config)
    mod_layers = config.mod_layers
    assert mod_layers == [1, 2, 3]
    tensors = original_tensors(
        base, lambda index: f"model.layers.{index}.decoder_layer." if index in mod_layers else f"model.layers.{index}."
    )
    tensors.update(tower_tensors(base, "model.vision_tower.vision_tower.vision_model."))
    generator = torch.Generator().manual_seed(0)
    routers = {}
    for layer in mod_layers:
        routers[f"model.layers.{layer}.router.router.weight"] = torch.randn(1, 32, generator=generator)
        routers[f"model.layers.{layer}.router.router.bias"] = torch.randn(1, generator=generator)
    source = tmp_path / "p-MoD-LLaVA-NeXT-7B"
    fields = dict(
        model_type="pmod_llava_llama",
        architectures=["PmodLlavaLlamaForCausalLM"],
        mod_target_layers="shiftedcos_decay_0.85_0.15",
        mod_router_factor=0.5,
        mod_weight_norm="tanh_0.2_1",
        mod_target_token_type="vision_all",
        mod_bias_enabled=True,
        mod_special_init=True,
        mod_target_layer_indices=mod_layers,
        mm_vision_tower="openai/clip-vit-large-patch14-336",
    )
    write_checkpoint(source, original_config(base, **fields), {**tensors, **routers}, layout="bin")
    # The CLIP-L/336 config named by the source does not fit the tiny tower: --vision-tower gives the right one.
    output = convert(str(source), "p-mod", tmp_path / "out", vision_tower=str(clip), progress=False)
    model = sparse_llava.PMoDLlavaForConditionalGeneration.from_pretrained(output)
    assert model.config.base_model_type == "llava_next" and model.config.mod_layers == mod_layers
    assert model.config.router_weight_scale == 0.2 and model.config.routed_tokens == "vision_all"
    for layer in mod_layers:
        assert torch.equal(model.routers[str(layer)].weight, routers[f"model.layers.{layer}.router.router.weight"])
    state = model.state_dict()
    for name, tensor in base.state_dict().items():
        if "embed_tokens" in name or name == "lm_head.weight":
            assert torch.equal(state[name][:ORIGINAL_VOCAB], tensor[:ORIGINAL_VOCAB]), name
        else:
            assert torch.equal(state[name], tensor), name


def test_cli_flags_for_original_checkpoints(sources, tmp_path, capsys):
    from sparse_llava.convert_llava import main

    root, models, clip = sources
    source = tmp_path / "liuhaotian-llava"
    write_checkpoint(source, original_config(models["llava"]), original_tensors(models["llava"]))
    args = ["--base", str(source), "--method", "p-mod", "--output", str(tmp_path / "out")]
    assert main([*args, "--from-format", "llava-original", "--vision-tower", str(clip)]) == 0
    assert sparse_llava.PMoDLlavaForConditionalGeneration.from_pretrained(tmp_path / "out").config.mod_layers
    assert main([*args[:-1], str(tmp_path / "out2"), "--from-format", "pmod-original"]) == 2
    assert "cannot read the pmod-original checkpoint" in capsys.readouterr().err


def test_processor_from_a_llava_hf_model(sources, base_checkpoints, tmp_path):
    root, models, clip = sources
    source = tmp_path / "liuhaotian-llava"
    write_checkpoint(source, original_config(models["llava"]), original_tensors(models["llava"]))
    hf_with_processor = str(base_checkpoints[("llava", "hub")][0])  # its <image> is 98, the import's is 64
    with pytest.raises(ConversionError, match="maps <image> to 98, the model expects 64"):
        convert(
            str(source), "p-mod", tmp_path / "out", vision_tower=str(clip), processor=hf_with_processor, progress=False
        )
    assert not (tmp_path / "out").exists()
    output = convert(hf_with_processor, "p-mod", tmp_path / "ok", processor=hf_with_processor, progress=False)
    assert (output / "tokenizer.json").is_file() and (output / "processor_config.json").is_file()


def test_yopo_release_with_reference_semantics(sources, tmp_path, capsys):
    """`zwt123home123/llava-1.5-*-prune-zp*`: plain LLaVA-1.5 layout plus the pruning fields; the head mask as the YOPO
    repository ships it (`headmask_*.npy`, [layers, heads], True = keep)."""
    import numpy

    root, models, clip = sources
    source = tmp_path / "yopo-release"
    yopo_fields = {"attncut_w": 3, "layercut_num": 2, "headcut_num": 16, "mlpcut_ratio": 2, "sprompt_len": 3}
    write_checkpoint(source, original_config(models["llava"], **yopo_fields), original_tensors(models["llava"]))
    head_mask = numpy.array([[True] * 4, [True, True, False, False], [False, False, True, True], [False] * 4])
    numpy.save(tmp_path / "headmask_tiny_16.npy", head_mask)
    output = convert(
        str(source),
        "yopo",
        tmp_path / "out",
        vision_tower=str(clip),
        head_mask=str(tmp_path / "headmask_tiny_16.npy"),
        progress=False,
    )
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "yopo_llava"
    assert config["neighbor_window"] == 3 and config["vision_layer_cutoff"] == 2
    assert config["ffn_vision_keep_ratio"] == 0.5 and config["attention_semantics"] == "reference"
    assert config["vision_head_mask"] == head_mask.tolist()
    model = sparse_llava.YopoLlavaForConditionalGeneration.from_pretrained(output).eval()
    batch = inputs(models["llava"])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()

    # Without a head mask every head is kept (and the conversion says where the mask comes from).
    capsys.readouterr()
    convert(str(source), "yopo", tmp_path / "no-mask", vision_tower=str(clip))
    assert "--head-mask" in capsys.readouterr().err
    assert json.loads((tmp_path / "no-mask" / "config.json").read_text())["vision_head_mask"] is None
    with pytest.raises(ConversionError, match="is a yopo checkpoint; convert it with --method yopo"):
        convert(str(source), "p-mod", tmp_path / "wrong", vision_tower=str(clip), progress=False)
