"""No-reference checks of a denoised image, for users who have no clean image to compare it with.

The residual ``noisy - denoised`` (Buades et al. 2005's "method noise") is the evidence. A denoiser that
removed noise and nothing else leaves a residual that looks like noise: no larger than the noise sigma,
uncorrelated between neighbouring voxels (white), and unrelated to the anatomy's edges. Removed signal shows as
a residual that is smooth (positive autocorrelation at small lags) or largest where the output has edges.
The statistics are taken inside the foreground (the output above Otsu's threshold, holes filled, within the
denoising mask): the empty background of an MR image would dilute them, and after the Rician correction its
residual is the floor, not zero-mean noise.

The limits are heuristics for a first look, not validated acceptance criteria (``LIMITS``).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from meddiff.diffusion.noise_level import estimate_scan_noise, highpass_sigma, scan_slices, tissue_sigma
from meddiff.errors import MeddiffError

LAGS = (1, 2)
MIN_PAIRS = 64  # fewer foreground voxels (or voxel pairs) in a slice: no statistic for it
GRADIENT_SCALE = 1.0  # voxels: the Gaussian derivative's sigma for the output's edges, in-plane
# Heuristics, each checked against the bundled mri-denoise model, an identity "denoiser" given the clean image,
# and Gaussian blurs, on two held-out real MR slices at 3-9 % Rician noise:
# - whiteness: a pure-noise residual's autocorrelation at lag 1 or 2 is 0 within about 1 / sqrt(pairs) (measured
#   |r| <= 0.012); a residual holding blurred anatomy (Gaussian blur, sigma 3 voxels) gives 0.24-0.72. Only the
#   positive side fails: a negative value is a high-pass residual (the bundled model at its strength 0.7:
#   -0.07 to -0.16), the coarse part of the noise left in the output, not signal taken out of it. High-pass
#   white noise (minus its 3x3 mean, or a Gaussian of 0.7-1 voxel, or its Laplacian) gives -0.16 to -0.40 at
#   lag 1 and at most 0.05 at lag 2: a positive lag 2 beside a negative lag 1 is a pattern, not noise.
# - structure: the correlation of |residual| with the output's gradient is 0 for a pure-noise residual (measured
#   |r| <= 0.009) and for the bundled model (-0.06 to 0); Gaussian blurs give 0.06-0.48.
# - residual: removing more than the noise means removing signal; 10 % above sigma covers the estimator's error
#   (the identity: 0.91-1.01; the bundled model: 0.71-0.83 at strength 0.7, 1.75-2.16 at 2).
# - noise: an output whose noise fell by less than 10 % was barely denoised, or gained texture of its own (the
#   bundled model: 0.09-0.25 at strength 0.7; 0.93-1.12 at 2).
LIMITS = {"whiteness": 0.1, "structure": 0.1, "residual": 1.1, "noise": 0.9}


def denoise_report(noisy: np.ndarray, denoised: np.ndarray, noise_sigma: float | None = None,
                   strength: float | None = None, axis: int | None = None, mask: np.ndarray | None = None,
                   coils: int = 1) -> dict:
    """The no-reference report of one denoising, as a JSON-ready dict (see the module docstring).

    ``noise_sigma``: the sigma the method used (None: it estimated it as ``estimate_scan_noise`` does, for
    ``coils`` receive coils);
    ``strength``: the fraction of it the method removed; ``axis``: a volume's slice axis (default the last): its
    planes hold the in-plane axes of the whiteness check and give the per-slice lists; ``mask``: the voxels that
    were denoised. A 4D image gives ``{"volumes": [...]}``, one report per volume, as the method denoises it.
    """
    noisy, denoised = np.asarray(noisy), np.asarray(denoised)
    if noisy.shape != denoised.shape:
        raise MeddiffError(f"the noisy image {noisy.shape} and the denoised one {denoised.shape} differ in shape")
    if noisy.ndim == 4:
        volumes = range(noisy.shape[3])
        masks = [mask if mask is None or np.ndim(mask) == 3 else mask[..., v] for v in volumes]
        return {"volumes": [denoise_report(noisy[..., v], denoised[..., v], noise_sigma, strength, axis, masks[v],
                                           coils) for v in volumes]}
    if noisy.ndim not in (2, 3):
        raise MeddiffError(f"a denoising report needs a 2D, 3D or 4D image, not shape {noisy.shape}")
    sigma = estimate_scan_noise(noisy, coils=coils).sigma if noise_sigma is None else float(noise_sigma)
    noise = noise_before_after(noisy, denoised, sigma)
    stats = ResidualStatistics(noisy, denoised, noisy.ndim - 1 if axis is None and noisy.ndim == 3 else axis, mask)
    std, mean = stats.residual()
    whiteness, structure = stats.whiteness(), stats.structure()
    report = {
        "method": {"noise_sigma": _num(sigma), "noise_sigma_from": "estimated" if noise_sigma is None else "given",
                   "strength": strength, "removed_sigma": None if strength is None else _num(strength * sigma)},
        "noise_sigma": noise,
        "residual": {"foreground_voxels": stats.voxels, "std": _num(std), "mean": _num(mean),
                     "autocorrelation": {"lags": list(LAGS), **{f"axis {a}": [_num(r) for r in rs]
                                                               for a, rs in whiteness.items()}},
                     "edge_correlation": _num(structure)},
        "checks": checks(noise["input"], noise["output"], sigma, std, whiteness, structure),
    }
    if stats.planes > 1:
        report["slices"] = stats.per_slice()
    return report


def noise_before_after(noisy: np.ndarray, denoised: np.ndarray, sigma: float) -> dict:
    """The noise sigma of the input and of the output by one estimator: the Gaussian sigma of bright tissue
    (``tissue_sigma``; the same rule for both, with the method's ``sigma`` for "bright"), or where the input has
    too little bright tissue the high-pass sigma of the whole image. The method's own estimator reads the input's
    background, which a denoised image, Rician floor removed, no longer has."""
    # float64, as estimate_noise works: scipy's filters keep an integer input's type (and overflow in it)
    noisy, denoised = (np.asarray(scan_slices(a), np.float64) for a in (noisy, denoised))
    before = tissue_sigma(noisy, sigma)
    if before is None:
        return {"input": _num(highpass_sigma(noisy)), "output": _num(highpass_sigma(denoised)),
                "estimator": "high-pass MAD, whole image"}
    after = tissue_sigma(denoised, sigma)
    return {"input": _num(before[0]), "output": None if after is None else _num(after[0]),
            "estimator": "high-pass MAD, bright tissue"}


def checks(before: float, after: float | None, sigma: float, std: float | None, whiteness: dict[int, list],
           structure: float | None) -> dict:
    """Each check's value, limit, whether it passed (None: too few foreground voxels to tell) and a verdict in
    words."""
    unknown = None, "too few foreground voxels to tell"
    reduction = after / before if after is not None and before > 0 else None
    if reduction is None:
        noise = None, "too little bright tissue in the output to tell"
    elif reduction <= LIMITS["noise"]:
        noise = True, f"the estimated noise fell by {100 * (1 - reduction):.0f} %"
    else:
        noise = False, ("the estimated noise barely fell (or rose): little was removed, or the output has "
                        "fine texture of its own")
    ratio = std / sigma if std is not None and sigma > 0 else None
    if ratio is None:
        level = unknown
    elif ratio <= LIMITS["residual"]:
        level = True, "no more than the noise was removed"
    else:
        level = False, "more than the noise sigma was removed: part of the signal went with it"
    values = {(a, lag): r for a, rs in whiteness.items() for lag, r in zip(LAGS, rs, strict=True) if r is not None}
    largest = max(values, key=values.get) if values else None
    if largest is None:
        white = unknown
    elif values[largest] >= LIMITS["whiteness"]:
        smooth = values.get((largest[0], 1), 0.0) >= 0  # else it alternates from voxel to voxel
        white = False, (f"the residual is correlated between voxels {largest[1]} apart along axis {largest[0]}: "
                        + ("it is smooth: image content was removed with the noise" if smooth else
                           "it alternates from voxel to voxel: a fine pattern (grid, checkerboard, ringing) the "
                           "method added to the output or took from the image")
                        + " (unless the scan's own noise is correlated, as after interpolation or zero-filling)")
    elif min(values.values()) <= -LIMITS["whiteness"]:
        white = True, ("the residual is the fine grain of the noise: its coarser part stays in the output "
                       "(usual at a strength below 1); no sign of removed signal")
    else:
        white = True, "the residual is uncorrelated between neighbouring voxels, as noise is"
    if structure is None:
        edges = unknown
    elif structure < LIMITS["structure"]:
        edges = True, "the residual does not follow the output's edges"
    else:
        edges = False, "the residual is largest at the output's edges: edges were smoothed or removed"
    return {
        "noise": _check(reduction, f"output / input noise sigma <= {LIMITS['noise']}", noise),
        "residual": _check(ratio, f"residual std / method sigma <= {LIMITS['residual']}", level),
        "whiteness": _check(values[largest] if values else None,
                            f"largest autocorrelation at lags {', '.join(map(str, LAGS))} < {LIMITS['whiteness']}",
                            white),
        "structure": _check(structure, f"correlation of |residual| with the output's gradient < "
                                       f"{LIMITS['structure']}", edges),
    }


def summary(report: dict) -> str:
    """One line: the noise before and after and the checks that failed, for a log or a DICOM description."""
    if "volumes" in report:
        failed = sorted({name for volume in report["volumes"] for name, check in volume["checks"].items()
                         if check["ok"] is False})
        return (f"{len(report['volumes'])} volumes; "
                + (f"check {', '.join(failed)}" if failed else "no check failed"))
    failed = [name for name, check in report["checks"].items() if check["ok"] is False]
    sigma = report["noise_sigma"]
    return (f"noise sigma {sigma['input']:g} -> {'?' if sigma['output'] is None else format(sigma['output'], 'g')}; "
            + (f"check {', '.join(failed)}" if failed else "no check failed"))


class ResidualStatistics:
    """Sums of the residual's statistics, slice by slice: the per-slice values and the pooled ones come from
    one pass, and memory stays that of one slice whatever the volume's size.

    Pearson's correlation is written on these sums by hand: numpy's and scipy's (``corrcoef``, ``pearsonr``)
    need every sample at once, which for a volume means copies of it, and give no per-slice values.
    """

    def __init__(self, noisy: np.ndarray, denoised: np.ndarray, axis: int | None, mask: np.ndarray | None):
        from skimage.filters import threshold_otsu

        self.axes = [a for a in range(noisy.ndim) if a != axis]  # the in-plane axes, in the image's numbering
        planes = (noisy[None], denoised[None]) if axis is None else (np.moveaxis(noisy, axis, 0),
                                                                     np.moveaxis(denoised, axis, 0))
        masks = None if mask is None else (np.asarray(mask, bool)[None] if axis is None
                                           else np.moveaxis(np.asarray(mask, bool), axis, 0))
        # flattened: skimage takes a (H, W, 3) volume for a colour image
        threshold = threshold_otsu(np.ravel(denoised)) if np.ptp(denoised) > 0 else np.inf
        self.planes = planes[0].shape[0]
        # per slice: [n, sum, sum of squares] of the residual; per (axis, lag) and for the edges: pair sums
        self.level = np.zeros((self.planes, 3))
        self.pairs = np.zeros((self.planes, 2, len(LAGS), 6))
        self.edges = np.zeros((self.planes, 6))
        for k in range(self.planes):
            clean = planes[1][k].astype(np.float64)
            residual = planes[0][k] - clean
            foreground = ndimage.binary_fill_holes(clean > threshold)
            if masks is not None:
                foreground &= masks[k]
            values = residual[foreground]
            self.level[k] = values.size, values.sum(), (values**2).sum()
            for i in range(2):
                for j, lag in enumerate(LAGS):
                    head = tuple(slice(None, -lag) if d == i else slice(None) for d in range(2))
                    tail = tuple(slice(lag, None) if d == i else slice(None) for d in range(2))
                    both = foreground[head] & foreground[tail]
                    self.pairs[k, i, j] = _pair_sums(residual[head][both], residual[tail][both])
            gradient = ndimage.gaussian_gradient_magnitude(clean, GRADIENT_SCALE)
            self.edges[k] = _pair_sums(np.abs(values), gradient[foreground])
        self.voxels = int(self.level[:, 0].sum())

    def residual(self) -> tuple[float | None, float | None]:
        """The residual's standard deviation and mean inside the foreground."""
        return _std_mean(self.level.sum(axis=0))

    def whiteness(self) -> dict[int, list]:
        """The residual's autocorrelation at each of ``LAGS`` along each in-plane axis (image axis numbers)."""
        pooled = self.pairs.sum(axis=0)
        return {a: [_pearson(pooled[i, j]) for j in range(len(LAGS))] for i, a in enumerate(self.axes)}

    def structure(self) -> float | None:
        """The correlation of |residual| with the output's gradient magnitude."""
        return _pearson(self.edges.sum(axis=0))

    def per_slice(self) -> dict:
        """Per slice: the residual's std, its largest autocorrelation, and the edge correlation."""
        def largest(k: int) -> float | None:
            values = [r for r in (_pearson(s) for s in self.pairs[k].reshape(-1, 6)) if r is not None]
            return max(values) if values else None

        return {"residual_std": [_num(_std_mean(level)[0]) for level in self.level],
                "autocorrelation": [_num(largest(k)) for k in range(self.planes)],
                "edge_correlation": [_num(_pearson(edges)) for edges in self.edges]}


def _pair_sums(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """What Pearson's correlation of paired samples needs: n and the sums of x, y, x^2, y^2 and xy."""
    return np.array([x.size, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])


def _pearson(sums: np.ndarray) -> float | None:
    n, sx, sy, sxx, syy, sxy = sums
    if n < MIN_PAIRS:
        return None
    vx, vy = sxx - sx * sx / n, syy - sy * sy / n
    return float((sxy - sx * sy / n) / np.sqrt(vx * vy)) if vx > 0 and vy > 0 else None


def _std_mean(level: np.ndarray) -> tuple[float | None, float | None]:
    n, s, ss = level
    if n < MIN_PAIRS:
        return None, None
    return float(np.sqrt(max(ss / n - (s / n) ** 2, 0.0))), float(s / n)


def _check(value: float | None, limit: str, outcome: tuple[bool | None, str]) -> dict:
    return {"value": _num(value), "limit": limit, "ok": outcome[0], "verdict": outcome[1]}


def _num(value: float | None) -> float | None:
    """Four significant digits: the report stays small and no reader needs more."""
    return None if value is None else float(f"{value:.4g}")
