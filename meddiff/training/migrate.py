"""The one migration from the flat training arguments of meddiff <= this change to the nested, typed ones.

``DiffusionModule`` and ``AutoencoderModule`` once took every field of the model description one by one
(``channels``, ``beta_schedule``, ``image_shape``, ...); they now take the typed descriptions of
``meddiff.model`` (``unet: UNetConfig``, ``schedule: NoiseSchedule``, ``image: ImageConfig``,
``autoencoder: AutoencoderConfig``) and, for the diffusion module, ``conditioning: Conditioning``.
``nested_arguments`` maps an old flat argument dict (a checkpoint's ``hyper_parameters``, an old YAML's
``model.init_args``) to the new form; ``meddiff export`` applies it to every checkpoint it reads, and
``meddiff fit`` names the new key of an old one (``moved_key``). Nested input passes through unchanged.
"""

from __future__ import annotations

# old flat key -> (group, field) of the new nested arguments, per module kind (``KIND`` of the module)
DIFFUSION = {
    **{key: ("unet", key) for key in ("spatial_dims", "channels", "attention_levels", "num_res_blocks",
                                      "num_head_channels", "norm_num_groups", "num_class_embeds", "concat_channels")},
    **{key: ("schedule", key) for key in ("num_train_timesteps", "beta_schedule", "prediction", "timestep_sampling",
                                          "beta_start", "beta_end")},
    "schedule": ("schedule", "kind"),  # the old flat ``schedule: ddpm | rflow``
    "image_shape": ("image", "shape"),
    "image_spacing": ("image", "spacing"),
    "modality": ("image", "modality"),
    "intensity_range": ("image", "intensity_range"),
    **{key: ("conditioning", key) for key in ("class_key", "concat_key", "text_encoder", "report_key",
                                              "condition_dropout")},
}
AUTOENCODER = {
    **{key: ("autoencoder", key) for key in ("spatial_dims", "channels", "latent_channels", "num_res_blocks",
                                             "attention_levels", "norm_num_groups", "with_nonlocal_attn",
                                             "decode_tile")},
    "image_shape": ("image", "shape"),
    "image_spacing": ("image", "spacing"),
    "modality": ("image", "modality"),
    "intensity_range": ("image", "intensity_range"),
}
DEFAULT_AUTOENCODER_CHANNELS = (32, 64, 64)
FLAT_KEYS = {"diffusion": DIFFUSION, "autoencoder": AUTOENCODER}
# what the old flat signatures defaulted to where the nested defaults would differ (ImageConfig.shape is required,
# and the two modules defaulted to different modalities)
OLD_DEFAULTS = {
    "diffusion": {"image": {"shape": [64, 64], "spacing": None, "modality": "MR", "intensity_range": [-1.0, 1.0]}},
    "autoencoder": {"image": {"shape": [64, 64], "spacing": None, "modality": "CT", "intensity_range": [-1.0, 1.0]}},
}


def _old(key: str, value, kind: str) -> bool:
    """Whether ``key: value`` is an old flat argument (the old ``schedule`` only as a string, not the new group)."""
    return key in FLAT_KEYS[kind] and not (key == "schedule" and isinstance(value, dict))


def is_flat(arguments: dict, kind: str = "diffusion") -> bool:
    """True if ``arguments`` hold any old flat key."""
    return any(_old(key, value, kind) for key, value in arguments.items())


def nested_arguments(flat: dict, kind: str = "diffusion") -> dict:
    """Old flat module arguments -> the nested ones (``kind``: "diffusion" for ``DiffusionModule``, "autoencoder"
    for ``AutoencoderModule``). Keys of neither form (``lr``, ``export_dir``, ``_class_path``...) stay as they are;
    a group the flat arguments touch starts from the old defaults, so the same network comes back."""
    if kind not in FLAT_KEYS:
        return dict(flat)
    mapping = FLAT_KEYS[kind]
    nested = {key: dict(value) if isinstance(value, dict) else value
              for key, value in flat.items() if not _old(key, value, kind)}
    for key, value in flat.items():
        if _old(key, value, kind):
            group, field = mapping[key]
            if value is None and (group, field) == ("autoencoder", "attention_levels"):
                value = [False] * len(flat.get("channels", DEFAULT_AUTOENCODER_CHANNELS))  # the old default
            if group not in nested:
                nested[group] = dict(OLD_DEFAULTS[kind].get(group, {}))
            nested[group][field] = list(value) if isinstance(value, tuple) else value
    return nested


def moved_key(key: str, kind: str | None = None) -> str | None:
    """The new name (``unet.channels``) of an old flat argument name, or None if ``key`` is not an old one."""
    for name in [kind] if kind else list(FLAT_KEYS):
        if key in FLAT_KEYS.get(name, {}):
            group, field = FLAT_KEYS[name][key]
            return f"{group}.{field}"
    return None
