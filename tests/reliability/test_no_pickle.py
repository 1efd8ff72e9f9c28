"""No weights or checkpoint file a user passes in ever runs code, and one that does not fit says what differs
in one line.

Every path that reads such a file (each feature extractor's ``--weights``, ``export CKPT``, model folders for
``generate`` / ``denoise`` / ``meddiff_mri``, open_clip folders, Hugging Face text folders, meddiff CLIP
folders) gets payload files that would create a marker file when unpickled: a plain pickle whose
``__reduce__`` calls ``open`` or ``os.system``, the same inside ``torch.save`` files (zip and torch < 1.6's
legacy format), and whole pickled modules (the format of torchxrayvision's releases, which the
``xrv_densenet121`` loader reads through an allow-list) carrying a payload attribute. Each is refused
with one ``error:`` line (or a ``MeddiffError`` where no verb reaches the path), the marker never appears,
and nothing in the working folder changes.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from harness import TINY_UNET, Snapshot, assert_clean_error, run_meddiff
from safetensors.torch import load_file, save_file

from meddiff import Image, MeddiffError
from meddiff.io import save_image


class OpenMarker:
    """Unpickled, it creates (truncates) the file ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class SystemMarker:
    """Unpickled, it runs ``touch path`` in a shell."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


def write_payload(path: Path, kind: str, marker: Path) -> Path:
    """A file at ``path`` that creates ``marker`` when anything unpickles it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps(OpenMarker(marker), protocol=2))
    elif kind == "pickle-system":
        path.write_bytes(pickle.dumps(SystemMarker(marker), protocol=2))
    elif kind == "pickle-5":
        path.write_bytes(pickle.dumps(OpenMarker(marker), protocol=5))
    elif kind in ("torch-zip", "torch-legacy"):  # a state dict whose tensors sit beside the payload
        state = {"state_dict": {"conv.weight": torch.zeros(2, 2), "evil": OpenMarker(marker)}}
        torch.save(state, path, _use_new_zipfile_serialization=kind == "torch-zip")
    # a whole pickled model, as torchxrayvision releases them, with a payload attribute
    elif kind in ("module-zip", "module-legacy"):
        module = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
        module[0].evil = SystemMarker(marker)
        torch.save(module, path, _use_new_zipfile_serialization=kind == "module-zip")
    else:
        raise ValueError(kind)
    return path


PICKLES = ("pickle", "pickle-system", "pickle-5", "torch-zip", "torch-legacy", "module-zip", "module-legacy")
FEW = ("pickle", "torch-zip", "module-legacy")  # for paths that build a network before they read the file

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "no", "acute", "lesion", "left", "right"]


def write_bert_config(folder: Path) -> None:
    """A tiny BERT's config.json and tokenizer files (vocab.txt): what a Hugging Face folder holds
    besides its weights."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in WORDS))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 16}))
    BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=32).save_pretrained(folder)


def open_clip_folder(folder: Path) -> Path:
    """open_clip's local-dir format with tiny towers (timm ViT-Tiny, the BERT above), no weights yet."""
    write_bert_config(folder)
    config = {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": str(folder), "hf_tokenizer_name": str(folder), "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16},
        },
    }
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    return folder


def clip_folder(folder: Path, text_weights: bool = True) -> Path:
    """A meddiff CLIP export (clip.json, image.safetensors, text/) with random weights."""
    from meddiff.encoders.clip import CLIP_CONFIG, IMAGE_WEIGHTS, JointEmbedding

    towers = torch.nn.Module()
    JointEmbedding._add_image_tower_and_projections(towers, 8, 32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in towers.state_dict().items()}, folder / IMAGE_WEIGHTS)
    (folder / CLIP_CONFIG).write_text(json.dumps({"embed_dim": 8, "text_width": 32, "logit_scale": 14.3}))
    write_bert_config(folder / "text")
    return folder


def images(folder: Path, n: int = 2) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        save_image(Image(rng.random((16, 16), dtype=np.float32), np.eye(4), "MR"), folder / f"img{i}.nii.gz")
    return folder


def evaluate(features: str, weights: str) -> list[str]:
    return ["evaluate", "--real", "real", "--fake", "fake", "--metrics", "fid", "--features", features,
            "--weights", weights, "--cache", "none"]


# path -> (kinds, set-up(work, kind, marker) -> what to run, fragment of the error line)
# what to run: a list (a meddiff command line) or a callable (the Python API, where no verb reaches the path)
def _extractor(name: str):
    def setup(work: Path, kind: str, marker: Path):
        images(work / "real"), images(work / "fake")
        write_payload(work / "weights.pt", kind, marker)
        return evaluate(name, "weights.pt")

    return setup


def _model_folder(verb: str):
    def setup(work: Path, kind: str, marker: Path):
        folder = work / "model"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({"unet": {**TINY_UNET, "spatial_dims": 2}, "schedule": {},
                                                        "image": {"shape": [16, 16]}}))
        write_payload(folder / "model.safetensors", kind, marker)
        if verb == "generate":
            return ["generate", "--model", "model", "-n", "1", "-o", "out"]
        if verb == "denoise":
            images(work / "in", 1)
            return ["denoise", "-i", "in/img0.nii.gz", "-o", "clean.nii.gz", "--model", "model"]
        images(work / "real"), images(work / "fake")
        return evaluate("meddiff_mri", "model")

    return setup


def _export(work: Path, kind: str, marker: Path):
    write_payload(work / "last.ckpt", kind, marker)
    return ["export", "last.ckpt", "exported"]


def _maisi_bundle(work: Path, kind: str, marker: Path):
    """A MAISI bundle folder whose autoencoder checkpoint is the payload (``meddiff export BUNDLE OUT``)."""
    (work / "bundle" / "configs").mkdir(parents=True)
    (work / "bundle" / "models").mkdir()
    (work / "bundle" / "configs" / "inference.json").write_text(json.dumps({
        "trained_autoencoder_path": "$@model_dir + '/autoencoder_epoch273.pt'",
        "trained_diffusion_path": "$@model_dir + '/diffusion.pt'",
        "autoencoder_def": {"_target_": "monai.apps.generation.maisi.networks.autoencoderkl_maisi.AutoencoderKlMaisi",
                            "spatial_dims": 3, "in_channels": 1, "out_channels": 1, "latent_channels": 4,
                            "num_channels": [8, 8], "num_res_blocks": [1, 1], "norm_num_groups": 8,
                            "attention_levels": [False, False]},
        "diffusion_unet_def": {"_target_": "monai.apps.generation.maisi.networks.diffusion_model_unet_maisi."
                                             "DiffusionModelUNetMaisi", "spatial_dims": 3, "in_channels": 4,
                               "out_channels": 4, "num_channels": [8, 8],
                               "attention_levels": [False, False], "num_head_channels": [0, 0], "num_res_blocks": 1,
                               "norm_num_groups": 8},
        "noise_scheduler": {"_target_": "monai.networks.schedulers.ddpm.DDPMScheduler"},
        "output_size": [16, 16, 16], "spacing": [1.0, 1.0, 1.0]}))
    write_payload(work / "bundle" / "models" / "diffusion.pt", kind, marker)
    return ["export", "bundle", "exported"]


def _biomedclip(work: Path, kind: str, marker: Path):
    images(work / "real"), images(work / "fake")
    write_payload(open_clip_folder(work / "biomedclip") / "open_clip_pytorch_model.bin", kind, marker)
    return evaluate("biomedclip", "biomedclip")


def _open_clip_text(work: Path, kind: str, marker: Path):
    from meddiff.encoders import load_text_encoder

    write_payload(open_clip_folder(work / "clip") / "open_clip_pytorch_model.bin", kind, marker)
    return lambda: load_text_encoder(f"local-dir:{work / 'clip'}")


def _hf_text(work: Path, kind: str, marker: Path):
    from meddiff.encoders import load_text_encoder

    write_bert_config(work / "bert")
    write_payload(work / "bert" / "pytorch_model.bin", kind, marker)
    return lambda: load_text_encoder(f"hf:{work / 'bert'}")


def _clip_image(work: Path, kind: str, marker: Path):
    from meddiff.encoders.clip import ClipEncoder

    folder = clip_folder(work / "clip")
    write_payload(folder / "image.safetensors", kind, marker)
    return lambda: ClipEncoder(folder)


def _clip_text(work: Path, kind: str, marker: Path):
    from meddiff.encoders.clip import ClipEncoder

    folder = clip_folder(work / "clip")
    write_payload(folder / "text" / "pytorch_model.bin", kind, marker)
    return lambda: ClipEncoder(folder)


def _clip_as_text_encoder(work: Path, kind: str, marker: Path):
    from meddiff.encoders import load_text_encoder

    folder = clip_folder(work / "clip")
    write_payload(folder / "text" / "pytorch_model.bin", kind, marker)
    return lambda: load_text_encoder(folder)


def _generate_with_text_encoder(work: Path, kind: str, marker: Path):
    """A report-conditioned model folder whose config.json names an hf: text encoder folder:
    generate loads it to encode the prompt."""
    from harness import tiny_model_dir

    folder = tiny_model_dir(work / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_encoder": {"spec": f"hf:{work / 'bert'}"}}))
    write_bert_config(work / "bert")
    write_payload(work / "bert" / "pytorch_model.bin", kind, marker)
    return ["generate", "--model", "model", "-n", "1", "--prompt", "left lesion", "--steps", "2", "-o", "out"]


NEVER = "never unpickles"  # the line names the object it refused
SAFETENSORS = "is not a readable safetensors file"
PATHS = {
    "evaluate radimagenet_resnet50": (PICKLES, _extractor("radimagenet_resnet50"), NEVER),
    "evaluate medicalnet_resnet10": (PICKLES, _extractor("medicalnet_resnet10"), NEVER),
    "evaluate medicalnet_resnet50": (FEW, _extractor("medicalnet_resnet50"), NEVER),
    "evaluate xrv_densenet121": (PICKLES, _extractor("xrv_densenet121"), NEVER),
    "evaluate inception_v3": (PICKLES, _extractor("inception_v3"), NEVER),
    "evaluate biomedclip folder": (FEW, _biomedclip, NEVER),
    "evaluate meddiff_mri model folder": (("pickle", "torch-zip"), _model_folder("evaluate"), SAFETENSORS),
    "generate model folder": (("pickle", "torch-zip", "module-legacy"), _model_folder("generate"), SAFETENSORS),
    "denoise model folder": (("pickle", "torch-zip", "module-legacy"), _model_folder("denoise"), SAFETENSORS),
    "export checkpoint": (PICKLES, _export, NEVER),
    "export MAISI bundle": (PICKLES, _maisi_bundle, NEVER),
    "open_clip local-dir text encoder": (FEW, _open_clip_text, NEVER),
    "hf: text encoder folder": (PICKLES, _hf_text, NEVER),
    "generate with an hf: text encoder": (("pickle", "torch-zip"), _generate_with_text_encoder, NEVER),
    "CLIP folder image.safetensors": (("pickle", "torch-zip"), _clip_image, SAFETENSORS),
    "CLIP folder text tower": (FEW, _clip_text, NEVER),
    "CLIP folder as text encoder": (("pickle", "module-zip"), _clip_as_text_encoder, NEVER),
}
CASES = [(path, kind) for path, (kinds, *_) in PATHS.items() for kind in kinds]


@pytest.mark.parametrize(("path", "kind"), CASES, ids=[f"{p} <- {k}" for p, k in CASES])
def test_a_pickled_payload_is_refused_and_never_runs(path, kind, workdir, tmp_path):
    _, setup, fragment, *allowed = PATHS[path]  # allowed: a verb's declared output, where it has one
    marker = tmp_path / "MARKER"
    run = setup(workdir, kind, marker)
    before = Snapshot(workdir)
    if callable(run):
        with pytest.raises(MeddiffError) as raised:
            run()
        assert not marker.exists(), f"the payload ran: {marker} exists"
        message = str(raised.value)
        assert "\n" not in message and fragment in message, message
    else:
        result = run_meddiff(*run)
        assert not marker.exists(), f"the payload ran: {marker} exists"
        assert_clean_error(result, fragment)
    before.assert_unchanged(allowed=allowed[0] if allowed else ())


def _custom_code(folder: Path, marker: Path) -> None:
    """A config.json that asks transformers to import the folder's own modeling file, which would create ``marker``."""
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")


def _custom_hf(work: Path, marker: Path):
    from meddiff.encoders import load_text_encoder

    write_bert_config(work / "bert")
    _custom_code(work / "bert", marker)
    return lambda: load_text_encoder(f"hf:{work / 'bert'}")


def _custom_open_clip(work: Path, marker: Path):
    from meddiff.encoders import load_text_encoder

    folder = open_clip_folder(work / "clip")
    torch.save({}, folder / "open_clip_pytorch_model.bin")
    _custom_code(folder, marker)
    return lambda: load_text_encoder(f"local-dir:{folder}")


def _custom_clip(work: Path, marker: Path):
    from meddiff.encoders.clip import ClipEncoder

    folder = clip_folder(work / "clip")
    _custom_code(folder / "text", marker)
    return lambda: ClipEncoder(folder)


CUSTOM_CODE = {"hf: folder": _custom_hf, "open_clip local-dir text tower": _custom_open_clip,
               "CLIP folder text tower": _custom_clip}


@pytest.mark.parametrize("path", list(CUSTOM_CODE))
def test_a_folder_asking_to_run_its_own_code_is_refused(path, workdir, tmp_path):
    """transformers would import a folder's own Python file for a config with auto_map (after a prompt);
    meddiff never does."""
    marker = tmp_path / "MARKER"
    run = CUSTOM_CODE[path](workdir, marker)
    before = Snapshot(workdir)
    with pytest.raises(MeddiffError, match=r"auto_map.*never does") as raised:
        run()
    assert not marker.exists() and "\n" not in str(raised.value)
    before.assert_unchanged()


# -- weights that do not fit the config: one line naming the folder and what differs ------------------------------


@pytest.fixture(scope="module")
def tiny_state(tmp_path_factory):
    """A tiny exported model folder's config and tensors, to be altered case by case."""
    from harness import tiny_model_dir

    folder = tiny_model_dir(tmp_path_factory.mktemp("fit") / "model")
    return json.loads((folder / "config.json").read_text()), load_file(folder / "unet.safetensors")


def _changed_channels(config, state):
    config["unet"]["channels"] = [32, 64]
    return config, state


def _missing_tensor(config, state):
    state.pop(min(state))
    return config, state


def _extra_tensor(config, state):
    state["time_embed.9.weight"] = torch.zeros(3)
    return config, state


def _more_res_blocks(config, state):
    config["unet"]["num_res_blocks"] = 2
    return config, state


MISFITS = {
    "channels in config.json": (_changed_channels, "of another shape (first: "),
    "a tensor missing": (_missing_tensor, "1 tensor missing (first: missing "),
    "an unexpected tensor": (_extra_tensor, "1 unexpected (first: unexpected time_embed.9.weight)"),
    "more res blocks in config.json": (_more_res_blocks, "tensors missing"),
}


@pytest.mark.parametrize("verb", ["generate", "denoise"])
@pytest.mark.parametrize("misfit", list(MISFITS))
def test_a_model_folder_whose_weights_do_not_fit_its_config_is_one_line(misfit, verb, tiny_state, workdir):
    alter, fragment = MISFITS[misfit]
    config, state = alter(json.loads(json.dumps(tiny_state[0])), dict(tiny_state[1]))
    folder = workdir / "bad model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(state, folder / "unet.safetensors")
    images(workdir / "in", 1)
    before = Snapshot(workdir)
    argv = (["generate", "--model", folder, "-n", "1", "-o", "out"] if verb == "generate"
            else ["denoise", "-i", "in/img0.nii.gz", "-o", "x.nii.gz", "--model", folder])
    assert_clean_error(run_meddiff(*argv), str(folder), "unet.safetensors does not fit config.json", fragment,
                       "meddiff export")
    before.assert_unchanged()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A DiffusionModule checkpoint as Lightning writes one: hyper_parameters and state_dict."""
    from meddiff.training import DiffusionModule

    module = DiffusionModule.from_flat(spatial_dims=2, image_shape=(16, 16), **TINY_UNET)
    return {"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict(), "epoch": 0, "global_step": 1}


def _ckpt_channels(ckpt):
    ckpt["hyper_parameters"]["unet"]["channels"] = [32, 64]


def _ckpt_missing(ckpt):
    ckpt["state_dict"].pop(max(ckpt["state_dict"]))


EXPORT_MISFITS = {"channels in hyper_parameters": (_ckpt_channels, "of another shape"),
                  "a tensor missing": (_ckpt_missing, "1 tensor missing")}


@pytest.mark.parametrize("misfit", list(EXPORT_MISFITS))
def test_export_of_a_checkpoint_that_does_not_fit_is_one_line(misfit, checkpoint, workdir):
    alter, fragment = EXPORT_MISFITS[misfit]
    ckpt = {**checkpoint, "hyper_parameters": copy.deepcopy(checkpoint["hyper_parameters"]),
            "state_dict": dict(checkpoint["state_dict"])}
    alter(ckpt)
    torch.save(ckpt, workdir / "last.ckpt")
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("export", "last.ckpt", "exported"), "last.ckpt", "do not fit", fragment)
    before.assert_unchanged()


def test_the_same_checkpoint_unaltered_exports_and_generates(checkpoint, workdir):
    """The control: the files the cases above alter load, so the refusals are about what was altered."""
    torch.save(checkpoint, workdir / "last.ckpt")
    assert run_meddiff("export", "last.ckpt", "exported").code == 0
    result = run_meddiff("generate", "--model", "exported", "-n", "1", "--steps", "2", "-o", "out")
    assert result.code == 0, result.err
