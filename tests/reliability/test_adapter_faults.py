"""Adapters under bad input: ``meddiff generate --adapter`` and ``meddiff export --merge`` refuse an adapter trained on
another base, a pickled or fake safetensors file (never unpickled: its payload would leave a marker), a missing,
garbled or foreign ``adapter_config.json``, tensors that do not fit, and a scale that is NaN, infinite or absurd: one
``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from harness import Snapshot, assert_clean_error, run_meddiff, tiny_model_dir
from safetensors.torch import load_file, save_file

from meddiff.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS


class OpenMarker:
    """Unpickled, it creates (truncates) the file ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """A LoRA adapter trained on the shared tiny model, and broken or foreign variants of it."""
    from meddiff.model import load_model
    from meddiff.training import LoRAModule

    root = tmp_path_factory.mktemp("adapters")
    good = LoRAModule(base=str(tiny_model), rank=2).save_adapter(str(root / "good"))
    other_base = tiny_model_dir(root / "other_base", num_class_embeds=2)
    found = {"good": good, "other_base": other_base, "marker": root / "unpickled.marker",
             "foreign": LoRAModule(base=str(other_base), rank=2).save_adapter(str(root / "foreign"))}

    def variant(name: str) -> Path:
        found[name] = shutil.copytree(good, root / name)
        return found[name]

    (variant("pickle_bin") / ADAPTER_WEIGHTS).unlink()
    with open(found["pickle_bin"] / "adapter.bin", "wb") as fh:
        pickle.dump({"unet.x": OpenMarker(found["marker"])}, fh)
    torch.save({"unet.x": OpenMarker(found["marker"])}, variant("pickle_safetensors") / ADAPTER_WEIGHTS)
    (variant("no_config") / ADAPTER_CONFIG).unlink()
    (variant("garbled_config") / ADAPTER_CONFIG).write_text('{"kind": "lora", "rank": ')
    config = json.loads((good / ADAPTER_CONFIG).read_text())
    (variant("unknown_kind") / ADAPTER_CONFIG).write_text(json.dumps({**config, "kind": "hypernetwork"}))
    (variant("config_list") / ADAPTER_CONFIG).write_text("[1, 2, 3]")
    weights = (variant("truncated") / ADAPTER_WEIGHTS).read_bytes()
    (found["truncated"] / ADAPTER_WEIGHTS).write_bytes(weights[: len(weights) // 2])
    tensors = load_file(good / ADAPTER_WEIGHTS)
    save_file({k: torch.full_like(v, float("nan")) for k, v in tensors.items()}, variant("nan") / ADAPTER_WEIGHTS)
    save_file(dict(list(tensors.items())[:-2]), variant("missing_tensors") / ADAPTER_WEIGHTS)
    save_file({k: v[..., :1].contiguous() for k, v in tensors.items()}, variant("reshaped") / ADAPTER_WEIGHTS)
    ti = variant("textual_inversion")
    (ti / ADAPTER_CONFIG).write_text(json.dumps({
        "kind": "textual_inversion", "base": "model", "token": "<finding>", "parameters": 8,
        "base_weights_sha256": load_model(tiny_model).weights_sha256}))
    save_file({"token_embedding": torch.zeros(1, 8)}, ti / ADAPTER_WEIGHTS)
    (root / "a_file").write_text("not a folder")
    found["a_file"] = root / "a_file"
    return found


# case: (adapter, extra arguments, fragment of the error line)
CASES = {
    "trained on another base": ("foreign", [], "trained on another base model"),
    "pickled adapter.bin": ("pickle_bin", [], "never unpickles"),
    "a pickle named adapter.safetensors": ("pickle_safetensors", [], "not a readable safetensors file"),
    "missing adapter_config.json": ("no_config", [], ADAPTER_CONFIG),
    "garbled adapter_config.json": ("garbled_config", [], "not an adapter config"),
    "unknown adapter kind": ("unknown_kind", [], "kind"),
    "adapter_config.json not a mapping": ("config_list", [], "not an adapter config"),
    "truncated adapter.safetensors": ("truncated", [], "not a readable safetensors file"),
    "NaN adapter weights": ("nan", [], "not finite"),
    "adapter tensors missing": ("missing_tensors", [], "does not fit"),
    "adapter tensors of another shape": ("reshaped", [], "does not fit"),
    "textual inversion on a model without reports": ("textual_inversion", [], "not report-conditioned"),
    "no such adapter": ("missing", [], "not a folder"),
    "adapter is a file": ("a_file", [], "not a folder"),
    "--adapter-scale nan": ("good", ["--adapter-scale", "nan"], "--adapter-scale"),
    "--adapter-scale inf": ("good", ["--adapter-scale", "inf"], "--adapter-scale"),
    "--adapter-scale 1e6": ("good", ["--adapter-scale", "1e6"], "--adapter-scale"),
    "--adapter-scale -1": ("good", ["--adapter-scale", "-1"], "--adapter-scale"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_refuses_a_bad_adapter_in_one_line_and_writes_nothing(case, adapters, tiny_model, workdir):
    name, extra, fragment = CASES[case]
    before = Snapshot(workdir)
    result = run_meddiff("generate", "--model", tiny_model, "--adapter", adapters.get(name, workdir / "no_such"),
                         "-o", "out", "-n", "1", "--steps", "2", "--accelerator", "cpu", *extra)
    assert_clean_error(result, fragment)
    before.assert_unchanged()
    assert not adapters["marker"].exists()


def test_a_scale_without_an_adapter_is_refused(tiny_model, workdir):
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("generate", "--model", tiny_model, "--adapter-scale", "0.5", "-o", "out", "-n",
                                   "1"), "--adapter")
    before.assert_unchanged()


MERGE_CASES = {
    "merge onto another base": ("foreign", "trained on another base model"),
    "merge a pickled adapter": ("pickle_bin", "never unpickles"),
    "merge a garbled config": ("garbled_config", "not an adapter config"),
    "merge a textual inversion": ("textual_inversion", "report encoder"),
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_export_merge_refuses_a_bad_adapter_and_writes_nothing(case, adapters, tiny_model, workdir):
    name, fragment = MERGE_CASES[case]
    before = Snapshot(workdir)
    assert_clean_error(run_meddiff("export", tiny_model, "merged", "--merge", adapters[name]), fragment)
    before.assert_unchanged()
    assert not adapters["marker"].exists()
