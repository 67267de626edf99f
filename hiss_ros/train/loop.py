"""The training loop: AdamW, cosine LR, gradient clipping, early stopping on validation MSE.

Writes into ``out``:
    model.safetensors   best checkpoint (weights, model config, normalisation, data spec)
    train_state.safetensors  last epoch's weights + optimizer state, for --resume
    metrics.csv         one row per epoch (and tensorboard/ event files when TensorBoard is installed)
    metrics.json        val_mse (normalised) and per-channel MSE in physical units of the best epoch

Deterministic on CPU for a fixed seed: each epoch reseeds from (seed, epoch), so a resumed run
takes exactly the steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm import tqdm

from hiss_ros.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from hiss_ros.errors import CheckpointError, ConfigError
from hiss_ros.models import ChunkedModel, build_model
from hiss_ros.train.config import TrainConfig
from hiss_ros.train.dataset import Dataset, Split, delta_std, windows

log = logging.getLogger(__name__)
STATE_FILE = "train_state.safetensors"
MODEL_FILE = "model.safetensors"


@dataclass
class Result:
    best_epoch: int
    val_mse: float
    val_mse_per_channel: list[float]  # physical units
    epochs_run: int
    seconds: float


def model_config(cfg: TrainConfig, ds: Dataset) -> dict[str, Any]:
    return {**cfg.model, "input_dim": sum(ds.input_dims), "output_dim": ds.output_dim, "chunk": ds.chunk}


@torch.no_grad()
def predict(model: ChunkedModel, split: Split, device: str = "cpu") -> np.ndarray:
    """(K, O) normalised predictions for every chunk of ``split``, each segment run from its
    start (as the live node streams it)."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(x.reshape(1, -1, x.shape[-1])).to(device))[0].cpu().numpy()
                           for x in split.x])


def evaluate(model: ChunkedModel, split: Split, device: str = "cpu") -> tuple[float, np.ndarray]:
    """MSE (normalised) over every chunk of ``split`` and its per-channel part."""
    sq = (predict(model, split, device) - np.concatenate(split.y)) ** 2
    return float(sq.mean()), sq.mean(0)


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


def _save_state(path: Path, model: ChunkedModel, opt: torch.optim.Optimizer, meta: dict[str, Any]) -> None:
    """Model and optimizer tensors in safetensors, everything else as JSON (no pickle)."""
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    sd = opt.state_dict()
    for idx, st in sd["state"].items():
        for name, v in st.items():
            tensors[f"opt.{idx}.{name}"] = torch.as_tensor(v).contiguous()
    meta = {**meta, "param_groups": sd["param_groups"]}
    atomic_write(path, save(tensors, metadata={"train_state": json.dumps(meta)}))


def _load_state(path: Path, model: ChunkedModel, opt: torch.optim.Optimizer) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["train_state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot resume from it ({exc}); delete it to start afresh") from None
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, name = k.split(".", 2)
            state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    return meta


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


def train(cfg: TrainConfig, ds: Dataset, out: Path, resume: bool = False, progress: bool = True,
          device: str = "cpu", on_epoch: Callable[[dict[str, Any]], None] | None = None) -> Result:
    """Train on ``ds``; under torchrun every rank calls this with the same data, each takes its
    share of every batch, and rank 0 alone writes files. The loss is normalised by the global
    batch, so N processes take the same steps as one (up to float summation order)."""
    rank, world = _distributed()
    lead = rank == 0
    s = cfg.train
    # ``on_epoch`` gets {epoch, epochs, train_loss, val_mse, best_val_mse, seconds} after each epoch
    # (rank 0 only): the ROS trainer node publishes it on /diagnostics.
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
    total = s.max_steps or steps_per_epoch * s.epochs
    epochs = math.ceil(total / steps_per_epoch)
    opt = torch.optim.AdamW(param_groups(model, s.weight_decay, s.no_decay_ssm), lr=s.lr)

    def lr_at(step: int) -> float:  # linear warm-up over one epoch (at most a fifth of all), then cosine to 1%
        warm = min(steps_per_epoch, max(1, total // 5))
        if step < warm:
            return (step + 1) / warm
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    meta = {"epoch": 0, "best_val": math.inf, "best_epoch": -1, "bad_epochs": 0}
    if resume and (out / STATE_FILE).is_file():
        meta = _load_state(out / STATE_FILE, model, opt)
        log.info("resuming after epoch %d (best val_mse %.5f at epoch %d)", meta["epoch"], meta["best_val"],
                 meta["best_epoch"])
    csv_path = out / "metrics.csv"
    if lead and meta["epoch"] == 0:
        csv_path.write_text("epoch,train_loss,val_mse,lr,seconds\n")
    board = _tensorboard(out) if lead else None
    t_start = time.perf_counter()
    bar = tqdm(total=epochs, initial=meta["epoch"], desc="training", unit="epoch", disable=not (progress and lead))
    for epoch in range(meta["epoch"], epochs):
        torch.manual_seed(s.seed * 100_003 + epoch)  # same order on every rank, and after --resume
        model.train()
        order = torch.randperm(len(xw))
        sq_sum, count = torch.zeros(2, dtype=torch.float64), 0
        for i in range(min(steps_per_epoch, total - epoch * steps_per_epoch)):
            for g in opt.param_groups:
                g["lr"] = s.lr * lr_at(epoch * steps_per_epoch + i)
            batch = order[i * s.batch_size:(i + 1) * s.batch_size]
            idx = batch[rank::world]  # this rank's share
            y = yw[idx, s.burn_in_chunks:].to(device)  # (b, seq - burn_in, O)
            pred = net(xw[idx].to(device))[:, s.burn_in_chunks:]
            sq = torch.nn.functional.mse_loss(pred, y, reduction="sum")
            loss = sq * world / (len(batch) * y[0].numel())  # DDP averages over ranks -> global mean
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            opt.step()
            sq_sum[0] += sq.item()
            count += len(batch) * y[0].numel()
        if world > 1:
            torch.distributed.all_reduce(sq_sum)
        train_loss = float(sq_sum[0]) / count
        val, _ = evaluate(model, ds.val, device)
        if val < meta["best_val"]:
            meta.update(best_val=val, best_epoch=epoch, bad_epochs=0)
            if lead:
                save_checkpoint(out / MODEL_FILE, model, ds.normalization,
                                {**cfg.data_spec(), "input_dims": list(ds.input_dims)})
        else:
            meta["bad_epochs"] += 1
        meta["epoch"] = epoch + 1
        if lead:
            with csv_path.open("a", newline="") as f:
                csv.writer(f).writerow([epoch, f"{train_loss:.6f}", f"{val:.6f}", f"{opt.param_groups[0]['lr']:.3g}",
                                        f"{time.perf_counter() - t_start:.1f}"])
            _save_state(out / STATE_FILE, model, opt, meta)
        if board is not None:
            board.add_scalars("mse", {"train": train_loss, "val": val}, epoch + 1)
            board.add_scalar("lr", opt.param_groups[0]["lr"], epoch + 1)
            board.flush()
        if lead and on_epoch is not None:
            on_epoch({"epoch": epoch + 1, "epochs": epochs, "train_loss": train_loss, "val_mse": val,
                      "best_val_mse": meta["best_val"], "seconds": time.perf_counter() - t_start})
        bar.set_postfix(loss=f"{train_loss:.4f}", val=f"{val:.4f}", best=f"{meta['best_val']:.4f}")
        bar.update()
        if meta["bad_epochs"] >= s.patience:
            log.info("early stop: no validation improvement for %d epochs", s.patience)
            break
    bar.close()
    if board is not None:
        board.close()
    if world > 1:
        torch.distributed.barrier()  # rank 0's files are complete before anyone reads them
    return _finish(out, cfg, ds, meta, time.perf_counter() - t_start, write=lead)


def _finish(out: Path, cfg: TrainConfig, ds: Dataset, meta: dict[str, Any], seconds: float, write: bool) -> Result:
    best = load_checkpoint(out / MODEL_FILE).model
    val, per_channel = evaluate(best, ds.val)
    physical = (per_channel * np.asarray(ds.normalization["output_std"]) ** 2).tolist()
    result = Result(meta["best_epoch"], val, physical, meta["epoch"], seconds)
    names = [f"{s.topic}:{f}" for s in cfg.outputs for f in s.channel_names]
    metrics = {
        "val_mse": val, "best_epoch": meta["best_epoch"], "epochs_run": meta["epoch"],
        "val_mse_per_channel": dict(zip(names, physical, strict=True)) if len(names) == len(physical) else physical,
        "train_chunks": ds.train.chunks, "val_chunks": ds.val.chunks, "skipped_segments": ds.skipped_segments,
        "pipeline": ds.pipeline_counters, "seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in best.parameters()),
        "processes": _distributed()[1],
    }
    if write:
        atomic_write(out / "metrics.json", json.dumps(metrics, indent=2).encode())
        # The validation error travels with the model: the node's velocity covariance.
        save_checkpoint(out / MODEL_FILE, best, ds.normalization,
                        {**cfg.data_spec(), "input_dims": list(ds.input_dims),
                         "validation": {"mse_per_channel": physical, "chunks": ds.val.chunks}})
    return result
