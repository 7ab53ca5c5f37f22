"""Fine-tune a converted sparse-llava model (Dynamic-LLaVA or p-MoD) on LLaVA-format data with the HF `Trainer`.

The data is a JSON list of `{"image": "relative/path.jpg", "conversations": [{"from": "human", "value":
"<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}` (LLaVA's `llava_v1_5_mix665k.json` format); the
labels keep only the assistant answers. The vision tower is frozen; the LLM, the projector and the method's new
modules train, the new modules at their own learning rate. Defaults follow Dynamic-LLaVA's recipe (LLM 5e-6,
predictors 2e-4, no weight decay, cosine schedule with 3% warm-up, Gumbel temperature 1.0 -> 0.1 over the run); for
p-MoD the paper trains everything, routers included, at 2e-5 (`--learning-rate 2e-5 --sparse-learning-rate 2e-5`).

    python examples/train.py --model llava-1.5-7b-dynamic --data llava_v1_5_mix665k.json --image-folder data/ \\
        --output-dir dynamic-llava-7b-ft --bf16 --gradient-checkpointing

Distributed, through accelerate (DDP; add `--config_file` for FSDP or DeepSpeed, see the README):

    accelerate launch --num_processes 8 examples/train.py --model ... --data ... --output-dir ...

The output folder loads with `AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)`.
"""

import argparse

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TrainingArguments

from sparse_llava.compat_transformers import training_schedule_arguments
from sparse_llava.training import (
    LlavaConversationCollator,
    LlavaConversationDataset,
    SparseLlavaTrainer,
    freeze_vision_tower,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="converted sparse-llava folder or Hub id")
    parser.add_argument("--data", required=True, help="LLaVA-format JSON file")
    parser.add_argument("--image-folder", default=None, help="root of the image paths (default: the JSON's folder)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--learning-rate", type=float, default=5e-6, help="LLM and projector")
    parser.add_argument("--sparse-learning-rate", type=float, default=2e-4, help="predictors / routers")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="overrides --epochs when positive")
    parser.add_argument("--batch-size", type=int, default=8, help="per device")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--freeze-projector", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-steps", type=int, default=0, help="checkpoint every N steps (0: only at the end)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--use-cpu", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    model = AutoModelForImageTextToText.from_pretrained(
        args.model,
        trust_remote_code=True,
        dtype=torch.bfloat16 if args.bf16 else torch.float32,
        attn_implementation=args.attn_implementation,
    )
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    freeze_vision_tower(model, projector=args.freeze_projector)

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        learning_rate=args.learning_rate,
        weight_decay=0.0,
        lr_scheduler_type="cosine",
        bf16=args.bf16,
        **training_schedule_arguments(warmup_fraction=0.03, checkpointing=args.gradient_checkpointing),
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        remove_unused_columns=False,  # the collator reads `conversations` and `images`
        seed=args.seed,
        use_cpu=args.use_cpu,
    )
    trainer = SparseLlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=LlavaConversationDataset(args.data, args.image_folder),
        data_collator=LlavaConversationCollator(processor, max_length=args.max_length),
        sparse_learning_rate=args.sparse_learning_rate,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        processor.save_pretrained(args.output_dir)


if __name__ == "__main__":
    main()
