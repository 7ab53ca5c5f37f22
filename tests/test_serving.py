"""`sparse-llava serve`: transformers' own server answers chat completions with images, as `generate` does."""

import base64
import contextlib
import functools
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import random_images
from transformers import AutoModelForImageTextToText, AutoProcessor

from sparse_llava.compat_transformers import IS_TRANSFORMERS_V5

if not IS_TRANSFORMERS_V5:
    pytest.skip("sparse-llava serve runs transformers 5.x's server", allow_module_level=True)
for module in ("fastapi", "uvicorn", "openai"):
    pytest.importorskip(module, reason="sparse-llava serve needs the serve extra")

QUESTION = "What is in the image ?"
NEW_TOKENS = 6
ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def test_serve_hooks_still_fit_transformers(converted):
    """
    The private pieces of transformers' server that `make_classes_known_to_serve` relies on: its model manager (from
    5.25 on, its model loader, in a process the server spawns) builds the class from the config's architecture, and
    the modality is told from class names. Run in a fresh process, since the hooks change transformers' module state.
    """
    folder = converted("llava")
    script = textwrap.dedent(
        f"""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        from transformers.cli.serving import model_manager
        from sparse_llava.serving import make_classes_known_to_serve

        make_classes_known_to_serve()
        if hasattr(model_manager, "ModelLoader"):  # transformers >= 5.25
            # As `transformers serve` builds its loader, and as its model's process loads: spawned, from a pickle.
            loader = model_manager.ModelLoader(device="cpu")
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                model, processor = pool.submit(loader.load_model_and_processor, {str(folder)!r}).result()
            modality = loader.get_model_modality(model.config, processor)
        else:
            manager = model_manager.ModelManager(device="cpu")
            model = manager._load_model(manager.process_model_name({str(folder)!r}))
            processor = manager._load_processor(manager.process_model_name({str(folder)!r}))
            modality = manager.get_model_modality(model, processor)
        print(type(model).__name__, modality.name)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENVIRONMENT)
    assert result.returncode == 0, (
        "transformers' serve internals changed (sparse_llava/serving.py hooks getattr(transformers, architecture) in "
        "ModelManager._load_model, or from 5.25 ModelLoader._load_model in the model's spawned process, and "
        f"get_model_modality's class-name tables):\n{result.stderr[-3000:]}"
    )
    assert result.stdout.split()[-2:] == ["DynamicLlavaForConditionalGeneration", "VLM"]


def test_request_check_hooks_still_fit_transformers(converted, tmp_path):
    """
    The private pieces of transformers' server that the request checks rely on (see sparse_llava/serving.py):
    `Serve.run` builds its handlers from the module attributes `check_requests_in_serve` replaces, the handlers'
    `_validate_request` and `render_messages` see each request before the model does, and a model the server cannot
    read goes through its loader's `load_config`. Run in a fresh process, since the hooks change transformers' module
    state.
    """
    folder = converted("llava")
    script = textwrap.dedent(
        f"""
        import inspect

        from fastapi import HTTPException
        from transformers.cli.serve import Serve
        from transformers.cli.serving import chat_completion, response, systemone
        from transformers.cli.serving.model_manager import ModelManager
        from transformers.cli.serving.utils import GenerationState

        from sparse_llava import serving

        serving.make_classes_known_to_serve()
        serving.check_requests_in_serve(None)
        run = inspect.getsource(Serve.run)
        assert "from .serving.chat_completion import ChatCompletionHandler" in run, "Serve.run's chat handler"
        assert "from .serving.response import ResponseHandler" in run, "Serve.run's Responses handler"
        assert chat_completion.ChatCompletionHandler is serving.SparseLlavaChatCompletionHandler
        assert response.ResponseHandler is serving.SparseLlavaResponseHandler
        assert "from .serving.systemone import SystemOneHandler" in run, "Serve.run's System One handler"
        assert systemone.SystemOneHandler is serving.SparseLlavaSystemOneHandler

        manager = ModelManager(serving.SparseLlavaModelLoader(device="cpu"))
        try:
            manager.get_engine({str(tmp_path / "missing")!r})
            raise AssertionError("get_engine read a missing model")
        except serving.ModelNotFoundError:
            pass
        engine = manager.get_engine({str(folder)!r})
        handler = chat_completion.ChatCompletionHandler(model_manager=manager, generation_state=GenerationState())
        good = {{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "Hi"}}]}}], "max_tokens": 4}}
        handler._validate_request(good)
        inputs = handler.render_messages(engine, good["messages"], good)
        refusals = []
        for body in ({{}}, {{**good, "max_tokens": 10**9}}):
            try:
                handler._validate_request(body)
                handler.render_messages(engine, body["messages"], body)
            except HTTPException as refusal:
                refusals.append(refusal.status_code)
        print(inputs["input_ids"].shape[0], refusals)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=ENVIRONMENT)
    assert result.returncode == 0, (
        "transformers' serve internals changed (sparse_llava/serving.py hooks the handler classes Serve.run builds, "
        "BaseHandler._validate_request and render_messages, GenerationState.context_length, prompt_length, and "
        f"ModelLoader.load_config as ModelManager.get_engine calls it):\n{result.stderr[-3000:]}"
    )
    assert result.stdout.split("\n")[-2] == "1 [422, 400]"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> bytes:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def wait_until_up(server: subprocess.Popen, url: str, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited with {server.returncode}:\n{server.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.5)
    raise AssertionError(f"the server did not answer {url} within {seconds} s")


@contextlib.contextmanager
def running_servers(*arguments_of_each: list[str]):
    """`sparse-llava serve` on 127.0.0.1 and the CPU, one server per argument list, started side by side: yields
    their base URLs."""
    servers, base_urls = [], []
    try:
        for arguments in arguments_of_each:
            port = free_port()
            command = [sys.executable, "-m", "sparse_llava.cli", "serve", *arguments, "--host", "127.0.0.1",
                       "--port", str(port), "--device", "cpu"]  # fmt: skip
            servers.append(
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT)
            )
            base_urls.append(f"http://127.0.0.1:{port}")
        for server, base_url in zip(servers, base_urls, strict=True):
            wait_until_up(server, f"{base_url}/health")
        yield base_urls
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def data_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_request(image, stream: bool, model: str | None = None) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(image)}}, {"type": "text", "text": QUESTION}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS, "temperature": 0}
    return {**body, "stream": stream, **({"model": model} if model else {})}


def streamed_text(raw: bytes) -> str:
    pieces = []
    for line in raw.decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            pieces += [choice["delta"].get("content") or "" for choice in chunk["choices"]]
    return "".join(pieces)


def generate_answer(folder, image) -> str:
    """The reference: `model.generate` (greedy) on the prompt the folder's chat template makes of the same turn."""
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)[0, inputs["input_ids"].shape[1] :]
    return processor.decode(tokens, skip_special_tokens=True)


def test_served_models_answer_as_generate(converted, converted_pmod, base_checkpoints):
    """One server, not pinned to a model: a Dynamic-LLaVA, a p-MoD LLaVA-NeXT and the dense base, each by name."""
    folders = {
        "dynamic-llava": str(converted("llava")),
        "p-mod-next": str(converted_pmod("llava_next")),
        "dense": str(base_checkpoints[("llava", "hub")][0]),
    }
    (image,) = random_images(1, seed=6, size=(16, 12))
    with running_servers([]) as (base_url,):
        url = f"{base_url}/v1/chat/completions"
        for name, folder in folders.items():
            expected = generate_answer(folder, image)
            assert expected.strip(), f"{name} answers nothing: the comparison would be empty"
            answer = json.loads(post(url, chat_request(image, stream=False, model=folder)))
            assert answer["choices"][0]["message"]["content"] == expected, name
            assert answer["usage"]["completion_tokens"] <= NEW_TOKENS
            if name == "dynamic-llava":
                assert streamed_text(post(url, chat_request(image, stream=True, model=folder))) == expected


def test_unknown_command_is_refused():
    from sparse_llava.cli import main

    with pytest.raises(SystemExit, match="unknown command 'serves'"):
        main(["serves"])


def image_request(image_url: str, model: str | None = None, **fields) -> dict:
    """A plain chat request asking about the image at `image_url`, with `fields` added or replacing the defaults."""
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": QUESTION}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": NEW_TOKENS, "temperature": 0}
    return {**body, **({"model": model} if model else {}), **fields}


def status_and_body(url: str, body: dict) -> tuple[int, dict]:
    """The answer to `body`, as its HTTP status and its JSON, a 4xx included."""
    try:
        return 200, json.loads(post(url, body))
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def answer_text(url: str, body: dict) -> str:
    status, answer = status_and_body(url, body)
    assert status == 200, answer
    return answer["choices"][0]["message"]["content"]


def refusal(url: str, body: dict) -> tuple[int, str]:
    """A bad request's answer: a 4xx whose detail is one line."""
    status, answer = status_and_body(url, body)
    assert 400 <= status < 500, (status, answer)
    assert isinstance(answer["detail"], str) and "\n" not in answer["detail"], answer
    return status, answer["detail"]


@contextlib.contextmanager
def http_file_server(folder):
    """A plain HTTP server on 127.0.0.1 for the files of `folder`: yields its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        thread.join()


@pytest.fixture(scope="module")
def checked_servers(converted, tmp_path_factory):
    """
    Two servers: `open`, not pinned to a model and without an image folder, and `folder`, pinned to a converted
    Dynamic-LLaVA and serving local images from `images` (an image, a text file, and a link to an image outside it).
    """
    model_folder = str(converted("llava"))
    root = tmp_path_factory.mktemp("serving")
    images, outside = root / "images", root / "outside"
    images.mkdir()
    outside.mkdir()
    image, other_image = random_images(2, seed=7, size=(16, 12))
    image.save(images / "inside.png")
    other_image.save(outside / "outside.png")
    (images / "notes.txt").write_text("not an image")
    (images / "link.png").symlink_to(outside / "outside.png")
    with running_servers([], [model_folder, "--image-folder", str(images)]) as (open_url, folder_url):
        yield {
            "open": f"{open_url}/v1/chat/completions",
            "folder": f"{folder_url}/v1/chat/completions",
            "model": model_folder,
            "images": images,
            "outside": outside,
            "image": image,
            "expected": answer_text(f"{open_url}/v1/chat/completions", image_request(data_url(image), model_folder)),
        }


def still_serving(url: str, servers: dict, model: str | None = None) -> None:
    """After a bad request, the server still answers a good one, as it did before."""
    assert answer_text(url, image_request(data_url(servers["image"]), model)) == servers["expected"]


def test_local_image_paths_are_refused_without_an_image_folder(checked_servers):
    """Without --image-folder, an image path on the server's disk is never read; http(s) and data: URLs are."""
    url, model, images = checked_servers["open"], checked_servers["model"], checked_servers["images"]
    for path in (images / "inside.png", images / "notes.txt", images / "missing.png"):
        assert refusal(url, image_request(str(path), model)) == (
            400,
            f"image_url {str(path)!r} is not an http(s) or data: URL: send the image as one (this server reads no "
            "local files unless it is started with --image-folder DIR)",
        )
        still_serving(url, checked_servers, model)
    # The Responses API takes images through the same check
    responses_url = url.replace("/chat/completions", "/responses")
    content = [{"type": "input_image", "image_url": str(images / "inside.png")}, {"type": "input_text", "text": "Hi"}]
    body = {"model": model, "input": [{"role": "user", "content": content}], "max_output_tokens": NEW_TOKENS}
    assert "is not an http(s) or data: URL" in refusal(responses_url, body)[1]
    # An http URL is fetched (from a server on 127.0.0.1 here): the same image answers as its data: URL
    with http_file_server(images) as file_server:
        answer = answer_text(url, image_request(f"{file_server}/inside.png", model))
    assert answer == answer_text(url, image_request(data_url(checked_servers["image"]), model))


def test_image_folder_serves_its_images_and_nothing_else(checked_servers):
    """With --image-folder, an image inside it is read (as by path, relative or absolute); a path leading outside it
    (by `..`, absolutely, or by a symbolic link), a missing file and a file that is no image get the same refusal."""
    url, images, outside = checked_servers["folder"], checked_servers["images"], checked_servers["outside"]
    expected = answer_text(url, image_request(data_url(checked_servers["image"])))
    assert answer_text(url, image_request("inside.png")) == expected
    assert answer_text(url, image_request(str(images / "inside.png"))) == expected
    refused_paths = [
        "../outside/outside.png", str(outside / "outside.png"), "link.png", "missing.png", "notes.txt", ".",
    ]  # fmt: skip
    refusals = set()
    for path in refused_paths:
        status, detail = refusal(url, image_request(path))
        refusals.add((status, detail.replace(repr(path), "PATH")))
        still_serving(url, checked_servers)
    assert refusals == {
        (
            400,
            "image_url PATH is not an image file in the server's image folder: give the path of one inside it, or send "
            "the image as an http(s) or data: URL",
        )
    }


def test_http_and_data_urls_pass_the_image_check(tmp_path):
    """http(s) and data: URLs reach transformers' loader as they are (which fetches or decodes them), with an image
    folder or without; a local path reaches it only as the data: URL of an image inside the folder."""
    from sparse_llava.serving import checked_image_url

    (image,) = random_images(1, seed=3)
    image.save(tmp_path / "image.png")
    for url in ("http://example.com/a.png", "https://example.com/a.png", data_url(image)):
        assert checked_image_url(url, None) == url
        assert checked_image_url(url, tmp_path) == url
    assert checked_image_url("image.png", tmp_path) == data_url(image)


BAD_REQUESTS = {  # the fields a good request gets (None: drops it), the status and a part of the detail expected
    "no messages": ({"messages": None}, 422, "the request has no `messages`: send a list of chat messages"),
    "empty messages": ({"messages": []}, 422, "the request has no `messages`"),
    "a message without role": ({"messages": [{"content": "Hi"}]}, 422, "has no `role`: give each message one"),
    "a missing model": ({"model": "/nonexistent/model"}, 400, "cannot be read: name a model folder with a config"),
    "max_tokens past the context": ({"max_tokens": 10**9}, 400, "`max_tokens` is 1000000000, but the model's context"),
    "max_completion_tokens past it": ({"max_completion_tokens": 5000}, 400, "`max_completion_tokens` is 5000, but"),
    "streaming past it": ({"max_tokens": 10**9, "stream": True}, 400, "ask for at most"),
    "max_tokens not a number": ({"max_tokens": "many"}, 422, "`max_tokens` is 'many': give a positive whole number"),
}


def bad_request(servers: dict, fields: dict) -> dict:
    good = image_request(data_url(servers["image"]), servers["model"])
    return {name: value for name, value in {**good, **fields}.items() if value is not None}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_one_line_and_the_server_goes_on(checked_servers, case):
    fields, expected_status, expected_text = BAD_REQUESTS[case]
    status, detail = refusal(checked_servers["open"], bad_request(checked_servers, fields))
    assert status == expected_status and expected_text in detail, (status, detail)
    still_serving(checked_servers["open"], checked_servers, checked_servers["model"])


def test_systemone_takes_no_assets(checked_servers):
    """/v1/systemone hands an asset's data to transformers' image loader, which opens a string that is not base64 as a
    path: assets are refused, whatever they hold."""
    url = checked_servers["open"].replace("/v1/chat/completions", "/v1/systemone")
    body = {
        "model": checked_servers["model"],
        "state": "<img>",
        "questions": {"q": {"type": "yes_no", "question": "Is it red?"}},
        "assets": {"<img>": {"data_base64": str(checked_servers["images"] / "inside.png")}},
    }
    status, detail = refusal(url, body)
    assert (status, detail) == (
        422,
        "sparse-llava serve takes no `assets` on /v1/systemone: send images to /v1/chat/completions (http(s) or "
        "data: URLs)",
    )
    still_serving(checked_servers["open"], checked_servers, checked_servers["model"])


def test_unreadable_models_get_the_same_refusal(checked_servers, tmp_path):
    """A missing folder and a folder without config.json are alike to a client: nothing tells which exists."""
    for model in (tmp_path / "missing", tmp_path):
        assert refusal(checked_servers["open"], bad_request(checked_servers, {"model": str(model)})) == (
            400,
            "the model cannot be read: name a model folder with a config.json, or a Hub model id",
        )


def test_max_tokens_are_checked_against_what_the_context_leaves(checked_servers):
    """The refusal names the context (the folder's max_position_embeddings) and what the prompt (as the folder's
    processor makes it of the same turn) leaves of it."""
    folder = checked_servers["model"]
    context = json.loads((Path(folder) / "config.json").read_text())["text_config"]["max_position_embeddings"]
    processor = AutoProcessor.from_pretrained(folder)
    content = [{"type": "image", "image": checked_servers["image"]}, {"type": "text", "text": QUESTION}]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    room = context - len(prompt[0] if isinstance(prompt[0], list) else prompt)
    assert 0 < room < context
    for asked in (room + 1, 10**6):
        assert refusal(checked_servers["open"], bad_request(checked_servers, {"max_tokens": asked})) == (
            400,
            f"`max_tokens` is {asked}, but the model's context of {context} tokens leaves {room} after the prompt's "
            f"{context - room}: ask for at most {room}",
        )
    still_serving(checked_servers["open"], checked_servers, folder)


def test_command_line_mistakes_end_in_one_line(tmp_path):
    """A missing model folder, one without config.json, a missing image folder and several API servers (which would
    start without the request checks) end `sparse-llava serve` before it serves, with one line and no traceback."""
    missing, images = tmp_path / "missing", tmp_path / "images"
    images.mkdir()
    cases = {
        (str(missing),): f"sparse-llava serve: {missing} is neither a model folder nor a Hub model that can be read",
        (str(tmp_path),): f"sparse-llava serve: the folder {tmp_path} has no config.json: give a folder written by",
        ("--image-folder", str(missing)): f"sparse-llava serve: --image-folder {missing} is not a folder: give one",
        ("--api-server-count", "2"): "sparse-llava serve runs one API server: drop --api-server-count",
    }
    for arguments, expected in cases.items():
        command = [sys.executable, "-m", "sparse_llava.cli", "serve", *arguments, "--host", "127.0.0.1",
                   "--port", str(free_port()), "--device", "cpu"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, env=ENVIRONMENT, timeout=300)
        assert result.returncode == 1, (arguments, result.stdout[-2000:], result.stderr[-2000:])
        assert "Traceback" not in result.stderr, result.stderr[-3000:]
        assert result.stderr.strip().splitlines()[-1].startswith(expected), result.stderr[-3000:]
