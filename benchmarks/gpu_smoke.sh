#!/usr/bin/env bash
# The GPU path in one go: meta-training throughput, the optimizer step against AdamW (float32 and bf16) and a short
# meta-training, all on CUDA, printing the same tables as on the CPU; with two GPUs or more, the short
# meta-training again on two processes (torchrun, NCCL). On a machine without a GPU it says so and exits 0.
#
#     bash benchmarks/gpu_smoke.sh            # from the repository root, with the package installed
set -euo pipefail
cd "$(dirname "$0")/.."

gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$gpus" -eq 0 ]; then
    echo "gpu_smoke: no CUDA device here (torch.cuda.is_available() is False); nothing to run"
    exit 0
fi
python -c "import torch; print('gpu_smoke:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| CUDA', torch.version.cuda, '| GPUs:', torch.cuda.device_count())"
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo; echo "== meta-training throughput (Train CNN, 20-step truncations) =="
python benchmarks/meta_throughput.py --device cuda --repeats 5
echo; echo "== optimizer step against AdamW, float32 =="
python benchmarks/step_overhead.py --device cuda --dtype float32
echo; echo "== optimizer step against AdamW, bf16 parameters =="
python benchmarks/step_overhead.py --device cuda --dtype bfloat16
echo; echo "== a short meta-training on the GPU (smoke preset) =="
time python -m amalgam_plugin.cli amalgamate --preset smoke --device cuda --no-eval --out "$out/student"
python -c "
import sys, torch
from amalgam_plugin.optim import AmalgamOptimizer
model = torch.nn.Linear(64, 10).cuda().to(torch.bfloat16)
opt = AmalgamOptimizer(model.parameters(), student=sys.argv[1])
for _ in range(3):
    model(torch.randn(8, 64, device='cuda', dtype=torch.bfloat16)).float().square().mean().backward()
    opt.step(); opt.zero_grad()
assert all(torch.isfinite(p).all() for p in model.parameters())
print('the GPU-trained student steps a bf16 model on the GPU: ok')
" "$out/student"
if [ "$gpus" -ge 2 ]; then
    echo; echo "== the same on two processes, one GPU each (torchrun, NCCL) =="
    time python -m torch.distributed.run --standalone --nproc_per_node 2 -m amalgam_plugin.cli amalgamate \
        --preset smoke --device cuda --no-eval --out "$out/student2"
fi
echo; echo "gpu_smoke: done"
