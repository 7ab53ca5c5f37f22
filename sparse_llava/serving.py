"""`sparse-llava serve FOLDER [flags of transformers serve]`: transformers' own OpenAI-compatible server, with the
sparse-llava classes known to it.

`transformers serve` (transformers 5.x) cannot load sparse-llava folders by itself: after reading the config it builds
the model class as `getattr(transformers, config.architectures[0])`, ignoring the config's `auto_map`, and it then
decides the model's modality (text-only LLM, or image-text-to-text VLM, which is what makes it pass images on) from
the class *names* of transformers' built-in Auto mappings. `make_classes_known_to_serve` closes both gaps:

* public API: `sparse_llava.register_auto_classes()` registers the configs and models with the Auto classes, so
  `AutoConfig` reads the folders without remote code;
* private, transformers internals (checked by tests/test_serving.py, which fails clearly when upstream changes them):
  - the model classes become attributes of the `transformers` module object the server's model manager
    (`transformers.cli.serving.model_manager`) reads them from with `getattr(transformers, ...)`. That object is not
    always `sys.modules["transformers"]`: importing `transformers.processing_utils` runs transformers' `__init__` a
    second time, which puts a fresh lazy module there, so both get the classes;
  - each model type is entered, with its class name, in
    `transformers.models.auto.modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES`, where the server looks the
    class name up to report the model as image-text-to-text. Registered classes are found by Auto mappings before
    that table is consulted (`_LazyAutoMapping._extra_content`), so nothing else reads the new entries as modules of
    transformers;
  - from transformers 5.25 on, each model loads in a process the server spawns, with a pickled copy of the server's
    `model_manager.ModelLoader`, which `transformers.cli.serve` imports when the command starts. That attribute
    becomes `SparseLlavaModelLoader`, whose `_load_model` makes the classes known in that process first (a spawned
    process starts from a fresh `transformers`).

The served model runs this installed package's code (not a copy the folder carries, so `--trust-remote-code` is not
needed). Everything else is transformers' server as it is: its flags (`--host`, `--port`, `--device`, `--dtype`, ...),
its endpoints (`/v1/chat/completions`, plain and streaming, with images as URLs or base64 data URLs), the folder's
chat template. Requires `pip install 'sparse-llava[serve]'` (transformers' `serving` extra) and transformers 5.x.
"""

import sys

import transformers

import sparse_llava

from .compat_transformers import IS_TRANSFORMERS_V5

MODEL_CLASSES = {
    sparse_llava.DynamicLlavaConfig.model_type: sparse_llava.DynamicLlavaForConditionalGeneration,
    sparse_llava.PMoDConfig.model_type: sparse_llava.PMoDLlavaForConditionalGeneration,
    sparse_llava.YopoConfig.model_type: sparse_llava.YopoLlavaForConditionalGeneration,
}


def make_classes_known_to_serve() -> None:
    """Let `transformers serve` load sparse-llava folders and report them as image-text-to-text (see module doc)."""
    from transformers.cli.serving import model_manager
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    sparse_llava.register_auto_classes()
    transformers_modules = {id(module): module for module in (model_manager.transformers, sys.modules["transformers"])}
    for model_type, model_class in MODEL_CLASSES.items():
        for module in transformers_modules.values():
            setattr(module, model_class.__name__, model_class)
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type] = model_class.__name__
    if SparseLlavaModelLoader is not None:
        model_manager.ModelLoader = SparseLlavaModelLoader


def serve_is_available() -> bool:
    """Whether transformers' server and its serving extra are installed (transformers 5.x)."""
    if not IS_TRANSFORMERS_V5:
        return False
    from transformers.utils.import_utils import is_serve_available

    return is_serve_available()


SparseLlavaModelLoader = None
if serve_is_available():
    from transformers.cli.serving import model_manager as _serve_model_manager

    if hasattr(_serve_model_manager, "ModelLoader"):  # transformers >= 5.25: models load in spawned processes

        class SparseLlavaModelLoader(_serve_model_manager.ModelLoader):
            """transformers serve's model loader, which makes the sparse-llava classes known in the model's process
            before it loads the model (see module doc)."""

            def _load_model(self, *args, **kwargs):
                make_classes_known_to_serve()
                return super()._load_model(*args, **kwargs)


def serve(arguments: list[str]) -> None:
    """
    Run `transformers serve` with `arguments`: serve's own, a model folder or Hub id first to pin the server to that
    model (without one, each request names its model, loaded on first use).
    """
    if not IS_TRANSFORMERS_V5:
        raise SystemExit(
            f"sparse-llava serve runs transformers 5.x's server; this is transformers {transformers.__version__}"
        )
    if not serve_is_available():
        raise SystemExit("sparse-llava serve needs transformers' serving extra: pip install 'sparse-llava[serve]'")
    make_classes_known_to_serve()
    from transformers.cli.transformers import app

    # The CLI's own entry point (`main`) would first look for a newer transformers release online.
    app(args=["serve", *arguments], prog_name="sparse-llava", standalone_mode=True)


if __name__ == "__main__":
    serve(sys.argv[1:])
