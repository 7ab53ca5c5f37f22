"""sparse-llava: Dynamic-LLaVA, p-MoD and YOPO as Hub-native transformers models.

The model code lives in the repository's `configuration/` and `modeling/` folders, exactly as it ships to the Hub:
flat files importing each other with single-dot relative imports. This package makes those folders part of its
import path, so `sparse_llava.modeling_dynamic_llava` is the very file a converted checkpoint carries.
"""

from pathlib import Path

__version__ = "0.1.0"


def resource_folder(name: str) -> Path | None:
    """A top-level folder of the repository (`modeling`, `hub_cards`, ...), wherever this package is installed."""
    here = Path(__file__).resolve().parent
    # Installed wheel: the folders are shipped inside the package; source checkout: they sit beside it.
    return next((folder for folder in (here / name, here.parent / name) if folder.is_dir()), None)


__path__.extend(  # noqa: F821  (`__path__` is defined for packages)
    str(resource_folder(name)) for name in ("configuration", "modeling", "conversion") if resource_folder(name)
)

from .cache_sparse_llava import FixedSparseLayer, GrowingSparseLayer, SparseCache, SparseCacheLayer  # noqa: E402
from .compat_transformers import auto_model_classes  # noqa: E402
from .configuration_dynamic_llava import DynamicLlavaConfig  # noqa: E402
from .configuration_pmod import PMoDConfig  # noqa: E402
from .configuration_sparse_llava import SparseLlavaConfig  # noqa: E402
from .configuration_yopo import YopoConfig  # noqa: E402
from .modeling_dynamic_llava import DynamicLlavaForConditionalGeneration  # noqa: E402
from .modeling_pmod import PMoDLlavaForConditionalGeneration  # noqa: E402
from .modeling_yopo import YopoLlavaForConditionalGeneration  # noqa: E402


def register_auto_classes() -> None:
    """
    Register the package's classes with `AutoConfig` and `AutoModelForImageTextToText` (on transformers 4.57 also
    `AutoModelForVision2Seq`), so converted folders load without `trust_remote_code` and use this installed code
    instead of the folder's copy. Not done on import: by default a converted folder runs the code it carries, exactly
    as it does from the Hub.
    """
    from transformers import AutoConfig

    for config_class, model_class in (
        (DynamicLlavaConfig, DynamicLlavaForConditionalGeneration),
        (PMoDConfig, PMoDLlavaForConditionalGeneration),
        (YopoConfig, YopoLlavaForConditionalGeneration),
    ):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in auto_model_classes():
            auto_class.register(config_class, model_class, exist_ok=True)


def convert(*args, **kwargs):
    """Convert a LLaVA checkpoint into a sparse-llava one; see `sparse_llava.convert_llava.convert`."""
    from .convert_llava import convert as _convert

    return _convert(*args, **kwargs)


__all__ = [
    "DynamicLlavaConfig",
    "DynamicLlavaForConditionalGeneration",
    "PMoDConfig",
    "PMoDLlavaForConditionalGeneration",
    "SparseCache",
    "FixedSparseLayer",
    "GrowingSparseLayer",
    "SparseCacheLayer",
    "SparseLlavaConfig",
    "YopoConfig",
    "YopoLlavaForConditionalGeneration",
    "convert",
    "register_auto_classes",
]
