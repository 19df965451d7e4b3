"""Training and evaluation of the architectures on the transformed data sets, with exact resumption.

A run lives in one folder::

    DIR/checkpoint.pt    the latest completed epoch (written atomically every epoch): the model
                         in the invariance checkpoint format (builder ``stn:build_model`` +
                         its JSON configuration, so ``invariance measure --model DIR/checkpoint.pt``
                         rebuilds it), the training configuration, optimiser, scheduler and RNG
                         states, the per-epoch data seeds and the history
    DIR/metrics.json     the configuration, the history (one entry per epoch) and the final result
    DIR/evaluation.json  written by :func:`evaluate`

Resumption (``resume=True``) restores the model, optimiser, learning-rate scheduler, the torch
RNG states (dropout) and checks the data seeds; the data of epoch ``e`` are a pure function of
``(seed, e)``. On the CPU a resumed run therefore ends with bit-identical weights to an
uninterrupted one; an interruption loses at most the epoch in progress.

Example (needs the data)::

    cfg = TrainConfig(arch="STN-SL1", transform="rotation", epochs=1)
    train(cfg, "runs/sl1")
    evaluate("runs/sl1")["test_error"]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from invariance import CheckpointError, load_checkpoint, non_finite_weight, save_checkpoint
from invariance import geometry as G
from invariance.checks import check_int, check_number, check_seed
from invariance.checks import resolve_device as _resolve_device
from invariance.datasets import DATASETS
from invariance.files import atomic_write_json, check_output_dir

from ._data import PROTOCOLS, TransformedDataset, get_protocol, load_transformed
from ._models import CLASSIFIERS, STNClassifier, build_model, parse_arch
from ._transformer import STN_FAMILIES

__all__ = ["TrainConfig", "DEFAULT_FAMILY", "train", "evaluate", "evaluate_model", "load_run", "resolve_device",
           "RunError", "DivergedError", "CHECKPOINT", "METRICS", "EVALUATION"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
EVALUATION = "evaluation.json"
BUILDER = "stn:build_model"

#: Transformation family predicted by default for each data protocol.
DEFAULT_FAMILY: dict[str, str] = {name: p.stn_family for name, p in PROTOCOLS.items()}


class RunError(RuntimeError):
    """A run folder cannot be used as asked (existing run without --resume, mismatched configuration)."""


class DivergedError(RunError):
    """The training loss (or a weight) became NaN or infinite: training stops, the epoch in progress
    is not saved (the run folder keeps the last finite checkpoint, if any)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run (stored in the checkpoint and metrics.json).

    Attributes:
        arch: architecture name (``CNN``, ``STN-C1``, ``STN-SL0123``, ...; see :func:`stn.build_model`).
        dataset: ``mnist`` or ``fashion-mnist``.
        transform: data protocol ``rotation``, ``translation`` or ``scale`` (:data:`stn.PROTOCOLS`).
        epochs: number of epochs.
        family: transformation family the transformers predict (default :data:`DEFAULT_FAMILY`).
        classifier: ``mnist`` or ``svhn``.
        size: side of the images (``None``: the protocol's canvas; smaller = reduced protocol).
        batch_size, lr, momentum, weight_decay: SGD settings.
        loc_lr_mult: learning-rate multiplier of the localisation networks.
        milestones, gamma: the learning rate is multiplied by ``gamma`` after each milestone epoch.
        seed: model initialisation and data seed.
        limit, test_limit: use only the first images of the training / test split.
        eval_every: test every that many epochs (0: only after the last one).
        data_root: data folder (default: ``$INVARIANCE_DATA`` etc., see :mod:`invariance.datasets`).

    Every value is checked on construction (and again by :func:`train`): a ``ValueError`` (or a
    ``TypeError`` for a wrong type) whose one-line message starts with the field's name and says
    what is valid, e.g. ``gamma: must be a finite number > 0, got -1.0``; ``stn train`` prints it
    with the field's ``--flag`` instead.
    """

    arch: str = "CNN"
    dataset: str = "mnist"
    transform: str = "rotation"
    epochs: int = 10
    family: str | None = None
    classifier: str = "mnist"
    size: int | None = None
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    loc_lr_mult: float = 0.1
    milestones: list[int] = field(default_factory=list)
    gamma: float = 0.1
    seed: int = 0
    limit: int | None = None
    test_limit: int | None = None
    eval_every: int = 1
    data_root: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every name and number; errors name the valid choices."""
        parse_arch(self.arch, CLASSIFIERS.get(self.classifier), self.classifier)
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: unknown data set {self.dataset!r}; valid choices: {', '.join(DATASETS)}")
        if self.transform not in PROTOCOLS:
            raise ValueError(f"transform: unknown transformation {self.transform!r}; "
                             f"valid choices: {', '.join(PROTOCOLS)}")
        if self.family is not None and self.family not in STN_FAMILIES:
            raise ValueError(f"family: unknown family {self.family!r}; valid choices: {', '.join(STN_FAMILIES)}")
        if self.classifier not in CLASSIFIERS:
            raise ValueError(f"classifier: unknown classifier {self.classifier!r}; "
                             f"valid choices: {', '.join(CLASSIFIERS)}")
        # numbers: the checks of invariance.checks (one-line errors that start with the field's name,
        # which the command line turns into its --flag); stored normalised (int / float)
        object.__setattr__(self, "epochs", check_int(self.epochs, "epochs", minimum=1))
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", minimum=1))
        if self.size is not None:
            object.__setattr__(self, "size", check_int(self.size, "size", minimum=1))
        object.__setattr__(self, "lr", check_number(self.lr, "lr", positive=True))
        object.__setattr__(self, "gamma", check_number(self.gamma, "gamma", positive=True))
        object.__setattr__(self, "momentum", check_number(self.momentum, "momentum", minimum=0))
        object.__setattr__(self, "weight_decay", check_number(self.weight_decay, "weight_decay", minimum=0))
        object.__setattr__(self, "loc_lr_mult", check_number(self.loc_lr_mult, "loc_lr_mult", minimum=0))
        object.__setattr__(self, "milestones", _check_milestones(self.milestones))
        object.__setattr__(self, "seed", check_seed(self.seed))
        for name in ("limit", "test_limit"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, _int_with_hint(getattr(self, name), name,
                                                              "leave it unset for the whole split"))
        object.__setattr__(self, "eval_every", _int_with_hint(self.eval_every, "eval_every",
                                                              "0: test only after the last epoch", minimum=0))
        get_protocol(self.transform, self.size)

    @property
    def resolved_family(self) -> str:
        return self.family or DEFAULT_FAMILY[self.transform]

    @property
    def protocol(self):
        return get_protocol(self.transform, self.size)

    def model_config(self, n_classes: int = 10) -> dict:
        s = self.protocol.size
        return {"arch": parse_arch(self.arch).name, "classifier": self.classifier, "in_channels": 1,
                "image_size": [s, s], "n_classes": n_classes, "family": self.resolved_family}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(sorted(unknown))}")
        return cls(**d)


def _int_with_hint(value, name: str, hint: str, minimum: int = 1) -> int:
    """``check_int(value, name, minimum=minimum)``, its error message followed by `` (hint)``."""
    try:
        return check_int(value, name, minimum=minimum)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"{exc} ({hint})") from None


def _check_milestones(milestones) -> list[int]:
    """Epochs after which the learning rate is multiplied by ``gamma``: strictly increasing integers >= 1."""
    what = "strictly increasing whole epochs >= 1 (e.g. 10,15), or none"
    if isinstance(milestones, (str, bytes)) or not hasattr(milestones, "__iter__"):
        raise TypeError(f"milestones: must be a list of {what}, got {milestones!r}")
    ms = list(milestones)
    try:
        ms = [check_int(m, "milestones") for m in ms]
    except TypeError:
        raise TypeError(f"milestones: must be {what}, got {ms!r}") from None
    if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:])):
        raise ValueError(f"milestones: must be {what}, got {','.join(map(str, ms))}")
    return ms


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda``, ``cuda:N`` or a ``torch.device``
    that exists on this machine. The one resolver of the project
    (:func:`invariance.checks.resolve_device`), with ``auto`` as the default."""
    return _resolve_device("auto" if device is None else device)


def _datasets(cfg: TrainConfig, device: torch.device) -> tuple[TransformedDataset, TransformedDataset]:
    p = cfg.protocol
    train_ds = load_transformed(cfg.dataset, "train", p, root=cfg.data_root, seed=cfg.seed, limit=cfg.limit,
                                device=device)
    test_ds = load_transformed(cfg.dataset, "test", p, root=cfg.data_root, seed=cfg.seed, limit=cfg.test_limit,
                               device=device)
    return train_ds, test_ds


def make_optimizer(model: STNClassifier, lr: float, loc_lr_mult: float, momentum: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """The one optimiser of ``stn`` (per-run and budgeted training): SGD with two parameter groups,
    the classifier at ``lr`` and the localisation networks at ``lr * loc_lr_mult``; each group keeps
    its ``base_lr`` for schedules that scale it."""
    groups = [{"params": model.classifier_parameters(), "lr": lr, "base_lr": lr, "name": "classifier"}]
    loc = model.localisation_parameters()
    if loc:
        groups.append({"params": loc, "lr": lr * loc_lr_mult, "base_lr": lr * loc_lr_mult, "name": "localisation"})
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def train_step(model: STNClassifier, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, *,
               autocast=None, before_step: Callable[[torch.Tensor], None] | None = None):
    """The one SGD step of ``stn``: forward (under ``autocast`` when given), cross-entropy in float32,
    backward, step. ``before_step(loss)`` runs before the weights change and may raise (a diverged
    loss then leaves them as they were). Returns ``(loss, logits)``, detached."""
    with autocast if autocast is not None else contextlib.nullcontext():
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y)
    if before_step is not None:
        before_step(loss)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach(), logits.detach()


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def machine_info() -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset)"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


@torch.no_grad()
def evaluate_model(model: STNClassifier, dataset: TransformedDataset, batch_size: int = 500) -> dict:
    """Test error and everything needed for the canonical-pose statistic, in one pass.

    Returns a dict of tensors (CPU): ``correct (N,) bool``, ``labels``, ``applied`` (the data's
    parameters), ``composed (N, 3, 3)`` (normalised composed predicted transformation; identity
    for the CNN) and the float ``error``.
    """
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    correct, labels, applied, composed = [], [], [], []
    for x, y, prm in dataset.batches(0, batch_size):
        logits, tr = model.forward_with_transforms(x.to(dev))
        correct.append((logits.argmax(1) == y.to(dev)).cpu())
        labels.append(y.cpu())
        applied.append(prm.cpu())
        m = tr.composed if tr.composed is not None else G.identity_matrix(x.shape[0], device=dev)
        composed.append(m.detach().double().cpu())
    model.train(was_training)
    c = torch.cat(correct)
    return {"correct": c, "labels": torch.cat(labels), "applied": torch.cat(applied).double(),
            "composed": torch.cat(composed), "error": 1.0 - c.double().mean().item()}


def _log_default(msg: str) -> None:
    print(msg, flush=True)


def _write_metrics(out: Path, cfg: TrainConfig, history: list, extra: dict) -> None:
    atomic_write_json(out / METRICS, {"config": cfg.to_dict(), "history": history, **extra})


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, device: str = "auto",
          progress: bool = True, log: Callable[[str], None] = _log_default,
          stop_after: int | None = None) -> dict:
    """Train ``cfg`` into the folder ``out``; returns the metrics dict (also in ``out/metrics.json``).

    Args:
        resume: continue from ``out/checkpoint.pt`` (which must exist and hold the same
            configuration, except that ``epochs`` may grow; a folder without it is a
            :class:`RunError`, checked before the data are read); without it an existing
            checkpoint is an error. A ``metrics.json`` that is missing or unreadable is
            rewritten from the checkpoint (and the log says so).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ...
        progress: show a tqdm bar per epoch (only on a terminal).
        stop_after: stop (as if interrupted) after this many epochs in total; for tests.

    Raises:
        ValueError: ``out`` is a file or not writable (checked before the data are read).
        DivergedError: the loss or a weight became NaN / inf; the epoch in progress is not saved,
            and a run folder this call created is removed again if it holds nothing.
    """
    cfg.validate()
    out = check_output_dir(out, "out")
    dev = resolve_device(device)
    ck_path = out / CHECKPOINT
    if ck_path.exists() and not resume:
        raise RunError(f"{out}: holds a run already ({CHECKPOINT}); pass --resume to continue it "
                       f"or choose another --out")
    if resume and not ck_path.exists():
        raise RunError(f"resume: nothing to resume in {out} (no {CHECKPOINT}); drop --resume to start a new run")
    torch.manual_seed(cfg.seed)
    train_ds, test_ds = _datasets(cfg, dev)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(cfg, out, train_ds, test_ds, dev, resume=resume, progress=progress, log=log,
                      stop_after=stop_after)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was saved: leave no empty run folder behind
        raise


def _train(cfg: TrainConfig, out: Path, train_ds, test_ds, dev, *, resume, progress, log, stop_after) -> dict:
    ck_path = out / CHECKPOINT
    n_classes = int(max(train_ds.labels.max().item(), test_ds.labels.max().item())) + 1
    n_classes = max(n_classes, 10)
    model_cfg = cfg.model_config(n_classes)
    model = build_model(**model_cfg).to(dev)
    opt = make_optimizer(model, cfg.lr, cfg.loc_lr_mult, cfg.momentum, cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=cfg.milestones, gamma=cfg.gamma)
    history: list[dict] = []
    start_epoch = 0
    data_seeds: list[int] = []
    elapsed = 0.0
    if resume:
        start_epoch, history, data_seeds, elapsed = _resume(cfg, out, model, opt, sched, train_ds, dev, log)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    for epoch in range(start_epoch, cfg.epochs):
        if stop_after is not None and epoch >= stop_after:
            break
        t0 = time.perf_counter()
        loss_sum, wrong, seen = _train_epoch(model, opt, train_ds, epoch, cfg, steps_per_epoch, progress)
        lr_now = opt.param_groups[0]["lr"]
        sched.step()
        data_seeds.append(train_ds.epoch_seed(epoch))
        secs = time.perf_counter() - t0
        entry = {"epoch": epoch + 1, "train_loss": loss_sum / seen, "train_error": wrong / seen, "lr": lr_now,
                 "seconds": secs, "images_per_s": seen / secs}
        last = epoch + 1 == cfg.epochs
        if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
            t1 = time.perf_counter()
            ev = evaluate_model(model, test_ds)
            entry["test_error"] = ev["error"]
            entry["eval_seconds"] = time.perf_counter() - t1
        elapsed += time.perf_counter() - t0
        history.append(entry)
        bad = non_finite_weight(model.state_dict())
        if bad is not None:
            raise DivergedError(f"training diverged: the weight {bad!r} holds NaN or inf after epoch {epoch + 1} "
                                f"(lr {lr_now:g}); epoch {epoch + 1} was not saved{_kept(epoch)}; "
                                f"lower --lr and train again")
        save_checkpoint(ck_path, model, builder=BUILDER, config=model_cfg, train_config=cfg.to_dict(),
                        epoch=epoch + 1, optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                        rng=_rng_state(dev), data_seeds=data_seeds, history=history, seconds=elapsed,
                        protocol=cfg.protocol.as_dict(), finished=last)
        msg = (f"{model.spec.name} {cfg.dataset}/{cfg.transform} epoch {epoch + 1}/{cfg.epochs}: "
               f"loss {entry['train_loss']:.4f}, train error {100 * entry['train_error']:.2f}%")
        if "test_error" in entry:
            msg += f", test error {100 * entry['test_error']:.2f}%"
        log(msg + f", {entry['images_per_s']:.0f} img/s, {secs:.1f} s")
        _write_metrics(out, cfg, history, _metrics(cfg, model, train_ds, test_ds, dev, history, elapsed, last))
    try:
        return read_metrics(out)
    except FileNotFoundError:  # e.g. interrupted between the checkpoint and metrics.json
        pass
    except RunError as exc:  # damaged: it is a summary of the checkpoint, so write it again
        log(f"{_one_line(exc)}; rewritten from {CHECKPOINT}")
    if not history:
        return {}
    done = len(history) >= cfg.epochs
    _write_metrics(out, cfg, history, _metrics(cfg, model, train_ds, test_ds, dev, history, elapsed, done))
    return read_metrics(out)


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


#: What ``metrics.json`` must hold (what ``stn reproduce`` reads of it): key -> type.
_METRICS_KEYS: dict[str, type | tuple[type, ...]] = {"config": dict, "history": list, "finished": bool,
                                                     "seconds": (int, float), "train_data": str}


def read_metrics(out: str | os.PathLike) -> dict:
    """The ``metrics.json`` of a run folder, checked: a JSON object with the keys :func:`train` writes.

    Raises ``FileNotFoundError`` when there is none, and :class:`RunError` with a one-line message
    that names the file when it is not valid JSON or not of that shape.
    """
    path = Path(out) / METRICS
    raw = path.read_bytes()
    try:
        m = json.loads(raw)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        raise RunError(f"{path}: not valid JSON ({_one_line(exc)})") from None
    if not isinstance(m, dict):
        raise RunError(f"{path}: expected a JSON object, got a JSON {type(m).__name__}")
    bad = [k for k, t in _METRICS_KEYS.items() if not isinstance(m.get(k), t)]
    if bad:
        raise RunError(f"{path}: missing or malformed entries: {', '.join(bad)}")
    if not all(isinstance(h, dict) for h in m["history"]):
        raise RunError(f"{path}: malformed entries: history (expected a list of objects)")
    return m


def _train_epoch(model, opt, train_ds, epoch: int, cfg: TrainConfig, steps: int, progress: bool):
    """One epoch of SGD steps; returns (summed loss, wrong predictions, images seen)."""
    model.train()
    loss_sum, wrong, seen = 0.0, 0, 0
    bar = tqdm(total=steps, desc=f"{model.spec.name} epoch {epoch + 1}/{cfg.epochs}",
               disable=None if progress else True, leave=False, file=sys.stderr)
    for step, (x, y, _) in enumerate(train_ds.batches(epoch, cfg.batch_size)):
        seen_loss: list[float] = []

        def check(loss, step=step, seen_loss=seen_loss):
            value = loss.item()
            if not math.isfinite(value):
                bar.close()
                raise DivergedError(f"training diverged: the loss is {value} at epoch {epoch + 1}, step {step + 1} "
                                    f"(lr {opt.param_groups[0]['lr']:g}); epoch {epoch + 1} was not saved"
                                    f"{_kept(epoch)}; lower --lr and train again")
            seen_loss.append(value)

        _, logits = train_step(model, opt, x, y, before_step=check)
        value = seen_loss[0]
        with torch.no_grad():
            loss_sum += value * len(y)
            wrong += int((logits.argmax(1) != y).sum())
            seen += len(y)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum / seen:.4f}")
    bar.close()
    return loss_sum, wrong, seen


def _resume(cfg: TrainConfig, out: Path, model, opt, sched, train_ds, dev, log) -> tuple[int, list, list, float]:
    """Restore a run from its checkpoint (model, optimiser, schedule, RNG); check that its settings and
    data seeds are this configuration's. Returns (epochs done, history, data seeds, seconds)."""
    ck_path = out / CHECKPOINT
    ck = load_checkpoint(ck_path, map_location="cpu")  # RNG states must stay CPU tensors
    old = ck.get("train_config")
    if old is None:
        raise CheckpointError(f"{ck_path}: not an stn training checkpoint (no train_config)")
    diff = sorted(k for k in set(old) | set(cfg.to_dict())
                  if k != "epochs" and old.get(k) != cfg.to_dict().get(k))
    if diff:
        raise RunError(f"{out}: the checkpoint was trained with other settings ({', '.join(diff)}); "
                       f"use the same settings to resume, or another --out")
    try:
        model.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{ck_path}: does not fit this run ({str(exc).splitlines()[0]})") from None
    _set_rng_state(ck["rng"], dev)
    start_epoch = int(ck["epoch"])
    history = list(ck.get("history", []))
    data_seeds = list(ck.get("data_seeds", []))
    elapsed = float(ck.get("seconds", 0.0))
    for e, s in enumerate(data_seeds):
        if s != train_ds.epoch_seed(e):
            raise RunError(f"{ck_path}: data seed of epoch {e} differs from this configuration's")
    if start_epoch >= cfg.epochs:
        log(f"{out}: already trained for {start_epoch} epochs")
    else:
        log(f"{out}: resuming after epoch {start_epoch}/{cfg.epochs}")
    return start_epoch, history, data_seeds, elapsed


def _kept(epoch: int) -> str:
    return f" (the checkpoint of epoch {epoch} is kept)" if epoch > 0 else " (no checkpoint was written)"


def _metrics(cfg, model, train_ds, test_ds, dev, history, elapsed, finished) -> dict:
    last_test = next((h["test_error"] for h in reversed(history) if "test_error" in h), None)
    return {"arch": model.spec.name, "model_config": model.config, "protocol": cfg.protocol.describe(),
            "train_data": train_ds.description, "test_data": test_ds.description, "n_train": len(train_ds),
            "n_test": len(test_ds), "device": str(dev), "machine": machine_info(), "epochs_done": len(history),
            "seconds": elapsed, "finished": finished, "test_error": last_test}


def load_run(out: str | os.PathLike, device: str = "auto", *, trust_code: bool = False
             ) -> tuple[STNClassifier, TrainConfig, dict]:
    """Rebuild the model of a run folder from its checkpoint: ``(model in eval mode, config, checkpoint)``.

    No code from the file runs unless ``trust_code`` (see :func:`invariance.load_checkpoint`)."""
    out = Path(out)
    path = out / CHECKPOINT if out.is_dir() else out
    if out.is_dir() and not path.exists():
        raise CheckpointError(f"{path}: checkpoint file not found (is {out} an stn run folder?)")
    dev = resolve_device(device)
    ck = load_checkpoint(path, map_location=dev, trust_code=trust_code)
    if "train_config" not in ck:
        raise CheckpointError(f"{path}: not an stn training checkpoint (no train_config)")
    try:
        cfg = TrainConfig.from_dict(ck["train_config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid training configuration ({_one_line(exc)})") from None
    model = build_model(**ck["config"]).to(dev)
    try:
        model.load_state_dict(ck["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit the model ({str(exc).splitlines()[0]})") from None
    return model.eval(), cfg, ck


def _alignment_json(v):
    """An :class:`invariance.Estimate` of ``feature_map_alignment`` as ``evaluation.json`` keeps it:
    ``{"mean", "ci95"}`` (``ci95`` null when no pair has a verdict); other values as they are."""
    from invariance import Estimate

    if not isinstance(v, Estimate):
        return v
    finite = math.isfinite(v.mean)
    return {"mean": v.mean, "ci95": list(v.ci) if finite else None}


def evaluation_path(out: str | os.PathLike) -> Path:
    """Where :func:`evaluate` writes: ``DIR/evaluation.json`` for a run folder (or its
    ``checkpoint.pt``), ``NAME.evaluation.json`` beside any other checkpoint file ``NAME.pt``."""
    out = Path(out)
    if out.is_dir():
        return out / EVALUATION
    if out.name == CHECKPOINT:
        return out.parent / EVALUATION
    return out.with_name(out.stem + "." + EVALUATION)


def evaluate(out: str | os.PathLike, *, device: str = "auto", alignment: bool | None = None,
             alignment_images: int = 64, data_root: str | None = None, write: bool = True,
             trust_code: bool = False) -> dict:
    """Evaluate a run folder (or a checkpoint file): test error, canonical-pose statistic and (for
    STN-C1) feature-map alignment.

    ``alignment=None`` runs the feature-map alignment analysis when the architecture transforms
    feature maps at depth 1 (``STN-C1``). Writes :func:`evaluation_path` when ``write``; that it
    can be written is checked before anything is evaluated.

    Reads only the checkpoint (model, training configuration, epochs, whether finished) and the
    test data; the run folder's ``metrics.json`` (a summary written for people and for
    ``stn reproduce``) is not read, so a damaged one does not change the evaluation.
    """
    from ._analysis import canonical_pose, feature_map_alignment

    out = Path(out)
    if not out.exists():
        raise CheckpointError(f"{out}: no such run folder or checkpoint file")
    target = evaluation_path(out)
    if write:
        check_output_dir(target.parent, "run")
    model, cfg, ck = load_run(out, device, trust_code=trust_code)
    dev = next(model.parameters()).device
    if data_root is not None:
        cfg = replace(cfg, data_root=data_root)
    test_ds = load_transformed(cfg.dataset, "test", cfg.protocol, root=cfg.data_root, seed=cfg.seed,
                               limit=cfg.test_limit, device=dev)
    t0 = time.perf_counter()
    ev = evaluate_model(model, test_ds)
    n = len(test_ds)
    err = ev["error"]
    result = {
        "run": str(out), "arch": model.spec.name, "dataset": cfg.dataset, "transform": cfg.transform,
        "family": cfg.resolved_family, "epochs": int(ck["epoch"]), "finished": bool(ck.get("finished", False)),
        "protocol": cfg.protocol.describe(), "test_data": test_ds.description, "n_test": n,
        "test_error": err, "test_error_se": math.sqrt(max(err * (1 - err), 0.0) / n),
        "correct": "".join("1" if c else "0" for c in ev["correct"].tolist()),
        "canonical_pose": canonical_pose(cfg.protocol, ev["labels"], ev["applied"], ev["composed"]),
    }
    if alignment is None:
        alignment = model.spec.kind == "C" and 1 in model.spec.depths
    if alignment:
        fa = feature_map_alignment(model, test_ds, n_images=alignment_images)
        result["feature_alignment"] = {k: _alignment_json(v) for k, v in fa.items()}
    result["seconds"] = time.perf_counter() - t0
    if write:
        atomic_write_json(target, result)
    return result
