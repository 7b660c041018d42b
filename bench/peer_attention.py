#!/usr/bin/env python3
"""The peer of `tuna bench attention`: causal attention forward + backward with torch's
scaled_dot_product_attention (flash / memory-efficient kernels) at the same shapes, the same
loss `sum(out * r)`, on the same GPU. Prints one JSON object: {"bench": "attention", "cases": [...]}.
"""
import json
import sys
import time

import torch

# (name, batch, heads, kv heads, positions, head dim), as in src/bench/attention.rs.
CASES = [("smollm2 8x512", 8, 9, 3, 512, 64), ("tinyllama 8x512", 8, 32, 4, 512, 64)]


def main():
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[sys.argv[1] if len(sys.argv) > 1 else "f16"]
    steps = 20
    rows = []
    for name, b, h, kvh, t, hd in CASES:
        r = lambda *s: (torch.rand(*s, device="cuda") * 4 - 2).to(dtype)
        q, k, v = (r(b, h, t, hd).requires_grad_(), r(b, kvh, t, hd).requires_grad_(),
                   r(b, kvh, t, hd).requires_grad_())
        w = r(b, h, t, hd)

        def step():
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            (out * w).sum().backward()
            q.grad = k.grad = v.grad = None

        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 0.5:  # warm up, clocks up (as tuna's keep_busy)
            step()
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) * 1e3 / steps
        rows.append({"case": name, "ms_fwd_bwd": ms})
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps({"bench": "attention", "peer": "torch sdpa", "torch": torch.__version__, "cases": rows}))


if __name__ == "__main__":
    main()
