#!/usr/bin/env bash
# `make demo`: the whole kvcal flow in a few seconds.
#   On the small demo decoder: demo data -> gen-config (configs/example.cfg) -> calibrate ->
#   inspect-record, then a re-calibration with another config to show the overwrite report.
#   On a tiny transformers Llama: kvcal layers -> gen-config (glob) -> calibrate with the
#   cache tap (the default), then the proj tap (AMCT's semantics) as a dry run.
#   On a small CNN: the whole-network PTQ config (gen-config --ptq), then its calibration.
#   Last, text -> calibrate -> export: the Llama saved with a tokenizer, exported for vllm-ascend.
# Everything lands in demo_out/ (git-ignored), recreated on each run.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/kvcal ]]; then
    KVCAL=.venv/bin/kvcal
    PYTHON=.venv/bin/python
else
    KVCAL=kvcal
    PYTHON=python3
fi
MODEL=scripts/demo_model.py:build
OUT=demo_out

step() { printf '\n== %s\n' "$*" >&2; }

rm -rf "$OUT"
mkdir -p "$OUT"

step "1. demo data: token-id batches in $OUT/data"
"$PYTHON" scripts/make_demo_data.py "$OUT/data" --batches 4

step "2. gen-config: configs/example.cfg -> $OUT/config.json"
"$KVCAL" gen-config --model "$MODEL" --cfg configs/example.cfg -o "$OUT/config.json"

step "3. calibrate -> $OUT/record.txt (report in $OUT/report.json)"
"$KVCAL" calibrate --model "$MODEL" --config "$OUT/config.json" --dataset "$OUT/data" \
    --record "$OUT/record.txt" --report "$OUT/report.json" --device auto

step "4. inspect-record"
"$KVCAL" inspect-record "$OUT/record.txt"

step "5. re-calibrate with configs/hfmg_per_channel.cfg: the overwrite report shows old -> new"
"$KVCAL" gen-config --model "$MODEL" --cfg configs/hfmg_per_channel.cfg -o "$OUT/config_per_channel.json"
cp "$OUT/record.txt" "$OUT/record_example.txt"
"$KVCAL" calibrate --model "$MODEL" --config "$OUT/config_per_channel.json" --dataset "$OUT/data" \
    --record "$OUT/record.txt" --device auto

step "6. inspect-record --diff: the first calibration against the second"
"$KVCAL" inspect-record "$OUT/record_example.txt" --diff "$OUT/record.txt"

HF=scripts/demo_hf_model.py:build
step "7. a transformers Llama (tiny, built locally): its Linear layers and which are K/V projections"
"$KVCAL" layers --model "$HF"

step "8. gen-config with a glob, then calibrate what its KV cache stores (the default tap: keys after RoPE)"
"$PYTHON" scripts/demo_hf_model.py "$OUT/hf_data"
"$KVCAL" gen-config --model "$HF" --quant-layers 'model.layers.*.self_attn.[kv]_proj' \
    --algo hfmg --granularity per_channel --batch-num 2 -o "$OUT/hf_config.json"
"$KVCAL" calibrate --model "$HF" --config "$OUT/hf_config.json" --dataset "$OUT/hf_data" \
    --record "$OUT/hf_record.txt" --report "$OUT/hf_report.json" --device auto

step "9. the same with AMCT's semantics (--tap proj: the k_proj/v_proj outputs), as a dry run"
"$KVCAL" calibrate --model "$HF" --config "$OUT/hf_config.json" --dataset "$OUT/hf_data" \
    --record "$OUT/hf_record.txt" --tap proj --dry-run --device auto

CNN=scripts/demo_cnn_model.py:build
step "10. PTQ (whole network): a small CNN, configs/ptq_example.cfg -> $OUT/ptq_config.json"
"$PYTHON" scripts/demo_cnn_model.py "$OUT/cnn_data"
"$KVCAL" gen-config --ptq --model "$CNN" --dataset "$OUT/cnn_data" --cfg configs/ptq_example.cfg \
    -o "$OUT/ptq_config.json"

step "11. PTQ calibration: BN fusion, DMQ, ARQ weights, IFMR inputs -> $OUT/ptq_record.txt, with per-layer SQNR"
"$KVCAL" calibrate --model "$CNN" --config "$OUT/ptq_config.json" --dataset "$OUT/cnn_data" \
    --record "$OUT/ptq_record.txt" --report "$OUT/ptq_report.json" --device auto
"$KVCAL" inspect-record "$OUT/ptq_record.txt"

step "12. text -> calibrate -> export: the Llama saved with its tokenizer, symmetric per-channel C8 factors, a vllm-ascend directory"
"$PYTHON" scripts/demo_hf_model.py --save "$OUT/hf_model" --text "$OUT/calib.jsonl"
HF_DIR=(--model transformers:AutoModelForCausalLM.from_pretrained --model-arg "$OUT/hf_model")
"$KVCAL" gen-config "${HF_DIR[@]}" --cfg configs/c8.cfg -o "$OUT/c8.json"
"$KVCAL" calibrate "${HF_DIR[@]}" --config "$OUT/c8.json" --dataset "$OUT/calib.jsonl" --record "$OUT/c8.txt"
"$KVCAL" export "$OUT/c8.txt" --model-dir "$OUT/hf_model" --format vllm-ascend -o "$OUT/hf_model_c8"

step "done: $OUT/config.json, $OUT/record.txt, $OUT/report.json, $OUT/hf_record.txt, $OUT/hf_report.json, $OUT/ptq_config.json, $OUT/ptq_record.txt, $OUT/ptq_report.json, $OUT/hf_model_c8/"
