#!/usr/bin/env python3
"""Dequantize GGUF tensors with llama.cpp's own Python package, `gguf`: the reference that
tests/gguf_reference.rs compares surgery's reader and dequantization against, bit for bit.

usage: gguf_dequant.py GGUF OUT_DIR [NAME...]

For each named tensor (every tensor when none is named) writes OUT_DIR/<name>.f32, raw
little-endian float32 in row-major order (outermost dimension first, ggml's ne[0] last, as
surgery's reader reports shapes), and prints `name<TAB>type<TAB>d0,d1,...` with that shape.
"""
import sys
from pathlib import Path

import numpy as np
import gguf


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    reader = gguf.GGUFReader(argv[1])
    out_dir = Path(argv[2])
    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = argv[3:]
    by_name = {t.name: t for t in reader.tensors}
    missing = [n for n in wanted if n not in by_name]
    if missing:
        print(f"no such tensor(s): {', '.join(missing)}", file=sys.stderr)
        return 1
    for name in wanted or list(by_name):
        t = by_name[name]
        # t.shape is in ggml order (ne[0] first); dequantize returns numpy (row-major) order.
        shape = [int(d) for d in reversed(t.shape)]
        values = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype="<f4")
        if values.size != int(np.prod(shape)):
            print(f"{name}: {values.size} values for shape {shape}", file=sys.stderr)
            return 1
        values.tofile(out_dir / f"{name}.f32")
        print(name, t.tensor_type.name, ",".join(map(str, shape)), sep="\t")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
