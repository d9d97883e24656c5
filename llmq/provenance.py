"""Where an output folder says it came from: base model, license, command. No local absolute paths.

An output folder is made to be published, so nothing written into it names the machine it was made on: a
local path given as absolute (or with `~` or `..`) is written as its last component (`/home/me/models/foo`
-> `foo`); relative paths and Hub ids stay as given. The base model is, in order: `--base-model ID`; the Hub
id of the offline model; the base model an llmq output folder records; for a local Hugging Face folder, the
Hub id its config.json records (`_name_or_path`, which older transformers wrote) or that its place in a Hub
cache (`models--org--name/snapshots/...`) gives; for a .gguf, the source repository its metadata records;
else the model's public name (and the card then omits `base_model`). The license comes from GGUF metadata
(`general.license`) when present.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from pathlib import Path
from typing import Any

from .config import Recipe

log = logging.getLogger(__name__)

OFFLINE_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_HUB_URL = re.compile(r"huggingface\.co/(?:models/)?([A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*?)(?:\.git)?/?$")
# an absolute path inside text: a "/" (or "~/", "~user/") that does not continue a word, URL or relative path
_ABS_IN_TEXT = re.compile(r"(?<![\w:/.~-])(?:~[\w.-]*)?/[^\s'\"=,;:)]+")


def public_path(value: str | None) -> str | None:
    """`value`, or its last component if it is a local path given as absolute, with `~` or with `..`."""
    if not value or value.startswith("llmq:"):
        return value
    p = Path(value)
    if value.startswith("~") or p.is_absolute() or ".." in p.parts:
        return p.name or value
    return value


def public_text(text: str) -> str:
    """`text` with every absolute local path in it reduced to its last component."""
    return _ABS_IN_TEXT.sub(lambda m: m.group(0).rstrip("/").rsplit("/", 1)[-1] or m.group(0), text)


def public(data: Any) -> Any:
    """`public_text` applied to every string in a JSON-like structure (keys included)."""
    if isinstance(data, str):
        return public_text(data)
    if isinstance(data, dict):
        return {public(k): public(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [public(v) for v in data]
    return data


def public_recipe(recipe: Recipe) -> Recipe:
    """The recipe as an output folder stores it: its local paths reduced by `public_path`."""
    keys = {"model": recipe.model, "calibration.source": recipe.calibration.source,
            "calibration.act_scales": recipe.calibration.act_scales, "evaluation.data": recipe.evaluation.data}
    return recipe.override({k: public_path(v) for k, v in keys.items() if v != public_path(v)})


@functools.lru_cache(maxsize=8)
def gguf_metadata(path: str) -> dict[str, Any]:
    """The `general.*` string metadata of a .gguf file ({} if it cannot be read: loading reports that)."""
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
        return {k: f.contents() for k, f in fields.items() if k.startswith("general.")
                and isinstance(f.contents(), str)}
    except Exception as e:  # a damaged or foreign file raises anything; the loader gives the real error
        log.debug("cannot read the GGUF metadata of %s: %s", path, e)
        return {}


def _hub_id(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    m = _HUB_URL.search(value)
    value = m.group(1) if m else value
    return value if _HUB_ID.match(value) and not Path(value).expanduser().exists() else None


def _folder_base(p: Path) -> str | None:
    if (p / "llmq_report.json").is_file():  # re-quantizing an llmq output: its own base model
        try:
            return _hub_id(json.loads((p / "llmq_report.json").read_text(encoding="utf-8")).get("base_model"))
        except (OSError, ValueError, AttributeError):
            return None
    try:
        recorded = json.loads((p / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    cached = next((q.name.split("--", 1)[1].replace("--", "/", 1) for q in (p.absolute(), *p.absolute().parents)
                   if q.name.startswith("models--") and q.name.count("--") == 2), None)
    return _hub_id(recorded) or _hub_id(cached)


def base_model(model: str, given: str | None = None) -> str:
    """What the card calls the base model: a Hub id when one is known (see the module docstring), else the
    model's public name."""
    if given:
        return given
    if model.startswith("llmq:"):
        from .assets import model_asset

        return model_asset(model).base_model
    p = Path(model).expanduser()
    found = None
    if p.is_dir():
        found = _folder_base(p)
    elif p.is_file() and p.suffix.lower() == ".gguf":
        meta = gguf_metadata(str(p))
        found = _hub_id(meta.get("general.source.huggingface.repository")) or _hub_id(
            meta.get("general.source.repo_url"))
    return found or public_path(model) or model


def license_of(model: str) -> str | None:
    """The model's license identifier when the model states one (offline model, GGUF metadata)."""
    if model.startswith("llmq:"):
        from .assets import model_asset

        return model_asset(model).license
    p = Path(model).expanduser()
    if p.is_file() and p.suffix.lower() == ".gguf":
        lic = gguf_metadata(str(p)).get("general.license")
        return lic.strip().lower() if lic and lic.strip() else None
    return None


def provenance(recipe: Recipe, command: str) -> dict[str, Any]:
    """The report's `base_model`, `license` and `command` (local paths reduced)."""
    return {"base_model": base_model(recipe.model, recipe.base_model), "license": license_of(recipe.model),
            "command": public_text(command)}
