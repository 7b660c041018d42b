#!/usr/bin/env python3
"""The peer of `tuna bench matmul`: the same cases with torch.matmul (cuBLAS) on the same GPU.

Prints one JSON object like tuna's: {"bench": "matmul", "cases": [{"case", "ms", "tflops"}...]}.
The case table is read from tuna's source so the two can never drift apart.
"""
import json
import re
import sys
import time
from pathlib import Path

import torch

SRC = Path(__file__).resolve().parent.parent / "src" / "bench" / "matmul.rs"


def cases():
    text = SRC.read_text()
    pat = re.compile(r'\("([^"]+)", (\d+), (\d+), (\d+), Layout::(\w+), (\d+)\)')
    return [(n, int(m), int(k), int(nn), lay, int(b)) for n, m, k, nn, lay, b in pat.findall(text)]


def main():
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}[
        sys.argv[1] if len(sys.argv) > 1 else "f16"
    ]
    iters = 20
    rows = []
    for name, m, k, n, layout, batch in cases():
        g = torch.Generator(device="cuda").manual_seed(m * 31 + k * 7 + n)
        r = lambda *s: torch.rand(*s, device="cuda", generator=g, dtype=torch.float32).mul(2).sub(1).to(dtype)
        if layout == "Nt":
            lhs, rhs = r(batch, m, k), r(batch, n, k)
            f = lambda: torch.matmul(lhs, rhs.transpose(1, 2))
        elif layout == "Nn":
            lhs, rhs = r(batch, m, k), r(batch, k, n)
            f = lambda: torch.matmul(lhs, rhs)
        elif layout == "Tn":
            lhs, rhs = r(batch, k, m), r(batch, k, n)
            f = lambda: torch.matmul(lhs.transpose(1, 2), rhs)
        else:
            lhs, rhs = r(batch, k, m), r(batch, n, k)
            f = lambda: torch.matmul(lhs.transpose(1, 2), rhs.transpose(1, 2))
        for _ in range(3):
            f()
        passes = []
        for _ in range(2):  # two timed passes, the faster reported, as tuna's bench does
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            keep = [f() for _ in range(iters)]
            torch.cuda.synchronize()
            passes.append((time.perf_counter() - t0) / iters)
            del keep
        s = min(passes)
        row = {"case": name, "m": m, "k": k, "n": n, "batch": batch, "layout": layout.lower(),
               "ms": s * 1e3, "tflops": 2 * batch * m * k * n / s / 1e12}
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    print(json.dumps({"bench": "matmul", "device": torch.cuda.get_device_name(), "dtype": str(dtype), "cases": rows}))


if __name__ == "__main__":
    main()
