"""What only a model's or a data set's owner knows, from a file: the facts that ``cifarlab
audit``'s model card and ``cifarlab datasheet``'s DATASHEET.md otherwise mark as not recorded.

The file (YAML or TOML) has two sections, ``model`` and ``data``, of plain-text answers; every
key is optional. Kept beside the data or the code, it is read again at each audit, so the
answers survive the reports being written anew (an edit to MODEL_CARD.md would not)::

    model:
      developers: Ada Example, Example Lab
      licence: MIT
      contact: ada@example.org
    data:
      consent: Every person pictured signed the release form of 2025.
      licence: CC BY 4.0
"""

from __future__ import annotations

from pathlib import Path

from .errors import ConfigError, did_you_mean

# key -> what it answers; the datasheet's questions are the data keys from motivation to maintenance
ABOUT_KEYS: dict[str, dict[str, str]] = {
    "model": {
        "developers": "who made the model",
        "licence": "the terms the model may be used under",
        "contact": "where to send questions and reports of harm",
        "relevant_factors": "what may change the model's accuracy for an image (photo source, region, camera)",
        "primary_users": "who the model is for",
    },
    "data": {
        "motivation": "why the data set was made, by whom, and who paid for it",
        "collection": "how, when and where the images were gathered",
        "consent": "whether the people pictured were told and agreed, and whether they can withdraw",
        "labelling": "who gave the labels, following which instructions, and how they were paid",
        "coverage": "whose world the images show, and what is missing or rare",
        "licence": "the terms the images may be used, shared and changed under",
        "uses_to_avoid": "what the data should not be used for",
        "maintenance": "who looks after the data, and how errors are reported and put right",
        "label_caveats": "what is known to be wrong or ambiguous in the labels",
    },
}


def read_about(path: str | Path | None) -> dict[str, dict[str, str]]:
    """The answers of the about file ``path`` as ``{'model': {...}, 'data': {...}}`` (empty
    without a file; a blank answer is no answer). Unknown sections or keys, and answers that are
    not text, are refused naming the valid ones, so a misspelt key is not silently left out."""
    from .config import read_config_file

    out: dict[str, dict[str, str]] = {section: {} for section in ABOUT_KEYS}
    if path is None:
        return out
    raw = read_config_file(path, "about file")
    for section, values in raw.items():
        if section not in ABOUT_KEYS:
            raise ConfigError(f"about file '{path}': unknown section '{section}'{did_you_mean(section, ABOUT_KEYS)}; "
                              f"valid: {', '.join(ABOUT_KEYS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"about file '{path}': section '{section}' must hold keys such as "
                              f"{', '.join(list(ABOUT_KEYS[section])[:3])}, found {type(values).__name__}")
        for key, value in values.items():
            if key not in ABOUT_KEYS[section]:
                raise ConfigError(f"about file '{path}': unknown key '{section}.{key}'"
                                  f"{did_you_mean(key, ABOUT_KEYS[section])}; valid in '{section}': "
                                  f"{', '.join(ABOUT_KEYS[section])}")
            if value is None or (isinstance(value, str) and not value.strip()):
                continue  # left blank, as the template leaves it: not answered
            if not isinstance(value, str):
                raise ConfigError(f"about file '{path}': '{section}.{key}' must be text, found {value!r}; quote "
                                  "it")
            out[section][key] = " ".join(value.split())  # one paragraph, as the reports print it
    return out


def template() -> str:
    """An about file with every key, each answer blank for its owner to fill in, as YAML."""
    lines = ["# What cifarlab's model card and datasheet cannot measure: answer what you know; blank answers "
             "are left out."]
    for section, keys in ABOUT_KEYS.items():
        lines.append(f"{section}:")
        for key, what in keys.items():
            lines.append(f"  # {what}")
            lines.append(f"  {key}:")
    return "\n".join(lines) + "\n"
