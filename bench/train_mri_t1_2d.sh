#!/usr/bin/env bash
# Reproduce the bundled mri-t1-2d on a CPU (about 65 minutes on 2 cores): the training slices, 35 + 30 minutes of
# python -m bench.train_generator (the bundled weights were trained in these two runs), then the float16 package.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m bench.inpaint_data --modality MR --out runs/gen_data
python -m bench.train_generator --data runs/gen_data/inpaint_mr.npz --out runs/mri_t1_2d --train-seconds 2100
python -m bench.train_generator --data runs/gen_data/inpaint_mr.npz --out runs/mri_t1_2d_more --train-seconds 1800 \
    --init runs/mri_t1_2d/model
python -m meddiff.cli.main export runs/mri_t1_2d_more/model meddiff/models/mri-t1-2d --dtype float16 --overwrite
