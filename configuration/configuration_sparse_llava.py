"""Configuration shared by every sparse-llava method.

A sparse-llava config is a LLaVA / LLaVA-NeXT config (vision tower, projector, language model, image token) plus
`base_model_type`, which says which of the two layouts the checkpoint has. Each method subclasses it and adds its
own knobs. `LlavaNextConfig` is the superset of the two base configs (it adds `image_grid_pinpoints`), so it is the
parent (through `SparseLlavaConfigBase`, which gives it 5.x's dataclass behaviour on transformers 4.57);
`image_grid_pinpoints` is simply unused for a LLaVA-1.5 base.
"""

from .compat_transformers import SparseLlavaConfigBase

SUPPORTED_BASE_MODEL_TYPES = ("llava", "llava_next")


class SparseLlavaConfig(SparseLlavaConfigBase):
    r"""
    Base configuration of a LLaVA whose language model may drop tokens.

    Args:
        base_model_type (`str`, *optional*, defaults to `"llava"`):
            Layout of the base checkpoint: `"llava"` (LLaVA-1.5, `LlavaForConditionalGeneration`) or `"llava_next"`
            (LLaVA-NeXT, `LlavaNextForConditionalGeneration`: anyres tiles and `image_newline`).
        vision_config, text_config, image_token_index, image_grid_pinpoints, ...:
            As in [`LlavaNextConfig`].
    """

    model_type = "sparse_llava"

    base_model_type: str = "llava"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.base_model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(
                f"base_model_type must be one of {SUPPORTED_BASE_MODEL_TYPES}, got {self.base_model_type!r}"
            )

    @classmethod
    def from_base_config(cls, base_config, **method_kwargs):
        """Build a method config from a `LlavaConfig` / `LlavaNextConfig`, keeping every base field."""
        base_model_type = getattr(base_config, "model_type", None)
        if base_model_type not in SUPPORTED_BASE_MODEL_TYPES:
            raise ValueError(
                f"the base model must be a LLaVA-1.5 or LLaVA-NeXT checkpoint (model_type one of "
                f"{SUPPORTED_BASE_MODEL_TYPES}), got model_type={base_model_type!r}"
            )
        fields = base_config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            fields.pop(key, None)
        fields["base_model_type"] = base_model_type
        fields.update(method_kwargs)
        return cls(**fields)


def check_ratio(name: str, value) -> None:
    """Raise a clear error unless `value` is a number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")


def check_int(name: str, value, minimum: int) -> None:
    """Raise a clear error unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
