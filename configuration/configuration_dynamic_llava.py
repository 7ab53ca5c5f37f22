"""Dynamic-LLaVA configuration (Huang et al., ICLR 2025, arXiv 2412.00876)."""

# transformers 4.57 copies out of a local folder only the files the entry module imports itself, not their imports.
from .compat_transformers import IS_TRANSFORMERS_V5  # noqa: F401
from .configuration_sparse_llava import SparseLlavaConfig, check_int, check_ratio


class DynamicLlavaConfig(SparseLlavaConfig):
    r"""
    Configuration of [`DynamicLlavaForConditionalGeneration`]: a LLaVA-1.5 / LLaVA-NeXT base plus the two learned
    predictors of Dynamic-LLaVA. Defaults are those of the paper's released recipe.

    Dense-equivalent setting (reproduces the base LLaVA's logits): `vision_keep_ratio=1.0, text_sparsification=False`.

    Args:
        sparse_layer (`int`, *optional*, defaults to 2):
            Index of the first decoder layer that sees the sparsified sequence. The predictors read the hidden states
            entering this layer; layers below it always see every token.
        vision_keep_ratio (`float`, *optional*, defaults to 0.2):
            Fraction of each image's tokens kept at prefill: every image keeps its top `floor(n * vision_keep_ratio)`
            tokens by the image predictor's keep score. Must be in (0, 1].
        text_sparsification (`bool`, *optional*, defaults to `True`):
            Whether the output-text predictor drops past generated tokens during decoding.
        predictor_hidden_size (`int`, *optional*, defaults to 512):
            Width of the predictors (`d_model` in the reference). Must be divisible by 4 and by `predictor_num_heads`.
        predictor_num_heads (`int`, *optional*, defaults to 8):
            Attention heads of the image predictor's transformer blocks.
        predictor_intermediate_size (`int`, *optional*, defaults to 2048):
            MLP width of the image predictor's transformer blocks.
        predictor_num_layers (`int`, *optional*, defaults to 2):
            Number of transformer blocks in the image predictor.
        output_text_keep_ratio (`float`, *optional*, defaults to 0.5):
            Training target for the fraction of output-text tokens kept (inference keeps a token when its keep logit
            exceeds its drop logit).
        output_text_min_length (`int`, *optional*, defaults to 50):
            Training: answers shorter than this are not sparsified.
        mask_loss_weight (`float`, *optional*, defaults to 100.0):
            Training: weight of the squared gap between each mask's kept fraction and its target ratio.
        gumbel_tau_start (`float`, *optional*, defaults to 1.0):
            Training: Gumbel-Softmax temperature at the first step.
        gumbel_tau_end (`float`, *optional*, defaults to 0.1):
            Training: Gumbel-Softmax temperature at the last step (exponential decay in between).
    """

    model_type = "dynamic_llava"

    sparse_layer: int = 2
    vision_keep_ratio: float = 0.2
    text_sparsification: bool = True
    predictor_hidden_size: int = 512
    predictor_num_heads: int = 8
    predictor_intermediate_size: int = 2048
    predictor_num_layers: int = 2
    output_text_keep_ratio: float = 0.5
    output_text_min_length: int = 50
    mask_loss_weight: float = 100.0
    gumbel_tau_start: float = 1.0
    gumbel_tau_end: float = 0.1

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        num_layers = self.text_config.num_hidden_layers
        check_int("sparse_layer", self.sparse_layer, 0)
        if self.sparse_layer >= num_layers:
            raise ValueError(
                f"sparse_layer must be below the number of decoder layers ({num_layers}), got {self.sparse_layer}"
            )
        check_ratio("vision_keep_ratio", self.vision_keep_ratio)
        check_ratio("output_text_keep_ratio", self.output_text_keep_ratio)
        if not isinstance(self.text_sparsification, bool):
            raise ValueError(f"text_sparsification must be true or false, got {self.text_sparsification!r}")
        check_int("predictor_num_heads", self.predictor_num_heads, 1)
        check_int("predictor_hidden_size", self.predictor_hidden_size, 4)
        if self.predictor_hidden_size % 4 or self.predictor_hidden_size % self.predictor_num_heads:
            raise ValueError(
                "predictor_hidden_size must be divisible by 4 and by predictor_num_heads, got "
                f"{self.predictor_hidden_size} with {self.predictor_num_heads} heads"
            )
        check_int("predictor_intermediate_size", self.predictor_intermediate_size, 1)
        check_int("predictor_num_layers", self.predictor_num_layers, 0)
        check_int("output_text_min_length", self.output_text_min_length, 0)
        for name in ("mask_loss_weight", "gumbel_tau_start", "gumbel_tau_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if self.gumbel_tau_start <= 0 or self.gumbel_tau_end <= 0:
            raise ValueError("gumbel_tau_start and gumbel_tau_end must be positive")


__all__ = ["DynamicLlavaConfig"]
