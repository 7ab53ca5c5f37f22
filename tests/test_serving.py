"""`sparse-llava serve`: transformers' own server answers chat completions with images, as `generate` does."""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request

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
    port = free_port()
    command = [sys.executable, "-m", "sparse_llava.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--device", "cpu"]  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENVIRONMENT)
    try:
        wait_until_up(server, f"http://127.0.0.1:{port}/health")
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        for name, folder in folders.items():
            expected = generate_answer(folder, image)
            assert expected.strip(), f"{name} answers nothing: the comparison would be empty"
            answer = json.loads(post(url, chat_request(image, stream=False, model=folder)))
            assert answer["choices"][0]["message"]["content"] == expected, name
            assert answer["usage"]["completion_tokens"] <= NEW_TOKENS
            if name == "dynamic-llava":
                assert streamed_text(post(url, chat_request(image, stream=True, model=folder))) == expected
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_unknown_command_is_refused():
    from sparse_llava.cli import main

    with pytest.raises(SystemExit, match="unknown command 'serves'"):
        main(["serves"])
