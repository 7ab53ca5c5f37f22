"""Turn a llava-hf LLaVA-1.5 / LLaVA-NeXT checkpoint into a Hub-ready sparse-llava folder.

    python conversion/convert_llava.py --base llava-hf/llava-1.5-7b-hf --method dynamic-llava --output out/ \
        [--set vision_keep_ratio=0.2 --set text_sparsification=true] [--overwrite]

`--base` is a local folder or a Hub repo id. The output folder gets the weights (the base weights unchanged, the
method's new modules initialised from a fixed seed), `config.json` with an `auto_map` for `AutoConfig`,
`AutoModelForImageTextToText` and `AutoModelForVision2Seq`, the flat code files, `generation_config.json`, the
processor/tokenizer files when the base has them, and a model card. The folder is written next to its final place
and renamed into it only when complete, so a failure leaves nothing half-written; one conversion at a time writes a
given output, and what a killed one left is cleaned up by the next (see `output_folder.py`). Reading the source never
runs code from it (no `trust_remote_code`, no prompt).
"""

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script from a source checkout: make the `sparse_llava` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sparse_llava  # noqa: E402
from sparse_llava.compat_transformers import config_fields  # noqa: E402
from sparse_llava.configuration_yopo import PRESETS, preset_settings  # noqa: E402
from sparse_llava.original_checkpoints import ORIGINAL_FORMATS, detect_format, read_original_checkpoint  # noqa: E402
from sparse_llava.output_folder import OutputBusy, claim_output  # noqa: E402


class ConversionError(ValueError):
    """Bad input for a conversion (the message names the problem)."""


@dataclass(frozen=True)
class Method:
    name: str
    config_class: type
    model_class: type
    modeling_module: str  # the flat file holding `model_class`
    card_template: str  # file in hub_cards/


METHODS = {
    "dynamic-llava": Method(
        name="dynamic-llava",
        config_class=sparse_llava.DynamicLlavaConfig,
        model_class=sparse_llava.DynamicLlavaForConditionalGeneration,
        modeling_module="modeling_dynamic_llava",
        card_template="dynamic_llava.md",
    ),
    "p-mod": Method(
        name="p-mod",
        config_class=sparse_llava.PMoDConfig,
        model_class=sparse_llava.PMoDLlavaForConditionalGeneration,
        modeling_module="modeling_pmod",
        card_template="pmod.md",
    ),
    "yopo": Method(
        name="yopo",
        config_class=sparse_llava.YopoConfig,
        model_class=sparse_llava.YopoLlavaForConditionalGeneration,
        modeling_module="modeling_yopo",
        card_template="yopo.md",
    ),
}

SOURCE_FORMATS = ("llava-hf", *ORIGINAL_FORMATS)

# Files a llava-hf repo carries for its processor and tokenizer; copied as they are.
PROCESSOR_FILES = [
    "processor_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.json",
    "chat_template.jinja",
]

_CLIP_TOWER, _NESTED_CLIP_TOWER = "vision_tower.", "vision_tower.vision_model."

_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", re.MULTILINE)


def hub_code_files(modeling_module: str) -> list[Path]:
    """The flat code files a converted folder needs: `modeling_module` and everything it imports relatively."""
    folders = [Path(folder) for folder in sparse_llava.__path__]
    found: dict[str, Path] = {}
    pending = [modeling_module]
    while pending:
        name = pending.pop()
        if name in found:
            continue
        path = next((folder / f"{name}.py" for folder in folders if (folder / f"{name}.py").is_file()), None)
        if path is None:
            raise FileNotFoundError(f"code file {name}.py not found in {folders}")
        found[name] = path
        pending.extend(_RELATIVE_IMPORT.findall(path.read_text()))
    return sorted(found.values())


def set_clip_tower_layout(folder: Path, nested: bool = True) -> None:
    """
    Name the CLIP tower's weights of the checkpoint in `folder` `vision_tower.vision_model.*` (`nested`: the layout
    of the llava-hf Hub repos, which transformers 4.57 and 5.x both load) or `vision_tower.*` (how transformers 5.x
    saves them; 4.57 loads that only through sparse-llava's own key mapping, a stock LLaVA keeps a random tower).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    def rename(key: str) -> str:
        if nested and key.startswith(_CLIP_TOWER) and not key.startswith(_NESTED_CLIP_TOWER):
            return _NESTED_CLIP_TOWER + key[len(_CLIP_TOWER) :]
        if not nested and key.startswith(_NESTED_CLIP_TOWER):
            return _CLIP_TOWER + key[len(_NESTED_CLIP_TOWER) :]
        return key

    folder = Path(folder)
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    for name in sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]:
        with safe_open(folder / name, framework="pt") as weights:
            metadata, keys = weights.metadata(), list(weights.keys())
        if any(rename(key) != key for key in keys):
            tensors = load_file(folder / name)
            save_file({rename(key): tensor for key, tensor in tensors.items()}, folder / name, metadata=metadata)
    if index:
        index["weight_map"] = {rename(key): file for key, file in index["weight_map"].items()}
        index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def parse_overrides(pairs: list[str]) -> dict:
    """`["key=json", ...]` -> dict; a value that is not JSON is taken as a plain string."""
    overrides = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConversionError(f"bad --set {pair!r}: expected KEY=VALUE")
        try:
            overrides[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key.strip()] = raw
    return overrides


def convert(
    base: str,
    method: str,
    output,
    overrides: dict | None = None,
    overwrite: bool = False,
    seed: int = 0,
    revision: str | None = None,
    progress: bool = True,
    from_format: str | None = None,
    vision_tower: str | None = None,
    processor: str | None = None,
    preset: str | None = None,
    head_mask: str | None = None,
) -> Path:
    """
    Convert the LLaVA checkpoint `base` (local folder or Hub id) into `method` and write it to `output`.

    `base` is a llava-hf checkpoint, or one in the original LLaVA-repo layout (plain LLaVA-1.5 / 1.6, or a method's
    released checkpoint), detected from its config or given by `from_format`; `vision_tower` supplies the CLIP
    weights original LLaVA checkpoints lack; `processor` (a llava-hf folder or Hub id) supplies the processor and
    tokenizer files instead of the source's. For YOPO, `preset` ("12%" or "25%") sets the pruning to one of the
    paper's budgets and `head_mask` (a `.npy` of booleans [layers, heads], as the YOPO repository ships, or a `.json`
    list of lists) gives `vision_head_mask`. Settings: `overrides` win over the preset, which wins over the settings
    found in a released checkpoint. Returns the output folder. Raises `ConversionError` on bad input, leaving `output`
    untouched.
    """
    from transformers import AutoConfig

    def step(message):
        if progress:
            print(f"[convert] {message}", file=sys.stderr, flush=True)

    if method not in METHODS:
        raise ConversionError(f"unknown method {method!r}; choose one of: {', '.join(METHODS)}")
    spec = METHODS[method]
    output = _output_path(
        output, {"--base": base, "--vision-tower": vision_tower, "--processor": processor, "--head-mask": head_mask}
    )
    overrides = dict(overrides or {})
    if (preset is not None or head_mask is not None) and method != "yopo":
        raise ConversionError("--preset and --head-mask are YOPO settings; use them with --method yopo")
    if head_mask is not None:
        overrides = {"vision_head_mask": _read_head_mask(head_mask), **overrides}
    known_fields = set(config_fields(spec.config_class))
    unknown = sorted(set(overrides) - known_fields)
    if unknown:
        raise ConversionError(f"unknown setting(s) for {method}: {', '.join(unknown)}")

    step(f"reading the base config from {base}")
    source_format = from_format or detect_format(_read_config_dict(base, revision)) or "llava-hf"
    if source_format not in SOURCE_FORMATS:
        raise ConversionError(f"unknown source format {source_format!r}; choose one of: {', '.join(SOURCE_FORMATS)}")

    try:
        # From here on only this conversion writes to `output` (a second one waits with --overwrite, else fails).
        claim = claim_output(output, wait=overwrite, report=step)
    except OutputBusy as busy:
        raise ConversionError(
            f"{output} is being written by another conversion ({busy.owner}); pass --overwrite to replace its "
            "result once it is done"
        ) from None
    except OSError as error:
        raise ConversionError(f"cannot write into {output.parent}: {error.strerror or error}") from None
    with claim as work:
        if os.path.lexists(output) and not output.is_dir():
            raise ConversionError(f"output {output} exists and is not a folder")
        if output.is_dir() and any(output.iterdir()) and not overwrite:
            raise ConversionError(f"output folder {output} is not empty; pass --overwrite to replace it")
        weights_source, processor_source, source_settings = base, base, {}
        if source_format == "llava-hf":
            try:
                base_config = AutoConfig.from_pretrained(base, revision=revision, trust_remote_code=False)
            except (OSError, ValueError) as error:
                raise ConversionError(f"cannot read a LLaVA config from {base!r}: {_first_line(error)}") from None
        else:
            step(f"reading the {source_format} checkpoint and renaming its tensors")
            checkpoint = _read_original(base, revision, source_format, vision_tower, seed)
            if checkpoint.method not in (None, method):
                raise ConversionError(
                    f"{base} is a {checkpoint.method} checkpoint; convert it with --method {checkpoint.method}"
                )
            for name in checkpoint.ignored:
                step(f"  not used: {name}")
            base_config, source_settings = checkpoint.base_config, checkpoint.settings
            # Written under the models' runtime names, then loaded like any checkpoint (memory-efficient loading).
            from huggingface_hub import save_torch_state_dict

            save_torch_state_dict(checkpoint.tensors, work.source, max_shard_size="5GB")
            checkpoint.tensors.clear()
            _write_generation_config(base, revision, checkpoint.base_config, work.source)
            weights_source, processor_source, revision = work.source, None, None
            if processor is None:
                step("  the original tokenizer lacks <image>: pass --processor with the matching llava-hf model")
        preset_fields = {}
        if preset is not None:
            try:
                preset_fields = preset_settings(preset, base_config.get_text_config().num_hidden_layers)
            except ValueError as error:
                raise ConversionError(str(error)) from None
        # What the user asks for wins: --set over --preset over the settings found in the source checkpoint.
        settings = {**source_settings, **preset_fields, **overrides}
        if method == "yopo" and settings.get("vision_head_mask") is None:
            step("  every head keeps working on vision tokens: give --head-mask or run conversion/calibrate_yopo.py")
        try:
            config = spec.config_class.from_base_config(base_config, **settings)
        except (ValueError, TypeError) as error:
            raise ConversionError(_first_line(error)) from None
        _check_image_token_index(config)
        processor_revision = None if processor else revision
        processor_source = processor or processor_source
        if processor_source is not None:
            # Checked before the weights are read, so that a wrong processor fails fast.
            _copy_processor_files(processor_source, processor_revision, work.processor)
            _check_processor_files(work.processor, config, "--processor " + processor if processor else base)
        step(f"loading the base weights into {spec.model_class.__name__}")
        brings_new_modules = source_format != "llava-hf" and checkpoint.method == method
        model = _load_weights(spec, weights_source, config, revision, base, brings_new_modules)
        if not brings_new_modules:
            _initialise_new_modules(model, seed)
        shutil.rmtree(work.source, ignore_errors=True)  # loaded: free its disk space before writing the result

        step(f"writing weights, config and code to {work.path.name} next to {output}")
        model.config.auto_map = {
            "AutoConfig": f"{spec.config_class.__module__.rsplit('.', 1)[-1]}.{spec.config_class.__name__}",
            "AutoModelForImageTextToText": f"{spec.modeling_module}.{spec.model_class.__name__}",
            "AutoModelForVision2Seq": f"{spec.modeling_module}.{spec.model_class.__name__}",
        }
        model.save_pretrained(work.staging, max_shard_size="5GB")
        set_clip_tower_layout(work.staging, nested=True)
        for code_file in hub_code_files(spec.modeling_module):
            shutil.copy2(code_file, work.staging / code_file.name)
        for path in work.processor.iterdir():
            shutil.copy2(path, work.staging / path.name)
        _write_model_card(spec, base, config, work.staging)
        _give_ordinary_file_modes(work.staging)
        step(f"moving the result into {output}")
        work.install()
    step("done")
    return output


def _output_path(output, inputs: dict) -> Path:
    """The output folder as an absolute path, refused where replacing it would pull the floor from under something."""
    given = str(output)
    output = Path(os.path.abspath(output))  # "." and ".." resolved, symlinks kept (a link is replaced, not its target)
    if output == Path(output.anchor):
        raise ConversionError(f"--output {given} is the root of the filesystem; give a folder to create")
    cwd = Path.cwd()
    if output == cwd or output in cwd.parents:
        raise ConversionError(
            f"--output {given} is the current folder or one of its parents; give a new folder, e.g. --output "
            f"{Path(given) / 'converted-model'}"
        )
    real_output = Path(os.path.realpath(output))
    for flag, value in inputs.items():
        if value is not None and os.path.exists(value):
            real_input = Path(os.path.realpath(value))
            if real_input == real_output or real_output in real_input.parents:
                raise ConversionError(
                    f"--output {given} is or holds the input {flag} {value}; write the result elsewhere"
                )
    return output


def _read_config_dict(base: str, revision: str | None) -> dict:
    """The source's config.json as a dict (local folder, or Hub id through huggingface_hub's cache)."""
    try:
        if Path(base).is_dir():
            path = Path(base) / "config.json"
        else:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(base, "config.json", revision=revision))
        return json.loads(path.read_text())
    except Exception as error:  # missing folder or file, offline cache miss, bad JSON: all one message
        raise ConversionError(f"cannot read a LLaVA config from {base!r}: {_first_line(error)}") from None


def _read_head_mask(path: str) -> list[list[bool]]:
    """A YOPO head mask, `[layers, heads]` booleans (True = the head keeps working on vision tokens)."""
    try:
        if path.endswith(".npy"):
            import numpy

            mask = numpy.load(path).tolist()
        else:
            mask = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConversionError(f"cannot read the head mask {path!r}: {_first_line(error)}") from None
    if not isinstance(mask, list) or not all(isinstance(row, list) for row in mask):
        raise ConversionError(f"the head mask {path!r} must be a 2-D array [layers, heads]")
    return [[bool(value) for value in row] for row in mask]


def _write_generation_config(base, revision, base_config, destination: Path) -> None:
    """The source's generation config with the added pad token, or one made from the base config."""
    from transformers import GenerationConfig

    try:
        generation_config = GenerationConfig.from_pretrained(base, revision=revision)
    except (OSError, TypeError, ValueError):
        text_config = base_config.get_text_config()
        generation_config = GenerationConfig(
            bos_token_id=text_config.bos_token_id, eos_token_id=text_config.eos_token_id
        )
    generation_config.pad_token_id = base_config.pad_token_id
    generation_config.save_pretrained(destination)


def _read_original(base, revision, source_format, vision_tower, seed):
    try:
        folder = Path(base)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(base, revision=revision))
        return read_original_checkpoint(folder, source_format, vision_tower, seed)
    except Exception as error:  # unreadable files, missing fields, odd values: all reported in one line
        raise ConversionError(f"cannot read the {source_format} checkpoint {base!r}: {_first_line(error)}") from None


def _load_weights(spec: Method, source, config, revision, base, brings_new_modules: bool):
    """Load `source` into the method's class; every parameter but the method's new ones must be in it."""
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    # The load report would list the method's new modules as missing; that is expected (and checked by the class).
    transformers_logging.set_verbosity_error()
    try:
        # use_kernels=False: the conversion only copies weights, and transformers 5.25+ would otherwise kernelize the
        # model by default, fetching and running code from the Hub.
        return spec.model_class.from_pretrained(
            source,
            config=config,
            revision=revision,
            new_modules_from_scratch=not brings_new_modules,
            use_kernels=False,
        )
    # RuntimeError: e.g. torch cannot read a truncated .bin; SafetensorError and UnpicklingError may come unwrapped.
    except (OSError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError) as error:
        raise ConversionError(
            f"{base} does not load as a {config.base_model_type} checkpoint: {_weights_problem(error)}"
        ) from None
    finally:
        transformers_logging.set_verbosity(verbosity)


def _weights_problem(error: BaseException) -> str:
    """What is wrong with a checkpoint's weight files, from the error transformers raised or the one it wrapped."""
    chain = [error]
    while len(chain) < 10 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for link in chain:
        if isinstance(link, SafetensorError):
            return f"a .safetensors file is truncated or corrupt ({_first_line(link)})"
        if isinstance(link, pickle.UnpicklingError):
            return (
                "its pickle (.bin) weights hold more than tensors, so they were refused without running them "
                f"({_first_line(link)})"
            )
    return _first_line(error)


def _initialise_new_modules(model, seed: int) -> None:
    """Initialise the method's new modules from `seed`, so a conversion is reproducible."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in model.new_module_names:
            model.get_submodule(name).apply(model._init_weights)


def _copy_processor_files(base: str, revision: str | None, destination: Path) -> None:
    source = Path(base)
    if not source.is_dir():
        from huggingface_hub import snapshot_download

        source = Path(snapshot_download(base, revision=revision, allow_patterns=PROCESSOR_FILES))
    for name in PROCESSOR_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, destination / name)
    _give_tokenizer_the_chat_template(destination)


def _give_tokenizer_the_chat_template(folder: Path) -> None:
    """
    Make the tokenizer carry the processor's chat template too. A llava-hf repo may keep it only in the processor's
    `chat_template.json`, which processors read and tokenizers do not; tools that template with the tokenizer
    (lmms-eval's LLaVA wrappers, for one) would then fall back to a format of their own.
    """
    tokenizer_config_file, legacy_template_file = folder / "tokenizer_config.json", folder / "chat_template.json"
    if not tokenizer_config_file.is_file() or (folder / "chat_template.jinja").is_file():
        return  # no tokenizer, or the template file both read
    tokenizer_config = json.loads(tokenizer_config_file.read_text())
    if tokenizer_config.get("chat_template") is not None or not legacy_template_file.is_file():
        return
    tokenizer_config["chat_template"] = json.loads(legacy_template_file.read_text())["chat_template"]
    tokenizer_config_file.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n")


def _check_image_token_index(config) -> None:
    vocab_size = config.get_text_config().vocab_size
    if not 0 <= config.image_token_id < vocab_size:
        raise ConversionError(
            f"image_token_index {config.image_token_id} is outside the language model's vocabulary (0..{vocab_size - 1})"
        )


# Processor files whose `auto_map` would make the converted folder's processor load custom code.
PROCESSOR_CONFIG_FILES = ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _check_processor_files(folder: Path, config, source: str) -> None:
    """
    The processor files copied into `folder` (from `source`) must need no custom code, and the tokenizer must map the
    processor's image token to the model's `image_token_index`. Nothing here runs code: an `auto_map` is refused
    before the tokenizer is read, and it is read with `trust_remote_code=False` (so never a prompt either).
    """
    from transformers import AutoTokenizer

    processor_fields = {}
    for name in PROCESSOR_CONFIG_FILES:
        if (folder / name).is_file():
            try:
                fields = json.loads((folder / name).read_text())
            except ValueError as error:
                raise ConversionError(f"{source}: {name} is not valid JSON ({error})") from None
            if isinstance(fields, dict) and "auto_map" in fields:
                raise ConversionError(
                    f"{source}: {name} has an auto_map (custom processor code), which a conversion neither runs nor "
                    "ships; use a llava-hf processor (--processor)"
                )
            if name == "processor_config.json" and isinstance(fields, dict):
                processor_fields = fields
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return  # no tokenizer to check against
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ConversionError(f"cannot read the tokenizer of {source}: {_first_line(error)}") from None
    image_token = processor_fields.get("image_token") or "<image>"
    token_id = tokenizer.convert_tokens_to_ids(image_token)
    if token_id is None or (token_id == tokenizer.unk_token_id and image_token != tokenizer.unk_token):
        raise ConversionError(f"the tokenizer of {source} has no image token {image_token!r}")
    if token_id != config.image_token_id:
        raise ConversionError(
            f"the tokenizer of {source} maps {image_token} to {token_id}, the model expects {config.image_token_id} "
            "(image_token_index)"
        )


def _give_ordinary_file_modes(folder: Path) -> None:
    """Give the files the mode a newly created file gets (some writers make theirs private, e.g. 0600 weights)."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            path.chmod(0o666 & ~umask)


def _write_model_card(spec: Method, base: str, config, destination: Path) -> None:
    template = sparse_llava.resource_folder("hub_cards") / spec.card_template
    settings = {field: getattr(config, field) for field in _method_fields(spec.config_class)}
    settings_text = "\n".join(f"- `{key}`: `{json.dumps(value)}`" for key, value in settings.items())
    card = template.read_text().format(
        base_model=base, settings=settings_text, base_model_type=config.base_model_type, license=_base_license(base)
    )
    (destination / "README.md").write_text(card)


def _base_license(base: str) -> str:
    """The license in the base model's card (the converted weights inherit it), or "other" when it has none."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(Path(base) / "README.md" if Path(base).is_dir() else base)
        return card.data.license or "other"
    except Exception:  # no card, offline cache without it, unparsable metadata
        return "other"


def _method_fields(config_class) -> list[str]:
    base_fields = set(config_fields(sparse_llava.SparseLlavaConfig))
    return [name for name in config_fields(config_class) if name not in base_fields]


def _first_line(error: BaseException) -> str:
    """The line of an error message that names the problem (usually the first)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's refusal of a pickle starts with advice; the reason is on the line of the weights-only unpickler.
    reason = next((line for line in lines if line.startswith("WeightsUnpickler error:")), None)
    if reason is not None:
        return reason.split(" Please use ")[0]  # the rest says how to allow it, which a conversion never does
    return lines[0] if lines else type(error).__name__


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a LLaVA-1.5 / LLaVA-NeXT checkpoint (llava-hf layout, original LLaVA-repo layout, or a "
        "method's released checkpoint) into a sparse-llava model folder."
    )
    parser.add_argument("--base", required=True, help="local folder or Hub repo id of the base checkpoint")
    parser.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    parser.add_argument("--output", required=True, help="folder to write (must be empty unless --overwrite)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field; VALUE is JSON (e.g. --set vision_keep_ratio=1.0)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for the method's new weights (default 0)")
    parser.add_argument("--revision", default=None, help="revision of a Hub base checkpoint")
    parser.add_argument(
        "--from-format",
        default=None,
        choices=SOURCE_FORMATS,
        help="layout of --base (default: detected from its config)",
    )
    parser.add_argument(
        "--vision-tower",
        default=None,
        help="CLIP checkpoint (folder or Hub id) for original LLaVA checkpoints, which lack the vision weights",
    )
    parser.add_argument(
        "--processor",
        default=None,
        help="llava-hf folder or Hub id whose processor/tokenizer files to ship (for original-layout sources)",
    )
    parser.add_argument("--preset", default=None, choices=list(PRESETS), help="YOPO: one of the paper's FLOPs budgets")
    parser.add_argument(
        "--head-mask",
        default=None,
        help="YOPO: vision head mask, a .npy [layers, heads] of booleans (as the YOPO repository ships) or .json",
    )
    args = parser.parse_args(argv)
    # SIGTERM (e.g. `kill`, a job scheduler) ends the conversion like Ctrl-C: through the clean-up of its work folder.
    previous_handler = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        convert(
            args.base,
            args.method,
            args.output,
            parse_overrides(args.overrides),
            args.overwrite,
            args.seed,
            args.revision,
            from_format=args.from_format,
            vision_tower=args.vision_tower,
            processor=args.processor,
            preset=args.preset,
            head_mask=args.head_mask,
        )
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a full disk while writing: the work folder is already removed
        print(f"error: {_first_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    return 0


def _exit_on_sigterm(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
