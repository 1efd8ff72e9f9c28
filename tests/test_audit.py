"""Concept audit: the concepts file, MONET-style concept scores with meddiff's own CLIP and an open_clip model, the
statistics that rank concepts, the classifier-error mode, and the report folder ``meddiff audit`` writes."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import torch
from scipy import stats

from meddiff import Image, MeddiffError
from meddiff.cli.main import main
from meddiff.data.manifest import Manifest
from meddiff.io import save_image
from meddiff.metrics.audit import audit, compare, split_by_predictions
from meddiff.metrics.concepts import (
    DEFAULT_REFERENCE,
    Concept,
    ConceptSet,
    concept_scores,
    image_planes,
    load_concept_encoder,
    own_clip_batch,
    read_concepts,
)

CONCEPTS = """# findings words
reference: no focal lesion is seen | normal study
hyperintense: a hyperintense lesion | there is a hyperintense lesion
hypointense lesion
left: a lesion in the left hemisphere
"""


@pytest.fixture(scope="module")
def findings(tmp_path_factory):
    """A small findings set and a meddiff CLIP exported from it (untrained: the tests check the plumbing)."""
    from meddiff.training.clip import ClipModule

    folder = tmp_path_factory.mktemp("audit")
    assert main(["manifest", "findings", "-o", str(folder / "data"), "--train", "16", "--val", "8",
                 "--test", "16"]) == 0
    torch.manual_seed(0)
    module = ClipModule(str(folder / "data" / "manifest.jsonl"), embed_dim=16, text_width=32, text_heads=2,
                        vocab_size=200)
    module.save_pretrained(folder / "clip")
    return folder


def test_concepts_file_names_prompt_ensembles_and_the_reference(tmp_path):
    path = tmp_path / "concepts.txt"
    path.write_text(CONCEPTS)
    concepts = read_concepts(path)
    assert concepts.reference == ("no focal lesion is seen", "normal study")
    assert [c.name for c in concepts.concepts] == ["hyperintense", "hypointense lesion", "left"]
    assert concepts.concepts[0].prompts == ("a hyperintense lesion", "there is a hyperintense lesion")
    assert concepts.concepts[1].prompts == ("hypointense lesion",)  # a bare prompt is its own name
    path.write_text("left: a\nlarge: b\n")
    assert read_concepts(path).reference == DEFAULT_REFERENCE
    for text, fragment in (("# only a comment\n", "names no concepts"), ("a: x\nA: y\n", "already defined on line 1"),
                           (f"a: {'x' * 400}\n", "too long"), ("a: | \n", "has no prompt")):
        path.write_text(text)
        with pytest.raises(MeddiffError, match=fragment):
            read_concepts(path)


def test_compare_ranks_the_planted_difference_first_with_its_statistics():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.5, 0.1, (40, 4)), rng.normal(0.5, 0.1, (50, 4))
    b[:, 2] += 0.1  # concept 2 is one standard deviation higher in B
    concepts = ConceptSet(tuple(Concept(f"c{k}", (f"c{k}",)) for k in range(4)))
    ranked = compare(a, b, concepts, permutations=999, seed=0)
    top = ranked[0]
    assert top.concept == "c2" and top.cohens_d < -0.6
    pooled = np.sqrt((39 * a[:, 2].var(ddof=1) + 49 * b[:, 2].var(ddof=1)) / 88)
    assert top.cohens_d == pytest.approx((a[:, 2].mean() - b[:, 2].mean()) / pooled)
    assert top.auroc == pytest.approx(stats.mannwhitneyu(a[:, 2], b[:, 2]).statistic / (40 * 50))
    assert top.p_value == pytest.approx(2 / 1000)  # no permutation beats it; two-sided: twice the smaller tail
    assert top.q_value == pytest.approx(8 / 1000)  # Benjamini-Hochberg: the smallest of 4 p-values times 4
    assert all(r.p_value > 0.01 for r in ranked[1:])
    assert [abs(r.cohens_d) for r in ranked] == sorted((abs(r.cohens_d) for r in ranked), reverse=True)
    with pytest.raises(MeddiffError, match="at least 2 images"):
        compare(a[:1], b, concepts)


class BrightnessCLIP:
    """A stand-in CLIP whose image embedding says how bright the image's left and right halves are and whose
    text embedding says which half a prompt is about: the planted difference must come out as that concept."""

    spec, scale, max_tokens = "brightness", 10.0, 64

    def check_prompts(self, prompts):
        pass

    def embed_texts(self, texts):
        vectors = {"bright left": [1.0, 0.0, 0.2], "bright right": [0.0, 1.0, 0.2], "reference": [0.0, 0.0, 1.0]}
        return torch.nn.functional.normalize(torch.tensor([vectors[t] for t in texts], dtype=torch.float64), dim=-1)

    def embed_images(self, planes, modality):
        halves = [[float(p[: p.shape[0] // 2].mean()), float(p[p.shape[0] // 2:].mean()), 0.5] for p in planes]
        return torch.nn.functional.normalize(torch.tensor(halves, dtype=torch.float64), dim=-1)


def test_audit_recovers_a_planted_concept_from_image_files(tmp_path):
    rng = np.random.default_rng(1)
    paths = {"a": [], "b": []}
    for name in paths:
        for k in range(12):
            image = rng.random((16, 16), dtype=np.float32) * 0.2
            if name == "b" and k % 4 != 0:  # three quarters of B are brighter on the left
                image[:8] += 0.6
            path = tmp_path / f"{name}{k}.nii.gz"
            save_image(Image(image, np.eye(4), "MR"), path)
            paths[name].append(path)
    concepts = ConceptSet((Concept("right", ("bright right",)), Concept("left", ("bright left",))), ("reference",))
    result = audit(paths["a"], paths["b"], concepts, BrightnessCLIP(), ("a", "b"), permutations=499)
    assert result.ranked[0].concept == "left" and result.ranked[0].mean_b > result.ranked[0].mean_a
    assert result.ranked[0].q_value < 0.01 and result.scores[0].shape == (12, 2)


def test_own_clip_sees_images_as_its_training_batches_did(findings):
    from meddiff.data.datamodule import ManifestDataModule
    from meddiff.io import load_image

    data = ManifestDataModule(str(findings / "data" / "manifest.jsonl"), spatial_dims=2, patch_size=(72, 72),
                              batch_size=4, num_workers=0)
    data.setup("test")
    batch = next(iter(data.test_dataloader()))["image"]
    records = Manifest.read(findings / "data" / "manifest.jsonl")
    images = [load_image(records.resolve(r.image)) for r in records.split("test")[:4]]
    prepared = own_clip_batch([i.array for i in images], "MR")
    torch.testing.assert_close(prepared, torch.as_tensor(batch).float(), atol=1e-5, rtol=0)


def test_concept_scores_are_monet_logits_against_the_reference(findings, tmp_path):
    encoder = load_concept_encoder(findings / "clip")
    assert encoder.own and encoder.scale == pytest.approx(1 / 0.07)  # the exported (untrained) temperature
    records = Manifest.read(findings / "data" / "manifest.jsonl")
    paths = [records.resolve(r.image) for r in records.split("test")[:3]]
    concepts = ConceptSet((Concept("hyper", ("a hyperintense lesion", "there is a hyperintense lesion")),),
                          ("normal study",))
    scores = concept_scores(paths, encoder, concepts)
    from meddiff.io import load_image

    image = encoder.encoder.encode_image(own_clip_batch([load_image(paths[0]).array], "MR"))[0]
    prompts = encoder.encoder.encode_text(list(concepts.concepts[0].prompts))
    concept = torch.nn.functional.normalize(prompts.mean(0), dim=0)
    reference = encoder.encoder.encode_text(["normal study"])[0]
    expected = encoder.scale * (image @ concept - image @ reference)  # the logit of MONET's presence probability
    assert scores[0, 0] == pytest.approx(float(expected), abs=1e-5)
    volume = np.stack([load_image(p).array for p in paths] * 2, axis=-1)  # a 65 x 72 x 6 volume: 2.5D slices
    assert len(image_planes(Image(volume, np.diag([3.0, 3.0, 3.0, 1.0]), "MR"))) == 12
    with pytest.raises(MeddiffError, match="tokens"):
        encoder.check_prompts(["lesion " * 100])


def test_open_clip_concept_scores_match_open_clip_itself(tmp_path):
    """A BiomedCLIP-format folder (tiny towers built here): the scores are open_clip's own embeddings."""
    import open_clip
    from test_openclip import tiny_config, write_bert_files

    folder = tmp_path / "biomedclip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(tiny_config()))
    write_bert_files(folder)
    text_cfg = {**tiny_config()["model_cfg"]["text_cfg"], "hf_model_name": str(folder),
                "hf_tokenizer_name": str(folder), "hf_model_pretrained": False}
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", text_cfg=text_cfg)
    from safetensors.torch import save_file

    save_file(model.state_dict(), folder / "open_clip_model.safetensors")
    encoder = load_concept_encoder(folder)
    assert not encoder.own and encoder.scale == pytest.approx(float(model.logit_scale.exp()))
    image = np.random.default_rng(0).random((40, 48)).astype(np.float32)
    path = tmp_path / "x.nii.gz"
    save_image(Image(image, np.eye(4), "MR"), path)
    concepts = ConceptSet((Concept("lesion", ("a small lesion",)),), ("no acute abnormality",))
    score = concept_scores([path], encoder, concepts)[0, 0]
    model.eval()
    tokenizer = open_clip.tokenizer.HFTokenizer(str(folder), context_length=16)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(encoder.encoder.image_batch([image])), dim=-1)[0]
        text = torch.nn.functional.normalize(model.encode_text(tokenizer(["a small lesion", "no acute abnormality"])),
                                             dim=-1)
    assert score == pytest.approx(float(model.logit_scale.exp() * (img @ text[0] - img @ text[1])), abs=1e-3)


def test_predictions_split_errors_from_successes_and_must_name_exactly_the_images(tmp_path):
    paths = []
    for k in range(4):
        paths.append(tmp_path / "images" / f"i{k}.nii.gz")
        save_image(Image(np.full((8, 8), k, np.float32), np.eye(4), "MR"), paths[-1])
    csv_path = tmp_path / "preds.csv"
    rows = [("images/i0.nii.gz", "1", "1"), ("images/i1.nii.gz", "1", "0"), (str(paths[2]), "0", "0"),
            ("images/i3.nii.gz", "0", "1")]
    csv_path.write_text("image,label,prediction\n" + "".join(",".join(r) + "\n" for r in rows))
    errors, successes = split_by_predictions(paths, csv_path)
    assert errors == [paths[1], paths[3]] and successes == [paths[0], paths[2]]
    with pytest.raises(MeddiffError, match="no row in"):
        split_by_predictions(paths + [tmp_path / "images" / "extra.nii.gz"], csv_path)


def test_cli_writes_a_report_that_opens_offline_and_names_no_files(findings, tmp_path, capsys):
    concepts = tmp_path / "concepts.txt"
    concepts.write_text(CONCEPTS)
    data = findings / "data"
    records = Manifest.read(data / "manifest.jsonl")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for r in records.split("test"):
        target = tmp_path / ("a" if r.labels.get("count") else "b") / r.image
        target.symlink_to(records.resolve(r.image))
    out = tmp_path / "report"
    assert main(["audit", str(tmp_path / "a"), str(tmp_path / "b"), "--concepts", str(concepts), "--encoder",
                 str(findings / "clip"), "-o", str(out), "--top", "2", "--examples", "3",
                 "--permutations", "199"]) == 0
    record = json.loads((out / "audit.json").read_text())
    assert [r["concept"] for r in record["ranked"]] and len(record["ranked"]) == 3
    assert record["sets"] == {"A": len(list((tmp_path / "a").iterdir())), "B": len(list((tmp_path / "b").iterdir()))}
    page = (out / "audit.html").read_text()
    figures = re.findall(r"src='([^']+)'", page)
    assert len(figures) == 2 and all((out / f).is_file() for f in figures)
    with open(out / "scores.csv") as fh:
        assert len(list(csv.reader(fh))) == 1 + sum(record["sets"].values())
    for name in ("audit.json", "audit.html", "scores.csv"):
        assert "test_0" not in (out / name).read_text()  # images by set, index and hash, never by file name
    assert "wrote" in capsys.readouterr().out
    assert main(["audit", str(tmp_path / "a"), str(tmp_path / "b"), "--concepts", str(concepts), "--encoder",
                 str(findings / "clip"), "-o", str(out)]) == 2  # an existing report is kept
