"""The training loop: AdamW, cosine LR, gradient clipping, early stopping on validation MSE.

Writes into ``out``:
    model.safetensors   best checkpoint (weights, model config, normalisation, data spec)
    train_state.safetensors  last epoch's weights + optimizer state, for --resume
    metrics.csv         one row per epoch, train_loss the loss trained on (MSE, or NLL per element)
                        (and tensorboard/ event files when TensorBoard is installed); its seconds
                        count across resumes
    metrics.json        val_mse (normalised) and per-channel MSE in physical units of the best epoch
                        (with the variance head: its calibration on the validation data too);
                        removed when a run starts, written last: only a finished run has one

With ``train.loss: nll`` the variance head is trained by Gaussian NLL; early stopping still
selects on the MSE of the mean. After training, the head's variance is scaled per channel so that
mean(z^2) = 1 on the validation data (``ServingSpec.variance_scale``, stored in the checkpoint).

Deterministic on CPU for a fixed seed: each epoch reseeds from (seed, epoch), so a resumed run
takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from hiss_ros.checkpoint import MODEL_FILE, atomic_write, load_checkpoint
from hiss_ros.cli_common import MARKER, strict_json
from hiss_ros.errors import CheckpointError, ConfigError, HissError
from hiss_ros.models import ChunkedModel, build_model
from hiss_ros.pipeline.novelty import Novelty
from hiss_ros.serving import save_model
from hiss_ros.train.augment import BiasAugment, RotationAugment
from hiss_ros.train.calibration import calibration_metrics, variance_scale
from hiss_ros.train.config import TrainConfig, TrainSettings
from hiss_ros.train.dataset import Dataset, Split, delta_std, windows

log = logging.getLogger(__name__)
STATE_FILE = "train_state.safetensors"
METRICS_FILE = MARKER
CSV_HEADER = "epoch,train_loss,val_mse,lr,seconds\n"


@dataclass
class Result:
    best_epoch: int
    val_mse: float
    val_mse_per_channel: list[float]  # physical units
    epochs_run: int
    seconds: float


def model_config(cfg: TrainConfig, ds: Dataset) -> dict[str, Any]:
    return {**cfg.model, "input_dim": cfg.pipeline_config(ds.input_dims).channels, "output_dim": ds.output_dim,
            "chunk": ds.chunk}


@torch.no_grad()
def predict_gaussian(model: ChunkedModel, split: Split, device: str = "cpu") -> tuple[np.ndarray, np.ndarray | None]:
    """(K, O) normalised predictions (the mean) for every chunk of ``split``, each segment run
    from its start (as the live node streams it), and their (K, O) log-variances (normalised
    units, uncalibrated) from the variance head, None without one."""
    model.eval()
    parts = [model.split_output(model(torch.from_numpy(x.reshape(1, -1, x.shape[-1])).to(device))[0])
             for x in split.x]  # (K_segment, O) each
    mean = np.concatenate([m.cpu().numpy() for m, _ in parts])
    return mean, None if parts[0][1] is None else np.concatenate([v.cpu().numpy() for _, v in parts])


def predict(model: ChunkedModel, split: Split, device: str = "cpu") -> np.ndarray:
    """(K, O) normalised predictions for every chunk of ``split`` (the mean, with the variance head)."""
    return predict_gaussian(model, split, device)[0]


def evaluate(model: ChunkedModel, split: Split, device: str = "cpu") -> tuple[float, np.ndarray]:
    """MSE (normalised) over every chunk of ``split`` and its per-channel part."""
    sq = (predict(model, split, device) - np.concatenate(split.y)) ** 2
    return float(sq.mean()), sq.mean(0)


def batch_loss(model: ChunkedModel, out: torch.Tensor, y: torch.Tensor, nll: bool, beta: float = 0.0) -> torch.Tensor:
    """Summed loss of model outputs ``out`` (b, k, W) against targets ``y`` (b, k, O): squared
    error of the mean, or (``nll``) the Gaussian negative log-likelihood under the predicted mean
    and variance (its log clamped to LOG_VAR_RANGE by ``split_output``, so 1/variance stays finite),
    each element weighted by its variance^beta held constant (beta-NLL, Seitzer et al., ICLR 2022):
    plain NLL divides the mean's gradient by the variance, so it gives up on hard chunks; beta = 1
    gives the mean MSE's gradient back."""
    mean, log_var = model.split_output(out)
    if not nll:
        return torch.nn.functional.mse_loss(mean, y, reduction="sum")
    variance = log_var.exp()
    per_element = torch.nn.functional.gaussian_nll_loss(mean, y, variance, full=True, reduction="none")
    return (per_element * variance.detach() ** beta).sum() if beta else per_element.sum()


# SSM dynamics by parameter name: S4D's A, dt and skip, Mamba's A, skip and dt bias. Decay would
# pull them towards A = -1 (log 0), dt = 1 and D = 0, not towards "no effect".
_SSM_PARAMS = ("log_A_real", "A_imag", "log_dt", "A_log", "D", "dt_proj.bias")


def param_groups(model: torch.nn.Module, weight_decay: float, no_decay_ssm: bool) -> list[dict[str, Any]]:
    """AdamW groups: with ``no_decay_ssm``, SSM dynamics, biases and norm weights (every 1-D
    tensor) get no weight decay, the other weights ``weight_decay``."""
    if not no_decay_ssm:
        return [{"params": list(model.parameters()), "weight_decay": weight_decay}]
    decay, keep = [], []
    for name, p in model.named_parameters():
        exempt = p.ndim < 2 or any(name == n or name.endswith("." + n) for n in _SSM_PARAMS)
        (keep if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _save_state(path: Path, model: ChunkedModel, opt: torch.optim.Optimizer, meta: dict[str, Any],
                ema: AveragedModel | None = None) -> None:
    """Model, weight-average and optimizer tensors in safetensors, everything else as JSON (no pickle)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()})
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).contiguous()
    meta = {**meta, "param_groups": sd["param_groups"]}
    atomic_write(path, save(tensors, metadata={"train_state": json.dumps(meta)}))


def _load_state(path: Path, model: ChunkedModel, opt: torch.optim.Optimizer, config: dict[str, Any],
                ema: AveragedModel | None = None) -> dict[str, Any]:
    """The train state's meta, after loading its weights and optimizer state; refused when it was
    written for another ``config`` (``_fingerprint``): its weights would not fit, or fit and mislead."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({exc}); delete it to start afresh") from None
    was = meta.get("config", config)
    # settings added since that run started: it trained with their defaults
    was = {**was, "train": {**{f.name: f.default for f in fields(TrainSettings)}, **(was.get("train") or {})}}
    if "data" not in was:  # a run from before the data was fingerprinted: its config alone
        config = {k: v for k, v in config.items() if k != "data"}
    changed = _changes(was, config)
    if any(c.startswith("data:") for c in changed):
        raise ConfigError(f"--resume: {path.parent} was trained on other data (its training statistics differ: "
                          "other or changed --bag / --val-bag); resume with the run's bags, or train into another "
                          "--out")
    if changed:
        raise ConfigError(f"--resume: {path.parent} was trained with another config ({'; '.join(changed[:4])}); "
                          "resume with the run's config, or train the new one into another --out")
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    try:
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
        if ema is not None:
            ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"{path}: does not fit this model ({detail}); delete it to start afresh") from None
    return meta


def _fingerprint(cfg: TrainConfig, ds: Dataset) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the whole config (as JSON values),
    the model as built for the data, and the data (``_data_digest``)."""
    whole = {**asdict(cfg), "model": model_config(cfg, ds), "data": _data_digest(ds),
             "inputs": [s.to_dict() for s in cfg.inputs], "outputs": [s.to_dict() for s in cfg.outputs]}
    for key in ("msg_paths", "allow_rate_mismatch", "rate_tolerance"):  # how the bags are read and checked, not what
        del whole[key]
    return json.loads(json.dumps(whole, default=str))


def _data_digest(ds: Dataset) -> str:
    """The training data in short: its statistics and how many chunks each split has (other or
    changed bags give others)."""
    digest = hashlib.sha256(f"{ds.train.chunks},{ds.val.chunks}".encode())
    for key in ds.normalization.KEYS:
        digest.update(np.asarray(getattr(ds.normalization, key), dtype=np.float64).tobytes())
    return digest.hexdigest()[:16]


def _changes(was: Any, now: Any, key: str = "") -> list[str]:
    """``key: was -> now`` for each leaf that differs between two JSON values."""
    if isinstance(was, dict) and isinstance(now, dict):
        return [c for k in sorted(set(was) | set(now), key=str)
                for c in _changes(was.get(k), now.get(k), f"{key}.{k}" if key else str(k))]
    return [] if was == now else [f"{key or 'config'}: {was!r} -> {now!r}"]


def _trim_rows(csv_path: Path, epochs: int) -> None:
    """Keep the header and the rows of the first ``epochs`` epochs: a run stopped after writing an
    epoch's row but before its train state repeats that epoch, and must not list it twice."""
    lines = csv_path.read_text().splitlines(keepends=True) if csv_path.is_file() else [CSV_HEADER]
    kept = lines[:1] + [r for r in lines[1:] if r.split(",", 1)[0].isdigit() and int(r.split(",", 1)[0]) < epochs]
    atomic_write(csv_path, "".join(kept).encode())


def _tensorboard(out: Path) -> Any:
    """A SummaryWriter into ``out/tensorboard`` when TensorBoard is installed (extra "tensorboard")."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _distributed() -> tuple[int, int]:
    """(rank, world size): torchrun's process group when one was initialised, else (0, 1)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass
class Plan:
    """How many optimiser steps, and the learning rate of each: a linear warm-up over one epoch (at
    most a fifth of all steps), then a cosine down to 1% of ``lr``."""

    steps_per_epoch: int
    total: int  # train.max_steps, or every epoch's steps

    @property
    def epochs(self) -> int:
        return math.ceil(self.total / self.steps_per_epoch)

    def steps_in(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total - epoch * self.steps_per_epoch)

    def lr_factor(self, step: int) -> float:
        warm = min(self.steps_per_epoch, max(1, self.total // 5))
        if step < warm:
            return (step + 1) / warm
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, self.total - warm)))


def fit_epoch(net: torch.nn.Module, model: ChunkedModel, opt: torch.optim.Optimizer, xw: torch.Tensor,
              yw: torch.Tensor, s: Any, plan: Plan, epoch: int, device: str,
              augments: Sequence[RotationAugment | BiasAugment] = (), ema: AveragedModel | None = None) -> float:
    """One epoch of optimiser steps over the training windows x (W, seq*chunk, C), y (W, seq, O);
    returns the mean training loss per target element over every rank. Under torchrun each rank
    takes its share of every batch, and the loss is normalised by the global batch, so N processes
    take the same steps as one (up to float summation order)."""
    rank, world = _distributed()
    torch.manual_seed(s.seed * 100_003 + epoch)  # same order on every rank, and after --resume
    model.train()
    order = torch.randperm(len(xw))
    loss_sum, count = torch.zeros(2, dtype=torch.float64), 0
    nll = s.loss == "nll" and epoch >= s.nll_warmup_epochs
    for i in range(plan.steps_in(epoch)):
        for g in opt.param_groups:
            g["lr"] = s.lr * plan.lr_factor(epoch * plan.steps_per_epoch + i)
        batch = order[i * s.batch_size:(i + 1) * s.batch_size]
        idx = batch[rank::world]  # this rank's share
        x, y = xw[idx], yw[idx]
        for augment in augments:  # drawn for the whole batch on every rank: N processes step as one
            x, y = augment(x, y, augment.draw(len(batch))[rank::world])
        y = y[:, s.burn_in_chunks:].to(device)  # (b, seq - burn_in, O)
        pred = net(x.to(device))[:, s.burn_in_chunks:]
        summed = batch_loss(model, pred, y, nll, s.nll_beta)
        loss = summed * world / (len(batch) * y[0].numel())  # DDP averages over ranks -> global mean
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        opt.step()
        if ema is not None:
            ema.update_parameters(model)
        loss_sum[0] += summed.item()
        count += len(batch) * y[0].numel()
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
    return float(loss_sum[0]) / count


# --- what each epoch is reported to (rank 0): csv, TensorBoard, the progress bar, a caller's hook ----

class CsvLog:
    """metrics.csv: a row per epoch; on --resume, cut back to the epochs the train state has (a
    crash between a row and the state must not repeat one)."""

    def __init__(self, out: Path, resumed_epochs: int) -> None:
        self.path = out / "metrics.csv"
        if resumed_epochs:
            _trim_rows(self.path, resumed_epochs)
        else:
            self.path.write_text(CSV_HEADER)

    def __call__(self, r: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.writer(f).writerow([r["epoch"] - 1, f"{r['train_loss']:.6f}", f"{r['val_mse']:.6f}",
                                    f"{r['lr']:.3g}", f"{r['seconds']:.1f}"])

    def close(self) -> None:
        pass


class BoardLog:
    """TensorBoard scalars into ``out/tensorboard`` (extra "tensorboard")."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __call__(self, r: dict[str, Any]) -> None:
        self.writer.add_scalars("mse", {"train": r["train_loss"], "val": r["val_mse"]}, r["epoch"])
        self.writer.add_scalar("lr", r["lr"], r["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ProgressBar:
    def __init__(self, epochs: int, done: int, show: bool) -> None:
        self.bar = tqdm(total=epochs, initial=done, desc="training", unit="epoch", disable=not show)

    def __call__(self, r: dict[str, Any]) -> None:
        self.bar.set_postfix(loss=f"{r['train_loss']:.4f}", val=f"{r['val_mse']:.4f}", best=f"{r['best_val_mse']:.4f}")
        self.bar.update()

    def close(self) -> None:
        self.bar.close()


class Hook:
    """A caller's ``on_epoch(record)`` (the ROS trainer node publishes it on /diagnostics)."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def __call__(self, r: dict[str, Any]) -> None:
        self.fn({k: r[k] for k in ("epoch", "epochs", "train_loss", "val_mse", "best_val_mse", "seconds")})

    def close(self) -> None:
        pass


def _reporters(out: Path, meta: dict[str, Any], plan: Plan, progress: bool,
               on_epoch: Callable[[dict[str, Any]], None] | None) -> list[Any]:
    board = _tensorboard(out)
    return [CsvLog(out, meta["epoch"]), *([BoardLog(board)] if board else []),
            ProgressBar(plan.epochs, meta["epoch"], progress), *([Hook(on_epoch)] if on_epoch else [])]


# --- the whole run ----------------------------------------------------------------------------

def train(cfg: TrainConfig, ds: Dataset, out: Path, resume: bool = False, progress: bool = True,
          device: str = "cpu", on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Result:
    """Train on ``ds``; under torchrun every rank calls this with the same data and rank 0 alone
    writes files. ``on_epoch`` gets {epoch, epochs, train_loss, val_mse, best_val_mse, seconds}
    after each epoch (rank 0 only)."""
    rank, world = _distributed()
    lead = rank == 0
    s = cfg.train
    if s.batch_size < world:
        raise ConfigError(f"train.batch_size = {s.batch_size} is smaller than the {world} processes")
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s.seed)
    model = build_model(model_config(cfg, ds)).to(device)
    if model.config.scale_deltas:  # fitted before DDP copies the buffers to every rank
        model.set_delta_std(torch.from_numpy(delta_std(ds.train)).to(device))
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    xw, yw = (torch.from_numpy(a) for a in windows(ds.train, s.seq_chunks))
    steps_per_epoch = math.ceil(len(xw) / s.batch_size)
    plan = Plan(steps_per_epoch, s.max_steps or steps_per_epoch * s.epochs)
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay, s.no_decay_ssm), lr=s.lr)
    ema = (AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(s.ema_decay), use_buffers=True)
           if s.ema_decay else None)
    served = ema.module if ema is not None else model  # what is validated, selected and saved
    meta = _resumable_state(out, model, opt, _fingerprint(cfg, ds), resume, ema)
    if lead:
        (out / METRICS_FILE).unlink(missing_ok=True)  # a run in progress is not finished: no metrics.json
        if not resume:  # a fresh run: an earlier run's state there would be what a later --resume continues
            (out / STATE_FILE).unlink(missing_ok=True)
    reporters = _reporters(out, meta, plan, progress, on_epoch) if lead else []
    t_start = time.perf_counter() - meta["seconds"]  # seconds count across resumes
    augments = [*([RotationAugment(cfg.inputs, cfg.outputs, ds.normalization, s.augment_rotation_deg,
                                   derived_vectors=int(cfg.strapdown is not None))]
                  if s.augment_rotation_deg else []),
                *([BiasAugment(s.augment_bias_std, ds.normalization.input_mean.size)] if s.augment_bias_std else [])]
    novelty = Novelty.fit(ds.train.x, inflate=s.novelty_inflation and model.config.variance)
    for epoch in range(meta["epoch"], plan.epochs):
        # checked before an epoch, not only after one: a state saved at the stopping epoch (a run
        # interrupted before its metrics.json, or a finished one) resumes to the same result
        if meta["bad_epochs"] >= s.patience:
            log.info("early stop: no validation improvement for %d epochs", s.patience)
            break
        train_loss = fit_epoch(net, model, opt, xw, yw, s, plan, epoch, device, augments, ema)
        val, _ = evaluate(served, ds.val, device)
        if not (math.isfinite(val) and math.isfinite(train_loss)):
            what = (f"training diverged in epoch {epoch + 1} (training loss {train_loss:g}, validation MSE {val:g}); "
                    f"lower train.lr ({s.lr:g})")
            if meta["best_epoch"] < 0:
                raise HissError(f"{what}: no epoch gave a model to keep")
            log.warning("%s: stopping, keeping epoch %d's model", what, meta["best_epoch"] + 1)
            break
        if val < meta["best_val"]:
            meta.update(best_val=val, best_epoch=epoch, bad_epochs=0)
            if lead:
                spec = cfg.serving_spec(ds.input_dims, ds.normalization, input_stamps=ds.input_stamps,
                                        input_rates_hz=ds.input_rates_hz, novelty=novelty)
                save_model(out / MODEL_FILE, served, spec, cfg.checkpoint_extra(ds.whole_val_bags))
        else:
            meta["bad_epochs"] += 1
        meta.update(epoch=epoch + 1, seconds=time.perf_counter() - t_start)
        record = {"epoch": epoch + 1, "epochs": plan.epochs, "train_loss": train_loss, "val_mse": val,
                  "best_val_mse": meta["best_val"], "lr": opt.param_groups[0]["lr"], "seconds": meta["seconds"]}
        for report in reporters:  # the csv row before the state: a crash between them repeats, never loses, a row
            report(record)
        if lead:
            _save_state(out / STATE_FILE, model, opt, meta, ema)
    for report in reporters:
        report.close()
    if world > 1:
        torch.distributed.barrier()  # rank 0's files are complete before anyone reads them
    return _finish(out, cfg, ds, meta, time.perf_counter() - t_start, write=lead, novelty=novelty)


def _resumable_state(out: Path, model: ChunkedModel, opt: torch.optim.Optimizer, config: dict[str, Any],
                     resume: bool, ema: AveragedModel | None = None) -> dict[str, Any]:
    """The run's state: epochs done, best validation and its epoch, epochs without improvement,
    seconds so far and the config; fresh, or with ``resume`` the interrupted run's (its weights and
    optimiser state loaded into ``model`` and ``opt``)."""
    meta = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0, "seconds": 0.0, "config": config}
    if resume and (out / STATE_FILE).is_file():
        meta = {**meta, **_load_state(out / STATE_FILE, model, opt, config, ema)}  # older states lack "seconds"
        log.info("resuming after epoch %d (best val_mse %.5f at epoch %d)", meta["epoch"], meta["best_val"],
                 meta["best_epoch"])
    return meta


def calibrate(model: ChunkedModel, split: Split, channels: list[str],
              novelty: Novelty | None = None) -> tuple[list[float], dict[str, Any]]:
    """The variance head's per-channel scale that makes mean(z^2) = 1 on ``split`` (normalised
    data), with the variance raised on novel input as served (``novelty``), and the calibration
    metrics of the scaled variance there."""
    mean, log_var = predict_gaussian(model, split)
    if log_var is None:
        raise ValueError("calibrate: the model has no variance head (model.variance false)")
    variance = np.exp(log_var.astype(np.float64))  # (K, O)
    if novelty is not None:
        variance = variance * novelty.inflation(np.concatenate(split.x))[:, None]
    error = mean - np.concatenate(split.y)
    scale = variance_scale(error, variance)
    return scale.tolist(), calibration_metrics(error, variance * scale, channels)


def _finish(out: Path, cfg: TrainConfig, ds: Dataset, meta: dict[str, Any], seconds: float, write: bool,
            novelty: Novelty) -> Result:
    if meta["best_epoch"] < 0:  # never a finite validation error: any model file here is another run's
        raise HissError(f"{out}: no epoch of this run gave a model (validation error never finite)")
    best = load_checkpoint(out / MODEL_FILE).model
    val, per_channel = evaluate(best, ds.val)
    physical = (per_channel * ds.normalization.output_std ** 2).tolist()
    result = Result(meta["best_epoch"], val, physical, meta["epoch"], seconds)
    names = [f"{s.topic}:{f}" for s in cfg.outputs for f in s.channel_names]
    labels = names if len(names) == len(physical) else [str(i) for i in range(len(physical))]
    scale, calibration = calibrate(best, ds.val, labels, novelty) if best.config.variance else (None, None)
    metrics = {
        "val_mse": val, "best_epoch": meta["best_epoch"], "epochs_run": meta["epoch"],
        "val_mse_per_channel": dict(zip(names, physical, strict=True)) if len(names) == len(physical) else physical,
        "train_chunks": ds.train.chunks, "val_chunks": ds.val.chunks, "skipped_segments": ds.skipped_segments,
        "pipeline": ds.pipeline_counters, "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in best.parameters()),
        "processes": _distributed()[1],
        **({"variance_scale": dict(zip(labels, scale, strict=True)), "val_calibration": calibration} if scale else {}),
    }
    if write:
        blob = strict_json(metrics, str(out / METRICS_FILE))
        # The validation error travels with the model: the node's velocity covariance.
        spec = cfg.serving_spec(ds.input_dims, ds.normalization, physical, scale, ds.input_stamps, ds.input_rates_hz,
                                novelty)
        save_model(out / MODEL_FILE, best, spec, cfg.checkpoint_extra(ds.whole_val_bags))
        atomic_write(out / METRICS_FILE, blob)  # last: its presence says the run finished
    return result
