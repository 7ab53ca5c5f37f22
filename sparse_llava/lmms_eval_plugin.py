"""lmms-eval model plugin: `lmms-eval --model sparse_llava --model_args pretrained=FOLDER_OR_REPO,...`.

lmms-eval finds it through the `lmms_eval.models` entry point this package declares
(`sparse_llava.lmms_eval_entry_point`; `pip install 'sparse-llava[eval]'`). It evaluates sparse-llava folders and
Hub repos, and dense llava-hf checkpoints for the baseline, and adds what each run cost to lmms-eval's results.

Model arguments (`--model_args key=value,...`):

* `pretrained` (required), `revision`;
* `device` (lmms-eval's `--device` sets it too; default `cuda` when there is one, else `cpu`), `dtype` (`auto`,
  `float32`, `bfloat16`, ...), `attn_implementation`;
* `batch_size` (lmms-eval's `--batch_size`): requests of one task with the same generation settings are batched,
  left-padded;
* `trust_remote_code` (default false): run the code a sparse-llava checkpoint carries instead of this installed
  package's;
* `max_new_tokens` (default 128): when a task's `generation_kwargs` set none;
* `measure_flops` (default true): count each sample's prefill FLOPs (one extra forward of its prompt).

Every argument is checked before the model loads. Booleans are `true`/`false`, `1`/`0` or `yes`/`no` in any case;
anything else is refused rather than guessed (`trust_remote_code=off` must not run a checkpoint's code).

Prompts go through the checkpoint's chat template, one user turn holding the sample's images and `doc_to_text`.
`generate_until` stops at the end-of-sequence token or `max_new_tokens` and cuts the answer at the task's `until`
strings. `loglikelihood` (multiple-choice tasks) scores the continuation after the templated prompt (summed
log-probabilities, and whether greedy decoding would produce it); the continuation is scored as input text, so only
the methods' prompt-time decisions (image tokens) apply to it. lmms-eval 0.7's `output_type: loglikelihood` tasks
cannot read their own results (they unpack a list of one pair as the pair); `multiple_choice` tasks work.

The cost of every generated answer goes to lmms-eval's own per-model metrics, which its results file reports under
`throughput` as means over samples (`avg_<name>`): `prefill_flops`, `kv_cache_bytes`, `image_tokens`,
`image_tokens_kept` (mean over layers) and `image_tokens_kept_layer_<i>`, `output_tokens`, `output_text_tokens_kept`
(mean over layers) and `output_text_tokens_kept_layer_<i>`. Each answer also reports its input and output tokens
(lmms-eval's `usage`).
"""

import time

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics

from .evaluation import SampleCost, generate_with_cost, load_for_evaluation, torch_dtype, user_turn_prompt
from .lmms_eval_entry_point import MODEL_NAME

GENERATION_SETTINGS = {"until", "max_new_tokens", "temperature", "top_p", "do_sample", "num_beams"}
BOOLEAN_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


class SparseLlavaLmms(lmms):
    """sparse-llava (and dense llava-hf) models for lmms-eval; see the module docstring for the arguments."""

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        revision: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        trust_remote_code: bool = False,
        attn_implementation: str | None = None,
        max_new_tokens: int = 128,
        measure_flops: bool = True,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown --model_args for {MODEL_NAME}: {', '.join(sorted(unknown))}")
        if str(batch_size).startswith("auto"):
            raise ValueError(f"{MODEL_NAME} takes a fixed --batch_size, not {batch_size!r}")
        # Every argument is checked before the (slow) model load.
        self.batch_size_per_gpu = _positive_integer("batch_size", batch_size)
        self.default_max_new_tokens = _positive_integer("max_new_tokens", max_new_tokens)
        self.measure_flops = _boolean("measure_flops", measure_flops)
        trust_remote_code = _boolean("trust_remote_code", trust_remote_code)
        device = _device(device)
        torch_dtype(dtype)
        self.pretrained = str(pretrained)
        self.model, self.processor = load_for_evaluation(
            self.pretrained,
            revision=revision,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation,
        )

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----------------------------------------------------------------------------------------------------------

    def _visuals(self, doc_to_visual, doc_id, task, split) -> list:
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        for visual in visuals:
            if isinstance(visual, str):
                raise ValueError(f"{MODEL_NAME} takes images; task {task} gives a path or video {visual!r}")
        return [visual.convert("RGB") for visual in visuals]

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in _batches(requests, self.batch_size, key=lambda args: (args[4], repr(sorted(args[1].items())))):
            contexts, settings, doc_to_visual, doc_ids, tasks, splits = zip(*(requests[index].args for index in batch))
            options = _generation_options(settings[0], self.default_max_new_tokens)
            images = [self._visuals(*args) for args in zip(doc_to_visual, doc_ids, tasks, splits)]
            prompts = [user_turn_prompt(self.processor, text, len(sample)) for text, sample in zip(contexts, images)]
            start = time.perf_counter()
            generations = generate_with_cost(
                self.model,
                self.processor,
                prompts,
                images,
                max_new_tokens=options["max_new_tokens"],
                do_sample=options["do_sample"],
                temperature=options["temperature"],
                top_p=options["top_p"],
                measure_flops=self.measure_flops,
            )
            seconds_per_sample = (time.perf_counter() - start) / len(batch)
            for index, generation in zip(batch, generations):
                text = _cut_at(generation.text, options["until"])
                _log_cost(generation.cost, seconds_per_sample)
                counts = TokenCounts(
                    input_tokens=generation.cost.prompt_tokens, output_tokens=len(generation.token_ids)
                )
                results[index] = GenerationResult(text=text, token_counts=counts)
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """
        Per request, `(summed log-probability of the continuation, whether greedy decoding gives it)`, in a
        `GenerationResult`: lmms-eval 0.7 passes every model response through `unwrap_generation_output`, which turns
        anything but a string or a `GenerationResult` into its `str()`, and the task could no longer read the pair.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        for batch in _batches(requests, self.batch_size, key=lambda args: args[4]):
            prompts, continuations, images = [], [], []
            for index in batch:
                context, doc_to_target, doc_to_visual, doc_id, task, split = requests[index].args
                doc = self.task_dict[task][split][doc_id]
                continuation = str(doc_to_target if isinstance(doc_to_target, str) else doc_to_target(doc))
                sample_images = self._visuals(doc_to_visual, doc_id, task, split)
                prompts.append(user_turn_prompt(self.processor, context, len(sample_images)))
                continuations.append(continuation)
                images.append(sample_images)
            for index, score in zip(batch, self._score_continuations(prompts, continuations, images)):
                results[index] = GenerationResult(text=score)
        return results

    @torch.no_grad()
    def _score_continuations(self, prompts, continuations, images) -> list[tuple[float, bool]]:
        flat_images = [image for sample in images for image in sample] or None
        inputs = self.processor(
            images=flat_images, text=[p + c for p, c in zip(prompts, continuations)], padding=True, return_tensors="pt"
        ).to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        # The continuation's tokens are what the prompt-and-continuation has beyond the prompt alone (the processor
        # expands image placeholders the same way in both).
        prompt_lengths = [
            len(ids) for ids in self.processor(images=flat_images, text=prompts, padding=False)["input_ids"]
        ]
        logits = self.model(**inputs, use_cache=False).logits.float()
        log_probs = torch.log_softmax(logits, dim=-1)
        width = inputs["input_ids"].shape[1]
        scores = []
        for row, prompt_length in enumerate(prompt_lengths):
            total_length = int(inputs["attention_mask"][row].sum())
            count = total_length - prompt_length
            if count < 1:
                raise ValueError(f"continuation {continuations[row]!r} adds no token to its prompt")
            target = inputs["input_ids"][row, width - count :]
            # Rows are left-padded: the logits at column j predict the token at column j + 1.
            predicted = log_probs[row, width - count - 1 : width - 1]
            score = predicted.gather(-1, target.unsqueeze(-1)).sum().item()
            scores.append((score, bool((predicted.argmax(-1) == target).all())))
        return scores

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError(f"{MODEL_NAME} does not implement multi-round generation")


# ---------------------------------------------------------------------------------------------------------------


def _boolean(name: str, value) -> bool:
    """
    A boolean model argument: a bool (lmms-eval turns `true`/`false` into one), 1 or 0 (it turns those into ints),
    or one of `BOOLEAN_WORDS` in any case. Anything else is an error, not a guess.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (str, int)) and str(value).lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[str(value).lower()]
    raise ValueError(f"{name} must be true or false (or 1/0, yes/no), got {value!r}")


def _positive_integer(name: str, value) -> int:
    """An integer model argument of at least 1: an int (lmms-eval turns digits into one) or a string of digits."""
    is_integer = isinstance(value, int) and not isinstance(value, bool)
    if not (is_integer or (isinstance(value, str) and value.isdecimal())) or int(value) < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _device(device) -> str:
    """The `device` argument as a torch device string, refused here if this machine does not have it."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):  # what torch raises for anything that does not name a device
        raise ValueError(f"device must name a torch device such as cpu, cuda or cuda:0, got {device!r}") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device}: this machine has no CUDA device; use device=cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device={device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return str(parsed)


def _batches(requests: list[Instance], size: int, key) -> list[list[int]]:
    """Indices of `requests`, grouped by `key(args)` in order of first appearance, in chunks of at most `size`."""
    groups: dict = {}
    for index, request in enumerate(requests):
        groups.setdefault(key(request.args), []).append(index)
    return [indices[start : start + size] for indices in groups.values() for start in range(0, len(indices), size)]


def _generation_options(settings: dict, default_max_new_tokens: int) -> dict:
    """A task's `generation_kwargs` as `generate_with_cost` takes them; settings it cannot honour are errors."""
    unknown = set(settings) - GENERATION_SETTINGS
    if unknown:
        raise ValueError(f"{MODEL_NAME} does not support generation_kwargs {sorted(unknown)}")
    if int(settings.get("num_beams", 1)) != 1:
        raise ValueError(f"{MODEL_NAME} generates greedily or by sampling, not with beam search (num_beams=1)")
    until = settings.get("until", [])
    until = [until] if isinstance(until, str) else list(until)
    temperature = settings.get("temperature", 0) or 0
    do_sample = bool(settings.get("do_sample", temperature > 0))
    return {
        "until": until,
        "max_new_tokens": int(settings.get("max_new_tokens", default_max_new_tokens)),
        "do_sample": do_sample,
        "temperature": float(temperature) if do_sample and temperature else None,
        "top_p": settings.get("top_p") if do_sample else None,
    }


def _cut_at(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any of `stops`."""
    for stop in stops:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _log_cost(cost: SampleCost, seconds: float) -> None:
    """One answer's cost into lmms-eval's per-model metrics (reported as means over answers)."""
    layers = len(cost.image_tokens_kept)
    metrics = {
        "image_tokens": cost.image_tokens,
        "image_tokens_kept": sum(cost.image_tokens_kept) / layers,
        "output_tokens": cost.output_tokens,
        "output_text_tokens_kept": sum(cost.output_text_tokens_kept) / layers,
        "kv_cache_bytes": cost.kv_cache_bytes,
        **{f"image_tokens_kept_layer_{layer}": kept for layer, kept in enumerate(cost.image_tokens_kept)},
        **{f"output_text_tokens_kept_layer_{layer}": kept for layer, kept in enumerate(cost.output_text_tokens_kept)},
    }
    if cost.prefill_flops is not None:
        metrics["prefill_flops"] = cost.prefill_flops
    log_metrics(
        total_elapsed_time=seconds,
        total_gen_tokens=cost.output_tokens,
        avg_speed=cost.output_tokens / seconds if seconds > 0 else 0.0,
        additional_metrics=metrics,
    )
