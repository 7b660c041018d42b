#!/bin/bash
# Issue 14: the same 4-run sweep with one run per GPU (2 GPUs) and on one GPU; cold vs warm tuning.
set -u
T=/tmp/tuna
nvidia-smi -L | tee $OUT/gpus.txt
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 500 > /tmp/smi.csv &
SMI=$!
python3 - <<'PY'
import torch
from transformers import LlamaConfig, LlamaForCausalLM
c = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
    tie_word_embeddings=True, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)
torch.manual_seed(0)
LlamaForCausalLM(c).to(torch.float16).save_pretrained("/tmp/smol")
PY
xz -dc .dev/tokenizer.json.xz > /tmp/smol/tokenizer.json
cp .dev/reference/tiny-llama/tokenizer_config.json .dev/reference/tiny-llama/chat_template.jinja /tmp/smol/
run() { # name, timeout, args...
  local name=$1 lim=$2; shift 2
  local t0=$(date +%s%N)
  echo "$name start $(date +%H:%M:%S.%N)" >> $OUT/summary.txt
  timeout $lim $T sweep .dev/multi2.yaml "$@" > $OUT/$name.log 2>&1
  local rc=$?
  local t1=$(date +%s%N)
  echo "$name rc=$rc wall_ms=$(( (t1 - t0) / 1000000 )) end $(date +%H:%M:%S.%N)" | tee -a $OUT/summary.txt
  grep -E "training|done in|FAILED" $OUT/$name.log
}
run cold-2gpu 200 --devices vulkan:0,vulkan:1 --set output.dir=/tmp/o-cold
run warm-1gpu 170 --devices vulkan:0 --set output.dir=/tmp/o-1gpu
run warm-2gpu 120 --devices vulkan:0,vulkan:1 --set output.dir=/tmp/o-2gpu
kill $SMI
cp /tmp/smi.csv $OUT/
tar czf $OUT/results.tgz /tmp/o-cold /tmp/o-1gpu /tmp/o-2gpu --exclude='*.safetensors' --exclude='checkpoint*' 2>/dev/null
ls -la $OUT
