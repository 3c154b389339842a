"""A Qwen3-VL text config's rope fields, however the transformers that wrote or reads it spells them.

transformers 4.57 keeps ``rope_theta`` beside ``rope_scaling`` (``rope_type``, ``mrope_section``,
``mrope_interleaved``); 5.x keeps all four in one ``rope_parameters`` and has no ``rope_theta`` attribute. A
config.json holds whichever spelling wrote it, and transformers 4.57 does not read 5.x's: its config keeps
``rope_parameters`` as an unknown field and its modules compute with its own default theta and no mrope section.

Every function here reads a transformers text config of either version or a raw ``text_config`` dict from
config.json, so the checks and the loader read the rope settings in one way. No torch, no transformers.
"""

from __future__ import annotations

# transformers' mrope_section where the rope settings name none (Qwen3-VL's modules, 4.57 and 5.x)
DEFAULT_MROPE_SECTION = [24, 20, 20]


def _field(config, name: str):
    """A field of a config object or of a config.json dict; None where it has none."""
    if isinstance(config, dict):
        return config.get(name)
    return getattr(config, name, None)


def rope_settings(text_config) -> tuple[str, object]:
    """(field, value): the rope settings and the field that holds them, ``rope_parameters`` (5.x) or
    ``rope_scaling`` (4.57). The value is as found: a dict, or whatever a broken file holds; (``rope_scaling``,
    None) where the config has neither.

    A 5.x config answers ``rope_scaling`` too, as an alias of its ``rope_parameters``. Where a config.json holds
    both, different, both versions of transformers compute with ``rope_scaling`` (5.x drops the other), and so
    does this."""
    scaling, parameters = _field(text_config, "rope_scaling"), _field(text_config, "rope_parameters")
    if parameters is not None and (scaling is None or scaling == parameters):
        return "rope_parameters", parameters
    return "rope_scaling", scaling


def rope_theta_field(text_config) -> str:
    """Where the rotary base is read from, for messages: ``rope_parameters.rope_theta`` (5.x) or ``rope_theta``."""
    name, settings = rope_settings(text_config)
    if isinstance(settings, dict) and "rope_theta" in settings:
        return f"{name}.rope_theta"
    return "rope_theta"


def rope_theta(text_config) -> object:
    """The rotary base: from the rope settings (5.x), else the config's own ``rope_theta`` (4.57); None where
    neither holds one (a raw 4.57 config.json without it: transformers' default then applies)."""
    name, settings = rope_settings(text_config)
    if isinstance(settings, dict) and "rope_theta" in settings:
        return settings["rope_theta"]
    return _field(text_config, "rope_theta")


def rope_section(text_config) -> object:
    """The mRoPE section (time, height, width frequencies): the rope settings' ``mrope_section``, transformers'
    default where they name none, None where there are no rope settings (a dict) at all."""
    _, settings = rope_settings(text_config)
    if not isinstance(settings, dict):
        return None
    return settings.get("mrope_section", DEFAULT_MROPE_SECTION)


def legacy_rope(text_config: dict) -> dict:
    """A config.json ``text_config`` in transformers 4.57's spelling: 5.x's ``rope_parameters`` split into
    ``rope_theta`` and ``rope_scaling``. Anything else (4.57's spelling already, or a ``rope_parameters`` that is no
    dict, which the checks then name) comes back unchanged."""
    name, settings = rope_settings(text_config)
    if name != "rope_parameters" or not isinstance(settings, dict):
        return text_config
    legacy = {key: value for key, value in text_config.items() if key != "rope_parameters"}
    legacy["rope_scaling"] = {key: value for key, value in settings.items() if key != "rope_theta"}
    if "rope_theta" in settings:
        legacy["rope_theta"] = settings["rope_theta"]
    return legacy
