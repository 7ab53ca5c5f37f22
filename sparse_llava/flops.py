"""FLOP counting for prefill costs: torch's `FlopCounterMode`, with attention counted on every device.

torch counts `scaled_dot_product_attention` through the GPU kernels only; on CPU it runs
`_scaled_dot_product_flash_attention_for_cpu`, which the counter would skip, leaving attention out of every CPU
measurement. Counting it with torch's own sdpa formula makes CPU and GPU numbers agree.
"""

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """A `FlopCounterMode` (no display) that also counts CPU flash attention."""
    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return FlopCounterMode(display=False, custom_mapping={cpu_attention: _cpu_flash_attention_flops})
