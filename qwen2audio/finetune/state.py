"""Checkpoints that a run can be killed during and resumed from exactly.

`OUT/checkpoints/step-NNNNNNNN/` holds what the next step needs:
    model.safetensors       the trainable parameters (the adapters, or every weight not frozen), full tensors
    optimizer.safetensors   AdamW's state per parameter (`NAME/exp_avg`, `NAME/exp_avg_sq`, `NAME/step`)
    rng.safetensors         each rank's torch random state (dropout), `rankR/cpu` (and `rankR/cuda`)
    state.json              the step, the options and data it belongs to, the optimizer's param groups
The learning rate is a function of the step (schedule.py) and the data order one of (seed, epoch) (batches.py), so
the step is the scheduler's state and the data position. Only safetensors and JSON are written, never pickle.

Atomic: rank 0 writes the folder under a hidden `.step-NNNNNNNN.partial` name, fsyncs each file and the folder,
renames it into place and fsyncs the parent; only then are older checkpoints removed. A process killed at any
moment leaves the last complete checkpoint as it was (a partial folder is ignored and removed at the next save).
The state dicts are full (gathered over FSDP2's shards, the DDP wrapper's prefix dropped), so a checkpoint does not
depend on how the run was sharded; resuming still requires the same number of processes, whose batches it fixes.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import InputError
from ..ranks import Ranks, broadcast, gather

FORMAT = 1
_GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
_SCATTER = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)


def data_fingerprint(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _flat_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], list]:
    tensors = {f"{name}/{key}": torch.as_tensor(value).contiguous()
               for name, values in state["state"].items() for key, value in values.items()}
    return tensors, state["param_groups"]


def _write(folder: Path, name: str, tensors: dict[str, torch.Tensor] | None = None, data: dict | None = None) -> None:
    path = folder / name
    if tensors is not None:
        save_file(tensors, path, metadata={"format": "pt"})
    else:
        path.write_text(json.dumps(data, indent=1) + "\n")
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out: Path, step: int, module: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks,
                    info: dict) -> Path:
    """Write OUT/checkpoints/step-NNNNNNNN atomically (every rank takes part; rank 0 writes); returns it."""
    model_state = get_model_state_dict(module, options=_GATHER)
    optimizer_state = get_optimizer_state_dict(module, optimizer, options=_GATHER)
    rngs = gather(_rng_state(ranks.device), ranks)
    folder = out / "checkpoints" / f"step-{step:08d}"
    if ranks.is_main:
        partial = folder.parent / f".{folder.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        tensors, groups = _flat_optimizer(optimizer_state)
        _write(partial, "model.safetensors", {k: v.contiguous() for k, v in model_state.items()})
        _write(partial, "optimizer.safetensors", tensors)
        _write(partial, "rng.safetensors", {f"rank{r}/{k}": v for r, rng in enumerate(rngs) for k, v in rng.items()})
        _write(partial, "state.json", data={**info, "format": FORMAT, "step": step, "world": ranks.world,
                                            "param_groups": groups})
        _fsync_folder(partial)
        if folder.exists():  # the same step written again (a resumed run): the old one goes after the new is whole
            folder.rename(folder.parent / f".{folder.name}.old")
        partial.rename(folder)
        _fsync_folder(folder.parent)
        for old in folder.parent.iterdir():
            if old != folder and (old.name.startswith(("step-", ".step-"))):
                shutil.rmtree(old, ignore_errors=True)
    broadcast(None, ranks)  # the others wait until the checkpoint is in place
    return folder


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the latest complete one under an --out folder."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = sorted(p for p in (path / "checkpoints").glob("step-*") if (p / "state.json").is_file()) \
        if (path / "checkpoints").is_dir() else []
    if not found:
        raise InputError(f"--resume {path}: no checkpoint there (a checkpoint folder holds state.json; an --out "
                         "folder holds checkpoints/step-N; they are written with --save-every N)")
    return found[-1]


def read_state(folder: Path) -> dict:
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"--resume {folder}: cannot read state.json ({e})") from None
    if state.get("format") != FORMAT:
        raise InputError(f"--resume {folder}: checkpoint format {state.get('format')!r}, this version reads {FORMAT}")
    return state


def check_compatible(state: dict, folder: Path, ranks: Ranks, info: dict) -> None:
    """The resumed run must compute what the interrupted one would have: same options, data and processes."""
    if state["world"] != ranks.world:
        raise InputError(f"--resume {folder}: the checkpoint was written by {state['world']} process(es), this run "
                         f"has {ranks.world}; resume with the same number (it fixes which examples each step takes)")
    for key in ("options", "data"):
        theirs, ours = state.get(key, {}), info[key]
        if differ := sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k)):
            shown = ", ".join(f"{k}: {theirs.get(k)!r} then, {ours.get(k)!r} now" for k in differ[:3])
            raise InputError(f"--resume {folder}: the checkpoint belongs to another run ({shown}); resume with the "
                             "same data and options")


def load_checkpoint(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer, ranks: Ranks) -> dict:
    """Put the checkpoint's parameters, optimizer state and random state in place; returns its state.json."""
    state = read_state(folder)
    main = ranks.is_main or ranks.world == 1
    model_state = load_file(folder / "model.safetensors") if main else {}
    set_model_state_dict(module, model_state, options=_SCATTER if ranks.world > 1 else _plain())
    optimizer_state = {}
    if main:
        flat = load_file(folder / "optimizer.safetensors")
        optimizer_state = {"state": {}, "param_groups": [{**g, "betas": tuple(g["betas"])}
                                                         for g in state["param_groups"]]}
        for key, value in flat.items():
            name, _, part = key.rpartition("/")
            optimizer_state["state"].setdefault(name, {})[part] = value
    set_optimizer_state_dict(module, optimizer, optimizer_state, options=_SCATTER if ranks.world > 1 else _plain())
    rng = broadcast(load_file(folder / "rng.safetensors") if ranks.is_main else None, ranks)
    torch.set_rng_state(rng[f"rank{ranks.rank}/cpu"])
    if ranks.device.type == "cuda" and f"rank{ranks.rank}/cuda" in rng:
        torch.cuda.set_rng_state(rng[f"rank{ranks.rank}/cuda"], ranks.device)
    return state


def _plain() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, strict=False)
