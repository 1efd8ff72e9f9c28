"""Few-shot adapters: LoRA and textual inversion train only their own parameters, live in a small safetensors folder
that works with its base model alone, apply at a scale (0: the base exactly), merge, and travel through the CLI."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from meddiff import MeddiffError
from meddiff.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, apply_adapter, merge_adapter, read_adapter
from meddiff.cli.main import main
from meddiff.model import load_model
from meddiff.pipelines import DiffusionPipeline, load_pipeline

TINY = dict(spatial_dims=2, channels=(16, 32), attention_levels=(False, True), num_head_channels=16,
            norm_num_groups=16, image_shape=(16, 16), image_spacing=(2.0, 2.0))
WORDS = "no acute abnormality a lesion in the left right anterior posterior region small large".split()
PROMPT = "A <finding> in the left anterior region."


def tiny_model(folder, seed: int = 0, **kwargs):
    """A small exported model with random non-trivial weights (MONAI zero-initialises the output layer)."""
    from meddiff.training import DiffusionModule

    torch.manual_seed(seed)
    module = DiffusionModule.from_flat(**TINY, **kwargs)
    for p in module.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return module.pipeline(ema=False).save_pretrained(folder)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {"plain": tiny_model(root / "plain"), "other": tiny_model(root / "other", seed=1)}


@pytest.fixture(scope="module")
def report_base(tmp_path_factory):
    """A report-conditioned tiny model whose report encoder is a tiny BERT folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    root = tmp_path_factory.mktemp("report")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "."] + WORDS
    BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=16).save_pretrained(root / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokens), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(root / "bert")
    return tiny_model(root / "model", text_encoder=f"hf:{root / 'bert'}", condition_dropout=0.0)


def train(module, batch: dict, steps: int = 4) -> None:
    """A few optimizer steps of the module's own loss, with its EMA (what Lightning's loop does)."""
    optimizer = module.configure_optimizers()
    for step in range(steps):
        module.loss(batch, torch.Generator().manual_seed(step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        module.ema.update_parameters(module.adapted)


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def test_lora_trains_only_adapter_parameters_into_a_small_safetensors_folder(bases, tmp_path):
    from safetensors import safe_open

    from meddiff.training import LoRAModule

    module = LoRAModule(base=str(bases["plain"]), rank=2, ema_decay=0.0)
    before = {k: v.clone() for k, v in module.diffusion.unet.state_dict().items()}
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert any(".to_q." in name for name in trainable) and any("resnets.0.conv1" in name for name in trainable)
    train(module, {"image": images()})
    after = module.diffusion.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)  # the base's weights never moved

    out = module.save_adapter(str(tmp_path / "adapter"))
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    with safe_open(out / ADAPTER_WEIGHTS, "pt") as f:  # a safetensors file: tensors only, nothing to unpickle
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") and "lora_" in k for k in keys)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["kind"] == "lora" and config["rank"] == 2 and config["base"] == "plain"
    assert config["base_weights_sha256"] == load_model(bases["plain"]).weights_sha256
    assert config["parameters"] == sum(p.numel() for name, p in module.named_parameters() if p.requires_grad)
    model_bytes = (bases["plain"] / "unet.safetensors").stat().st_size
    assert (out / ADAPTER_WEIGHTS).stat().st_size < 0.15 * model_bytes


@pytest.fixture(scope="module")
def lora_adapter(bases, tmp_path_factory):
    from meddiff.training import LoRAModule

    module = LoRAModule(base=str(bases["plain"]), rank=2, lr=1e-2)
    train(module, {"image": images()})
    return module.save_adapter(str(tmp_path_factory.mktemp("lora") / "adapter"))


def test_lora_scale_zero_is_the_base_exactly_and_merging_equals_scale_one(bases, lora_adapter, tmp_path):
    base = load_pipeline(bases["plain"]).sample([3, 4], steps=3)
    scaled = {s: load_pipeline(bases["plain"], adapter=lora_adapter, adapter_scale=s).sample([3, 4], steps=3)
              for s in (0.0, 0.5, 1.0)}
    assert torch.equal(scaled[0.0], base)
    assert (scaled[1.0] - base).abs().max() > 1.5 * (scaled[0.5] - base).abs().max() > 0  # the scale weighs the update
    merged = merge_adapter(load_model(bases["plain"]), lora_adapter)
    folder = merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(DiffusionPipeline.from_pretrained(folder).sample([3, 4], steps=3), scaled[1.0],
                               atol=1e-4, rtol=1e-4)


def test_an_adapter_refuses_another_base_and_bad_scales(bases, lora_adapter):
    with pytest.raises(MeddiffError, match="trained on another base model"):
        apply_adapter(load_model(bases["other"]), lora_adapter)
    with pytest.raises(MeddiffError, match="trained on another base model"):
        merge_adapter(load_model(bases["other"]), lora_adapter)
    for scale in (float("nan"), float("inf"), -0.5, 1e6):
        with pytest.raises(MeddiffError, match="--adapter-scale"):
            apply_adapter(load_model(bases["plain"]), lora_adapter, scale)
    model = apply_adapter(load_model(bases["plain"]), lora_adapter)
    with pytest.raises(MeddiffError, match="already has the adapter"):
        apply_adapter(model, lora_adapter)


def test_textual_inversion_learns_one_token_that_changes_only_prompts_with_it(report_base, tmp_path):
    from meddiff.training import TextualInversionModule

    module = TextualInversionModule(base=str(report_base), token="<finding>", initializer="lesion", lr=0.05,
                                    conditioning={"condition_dropout": 0.0})
    embeddings = module.text_model.get_input_embeddings()
    table = embeddings.base_layer.weight.clone()
    unet = {k: v.clone() for k, v in module.diffusion.unet.state_dict().items()}
    assert [p.shape for p in module.parameters() if p.requires_grad] == [torch.Size([1, 32])]
    train(module, {"image": images(), "report": [PROMPT, "A <finding> in the right posterior region."]})
    assert torch.equal(embeddings.base_layer.weight, table)  # the table itself (every other token) is unchanged
    assert all(torch.equal(v, module.diffusion.unet.state_dict()[k]) for k, v in unet.items())
    out = module.save_adapter(str(tmp_path / "ti"))
    adapter = read_adapter(out)
    assert adapter.config.token == "<finding>" and list(adapter.tensors) == ["token_embedding"]

    base, adapted = load_pipeline(report_base), load_pipeline(report_base, adapter=out)
    tokenizer = adapted.model.text_encoder.tokenizer
    assert tokenizer.tokenize(PROMPT).count("<finding>") == 1
    assert "<finding>" not in base.model.text_encoder.tokenizer.tokenize(PROMPT)
    index = tokenizer.convert_tokens_to_ids("<finding>")
    row = adapted.model.text_encoder.model.get_input_embeddings().weight[index]
    torch.testing.assert_close(row, adapter.tensors["token_embedding"][0])
    assert not torch.allclose(row, table[tokenizer.convert_tokens_to_ids("lesion")])  # it learnt from its start
    plain = ["A lesion in the left anterior region.", "no acute abnormality."]
    torch.testing.assert_close(adapted.model.text_encoder.context(plain), base.model.text_encoder.context(plain))
    assert not torch.allclose(adapted.model.text_encoder.context([PROMPT]), base.model.text_encoder.context([PROMPT]))
    assert not torch.equal(adapted.sample([1], steps=2, prompts=[PROMPT]), base.sample([1], steps=2, prompts=[PROMPT]))
    with pytest.raises(MeddiffError, match="has no scale"):
        apply_adapter(load_model(report_base), out, 0.5)
    for token, fragment in (("lesion", "already has the token"), ("two words", "one word")):
        with pytest.raises(MeddiffError, match=fragment):
            TextualInversionModule(base=str(report_base), token=token)


def test_lora_of_the_report_encoder_changes_the_context(report_base, tmp_path):
    from meddiff.training import LoRAModule

    module = LoRAModule(base=str(report_base), rank=2, text_encoder=True, lr=1e-2)
    train(module, {"image": images(), "report": ["A lesion in the left anterior region.", "no acute abnormality."]})
    out = module.save_adapter(str(tmp_path / "lora"))
    assert {key.split(".")[0] for key in read_adapter(out).tensors} == {"unet", "text_encoder"}
    prompts = ["A lesion in the left anterior region."]
    base = load_pipeline(report_base).model.text_encoder.context(prompts)
    assert not torch.allclose(load_pipeline(report_base, adapter=out).model.text_encoder.context(prompts), base)
    torch.testing.assert_close(load_pipeline(report_base, adapter=out, adapter_scale=0.0).model.text_encoder
                               .context(prompts), base)
    with pytest.raises(MeddiffError, match="report encoder"):  # a model folder names its encoder, never holds it
        merge_adapter(load_model(report_base), out)


@pytest.fixture()
def k_images(tmp_path):
    """K = 3 small MR slices and their manifest."""
    rng = np.random.default_rng(0)
    lines = []
    for i in range(3):
        image = np.zeros((16, 16), np.float32)
        image[4:12, 4:12] = 100 + rng.normal(0, 10, (8, 8))
        nib.save(nib.Nifti1Image(image, np.diag([2.0, 2.0, 2.0, 1.0])), tmp_path / f"slice{i}.nii.gz")
        lines.append(json.dumps({"image": f"slice{i}.nii.gz", "modality": "MR", "split": "train", "spacing": [2, 2]}))
    (tmp_path / "k.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path / "k.jsonl"


def test_lora_through_fit_generate_and_export(bases, k_images, tmp_path, capsys):
    config = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "max_steps": 2, "limit_val_batches": 0, "enable_model_summary": False,
                    "default_root_dir": str(tmp_path / "run"), "logger": False,
                    "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                                   "init_args": {"dirpath": str(tmp_path / "ckpt"), "save_last": True}}]},
        "model": {"class_path": "meddiff.training.LoRAModule",
                  "init_args": {"base": str(bases["plain"]), "rank": 2, "export_dir": str(tmp_path / "adapter")}},
        "data": {"class_path": "meddiff.data.datamodule.ManifestDataModule",
                 "init_args": {"manifest": str(k_images), "spatial_dims": 2, "batch_size": 2}},
    }
    (tmp_path / "lora.yaml").write_text(yaml.safe_dump(config))
    assert main(["fit", "--config", str(tmp_path / "lora.yaml")]) == 0
    assert "wrote adapter" in capsys.readouterr().out
    adapter = read_adapter(tmp_path / "adapter")

    out = tmp_path / "synthetic"
    assert main(["generate", "--model", str(bases["plain"]), "--adapter", str(tmp_path / "adapter"),
                 "--adapter-scale", "0.5", "-n", "2", "--steps", "2", "-o", str(out), "--accelerator", "cpu"]) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["provenance"]["adapter_sha256"] for r in records} == {adapter.sha256}
    assert {r["provenance"]["adapter_scale"] for r in records} == {0.5}
    # the same folder with another scale is another run
    assert main(["generate", "--model", str(bases["plain"]), "--adapter", str(tmp_path / "adapter"),
                 "-n", "2", "--steps", "2", "-o", str(out), "--accelerator", "cpu"]) == 2

    assert main(["export", str(tmp_path / "ckpt" / "last.ckpt"), str(tmp_path / "from_ckpt")]) == 0
    assert read_adapter(tmp_path / "from_ckpt").tensors.keys() == adapter.tensors.keys()
    assert main(["export", str(bases["plain"]), str(tmp_path / "merged"), "--merge", str(tmp_path / "adapter")]) == 0
    assert load_model(tmp_path / "merged").weights_sha256 != load_model(bases["plain"]).weights_sha256
