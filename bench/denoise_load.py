"""Time and peak memory of ``meddiff denoise`` (bundled ``mri-denoise``) by image size, old vs new, one run.

Each case runs in its own process under ``/usr/bin/time -v`` (maximum resident set size of the whole
process: Python, torch, the model, the image and the network's working memory), with
``OMP_NUM_THREADS=1`` and one torch thread (the benchmark machine is shared). The image is dipy's
held-out ``t1_coronal_slice`` (256x256) resized to the case's size (linear), with Rician noise at
5 % of its maximum; a volume stacks it with independent noise per slice. ``seconds`` times
``pipeline.denoise`` alone (after imports and model loading), wall clock and CPU time of the process
(on a shared machine the CPU time is the steadier of the two).

- ``new``: this code: tiles of the model's ``denoise_tile`` (128 px), 8 per call, Gaussian blending;
  attention through torch SDPA.
- ``old``: the computation before the change, reproduced here: whole slices padded to a multiple of
  4, 16 slices per call, attention as MONAI's explicit einsum (``use_flash_attention`` off).
- ``stub``: the new pipeline with the network replaced by a free x0-predictor: what the image's own
  arrays cost, to extrapolate a volume too slow to denoise at one thread (see BENCHMARKS.md).

Also the foreground PSNR of old and new on the T1 slice and the pydicom-data shoulder MR at 5 %
Rician noise (seed 0, as ``make demo``). Writes ``denoise_load.json`` and ``denoise_load.md``.

    OMP_NUM_THREADS=1 python -m bench.denoise_load --out bench/results
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
from pathlib import Path

from bench import harness

CASES = [
    ("new", "256x256"), ("old", "256x256"),
    ("new", "512x512"), ("old", "512x512"),
    ("old", "1024x1024"), ("new", "512x512x2"),
    ("stub", "512x512x2"), ("stub", "512x512x300"),
    ("new", "1024x1024"),
]


def load_pipeline_for(mode: str):
    import torch

    from meddiff.pipelines import load_pipeline

    pipeline = load_pipeline("mri-denoise")
    if mode == "old":
        pipeline.config.denoise_tile = [1 << 20, 1 << 20]  # one tile = the whole (padded) slice
        for module in pipeline.unet.modules():
            if hasattr(module, "use_flash_attention"):
                module.use_flash_attention = False
    if mode == "stub":
        class Free(torch.nn.Module):  # predicts v = 0: costs one multiply, keeps every array the pipeline makes
            def __init__(self):
                super().__init__()
                self.device_anchor = torch.nn.Parameter(torch.zeros(1))

            def forward(self, x, timesteps, **_):
                return torch.zeros_like(x)

        pipeline.unet = Free()
    return pipeline


def noisy_input(shape: tuple[int, ...]):
    import numpy as np
    from scipy import ndimage

    from meddiff import Image
    from meddiff.data.samples import dipy_t1_slice
    from meddiff.data.synthetic import rician_noise

    clean = dipy_t1_slice().array.squeeze().astype(np.float32)
    plane = ndimage.zoom(clean, (shape[0] / clean.shape[0], shape[1] / clean.shape[1]), order=1)
    rng = np.random.default_rng(0)
    sigma = 0.05 * float(clean.max())
    if len(shape) == 2:
        return Image(rician_noise(plane, sigma, rng), np.eye(4), "MR")
    volume = np.empty(shape, np.float32)
    for k in range(shape[2]):
        volume[..., k] = rician_noise(plane, sigma, rng)
    return Image(volume, np.diag([1.0, 1.0, 3.0, 1.0]), "MR")  # 3 mm slices along the last axis


def child(mode: str, size: str) -> None:
    import torch

    torch.set_num_threads(1)
    if size == "psnr":
        print(json.dumps({m: psnr_of(m) for m in ("old", "new")}))
        return
    pipeline = load_pipeline_for(mode)
    batch = 16 if mode == "old" else 8
    image = noisy_input(tuple(int(n) for n in size.split("x")))
    with harness.stopwatch() as lap:
        out = pipeline.denoise(image, noise_sigma=None, batch_size=batch, progress=False)
    print(json.dumps({"seconds": lap.seconds, "cpu_seconds": lap.cpu_seconds, "shape": list(out.array.shape)}))


def psnr_of(mode: str) -> dict:
    """Foreground PSNR, noisy and denoised, of the T1 slice and the shoulder MR at 5 % Rician noise."""
    pipeline = load_pipeline_for(mode)
    batch = 16 if mode == "old" else 8
    import numpy as np

    from meddiff import Image
    from meddiff.data.samples import dipy_t1_slice, pydicom_data_image
    from meddiff.data.synthetic import rician_noise
    from meddiff.metrics import foreground_mask, psnr

    shoulder = pydicom_data_image("MR2_UNCR.dcm")().array.squeeze().reshape(256, 4, 256, 4).mean(axis=(1, 3))
    result = {}
    for name, clean in (("t1", dipy_t1_slice().array.squeeze()), ("shoulder", shoulder)):
        clean = clean.astype(np.float32)
        peak, mask = float(clean.max()), foreground_mask(clean)
        noisy = rician_noise(clean, 0.05 * peak, np.random.default_rng(0))
        out = pipeline.denoise(Image(noisy, np.eye(4), "MR"), batch_size=batch, progress=False).array
        result[name] = {"noisy": psnr(clean, noisy, peak, mask), "denoised": psnr(clean, out, peak, mask)}
    return result


def measure(mode: str, size: str) -> dict:
    proc = subprocess.run(["/usr/bin/time", "-v", *harness.module_command("denoise_load", "--child", mode, size)],
                          check=False, capture_output=True, text=True, env=harness.module_env(OMP_NUM_THREADS="1"))
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
    user = re.search(r"User time \(seconds\): ([\d.]+)", proc.stderr)
    row = {"mode": mode, "size": size, "exit": proc.returncode,
           "max_rss_gib": int(rss.group(1)) / 2**20 if rss else None,
           "process_user_seconds": float(user.group(1)) if user else None}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        row.update(json.loads(lines[-1]))
    else:
        own = [line for line in proc.stderr.split("\tCommand being timed")[0].splitlines()
               if line.strip() and not line.startswith("Command exited")]
        row["error"] = (own[-1] if own else "no output")[:160]
    return row


def table(rows: list[dict]) -> str:
    lines = ["| image | mode | exit | max RSS (GiB) | denoise wall (s) | denoise CPU (s) | CPU per slice (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["size"] == "psnr":
            continue
        slices = int(r["size"].split("x")[2]) if r["size"].count("x") == 2 else 1
        seconds, cpu = r.get("seconds"), r.get("cpu_seconds")
        if seconds is None:
            cells = f"{r.get('error', '')} | - | -"
        else:
            cells = f"{seconds:.1f} | {cpu:.1f} | {cpu / slices:.2f}"
        lines.append(f"| {r['size']} | {r['mode']} | {r['exit']} | {r['max_rss_gib']:.2f} | {cells} |")
    for r in rows:
        for mode in ("old", "new"):
            if r["size"] == "psnr" and mode in r:
                t1, shoulder = r[mode]["t1"], r[mode]["shoulder"]
                lines.append(f"\nPSNR ({mode}): T1 slice {t1['noisy']:.2f} -> {t1['denoised']:.2f} dB, "
                             f"shoulder {shoulder['noisy']:.2f} -> {shoulder['denoised']:.2f} dB")
    return "\n".join(lines) + "\n"


def options() -> argparse.ArgumentParser:
    parser = harness.parser(__doc__, out="bench/results",
                            out_help="the folder of the JSON record and the table (default: %(default)s)")
    parser.add_argument("--cases", nargs="+", help="MODE:SIZE, e.g. new:512x512 both:psnr (default: all, plus PSNR)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser


def run(args: argparse.Namespace) -> None:
    if args.child:
        return child(*args.child)
    cases = [tuple(c.split(":")) for c in args.cases] if args.cases else [("both", "psnr"), *CASES]
    rows = []
    for mode, size in cases:
        rows.append(measure(mode, size))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harness.write_result("denoise_load", args, {"omp_num_threads": 1, "rows": rows}, out / "denoise_load.json")
    (out / "denoise_load.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    harness.main(run, options)
