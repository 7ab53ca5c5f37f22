"""Read checkpoints in the original LLaVA-repo layout (haotian-liu/LLaVA and the forks of the methods).

Formats, detected from the source's `config.json` (or forced with `--from-format`):

* `llava-original`: `liuhaotian/llava-v1.5-*` / `llava-v1.6-*` (`model_type` `llava_llama`). These lack the CLIP
  weights: `--vision-tower` gives a CLIP checkpoint (e.g. `openai/clip-vit-large-patch14-336`).
* `dynamic-llava-original`: `Osilly/Dynamic-LLaVA-*`, the same plus `sparse_config` and the two predictors
  (`model.image_score_predictor.*`, `model.output_text_score_predictor.*`).
* `pmod-original`: `MCG-NJU/p-MoD-LLaVA-*` (`model_type` `pmod_llava_llama`): decoder layers wrapped as
  `model.layers.{i}.decoder_layer.*` with routers `model.layers.{i}.router.router.*`, the CLIP tower inside.
* `yopo-original`: `zwt123home123/llava-1.5-*-prune-zp*`: a plain LLaVA-1.5 layout fine-tuned with pruning on, whose
  config carries `attncut_w`, `layercut_num`, `headcut_num`, `mlpcut_ratio` (and `sprompt_len`, not needed here:
  images are found by their tokens). The head mask itself is not in the checkpoint (the reference loads
  `headmask_{7b,13b}_{headcut_num}.npy` from its repository): give it with `--head-mask`, or calibrate one.

`read_original_checkpoint` returns the llava-hf config of the base, the method settings found in the source, and the
tensors under the runtime names of sparse-llava models. The `<image>` (and `<pad>`) tokens are added as transformers'
own `convert_llava_weights_to_hf.py` does: the vocabulary grows by two, rounded up to a multiple of 64, and the new
embedding rows are drawn from a normal distribution with the old rows' mean and 1e-5 times their covariance.
Every source tensor lands somewhere or is reported in `ignored`.
"""

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

ORIGINAL_FORMATS = ("llava-original", "dynamic-llava-original", "pmod-original", "yopo-original")

# The config of `openai/clip-vit-large-patch14-336`, the tower of every released LLaVA-1.5 / 1.6 model.
CLIP_L_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    patch_size=14,
    image_size=336,
    projection_dim=768,
    hidden_act="quick_gelu",
)
LLAMA_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "hidden_act",
    "bos_token_id",
    "eos_token_id",
    "attention_bias",
    "tie_word_embeddings",
    "rope_scaling",
)


@dataclass
class OriginalCheckpoint:
    base_config: object  # LlavaConfig / LlavaNextConfig of the base model
    method: str | None  # "dynamic-llava", "p-mod", "yopo" or None (a plain LLaVA)
    settings: dict  # the method's settings, as sparse-llava config fields
    tensors: dict[str, torch.Tensor]  # runtime parameter names of sparse-llava models
    ignored: list[str] = field(default_factory=list)  # source tensors that have no place (reported)


def detect_format(config: dict) -> str | None:
    """The original format of a source config, or None when it is not one (e.g. a llava-hf checkpoint)."""
    if "attncut_w" in config or "layercut_num" in config:
        return "yopo-original"
    if config.get("model_type") == "pmod_llava_llama" or "mod_target_layers" in config:
        return "pmod-original"
    if config.get("model_type") in ("llava_llama", "dynamic_llava_llama"):
        return "dynamic-llava-original" if "sparse_config" in config else "llava-original"
    return None


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder: safetensors or `.bin`, single file or sharded with an index."""
    from safetensors.torch import load_file

    for index_name, loader in (
        ("model.safetensors.index.json", load_file),
        ("pytorch_model.bin.index.json", _load_bin),
    ):
        index = folder / index_name
        if index.is_file():
            tensors = {}
            for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
                tensors.update(loader(folder / shard))
            return tensors
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors")
    if (folder / "pytorch_model.bin").is_file():
        return _load_bin(folder / "pytorch_model.bin")
    raise FileNotFoundError(f"no weights (safetensors or pytorch_model.bin) in {folder}")


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_original_checkpoint(folder, source_format: str, vision_tower=None, seed: int = 0) -> OriginalCheckpoint:
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(f"only the mlp2x_gelu projector is supported, got {config['mm_projector_type']!r}")
    source = read_tensors(folder)

    has_tower = any(name.startswith("model.vision_tower.") for name in source)
    vision_tensors, vision_config = {}, None
    if vision_tower is not None:
        vision_folder = Path(vision_tower)
        if not vision_folder.is_dir():  # a Hub id, e.g. openai/clip-vit-large-patch14-336
            from huggingface_hub import snapshot_download

            vision_folder = Path(snapshot_download(vision_tower, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
        vision_config = CLIPVisionConfig.from_pretrained(vision_folder)
        if not has_tower:  # a tower inside the checkpoint wins; --vision-tower then only gives its config
            vision_tensors = read_tensors(vision_folder)
    elif (config.get("mm_vision_tower") or "").rstrip("/").endswith("clip-vit-large-patch14-336"):
        vision_config = CLIPVisionConfig(**CLIP_L_336)
    tensors, ignored = {}, []
    for name, tensor in {**source, **{f"clip::{key}": value for key, value in vision_tensors.items()}}.items():
        target = _runtime_name(name)
        if target is None:
            ignored.append(name)
        else:
            tensors[target] = tensor
    if not any(name.startswith("model.vision_tower.") for name in tensors):
        raise ValueError(f"{folder} has no CLIP vision tower weights: pass --vision-tower with a CLIP checkpoint")
    if vision_config is None:
        raise ValueError(
            f"no config for the vision tower {config.get('mm_vision_tower')!r}: pass --vision-tower with its checkpoint"
        )

    text_config = {key: config[key] for key in LLAMA_FIELDS if config.get(key) is not None}
    text_config["model_type"] = "llama"
    original_vocab = config["vocab_size"]
    vocab_size = -(-(original_vocab + 2) // 64) * 64
    text_config.update(vocab_size=vocab_size, pad_token_id=original_vocab + 1)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = _grow_rows(tensors[name], vocab_size, seed)

    strategy = "default" if config.get("mm_vision_select_feature", "patch") == "patch" else "full"
    common = dict(
        text_config=text_config,
        vision_config=vision_config.to_dict(),
        image_token_index=original_vocab,
        pad_token_id=original_vocab + 1,
        vision_feature_layer=config.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=strategy,
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2 + (strategy == "full"),
    )
    if str(config.get("image_aspect_ratio", "")).startswith("anyres") or "model.image_newline" in tensors:
        base_config = LlavaNextConfig(**common, image_grid_pinpoints=config.get("image_grid_pinpoints"))
    else:
        base_config = LlavaConfig(**common)

    method, settings = _method_settings(source_format, config)
    return OriginalCheckpoint(base_config, method, settings, tensors, sorted(ignored))


def _runtime_name(name: str) -> str | None:
    """Where a tensor of the original layout goes in a sparse-llava model, or None if it has no place."""
    if name.startswith("clip::"):
        key = name[len("clip::") :]
        return "model.vision_tower." + key[len("vision_model.") :] if key.startswith("vision_model.") else None
    if name.endswith("rotary_emb.inv_freq") or name.startswith("model.instruct_score_predictor."):
        return None
    rules = (
        (r"^model\.vision_tower\.vision_tower\.vision_model\.(.*)$", r"model.vision_tower.\1"),
        (r"^model\.mm_projector\.0\.(.*)$", r"model.multi_modal_projector.linear_1.\1"),
        (r"^model\.mm_projector\.2\.(.*)$", r"model.multi_modal_projector.linear_2.\1"),
        (r"^model\.image_newline$", "model.image_newline"),
        (r"^model\.layers\.(\d+)\.decoder_layer\.(.*)$", r"model.language_model.layers.\1.\2"),
        (r"^model\.layers\.(\d+)\.router\.router\.(weight|bias)$", r"routers.\1.\2"),
        (r"^model\.(image_score_predictor|output_text_score_predictor)\.(.*)$", r"\1.\2"),
        (r"^model\.(embed_tokens|layers|norm)\b(.*)$", r"model.language_model.\1\2"),
        (r"^lm_head\.weight$", "lm_head.weight"),
    )
    for pattern, replacement in rules:
        if re.match(pattern, name):
            return re.sub(pattern, replacement, name)
    return None


def _grow_rows(weight: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """Append rows drawn from N(mean, 1e-5 * covariance) of the existing rows (transformers' LLaVA converter)."""
    extra = rows - weight.shape[0]
    if extra <= 0:
        return weight
    data = weight.float()
    mean = data.mean(0)
    centred = data - mean
    covariance = centred.T @ centred / data.shape[0]
    distribution = torch.distributions.MultivariateNormal(
        mean, covariance_matrix=1e-5 * covariance + 1e-12 * torch.eye(data.shape[1])
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        new_rows = distribution.sample((extra,))
    return torch.cat([weight, new_rows.to(weight.dtype)], dim=0)


def _method_settings(source_format: str, config: dict) -> tuple[str | None, dict]:
    if source_format == "dynamic-llava-original":
        sparse = config["sparse_config"]
        renames = {
            "sparse_layer": "sparse_layer",
            "vision_keep_rate": "vision_keep_ratio",
            "d_model": "predictor_hidden_size",
            "nhead": "predictor_num_heads",
            "dim_feedforward": "predictor_intermediate_size",
            "num_layers": "predictor_num_layers",
            "output_text_keep_rate": "output_text_keep_ratio",
            "output_text_len_for_training": "output_text_min_length",
            "mask_loss_weight": "mask_loss_weight",
        }
        settings = {ours: sparse[theirs] for theirs, ours in renames.items() if theirs in sparse}
        use_text = sparse.get("use_text_predictor", True) and sparse.get("use_output_text_predictor", True)
        settings["text_sparsification"] = bool(use_text)
        if not sparse.get("use_vision_predictor", True):
            settings["vision_keep_ratio"] = 1.0
        return "dynamic-llava", settings
    if source_format == "pmod-original":
        schedule = re.fullmatch(r"shiftedcos_decay_(\d+\.\d+)_(\d+\.\d+)", config.get("mod_target_layers") or "")
        if schedule is None:
            raise ValueError(f"unsupported p-MoD mod_target_layers {config.get('mod_target_layers')!r}")
        norm = re.fullmatch(r"tanh_(\d+(?:\.\d+)?)_1", config.get("mod_weight_norm") or "tanh_0.2_1")
        if norm is None:
            raise ValueError(f"unsupported p-MoD mod_weight_norm {config.get('mod_weight_norm')!r}")
        settings = {
            **(
                {"mod_layers": list(config["mod_target_layer_indices"])} if "mod_target_layer_indices" in config else {}
            ),
            "mod_max_ratio": float(schedule.group(1)),
            "mod_min_ratio": float(schedule.group(2)),
            "prd_shift": config.get("mod_router_factor", 0.5),
            "router_weight_scale": float(norm.group(1)),
            "routed_tokens": config.get("mod_target_token_type", "vision_all"),
        }
        return "p-mod", settings
    if source_format == "yopo-original":
        settings = {"attention_semantics": "reference"}  # the semantics these checkpoints were fine-tuned with
        if config.get("attncut_w") is not None:
            settings["neighbor_window"] = int(config["attncut_w"])
        if config.get("layercut_num") is not None:
            settings["vision_layer_cutoff"] = int(config["layercut_num"])
        if config.get("mlpcut_ratio") is not None:
            settings["ffn_vision_keep_ratio"] = 1 / float(config["mlpcut_ratio"])
        return "yopo", settings
    return None, {}
