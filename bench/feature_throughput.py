"""Feature-extraction throughput of each extractor on this machine (images or volumes per second).

Throughput does not depend on the weight values, so networks whose pretrained weights cannot be
downloaded here run with random weights written in their release format.

    python bench/feature_throughput.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from meddiff import Image
from meddiff.metrics.features import _RADIMAGENET_CHILDREN, _resnet, load_extractor


def write_random_weights(folder: Path) -> None:
    names = {v: k for k, v in _RADIMAGENET_CHILDREN.items()}
    state = {f"backbone.{names[k.partition('.')[0]]}.{k.partition('.')[2]}": v for k, v in _resnet(50, 2, n_input_channels=3).state_dict().items()}
    torch.save(state, folder / "RadImageNet-ResNet50.pt")
    from monai.networks.nets import DenseNet121

    xrv = {k.replace(".layers.", ".").replace("class_layers.out.", "classifier."): v for k, v in DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict().items()}
    torch.save(xrv, folder / "xrv-densenet121-res224-all.pt")
    for depth in (10, 50):
        network = _resnet(depth, 3, n_input_channels=1, shortcut_type="B", bias_downsample=False)
        torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}}, folder / f"resnet_{depth}_23dataset.pth")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    slice_ = Image(rng.random((256, 256), dtype=np.float32), np.eye(4), "MR")
    volume = Image(rng.random((128, 128, 128), dtype=np.float32), np.eye(4), "MR")
    with tempfile.TemporaryDirectory() as tmp:
        write_random_weights(Path(tmp))
        os.environ["MEDDIFF_WEIGHTS"] = tmp
        cases = [("meddiff_mri", slice_, "256x256 slice"), ("radimagenet_resnet50", slice_, "256x256 slice (resized to 224)"),
                 ("xrv_densenet121", slice_, "256x256 slice (resized to 224)"),
                 ("meddiff_mri", volume, "128^3 volume, 2.5D (3 planes x 8 slices)"),
                 ("radimagenet_resnet50", volume, "128^3 volume, 2.5D (3 planes x 8 slices)"),
                 ("medicalnet_resnet10", volume, "128^3 volume"), ("medicalnet_resnet50", volume, "128^3 volume")]
        print(f"torch threads {torch.get_num_threads()}, median of {args.repeats} after one warm-up")
        for name, image, what in cases:
            extractor = load_extractor(name)
            extractor.features(image)
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                extractor.features(image)
                times.append(time.perf_counter() - start)
            median = statistics.median(times)
            print(f"| {name} | {what} | {median:.3f} s | {1 / median:.2f} per s |", flush=True)


if __name__ == "__main__":
    main()
