"""p-MoD configuration (Zhang et al., "p-MoD: Building Mixture-of-Depths MLLMs via Progressive Ratio Decay",
ICCV 2025, arXiv 2412.04449)."""

import math

# transformers 4.57 copies out of a local folder only the files the entry module imports itself, not their imports.
from .compat_transformers import IS_TRANSFORMERS_V5  # noqa: F401
from .configuration_sparse_llava import SparseLlavaConfig, check_ratio

ROUTED_TOKEN_CHOICES = ("vision_all", "vision_hr")


def progressive_ratio(layer_idx: int, num_layers: int, shift: float) -> float:
    """The shifted-cosine schedule R(l) = shift + cos(pi * l / (L - 1)) / 2 (the reference hard-codes L = 32)."""
    return shift + 0.5 * math.cos(math.pi * layer_idx / max(num_layers - 1, 1))


class PMoDConfig(SparseLlavaConfig):
    r"""
    Configuration of [`PMoDLlavaForConditionalGeneration`]: a LLaVA-1.5 / LLaVA-NeXT base in which vision tokens
    skip whole decoder layers (Mixture-of-Depths), with the release defaults of the p-MoD code.

    Dense-equivalent setting (reproduces the base LLaVA's logits): `mod_layers=[]`.

    Args:
        prd_shift (`float`, *optional*, defaults to 0.5):
            Shift of the progressive ratio decay R(l) = prd_shift + cos(pi * l / (L - 1)) / 2 (`mod_router_factor`
            in the reference).
        mod_max_ratio (`float`, *optional*, defaults to 0.85):
            Layers whose R(l) is at most this are Mixture-of-Depths layers; the others stay dense.
        mod_min_ratio (`float`, *optional*, defaults to 0.15):
            Floor of the retention ratio: a MoD layer keeps `trunc(n * max(R(l), mod_min_ratio))` of a sample's `n`
            routed tokens.
        router_weight_scale (`float`, *optional*, defaults to 0.2):
            TanhNorm scale: a routed token's weight is `w = 1 + router_weight_scale * tanh(router logit)`.
        routed_tokens (`str`, *optional*, defaults to `"vision_all"`):
            Which tokens are routed: `"vision_all"` (every image token; for LLaVA-NeXT the base tile, the
            high-resolution tiles and the newline tokens) or `"vision_hr"` (LLaVA-NeXT: not the base tile).
            Text tokens always go through every layer.
        mod_layers (`list[int]`, *optional*):
            Indices of the MoD layers. Derived from the schedule when not given (layers 8..31 for 32 layers);
            `[]` makes every layer dense.
    """

    model_type = "pmod_llava"

    prd_shift: float = 0.5
    mod_max_ratio: float = 0.85
    mod_min_ratio: float = 0.15
    router_weight_scale: float = 0.2
    routed_tokens: str = "vision_all"
    mod_layers: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        check_ratio("mod_max_ratio", self.mod_max_ratio)
        check_ratio("mod_min_ratio", self.mod_min_ratio)
        if self.mod_min_ratio > self.mod_max_ratio:
            raise ValueError(
                f"mod_min_ratio ({self.mod_min_ratio}) must not exceed mod_max_ratio ({self.mod_max_ratio})"
            )
        for name in ("prd_shift", "router_weight_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if self.router_weight_scale < 0:
            raise ValueError(f"router_weight_scale must be >= 0, got {self.router_weight_scale}")
        if self.routed_tokens not in ROUTED_TOKEN_CHOICES:
            raise ValueError(f"routed_tokens must be one of {ROUTED_TOKEN_CHOICES}, got {self.routed_tokens!r}")
        num_layers = self.text_config.num_hidden_layers
        if self.mod_layers is None:
            self.mod_layers = [
                layer
                for layer in range(num_layers)
                if progressive_ratio(layer, num_layers, self.prd_shift) <= self.mod_max_ratio
            ]
        if not isinstance(self.mod_layers, (list, tuple)) or not all(
            isinstance(layer, int) and not isinstance(layer, bool) and 0 <= layer < num_layers
            for layer in self.mod_layers
        ):
            raise ValueError(
                f"mod_layers must be a list of layer indices in [0, {num_layers}), got {self.mod_layers!r}"
            )
        if len(set(self.mod_layers)) != len(self.mod_layers):
            raise ValueError(f"mod_layers has duplicates: {self.mod_layers}")
        self.mod_layers = sorted(self.mod_layers)

    def retention_ratio(self, layer_idx: int) -> float:
        """Fraction of routed tokens layer `layer_idx` keeps: max(R(l), mod_min_ratio) for MoD layers, else 1."""
        if layer_idx not in self.mod_layers:
            return 1.0
        ratio = progressive_ratio(layer_idx, self.text_config.num_hidden_layers, self.prd_shift)
        return min(1.0, max(ratio, self.mod_min_ratio))


__all__ = ["PMoDConfig", "progressive_ratio"]
