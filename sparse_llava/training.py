"""Fine-tuning sparse-llava models with the Hugging Face `Trainer`, as the papers did.

* [`GumbelTemperatureCallback`]: Dynamic-LLaVA's Gumbel-Softmax temperature schedule, an exponential decay from
  `config.gumbel_tau_start` (1.0) to `config.gumbel_tau_end` (0.1) over the run's `max_steps`.
* [`parameter_groups`]: optimizer groups in which the method's new modules (Dynamic-LLaVA's predictors, p-MoD's
  routers) have their own learning rate (Dynamic-LLaVA's recipe: 2e-4 for the predictors, 5e-6 for the LLM; p-MoD
  trains its routers at the LLM's 2e-5).
* [`freeze_vision_tower`]: both recipes keep the CLIP tower frozen.
* [`SparseLlavaTrainer`]: a `Trainer` that uses those groups, runs the temperature schedule and logs the parts of
  the loss (`lm_loss`, `image_mask_loss`, ...) next to `loss`.
* [`LlavaConversationDataset`] and [`LlavaConversationCollator`]: LLaVA-format JSON data (conversations and image
  paths) turned into model inputs whose labels keep only the assistant answers.

`examples/train.py` puts them together. Distributed runs (DDP, FSDP, DeepSpeed) go through `accelerate launch` and
the `Trainer`'s own integration; see the README.
"""

import json
from pathlib import Path

import torch
from accelerate.utils import gather_object
from transformers import Trainer, TrainerCallback

IGNORE_INDEX = -100  # label of the positions the language-modelling loss skips

# The system prompt of LLaVA-1.5's `vicuna_v1` conversation template.
VICUNA_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


def gumbel_temperature(step: int, max_steps: int, start: float, end: float) -> float:
    """`start * (end / start) ** (step / max_steps)`: exponential decay from `start` at step 0 to `end` at the end."""
    return start * (end / start) ** (min(step, max_steps) / max(max_steps, 1))


class GumbelTemperatureCallback(TrainerCallback):
    """
    Sets `model.gumbel_tau` before every optimisation step to
    `tau_start * (tau_end / tau_start) ** (global_step / max_steps)`, as Dynamic-LLaVA's trainer does. The bounds
    default to the model's `config.gumbel_tau_start` / `gumbel_tau_end`. Models without a temperature are left alone.
    """

    def __init__(self, tau_start: float | None = None, tau_end: float | None = None):
        self.tau_start = tau_start
        self.tau_end = tau_end

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.set_temperature(model, state)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.set_temperature(model, state)

    def set_temperature(self, model, state) -> None:
        if model is None or not hasattr(model, "gumbel_tau"):
            return
        start = self.tau_start if self.tau_start is not None else model.config.gumbel_tau_start
        end = self.tau_end if self.tau_end is not None else model.config.gumbel_tau_end
        model.gumbel_tau = gumbel_temperature(state.global_step, state.max_steps, start, end)


def is_sparse_module_parameter(name: str, module_names) -> bool:
    """Whether parameter `name` belongs to one of the method's new modules (predictors, routers), wrappers or not."""
    return any(part in module_names for part in name.split("."))


def parameter_groups(
    model,
    learning_rate: float,
    sparse_learning_rate: float,
    weight_decay: float = 0.0,
    sparse_weight_decay: float = 0.0,
    decay_parameter_names=None,
    sparse_module_names=None,
) -> list[dict]:
    """
    Optimizer parameter groups of the trainable parameters of `model`: the method's new modules (named in
    `sparse_module_names`, by default the model's `new_module_names`: Dynamic-LLaVA's predictors, p-MoD's routers) at
    `sparse_learning_rate` with `sparse_weight_decay`, everything else at `learning_rate`, with `weight_decay` for the
    names in `decay_parameter_names` (all when `None`; the `Trainer` excludes biases and norms) and 0 otherwise.
    Empty groups are left out.
    """
    if sparse_module_names is None:
        sparse_module_names = getattr(unwrap(model), "new_module_names", ())
    groups = {"decay": [], "no_decay": [], "sparse": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if is_sparse_module_parameter(name, sparse_module_names):
            groups["sparse"].append(parameter)
        elif decay_parameter_names is None or name in decay_parameter_names:
            groups["decay"].append(parameter)
        else:
            groups["no_decay"].append(parameter)
    settings = {
        "decay": {"lr": learning_rate, "weight_decay": weight_decay},
        "no_decay": {"lr": learning_rate, "weight_decay": 0.0},
        "sparse": {"lr": sparse_learning_rate, "weight_decay": sparse_weight_decay},
    }
    return [{"params": params, **settings[kind]} for kind, params in groups.items() if params]


def unwrap(model):
    """The model inside DDP / FSDP / DeepSpeed wrappers (which keep it as `.module`)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def freeze_vision_tower(model, projector: bool = False) -> None:
    """
    Stop training the CLIP vision tower (both papers' recipes), and the projector too if `projector` (Dynamic-LLaVA's
    paper says it froze it, its code trains it; p-MoD trains it).
    """
    model.model.vision_tower.requires_grad_(False)
    if projector:
        model.model.multi_modal_projector.requires_grad_(False)


class SparseLlavaTrainer(Trainer):
    """
    A `Trainer` for sparse-llava models:

    * with `sparse_learning_rate`, the method's new modules train at that rate and the rest at `args.learning_rate`
      (see [`parameter_groups`]); without it every parameter uses `args.learning_rate`, as the `Trainer` does;
    * a [`GumbelTemperatureCallback`] is added unless one is given;
    * each logged `loss` comes with the mean of the loss's parts over the same steps (`lm_loss`, `image_mask_loss`,
      `output_text_mask_loss`).
    """

    def __init__(self, *args, sparse_learning_rate: float | None = None, sparse_weight_decay: float = 0.0, **kwargs):
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(callback, GumbelTemperatureCallback) for callback in callbacks):
            callbacks.append(GumbelTemperatureCallback())
        super().__init__(*args, callbacks=callbacks, **kwargs)
        self.sparse_learning_rate = sparse_learning_rate
        self.sparse_weight_decay = sparse_weight_decay
        self._loss_terms: dict[str, list[torch.Tensor]] = {}  # each part of the loss, per step since the last log

    def create_optimizer(self, model=None):
        if self.optimizer is None and self.sparse_learning_rate is not None:
            opt_model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            groups = parameter_groups(
                opt_model,
                self.args.learning_rate,
                self.sparse_learning_rate,
                weight_decay=self.args.weight_decay,
                sparse_weight_decay=self.sparse_weight_decay,
                decay_parameter_names=self.get_decay_parameter_names(opt_model),
            )
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        # transformers 4.57's Trainer.create_optimizer takes no model argument (5.x passes one, or None).
        return super().create_optimizer() if model is None else super().create_optimizer(model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        loss_terms = outputs.get("loss_terms") if isinstance(outputs, dict) else None
        if model.training and loss_terms:
            for name, value in loss_terms.items():
                self._loss_terms.setdefault(name, []).append(value.detach().float())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        # Every process logs the training loss at the same steps, so the terms can be gathered here; processes may
        # hold different terms (a batch without images has no image term), hence objects, not tensors.
        if "loss" in logs and self._loss_terms:
            local = {name: torch.stack(values).mean().item() for name, values in self._loss_terms.items()}
            per_process = gather_object([local]) if self.args.world_size > 1 else [local]
            for name in sorted(set().union(*per_process)):
                values = [terms[name] for terms in per_process if name in terms]
                logs[name] = round(sum(values) / len(values), 4)
            self._loss_terms = {}
        super().log(logs, *args, **kwargs)


class LlavaConversationDataset(torch.utils.data.Dataset):
    """
    A LLaVA-format JSON file: a list of `{"image": "path" | ["path", ...] (optional), "conversations": [{"from":
    "human", "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}`, image paths relative to
    `image_folder`. Items are `{"conversations": [...], "images": [PIL images]}`.
    """

    def __init__(self, json_path, image_folder=None):
        self.records = json.loads(Path(json_path).read_text())
        self.image_folder = Path(image_folder) if image_folder is not None else Path(json_path).parent

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        record = self.records[index]
        paths = record.get("image") or []
        paths = [paths] if isinstance(paths, str) else paths
        images = [Image.open(self.image_folder / path).convert("RGB") for path in paths]
        return {"conversations": record["conversations"], "images": images}


class LlavaConversationCollator:
    """
    Turns conversations with images into a padded batch with `labels` that keep only the assistant answers (and the
    end-of-sequence token closing each), in LLaVA-1.5's `vicuna_v1` format:
    `<s>{system} USER: {question} ASSISTANT: {answer}</s>USER: ...`. Each `<image>` in a human turn becomes the
    image tokens the `processor` produces for the next image of the example; text is tokenised piece by piece around
    them, as the LLaVA repository does.

    Args:
        processor: the model's processor (`AutoProcessor.from_pretrained(model_folder)`).
        system_prompt: text before the first turn.
        max_length: sequences longer than this are cut at the end (an error if that would cut an image).
    """

    roles = {"human": "USER:", "gpt": "ASSISTANT:"}

    def __init__(self, processor, system_prompt: str = VICUNA_SYSTEM_PROMPT, max_length: int | None = None):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_token = processor.image_token
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.system_prompt = system_prompt
        self.max_length = max_length

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        rows, image_inputs = [], []
        for example in examples:
            images = list(example.get("images") or [])
            ids, labels, pixels = self.encode(example["conversations"], images)
            rows.append((ids, labels))
            image_inputs.extend(pixels)
        batch = self.pad(rows)
        if image_inputs:
            batch.update(self.stack_images(image_inputs))
        return batch

    def encode(self, conversations: list[dict], images: list):
        """Token ids and labels of one conversation, and the processor outputs of its images."""
        ids, labels, pixels = [], [], []
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        ids += bos
        labels += [IGNORE_INDEX] * len(bos)
        prompt = self.system_prompt
        for turn in conversations:
            if turn["from"] not in self.roles:
                raise ValueError(f"unknown conversation role {turn['from']!r}; expected one of {list(self.roles)}")
            if turn["from"] == "human":
                prompt += f" {self.roles['human']} {turn['value']} {self.roles['gpt']}"
                continue
            prompt_ids = self.encode_prompt(prompt, images, pixels)
            answer_ids = self.tokenizer(f" {turn['value']}", add_special_tokens=False)["input_ids"]
            answer_ids = answer_ids + [self.tokenizer.eos_token_id]
            ids += prompt_ids + answer_ids
            labels += [IGNORE_INDEX] * len(prompt_ids) + answer_ids
            prompt = ""
        if images:
            raise ValueError(f"a conversation has {len(images)} more image(s) than <image> placeholders")
        if self.max_length is not None and len(ids) > self.max_length:
            if self.image_token_id in ids[self.max_length :]:
                raise ValueError(f"max_length={self.max_length} would cut image tokens; raise it")
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        return ids, labels, pixels

    def encode_prompt(self, prompt: str, images: list, pixels: list) -> list[int]:
        """Token ids of a prompt, each `<image>` replaced with the next image's tokens."""
        pieces = prompt.split(self.image_token)
        ids = self.tokenizer(pieces[0], add_special_tokens=False)["input_ids"]
        for piece in pieces[1:]:
            if not images:
                raise ValueError("a conversation has more <image> placeholders than images")
            encoded = self.processor(
                text=self.image_token, images=[images.pop(0)], return_tensors="pt", add_special_tokens=False
            )
            pixels.append({key: value for key, value in encoded.items() if key not in ("input_ids", "attention_mask")})
            ids += encoded["input_ids"][0].tolist()
            ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids

    def pad(self, rows) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(rows):
            columns = slice(width - len(ids), width) if self.tokenizer.padding_side == "left" else slice(0, len(ids))
            input_ids[row, columns] = torch.tensor(ids)
            labels[row, columns] = torch.tensor(row_labels)
            attention_mask[row, columns] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    @staticmethod
    def stack_images(image_inputs: list[dict]) -> dict[str, torch.Tensor]:
        """Concatenate the images' processor outputs; LLaVA-NeXT's tiles are zero-padded to the largest count."""
        pixel_values = [inputs["pixel_values"] for inputs in image_inputs]
        if pixel_values[0].dim() == 5:  # [1, tiles, channels, height, width]
            most_tiles = max(values.shape[1] for values in pixel_values)
            pixel_values = [
                torch.nn.functional.pad(values, (0, 0, 0, 0, 0, 0, 0, most_tiles - values.shape[1]))
                for values in pixel_values
            ]
        batch = {"pixel_values": torch.cat(pixel_values)}
        if "image_sizes" in image_inputs[0]:
            batch["image_sizes"] = torch.cat([inputs["image_sizes"] for inputs in image_inputs])
        return batch


__all__ = [
    "GumbelTemperatureCallback",
    "LlavaConversationCollator",
    "LlavaConversationDataset",
    "SparseLlavaTrainer",
    "freeze_vision_tower",
    "gumbel_temperature",
    "parameter_groups",
]
