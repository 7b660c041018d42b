#!/usr/bin/env python3
"""Runs `tuna bench train` and its PyTorch + PEFT peer (bench/peer_peft.py) on the same GPU,
one case after the other, and prints tuna's figures as ratios to the peer's.

    python3 bench/compare.py --tuna target/release/tuna [--cases all|NAME,NAME] [--out DIR]
                             [--alt LABEL=PATH ...]

A case name `NAME+LABEL` runs the binary given as `--alt LABEL=PATH` (another build of tuna, e.g.
one with the `tile-kernels` feature) against NAME's peer, so two builds meet the same peer run.

GPU memory is nvidia-smi's memory.used peak while each program runs, minus what was in use
before it started, sampled every 50 ms for both sides alike. Every speed figure in the README
comes from one run of this script on one machine.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (tuna bench train args, peer args[, environment for tuna]). Same workload on both sides.
CASES = {
    "tinyllama-f16": (["--shape", "tinyllama-1.1b", "--dtype", "f16"],
                      ["--shape", "tinyllama-1.1b", "--dtype", "f16"]),
    "smollm2-f16": (["--shape", "smollm2-135m", "--dtype", "f16"],
                    ["--shape", "smollm2-135m", "--dtype", "f16"]),
    "tinyllama-f16-gc": (["--shape", "tinyllama-1.1b", "--dtype", "f16", "--grad-checkpoint"],
                         ["--shape", "tinyllama-1.1b", "--dtype", "f16", "--grad-checkpoint"]),
    # Seed 004's setting: batch 1 x 512, the last 16 layers, gradient checkpointing.
    "seed004": (["--shape", "tinyllama-1.1b", "--dtype", "f16", "--batch", "1",
                 "--num-layers", "16", "--grad-checkpoint", "--steps", "30"],
                ["--shape", "tinyllama-1.1b", "--dtype", "f16", "--batch", "1",
                 "--num-layers", "16", "--grad-checkpoint", "--steps", "30"]),
    # The same workloads with the optimizer updating one parameter at a time (before the flat
    # update), tuna only: what the flat update saves, measured on its own.
    "smollm2-f16-each": (["--shape", "smollm2-135m", "--dtype", "f16", "--optimizer-per-parameter"], None),
    "tinyllama-f16-each": (["--shape", "tinyllama-1.1b", "--dtype", "f16", "--optimizer-per-parameter"],
                           None),
    # cubecl's default autotune level instead of the `full` tuna sets: what the level gives,
    # measured on its own (a cache of its own, so neither reuses the other's picks).
    "smollm2-f16-balanced": (["--shape", "smollm2-135m", "--dtype", "f16"], None,
                             {"CUBECL_AUTOTUNE_LEVEL": "balanced", "TUNA_CACHE": "/tmp/tc-balanced"}),
    "tinyllama-f16-balanced": (["--shape", "tinyllama-1.1b", "--dtype", "f16"], None,
                               {"CUBECL_AUTOTUNE_LEVEL": "balanced", "TUNA_CACHE": "/tmp/tc-balanced"}),
    "tinyllama-f32": (["--shape", "tinyllama-1.1b", "--dtype", "f32"],
                      ["--shape", "tinyllama-1.1b", "--dtype", "f32"]),
    # Issue 11's target: a Mistral-7B shape on a 4-bit base (QLoRA), batch 1 x 512, block
    # checkpointing, beside the same shape on an f16 base. tuna only (the peer has no 4-bit
    # path installed on the device machine).
    "mistral7b-q4-gc": (["--shape", "mistral-7b", "--dtype", "f16", "--quantize-bits", "4", "--batch", "1",
                         "--grad-checkpoint", "--steps", "5", "--warmup", "2"], None),
    "mistral7b-f16-gc": (["--shape", "mistral-7b", "--dtype", "f16", "--batch", "1",
                          "--grad-checkpoint", "--steps", "5", "--warmup", "2"], None),
}
# The 4-bit Mistral case again after the first has filled the autotune cache (what a sweep's
# later runs and a second process see).
MISTRAL_Q4 = CASES["mistral7b-q4-gc"][0]
CASES["mistral7b-q4-gc-warm"] = (MISTRAL_Q4, None)
# More launches per GPU command than cubecl's default 32 (CUBECL_WGPU_MAX_TASKS), tuna only.
for _name in ("smollm2-f16", "tinyllama-f16"):
    for _tasks in (128, 512):
        CASES[f"{_name}-tasks{_tasks}"] = (CASES[_name][0], None, {"CUBECL_WGPU_MAX_TASKS": str(_tasks)})

# SmolLM2 at twice the batch on both sides: a step bound by the host's cost per operation gains
# almost 2x in tokens/s, one bound by the GPU little.
CASES["smollm2-f16-b16"] = (["--shape", "smollm2-135m", "--dtype", "f16", "--batch", "16"],
                            ["--shape", "smollm2-135m", "--dtype", "f16", "--batch", "16"])

# LoRA's branch by two plain matmuls (TUNA_LORA_BRANCH=plain: autodiff states the skinny
# products) and by the branch op on burn's matmuls (TUNA_LORA_KERNELS=0), tuna only: what the
# op and its kernels give, measured on their own.
for _name in ("smollm2-f16", "tinyllama-f16", "tinyllama-f16-gc", "seed004"):
    CASES[f"{_name}-lora-plain"] = (CASES[_name][0], None, {"TUNA_LORA_BRANCH": "plain"})
    CASES[f"{_name}-lora-nokernels"] = (CASES[_name][0], None, {"TUNA_LORA_KERNELS": "0"})
    # RMSNorm as one autodiff node (TUNA_NORM=op, opt-in: neutral on an H200), tuna only.
    CASES[f"{_name}-norm-op"] = (CASES[_name][0], None, {"TUNA_NORM": "op"})
    # One product per group of projections that read the same input (TUNA_PROJECTIONS=fused:
    # q/k/v and gate/up, model::fused_proj_op; opt-in: no faster on an H100), tuna only: what the
    # fused groups give, measured on their own.
    CASES[f"{_name}-fused"] = (CASES[_name][0], None, {"TUNA_PROJECTIONS": "fused"})

# A case name with one of these suffixes runs tuna with that attention path in training
# (TUNA_ATTENTION) against the peer of the case without it, e.g. `smollm2-f16@composed`.
ATTENTION_PATHS = ("explicit", "fused", "composed", "recompute")


def gpu_mem_mb():
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True).stdout.split()
    return max(int(x) for x in out) if out else 0


def run(cmd, log, timeout, env=None):
    """Runs cmd, returns (last JSON line of stdout, peak GPU MiB above the idle level)."""
    idle = gpu_mem_mb()
    peak = [idle]
    # The peak of each second since the start, above idle: where in a run the memory goes.
    timeline = []
    done = threading.Event()
    t_start = time.time()

    def sample():
        while not done.is_set():
            m = gpu_mem_mb()
            peak[0] = max(peak[0], m)
            sec = int(time.time() - t_start)
            while len(timeline) <= sec:
                timeline.append(0)
            timeline[sec] = max(timeline[sec], m - idle)
            time.sleep(0.05)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.time()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        done.set()
        th.join()
        log.write(f"$ {' '.join(cmd)}\nTIMEOUT after {timeout} s\n{e.stdout or ''}{e.stderr or ''}\n")
        return {"error": [f"timeout after {timeout} s"]}, peak[0] - idle, time.time() - t0
    wall = time.time() - t0
    done.set()
    th.join()
    log.write(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}\n")
    log.flush()
    if p.returncode != 0:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:]}, 0, wall
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1]
    out = json.loads(line)
    out["gpu_mb_per_second"] = timeline
    return out, peak[0] - idle, wall


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tuna", required=True, help="path to the tuna binary")
    ap.add_argument("--cases", default="all")
    ap.add_argument("--device", default="vulkan")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--tuna-extra", default="", help="extra args for tuna bench train")
    ap.add_argument("--timeout", type=float, default=300, help="seconds per program run")
    ap.add_argument("--alt", action="append", default=[], metavar="LABEL=PATH",
                    help="another tuna binary, run for cases named NAME+LABEL")
    a = ap.parse_args()
    alts = dict(x.split("=", 1) for x in a.alt)
    names = list(CASES) if a.cases == "all" else a.cases.split(",")
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
    results = []
    with open(os.path.join(a.out, "compare.log"), "w") as log:
        peers = {}
        for name in names:
            name_bin, _, label = name.partition("+")
            if label and label not in alts:
                sys.exit(f"{name}: no --alt {label}=PATH was given")
            binary = alts[label] if label else a.tuna
            base, _, path = name_bin.partition("@")
            if path and path not in ATTENTION_PATHS:
                sys.exit(f"{name}: the attention path after @ is one of {ATTENTION_PATHS}")
            targs, pargs, *case_env = CASES[base]
            env = {"TUNA_ATTENTION": path} if path else {}
            if label:
                # Its own autotune cache: the other build's picks name kernels it may not have.
                env["TUNA_CACHE"] = f"/tmp/tuna-cache-{label}"
            env.update(*case_env)
            tcmd = [binary, "bench", "train", "--device", a.device, *targs, *a.tuna_extra.split()]
            log.write(f"# env {env}\n")
            t, tmem, twall = run(tcmd, log, a.timeout, env)
            if pargs is None or a.skip_peer:
                p, pmem, pwall = {}, 0, 0
            elif tuple(pargs) in peers:
                p, pmem, pwall = peers[tuple(pargs)]
            else:
                p, pmem, pwall = peers.setdefault(tuple(pargs), run(
                [sys.executable, os.path.join(HERE, "peer_peft.py"), *pargs], log, a.timeout))
            row = {"case": name, "tuna": t, "tuna_gpu_mb": tmem, "tuna_wall_s": twall,
                   "peer": p, "peer_gpu_mb": pmem, "peer_wall_s": pwall}
            results.append(row)
            print(json.dumps(row), flush=True)
    with open(os.path.join(a.out, "compare.json"), "w") as f:
        json.dump({"gpu": gpu, "results": results}, f, indent=1)
    print(f"\nGPU: {gpu}")
    print(f"{'case':<18} {'tuna tok/s':>11} {'peer tok/s':>11} {'speed':>6} "
          f"{'tuna MiB':>9} {'peer MiB':>9} {'mem':>5} {'tuna RSS':>9} {'warmup s':>8}")
    for r in results:
        t, p = r["tuna"], r["peer"]
        ts, ps = t.get("tokens_per_s", 0), p.get("tokens_per_s", 0)
        speed = f"{ts / ps:.2f}" if ps and ts else "-"
        mem = f"{r['tuna_gpu_mb'] / r['peer_gpu_mb']:.2f}" if r["peer_gpu_mb"] and r["tuna_gpu_mb"] else "-"
        print(f"{r['case']:<18} {ts:>11.0f} {ps:>11.0f} {speed:>6} {r['tuna_gpu_mb']:>9} "
              f"{r['peer_gpu_mb']:>9} {mem:>5} {t.get('peak_rss_mb', 0):>9.0f} "
              f"{t.get('warmup_s', 0):>8.1f}")
        if "error" in t:
            print(f"  tuna error: {t['error']}")
        if "error" in p:
            print(f"  peer error: {p['error']}")


if __name__ == "__main__":
    main()
