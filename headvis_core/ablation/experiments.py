"""Saving and reopening ablation experiments (JSON, written atomically).

An experiment records what was run (model, prompts, ablation kind, metric,
mode and settings) and its result: a :class:`~headvis_core.ablation.ranking.HeadRanking`
or a :class:`~headvis_core.ablation.targeted.TargetedResult`. Files live in
``results_dir("experiments")`` unless a path is given; a file that is not
valid JSON or lacks the expected fields raises :class:`CorruptFileError`.
"""

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from headvis_core.ablation.ranking import HeadRanking
from headvis_core.ablation.targeted import TargetedResult
from headvis_core.errors import CorruptFileError, InputError
from headvis_core.paths import results_dir
from headvis_core.storage import atomic_write_json, read_json

FORMAT = "headvis-ablation-experiment"
VERSION = 1
MODES = ("kl", "targeted")


@dataclass
class AblationExperiment:
    model: str
    mode: str  # kl | targeted
    kind: str  # zero | mean | resample
    metric: str
    prompts: list[str]
    result: Union[HeadRanking, TargetedResult]
    settings: dict[str, Any] = field(default_factory=dict)  # preset, target, budget, ...
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d %H:%M:%S"))
    name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "model": self.model, "mode": self.mode, "kind": self.kind,
                "metric": self.metric, "prompts": list(self.prompts), "settings": dict(self.settings),
                "created": self.created, "name": self.name, "result": self.result.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, source: str = "the file") -> "AblationExperiment":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CorruptFileError(f"{source} is not a saved ablation experiment.")
        try:
            mode = data["mode"]
            if mode not in MODES:
                raise ValueError(f"unknown mode {mode!r}")
            result_type = HeadRanking if mode == "kl" else TargetedResult
            return cls(model=str(data["model"]), mode=mode, kind=str(data["kind"]), metric=str(data["metric"]),
                       prompts=[str(p) for p in data["prompts"]], settings=dict(data.get("settings") or {}),
                       created=str(data.get("created", "")), name=str(data.get("name", "")),
                       result=result_type.from_dict(data["result"]))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise CorruptFileError(f"{source} is incomplete or damaged ({type(err).__name__}: {err}); "
                                   "it cannot be reopened.") from err


def experiments_dir() -> Path:
    return results_dir("experiments")


def default_filename(experiment: AblationExperiment) -> str:
    stem = experiment.name or f"{experiment.model}-{experiment.mode}-{experiment.kind}-{time.strftime('%Y%m%d-%H%M%S')}"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") + ".json"


def save_experiment(experiment: AblationExperiment, path: Optional[Union[str, Path]] = None) -> Path:
    """Write the experiment atomically (a reader never sees half a file); returns the path."""
    target = Path(path) if path is not None else experiments_dir() / default_filename(experiment)
    return atomic_write_json(target, experiment.to_dict())


def load_experiment(path: Union[str, Path]) -> AblationExperiment:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"No experiment file at {path}.")
    return AblationExperiment.from_dict(read_json(path), source=path.name)


def experiment_from_json_bytes(data: bytes, source: str = "the uploaded file") -> AblationExperiment:
    """Reopen an experiment from file contents (an upload)."""
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptFileError(f"{source} is corrupt or incomplete ({err}); it cannot be opened.") from err
    return AblationExperiment.from_dict(parsed, source=source)


def list_experiments(folder: Optional[Path] = None) -> list[Path]:
    """Saved experiment files, newest first."""
    folder = folder or experiments_dir()
    if not folder.is_dir():
        return []
    return sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
