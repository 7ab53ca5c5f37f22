"""Conversions that go wrong: killed, concurrent, bad files, code in the source; each fails in one line or recovers."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import SMALL_PREDICTOR
from safetensors.torch import load_file

from sparse_llava.convert_llava import ConversionError, convert
from sparse_llava.output_folder import OutputBusy, claim_output

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "conversion" / "convert_llava.py"
PREDICTOR = "image_score_predictor.down_mlp.1.weight"  # a Dynamic-LLaVA weight whose values come from --seed
SMALL = [f"--set={key}={value}" for key, value in SMALL_PREDICTOR.items()]

# Runs the CLI with a pause at a known point: the child touches `reached`, then waits until `go` exists.
PAUSED_CLI = """
import os, sys, time
from pathlib import Path

import sparse_llava.convert_llava as convert_llava
import sparse_llava.output_folder as output_folder

point, reached, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])


def pause():
    reached.touch()
    while not go.exists():
        time.sleep(0.05)


if point == "claimed":  # the output is claimed, nothing is read yet
    load_weights = convert_llava._load_weights
    convert_llava._load_weights = lambda *args: (pause(), load_weights(*args))[1]
elif point == "weights-written":  # the result is half-written in the work folder
    set_layout = convert_llava.set_clip_tower_layout
    convert_llava.set_clip_tower_layout = lambda *args, **kwargs: (set_layout(*args, **kwargs), pause())[0]
elif point == "between-renames":  # a replacement without an atomic swap: the old output is moved aside
    output_folder._exchange = lambda first, second: False
    rename = os.rename

    def rename_then_pause(source, destination):
        rename(source, destination)
        if Path(destination).name == "previous":
            pause()

    os.rename = rename_then_pause
sys.exit(convert_llava.main(sys.argv[4:]))
"""


def cli_env():
    return dict(os.environ, HF_HUB_OFFLINE="1")


def run_cli(*args, cwd=None, stdin=subprocess.DEVNULL, **kwargs):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=cwd,
        stdin=stdin,
        timeout=300,
        **kwargs,
    )


def assert_one_line_error(result, message: str, returncode: int = 2) -> str:
    """The CLI failed with `returncode` and exactly one `error:` line (containing `message`) and no traceback."""
    assert result.returncode == returncode, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.rstrip().endswith(errors[0])
    return errors[0]


class PausedConversion:
    """A conversion CLI in a subprocess, stopped at `point` (see PAUSED_CLI) until `resume()`."""

    def __init__(self, tmp_path: Path, point: str, *args, tag: str = "a"):
        script = tmp_path / "paused_cli.py"
        script.write_text(PAUSED_CLI)
        self.reached, self.go = tmp_path / f"{tag}.reached", tmp_path / f"{tag}.go"
        self.process = subprocess.Popen(
            [sys.executable, str(script), point, str(self.reached), str(self.go), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=cli_env(),
        )
        deadline = time.monotonic() + 180
        while not self.reached.exists():
            if self.process.poll() is not None:
                raise AssertionError(f"the conversion ended before {point}: {self.process.stderr.read()}")
            if time.monotonic() > deadline:
                self.process.kill()
                raise AssertionError(f"the conversion never reached {point}")
            time.sleep(0.05)

    def resume(self):
        self.go.touch()
        stdout, stderr = self.process.communicate(timeout=300)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)

    def kill(self):
        self.process.kill()  # SIGKILL: no clean-up code runs
        self.process.communicate(timeout=60)
        assert self.process.returncode == -9


def convert_args(base, output, *extra):
    return ["--base", str(base), "--method", "dynamic-llava", "--output", str(output), *SMALL, *extra]


def hidden_entries(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.name.startswith("."))


@pytest.fixture
def llava_base(base_checkpoints):
    return base_checkpoints[("llava", "hub")][0]


# --- killed conversions -----------------------------------------------------------------------------------------


def test_sigkill_mid_write_leaves_the_old_output_and_the_next_run_cleans_up(llava_base, tmp_path):
    output = tmp_path / "models" / "out"
    assert run_cli(*convert_args(llava_base, output)).returncode == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    paused = PausedConversion(
        tmp_path, "weights-written", *convert_args(llava_base, output, "--overwrite", "--seed", "1")
    )
    work = [name for name in hidden_entries(output.parent) if ".converting-" in name]
    assert len(work) == 1 and (output.parent / work[0] / "staging" / "model.safetensors").is_file()
    paused.kill()
    # Killed mid-write: the old output is untouched; its work folder (and the lock file) are left behind, named.
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert hidden_entries(output.parent) == sorted([".out.lock", work[0]])
    assert "killed" in (output.parent / work[0] / "README.txt").read_text()

    again = run_cli(*convert_args(llava_base, output, "--overwrite", "--seed", "1"))
    assert again.returncode == 0, again.stderr
    assert f"removed {work[0]}, left behind by a killed conversion to out" in again.stderr
    assert hidden_entries(output.parent) == [] and [path.name for path in output.parent.iterdir()] == ["out"]
    assert not torch.equal(load_file(output / "model.safetensors")[PREDICTOR], _predictor_of(before))


def test_sigkill_between_the_two_renames_of_a_replacement_loses_nothing(llava_base, tmp_path):
    """Without an atomic swap the old output is first moved aside; a kill right then leaves it in the work folder,
    and the next conversion to that output puts it back before anything else."""
    output = tmp_path / "out"
    assert run_cli(*convert_args(llava_base, output)).returncode == 0
    before = {path.name: path.read_bytes() for path in output.iterdir()}

    paused = PausedConversion(
        tmp_path, "between-renames", *convert_args(llava_base, output, "--overwrite", "--seed", "1")
    )
    paused.kill()
    assert not output.exists()
    (work,) = [path for path in tmp_path.iterdir() if ".converting-" in path.name]
    assert {path.name: path.read_bytes() for path in (work / "previous").iterdir()} == before

    # A conversion without --overwrite restores the old folder, then refuses to replace it.
    result = run_cli(*convert_args(llava_base, output))
    assert_one_line_error(result, "is not empty; pass --overwrite to replace it")
    assert f"restored {output}, which a killed conversion had moved aside" in result.stderr
    assert {path.name: path.read_bytes() for path in output.iterdir()} == before
    assert hidden_entries(tmp_path) == []


def test_sigterm_and_errors_clean_up_at_once(llava_base, tmp_path):
    paused = PausedConversion(tmp_path, "weights-written", *convert_args(llava_base, tmp_path / "out"))
    paused.process.terminate()  # SIGTERM
    stdout, stderr = paused.process.communicate(timeout=60)
    assert paused.process.returncode == 130 and stderr.rstrip().endswith("error: interrupted")
    assert "Traceback" not in stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([paused.reached.name, "paused_cli.py"])


# --- concurrent conversions -------------------------------------------------------------------------------------


def test_a_second_conversion_to_a_taken_output_refuses_or_waits(llava_base, tmp_path):
    output = tmp_path / "out"
    first = PausedConversion(tmp_path, "claimed", *convert_args(llava_base, output))
    refused = run_cli(*convert_args(llava_base, output))
    error = assert_one_line_error(refused, f"{output} is being written by another conversion (pid {first.process.pid}")
    assert "pass --overwrite to replace its result once it is done" in error

    # With --overwrite the second one waits for the first, then replaces its result.
    second = subprocess.Popen(
        [sys.executable, str(SCRIPT), *convert_args(llava_base, output, "--overwrite", "--seed", "1")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    deadline = time.monotonic() + 120
    waiting = ""
    while "waiting for the conversion" not in waiting and time.monotonic() < deadline:
        waiting += second.stderr.readline()
    assert f"waiting for the conversion (pid {first.process.pid}" in waiting and second.poll() is None
    assert first.resume().returncode == 0
    _, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    seed_1 = convert(str(llava_base), "dynamic-llava", tmp_path / "seed1", SMALL_PREDICTOR, seed=1, progress=False)
    assert torch.equal(
        load_file(output / "model.safetensors")[PREDICTOR], load_file(seed_1 / "model.safetensors")[PREDICTOR]
    )
    assert hidden_entries(tmp_path) == []


def test_two_conversions_started_together_exactly_one_wins(llava_base, tmp_path):
    """Two CLI processes released at the same moment (a start file as the barrier), both to one new output."""
    output, start = tmp_path / "out", tmp_path / "start"
    racer = (
        "import sys, time, pathlib\n"
        "from sparse_llava.convert_llava import main\n"
        f"while not pathlib.Path({str(start)!r}).exists(): time.sleep(0.01)\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", racer, *convert_args(llava_base, output, "--seed", str(seed))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=cli_env(),
        )
        for seed in (0, 1)
    ]
    time.sleep(8)  # both imported and waiting
    start.touch()
    results = [process.communicate(timeout=300) + (process.returncode,) for process in processes]
    assert sorted(code for _, _, code in results) == [0, 2], results
    (loser_stderr,) = [stderr for _, stderr, code in results if code == 2]
    loser = subprocess.CompletedProcess([], 2, "", loser_stderr)
    # Whether the loser came while the winner was writing or after it had finished, it says so in one line.
    try:
        assert_one_line_error(loser, "is being written by another conversion")
    except AssertionError:
        assert_one_line_error(loser, "is not empty; pass --overwrite to replace it")
    (winner_seed,) = [seed for seed, (_, _, code) in zip((0, 1), results) if code == 0]
    expected = convert(
        str(llava_base), "dynamic-llava", tmp_path / "expected", SMALL_PREDICTOR, seed=winner_seed, progress=False
    )
    assert torch.equal(
        load_file(output / "model.safetensors")[PREDICTOR], load_file(expected / "model.safetensors")[PREDICTOR]
    )
    assert hidden_entries(tmp_path) == []


def test_claiming_an_output_is_exclusive_under_a_race(tmp_path):
    """Eight threads claim one output at the same moment: exactly one gets it, the others learn who has it."""
    output, barrier = tmp_path / "out", threading.Barrier(8)
    outcomes, claims = [], []

    def claim():
        barrier.wait()
        try:
            claims.append(claim_output(output, wait=False, report=lambda message: None))
            outcomes.append("claimed")
        except OutputBusy as busy:
            outcomes.append(busy.owner)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes.count("claimed") == 1 and len(claims) == 1
    assert all(outcome.startswith(f"pid {os.getpid()} on ") for outcome in outcomes if outcome != "claimed")
    with claims[0] as work:
        assert work.staging.is_dir()
    assert list(tmp_path.iterdir()) == []  # the lock file and the work folder are gone
    with claim_output(output, wait=False, report=lambda message: None):  # free again
        pass


def _predictor_of(files: dict) -> torch.Tensor:
    from safetensors.torch import load

    return load(files["model.safetensors"])[PREDICTOR]


# --- bad files and paths: one-line errors from the CLI ----------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
def test_damaged_safetensors(damage, llava_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llava_base, base)
    weights = base / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    result = run_cli(*convert_args(base, tmp_path / "out"))
    assert_one_line_error(result, "a .safetensors file is truncated or corrupt (Error while deserializing header")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base"]


def test_pickle_weights_with_code_in_the_llava_hf_layout(llava_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llava_base, base)
    marker = tmp_path / "pickle-ran"
    tensors = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    torch.save({**tensors, "payload": _WritesMarker(marker)}, base / "pytorch_model.bin")
    result = run_cli(*convert_args(base, tmp_path / "out"))
    assert_one_line_error(result, "its pickle (.bin) weights hold more than tensors, so they were refused")
    assert "Unsupported global" in result.stderr and not marker.exists()
    # Plain tensors in a .bin load (with torch's weights-only loader).
    torch.save(tensors, base / "pytorch_model.bin")
    assert (convert(str(base), "p-mod", tmp_path / "out", progress=False) / "model.safetensors").is_file()


class _WritesMarker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_read_only_output_parent(llava_base, tmp_path):
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    immutable = False
    try:
        if os.access(parent, os.W_OK):  # root ignores permissions; an immutable folder stops root too
            immutable = subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode == 0
            if not immutable:
                pytest.skip("cannot make a folder read-only for this user")
        for output in (parent / "out", parent / "new" / "out"):
            result = run_cli(*convert_args(llava_base, output))
            error = assert_one_line_error(result, "cannot write into ")
            assert str(parent) in error and ("Permission denied" in error or "Operation not permitted" in error)
        assert list(parent.iterdir()) == []
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(parent)], check=True)
        parent.chmod(0o755)


@pytest.mark.parametrize("where", [".", "..", "base"])
def test_output_that_would_replace_the_current_folder_or_the_input(where, llava_base, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(llava_base, base)
    (tmp_path / "work").mkdir()
    if where == "base":
        result = run_cli(*convert_args(base, "base", "--overwrite"), cwd=tmp_path)
        assert_one_line_error(result, "--output base is or holds the input --base")
    else:
        result = run_cli(*convert_args(base, where, "--overwrite"), cwd=tmp_path / "work")
        assert_one_line_error(result, f"--output {where} is the current folder or one of its parents")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["base", "work"]
    assert sorted(path.name for path in base.iterdir()) == sorted(path.name for path in llava_base.iterdir())


def test_output_files_get_ordinary_modes(converted_pmod):
    """transformers writes its weight shards private (0600); the folder is meant to be shared like any other."""
    umask = os.umask(0o022)
    os.umask(umask)
    output = converted_pmod("llava")
    modes = {path.name: path.stat().st_mode & 0o777 for path in output.iterdir()}
    assert modes and set(modes.values()) == {0o666 & ~umask}, modes


# --- no prompts, no code from the source or the processor -------------------------------------------------------


def _with_custom_tokenizer_code(folder: Path, marker: Path) -> Path:
    """A processor folder whose tokenizer_config.json points to a code file that would write `marker` if run."""
    (folder / "evil_tokenizer.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import PreTrainedTokenizerFast\n"
        "class EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.update(
        tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": ["evil_tokenizer.EvilTokenizer", None]}
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return folder


@pytest.mark.parametrize("through", ["base", "processor"])
def test_no_prompt_and_no_code_from_the_source_or_the_processor(through, llava_base, tmp_path):
    marker = tmp_path / "code-ran"
    evil = _with_custom_tokenizer_code(Path(shutil.copytree(llava_base, tmp_path / "evil")), marker)
    args = (
        convert_args(evil, tmp_path / "out")
        if through == "base"
        else convert_args(llava_base, tmp_path / "out", "--processor", str(evil))
    )
    # Answer "yes" to any prompt: if the conversion asked whether to run the code, it would run it.
    result = run_cli(*args, input="y\ny\ny\n", stdin=None)
    assert_one_line_error(result, "tokenizer_config.json has an auto_map (custom processor code)")
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_no_code_from_a_source_config_with_an_auto_map(llava_base, tmp_path):
    marker = tmp_path / "code-ran"
    base = tmp_path / "base"
    shutil.copytree(llava_base, base)
    (base / "evil_config.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlavaConfig\n"
        "class EvilConfig(LlavaConfig):\n    model_type = 'evil_llava'\n"
    )
    config = json.loads((base / "config.json").read_text())
    config.update(model_type="evil_llava", auto_map={"AutoConfig": "evil_config.EvilConfig"})
    (base / "config.json").write_text(json.dumps(config))
    result = run_cli(*convert_args(base, tmp_path / "out"), input="y\ny\ny\n", stdin=None)
    assert_one_line_error(result, f"cannot read a LLaVA config from {str(base)!r}")
    assert "Do you wish to run the custom code" not in result.stdout + result.stderr
    assert not marker.exists()


# --- the image token --------------------------------------------------------------------------------------------


def test_image_token_index_is_checked_against_the_tokenizer(llava_base, tmp_path):
    from sparse_llava.tiny import IMAGE_TOKEN_ID, VOCAB_SIZE

    base = str(llava_base)
    with pytest.raises(ConversionError, match=rf"maps <image> to {IMAGE_TOKEN_ID}, the model expects 5"):
        convert(base, "p-mod", tmp_path / "a", {"image_token_index": 5}, progress=False)
    with pytest.raises(ConversionError, match=rf"image_token_index {VOCAB_SIZE} is outside the language model's"):
        convert(base, "p-mod", tmp_path / "b", {"image_token_index": VOCAB_SIZE}, progress=False)
    result = run_cli(*convert_args(base, tmp_path / "c", "--set", "image_token_index=7"))
    assert_one_line_error(result, f"the tokenizer of {base} maps <image> to {IMAGE_TOKEN_ID}, the model expects 7")
    assert sorted(path.name for path in tmp_path.iterdir()) == []
    # The processor's own image token is the one looked up.
    renamed = tmp_path / "renamed"
    shutil.copytree(llava_base, renamed)
    processor_config = json.loads((renamed / "processor_config.json").read_text())
    (renamed / "processor_config.json").write_text(json.dumps({**processor_config, "image_token": "<img>"}))
    with pytest.raises(ConversionError, match="has no image token '<img>'"):
        convert(str(renamed), "p-mod", tmp_path / "d", progress=False)
    output = convert(base, "p-mod", tmp_path / "e", {"image_token_index": IMAGE_TOKEN_ID}, progress=False)
    assert json.loads((output / "config.json").read_text())["image_token_index"] == IMAGE_TOKEN_ID
