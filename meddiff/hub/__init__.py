"""Readers of published model formats into meddiff models, one module each, and the MONAI bundle writer.

Configs are read as data, never evaluated; weights go through ``meddiff.weights`` (tensors only).
"""
