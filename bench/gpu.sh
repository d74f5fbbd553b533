#!/usr/bin/env bash
# The GPU rows of docs/results.md (NVIDIA H200), in one go, most important first:
#   ViT-B/16 and ViT-L/16 against Hugging Face ViTMAE (fp32 and bf16, memory, MFU), CrossMAE's decoder
#   against MAE's (ViT-B/16 eager and compiled, ViT-Tiny/4), ViT-B/16 at a
#   larger batch eager (with an operator profile) and through torch.compile, then the end-to-end
#   throughput of ViT-B/16 and ViT-L/16 fed by the real data loader (bundled sample, 224 px), and of
#   ViT-Tiny/4 at 32 px fed by loader workers and by data.on_device=true; FSDP2 on one GPU; then the rows toward
#   40% MFU (batch 1024, CUDA graphs, fused AdamW) and the ImageNet-size rows (bench/loader.py's folder and its
#   256-px shards feeding the compiled ViT-B/16 trainer, against the compiled model step at the same batch).
#   STEPs run in this file's order; several calls with the same OUT_DIR append to one log.
#
#   bash bench/gpu.sh [OUT_DIR [STEP ...]]    # OUT_DIR default bench/results/gpu; STEP: only these
#   RUNS=DIR bash bench/gpu.sh ...            # the trainer's run folders in DIR (default OUT_DIR)
#   DATA=DIR bash bench/gpu.sh ...            # the ViT-Tiny/4 rows on DIR (default: the bundled sample)
#   IMAGENET=DIR bash bench/gpu.sh ...        # the ImageNet-size rows' folder (default /tmp/imagenet_like)
#
# The last steps run the trainer itself (pretrain.py: Accelerate, bf16, the data loader, checkpoints and
# export) on ViT-B/16 at 224 px, eager and with train.compile=true; images/s are in their metrics.jsonl.
#
# Each step has its own time limit, and a failing step does not stop the ones after it; the last
# lines of each step's output go to the terminal, everything to OUT_DIR/log.txt.
set -u
out=${1:-bench/results/gpu}
shift $(($# > 0 ? 1 : 0))
only=" $* "
runs=${RUNS:-$out}  # where the trainer's runs go (checkpoints, export)
data=${DATA:-sample}  # the 32-px rows' dataset: sample, or a folder of CIFAR-10 parquet shards
imagenet=${IMAGENET:-/tmp/imagenet_like}  # the ImageNet-size rows' JPEG folder (made when missing) and its _256 shards
mkdir -p "$out"
log="$out/log.txt"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

wanted() { [[ $only == "  " || $only == *" $1 "* ]]; }  # no STEP given, or NAME among them

step() {  # step NAME LIMIT_S ARGS...: run one benchmark, keep going whatever it returns
    local name=$1 limit=$2 start
    shift 2
    wanted "$name" || return 0
    echo "== $name ($(date +%T)): $*" | tee -a "$log"
    start=$(wc -l <"$log")
    timeout "$limit" "$py" "$@" >>"$log" 2>&1
    local rc=$?
    tail -n +$((start + 1)) "$log" | grep -v -e '^USDT' -e 'DeviceProperties' -e '^ *$' | tail -n 14 | sed "s/^/  /"
    echo "== $name: exit $rc ($(date +%T))" | tee -a "$log"
}

train() {  # train NAME OVERRIDES...: pretrain.py afresh in $runs/NAME, then its last images/s lines
    local name=$1
    shift
    wanted "$name" || return 0
    rm -rf "${runs:?}/$name"  # a finished run left there would only be resumed
    step "$name" 200 pretrain.py "$@" output_dir="$runs/$name"
    grep -h images_per_s "$runs/$name/metrics.jsonl" 2>/dev/null | tail -n "${TAIL:-3}" | tee -a "$log"
}

if [[ ! -s $log ]]; then  # once per OUT_DIR: a later call with other STEPs appends to the same log
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee -a "$log"
    "$py" -c "import torch, timm, transformers, datasets, pyarrow; print('torch', torch.__version__, '| timm',
timm.__version__, '| transformers', transformers.__version__, '| datasets', datasets.__version__, '| pyarrow',
pyarrow.__version__, '|', torch.cuda.get_device_name())" 2>&1 | tee -a "$log"
fi

step base 200 bench/vs_hf.py --setting base --device cuda --out "$out/vs_hf_base.json"
step large 200 bench/vs_hf.py --setting large --device cuda --out "$out/vs_hf_large.json"
# CrossMAE's decoder against MAE's, same encoder: eager fp32 and bf16, then bf16 compiled at batch 512
step crossmae_base 200 bench/crossmae.py --setting base --device cuda --out "$out/crossmae_base.json"
step crossmae_base_b512_compile 240 bench/crossmae.py --setting base --device cuda --batch 512 --precisions bf16 \
    --compile --out "$out/crossmae_base_b512_compile.json"
step crossmae_tiny 120 bench/crossmae.py --setting tiny --device cuda --out "$out/crossmae_tiny.json"
step base_b512 90 bench/vs_hf.py --setting base --device cuda --batch 512 --precisions bf16 --no-memory \
    --profile 3 --out "$out/vs_hf_base_b512.json"
step base_b512_compile 200 bench/vs_hf.py --setting base --device cuda --batch 512 --precisions bf16 --no-memory \
    --compile --out "$out/vs_hf_base_b512_compile.json"
step e2e_base 90 bench/throughput.py --preset vit_base_patch16 --image-size 224 --batch 128 --device cuda \
    --precision bf16 --workers 12 --repeats 3 --steps 5 --data sample --out "$out/throughput_base.json"
step e2e_large 90 bench/throughput.py --preset vit_large_patch16 --image-size 224 --batch 64 --device cuda \
    --precision bf16 --workers 12 --repeats 3 --steps 5 --data sample --out "$out/throughput_large.json"
step e2e_tiny 90 bench/throughput.py --preset vit_tiny_patch4 --image-size 32 --batch 256 --device cuda \
    --precision bf16 --workers 8 --repeats 3 --steps 3 --data "$data" --out "$out/throughput_tiny.json"
step e2e_tiny_on_device 90 bench/throughput.py --preset vit_tiny_patch4 --image-size 32 --batch 256 --device cuda \
    --precision bf16 --on-device --repeats 3 --steps 3 --data "$data" --out "$out/throughput_tiny_on_device.json"
train=(model.preset=vit_base_patch16 data.image_size=224 train.batch_size=128 train.max_steps=60 data.num_workers=14
    train.log_every=10 train.checkpoint_every=60 train.recon_every=60)
for compile in false true; do
    train "train_compile_$compile" "${train[@]}" train.compile=$compile
done
# FSDP2 on one GPU (configs/accelerate/fsdp.yaml, NCCL): catches device bugs of the sharded path (sharded
# checkpoint, gathered export) that the CPU tests cannot; the last lines say "distributed: FSDP2 ..."
fsdp=(model.preset=vit_base_patch16 data.image_size=224 train.batch_size=64 train.max_steps=30 data.num_workers=8
    train.log_every=10 train.checkpoint_every=15 train.recon_every=30)
if wanted fsdp_one_gpu; then
    rm -rf "${runs:?}/fsdp_one_gpu"
    step fsdp_one_gpu 240 -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml --num_processes 1 \
        pretrain.py "${fsdp[@]}" output_dir="$runs/fsdp_one_gpu"
    grep -h '"type"' "$runs/fsdp_one_gpu/derived.json" | tee -a "$log"
    grep -h images_per_s "$runs/fsdp_one_gpu/metrics.jsonl" 2>/dev/null | tail -n 2 | tee -a "$log"
fi
if wanted fsdp_one_gpu_compile; then  # resumes nothing: a run folder of its own
    rm -rf "${runs:?}/fsdp_one_gpu_compile"
    step fsdp_one_gpu_compile 300 -m accelerate.commands.launch --config_file configs/accelerate/fsdp.yaml \
        --num_processes 1 pretrain.py "${fsdp[@]}" train.compile=true output_dir="$runs/fsdp_one_gpu_compile"
    grep -h images_per_s "$runs/fsdp_one_gpu_compile/metrics.jsonl" 2>/dev/null | tail -n 2 | tee -a "$log"
fi
# the questions the rows above leave open, for a second lease
step large_bf16_alone 120 bench/vs_hf.py --setting large --device cuda --precisions bf16 --no-memory \
    --out "$out/vs_hf_large_bf16.json"
step base_b1024_compile 200 bench/vs_hf.py --setting base --device cuda --batch 1024 --precisions bf16 \
    --no-memory --compile --impls ours --out "$out/vs_hf_base_b1024_compile.json"
step base_b512_graphs 240 bench/vs_hf.py --setting base --device cuda --batch 512 --precisions bf16 --no-memory \
    --compile reduce-overhead --impls ours --out "$out/vs_hf_base_b512_graphs.json"
step large_b256_compile 240 bench/vs_hf.py --setting large --device cuda --batch 256 --precisions bf16 \
    --no-memory --compile --out "$out/vs_hf_large_b256_compile.json"
tiny=(data.dataset="$data" data.image_size=32 train.batch_size=512 train.max_steps=100 train.log_every=20
    train.checkpoint_every=100 train.recon_every=100 train.compile=true)
train train_tiny_workers "${tiny[@]}" data.num_workers=14
train train_tiny_on_device "${tiny[@]}" data.on_device=true
# ImageNet-size JPEGs: bench/loader.py makes 5,000 (around 500x375) and their 256-px shards (mae.prepare on every
# core) and times the loader per core; then the compiled ViT-B/16 trainer at 224 px fed by 14 workers from each,
# end to end against the compiled model step (base_b512_compile)
# 10,000 images: an epoch of 39 steps at batch 256, so most logged windows of 10 steps hold no epoch start
step imagenet_like 300 bench/loader.py --folder "$imagenet" --images 10000 --repeats 3 --batches 4 \
    --out "$out/loader_imagenet_like.json"
# the compiled model step alone at the trainer's batch (ours only, random images in memory): what "fed at full
# speed" is measured against
step base_b256_compile 200 bench/vs_hf.py --setting base --device cuda --batch 256 --precisions bf16 --no-memory \
    --compile --impls ours --out "$out/vs_hf_base_b256_compile.json"
imagenet_train=("${train[@]}" train.compile=true train.batch_size=256 train.max_steps=80 train.checkpoint_every=80
    train.recon_every=80)
TAIL=8 train train_imagenet_like_256 "${imagenet_train[@]}" data.dataset="${imagenet}_256"
TAIL=8 train train_imagenet_like "${imagenet_train[@]}" data.dataset="$imagenet"
# the same from the original JPEGs decoded, cropped and normalised by DALI on the GPU (nvJPEG; the optional
# extra: pip install -e ".[dali]"; without it the row stops at its one-line error), 14 DALI threads
TAIL=8 train train_imagenet_like_dali "${imagenet_train[@]}" data.dataset="$imagenet" data.decoder=dali
# toward 40% MFU: torch's fused AdamW against the engine's foreach AdamW, same compiled step, side by side
step base_b512_fused 240 bench/vs_hf.py --setting base --device cuda --batch 512 --precisions bf16 --no-memory \
    --compile --impls ours --optimizers foreach fused --out "$out/vs_hf_base_b512_fused.json"
step large_compile 200 bench/vs_hf.py --setting large --device cuda --precisions bf16 --no-memory --compile \
    --out "$out/vs_hf_large_compile.json"
step base_compile 150 bench/vs_hf.py --setting base --device cuda --precisions bf16 --no-memory --compile \
    --out "$out/vs_hf_base_compile.json"
