"""Cached teacher outputs: computed once, stored with the teacher run, looked up per batch.

A teacher's named outputs (logits, features, and the map-based outputs the loss's terms need:
``attention``, ``hint``) for every frame, and for K augmented views of every training frame, computed once per teacher run and data set and stored with the teacher run, so distillation
runs and sweep trials train only the student -- and still see the augmentation a live teacher would.

View ``v`` of a frame is the augmentation ``augment.view_params(augment, view_seed, v, frame id)``;
in a cached distillation epoch each frame shows one of its K views and the student gets exactly that
augmentation, so cached and live teachers give the same targets (Beyer et al. 2022: teacher and student
must see the same view; FKD, Shen & Xing 2022: per-view soft labels stored once and reused).

The stored file names the data (content digest), split and views it was computed for, and holds the
frame id of every row and the teacher run id: a lookup goes by frame id, never by row number, so a CSV
with its rows shuffled or pixels changed can never receive another frame's targets.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flame_kd import identity, tracking
from flame_kd.data import augment as aug
from flame_kd.data.cache_budget import host_available_bytes
from flame_kd.data.dataset import PairedFrames, make_loader
from flame_kd.engine import amp_dtype, device_batches, gib, load_checkpoint, save_torch, seal
from flame_kd.errors import ConfigError
from flame_kd.losses import OUTPUTS, model_outputs
from flame_kd.options import spell
from flame_kd.progress import track
from flame_kd.tasks import Batch, teacher_forward

log = logging.getLogger("flame_kd")

ARTIFACT_DIR = "teacher_outputs"
FORMAT = 3  # 3: named outputs; 2: float16 logits/features, K views per training frame; 1: fp32, frame and flip
STORE = torch.float16  # soft targets need 3 significant digits, not 7: half the bytes of a K-view file
BASE_OUTPUTS = ("logits", "features")  # always stored: a few KB per frame, and every KD variant shares them


def stored_outputs(needed) -> tuple[str, ...]:
    """What a cache for terms needing ``needed`` holds: logits, features and the needed others, in
    OUTPUTS order."""
    want = set(BASE_OUTPUTS) | set(needed)
    return tuple(o for o in OUTPUTS if o in want)


class TeacherOutputs:
    """Where a distillation step gets the teacher's named outputs for its batch: ``{name: tensor, or
    tuple of tensors}`` for the ``outputs`` its loss needs (``DistillLoss.outputs("teacher")``).

    ``cached``: looked up by frame ID and view in tensors computed once per teacher run
    (``compute``): ``batch["view"]`` -1 is the plain frame, ``v`` its cached view
    ``v``; ``frame_ids`` maps the batch's rows (``batch["index"]``) to the ids of this run's frame
    table. A frame (or view) the cache does not hold is an error, found on the host from the batch's
    rows; the gather itself runs on the device that holds the outputs (``to``), with no host sync.
    ``live``: the frozen teacher run on the same RGB+IR batch the student sees.
    """

    def __init__(self, teacher: nn.Module | None = None, cache: dict | None = None,
                 frame_ids=None, outputs: tuple[str, ...] = ("logits", "features")):
        if (teacher is None) == (cache is None):
            raise ValueError("give exactly one of teacher (live) or cache (cached)")
        self.teacher = teacher
        self.cache = cache
        self.outputs = tuple(outputs)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
        if cache is not None:
            if frame_ids is None:
                raise ValueError("cached teacher outputs need the frame ids of the run's frame table")
            stored = cache.get("outputs", {})
            missing = [n for n in self.outputs if not any(k == n or k.startswith(n + ".") for k in stored)]
            if missing:
                raise ValueError(f"the cached teacher outputs hold no {', '.join(missing)}")
            self.frame_ids = torch.tensor(frame_ids, dtype=torch.long)
            self._sorted_ids, self._perm = torch.sort(cache["ids"].long())
            self.n, self.views = len(cache["ids"]), int(cache.get("views", 0))
            self.view_known = cache.get("view_known", torch.zeros(self.n, dtype=torch.bool))
            # one table per stored tensor: the plain frames, then view 0, view 1, ...: position = row + n * (view + 1)
            self.table = {key: torch.cat([val, *(cache["view_outputs"][key] if self.views else ())])
                          for key, val in stored.items()
                          if key.partition(".")[0] in self.outputs}

    def attach(self, dataset) -> None:
        """Make a student's training set show what this cache holds, or refuse it in one line: the
        same augmentation (a cache built for another shows the student other pixels than its targets
        were computed on), and each frame one of the cached views (``PairedFrames.use_views``)."""
        if self.cache is None:
            return
        cached, asked = self.cache.get("augment", "none"), getattr(dataset, "augment", "none")
        if cached != asked:
            raise ConfigError(f"cached teacher outputs were computed for augment={cached!r}, but the student's "
                             f"training set augments with {asked!r}: recompute them for {asked!r} "
                             f"({spell('teacher_views')}) or use {spell(teacher_mode='live')}")
        if self.views:
            dataset.use_views(self.views, int(self.cache.get("view_seed", 0)))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Cache rows of the frames at table rows ``index`` (host); checks ids and ``known``."""
        ids = self.frame_ids[index]
        pos = torch.searchsorted(self._sorted_ids, ids).clamp_max(len(self._sorted_ids) - 1)
        rows = self._perm[pos]
        ok = (self.cache["ids"][rows] == ids) & self.cache["known"][rows]
        if not bool(ok.all()):
            bad = ids[~ok][:5].tolist()
            raise RuntimeError(f"cached teacher outputs hold no targets for frame id(s) {bad}: "
                               "the cache was built for other frames")
        return rows

    def positions(self, index: torch.Tensor, view: torch.Tensor | None, flip: torch.Tensor | None) -> torch.Tensor:
        """Positions in the table of the batch's frames and views (host tensors in, host out)."""
        rows = self.rows(index)
        view = torch.full_like(rows, -1) if view is None else torch.as_tensor(view).long().cpu()
        plain = view < 0
        if flip is not None and bool((torch.as_tensor(flip).cpu() & plain).any()):
            raise RuntimeError("a flipped frame outside the cached views: this loader augments without "
                               "use_views, so cached teacher outputs cannot match it")
        if bool((~plain & ((view >= self.views) | ~self.view_known[rows])).any()):
            raise RuntimeError(f"cached teacher outputs hold {self.views} view(s) of training frames only; "
                               "this batch asks for others")
        return rows + self.n * (view + 1)

    def __call__(self, batch: Batch) -> dict:
        if self.teacher is not None:
            maps = any(OUTPUTS[n].maps for n in self.outputs)
            with torch.no_grad():
                out = model_outputs(teacher_forward(self.teacher, batch, maps=maps), self.outputs)
            return {k: tuple(t.float() for t in v) if isinstance(v, tuple) else v.float() for k, v in out.items()}
        pos = self.positions(torch.as_tensor(batch["index"]).cpu(), batch.get("view"), batch.get("flip"))
        device = batch["rgb"].device
        got = {}
        for key, table in self.table.items():
            got[key] = table.index_select(0, pos.to(table.device, non_blocking=True)).to(device, non_blocking=True).float()
        return unflatten(got)

    def to(self, device: torch.device) -> "TeacherOutputs":
        """Move the live teacher, or the cached outputs (gathered there each step), to ``device``."""
        if self.teacher is not None:
            self.teacher.to(device)
        else:
            self.table = {k: t.to(device) for k, t in self.table.items()}
        return self


def flatten_outputs(outputs: dict) -> dict[str, torch.Tensor]:
    """``{"attention": (a, b)}`` -> ``{"attention.0": a, "attention.1": b}``: one tensor per key, as stored."""
    flat = {}
    for name, value in outputs.items():
        if isinstance(value, (tuple, list)):
            flat |= {f"{name}.{i}": v for i, v in enumerate(value)}
        else:
            flat[name] = value
    return flat


def unflatten(flat: dict[str, torch.Tensor]) -> dict:
    """The inverse of ``flatten_outputs`` (in the order the keys come: ``attention.0`` before ``.1``)."""
    out: dict = {}
    for key, value in flat.items():
        name, _, i = key.partition(".")
        out[name] = (*out.get(name, ()), value) if i else value
    return out


def effective_views(augment: str, views: int) -> int:
    """Views stored per training frame: none for unaugmented training (the plain frame serves)."""
    return 0 if augment == "none" else int(views)


def artifact_name(image_size: int, data_digest: str, split_digest: str, augment: str = "none", views: int = 0,
                  view_seed: int = 0, outputs=BASE_OUTPUTS) -> str:
    """One file per image size, data set (content digest), split, view set and stored outputs of one
    teacher run."""
    return f"outputs-{image_size}px-{data_digest}-{split_digest}-{augment}x{views}-s{view_seed}-{'+'.join(outputs)}.pt"


def _names_in(artifact: str) -> set[str]:
    return set(artifact.rsplit("-", 1)[-1].removesuffix(".pt").split("+"))


@torch.inference_mode()
def compute(teacher: nn.Module, data, device: torch.device, teacher_run_id: str = "", augment: str = "none",
            views: int = 0, view_seed: int = 0, outputs=BASE_OUTPUTS) -> dict:
    """The named ``outputs`` (``stored_outputs``) for every non-gap frame, plain (``outputs[key]``
    [N, ...]) and, for training frames, in ``views`` augmented views (``view_outputs[key]`` [K, N, ...]),
    float16, one row per frame of ``data``; a tuple-valued output (``attention``: one map per stage)
    is stored one tensor per stage (``attention.0``...). Rows without outputs stay zero with
    ``known``/``view_known`` False. ``ids`` is each row's frame id (lookups go by id); the other keys
    say what the file is for.
    """
    names = stored_outputs(outputs)
    maps = any(OUTPUTS[n].maps for n in names)
    teacher = teacher.to(device).eval()
    dtype = amp_dtype(device, True)
    views = effective_views(augment, views)
    n = len(data.frames)
    ids = data.frames["id"].to_numpy(dtype=np.int64)
    out: dict = {"format": FORMAT, "known": torch.zeros(n, dtype=torch.bool), "view_known": torch.zeros(n, dtype=torch.bool),
                 "ids": torch.from_numpy(ids.copy()), "data_digest": data.digest, "split_digest": data.split.digest,
                 "teacher_run_id": teacher_run_id, "augment": augment, "views": views, "view_seed": int(view_seed),
                 "names": list(names), "outputs": {}, "view_outputs": {}}
    is_train = np.zeros(n, dtype=bool)
    is_train[data.split.indices("train")] = True
    rows = np.concatenate([data.split.indices(s) for s in ("train", "val", "test")])
    ds = PairedFrames(data.frames, rows, data.config.image_size, augment="none", cache=data.cache)
    loader = make_loader(ds, data.loaders["train"].batch_size, shuffle=False, cfg=data.config, device=str(device), seed=0)

    def forward(rgb, ir) -> dict[str, torch.Tensor]:
        with torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext():
            got = model_outputs(teacher_forward(teacher, {"rgb": rgb, "ir": ir}, maps=maps), names)
        return {k: v.to(STORE).cpu() for k, v in flatten_outputs(got).items()}

    def store(got: dict[str, torch.Tensor], where, view: int | None = None) -> None:
        into = out["outputs"] if view is None else out["view_outputs"]
        for key, val in got.items():
            if key not in into:
                into[key] = torch.zeros(((n,) if view is None else (views, n)) + tuple(val.shape[1:]), dtype=STORE)
            into[key][where if view is None else (view, where)] = val

    what = f"teacher outputs ({len(rows)} frames" + (f", {views} views of each train frame)" if views else ")")
    for batch in track(device_batches(loader, device, False), what, total=len(loader), unit="batches"):
        idx = batch["index"]
        got = forward(batch["rgb"], batch["ir"])
        if not out["outputs"]:  # the first batch says what a frame costs: refuse before filling memory
            check_room(got, len(idx), len(rows) + views * int(is_train.sum()), names)
        store(got, idx)
        train = torch.from_numpy(is_train[idx.numpy()])
        if views and train.any():
            sel = train.nonzero().view(-1)
            rgb, ir = (batch[k].index_select(0, sel.to(batch[k].device)) for k in ("rgb", "ir"))
            for v in range(views):
                p = aug.view_params(augment, view_seed, v, ids[idx[sel].numpy()])
                store(forward(*aug.apply(rgb, ir, p)), idx[sel], view=v)
            out["view_known"][idx[sel]] = True
        out["known"][idx] = True
    size = sum(t.numel() * t.element_size() for part in ("outputs", "view_outputs") for t in out[part].values())
    log.info("teacher outputs (%s): %.1f MB, %.1f KB per frame and view", ", ".join(names), size / 2**20,
             size / 2**10 / max(1, len(rows) + views * int(out["view_known"].sum())))
    return out


def check_room(got: dict[str, torch.Tensor], batch: int, stored_rows: int, names, room: int | None = None,
               disk: int | None = None) -> None:
    """Refuse, in one line, a cache that would not fit: it is built in host memory (then written to a
    temporary file and logged), ``stored_rows`` rows (frames and views) at the first batch's bytes per
    row. A hint map of a deep teacher is ~0.8 MB per row: 265 GiB on FLAME2 with 8 views."""
    need = sum(t.numel() * t.element_size() for t in got.values()) * stored_rows // max(1, batch)
    room = host_available_bytes() if room is None else room
    disk = shutil.disk_usage(tempfile.gettempdir()).free if disk is None else disk
    short = [f"{gib(have)} {where} available" for have, where in ((room, "memory"), (disk, "temporary disk"))
             if have is not None and need > 0.8 * have]
    if short:
        raise ConfigError(
            f"the cached teacher outputs ({', '.join(names)}) of {stored_rows:,} frames and views need ~{gib(need)}, "
            f"and this machine has {' and '.join(short)}; use {spell(teacher_mode='live')} (no cache), fewer views "
            f"({spell(teacher_views=1)}), or a smaller {spell('image_size')}")


KEYS = ("format", "known", "ids", "outputs", "teacher_run_id", "data_digest", "split_digest")


def check_structure(outputs: dict, n: int, label: str) -> None:
    """Keys, shapes and dtypes of stored outputs for ``n`` frames, else one ConfigError naming them."""
    problems = []
    for key, shape in (("known", (n,)), ("ids", (n,))):
        value = outputs.get(key)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != shape:
            problems.append(f"{key} is not a tensor of {n} values")
    stored = outputs.get("outputs")
    if not isinstance(stored, dict) or "logits" not in stored:
        problems.append("it holds no named outputs")
    else:
        for key, value in stored.items():
            if not isinstance(value, torch.Tensor) or value.ndim < 2 or value.shape[0] != n or not value.is_floating_point():
                problems.append(f"{key} is not a float tensor of {n} rows")
        logits = stored["logits"]
        if isinstance(logits, torch.Tensor) and logits.ndim == 2 and logits.shape[1] != 2:
            problems.append("logits do not have 2 columns (fire, smoke)")
    if problems:
        raise ConfigError(f"cannot use {label}: {'; '.join(problems)}")


def _same_views(outputs: dict, augment: str, views: int, view_seed: int) -> bool:
    return (outputs.get("format") == FORMAT and outputs.get("augment") == augment
            and outputs.get("views") == effective_views(augment, views) and outputs.get("view_seed") == view_seed)


def matches(outputs: dict, teacher_run_id: str, data) -> bool:
    """Whether stored outputs were computed by this teacher run for these frames and this split."""
    return (outputs.get("teacher_run_id") == teacher_run_id and "ids" in outputs
            and identity.same_data(outputs, data.digest, data.split.digest, keys=("data_digest", "split_digest")))


def load_or_compute(teacher_run_id: str, teacher: nn.Module, data, device: torch.device, augment: str = "none",
                    views: int = 0, view_seed: int = 0, outputs=BASE_OUTPUTS) -> dict:
    """The stored outputs of this teacher run for this image size, data set, split and view set,
    holding at least ``outputs``, computed once (a pinned teacher on another data set gets its outputs
    recomputed for this one)."""
    views = effective_views(augment, views)
    names = stored_outputs(outputs)
    name = artifact_name(data.config.image_size, data.digest, data.split.digest, augment, views, view_seed, names)
    prefix = name.rsplit("-", 1)[0] + "-"
    with tempfile.TemporaryDirectory() as tmp:
        for path in tracking.list_artifacts(teacher_run_id, ARTIFACT_DIR):
            file = path.rsplit("/", 1)[-1]
            if not (file.startswith(prefix) and _names_in(file) >= set(names)):
                continue  # another data set, split or view set, or it lacks an output these terms need
            try:
                stored = load_checkpoint(tracking.download(teacher_run_id, path, tmp), what="teacher outputs",
                                         run_id=teacher_run_id, keys=KEYS)
                check_structure(stored, len(data.frames), f"teacher outputs {path} (run {teacher_run_id})")
            except ConfigError as err:  # corrupted or foreign: computed again from the teacher, and replaced
                log.warning("%s; computing them again", err.message)
                continue
            if matches(stored, teacher_run_id, data) and _same_views(stored, augment, views, view_seed):
                return stored
        outputs = compute(teacher, data, device, teacher_run_id, augment, views, view_seed, names)
        path = Path(tmp) / name
        save_torch(seal(outputs), path, what="teacher outputs")  # a full disk: one line naming the folder
        tracking.log_file(path, ARTIFACT_DIR, run_id=teacher_run_id)
        return outputs
