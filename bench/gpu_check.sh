#!/usr/bin/env bash
# One prepared GPU check (< 8 minutes on one GPU): run it whenever a GPU machine is lent.
#
#   bash bench/gpu_check.sh                 # results in ${OUT:-bench/_work/gpu_check}/gpu_check.{json,log}
#   SMOKE=1 bash bench/gpu_check.sh         # tiny sizes on CPU: checks the script itself, measures nothing
#
# Parts (each guarded by its own time limit; a failing part prints why and the others still run):
#   1. the GPU model (nvidia-smi) and library versions
#   2. DALI "mixed" multi-crop loader img/s (bench/loader_dali_vs_torchvision.py --device gpu)
#   3. ViT-S/14 DINOv2 train img/s in bf16 on 1 GPU: plain, DDP and FSDP (world size 1), 224 + 8 x 98 px crops
#   4. SimCLR and BYOL ResNet-50 train img/s in bf16, 2 x 224 px views
#   5. faiss-gpu exact k-NN (k=64) of 1M x 384 float32 vectors against themselves (torch top-k if faiss-gpu is missing)
# Training figures use synthetic batches (the loader is part 2): they measure the step, not the input.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-bench/_work/gpu_check}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
JSON="$OUT/gpu_check.json"
SMOKE=${SMOKE:-0}
echo "{}" > "$JSON"
: > "$LOG"
export OMP_WAIT_POLICY=PASSIVE WEBCURATE_QUIET=1 SMOKE JSON

record() {  # record PART STATUS DETAIL: one line in the log, a key in the JSON
  echo "[$1] $2: $3" | tee -a "$LOG"
  "$PY" - "$1" "$2" "$3" <<'EOF'
import json, os, sys
p = os.environ["JSON"]
d = json.load(open(p))
d.setdefault(sys.argv[1], {})["status"] = sys.argv[2]
d[sys.argv[1]]["detail"] = sys.argv[3]
json.dump(d, open(p, "w"), indent=2)
EOF
}

part() {  # part NAME SECONDS CMD...: run with a time limit, record ok / failed with the last lines
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS part_log="$OUT/$name.log"
  echo "=== $name (limit ${limit}s)" | tee -a "$LOG"
  # The parts are shell functions: timeout runs them in a child bash (exported with export -f).
  timeout "$limit" bash -c '"$@"' bash "$@" > "$part_log" 2>&1
  local rc=$?
  cat "$part_log" >> "$LOG"
  if [ "$rc" -eq 0 ]; then
    record "$name" ok "$((SECONDS - t0)) s; $(tail -n 1 "$part_log" | cut -c1-200)"
  else
    local why; why=$(tail -n 3 "$part_log" | tr '\n' ' ' | cut -c1-300)
    [ "$rc" -eq 124 ] && why="timed out after ${limit}s; $why"
    record "$name" failed "rc=$rc: $why"
  fi
}

gpu_info() {
  if [ "$SMOKE" = 1 ]; then echo "SMOKE: no GPU queried"; else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  "$PY" - <<'EOF'
import json, os, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import nvidia.dali as dali
    info["dali"] = dali.__version__
except Exception as e:
    info["dali"] = f"missing: {e}"
try:
    import faiss
    info["faiss"] = faiss.__version__
    info["faiss_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
except Exception as e:
    info["faiss"] = f"missing: {e}"
print(json.dumps(info))
p = os.environ["JSON"]; d = json.load(open(p)); d["versions"] = info; json.dump(d, open(p, "w"), indent=2)
EOF
}

loader_mixed() {
  if [ "$SMOKE" = 1 ]; then
    "$PY" bench/loader_dali_vs_torchvision.py --quick --skip-torchvision --images 64
  else
    "$PY" bench/loader_dali_vs_torchvision.py --device gpu --skip-torchvision --threads 8
  fi
}

train_speed() {  # train_speed METHOD MODEL MODES...: img/s of TrainStep on synthetic batches
  "$PY" - "$@" <<'EOF'
import json, os, sys, tempfile, time
import torch
import torch.distributed as dist
from webcurate.train.config import load_config
from webcurate.train.memory import _fake_batch
from webcurate.train.models import prepare_models, resolve_config
from webcurate.train.schedules import Schedules
from webcurate.train.step import TrainStep

method, model, modes = sys.argv[1], sys.argv[2], sys.argv[3:]
smoke = os.environ.get("SMOKE") == "1"
dev = torch.device("cpu" if smoke else "cuda")
if model == "vits14":
    ov = ["model.name=vit_small_patch14_dinov2", "loader.global_size=224", "loader.local_size=98", "loader.n_local=8",
          "loader.batch_size=64"]
    if smoke:
        ov = ["model.name=vit_tiny_patch16_224", "model.patch_size=8", "model.embed_dim=32", "model.depth=2",
              "model.num_heads=2", "dino.n_prototypes=256", "loader.global_size=32", "loader.local_size=16",
              "loader.n_local=2", "loader.batch_size=4"]
else:
    ov = ["model.name=resnet50", "model.drop_path_rate=0", "loader.global_size=224", "loader.batch_size=128",
          "head.proj_hidden_dim=4096", "head.proj_dim=256", "head.pred_hidden_dim=4096"]
    if smoke:
        ov = ["model.name=resnet18", "model.stem=small_image", "model.drop_path_rate=0",
              "model.timm_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "loader.global_size=32", "loader.batch_size=4"]
steps, warm = (3, 1) if smoke else (20, 5)
results = {}
tmp = tempfile.mkdtemp()
dist.init_process_group("gloo" if smoke else "nccl", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
for mode in modes:
    cfg = resolve_config(load_config(None, ov + [f"method={method}", f"run.fsdp={'true' if mode == 'fsdp' else 'false'}",
                                                 "run.precision=" + ("fp32" if smoke else "bf16")]))
    tr = prepare_models(cfg, dev, distributed=mode in ("ddp", "fsdp"))
    step = TrainStep(cfg, tr.model, tr.student, tr.teacher, tr.optimizer, tr.objective, dev,
                     autocast_dtype=None if smoke else torch.bfloat16, ema=tr.ema)
    sched = Schedules.from_config(cfg, 1000)
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in _fake_batch(cfg, cfg.loader.batch_size).items()}
    for i in range(warm):
        step(batch, sched.at(100 + i))
    if dev.type == "cuda":
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps):
        m = step(batch, sched.at(200 + i))
    float(m["loss"])
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0
    results[mode] = {"img_per_s": round(cfg.loader.batch_size / dt, 1), "s_per_step": round(dt, 4),
                     "batch": cfg.loader.batch_size, "peak_gib": round(mem, 2)}
    print(f"{method} {cfg.model.name} {mode}: {results[mode]}", flush=True)
    del tr, step
dist.destroy_process_group()
p = os.environ["JSON"]; d = json.load(open(p)); d[f"train_{method}_{model}"] = results; json.dump(d, open(p, "w"), indent=2)
EOF
}

knn_1m() {
  "$PY" - <<'EOF'
import json, os, time
import numpy as np
smoke = os.environ.get("SMOKE") == "1"
n, d, k = (20000, 384, 64) if smoke else (1_000_000, 384, 64)
x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
out = {"n": n, "dim": d, "k": k}
try:
    import faiss
    if not smoke and faiss.get_num_gpus() < 1:
        raise RuntimeError("faiss has no GPU support here (faiss-cpu); install faiss-gpu")
    index = faiss.IndexFlatIP(d)
    if not smoke:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    t0 = time.perf_counter(); index.add(x)
    for s in range(0, n, 65536):
        index.search(x[s:s + 65536], k)
    out["faiss_seconds"] = round(time.perf_counter() - t0, 2)
    print(f"faiss flat IP k={k} over {n} x {d}: {out['faiss_seconds']} s", flush=True)
except Exception as e:
    out["faiss_error"] = f"{type(e).__name__}: {e}"
    print(out["faiss_error"], flush=True)
    import torch
    dev = "cpu" if smoke else "cuda"
    xt = torch.from_numpy(x).to(dev).half() if dev == "cuda" else torch.from_numpy(x)
    t0 = time.perf_counter()
    for s in range(0, n, 16384):
        torch.topk(xt[s:s + 16384] @ xt.T, k, dim=1)
    if dev == "cuda":
        torch.cuda.synchronize()
    out["torch_topk_seconds"] = round(time.perf_counter() - t0, 2)
    print(f"torch matmul + topk (fp16) k={k} over {n} x {d}: {out['torch_topk_seconds']} s (faiss-gpu missing)", flush=True)
p = os.environ["JSON"]; dd = json.load(open(p)); dd["knn_1m"] = out; json.dump(dd, open(p, "w"), indent=2)
EOF
}

export -f gpu_info loader_mixed train_speed knn_1m
export PY
T=$SECONDS
# Limits add up to 450 s (7.5 minutes): the whole check stays under 8 minutes whatever hangs.
part gpu_info 30 gpu_info
part loader_mixed 90 loader_mixed
part train_dinov2_vits14 150 train_speed dinov2 vits14 plain ddp fsdp
part train_simclr_resnet50 60 train_speed simclr resnet50 plain
part train_byol_resnet50 60 train_speed byol resnet50 plain
part knn_1m 60 knn_1m
echo "total $((SECONDS - T)) s; results in $JSON, log in $LOG" | tee -a "$LOG"
