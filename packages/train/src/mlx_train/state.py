"""Training state on disk: ONE safetensors file, written atomically, never pickled.

Tensors (model weights, optimizer moments, RNG states) are safetensors entries; everything else
(optimizer hyper-parameters, the loop position, the recorder's history, Python / numpy RNG
states) is JSON in the file's metadata under ``"mlx_train"`` (read it with
``safetensors.safe_open(path, "pt").metadata()``). Entries: ``model.<key>``,
``opt.<param index>.<state name>``, ``rng.torch``, ``rng.cuda.<i>``, ``rng.numpy``,
``rng.loader.<i>`` (the data loaders' own generators, an augmentation's ``.generator`` among
them), ``cb.<key>.<name>`` and ``tfm.<i>.<name>`` (see below).

Callbacks and training-batch transforms that own random state (``MixUp``'s and ``CutMix``'s
generator) follow one protocol: ``state_dict()`` returns a flat dict whose values are tensors
(saved as ``cb.<key>.<name>`` entries) or JSON values (saved in the metadata), and
``load_state_dict(state)`` takes the same dict back. Every callback of the learner that has both
methods is saved under ``"callbacks"`` keyed by its ``name`` (``mix_up``), or ``name.<k>`` when
several callbacks share that name (``k``: their order in ``learn.cbs``); every transform of
``dls.train.aug`` that has them under ``"train_tfms"`` by position. The ``Recorder`` keeps its
own ``"recorder"`` entry. A callback that draws from torch's global RNG needs nothing: that state
is ``rng.torch``. Loading (``resume=True``) raises when the file and the learner disagree about
which of them there are, naming them and the fix (``strict=False``: a warning, and the ones on
both sides are restored).

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


def _has_state(obj) -> bool:
    # looked up on the class: a Callback's missing attributes fall through to the learner
    return callable(getattr(type(obj), "state_dict", None)) and \
        callable(getattr(type(obj), "load_state_dict", None))


def _stateful(learn) -> dict[str, dict]:
    """``{"callbacks": {key: callback}, "train_tfms": {position: transform}}``: what owns random
    state of its own beyond the loaders' generators (see the module's docstring).

    Not here, and not needed: callbacks (and transforms) that draw from torch's global RNG, e.g.
    an unseeded ``torch.rand`` in ``before_batch``, dropout, a loader without a generator. They
    advance ``torch.get_rng_state()``, which is saved as ``rng.torch`` and put back on load, so
    they resume exactly (tests/train/learners/test_resume_augment.py checks it)."""
    from mlx_train.callback.recorder import Recorder

    cbs = [cb for cb in learn.cbs if _has_state(cb) and not isinstance(cb, Recorder)]
    names = [cb.name for cb in cbs]
    seen: dict[str, int] = {}
    found: dict[str, object] = {}
    for name, cb in zip(names, cbs, strict=True):
        k = seen[name] = seen.get(name, -1) + 1
        found[name if names.count(name) == 1 else f"{name}.{k}"] = cb
    train = learn.dls.train if learn.dls is not None else None
    tfms = {str(i): t for i, t in enumerate(getattr(train, "aug", ())) if _has_state(t)}
    return {"callbacks": found, "train_tfms": tfms}


_STATE_PREFIX = {"callbacks": "cb", "train_tfms": "tfm"}


def _save_owned(owners: dict[str, dict], tensors: dict, meta: dict) -> None:
    for kind, objs in owners.items():
        meta[kind] = {}
        for key, obj in objs.items():
            entry = {"class": type(obj).__name__, "tensors": [], "values": {}}
            for name, v in obj.state_dict().items():
                if isinstance(v, torch.Tensor):
                    tensors[f"{_STATE_PREFIX[kind]}.{key}.{name}"] = full_tensor(v)
                    entry["tensors"].append(name)
                    continue
                try:
                    json.dumps(v)
                except (TypeError, ValueError):
                    raise TypeError(
                        f"{type(obj).__name__}.state_dict()[{name!r}] is a {type(v).__name__}: "
                        "a state saved by learn.save must be tensors or JSON values (numbers, "
                        "strings, lists, dicts); e.g. a torch.Generator's get_state() tensor"
                    ) from None
                entry["values"][name] = v
            meta[kind][key] = entry


def _describe(kind: str, keys, classes: dict) -> str:
    what = ("callback" if kind == "callbacks" else "training batch transform") + \
        ("s" if len(keys) > 1 else "")
    return f"{what} " + ", ".join(f"{k} ({classes[k]})" for k in sorted(keys))


def _match_owned(learn, meta: dict, path: Path, strict: bool) -> list[tuple[object, dict, str]]:
    """Pair the saved callback / transform states with the learner's; on a mismatch raise
    (``strict``) or warn, naming them and the fix. Called before anything is loaded."""
    pairs, problems = [], []
    for kind, objs in _stateful(learn).items():
        saved = meta.get(kind, {})  # absent from files written before callbacks were saved
        extra, missing = saved.keys() - objs.keys(), objs.keys() - saved.keys()
        if extra:
            them = "it" if len(extra) == 1 else "them"
            fix = (f"attach {them} before loading (Learner(..., cbs=[...]) or learn.add_cb(...); "
                   "callbacks given to fit(cbs=...) exist during that fit only)"
                   if kind == "callbacks" else
                   "build the DataLoaders with the same train_tfms / batch_tfms")
            problems.append(f"{path} holds the random state of "
                            f"{_describe(kind, extra, {k: saved[k]['class'] for k in extra})}, "
                            f"which this learner does not have: {fix}")
        if missing:
            classes = {k: type(o).__name__ for k, o in objs.items()}
            own, them = ("owns", "it") if len(missing) == 1 else ("own", "them")
            problems.append(f"this learner's {_describe(kind, missing, classes)} {own} random "
                            f"state that {path} does not hold (it was saved without {them}): "
                            f"remove {them}")
        pairs += [(objs[k], saved[k], f"{_STATE_PREFIX[kind]}.{k}.")
                  for k in saved.keys() & objs.keys()]
    if problems and strict:
        raise ValueError("; ".join(problems) + "; or load with strict=False to go on (their "
                         "state is not restored: the resumed run then differs from an "
                         "uninterrupted one)")
    if problems:
        warnings.warn("; ".join(problems) + " (strict=False: going on without restoring their "
                      "state; the resumed run differs from an uninterrupted one)", stacklevel=4)
    return pairs


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
        _save_owned(_stateful(learn), tensors, meta)
    from mlx_train.distributed import is_main_process

    if not is_main_process():  # the others only took part in gathering sharded tensors
        return Path(path)
    return atomic_save(tensors, Path(path), meta)


def load_state(learn, path: Path, with_opt: bool = True, strict: bool = True,
               resume: bool = True) -> None:
    tensors, meta = read(path, FORMAT)
    owned = _match_owned(learn, meta, path, strict) if with_opt and resume and \
        meta.get("with_opt") else []  # checked first: a mismatch raises before anything loads
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
    for obj, entry, prefix in owned:  # callbacks and batch transforms with their own RNG
        obj.load_state_dict({**entry["values"],
                             **{n: tensors[prefix + n] for n in entry["tensors"]}})
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
