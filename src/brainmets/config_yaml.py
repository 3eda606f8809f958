"""A resolved config as YAML with a comment on every key: a file to start a cohort's config from.

``brainmets config`` prints it; saved as ``my.yaml`` it loads back to the same config
(``--config my.yaml``). The comments are the field descriptions of :mod:`brainmets.config`, so
they cannot drift from what the keys do.
"""

from __future__ import annotations

import inspect
import textwrap

import yaml
from pydantic import BaseModel

from brainmets.config import PRESET_SUMMARIES, SPECIFIED, Config, preset_overrides

__all__ = ["annotated_yaml"]


def _scalar(value: object) -> str:
    """One value in YAML flow style (lists on one line, strings quoted where YAML needs it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _section_note(section: BaseModel) -> str:
    """The first paragraph of the section's own docstring (not one inherited from pydantic)."""
    doc = type(section).__dict__.get("__doc__")
    if not doc:
        return ""
    return " ".join(inspect.cleandoc(doc).split("\n\n", 1)[0].split()).replace("``", "")


def _lines(section: BaseModel, indent: str, prefix: str, marked: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        key = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            note = info.description or _section_note(value)
            lines.append(f"{indent}{name}:" + (f"  # {note}" if note else ""))
            lines += _lines(value, indent + "  ", f"{key}.", marked)
            continue
        if isinstance(value, tuple):
            value = list(value)
        note = info.description or ""
        if key in SPECIFIED:
            note += f" [specified: {SPECIFIED[key]}]"
        if key in marked:
            note += f" [{marked[key]}]"
        lines.append(f"{indent}{name}: {_scalar(value)}" + (f"  # {note.strip()}" if note else ""))
    return lines


def annotated_yaml(cfg: Config | None = None, *, preset: str | None = None) -> str:
    """``cfg`` (default: the defaults) as commented YAML that ``load_config`` reads back;
    ``preset``: the name of the preset it was made from, said in the header."""
    cfg = Config() if cfg is None else cfg
    header = [
        "# brainmets configuration: every key with its value and what it does.",
        "# Save as my.yaml, edit, then: brainmets index/prepare/train --config my.yaml",
        "# (keys left out keep their defaults; --set KEY=VALUE overrides one key).",
    ]
    marked: dict[str, str] = {}
    if preset is not None:
        header += textwrap.wrap(
            f"From the preset {preset}: {PRESET_SUMMARIES[preset]}. Its keys are marked "
            f"[preset {preset}].",
            width=94,
            initial_indent="# ",
            subsequent_indent="# ",
        )
        marked = {text.split("=", 1)[0]: f"preset {preset}" for text in preset_overrides(preset)}
    return "\n".join(header + _lines(cfg, "", "", marked)) + "\n"
