"""The int8 format's names where they used to live: the formats are in `phi2.engine.formats` now (int8, int4,
int4-mixed), the kernels in `phi2.engine.kernels`. Kept so that code written against this module still works;
new code imports `phi2.engine.formats`."""

from __future__ import annotations

from phi2.engine.aligned_safetensors import ALIGNMENT, MisalignedFileError
from phi2.engine.formats import kernels_in_use
from phi2.engine.formats.common import QUANTIZATION_FILE, WEIGHTS_FILE, Bf16Embedding, widened_linear
from phi2.engine.formats.int8 import (
    FALLBACK_ROWS,
    FORMAT,
    KERNEL_ROWS,
    LAYOUT_VERSION,
    Int8Linear,
    layout_problem,
    load,
    quantize_weight,
    quantized_state_dict,
    save,
)

__all__ = [
    "ALIGNMENT",
    "FALLBACK_ROWS",
    "FORMAT",
    "KERNEL_ROWS",
    "LAYOUT_VERSION",
    "QUANTIZATION_FILE",
    "WEIGHTS_FILE",
    "Bf16Embedding",
    "Int8Linear",
    "MisalignedFileError",
    "kernels_in_use",
    "layout_problem",
    "load",
    "quantize_weight",
    "quantized_state_dict",
    "save",
    "widened_linear",
]
