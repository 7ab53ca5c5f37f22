"""One rank of the distributed tests (`tests/test_training.py`), launched twice by `torch.distributed.run` on CPU.

Trains each given converted model a few steps with `SparseLlavaTrainer`, data-parallel (DDP) or, with `--fsdp`,
sharded (FSDP 2), and writes, per model: this rank's final weights (with FSDP, the full weights `save_model` gathers),
world size, first batch and logs; rank 0 also writes the initial weights.
"""

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, TrainingArguments

from sparse_llava.tiny import tiny_inputs
from sparse_llava.training import SparseLlavaTrainer, freeze_vision_tower

# Every decoder layer its own shard group, as the README advises (`_no_split_modules`).
FSDP = {
    "fsdp": True,
    "fsdp_config": {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer", "CLIPEncoderLayer"]},
}


class Samples(torch.utils.data.Dataset):
    """Eight one-image samples (random tokens, random pixels); the last 3 tokens are the answer."""

    def __init__(self):
        self.samples = []
        for seed in range(8):
            inputs = {name: tensor[0] for name, tensor in tiny_inputs("llava", batch_size=1, seed=seed).items()}
            labels = torch.full_like(inputs["input_ids"], -100)
            labels[-3:] = inputs["input_ids"][-3:]
            self.samples.append({**inputs, "labels": labels})

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        return self.samples[index]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP 2 instead of DDP")
    args = parser.parse_args()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    for index, folder in enumerate(args.models):
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        freeze_vision_tower(model)
        training_args = TrainingArguments(
            output_dir=str(output / f"run{index}"),
            max_steps=3,
            per_device_train_batch_size=2,
            learning_rate=1e-3,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            ddp_backend="gloo",
            disable_tqdm=True,
            logging_steps=1,
            seed=0,
            **(FSDP if args.fsdp else {}),
        )
        trainer = SparseLlavaTrainer(
            model=model, args=training_args, train_dataset=Samples(), sparse_learning_rate=1e-2
        )
        rank = trainer.args.process_index
        if rank == 0:
            torch.save(
                {name: p.detach().clone() for name, p in model.state_dict().items()},
                output / f"model{index}-initial.pt",
            )
        first_batch = next(iter(trainer.get_train_dataloader()))["input_ids"].tolist()
        trainer.train()
        if args.fsdp:
            trainer.save_model(output / f"model{index}-fsdp")
        else:
            torch.save(model.state_dict(), output / f"model{index}-rank{rank}.pt")
        info = {"world_size": trainer.args.world_size, "first_batch": first_batch, "logs": trainer.state.log_history}
        (output / f"model{index}-rank{rank}.json").write_text(json.dumps(info))


if __name__ == "__main__":
    # A stuck rank prints every thread's stack and fails, well before the test's own timeout.
    faulthandler.dump_traceback_later(240, exit=True)
    main()
    # Everything is written. Tearing down (destroying the gloo process group, or leaving it to interpreter shutdown)
    # hung or aborted about 1 run in 5 after all work was done, so leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
