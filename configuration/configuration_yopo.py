"""YOPO configuration (Zhang et al., "Treat Visual Tokens as Text? But Your MLLM Only Needs Fewer Efforts to See",
arXiv 2410.06169): training-free pruning of the computation spent on vision tokens."""

import math

# transformers 4.57 copies out of a local folder only the files the entry module imports itself, not their imports.
from .compat_transformers import IS_TRANSFORMERS_V5  # noqa: F401
from .configuration_sparse_llava import SparseLlavaConfig, check_int, check_ratio

ATTENTION_SEMANTICS = ("renormalize", "reference")

# The paper's two budgets, as fractions of the dense vision FLOPs L * (8nd^2 + 4n^2d + 6ndm) (reference section 5c).
# The released settings are not public; the reference's cost model reproduces 25% (1.91 of 7.63 TFLOPs for 7B) with
# its 7b_16 head mask (about half the heads), vision tokens in the first half of the layers, a 5x5 window and half
# the FFN neurons; halving the vision layers again gives 12%:
# (L/4) * (0.5 * 8nd^2 + 6nd * m/2) / (L * (8nd^2 + 4n^2d + 6ndm)) = 0.12 for LLaVA-1.5-7B.
# The head mask comes from calibration (`conversion/calibrate_yopo.py`, by default keeping half the heads).
PRESETS = {
    "12%": {"neighbor_window": 5, "vision_layer_fraction": 0.25, "ffn_vision_keep_ratio": 0.5},
    "25%": {"neighbor_window": 5, "vision_layer_fraction": 0.5, "ffn_vision_keep_ratio": 0.5},
}


def preset_settings(preset: str, num_layers: int) -> dict:
    """The config fields of a preset for a language model of `num_layers` layers (the head mask is calibrated)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown YOPO preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    settings = PRESETS[preset]
    return {
        "neighbor_window": settings["neighbor_window"],
        "vision_layer_cutoff": max(1, math.floor(num_layers * settings["vision_layer_fraction"] + 0.5)),
        "ffn_vision_keep_ratio": settings["ffn_vision_keep_ratio"],
    }


class YopoConfig(SparseLlavaConfig):
    r"""
    Configuration of [`YopoLlavaForConditionalGeneration`]: a LLaVA-1.5 / LLaVA-NeXT base whose language model spends
    less computation on vision tokens. Every decision is structural (the same for every sample), so no token is
    scored at run time.

    Dense-equivalent setting (reproduces the base LLaVA's logits): `neighbor_window=0, vision_head_mask=None,
    vision_layer_cutoff=None, ffn_vision_keep_ratio=1.0`.

    Args:
        neighbor_window (`int`, *optional*, defaults to 5):
            Odd window size `w`: a vision token attends only to the vision tokens of the same image within a `w x w`
            (Chebyshev) neighbourhood on the image's patch grid, in both directions, plus the text before it. Text
            tokens keep full causal attention. For LLaVA-NeXT the window is taken on the base image's grid and on the
            high-resolution grid (the tiles stitched together, after unpadding); each row's newline token is a cell
            one column past the row's end. `0` turns the window off.
        vision_head_mask (`list[list[bool]]`, *optional*):
            Per layer, per attention head: True if the head still works on vision tokens. A pruned head computes
            nothing for vision queries, and no query reads vision keys through it. `None` keeps every head. Computed
            from samples by `conversion/calibrate_yopo.py`.
        vision_layer_cutoff (`int`, *optional*):
            Layers with index >= the cutoff no longer read vision tokens: with `"renormalize"` semantics they leave the
            sequence (and the cache); with `"reference"` they stay, their values zeroed. `None` keeps them in every
            layer.
        ffn_vision_keep_ratio (`float`, *optional*, defaults to 0.5):
            Vision tokens use only the first `floor(ratio * intermediate_size)` FFN neurons (the reference keeps the
            first `I / mlpcut_ratio` by index). Text tokens use the whole FFN.
        attention_semantics (`str`, *optional*, defaults to `"renormalize"`):
            How removed vision keys leave attention. `"renormalize"`: they leave the softmax, so their work can be
            skipped (vision tokens leave the sequence at the cutoff, pruned heads need no vision keys or values).
            `"reference"`: the semantics of the released fine-tuned checkpoints, whose weights on removed vision keys
            are zeroed after a softmax that still counts them, so vision keys must be computed in every layer and
            head (more computation; vision queries still use the window and the kept heads only).
    """

    model_type = "yopo_llava"

    neighbor_window: int = 5
    vision_head_mask: list[list[bool]] | None = None
    vision_layer_cutoff: int | None = None
    ffn_vision_keep_ratio: float = 0.5
    attention_semantics: str = "renormalize"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_int("neighbor_window", self.neighbor_window, 0)
        if self.neighbor_window and self.neighbor_window % 2 == 0:
            raise ValueError(
                f"neighbor_window must be odd (a window centred on the token) or 0, got {self.neighbor_window}"
            )
        if self.neighbor_window and self.vision_feature_select_strategy != "default":
            raise ValueError(
                "neighbor_window needs vision_feature_select_strategy='default' (image tokens on a square patch grid), "
                f"got {self.vision_feature_select_strategy!r}"
            )
        text_config = self.get_text_config()
        num_layers, num_heads = text_config.num_hidden_layers, text_config.num_attention_heads
        if self.vision_layer_cutoff is not None:
            check_int("vision_layer_cutoff", self.vision_layer_cutoff, 0)
            if self.vision_layer_cutoff > num_layers:
                raise ValueError(
                    f"vision_layer_cutoff must be <= num_hidden_layers ({num_layers}), got {self.vision_layer_cutoff}"
                )
        if self.vision_head_mask is not None:
            mask = self.vision_head_mask
            if (
                not isinstance(mask, (list, tuple))
                or len(mask) != num_layers
                or any(not isinstance(row, (list, tuple)) or len(row) != num_heads for row in mask)
                or any(not isinstance(value, bool) for row in mask for value in row)
            ):
                raise ValueError(
                    f"vision_head_mask must be a list of {num_layers} lists of {num_heads} booleans (layers x heads)"
                )
            self.vision_head_mask = [list(row) for row in mask]
            if self.attention_semantics == "reference":
                # Zeroed values stand for the reference's weights zeroed after the softmax; a key/value head shared
                # by a kept and a pruned query head cannot be both zero and not.
                group = num_heads // text_config.num_key_value_heads
                for layer_idx, row in enumerate(self.vision_head_mask):
                    mixed = sorted({h // group for h in range(num_heads) if row[h] != row[h // group * group]})
                    if mixed:
                        raise ValueError(
                            f"attention_semantics='reference' needs vision_head_mask to prune whole key/value groups; "
                            f"layer {layer_idx} keeps and prunes query heads sharing key/value heads {mixed}"
                        )
        check_ratio("ffn_vision_keep_ratio", self.ffn_vision_keep_ratio)
        if self.attention_semantics not in ATTENTION_SEMANTICS:
            raise ValueError(
                f"attention_semantics must be one of {ATTENTION_SEMANTICS}, got {self.attention_semantics!r}"
            )

    def vision_heads(self, layer_idx: int) -> list[int]:
        """Indices of the heads of layer `layer_idx` that still work on vision tokens."""
        num_heads = self.get_text_config().num_attention_heads
        if self.vision_head_mask is None:
            return list(range(num_heads))
        return [head for head, keep in enumerate(self.vision_head_mask[layer_idx]) if keep]

    def vision_layer(self, layer_idx: int) -> bool:
        """Whether vision tokens are still in the sequence at layer `layer_idx`."""
        return self.vision_layer_cutoff is None or layer_idx < self.vision_layer_cutoff

    def ffn_vision_neurons(self) -> int:
        """How many of the first FFN neurons vision tokens use."""
        return max(1, int(self.ffn_vision_keep_ratio * self.get_text_config().intermediate_size))


__all__ = ["PRESETS", "YopoConfig", "preset_settings"]
