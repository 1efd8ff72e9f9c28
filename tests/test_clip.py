"""meddiff's own CLIP: trains on findings pairs, logs retrieval recall, exports a text tower that conditions
diffusion."""

from __future__ import annotations

import json
import shutil

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from meddiff import MeddiffError
from meddiff.cli.main import main
from meddiff.encoders import load_text_encoder
from meddiff.encoders.clip import ClipEncoder
from meddiff.metrics import clip_score
from meddiff.training.clip import ClipModule, recall_at_k


def test_recall_at_k_counts_identical_reports_as_the_same_answer():
    similarity = torch.tensor([[0.1, 0.9, 0.0], [0.2, 0.1, 0.8], [0.3, 0.2, 0.1]])
    texts = ["a", "a", "b"]  # items 0 and 1 share a report
    i2t, t2i = recall_at_k(similarity, texts, 1)
    assert i2t == pytest.approx(1 / 3)  # item 0 -> text 1 ("a", right); item 1 -> "b" (wrong); item 2 -> "a" (wrong)
    # text 0 -> image 2 (wrong); text 1 -> image 0 ("a", right); text 2 -> image 1 (wrong)
    assert t2i == pytest.approx(1 / 3)
    assert recall_at_k(similarity, texts, 3) == (1.0, 1.0)


def test_clip_trains_on_findings_and_its_text_tower_conditions_diffusion(tmp_path):
    from meddiff.data.datamodule import ManifestDataModule
    from meddiff.training import DiffusionModule

    data_dir = tmp_path / "findings"
    assert main(["manifest", "findings", "-o", str(data_dir), "--train", "32", "--val", "16", "--test", "0"]) == 0
    manifest = str(data_dir / "manifest.jsonl")
    torch.manual_seed(0)
    module = ClipModule(
        manifest, export_dir=str(tmp_path / "clip"), embed_dim=32, text_width=32, text_heads=2, vocab_size=200
    )
    data = ManifestDataModule(manifest, spatial_dims=2, patch_size=(72, 72), batch_size=16)
    trainer = pl.Trainer(max_steps=6, check_val_every_n_epoch=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, data)
    for key in ("val/image_to_text_R@1", "val/image_to_text_R@5", "val/text_to_image_R@1", "val/text_to_image_R@5"):
        assert 0.0 <= float(trainer.callback_metrics[key]) <= 1.0
    encoder = load_text_encoder(tmp_path / "clip")
    reports = ["A large hyperintense lesion in the left anterior region.", "No acute abnormality."]
    torch.testing.assert_close(
        encoder.encode(reports).pooled,
        module.text.cpu().eval()(
            **module.tokenizer(reports, padding=True, return_tensors="pt")
        ).last_hidden_state[:, 0],
    )
    scorer = ClipEncoder(tmp_path / "clip")  # the exported towers give the trained module's embeddings
    images = next(iter(data.val_dataloader()))["image"][:2]
    module.cpu().eval()
    torch.testing.assert_close(scorer.encode_image(images), module.embed_image(images))
    torch.testing.assert_close(scorer.encode_text(reports), module.embed_text(reports))
    expected = 100 * (module.embed_image(images) * module.embed_text(reports)).sum(-1).clamp_min(0).mean()
    assert clip_score(list(images), reports, scorer)["clip_score"] == pytest.approx(float(expected), rel=1e-5)
    with pytest.raises(MeddiffError, match="not an exported meddiff CLIP"):
        ClipEncoder(tmp_path)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(tmp_path / "clip", mismatched)
    (mismatched / "clip.json").write_text(
        json.dumps({**json.loads((mismatched / "clip.json").read_text()), "embed_dim": 16})
    )
    with pytest.raises(MeddiffError, match="does not fit clip.json"):
        ClipEncoder(mismatched)
    diffusion = DiffusionModule.from_flat(
        spatial_dims=2, channels=(16, 32), attention_levels=(False, True), num_head_channels=16,
        norm_num_groups=16, image_shape=(72, 72), text_encoder=str(tmp_path / "clip"))
    batch = {"image": torch.rand(2, 1, 72, 72) * 2 - 1, "report": reports}
    assert np.isfinite(float(diffusion.loss(batch, torch.Generator().manual_seed(0))))
    assert diffusion.model_config().unet.cross_attention_dim == 32


def test_report_conditioned_chain_from_the_cli(tmp_path):
    """findings -> meddiff fit CLIP -> meddiff fit report-conditioned diffusion -> export -> guided generate
    (the smoke configs)."""
    from meddiff.data.manifest import Manifest

    data = tmp_path / "findings"
    assert main(["manifest", "findings", "-o", str(data), "--train", "32", "--val", "8", "--test", "0"]) == 0
    manifest, clip, run = data / "manifest.jsonl", tmp_path / "clip", tmp_path / "run"
    common = ["--trainer.enable_progress_bar=false", "--trainer.logger=false", f"--data.init_args.manifest={manifest}"]
    assert main(["fit", "--config", "configs/clip_findings.yaml", *common, f"--model.init_args.manifest={manifest}",
                 f"--model.init_args.export_dir={clip}", "--trainer.max_steps=2", "--trainer.val_check_interval=1",
                 "--data.init_args.batch_size=8", "--data.init_args.num_workers=0",
                 f"--trainer.default_root_dir={tmp_path / 'cliprun'}"]) == 0
    assert main(["fit", "--config", "configs/smoke/report_2d.yaml", *common,
                 f"--model.init_args.conditioning.text_encoder={clip}",
                 "--trainer.max_steps=2", f"--trainer.default_root_dir={run}",
                 f"--trainer.callbacks.init_args.dirpath={run / 'ckpt'}"]) == 0
    assert main(["export", str(run / "ckpt" / "last.ckpt"), str(tmp_path / "model")]) == 0
    out = tmp_path / "synthetic"
    prompt = "A large hyperintense lesion in the left anterior region."
    assert main(["generate", "--model", str(tmp_path / "model"), "-n", "2", "-o", str(out), "--steps", "2",
                 "--prompt", prompt, "--guidance-scale", "4", "--accelerator", "cpu"]) == 0
    records = Manifest.read(out / "manifest.jsonl").records
    assert [r.report for r in records] == [prompt, prompt] and records[0].provenance["guidance_scale"] == 4.0
