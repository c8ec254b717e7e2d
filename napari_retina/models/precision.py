"""The arithmetic the segmenters' networks run in.

On a processor that computes bfloat16 natively (AVX512-BF16 or AMX on a CPU, a recent GPU),
oneDNN and cuDNN run the convolutions in bfloat16 about twice as fast as in float32 (the
full-scale microaneurysm network over a 4288 x 2848 photograph, one core: 26.9 -> 13.0 s).
The maps then differ from float32 ones by at most a few hundredths and by 2e-4 on average
(benchmarks/segment_speed.py and `napari-retina evaluate` measure both ways). Elsewhere, or
with NAPARI_RETINA_FLOAT32=1 in the environment, everything stays float32.
"""

from __future__ import annotations

import contextlib
import os

FLOAT32_ENV = "NAPARI_RETINA_FLOAT32"


def bf16_native(device) -> bool:
    """Whether `device` (a torch.device or its name) computes bfloat16 natively."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        try:  # emulated bfloat16 (pre-Ampere GPUs) is slow: count only native support
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # torch without the including_emulation argument
            return bool(torch.cuda.is_bf16_supported())
    if device.type != "cpu":
        return False
    try:  # torch's own CPU feature probes (private, hence the fallback)
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def inference_dtype(device) -> str:
    """"bfloat16" or "float32": what `inference_precision(device)` runs the networks in."""
    if os.environ.get(FLOAT32_ENV, "").strip() not in ("", "0"):
        return "float32"
    return "bfloat16" if bf16_native(device) else "float32"


def inference_precision(device):
    """A context in which the networks' convolutions run in bfloat16 where `device` does it natively
    (torch.autocast: weights, inputs and outputs stay float32), else a context that changes nothing.
    Autocast is per thread: enter it in the thread that runs the network."""
    import torch

    device = torch.device(device)
    if inference_dtype(device) == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
