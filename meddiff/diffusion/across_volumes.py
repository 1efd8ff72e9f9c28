"""The other volumes of a 4D series as context: each volume predicted from the others (Patch2Self's idea, Fadnavis
et al., NeurIPS 2020), then denoised in space.

The volumes of a diffusion-weighted, fMRI or multi-echo series see the same anatomy with independent noise. A
linear regression of one volume's voxels on the other volumes' voxels (least squares over the scan's own voxels)
predicts what the volumes share; the volume's own noise is independent of the regressors, so it is not
predicted: the prediction is J-invariant, and its noise is the others' noise through the weights,
``sigma * |beta|`` for independent white noise of one sigma. That known, smaller noise is then what the
spatial prior removes (``pipelines.denoise``). A volume the others do not explain (a b0 among diffusion-weighted
volumes: its contrast is no weighted sum of theirs) leaves a residual well above the noise; it is denoised alone.

Written by hand: dipy's ``patch2self`` needs b-values and separates b0 from diffusion-weighted volumes, which
fMRI and multi-echo series do not have; the regression itself is one least-squares solve per volume.
"""

from __future__ import annotations

import numpy as np

from meddiff.errors import MeddiffError

MIN_VOLUMES = 3
MAX_FIT_VOXELS = 200_000  # the fit's sample: the weights settle long before, memory stays small


def predict_from_other_volumes(array: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(prediction, gain, residual): each volume of the (X, Y, Z, V) ``array`` predicted from the other volumes at
    the same voxel (least squares with an intercept, fitted on at most ``MAX_FIT_VOXELS`` voxels drawn with
    ``seed``), float32 of the array's shape; per volume the norm of its weights, the factor by which independent
    noise of one sigma reaches the prediction; and the standard deviation of the fit's residual, which is the
    noise alone (``sigma sqrt(1 + gain^2)``) only where the others explain the volume's signal."""
    if array.ndim != 4 or array.shape[3] < MIN_VOLUMES:
        raise MeddiffError(f"denoising across volumes needs a 4D series of at least {MIN_VOLUMES} volumes, not shape "
                           f"{array.shape}")
    voxels = array.reshape(-1, array.shape[3])
    rng = np.random.default_rng(seed)
    fit = voxels[rng.choice(len(voxels), min(len(voxels), MAX_FIT_VOXELS), replace=False)].astype(np.float64)
    prediction = np.empty(voxels.shape, np.float32)
    gain, residual = np.empty(array.shape[3]), np.empty(array.shape[3])
    for v in range(array.shape[3]):
        others = [u for u in range(array.shape[3]) if u != v]
        design = np.column_stack([fit[:, others], np.ones(len(fit))])
        weights = np.linalg.lstsq(design, fit[:, v], rcond=None)[0]
        prediction[:, v] = voxels[:, others] @ weights[:-1].astype(np.float32) + np.float32(weights[-1])
        gain[v] = float(np.linalg.norm(weights[:-1]))
        residual[v] = float(np.std(fit[:, v] - design @ weights))
    return prediction.reshape(array.shape), gain, residual
