#!/usr/bin/env bash
# GPU check of the real entry points (run on a CUDA machine from the repo root):
# torchrun + NCCL MAE pretraining (bf16) and fine-tuning on a synthetic store, then MAE
# train-step throughput for ViT-B/L at 224. Prints figures; writes logs under ${OUT:-/tmp}.
set -euo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/retflow_gpu}; mkdir -p "$OUT"
WORK=$(mktemp -d)
python3 - "$WORK" <<'PY'
import sys, numpy as np, pandas as pd
from pathlib import Path
from retflow.data.store import write_images
root = Path(sys.argv[1])
for name, n, labelled in (("pool", 4096, False), ("clinic", 512, True)):
    d = root / name; d.mkdir()
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (n, 224, 224, 3), dtype=np.uint8)
    write_images(d, imgs, shard_size=1024)
    split = np.array(["train", "train", "val", "test"])[np.arange(n) % 4]
    m = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "patient_id": [f"p{i}" for i in range(n)],
                      "split": split if labelled else "pool", "index": np.arange(n)})
    if labelled:
        m["label"] = (np.arange(n) % 5).astype(str)
    m.to_parquet(d / "manifest.parquet")
PY
VIT='{"arch": "vit_base_patch16_224", "img_size": 224, "patch_size": 16}'
PRE='{"vit": '$VIT', "decoder": {"embed_dim": 512, "depth": 8, "num_heads": 16}, "norm_pix_loss": true, "mask_ratio": 0.75, "epochs": 2, "batch_size": 256, "accum_iter": 1, "blr": 1.5e-4, "min_lr": 0.0, "warmup_epochs": 1, "weight_decay": 0.05, "crop_scale": [0.2, 1.0], "init": null, "seed": 0, "device": "cuda", "num_workers": 8, "checkpoint_every_steps": 0}'
SECONDS=0
torchrun --standalone --nnodes=1 --nproc_per_node=1 workflow_scripts/pretrain.py --settings "$PRE" --stores "$WORK/pool" --out-dir "$WORK/mae" 2>&1 | tee "$OUT/pretrain.log"
echo "pretrain wall s: $SECONDS"
FT=$(python3 - <<'PY'
# the workflow's recipe for a demo task (retflow.settings.build), at ViT-B/224 on a 5-class toy label
from retflow.settings import build, load_config
s = build.finetune(load_config("config.yaml"), "finetune", "dr_grading", 1.0, 0)
s = s.replace(task=s.task.replace(name="toy", label="label", type="multiclass"),
              vit=s.vit.replace(arch="vit_base_patch16_224", img_size=224, patch_size=16, in_chans=3, model_kwargs={}),
              device="cuda", epochs=2, batch_size=64, blr=5e-3, layer_decay=0.65, drop_path=0.2, warmup_epochs=1,
              crop_scale=(0.5, 1.0), min_steps=0, class_weights="none", num_workers=8)
print(s.to_json())
PY
)
python3 workflow_scripts/finetune.py --settings "$FT" --store "$WORK/clinic" --init "$WORK/mae/checkpoint.pth" --out-dir "$WORK/ft" 2>&1 | tee "$OUT/finetune.log"
python3 workflow_scripts/predict.py --checkpoint "$WORK/ft/best.pth" --store "$WORK/clinic" --label label --device cuda --out "$WORK/ft/ext.parquet"
cp "$WORK/mae/recon.png" "$OUT/" || true
for cfg in "vit_base_patch16_224 256" "vit_large_patch16_224 128" "vit_large_patch16_224 256"; do
  set -- $cfg
  python3 bench/bench_mae_step.py --arch $1 --batch $2 --steps 15 --warmup 5
done
python3 bench/bench_mae_step.py --arch vit_large_patch16_224 --batch 256 --steps 15 --warmup 5 --compile || echo "compile run failed"
