#!/bin/bash
set -u
T=/tmp/tuna
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
t0=$(date +%s%N)
timeout 170 $T sweep .dev/multi2.yaml --devices vulkan:0,vulkan:1 --set train.iters=60 --set output.dir=/tmp/o > $OUT/sweep.log 2>&1
echo "sweep rc=$? wall_ms=$(( ($(date +%s%N) - t0) / 1000000 ))" | tee $OUT/summary.txt
grep -E "training on|done in" $OUT/sweep.log
cat /tmp/o/leaderboard.csv | tee $OUT/leaderboard.csv
for m in /tmp/o/multi2/*/metrics.json; do echo "$m $(grep -o '"device": "[^"]*"' $m)"; done | tee $OUT/devices.txt
CUBECL_DEBUG_LOG=/tmp/prof.log CUBECL_DEBUG_OPTION=profile-medium timeout 240 $T bench train --shape smollm2-135m --device vulkan --dtype f16 --batch 8 --seq 512 --steps 6 > $OUT/bench.json 2> $OUT/bench.err
echo "bench rc=$?" | tee -a $OUT/summary.txt; cat $OUT/bench.json
ls -la /tmp/prof.log; head -c 3000 /tmp/prof.log > $OUT/prof-head.txt
python3 - <<'PY' > /tmp/out_top.txt
import re, collections
unit={'ns':1e-9,'µs':1e-6,'us':1e-6,'ms':1e-3,'s':1.0}
tot=collections.Counter(); cnt=collections.Counter()
for line in open('/tmp/prof.log', errors='replace'):
    parts=[p.strip() for p in line.split('|') if p.strip()]
    if len(parts) < 2: continue
    m=re.match(r'^([0-9.]+)\s*(ns|µs|us|ms|s)$', parts[0])
    if not m: continue
    d=float(m.group(1))*unit[m.group(2)]
    name=re.sub(r'<.*', '', parts[1])[:90]
    tot[name]+=d; cnt[name]+=1
all_t=sum(tot.values())
print(f"total {all_t:.3f} s over {sum(cnt.values())} launches")
for n,t in tot.most_common(40):
    print(f"{t:9.4f} s {100*t/all_t:5.1f}% {cnt[n]:7d}  {n}")
PY
cp /tmp/out_top.txt $OUT/prof-top.txt; head -45 $OUT/prof-top.txt
