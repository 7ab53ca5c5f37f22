"""README.md's Python blocks run as pasted: in the order a reader meets them, in one session, each on the transformers
release it names, with a tiny converted folder in place of the model paths and a small picture as `example.jpg`."""

import re
from pathlib import Path

import numpy as np
from PIL import Image

from sparse_llava.compat_transformers import IS_TRANSFORMERS_V5

README = Path(__file__).resolve().parent.parent / "README.md"
# The model paths the README's blocks name, each standing for a converted folder.
MODEL_PATHS = ("path/or/repo", "llava-1.5-7b-dynamic")


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def for_this_release(block: str) -> bool:
    """A block whose first line names a release (`# transformers 5.x`, `# transformers 4.57.x`) runs only there."""
    first_line = block.splitlines()[0]
    if first_line.startswith("# transformers 5."):
        return IS_TRANSFORMERS_V5
    if first_line.startswith("# transformers 4.57"):
        return not IS_TRANSFORMERS_V5
    return True


def test_readme_python_blocks_run_as_pasted(converted, tmp_path, monkeypatch):
    folder = converted("llava")
    monkeypatch.chdir(tmp_path)
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save("example.jpg")
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 5
    namespace: dict = {}
    ran = 0
    for block in blocks:
        if not for_this_release(block):
            continue
        assert any(path in block for path in MODEL_PATHS) or "model" in namespace, block
        for path in MODEL_PATHS:
            block = block.replace(f'"{path}"', repr(str(folder)))
        exec(compile(block, str(README), "exec"), namespace)
        ran += 1
    assert ran == len(blocks) - 1  # every block but the one for the other transformers line
    # What the blocks left behind: the folder's model (its own code), and a cache holding the generated conversation.
    assert type(namespace["model"]).__name__ == "DynamicLlavaForConditionalGeneration"
    cache = namespace["cache"]
    assert type(cache).__name__ == "SparseCache"
    assert int(cache.get_seq_length()) > namespace["inputs"]["input_ids"].shape[1]
