"""Feature-extraction throughput of each extractor on this machine (images or volumes per second).

Throughput does not depend on the weight values, so networks whose pretrained weights cannot be
downloaded here run with random weights written in their release format.

    python -m bench.feature_throughput [--repeats 3] [--only biomedclip,inception_v3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench import harness
from meddiff import Image
from meddiff.metrics.features import _RADIMAGENET_CHILDREN, load_extractor, medicalnet_resnet


def write_random_weights(folder: Path) -> None:
    names = {v: k for k, v in _RADIMAGENET_CHILDREN.items()}
    state = {f"backbone.{names[k.partition('.')[0]]}.{k.partition('.')[2]}": v
             for k, v in medicalnet_resnet(50, 2, n_input_channels=3).state_dict().items()}
    torch.save(state, folder / "RadImageNet-ResNet50.pt")
    from monai.networks.nets import DenseNet121

    xrv = {k.replace(".layers.", ".").replace("class_layers.out.", "classifier."): v
           for k, v in DenseNet121(spatial_dims=2, in_channels=1, out_channels=18).state_dict().items()}
    torch.save(xrv, folder / "xrv-densenet121-res224-all.pt")
    for depth in (10, 50):
        network = medicalnet_resnet(depth, 3, n_input_channels=1, shortcut_type="B", bias_downsample=False)
        torch.save({"state_dict": {f"module.{k}": v for k, v in network.state_dict().items()}},
                   folder / f"resnet_{depth}_23dataset.pth")


def write_random_inception(folder: Path) -> None:
    """torch-fidelity's release format (its FeatureExtractorInceptionV3's state dict), random values."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as fidelity

    class Unloaded(fidelity.FeatureExtractorInceptionV3):
        def load_state_dict(self, *args, **kwargs):  # keep the random initialisation
            return None

    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *args, **kwargs: {}):  # nothing is downloaded
        torch.save(Unloaded("inception-v3-compat", ["2048"]).state_dict(),
                   folder / "weights-inception-2015-12-05-6726825d.pth")


def write_random_biomedclip(folder: Path) -> None:
    """BiomedCLIP's open_clip folder at full size (ViT-B/16 image tower, BERT-base text tower), random values."""
    import json

    import open_clip
    from transformers import BertConfig

    from meddiff.metrics.features import BIOMEDCLIP_FOLDER

    folder = folder / BIOMEDCLIP_FOLDER
    folder.mkdir()
    bert = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
    config = {
        "model_cfg": {
            "embed_dim": 512,
            "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": bert, "hf_tokenizer_name": bert, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    BertConfig(vocab_size=30522).save_pretrained(folder)  # BERT-base, BiomedBERT's sizes
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(30517)]
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in words))
    text_cfg = {**config["model_cfg"]["text_cfg"], "hf_model_name": str(folder), "hf_tokenizer_name": str(folder),
                "hf_model_pretrained": False}
    torch.save(open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg).state_dict(),
               folder / "open_clip_pytorch_model.bin")


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("feature_throughput"), repeats=3)
    parser.add_argument("--only", help="comma-separated extractor names (default: all)")
    return parser


def run(args: argparse.Namespace) -> None:
    only = set(args.only.split(",")) if args.only else None
    rng = np.random.default_rng(0)
    slice_ = Image(rng.random((256, 256), dtype=np.float32), np.eye(4), "MR")
    volume = Image(rng.random((128, 128, 128), dtype=np.float32), np.eye(4), "MR")
    with tempfile.TemporaryDirectory() as tmp:
        write_random_weights(Path(tmp))
        if only is None or "inception_v3" in only:
            write_random_inception(Path(tmp))
        if only is None or "biomedclip" in only:
            write_random_biomedclip(Path(tmp))
        os.environ["MEDDIFF_WEIGHTS"] = tmp
        cases = [("meddiff_mri", slice_, "256x256 slice"),
                 ("radimagenet_resnet50", slice_, "256x256 slice (resized to 224)"),
                 ("xrv_densenet121", slice_, "256x256 slice (resized to 224)"),
                 ("biomedclip", slice_, "256x256 slice (resized to 224)"),
                 ("inception_v3", slice_, "256x256 slice (resized to 299)"),
                 ("meddiff_mri", volume, "128^3 volume, 2.5D (3 planes x 8 slices)"),
                 ("radimagenet_resnet50", volume, "128^3 volume, 2.5D (3 planes x 8 slices)"),
                 ("biomedclip", volume, "128^3 volume, 2.5D (3 planes x 8 slices)"),
                 ("inception_v3", volume, "128^3 volume, 2.5D (3 planes x 8 slices)"),
                 ("medicalnet_resnet10", volume, "128^3 volume"), ("medicalnet_resnet50", volume, "128^3 volume")]
        cases = [case for case in cases if only is None or case[0] in only]
        extractors = {name: load_extractor(name) for name in dict.fromkeys(name for name, _, _ in cases)}
        for name, image, _ in cases:
            extractors[name].features(image)  # warm-up
        print(f"torch threads {torch.get_num_threads()}, median of {args.repeats} rounds after one warm-up, "
              "the cases alternating within each round")
        times: dict[int, list[float]] = {i: [] for i in range(len(cases))}
        for _ in range(args.repeats):  # alternating, so that load from other processes falls on every case alike
            for i, (name, image, _) in enumerate(cases):
                with harness.stopwatch(times[i]):
                    extractors[name].features(image)
        rows = []
        for i, (name, _, what) in enumerate(cases):
            timing = harness.summary(times[i])
            median = timing["median"]
            rows.append({"extractor": name, "input": what, **{f"{k}_s": v for k, v in timing.items()},
                         "per_s": 1 / median})
            print(f"| {name} | {what} | {median:.3f} s | {1 / median:.2f} per s |", flush=True)
    harness.write_result("feature_throughput", args, {"torch_threads": torch.get_num_threads(),
                                                      "repeats": args.repeats, "rows": rows}, args.out)


if __name__ == "__main__":
    harness.main(run, options)
