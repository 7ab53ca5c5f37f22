"""sparse-llava: Dynamic-LLaVA, p-MoD and YOPO as Hub-native transformers models.

The model code lives in the repository's `configuration/` and `modeling/` folders, exactly as it ships to the Hub:
flat files importing each other with single-dot relative imports. This package makes those folders part of its
import path, so `sparse_llava.modeling_dynamic_llava` is the very file a converted checkpoint carries.
"""

from pathlib import Path

__version__ = "0.1.0"


def _code_folders() -> list[str]:
    here = Path(__file__).resolve().parent
    folders = []
    for name in ("configuration", "modeling", "conversion"):
        # Installed wheel: the folders are shipped inside the package; source checkout: they sit beside it.
        for candidate in (here / name, here.parent / name):
            if candidate.is_dir():
                folders.append(str(candidate))
                break
    return folders


__path__.extend(_code_folders())  # noqa: F821  (`__path__` is defined for packages)

from transformers import AutoConfig, AutoModelForImageTextToText  # noqa: E402

from .cache_sparse_llava import SparseCache, SparseCacheLayer  # noqa: E402
from .configuration_dynamic_llava import DynamicLlavaConfig  # noqa: E402
from .configuration_sparse_llava import SparseLlavaConfig  # noqa: E402
from .modeling_dynamic_llava import DynamicLlavaForConditionalGeneration  # noqa: E402

AutoConfig.register(DynamicLlavaConfig.model_type, DynamicLlavaConfig, exist_ok=True)
AutoModelForImageTextToText.register(DynamicLlavaConfig, DynamicLlavaForConditionalGeneration, exist_ok=True)


def convert(*args, **kwargs):
    """Convert a LLaVA checkpoint into a sparse-llava one; see `sparse_llava.convert_llava.convert`."""
    from .convert_llava import convert as _convert

    return _convert(*args, **kwargs)


__all__ = [
    "DynamicLlavaConfig",
    "DynamicLlavaForConditionalGeneration",
    "SparseCache",
    "SparseCacheLayer",
    "SparseLlavaConfig",
    "convert",
]
