#!/usr/bin/env python3
"""The peer of `tuna bench train`: the same LoRA workload in PyTorch + transformers + PEFT.

Random weights of a model shape (the same shapes as `tuna bench train --shape`), LoRA on the
given modules of the last N layers (all by default), AdamW, random token ids, loss over every
position, batch B x T. Warmup steps are excluded from the timing. Prints one JSON object.

GPU memory is PyTorch's peak reserved memory plus the CUDA context, read as nvidia-smi's
memory.used peak by `bench/compare.py`, which samples both programs the same way.
"""

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                           rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
                           max_position_embeddings=2048),
}

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--keys", default="q_proj,v_proj")
    p.add_argument("--num-layers", type=int, default=-1)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--attn", default="sdpa", help="transformers attn_implementation")
    a = p.parse_args()

    torch.manual_seed(0)
    dev = torch.device("cuda")
    dtype = DTYPES[a.dtype]
    cfg = LlamaConfig(**SHAPES[a.shape], attn_implementation=a.attn)
    t0 = time.time()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(dtype)
    n_layers = cfg.num_hidden_layers
    layers = None if a.num_layers < 0 else list(range(n_layers - a.num_layers, n_layers))
    lcfg = LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                      target_modules=a.keys.split(","), layers_to_transform=layers,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)  # adapters in f32 (PEFT's autocast_adapter_dtype)
    if a.grad_checkpoint:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    load_s = time.time() - t0
    g = torch.Generator(device=dev).manual_seed(7)

    def step():
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev, generator=g)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    tw = time.time()
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    warmup_s = time.time() - tw
    torch.cuda.reset_peak_memory_stats()
    tm = time.time()
    for _ in range(a.steps):
        loss = step()
    torch.cuda.synchronize()
    secs = time.time() - tm
    print(json.dumps({
        "bench": "train", "peer": "pytorch+peft", "shape": a.shape, "dtype": a.dtype,
        "batch": a.batch, "seq": a.seq, "steps": a.steps, "rank": a.rank, "keys": a.keys,
        "num_layers": a.num_layers, "grad_checkpoint": a.grad_checkpoint, "attn": a.attn,
        "tokens_per_s": a.batch * a.seq * a.steps / secs, "s_per_step": secs / a.steps,
        "warmup_s": warmup_s, "load_s": load_s, "last_loss": float(loss),
        "torch_peak_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
        "torch_peak_reserved_mb": torch.cuda.max_memory_reserved() / 2**20,
        "torch": torch.__version__,
    }))


if __name__ == "__main__":
    main()
