"""Training state on disk: ONE safetensors file, written atomically, never pickled.

Tensors (model weights, optimizer moments, RNG states) are safetensors entries; everything else
(optimizer hyper-parameters, the loop position, the recorder's history, Python / numpy RNG
states) is JSON in the file's metadata under ``"mlx_train"`` (read it with
``safetensors.safe_open(path, "pt").metadata()``). Entries: ``model.<key>``,
``opt.<param index>.<state name>``, ``rng.torch``, ``rng.cuda.<i>``, ``rng.numpy``,
``rng.loader.<i>`` (the data loaders' own generators).

Under data parallelism every process calls ``save_state`` and only rank 0 writes. Parameters
and optimizer moments sharded by FSDP2 (DTensors) are gathered into whole tensors on save (a
collective: every process must save) and cut back into each process's shard on load, so the
file is the same whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

FORMAT = "mlx-train-state"
VERSION = 1


def atomic_save(tensors: dict[str, torch.Tensor], path: Path, meta: dict) -> Path:
    """``save_file`` into a temporary sibling, then ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"mlx_train": json.dumps(meta)})
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def read(path: Path, kind: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON metadata of a file written by ``atomic_save`` (checked to be ``kind``)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file: {path}")
    with safe_open(str(path), "pt") as f:
        raw = (f.metadata() or {}).get("mlx_train")
    if raw is None:
        raise ValueError(f"{path} is a safetensors file but not one written by mlx_train")
    meta = json.loads(raw)
    if meta.get("format") != kind:
        raise ValueError(f"{path} holds {meta.get('format')!r}, expected {kind!r}")
    if meta.get("version", 0) > VERSION:
        raise ValueError(f"{path} has format version {meta['version']}; this mlx_train reads "
                         f"up to {VERSION}: upgrade mlx-train")
    return load_file(str(path)), meta


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"  # FSDP2's sharded tensors; no import when unused


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t``, or for a DTensor the whole tensor gathered from every process (a collective)."""
    return t.full_tensor() if _is_dtensor(t) else t


def shard_like(ref, full: torch.Tensor) -> torch.Tensor:
    """``full`` as ``ref`` holds it: this process's shard when ``ref`` is a DTensor (every
    process read the same file, so each cuts its own shard: no communication)."""
    if not _is_dtensor(ref) or tuple(full.shape) != tuple(ref.shape):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(device=ref.device, dtype=ref.dtype), ref.device_mesh,
                             ref.placements, src_data_rank=None)


def model_tensors(model: torch.nn.Module, prefix: str = "model.") -> tuple[dict, dict]:
    """The state dict with tensors that share storage (tied weights) stored once:
    ``(tensors, aliases)`` with ``aliases[name] = name it shares storage with``."""
    tensors, aliases, seen = {}, {}, {}
    for name, t in model.state_dict().items():
        local = t.to_local() if _is_dtensor(t) else t
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(t.shape),
               t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
        else:
            if key is not None:
                seen[key] = name
            tensors[prefix + name] = full_tensor(t)
    return tensors, aliases


def restore_model(model: torch.nn.Module, tensors: dict, aliases: dict, strict: bool,
                  prefix: str = "model.") -> None:
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    for name, target in aliases.items():
        state[name] = state[target]
    refs = model.state_dict()
    if any(_is_dtensor(t) for t in refs.values()):
        state = {k: shard_like(refs[k], v) if k in refs else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise ValueError(f"the file does not match {type(model).__name__}: missing keys "
                         f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected keys "
                         f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")


def _jsonable(v):
    if isinstance(v, torch.Tensor):
        return v.item() if v.numel() == 1 else v.tolist()
    if isinstance(v, tuple):
        return [_jsonable(o) for o in v]
    if isinstance(v, dict):
        return {k: _jsonable(o) for k, o in v.items()}
    if isinstance(v, (list,)):
        return [_jsonable(o) for o in v]
    return v


def _loader_generators(learn) -> list[torch.Generator]:
    dls = learn.dls
    if dls is None:
        return []
    return [g for loader in (dls.train, dls.valid) if loader is not None for g in loader.generators]


def save_state(learn, path: Path, with_opt: bool = True) -> Path:
    tensors, aliases = model_tensors(learn.model)
    meta = {"format": FORMAT, "version": VERSION, "aliases": aliases, "with_opt": with_opt}
    if with_opt:
        if learn.opt is None:
            learn.create_opt()
        sd = learn.opt.state_dict()
        extra = {}
        for idx, st in sd["opt"]["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"opt.{idx}.{k}"] = full_tensor(v)
                else:
                    extra.setdefault(str(idx), {})[k] = _jsonable(v)
        meta["opt"] = {"param_groups": _jsonable(sd["opt"]["param_groups"]), "extra": extra,
                       "frozen_idx": sd["frozen_idx"], "type": type(learn.opt.opt).__name__}
        meta["loop"] = {"epochs_done": learn.epochs_done, "train_iter": learn.train_iter,
                        "n_epoch": learn.n_epoch}
        recorder = learn.cb("recorder")
        meta["recorder"] = recorder.state_dict() if recorder is not None else None
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda.{i}"] = s
        version, pystate, gauss = random.getstate()
        np_state = np.random.get_state()
        tensors["rng.numpy"] = torch.from_numpy(np_state[1].astype(np.int64))
        gens = _loader_generators(learn)
        for i, g in enumerate(gens):
            tensors[f"rng.loader.{i}"] = g.get_state()
        meta["rng"] = {"python": [version, list(pystate), gauss],
                       "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
                       "loaders": len(gens)}
    from mlx_train.distributed import is_main_process

    if not is_main_process():  # the others only took part in gathering sharded tensors
        return Path(path)
    return atomic_save(tensors, Path(path), meta)


def load_state(learn, path: Path, with_opt: bool = True, strict: bool = True,
               resume: bool = True) -> None:
    tensors, meta = read(path, FORMAT)
    restore_model(learn.model, tensors, meta.get("aliases", {}), strict)
    if not with_opt:
        return
    if not meta.get("with_opt"):
        raise ValueError(f"{path} holds the model only (saved with with_opt=False); load it "
                         "with with_opt=False")
    if learn.opt is None:
        learn.create_opt()
    om = meta["opt"]
    state: dict = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = t
    for idx, st in om["extra"].items():
        state.setdefault(int(idx), {}).update(st)
    params = [p for g in learn.opt.opt.param_groups for p in g["params"]]  # torch's indices
    for idx, st in state.items():
        if idx < len(params):
            for name, t in st.items():
                if isinstance(t, torch.Tensor):
                    st[name] = shard_like(params[idx], t)
    try:
        learn.opt.load_state_dict({"opt": {"state": state, "param_groups": om["param_groups"]},
                                   "frozen_idx": om["frozen_idx"]})
    except ValueError as e:
        raise ValueError(f"the optimizer state in {path} does not fit this learner's optimizer "
                         f"({om['type']} with {len(om['param_groups'])} param groups saved): "
                         f"same model, splitter and opt_func? ({e})") from None
    if not resume:
        return
    loop = meta["loop"]
    learn.epochs_done, learn.train_iter = loop["epochs_done"], loop["train_iter"]
    learn.epoch = loop["epochs_done"]
    recorder = learn.cb("recorder")
    if recorder is not None and meta.get("recorder") is not None:
        recorder.load_state_dict(meta["recorder"])
    rng = meta["rng"]
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, pystate, gauss = rng["python"]
    random.setstate((version, tuple(pystate), gauss))
    name, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, cached))
    gens = _loader_generators(learn)
    if len(gens) != rng["loaders"]:
        warnings.warn(f"{path} holds {rng['loaders']} data-loader generator states but this "
                      f"learner's loaders have {len(gens)}, so their shuffling is not restored; "
                      "build the DataLoaders the same way (e.g. the same seed=) to resume exactly",
                      stacklevel=3)
        return
    for i, g in enumerate(gens):
        g.set_state(tensors[f"rng.loader.{i}"])


__all__ = ["atomic_save", "full_tensor", "load_state", "model_tensors", "read", "restore_model",
           "save_state", "shard_like"]
