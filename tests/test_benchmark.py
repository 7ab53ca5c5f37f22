"""The benchmark's stand-ins for trained decisions and its attention profile (benchmarks/run.py), on tiny models."""

import sys
from pathlib import Path

import pytest
from conftest import generated_cache
from test_dynamic_llava_decode import text_sparse_model
from test_dynamic_llava_prefill import inputs_for

from sparse_llava.tiny import tiny_inputs

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import run as benchmark  # noqa: E402

TOKENS = 48


def output_keep_rates(model, inputs) -> list[float]:
    output = model.generate(
        **inputs, max_new_tokens=TOKENS, min_new_tokens=TOKENS, do_sample=False, return_dict_in_generate=True
    )
    layer = generated_cache(output).sparsity_report()[model.config.sparse_layer]
    return [kept / seen for kept, seen in zip(layer["output_text_kept"], layer["output_text_seen"])]


def test_forced_output_keep_rate_keeps_about_half_of_each_row(converted):
    """Each row of a (padded) batch keeps about half of its generated tokens, the paper's per-sample target, where
    the predictor alone keeps a different share in each row."""
    model = text_sparse_model(converted, "llava")
    inputs = inputs_for("llava")
    unforced = output_keep_rates(model, inputs)
    benchmark.force_output_keep_rate(model, inputs, tokens=TOKENS)
    forced = output_keep_rates(model, inputs)
    assert max(abs(rate - 0.5) for rate in unforced) > 0.15, unforced  # the forcing has something to do
    assert all(abs(rate - 0.5) <= 0.1 for rate in forced), forced
    # A larger batch than the calibration's (the KV-budget runs): its new rows start from the calibrated rows' median.
    larger = output_keep_rates(model, tiny_inputs("llava", batch_size=4, left_padding=[0, 7, 3, 0]))
    assert all(abs(rate - 0.5) <= 0.15 for rate in larger), larger


def test_attention_share_is_a_fraction_of_the_decode_step(base_checkpoints):
    base_model = base_checkpoints[("llava", "hub")][1]
    share = benchmark.attention_share(base_model, inputs_for("llava"), tokens=TOKENS, device="cpu")
    assert 0 < share < 1


def test_attention_share_profiles_no_more_steps_than_the_cache_holds(base_checkpoints):
    """Fewer new tokens than the profiled steps: the fixed-capacity cache sized for them is not overrun."""
    base_model = base_checkpoints[("llava", "hub")][1]
    tokens = benchmark.PROFILED_STEPS // 2
    share = benchmark.attention_share(base_model, inputs_for("llava"), tokens=tokens, device="cpu")
    assert 0 < share < 1


def test_decode_runs_of_fewer_than_two_tokens_are_refused(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["run.py", "--quick", "--decode-only", "--decode-tokens", "1"])
    with pytest.raises(SystemExit):
        benchmark.main()
    assert "--decode-tokens and --batch-decode-tokens must be at least 2" in capsys.readouterr().err


def test_slots_per_decode_step_are_counted_from_the_masks(base_checkpoints, converted):
    """Dense LLaVA's StaticCache: every step reads the whole buffer and attends to each row's tokens so far, which the
    test counts from the prompt's padding. A method's growing and fixed caches attend to the same slots (the same
    tokens), the fixed one reading its whole buffer."""
    inputs = inputs_for("llava")  # two rows, left padding 0 and 7
    (rows, width), tokens = inputs["input_ids"].shape, 6
    base_model = base_checkpoints[("llava", "hub")][1]
    layers = base_model.config.text_config.num_hidden_layers
    read, attended = benchmark.slots_per_decode_step(base_model, inputs, tokens, "static", "cpu")
    assert read == layers * rows * (width + tokens - 1)
    prompt_tokens = inputs["attention_mask"].sum(-1)
    # Decode step k (1 .. tokens - 1) attends to the row's prompt, the k - 1 tokens generated before it, and itself.
    expected = sum(int(prompt_tokens.sum()) + rows * k for k in range(1, tokens)) * layers / (tokens - 1)
    assert attended == pytest.approx(expected)

    model = text_sparse_model(converted, "llava")
    growing_read, growing_attended = benchmark.slots_per_decode_step(model, inputs, tokens, "eager", "cpu")
    fixed_read, fixed_attended = benchmark.slots_per_decode_step(model, inputs, tokens, "static", "cpu")
    assert growing_attended == pytest.approx(fixed_attended)
    assert growing_attended < attended  # the method dropped image tokens
    cache = model.new_cache(max_cache_len=width + tokens - 1)
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, cache=cache)
    assert fixed_read == rows * sum(layer.capacity for layer in cache.layers)
    assert growing_attended <= growing_read < fixed_read
