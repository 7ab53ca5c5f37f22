"""Accuracy against cost of sparse-llava variants and their dense base, on the same samples, in one table.

    python benchmarks/accuracy.py --base llava-hf/llava-1.5-7b-hf --variants llava-1.5-7b-dynamic llava-1.5-7b-pmod \
        --data samples.jsonl [--batch-size 8] [--max-new-tokens 16] [--limit N] [--device cuda] [--dtype bfloat16] \
        [--json results.json] [--plot accuracy.png] [--no-flops]

`--data` is a JSON-lines file, one sample per line:

    {"image": "images/0.jpg", "question": "What color is the bus?", "answers": ["red", "red", "dark red", ...]}

`image` (or `images`, a list) is a path relative to the data file, or absolute; `answers` (the annotators' answers,
as in VQAv2, or one string) or `answer` (one reference) is optional. The samples are read and checked (each line a
JSON object with a `question` string, every image readable) before any model loads. Each model answers every question
greedily, with the prompt its chat template makes of the images and the question. The table has, per model:

* agreement with the dense base's answers: exact match and token F1 (the dense row agrees with itself);
* accuracy against the references, where the data has them: VQA accuracy (the VQAv2 rule: min(1, matching
  annotators / 3), averaged over leave-one-out subsets) and exact match with any reference;
* cost, per sample on average: prefill FLOPs and KV-cache bytes at the end of generation (as multiples of the
  dense base's), image tokens kept (share of the prompt's image tokens, averaged over layers), generated tokens kept
  (share of those run through the model, averaged over layers).

The metrics are `evaluate` modules shipped in `sparse_llava/metrics` (loaded from there, not from the Hub); the
costs are measured as `sparse_llava.evaluation` describes. `--plot` draws accuracy against prefill FLOPs (needs
matplotlib: `pip install 'sparse-llava[plot]'`). Needs `pip install 'sparse-llava[eval]'` for `evaluate`.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from PIL import Image  # noqa: E402

from sparse_llava import metrics  # noqa: E402
from sparse_llava.evaluation import (  # noqa: E402
    generate_with_cost,
    load_for_evaluation,
    summarize_costs,
    user_turn_prompt,
)


def read_samples(path: Path, limit: int | None = None) -> list[dict]:
    """
    The first `limit` (default: all) samples of a JSON-lines data file, each with its image paths resolved and
    `references` (a list, maybe empty). A problem with the file or a sample exits with one line naming the file, the
    line and the problem.
    """
    samples = []
    for number, line in enumerate(data_lines(path), start=1):
        if not line.strip():
            continue
        try:
            samples.append(parse_sample(line, path.parent))
        except ValueError as problem:
            raise SystemExit(f"{path}:{number}: {problem}") from None
        if limit is not None and len(samples) == limit:
            break
    if not samples:
        raise SystemExit(f"{path}: no samples")
    return samples


def data_lines(path: Path) -> list[str]:
    """The lines of the data file (UTF-8, with or without a byte-order mark)."""
    if path.is_dir():
        raise SystemExit(f"{path}: is a folder; --data takes a JSON-lines file")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SystemExit(f"{path}: cannot read the data file ({error.strerror})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise SystemExit(f"{path}:{line}: not UTF-8 text; save the data file as UTF-8") from None
    # JSON lines end at "\n" only (str.splitlines would also split at characters a JSON string may hold).
    return text.split("\n")


def parse_sample(line: str, folder: Path) -> dict:
    """One sample from its JSON line; a ValueError says what is wrong with it. Image paths are relative to `folder`."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"a sample must be a JSON object {{...}}, got {line.strip()[:40]}")
    if not isinstance(record.get("question"), str):
        raise ValueError("a sample needs a 'question' string")
    if "images" in record:
        images = record["images"]
        if not isinstance(images, list) or not all(isinstance(image, str) for image in images):
            raise ValueError("'images' must be a list of image paths (strings)")
    elif "image" in record:
        if not isinstance(record["image"], str):
            raise ValueError("'image' must be an image path (a string)")
        images = [record["image"]]
    else:
        images = []
    images = [folder / image for image in images]  # an absolute path stays as it is
    for image in images:
        check_image(image)
    if "answers" in record:
        references = record["answers"]
        if isinstance(references, str):
            references = [references]
        elif not isinstance(references, list) or not all(isinstance(answer, str) for answer in references):
            raise ValueError("'answers' must be a string or a list of strings")
    elif "answer" in record:
        if not isinstance(record["answer"], str):
            raise ValueError("'answer' must be a string")
        references = [record["answer"]]
    else:
        references = []
    return {"question": record["question"], "images": images, "references": references}


def check_image(path: Path) -> None:
    """A ValueError unless `path` is a file PIL reads as an image (its structure checked, its pixels not decoded)."""
    if not path.is_file():
        raise ValueError(f"image not found: {path}")
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # PIL raises OSError, SyntaxError, struct.error, ... for a broken file
        raise ValueError(f"not a readable image: {path} ({error})") from None


def answer_all(checkpoint: str, samples: list[dict], args) -> dict:
    """One model's answers to every sample, with their costs."""
    model, processor = load_for_evaluation(checkpoint, device=args.device, dtype=args.dtype)
    answers, costs = [], []
    for start in range(0, len(samples), args.batch_size):
        batch = samples[start : start + args.batch_size]
        images = [[Image.open(path).convert("RGB") for path in sample["images"]] for sample in batch]
        prompts = [user_turn_prompt(processor, sample["question"], len(sample["images"])) for sample in batch]
        for generation in generate_with_cost(
            model, processor, prompts, images, max_new_tokens=args.max_new_tokens, measure_flops=not args.no_flops
        ):
            answers.append(generation.text.strip())
            costs.append(generation.cost)
    print(f"answered {len(samples)} samples with {checkpoint} ({type(model).__name__})", file=sys.stderr)
    return {"answers": answers, "cost": summarize_costs(costs), "costs": [cost.as_dict() for cost in costs]}


def score(answers: list[str], dense_answers: list[str], samples: list[dict]) -> dict:
    """Agreement with the dense answers, and accuracy against the references of the samples that have them."""
    answer_match = metrics.load("answer_match")
    agreement = answer_match.compute(predictions=answers, references=[[answer] for answer in dense_answers])
    result = {"agreement_exact_match": agreement["exact_match"], "agreement_token_f1": agreement["token_f1"]}
    scored = [index for index, sample in enumerate(samples) if sample["references"]]
    if scored:
        predictions = [answers[index] for index in scored]
        references = [samples[index]["references"] for index in scored]
        vqa = metrics.load("vqa_accuracy").compute(predictions=predictions, references=references)
        result["vqa_accuracy"] = vqa["vqa_accuracy"]
        result["exact_match"] = answer_match.compute(predictions=predictions, references=references)["exact_match"]
    return result


COLUMNS = [
    # (header, key, format)
    ("agree EM", "agreement_exact_match", "{:.3f}"),
    ("agree F1", "agreement_token_f1", "{:.3f}"),
    ("VQA acc", "vqa_accuracy", "{:.3f}"),
    ("EM", "exact_match", "{:.3f}"),
    ("prefill FLOPs", "prefill_flops_ratio", "{:.2f}x"),
    ("KV bytes", "kv_cache_bytes_ratio", "{:.2f}x"),
    ("image kept", "image_keep_rate", "{:.0%}"),
    ("output kept", "output_keep_rate", "{:.0%}"),
]


def table_rows(results: dict, dense_name: str) -> dict:
    dense = results[dense_name]["cost"]
    rows = {}
    for name, result in results.items():
        cost = result["cost"]
        rows[name] = {
            **result["scores"],
            "prefill_flops_ratio": None
            if cost.prefill_flops is None or not dense.prefill_flops
            else cost.prefill_flops / dense.prefill_flops,
            "kv_cache_bytes_ratio": cost.kv_cache_bytes / dense.kv_cache_bytes if dense.kv_cache_bytes else None,
            "image_keep_rate": cost.image_keep_rate,
            "output_keep_rate": cost.output_keep_rate,
            "prefill_flops": cost.prefill_flops,
            "kv_cache_bytes": cost.kv_cache_bytes,
        }
    return rows


def display_names(names) -> dict:
    """Folder names instead of full paths, unless two would look the same."""
    short = {name: Path(name).name or name for name in names}
    return short if len(set(short.values())) == len(short) else {name: name for name in names}


def print_table(rows: dict) -> None:
    names = display_names(rows)
    width = max(len("model"), *(len(name) for name in names.values())) + 2
    print(f"{'model':<{width}}" + "".join(f"{header:>14}" for header, _, _ in COLUMNS))
    for name, row in rows.items():
        cells = ["-" if row.get(key) is None else form.format(row[key]) for _, key, form in COLUMNS]
        print(f"{names[name]:<{width}}" + "".join(f"{cell:>14}" for cell in cells))


def plot(rows: dict, path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'sparse-llava[plot]'") from None
    accuracy_key = next(
        (key for key in ("vqa_accuracy", "exact_match") if all(row.get(key) is not None for row in rows.values())),
        "agreement_token_f1",
    )
    if any(row["prefill_flops_ratio"] is None for row in rows.values()):
        raise SystemExit("--plot draws against prefill FLOPs: run without --no-flops")
    figure, axis = plt.subplots(figsize=(6, 4.5))
    names, labels_at = display_names(rows), {}
    for name, row in rows.items():
        point = (row["prefill_flops_ratio"], row[accuracy_key])
        axis.scatter(*point)
        # Models at the same point (the base and a dense-equivalent variant) get their labels stacked.
        stacked = labels_at.setdefault((round(point[0], 3), round(point[1], 3)), [])
        axis.annotate(names[name], point, textcoords="offset points", xytext=(4, 4 + 11 * len(stacked)))
        stacked.append(name)
    axis.set(xlabel="prefill FLOPs (x dense)", ylabel=accuracy_key.replace("_", " "), title="Accuracy against cost")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def positive_integer(text: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the dense llava-hf checkpoint (folder or Hub id)")
    parser.add_argument("--variants", nargs="+", required=True, help="sparse-llava folders or Hub ids")
    parser.add_argument("--data", required=True, type=Path, help="JSON-lines samples (see above)")
    parser.add_argument("--limit", type=positive_integer, default=None, help="only the first N samples")
    parser.add_argument("--batch-size", type=positive_integer, default=8)
    parser.add_argument("--max-new-tokens", type=positive_integer, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--no-flops", action="store_true", help="skip counting prefill FLOPs (one extra forward each)")
    parser.add_argument("--json", default=None, help="write every answer, score and cost here")
    parser.add_argument("--plot", default=None, help="draw accuracy against prefill FLOPs here (PNG)")
    args = parser.parse_args(argv)
    if args.base in args.variants:
        parser.error("--base is also among --variants")
    samples = read_samples(args.data, args.limit)

    results = {name: answer_all(name, samples, args) for name in [args.base, *args.variants]}
    dense_answers = results[args.base]["answers"]
    for result in results.values():
        result["scores"] = score(result["answers"], dense_answers, samples)
    rows = table_rows(results, args.base)
    print(
        f"\n{len(samples)} samples; costs per sample, FLOPs and KV bytes as multiples of the dense base ({args.base})"
    )
    print_table(rows)
    if args.json:
        report = {
            name: {
                "answers": result["answers"],
                "scores": result["scores"],
                "row": rows[name],
                "costs": result["costs"],
            }
            for name, result in results.items()
        }
        Path(args.json).write_text(json.dumps({"base": args.base, "models": report}, indent=2))
    if args.plot:
        plot(rows, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
