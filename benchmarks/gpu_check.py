"""`make gpu-check`: the CUDA side of sparse-llava in one command, in small named phases.

    python benchmarks/gpu_check.py [--device cuda|cpu] [--bench-tokens 64]

Each phase prints one line, `gpu-check: <phase>: PASS`, `FAIL (what failed)` or `SKIPPED (why)`, and the last line is
the verdict. The exit status is 1 if a phase failed, 0 otherwise: without CUDA every phase is skipped and the run
still ends with 0, so that CI runs it.

* device tests: the device-parametrised tests (the test files taking the `device` fixture, tests/test_device.py) with
  `SPARSE_LLAVA_TEST_DEVICE=cuda`: every method on both bases gives the same greedy tokens with the growing cache,
  the fixed cache and without a cache, and a padded batch equals its rows alone;
* host sync: decode steps of each method on the fixed cache, eagerly and compiled (`torch.compile(model.forward,
  fullgraph=True)`), run under `torch.cuda.set_sync_debug_mode("error")` (the steps only, not the prefill), after an
  unchecked run that compiles and warms up: a step that waits for the GPU (`.item()`, `.tolist()`, a data-dependent
  branch, a blocking copy) raises;
* flash-attention (if `flash_attn` is installed): each method's greedy tokens with `flash_attention_2` in float16
  equal SDPA's; a method that refuses the backend in a ValueError naming it is an expected refusal, not a failure;
* compiled generate: `generate()` compiling its decode step on the fixed cache (`benchmarks/run.py`'s
  `decode_settings`: fullgraph, reduce-overhead), twice under `error_on_recompile`: one graph, no recompiles, and
  the tokens of the eager fixed cache;
* bf16 benchmark: the decode part of benchmarks/run.py at batch 1 and 8 on its LLaVA-1.5-shaped model in bfloat16,
  dense LLaVA's StaticCache compiled against each method compiled on its fixed cache: tokens/s and ratios (for
  reading; nothing is asserted on speed).

The first three checks use the tests' tiny models (tests/test_device.py's `method_model`: decisions that are not
trivial); the benchmark uses benchmarks/run.py's models and decision stand-ins.
"""

import argparse
import functools
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from torch._dynamo.utils import counters

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "benchmarks"))

import run as benchmark  # noqa: E402
from conftest import SMALL_PREDICTOR, memoised_conversions  # noqa: E402
from test_device import METHODS, greedy, method_model, moved  # noqa: E402
from test_dynamic_llava_prefill import inputs_for  # noqa: E402
from test_static_decode import decode  # noqa: E402

from sparse_llava.tiny import build_tiny_llava  # noqa: E402

PHASES = ("device tests", "host sync", "flash-attention", "compiled generate", "bf16 benchmark")
DECODE_STEPS = 5
# A test file takes the `device` fixture when one of its tests names it as an argument.
DEVICE_FIXTURE = re.compile(r"^def test_\w+\([^)]*\bdevice\b", re.MULTILINE)


class Failed(Exception):
    """A check's failures, in one line."""


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# ---------------------------------------------------------------------------------------------------------------
# Phases. Each returns a one-line summary (PASS) or raises Failed.
# ---------------------------------------------------------------------------------------------------------------


def device_tests(device) -> str:
    files = sorted(
        str(path.relative_to(REPO))
        for path in (REPO / "tests").glob("test_*.py")
        if DEVICE_FIXTURE.search(path.read_text())
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
        cwd=REPO,
        env={**os.environ, "SPARSE_LLAVA_TEST_DEVICE": str(device)},
        capture_output=True,
        text=True,
    )
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "no output"
    if result.returncode != 0:
        print("\n".join(result.stdout.splitlines()[-40:]), result.stderr[-2000:], sep="\n", file=sys.stderr)
        raise Failed(f"pytest {' '.join(files)}: {summary}")
    return f"{' '.join(files)}: {summary}"


def checked_for_sync(forward):
    """`forward` run under `torch.cuda.set_sync_debug_mode("error")`: a host synchronisation inside it raises."""

    def checked(**inputs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return forward(**inputs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    return checked


def host_sync(tiny_models, device) -> str:
    inputs = moved(inputs_for("llava"), device)
    width = inputs["input_ids"].shape[1]
    failures = []
    for name, make in tiny_models.items():
        model = make().to(device)
        for mode in ("eager", "compiled"):
            torch.compiler.reset()
            forward = torch.compile(model.forward, fullgraph=True) if mode == "compiled" else model
            cache = model.new_cache(max_cache_len=width + DECODE_STEPS + 1)
            try:
                decode(forward, model, inputs, cache, steps=DECODE_STEPS)  # compiles, warms up: unchecked
                cache.reset()
                # A recompile inside the checked steps would synchronise too: name it as what it is.
                with torch._dynamo.config.patch(error_on_recompile=True):
                    decode(checked_for_sync(forward), model, inputs, cache, steps=DECODE_STEPS)
                torch.cuda.synchronize()
            except Exception as error:
                failures.append(f"{name} {mode}: {first_line(error)}")
    torch.compiler.reset()
    if failures:
        raise Failed("; ".join(failures))
    return f"{DECODE_STEPS} decode steps of {', '.join(tiny_models)}, eager and compiled, on the fixed cache"


def flash_attention(tiny_models, device) -> str:
    inputs = moved(inputs_for("llava"), device, torch.float16)
    agreed, refused, failures = [], [], []
    for name, make in tiny_models.items():
        model = make().to(device, torch.float16)
        model.set_attn_implementation("sdpa")
        reference = greedy(model, inputs)
        try:
            model.set_attn_implementation("flash_attention_2")
            tokens = greedy(model, inputs)
        except ValueError as error:
            if "flash" not in str(error).lower():
                raise
            refused.append(name)
            print(f"  {name}: expected refusal: {first_line(error)}")
            continue
        if torch.equal(tokens, reference):
            agreed.append(name)
        else:
            differ = (tokens != reference).nonzero()[0].tolist()
            failures.append(f"{name}: flash-attention's tokens differ from SDPA's first at (row, position) {differ}")
    if failures:
        raise Failed("; ".join(failures))
    return f"float16, SDPA's tokens: {', '.join(agreed) or 'none'}; expected refusals: {', '.join(refused) or 'none'}"


def compiled_generate(tiny_models, device) -> str:
    inputs = moved(inputs_for("llava"), device)
    new_tokens = DECODE_STEPS + 1
    settings_width = inputs["input_ids"].shape[1] + new_tokens - 1
    failures = []
    for name, make in tiny_models.items():
        model = make().to(device)
        eager = greedy(model, inputs, cache_implementation="static")
        torch.compiler.reset()  # every model's decode step is traced from the same Module.__call__
        counters.clear()
        try:
            with torch._dynamo.config.patch(error_on_recompile=True):
                runs = [
                    greedy(model, inputs, **benchmark.decode_settings(model, "compiled", settings_width, device))
                    for _ in range(2)
                ]
        except Exception as error:
            failures.append(f"{name}: {first_line(error)}")
            continue
        graphs = counters["stats"]["unique_graphs"]
        if graphs != 1:
            failures.append(f"{name}: {graphs} graphs compiled over two generations, expected 1")
        if not all(torch.equal(tokens, eager) for tokens in runs):
            failures.append(f"{name}: compiled tokens differ from the eager fixed cache's")
    torch.compiler.reset()
    if failures:
        raise Failed("; ".join(failures))
    return f"{', '.join(tiny_models)}: one graph each, no recompiles, the eager tokens"


def bf16_benchmark(device, tokens: int) -> str:
    names = ("dense", *METHODS)
    models = benchmark.build_models("llava-1.5", device, names)
    for model in models.values():
        model.to(torch.bfloat16)
    plan = {
        "tokens": {1: tokens, 8: tokens},
        "batches": (1, 8),
        "compiled": {1: names, 8: names},
        "fixed_eager": False,
        "attention_share_batches": (),
        "dynamic_cache_batches": (),
        "decode_repeats": 2,
    }
    speeds = benchmark.measure_decode_speed(models, benchmark.base_config("llava-1.5"), device, plan)
    ratios = benchmark.decode_ratios(speeds, plan)
    rows = {
        name: {
            **{f"b{batch}_tokens_per_s": speeds[name][f"decode_tps_b{batch}_compiled"] for batch in plan["batches"]},
            **{f"b{batch}_vs_dense": ratios[name][f"b{batch}_compiled"] for batch in plan["batches"]},
        }
        for name in names
    }
    benchmark.print_table(
        f"\nbf16 decode, {tokens} new tokens, compiled: dense LLaVA's StaticCache and each method's fixed cache",
        rows,
        list(rows["dense"]),
    )
    return "compiled decode tokens/s against dense compiled: " + ", ".join(
        f"{name} " + " ".join(f"b{batch} {rows[name][f'b{batch}_vs_dense']:.2f}" for batch in plan["batches"])
        for name in METHODS
    )


# ---------------------------------------------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------------------------------------------


def tiny_method_models(root: Path) -> dict:
    """`{method: make}`: `make()` builds that method on the tiny LLaVA-1.5, as the device tests do (fresh each call,
    since the checks change a model's dtype and attention backend)."""
    folder = root / "llava-hub"
    base_checkpoints = {("llava", "hub"): (folder, build_tiny_llava(folder, base="llava", layout="hub"))}
    converted = memoised_conversions(base_checkpoints, root, "dynamic-llava", SMALL_PREDICTOR)
    return {name: (lambda name=name: method_model(name, "llava", base_checkpoints, converted)) for name in METHODS}


def report(phase: str, status: str, detail: str) -> None:
    print(f"gpu-check: {phase}: {status} ({detail})", flush=True)


def skip_reason(phase: str, device) -> str | None:
    if device.type != "cuda":
        return "no CUDA device" + ("; on the CPU these tests run in `make test`" if phase == "device tests" else "")
    if phase == "flash-attention" and importlib.util.find_spec("flash_attn") is None:
        return "flash_attn is not installed: pip install flash-attn --no-build-isolation"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if there is one"
    )
    parser.add_argument("--bench-tokens", type=int, default=64, help="new tokens of each timed generation")
    args = parser.parse_args(argv)
    if args.bench_tokens < 2:
        parser.error("--bench-tokens must be at least 2: the first new token comes from the prefill")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch sees no CUDA device; leave --device out to run without")

    with tempfile.TemporaryDirectory() as root:
        tiny_models = functools.cache(lambda: tiny_method_models(Path(root)))  # built by the first phase using them
        checks = {
            "device tests": lambda: device_tests(device),
            "host sync": lambda: host_sync(tiny_models(), device),
            "flash-attention": lambda: flash_attention(tiny_models(), device),
            "compiled generate": lambda: compiled_generate(tiny_models(), device),
            "bf16 benchmark": lambda: bf16_benchmark(device, args.bench_tokens),
        }
        statuses, details = {}, {}
        for phase in PHASES:
            reason = skip_reason(phase, device)
            if reason is not None:
                statuses[phase] = "SKIPPED"
                report(phase, "SKIPPED", reason)
                continue
            print(f"gpu-check: {phase} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            try:
                status, detail = "PASS", checks[phase]()
            except Failed as failure:
                status, detail = "FAIL", str(failure)
            except Exception as error:  # a crash is this phase's failure; the other phases still run
                traceback.print_exc()
                status, detail = "FAIL", first_line(error)
            statuses[phase], details[phase] = status, detail
            report(phase, status, f"{detail}; {time.perf_counter() - start:.0f} s")

    failed = [phase for phase, status in statuses.items() if status == "FAIL"]
    if failed:
        print(f"gpu-check: FAIL ({', '.join(failed)})")
        return 1
    skipped = [phase for phase, status in statuses.items() if status == "SKIPPED"]
    verdict = f"nothing failed; skipped: {', '.join(skipped)}" if skipped else "all checks"
    if statuses["bf16 benchmark"] == "PASS":
        verdict += f"; {details['bf16 benchmark']}"
    print(f"gpu-check: PASS ({verdict})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
