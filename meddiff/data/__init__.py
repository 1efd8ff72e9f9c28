"""Manifests, MONAI dict transforms, the Lightning DataModule and the offline sample set."""
