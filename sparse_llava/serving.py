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
    process starts from a fresh `transformers`), and whose `load_config` turns a model that cannot be read (the
    command line's, or a request's) into `ModelNotFoundError`, a `ValueError`, which the server answers with a 400.

Requests are checked before they reach a model (`RequestChecks`), with more private hooks (transformers 5.25):
`Serve.run` builds its handlers from the attributes `serving.chat_completion.ChatCompletionHandler` and
`serving.response.ResponseHandler` (and `serving.systemone.SystemOneHandler`, which refuses assets: its image loader
would open a client's string as a path) when it runs, which become subclasses overriding two methods of their base
`serving.utils.BaseHandler`: `_validate_request(body)` (a chat request needs `messages`) and
`render_messages(engine, messages, body)`, where each image, video and audio source is checked before transformers'
processor loads it, and the answer's length (`max_tokens`, `max_completion_tokens`, `max_output_tokens`) against the
model's context, with `GenerationState.context_length(config)` and `serving.utils.prompt_length(inputs)`. The server
itself loads images from http(s) URLs, `data:` URLs and any local path (`transformers.image_utils.load_image`), so a
client could read the server's files: here a local path is only taken inside the folder of `--image-folder DIR`,
read by us and handed on as a `data:` URL. `--api-server-count` is refused: its API servers are processes spawned
from a fresh transformers, without these hooks.

The served model runs this installed package's code (not a copy the folder carries, so `--trust-remote-code` is not
needed). Everything else is transformers' server as it is: its flags (`--host`, `--port`, `--device`, `--dtype`, ...),
its endpoints (`/v1/chat/completions`, plain and streaming, with images as http(s) URLs or base64 `data:` URLs, or
paths inside `--image-folder DIR`), the folder's chat template. Requires `pip install 'sparse-llava[serve]'`
(transformers' `serving` extra) and transformers 5.25 or later.
"""

import argparse
import base64
import io
import os
import sys
from pathlib import Path

import transformers

import sparse_llava

from .compat_transformers import IS_TRANSFORMERS_V5

MODEL_CLASSES = {
    sparse_llava.DynamicLlavaConfig.model_type: sparse_llava.DynamicLlavaForConditionalGeneration,
    sparse_llava.PMoDConfig.model_type: sparse_llava.PMoDLlavaForConditionalGeneration,
    sparse_llava.YopoConfig.model_type: sparse_llava.YopoLlavaForConditionalGeneration,
}
# The URLs transformers' loaders fetch or decode themselves; anything else they would open as a local path
REMOTE_SOURCES = ("http://", "https://", "data:")


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


def check_requests_in_serve(image_folder: Path | None) -> None:
    """Make `transformers serve` check requests with `RequestChecks`, taking local images from `image_folder` only
    (see module doc)."""
    from transformers.cli.serving import chat_completion, response, systemone

    RequestChecks.image_folder = image_folder
    chat_completion.ChatCompletionHandler = SparseLlavaChatCompletionHandler
    response.ResponseHandler = SparseLlavaResponseHandler
    systemone.SystemOneHandler = SparseLlavaSystemOneHandler


def serve_is_available() -> bool:
    """Whether transformers' server and its serving extra are installed (transformers 5.x)."""
    if not IS_TRANSFORMERS_V5:
        return False
    from transformers.utils.import_utils import is_serve_available

    return is_serve_available()


class ModelNotFoundError(ValueError):
    """A model that cannot be read, named by a request or the command line (the server answers a ValueError with a
    400)."""


def bad_request(message: str, status_code: int = 400) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status_code=status_code, detail=message)


def shown(source: str) -> str:
    """`source` as a refusal quotes it: a data URL or a stray base64 image can be megabytes long."""
    return repr(source if len(source) <= 80 else source[:77] + "...")


def checked_image_url(url: str, image_folder: Path | None) -> str:
    """
    The image source transformers' loader may use for `url`: http(s) and `data:` URLs as they are; a local path only
    for an image file inside `image_folder`, read here and handed on as a `data:` URL, so that the loader never opens
    a path a client chose. Whatever is wrong with a local path (missing, not an image, outside the folder, a folder),
    the refusal is the same, so that it tells a client nothing about the server's files.
    """
    if url.startswith(REMOTE_SOURCES):
        return url
    if image_folder is None:
        raise bad_request(
            f"image_url {shown(url)} is not an http(s) or data: URL: send the image as one (this server reads no "
            "local files unless it is started with --image-folder DIR)"
        )
    from PIL import Image

    try:
        path = (image_folder / url).resolve()  # symlinks and `..` resolved, so that the check sees the real file
        if not path.is_relative_to(image_folder):
            raise PermissionError(path)
        image_bytes = path.read_bytes()
        with Image.open(io.BytesIO(image_bytes)) as image:
            image.verify()
            image_format = image.format.lower()
    except Exception as error:  # whatever the path or PIL's check of the bytes raises: one answer for all
        raise bad_request(
            f"image_url {shown(url)} is not an image file in the server's image folder: give the path of one inside "
            "it, or send the image as an http(s) or data: URL"
        ) from error
    return f"data:image/{image_format};base64," + base64.b64encode(image_bytes).decode()


def checked_content_part(part: dict, image_folder: Path | None) -> dict:
    """A message's content part, its media source checked (see `checked_image_url`) as transformers' handlers read
    it: `image_url` / `input_image` parts hold `{"url": ...}` or the URL itself, `video_url` / `audio_url` parts
    `{"url": ...}`."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise bad_request(f'content part {shown(str(part))} has no `type`: give each part one, e.g. "text"', 422)
    kind = part["type"]
    if kind in ("text", "input_text", "output_text") and not isinstance(part.get("text"), str):
        raise bad_request(f"a {kind!r} content part has no `text`: give its text as a string", 422)
    if kind in ("image_url", "input_image"):
        source = part.get("image_url")
        url = source.get("url") if isinstance(source, dict) else source
        if not isinstance(url, str):
            raise bad_request(f'an {kind!r} content part has no URL: give it as {{"image_url": {{"url": ...}}}}', 422)
        return {**part, "image_url": {"url": checked_image_url(url, image_folder)}}
    if kind in ("video_url", "audio_url"):
        source = part.get(kind)
        url = source.get("url") if isinstance(source, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise bad_request(f'a {kind!r} content part needs an http(s) URL: give it as {{"{kind}": {{"url": ...}}}}')
    if kind == "input_audio":  # its data would be opened as a path by the audio loader when it is one
        raise bad_request("input_audio content parts are not taken: give the audio as an http(s) `audio_url`")
    return part


SparseLlavaModelLoader = None
RequestChecks = SparseLlavaChatCompletionHandler = SparseLlavaResponseHandler = SparseLlavaSystemOneHandler = None
if serve_is_available():
    from transformers.cli.serving import model_manager as _serve_model_manager

    if hasattr(_serve_model_manager, "ModelLoader"):  # transformers >= 5.25: models load in spawned processes
        from transformers.cli.serving.chat_completion import ChatCompletionHandler
        from transformers.cli.serving.response import ResponseHandler
        from transformers.cli.serving.systemone import SystemOneHandler
        from transformers.cli.serving.utils import prompt_length

        class SparseLlavaModelLoader(_serve_model_manager.ModelLoader):
            """transformers serve's model loader, which makes the sparse-llava classes known in the model's process
            before it loads the model, and names a model it cannot read (see module doc)."""

            def _load_model(self, *args, **kwargs):
                make_classes_known_to_serve()
                return super()._load_model(*args, **kwargs)

            def load_config(self, model_id: str):
                try:
                    return super().load_config(model_id)
                # No such folder or Hub model (OSError), a folder without a config.json that names a model type
                # (ValueError): alike to clients, and unnamed, as `model_id` is `<path>@main` for a missing path only
                except (OSError, ValueError) as error:
                    raise ModelNotFoundError(
                        "the model cannot be read: name a model folder with a config.json, or a Hub model id"
                    ) from error

        class RequestChecks:
            """
            What `transformers serve`'s chat-completion and Responses handlers check of a request before a model sees
            it, as one line and a 4xx: the sources of its media (see `checked_image_url`), and the answer's length
            asked for (`max_tokens_fields`, those of the handler's API) against what the model's context leaves.
            """

            image_folder: Path | None = None  # set by `serve` (--image-folder), resolved
            max_tokens_fields: tuple[str, ...] = ()

            def render_messages(self, engine, messages: list[dict], body: dict) -> dict:
                """transformers' `render_messages` (the processor's chat template, which loads the media), with the
                media sources checked before and the answer's length after, once the prompt's is known."""
                messages = [self._checked_message(message) for message in messages]
                inputs = super().render_messages(engine, messages, body)
                self._check_answer_length(engine, inputs, body)
                return inputs

            def _checked_message(self, message: dict) -> dict:
                if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                    raise bad_request(
                        f'message {shown(str(message))} has no `role`: give each message one, e.g. "user"', 422
                    )
                content = message.get("content")
                if not isinstance(content, list):  # a string, or none (a tool call)
                    return message
                return {**message, "content": [checked_content_part(part, self.image_folder) for part in content]}

            def _check_answer_length(self, engine, inputs: dict, body: dict) -> None:
                context = self.generation_state.context_length(engine.model_config)
                room = None if context is None else context - prompt_length(inputs)
                for field in self.max_tokens_fields:
                    requested = body.get(field)
                    if requested is None:
                        continue
                    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
                        raise bad_request(f"`{field}` is {requested!r}: give a positive whole number of tokens", 422)
                    # With no room at all, transformers' own check refuses the prompt itself
                    if room is not None and room >= 1 and requested > room:
                        raise bad_request(
                            f"`{field}` is {requested}, but the model's context of {context} tokens leaves {room} "
                            f"after the prompt's {context - room}: ask for at most {room}"
                        )

        class SparseLlavaChatCompletionHandler(RequestChecks, ChatCompletionHandler):
            """transformers serve's `/v1/chat/completions` handler, with `RequestChecks`."""

            max_tokens_fields = ("max_completion_tokens", "max_tokens")

            def _validate_request(self, body: dict) -> None:
                super()._validate_request(body)
                if not isinstance(body.get("messages"), list) or not body["messages"]:
                    raise bad_request(
                        "the request has no `messages`: send a list of chat messages, e.g. "
                        '[{"role": "user", "content": "Hello"}]',
                        422,
                    )

        class SparseLlavaResponseHandler(RequestChecks, ResponseHandler):
            """transformers serve's `/v1/responses` handler, with `RequestChecks`."""

            max_tokens_fields = ("max_output_tokens",)

        class SparseLlavaSystemOneHandler(SystemOneHandler):
            """transformers serve's `/v1/systemone` handler, without images: its assets' data goes to transformers'
            image loader, which opens a string that is not base64 as a local path."""

            def _validate_request(self, body: dict):
                if isinstance(body, dict) and body.get("assets"):
                    raise bad_request(
                        "sparse-llava serve takes no `assets` on /v1/systemone: send images to /v1/chat/completions "
                        "(http(s) or data: URLs)",
                        422,
                    )
                return super()._validate_request(body)


def take_image_folder(arguments: list[str]) -> tuple[Path | None, list[str]]:
    """`--image-folder DIR`, ours, resolved, and the arguments left for `transformers serve`."""
    parser = argparse.ArgumentParser(prog="sparse-llava serve", add_help=False, allow_abbrev=False)
    parser.add_argument("--image-folder", help="serve local images from this folder only")
    options, serve_arguments = parser.parse_known_args(arguments)
    if options.image_folder is None:
        return None, serve_arguments
    if not os.path.isdir(options.image_folder):
        raise SystemExit(f"sparse-llava serve: --image-folder {options.image_folder} is not a folder: give one")
    return Path(options.image_folder).resolve(), serve_arguments


def check_command_line(serve_arguments: list[str]) -> str | None:
    """The model of the command line, if any, after refusing what cannot be served (see module doc)."""
    from transformers.cli.transformers import app

    # Read as `transformers serve` reads them, by its own (click) command; errors are left for it to report
    parameters = app.commands["serve"].make_context("serve", list(serve_arguments), resilient_parsing=True).params
    if (parameters.get("api_server_count") or 1) > 1:
        raise SystemExit(
            "sparse-llava serve runs one API server: drop --api-server-count (the extra API servers would start "
            "without the sparse-llava classes and request checks)"
        )
    model = parameters.get("force_model")
    if model is not None and os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        raise SystemExit(
            f"sparse-llava serve: the folder {model} has no config.json: give a folder written by sparse-llava-convert"
        )
    return model


def serve(arguments: list[str]) -> None:
    """
    Run `transformers serve` with `arguments`: serve's own, a model folder or Hub id first to pin the server to that
    model (without one, each request names its model, loaded on first use), and ours, `--image-folder DIR`.
    """
    if not IS_TRANSFORMERS_V5:
        raise SystemExit(
            f"sparse-llava serve runs transformers 5.x's server; this is transformers {transformers.__version__}"
        )
    if not serve_is_available():
        raise SystemExit("sparse-llava serve needs transformers' serving extra: pip install 'sparse-llava[serve]'")
    if RequestChecks is None:
        raise SystemExit(
            "sparse-llava serve checks requests with hooks into transformers 5.25's server: "
            "pip install 'transformers>=5.25'"
        )
    image_folder, serve_arguments = take_image_folder(arguments)
    model = check_command_line(serve_arguments)
    make_classes_known_to_serve()
    check_requests_in_serve(image_folder)
    from transformers.cli.transformers import app

    try:
        # The CLI's own entry point (`main`) would first look for a newer transformers release online.
        app(args=["serve", *serve_arguments], prog_name="sparse-llava", standalone_mode=True)
    except ModelNotFoundError as error:
        reason = str(error.__cause__).strip().splitlines()[0]
        raise SystemExit(
            f"sparse-llava serve: {model} is neither a model folder nor a Hub model that can be read ({reason}): "
            "give a folder written by sparse-llava-convert, or a Hub model id"
        ) from None


if __name__ == "__main__":
    serve(sys.argv[1:])
