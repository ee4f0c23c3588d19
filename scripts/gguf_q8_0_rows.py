#!/usr/bin/env python3
"""Round rows of f32 values as ggml rounds activations for a Q8_0 dot product, with llama.cpp's own
Python package, `gguf`: tests/quantized.rs checks surgery's quantized matmul against it.

usage: gguf_q8_0_rows.py IN OUT ROW_LEN

IN: raw little-endian float32, rows of ROW_LEN values (a multiple of 32). OUT: the same rows
quantized to Q8_0 blocks (per 32 values: d = max|x| / 127, q = round(x / d)) and dequantized.
"""
import sys

import numpy as np
import gguf


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    k = int(argv[3])
    rows = np.fromfile(argv[1], dtype="<f4").reshape(-1, k)
    q8 = gguf.GGMLQuantizationType.Q8_0
    values = gguf.quants.dequantize(gguf.quants.quantize(rows, q8), q8)
    np.ascontiguousarray(values, dtype="<f4").tofile(argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
