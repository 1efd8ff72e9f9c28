"""Text encoders load from the real on-disk formats (a transformers BERT folder) and cache by text."""

from __future__ import annotations

import logging

import pytest
import torch

from meddiff import MeddiffError
from meddiff.encoders import load_text_encoder

WORDS = ("no acute abnormality a mm hyperintense hypointense lesion in the left right anterior posterior region "
         "small large").split()


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny BERT saved the way Hugging Face models are: config.json, model.safetensors, vocab and tokenizer files."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ","] + [str(i) for i in range(10)] + WORDS
    tokenizer = BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, model_max_length=16)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder)
    return folder


def test_hf_encoder_gives_tokens_mask_and_pooled_independent_of_batch(bert_dir):
    encoder = load_text_encoder(f"hf:{bert_dir}")
    # the saved vocab was read back
    assert encoder.tokenizer.unk_token_id not in encoder.tokenizer("a 4 mm lesion")["input_ids"]
    reports = ["No acute abnormality.", "A 14 mm hyperintense lesion in the right posterior region.", ""]
    batch = encoder.encode(reports)
    assert batch.tokens.shape[0] == 3 and batch.tokens.shape[2] == 32 and batch.pooled.shape == (3, 32)
    assert batch.mask.sum(dim=1).tolist()[2] == 2  # the empty report: [CLS] [SEP]
    alone = load_text_encoder(f"hf:{bert_dir}").encode(reports[:1])
    n = int(alone.mask.sum())
    torch.testing.assert_close(batch.tokens[0, :n], alone.tokens[0, :n], atol=1e-5, rtol=1e-5)  # padding does not leak
    assert not batch.mask[0, n:].any()


def test_long_reports_are_truncated_with_a_warning_and_cached(bert_dir, caplog):
    encoder = load_text_encoder(f"hf:{bert_dir}")
    long = " ".join(["lesion"] * 40)
    with caplog.at_level(logging.WARNING):
        out = encoder.encode([long, "small lesion"])
    assert out.mask[0].sum() == 16 and "truncated" in caplog.text
    calls = []
    encoder.model.register_forward_hook(lambda *a: calls.append(1))
    again = encoder.encode(["small lesion", long])
    assert calls == []  # both came from the cache
    torch.testing.assert_close(again.pooled[1], out.pooled[0])


def test_text_encoder_specs_fail_with_what_to_do(tmp_path):
    with pytest.raises(MeddiffError, match="never downloads"):
        load_text_encoder(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(MeddiffError, match="unknown text encoder"):
        load_text_encoder("clip:whatever")


def report_module(bert_dir, **kwargs):
    from meddiff.training import DiffusionModule

    torch.manual_seed(0)
    return DiffusionModule.from_flat(
        spatial_dims=2, channels=(16, 32), attention_levels=(False, True), num_head_channels=16,
        norm_num_groups=16, image_shape=(16, 16), text_encoder=f"hf:{bert_dir}", **kwargs)


def test_report_conditioned_loss_uses_the_report_and_drops_it_to_the_empty_report(bert_dir):
    module = report_module(bert_dir, condition_dropout=0.0)
    for p in module.unet.parameters():  # MONAI zero-initialises the attention outputs: make the context count
        torch.nn.init.normal_(p, std=0.05)
    assert module.model_config().unet.cross_attention_dim == 32
    # the frozen text model stays out of checkpoints
    assert not any("text_encoder" in name for name in module.state_dict())
    batch = {"image": torch.rand(2, 1, 16, 16) * 2 - 1,
             "report": ["small lesion in the left region.", "no acute abnormality."]}
    other = {**batch, "report": ["large lesion in the right region.", "large hypointense lesion."]}
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert module.loss(batch, gen()) != module.loss(other, gen())  # the report reaches the network
    always_dropped = report_module(bert_dir, condition_dropout=0.999)
    always_dropped.unet.load_state_dict(module.unet.state_dict())
    assert always_dropped.loss(batch, gen()) == always_dropped.loss(other, gen())  # both became the empty report
    with pytest.raises(MeddiffError, match="condition_dropout"):
        report_module(bert_dir, condition_dropout=1.0)


def test_guided_sampling_is_seeded_and_guidance_changes_it(bert_dir, tmp_path):
    from meddiff.pipelines import DiffusionPipeline

    module = report_module(bert_dir)
    for p in module.unet.parameters():
        torch.nn.init.normal_(p, std=0.05)
    pipeline = module.pipeline(ema=False)
    prompts = ["small lesion in the left region.", "no acute abnormality."]
    a = pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=3.0)
    torch.testing.assert_close(a, pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=3.0))
    assert not torch.allclose(a, pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=1.0))
    assert not torch.allclose(a, pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=3.0,
                                                 negative_prompt="large lesion."))
    # batch-independent
    torch.testing.assert_close(a[1:], pipeline.sample([2], steps=3, prompts=prompts[1:], guidance_scale=3.0))
    # one half evaluated, same result
    unconditional = pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=0.0)
    torch.testing.assert_close(unconditional, pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=1e-9),
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(unconditional, pipeline.sample([1, 2], steps=3, prompts=prompts, guidance_scale=1.0))
    with pytest.raises(MeddiffError, match="one prompt per image"):
        pipeline.sample([1, 2], steps=3)
    # text encoder reloaded from its spec
    reloaded = DiffusionPipeline.from_pretrained(pipeline.save_pretrained(tmp_path / "model"))
    torch.testing.assert_close(a, reloaded.sample([1, 2], steps=3, prompts=prompts, guidance_scale=3.0))


def test_generate_cli_with_prompts_records_them_and_resumes(bert_dir, tmp_path):
    import json

    from meddiff.cli.main import main
    from meddiff.data.manifest import Manifest

    module = report_module(bert_dir)
    model = module.pipeline(ema=False).save_pretrained(tmp_path / "model")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "small lesion in the left region."}\n{"prompt": "no acute abnormality."}\n'
                       '{"report": ""}\n')
    out = tmp_path / "synthetic"
    base = ["generate", "--model", str(model), "-o", str(out), "--steps", "2", "--accelerator", "cpu"]
    assert main([*base, "--prompts", str(prompts), "--guidance-scale", "2"]) == 0
    records = Manifest.read(out / "manifest.jsonl").records
    assert [r.report for r in records] == ["small lesion in the left region.", "no acute abnormality.", ""]
    assert all(r.provenance["guidance_scale"] == 2.0 and r.provenance["negative_prompt"] == "" for r in records)
    assert main([*base, "--prompts", str(prompts), "--guidance-scale", "3"]) == 2  # another run in the same folder
    prompts.write_text('{"prompt": "large lesion."}\n{"prompt": "no acute abnormality."}\n{"prompt": ""}\n')
    assert main([*base, "--prompts", str(prompts), "--guidance-scale", "2"]) == 2  # item 0 was made from another prompt
    assert main([*base[:-2], "-n", "2"]) == 2  # a report-conditioned model needs prompts
    assert main(["generate", "--model", str(model), "-o", str(tmp_path / "x"), "--prompt", "lesion."]) == 2  # no -n
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["not", "an", "object"]\n')
    assert main([*base[:4], str(tmp_path / "y"), "--prompts", str(bad)]) == 2
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["synthetic"] is True


def test_real_reports_encode_at_scale_with_truncation_and_odd_text(bert_dir, caplog):
    """The 3,955 OpenI chest X-ray reports: long ones truncated with one warning per batch, empty ones kept."""
    from meddiff.data.reports import openi_reports

    reports = openi_reports()
    assert len(reports) == 3955 and sum(not r for r in reports) == 28
    encoder = load_text_encoder(f"hf:{bert_dir}")
    odd = ["Lesion 5\u00b0 oblique, 3 \u00b5m\u2026 \U0001F600", "tabs\tand\nnewlines", "   ", "XXXX-year-old"]
    with caplog.at_level(logging.WARNING):
        lengths = []
        for start in range(0, len(reports), 512):
            lengths += encoder.encode(reports[start : start + 512]).mask.sum(dim=1).tolist()
        out = encoder.encode(odd)
    assert max(lengths) == 16 and min(lengths) == 2 and "truncated" in caplog.text
    assert sum(length == 2 for length in lengths) >= 28  # empty reports: [CLS] [SEP]
    assert out.tokens.shape[0] == 4 and torch.isfinite(out.tokens).all()
