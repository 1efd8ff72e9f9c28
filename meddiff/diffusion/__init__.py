"""Noise schedules, samplers and the denoising objective."""
