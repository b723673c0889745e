# 2-GPU run of _wip_dist_gpu.py (usage on the device machine: bash _wip_dist_gpu.sh; carry .gpu-bundle)
set -o pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
source .gpu-bundle/install.sh || echo "CuTe DSL bundle not installed: the MoE runs on the torch reference"
T0=$SECONDS
python3 _wip_dist_gpu.py write /tmp/flash4 || exit 1
echo "== written at $((SECONDS - T0)) s"
CUDA_VISIBLE_DEVICES=0 timeout 110 python3 _wip_dist_gpu.py run /tmp/flash4 /tmp/one.pt 2>&1 | tee $OUT/one.log
echo "== 1 GPU done at $((SECONDS - T0)) s"
timeout 110 torchrun --standalone --nproc-per-node 2 _wip_dist_gpu.py run /tmp/flash4 /tmp/two.pt 2>&1 | grep -v "^W" | tee $OUT/two.log
echo "== 2 GPUs done at $((SECONDS - T0)) s"
python3 _wip_dist_gpu.py compare /tmp/one.pt /tmp/two.pt 2>&1 | tee $OUT/compare.log
