"""BiomedCLIP-style open_clip models load offline from open_clip's folder format and from a Hugging Face
cache laid out as huggingface_hub writes it, with the BERT text tower's config and tokenizer found locally."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

from meddiff import Image, MeddiffError
from meddiff.encoders import load_text_encoder

BIOMEDCLIP = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BERT = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
WORDS = ("no acute abnormality a mm hyperintense hypointense lesion in the left right anterior posterior region "
         "small large chest").split()
CONTEXT = 16


def tiny_config() -> dict:
    """BiomedCLIP's open_clip_config.json with tiny towers: timm's ViT-Tiny, a 2-layer BERT, 16 text tokens."""
    return {
        "model_cfg": {
            "embed_dim": 24,
            "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                           "timm_proj": "linear", "image_size": 224},
            "text_cfg": {"hf_model_name": BERT, "hf_tokenizer_name": BERT, "hf_proj_type": "mlp",
                         "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CONTEXT},
        },
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }


def write_bert_files(folder: Path) -> None:
    """The text tower's files as BiomedBERT's repo has them: config.json (transformers' BertConfig), vocab.txt
    (one WordPiece token a line) and tokenizer_config.json; no weights: the CLIP checkpoint has them."""
    from transformers import BertConfig

    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + [str(i) for i in range(10)] + WORDS
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in tokens))
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(folder)


def clean_offline_env(monkeypatch, cache: Path | None = None) -> None:
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache or Path("/nonexistent-hf-cache")))


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    """open_clip's folder format (open_clip_config.json + open_clip_pytorch_model.bin) with the BERT files beside them,
    the weights made by open_clip itself from the config."""
    import open_clip

    folder = tmp_path_factory.mktemp("biomedclip-local")
    (folder / "open_clip_config.json").write_text(json.dumps(tiny_config(), indent=2))
    write_bert_files(folder)
    text_cfg = {**tiny_config()["model_cfg"]["text_cfg"], "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder), "hf_model_pretrained": False}
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg)  # random weights: none in the folder yet
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


def _add_to_hub_cache(cache: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A repo in huggingface_hub's cache layout: blobs/<hash>,
    snapshots/<commit>/<name> -> ../../blobs/<hash>, refs/main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for name, source in files.items():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, repo / "blobs" / digest)
        (snapshot / name).symlink_to(Path("../../blobs") / digest)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def hub_cache(local_dir, tmp_path_factory) -> Path:
    """The same model as a Hugging Face cache: BiomedCLIP's repo holds only its config and weights (as on the
    hub), the BERT's repo its config and tokenizer files."""
    cache = tmp_path_factory.mktemp("hf-home") / "hub"
    _add_to_hub_cache(cache, BIOMEDCLIP,
                      {n: local_dir / n for n in ("open_clip_config.json", "open_clip_pytorch_model.bin")})
    bert = {p.name: p for p in local_dir.iterdir()
            if p.name not in ("open_clip_config.json", "open_clip_pytorch_model.bin")}
    _add_to_hub_cache(cache, BERT, bert)
    return cache


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_local_dir_gives_tokens_mask_pooled_and_the_saved_weights(local_dir, monkeypatch):
    clean_offline_env(monkeypatch)
    encoder = load_text_encoder(f"local-dir:{local_dir}")
    assert encoder.dim == 32 and encoder.max_length == CONTEXT
    saved = torch.load(local_dir / "open_clip_pytorch_model.bin", weights_only=True)
    for key, value in encoder.clip.state_dict().items():
        torch.testing.assert_close(value, saved[key])  # the checkpoint was loaded, not a random init
    assert encoder.tokenizer.unk_token_id not in encoder.tokenizer("a 4 mm lesion")["input_ids"]  # the folder's vocab
    reports = ["No acute abnormality.", "A 14 mm hyperintense lesion in the right posterior region.", ""]
    batch = encoder.encode(reports)
    assert batch.tokens.shape[0] == 3 and batch.tokens.shape[2] == 32 and batch.pooled.shape == (3, 32)
    assert batch.mask.sum(dim=1).tolist()[2] == 2  # the empty report: [CLS] [SEP]
    alone = encoder.encode(reports[1:2])
    n = int(alone.mask.sum())
    torch.testing.assert_close(batch.tokens[1, :n], alone.tokens[0, :n])
    # the token states are those of the CLIP text tower's transformer
    ids = encoder.tokenizer(reports[:1], return_tensors="pt")
    torch.testing.assert_close(batch.tokens[0, : ids["input_ids"].shape[1]],
                               encoder.clip.text.transformer(**ids).last_hidden_state[0])
    assert encoder.context(reports).shape == (3, CONTEXT, 32)


def test_hf_hub_spec_loads_from_the_cache_offline_and_matches_local_dir(local_dir, hub_cache, monkeypatch):
    clean_offline_env(monkeypatch, hub_cache)
    encoder = load_text_encoder(f"hf-hub:{BIOMEDCLIP}")
    assert (encoder.spec == f"hf-hub:{BIOMEDCLIP}"
            and "models--microsoft--BiomedNLP" in str(encoder.tokenizer.name_or_path))
    local = load_text_encoder(f"local-dir:{local_dir}")
    reports = ["small lesion in the left region.", "no acute abnormality."]
    torch.testing.assert_close(encoder.encode(reports).tokens, local.encode(reports).tokens)
    torch.testing.assert_close(encoder.encode_text(reports), local.encode_text(reports))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(hub_cache.parent))  # $HF_HOME/hub is the cache too
    assert load_text_encoder(f"hf-hub:{BIOMEDCLIP}").dim == 32


def test_truncation_warning_and_text_cache(local_dir, monkeypatch, caplog):
    clean_offline_env(monkeypatch)
    encoder = load_text_encoder(f"local-dir:{local_dir}")
    long = " ".join(["lesion"] * 40)
    with caplog.at_level(logging.WARNING):
        out = encoder.encode([long, "small lesion"])
    assert out.mask[0].sum() == CONTEXT and "truncated" in caplog.text
    calls = []
    encoder.model.register_forward_hook(lambda *a: calls.append(1))
    again = encoder.encode(["small lesion", long])
    assert calls == []  # both from the cache
    torch.testing.assert_close(again.pooled[1], out.pooled[0])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        encoder.encode_text([long])
    assert "truncated" in caplog.text


def test_missing_files_say_which_file_goes_where(local_dir, tmp_path, monkeypatch):
    clean_offline_env(monkeypatch, tmp_path / "empty-cache")
    with pytest.raises(MeddiffError,
                       match=r"not in the Hugging Face cache .*empty-cache.*never downloads.*hf download"):
        load_text_encoder(f"hf-hub:{BIOMEDCLIP}")
    with pytest.raises(MeddiffError, match="no such folder"):
        load_text_encoder(f"local-dir:{tmp_path / 'nowhere'}")
    folder = tmp_path / "partial"
    folder.mkdir()
    with pytest.raises(MeddiffError, match=f"{folder}/open_clip_config.json is missing"):
        load_text_encoder(f"local-dir:{folder}")
    shutil.copy(local_dir / "open_clip_config.json", folder)
    with pytest.raises(MeddiffError, match="copy the model's open_clip_pytorch_model.bin"):
        load_text_encoder(f"local-dir:{folder}")
    shutil.copy(local_dir / "open_clip_pytorch_model.bin", folder)
    with pytest.raises(MeddiffError,
                       match=rf"text tower '{BERT}' needs its config.json and tokenizer .* put them in {folder}"):
        load_text_encoder(f"local-dir:{folder}")
    # the BERT files only in the cache: found there (the hf-hub case with the model itself in a folder)
    cache = tmp_path / "bert-cache"
    _add_to_hub_cache(cache, BERT,
                      {p.name: p for p in local_dir.iterdir()
                       if p.name in ("config.json", "vocab.txt", "tokenizer_config.json")})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert load_text_encoder(f"local-dir:{folder}").dim == 32
    (folder / "open_clip_pytorch_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(MeddiffError,
                       match="cannot read local-dir:.*open_clip_pytorch_model.bin: not a file of tensors"):
        load_text_encoder(f"local-dir:{folder}")


def test_clip_score_matches_open_clip_reference_use(local_dir, monkeypatch):
    """clip_score through the encoder equals open_clip's documented recipe (its preprocess on a PIL image,
    its tokenizer)."""
    import open_clip
    from PIL import Image as PILImage

    from meddiff.metrics import clip_score

    clean_offline_env(monkeypatch)
    encoder = load_text_encoder(f"local-dir:{local_dir}")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (64, 80)).astype(np.float32) for _ in range(2)]
    for array in arrays:  # 0.5th and 99.5th percentiles at 0 and 255: the 8-bit picture is the array itself
        array[:3], array[-3:] = 0, 255
    reports = ["small lesion in the left region.", "no acute abnormality."]
    result = clip_score([Image(a, np.eye(4), "DX") for a in arrays], reports, encoder)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{local_dir}", text_cfg={
        **tiny_config()["model_cfg"]["text_cfg"], "hf_model_name": str(local_dir), "hf_tokenizer_name": str(local_dir),
        "hf_model_pretrained": False})
    with torch.inference_mode():
        image = torch.stack([preprocess(PILImage.fromarray(a.T.astype(np.uint8)).convert("RGB")) for a in arrays])
        image_emb = torch.nn.functional.normalize(encoder.clip.encode_image(image), dim=-1)
        tokens = open_clip.get_tokenizer(f"local-dir:{local_dir}")(reports)
        text_emb = torch.nn.functional.normalize(encoder.clip.encode_text(tokens), dim=-1)
    expected = (100 * (image_emb * text_emb).sum(-1).clamp_min(0)).tolist()
    np.testing.assert_allclose(result["per_item"], expected, rtol=1e-4, atol=1e-4)
    assert encoder.preprocess_cfg.size == (224, 224)
    with pytest.raises(MeddiffError, match="2D images"):
        encoder.encode_image([np.zeros((4, 4, 4), np.float32)])


def test_evaluate_cli_clip_metric_uses_manifest_reports(local_dir, tmp_path, monkeypatch):
    from meddiff import save_image
    from meddiff.cli.main import main
    from meddiff.data.manifest import Record

    clean_offline_env(monkeypatch)
    rng = np.random.default_rng(0)
    fake = tmp_path / "fake"
    records = []
    for i, report in enumerate(["small lesion in the left region.", "no acute abnormality."]):
        save_image(Image(rng.random((40, 48), dtype=np.float32), np.eye(4), "MR"), fake / f"f{i}.nii.gz")
        records.append(Record(image=f"f{i}.nii.gz", modality="MR", report=report))
    (fake / "manifest.jsonl").write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in records))
    out = tmp_path / "eval.json"
    args = ["evaluate", "--real", str(fake), "--fake", str(fake), "--metrics", "clip",
            "--clip", f"local-dir:{local_dir}"]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())["clip"]
    assert result["images"] == 2 and 0 <= result["clip_score"] <= 100 and result["encoder"] == f"local-dir:{local_dir}"
    (fake / "manifest.jsonl").unlink()
    assert main(args) == 2  # a plain folder has no reports


def test_report_conditioned_module_takes_an_open_clip_text_encoder(local_dir, monkeypatch):
    from meddiff.training import DiffusionModule

    clean_offline_env(monkeypatch)
    torch.manual_seed(0)
    module = DiffusionModule.from_flat(
        spatial_dims=2, channels=(16, 32), attention_levels=(False, True), num_head_channels=16,
        norm_num_groups=16, image_shape=(16, 16), text_encoder=f"local-dir:{local_dir}",
        condition_dropout=0.0)
    assert module.model_config().unet.cross_attention_dim == 32
    for p in module.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1,
             "report": ["small lesion in the left region.", "no acute abnormality."]}
    other = {**batch, "report": ["large lesion in the right region.", "large hypointense lesion."]}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert module.loss(batch, gen()) != module.loss(other, gen())
    assert not any("text_encoder" in name for name in module.state_dict())


def test_biomedclip_extractor_from_weights_dir_and_cache(local_dir, hub_cache, tmp_path, monkeypatch, mni_t1):
    from meddiff import load_image
    from meddiff.metrics.features import BIOMEDCLIP_FOLDER, load_extractor

    clean_offline_env(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.setenv("MEDDIFF_WEIGHTS", str(tmp_path / "weights"))
    with pytest.raises(MeddiffError, match=f"{tmp_path / 'weights' / BIOMEDCLIP_FOLDER}.*Using BiomedCLIP offline"):
        load_extractor("biomedclip")
    with pytest.raises(MeddiffError, match="biomedclip --weights takes a folder"):
        load_extractor("biomedclip", tmp_path / "missing.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache))
    extractor = load_extractor("biomedclip")  # from the cache
    slice_ = Image(np.random.default_rng(0).random((100, 120), dtype=np.float32), np.eye(4), "MR")
    flat = extractor.features(slice_)
    assert list(flat) == ["2d"] and flat["2d"].shape == (1, 24)
    np.testing.assert_allclose(flat["2d"][0], extractor_encoder_reference(local_dir, slice_), rtol=1e-4, atol=1e-5)
    shutil.copytree(local_dir, tmp_path / "weights" / BIOMEDCLIP_FOLDER)
    from_folder = load_extractor("biomedclip")  # the weights folder comes first
    assert from_folder.identity == extractor.identity  # same checkpoint file, same cache key
    volume = load_image(mni_t1)
    from_folder.slices = 2
    views = from_folder.features(Image(volume.array[::6, ::6, ::6], volume.affine @ np.diag([6, 6, 6, 1]), "MR"))
    assert sorted(views) == ["axial", "coronal", "sagittal"] and all(v.shape == (2, 24) for v in views.values())


def extractor_encoder_reference(local_dir: Path, image: Image) -> np.ndarray:
    """The image embedding as the encoder's own encode_image gives it."""
    encoder = load_text_encoder(f"local-dir:{local_dir}")
    return encoder.encode_image([image])[0].double().numpy()


def test_no_hf_offline_variable_is_needed(local_dir, hub_cache, monkeypatch):
    """The cache look-ups are file-system only: with HF_HUB_OFFLINE unset (and the network refused)
    hf-hub: still loads."""
    clean_offline_env(monkeypatch, hub_cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert load_text_encoder(f"hf-hub:{BIOMEDCLIP}").encode_text(["lesion"]).shape == (1, 24)
