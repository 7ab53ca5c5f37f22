"""The `lmms_eval.models` entry point of sparse-llava (declared in pyproject.toml).

lmms-eval calls it while it builds its model registry, i.e. while `lmms_eval.models` is being imported, so it lives
apart from the plugin class (`sparse_llava.lmms_eval_plugin`, which imports from lmms-eval) and names that class
by path; lmms-eval imports it when a run asks for `--model sparse_llava`.
"""

MODEL_NAME = "sparse_llava"


def model_manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_NAME, simple_class_path="sparse_llava.lmms_eval_plugin.SparseLlavaLmms")
