"""Report-encoding throughput on this CPU: BERT-base-sized and small text towers on the 3,955 OpenI reports.

No pretrained weights can be downloaded here, so the towers are randomly initialised in the sizes of
BiomedBERT/CXR-BERT (BERT-base: 12 layers, 768 wide) and of a small CLIP text tower (4 layers, 256
wide); throughput does not depend on the weight values. A WordPiece vocabulary (30,522 entries at
most, BERT's size) is learnt from the reports with the tokenizers library. Each configuration is
timed cold (cache empty) and again warm (every report served from meddiff's text-hash cache).

    python -m bench.text_encoding [--max-length 256] [--batch 64]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from tokenizers import BertWordPieceTokenizer
from transformers import BertConfig, BertModel, BertTokenizerFast

from bench import harness
from meddiff.data.reports import openi_reports
from meddiff.encoders import load_text_encoder

SIZES = {"BERT-base (BiomedBERT / CXR-BERT size)": (12, 768, 12), "small (4 x 256)": (4, 256, 4)}


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out=harness.results_file("text_encoding"))
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    return parser


def run(args: argparse.Namespace) -> None:
    reports = openi_reports()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        wordpiece = BertWordPieceTokenizer(lowercase=True)
        wordpiece.train_from_iterator(reports, vocab_size=30522)
        for name, (layers, width, heads) in SIZES.items():
            folder = Path(tmp) / name.split()[0]
            BertTokenizerFast(vocab=wordpiece.get_vocab(), model_max_length=args.max_length).save_pretrained(folder)
            config = BertConfig(vocab_size=wordpiece.get_vocab_size(), hidden_size=width, num_hidden_layers=layers,
                                num_attention_heads=heads, intermediate_size=4 * width, max_position_embeddings=512)
            BertModel(config).save_pretrained(folder)
            encoder = load_text_encoder(f"hf:{folder}")
            for cache in ("cold", "warm"):
                with harness.stopwatch() as lap:
                    for i in range(0, len(reports), args.batch):
                        encoder.encode(reports[i : i + args.batch])
                seconds = lap.seconds
                rows.append({"tower": name, "cache": cache, "seconds": seconds,
                             "reports_per_s": len(reports) / seconds})
                print(f"| {name} | {cache} | {seconds:.1f} s | {len(reports) / seconds:.0f} reports/s |", flush=True)
    print(f"{len(reports)} reports, batch {args.batch}, max {args.max_length} tokens, "
          f"torch threads {torch.get_num_threads()}")
    harness.write_result("text_encoding", args, {"reports": len(reports), "torch_threads": torch.get_num_threads(),
                                                 "rows": rows}, args.out)


if __name__ == "__main__":
    harness.main(run, options)
