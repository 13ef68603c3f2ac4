#!/usr/bin/env bash
# GPU smoke check + bf16 benchmark on the tiny model (run from the repo root on a GPU machine).
# Writes its results under $OUT (default /tmp/sd-demo-gpu-check).
set -uo pipefail
OUT="${OUT:-/tmp/sd-demo-gpu-check}"
mkdir -p "${OUT}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
method="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
scratch="$(mktemp -d)"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import sys, torch, diffusers, transformers, peft, accelerate; print(sys.version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
python3 "${method}/tools/make_tiny_model.py" "${scratch}/tiny" 2>/dev/null
python3 "${method}/tools/make_sample_dataset.py" "${scratch}/ds.zip"

echo "== bench: cuda, 512 px, bf16"
python3 "${method}/bench/bench_trainer.py" --model "${scratch}/tiny" --device cuda --resolution 512 --dtype bf16 --steps 30 --json \
    > "${OUT}/bench_cuda_512_bf16.json" 2> "${OUT}/bench_cuda.err"; echo "rc=$?"; cat "${OUT}/bench_cuda_512_bf16.json"

echo "== sd-demo.py end to end on the GPU (bf16, 512 px)"
mkdir -p "${scratch}/run" && cd "${scratch}/run"
python3 "${method}/sd-demo.py" --model_path="${scratch}/tiny" --pic_relative_path="${scratch}/ds.zip" --train_id=gpu \
    --max_steps=8 --batch_size=2 --resolution=512 --validation_num_inference_steps=4 > "${OUT}/e2e.jsonl" 2> "${OUT}/e2e.err"
echo "rc=$?"; tail -4 "${OUT}/e2e.jsonl"; grep -i "precision\|error" "${OUT}/e2e.err" | head -5
cp output/loss.png "${OUT}/" 2>/dev/null

echo "== the LoRA loads into StableDiffusion3Pipeline on cuda/bf16 and changes the output"
python3 - "${scratch}" <<'PY'
import sys, torch
from diffusers import StableDiffusion3Pipeline
root = sys.argv[1]
pipe = StableDiffusion3Pipeline.from_pretrained(f"{root}/tiny", dtype=torch.bfloat16).to("cuda")
pipe.set_progress_bar_config(disable=True)
run = lambda: pipe("a red circle", num_inference_steps=4, height=512, width=512, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
before = run(); pipe.load_lora_weights(f"{root}/run/output"); after = run()
print("mean |after - before| =", float(abs(after - before).mean()))
PY
