"""Resume state saved after every finished experience, without pickled Python objects.

A checkpoint is a folder holding `state-<k>.pt` (a flat dict of tensors, loadable with
`torch.load(weights_only=True)`: model `state_dict`, the strategy's `extra_state`,
torch RNG states) and `checkpoint.json` (experience count, accuracy-matrix rows,
profiler records, python/numpy RNG states and the run's identity).  The tensor file is
written first and the JSON renamed over the old one last, so a kill at any moment
leaves either the previous complete checkpoint or the new one.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clbench.errors import UsageError
from clbench.models.heads import IncrementalLinear
from clbench.reporting.results import RunResult, result_path, write_json_atomic

META = "checkpoint.json"


def checkpoint_dir(output_dir: str, result: RunResult) -> Path:
    """`<out>/.resume/<same relative path as the result, without .json>` (hidden from leaderboards)."""
    rel = result_path(output_dir, result).relative_to(Path(output_dir))
    return Path(output_dir) / ".resume" / rel.with_suffix("")


def identity(result: RunResult) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed (timing fields excluded)."""
    run = {k: v for k, v in result.run_config.items() if k not in ("progress", "output_dir", "num_workers")}
    return {
        "strategy": result.strategy,
        "scenario": result.scenario,
        "backbone": result.backbone,
        "seed": result.seed,
        "strategy_config": result.strategy_config,
        "run_config": run,
        "aux": result.aux,
        "class_order": result.scenario_info.get("class_order"),
    }


def save(folder: Path, strategy, result: RunResult, completed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {f"model.{k}": v.detach().cpu() for k, v in strategy.state_dict().items()}
    tensors.update({f"extra.{k}": v.detach().cpu() for k, v in strategy.extra_state().items()})
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    state_file = folder / f"state-{completed}.pt"
    tmp = state_file.with_suffix(".pt.tmp")
    torch.save(tensors, tmp)
    tmp.replace(state_file)
    np_state = np.random.get_state()
    meta = {
        "completed_experiences": completed,
        "state_file": state_file.name,
        "identity": identity(result),
        "accuracy_matrix": result.accuracy_matrix,
        "initial_accuracy": result.initial_accuracy,
        "edge_per_experience": result.edge["per_experience"],
        "detection": result.detection,
        "forecasting": result.forecasting,
        "aux_results": result.aux_results,
        "diagnostics": result.diagnostics,
        "global_step_offset": strategy.global_step_offset,
        "rng_python": _jsonable(random.getstate()),
        "rng_numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    write_json_atomic(folder / META, meta)
    for old in folder.glob("state-*.pt"):
        if old.name != state_file.name:
            old.unlink(missing_ok=True)


def load(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
    meta_file = folder / META
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        tensors = torch.load(folder / meta["state_file"], weights_only=True, map_location="cpu")
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UsageError(f"checkpoint in {str(folder)!r} is unreadable ({type(e).__name__}); delete it to start over") from None
    return meta, tensors


def check_identity(meta: dict[str, Any], result: RunResult, folder: Path) -> None:
    saved, now = meta["identity"], json.loads(json.dumps(identity(result)))
    if saved != now:
        diff = sorted(k for k in now if saved.get(k) != now.get(k))
        raise UsageError(
            f"checkpoint in {str(folder)!r} was made with different settings ({', '.join(diff)}); "
            f"rerun without --resume, or delete the checkpoint"
        )


def load_strategy_state(strategy, model: dict[str, torch.Tensor], extra: dict[str, torch.Tensor]) -> None:
    """Load a saved `state_dict` (`model`) and `extra_state` into a strategy built afresh, in a process
    where no experience has started (what --resume does)."""
    strategy.prepare_for_state(model)
    prepare_modules(strategy, model)
    strategy.load_state_dict(model, strict=True)
    strategy.load_extra_state(extra)


def restore(strategy, meta: dict[str, Any], tensors: dict[str, torch.Tensor], result: RunResult) -> None:
    """Put strategy, RNGs and result back to the state right after experience `completed - 1`."""
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_strategy_state(strategy, model, {k[len("extra."):]: v for k, v in tensors.items() if k.startswith("extra.")})
    strategy.global_step_offset = meta["global_step_offset"]
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    random.setstate(_tuplify(meta["rng_python"]))
    kind, keys, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    result.accuracy_matrix = meta["accuracy_matrix"]
    result.initial_accuracy = meta["initial_accuracy"]
    result.edge["per_experience"] = meta["edge_per_experience"]
    result.detection = meta.get("detection", {})
    result.forecasting = meta.get("forecasting", {})
    result.aux_results = meta.get("aux_results", {})
    result.diagnostics = meta.get("diagnostics", [])


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    # drop now-empty parents, .resume itself included (rmdir refuses a folder still in use)
    for parent in folder.parents:
        if not parent.exists():
            break
        try:
            parent.rmdir()
        except OSError:
            break
        if parent.name == ".resume":
            break


def prepare_modules(strategy: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give the module tree the shapes of the saved state: teacher snapshots, grown heads, buffers
    a strategy registers once an experience tells it their size (TUNA's stored task adapters), and
    buffers that grow by a row per task (EASE's adapters and prototypes) at their saved size."""
    for key in sorted(state):
        parts = key.split(".")
        owner: nn.Module | None = strategy
        for depth, part in enumerate(parts[:-1]):
            if part.isdigit() and isinstance(owner, nn.ModuleList):
                while len(owner) <= int(part):  # a list of snapshots (multi_teacher) not yet taken
                    owner.append(strategy.frozen_copy())
            child = getattr(owner, part, None) if not part.isdigit() else owner[int(part)]  # type: ignore[index]
            if child is None:
                # a snapshot taken with CLStrategy.frozen_copy (a teacher) that does not exist yet
                setattr(owner, part, strategy.frozen_copy())
                child = getattr(owner, part)
            if not isinstance(child, nn.Module):
                owner = None
                break
            owner = child
        if owner is None:
            continue
        name = parts[-1]
        if not hasattr(owner, name):
            owner.register_buffer(name, torch.empty_like(state[key]))
        elif name in owner._buffers and owner._buffers[name] is not None and owner._buffers[name].shape != state[key].shape:
            owner._buffers[name] = torch.empty_like(state[key], device=owner._buffers[name].device)  # a buffer that grows
    for mod_name, module in strategy.named_modules():
        if isinstance(module, IncrementalLinear):
            key = f"{mod_name}.fc.weight" if mod_name else "fc.weight"
            if key in state:
                module.resize(state[key].shape[0])


def _jsonable(obj):
    if isinstance(obj, tuple):
        return [_jsonable(o) for o in obj]
    return obj


def _tuplify(obj):
    if isinstance(obj, list):
        return tuple(_tuplify(o) for o in obj)
    return obj
