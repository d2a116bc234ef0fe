#!/usr/bin/env bash
# One prepared GPU check: step throughput/memory at paper size (g2d, with the text prefix store, vs the
# release design) and a short
# end-to-end `g2d pretrain` with the paper model on CUDA (bf16, channels_last, fused AdamW).
# Flags of bench_step.py: docs/benchmarks.md.
# Usage on the device machine: bash benchmarks/gpu.sh  (writes to $OUT or ./gpu_out)
# PART=1 runs the test and the g2d-vs-release step at batch 64/128 (timeouts sum to 590 s), PART=2 the
# option comparisons and the short pretrain (590 s); default both. Split the parts across
# two calls where one command may run at most 10 minutes.
set -uo pipefail
PART=${PART:-all}
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
if [ "$PART" != 2 ]; then
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_pseudo_mask.py -k cuda > "$OUT/pytest_cuda.log" 2>&1
echo "cuda pseudo-mask test exit $?"; tail -3 "$OUT/pytest_cuda.log"
# side by side: g2d (bf16, fused AdamW, channels_last, length-grouped text), g2d with the stored frozen
# text prefix (train.text_prefix_store; its build time is in the JSON), the release design (fp16 +
# GradScaler, pad to 256, NumPy masks with a host sync), and g2d with trainable embeddings
for B in 64 128; do
  timeout 250 python3 benchmarks/bench_step.py --device cuda --batch $B --steps 10 --warmup 3 \
    --variants g2d,g2d_text_store,g2d_trainable_emb,release_design \
    --flops --peak-tflops 989 --json "$OUT/step_b$B.json" > "$OUT/step_b$B.log" 2>&1
  echo "bench batch $B exit $?"; tail -8 "$OUT/step_b$B.log"
done
fi
[ "$PART" = 1 ] && exit 0
# torch.compile (train.compile) and the memory format, measured against g2d in the same run
timeout 240 python3 benchmarks/bench_step.py --device cuda --batch 128 --steps 10 --warmup 3 \
  --variants g2d,g2d_compile,g2d_contiguous,g2d_no_buckets --json "$OUT/step_b128_options.json" \
  > "$OUT/step_b128_options.log" 2>&1
echo "bench options exit $?"; tail -8 "$OUT/step_b128_options.log"
# precision, optimizer and data-path options, each against g2d (bf16, fused AdamW, 8 pinned workers)
timeout 180 python3 benchmarks/bench_step.py --device cuda --batch 128 --steps 10 --warmup 3 \
  --variants g2d,g2d_fp32,g2d_fp16,g2d_foreach_adamw,g2d_sync_loading,g2d_no_pin \
  --json "$OUT/step_b128_amp_optim_loader.json" > "$OUT/step_b128_amp_optim_loader.log" 2>&1
echo "bench amp/optim/loader exit $?"; tail -9 "$OUT/step_b128_amp_optim_loader.log"
python3 -c "
from g2d.model.text_encoder import build_tiny_text_model
from g2d.data.synthetic import SyntheticCXR
ds = SyntheticCXR(num_samples=256, image_size=32)
build_tiny_text_model('/tmp/bert_base_random', [ds[i]['text'] for i in range(256)], vocab_size=3000, hidden=768, layers=12, heads=12)"
timeout 170 python3 -m g2d pretrain --preset paper --data synthetic --out /tmp/gpu_run --max-steps 40 \
  --batch-size 128 --no-progress model.image.weights=none model.text.model=/tmp/bert_base_random \
  data.synthetic_samples=8192 data.num_workers=8 train.log_every=10 > "$OUT/pretrain.log" 2>&1
echo "pretrain exit $?"; tail -8 "$OUT/pretrain.log"
