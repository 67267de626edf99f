"""Training configuration (YAML), validated with messages that name the key and value."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hiss_ros.configfile import read_yaml, reject_unknown
from hiss_ros.data.streams import StreamSpec
from hiss_ros.errors import ConfigError
from hiss_ros.models import model_config_from_dict
from hiss_ros.pipeline import FilterConfig, Normalization, PipelineConfig
from hiss_ros.pipeline.novelty import Novelty
from hiss_ros.pipeline.strapdown import StrapdownConfig
from hiss_ros.serving import ServingSpec
from hiss_ros.train.augment import vector_offsets

LOSSES = ("mse", "nll")  # train.loss: MSE of the mean, or Gaussian NLL through the variance head


@dataclass(frozen=True)
class TrainSettings:
    epochs: int = 50
    batch_size: int = 16
    # lr and weight decay: the tuning candidate HiSS chose on both tasks of docs/ACCURACY.md (on
    # contact at 50 epochs, validation MSE 0.118 against 0.146 for the former 1e-3 / 0.01)
    lr: float = 5.52e-3
    weight_decay: float = 0.0328
    seq_chunks: int = 64  # chunks per training window
    val_fraction: float = 0.2  # the last part of each episode, in time
    patience: int = 10  # epochs without validation improvement before stopping
    grad_clip: float = 1.0
    seed: int = 0
    # The first chunks of each training window only warm the state up: no loss on them, since the
    # model is never asked for them from a zero state in the middle of a stream.
    burn_in_chunks: int = 0
    max_steps: int = 0  # optimiser steps in all (the last epoch cut short); 0: train.epochs full epochs
    no_decay_ssm: bool = False  # AdamW decay off for SSM dynamics (A, dt, D), biases and norms
    # "nll" (needs model.variance): Gaussian negative log-likelihood of the targets under the
    # predicted mean and variance; the first nll_warmup_epochs train the mean alone on MSE;
    # nll_beta in [0, 1] weights each element by its variance^beta (beta-NLL; see loop.batch_loss).
    loss: str = "mse"
    nll_warmup_epochs: int = 0
    nll_beta: float = 0.0
    # Each training window turned by a random rotation of up to this many degrees, inputs and
    # targets alike (hiss_ros.train.augment: every channel must be part of a 3-vector); 0: off.
    augment_rotation_deg: float = 0.0
    # Each training window's input channels offset by a constant drawn N(0, s^2) per channel, in
    # normalised units (hiss_ros.train.augment.BiasAugment); 0: off.
    augment_bias_std: float = 0.0
    # A model with the variance head: its variance raised on input unlike the training chunks
    # (hiss_ros.pipeline.novelty), calibrated with it; false: the head's variance alone.
    novelty_inflation: bool = True
    # The weights validated, selected and saved: an exponential moving average of the trained ones,
    # updated after every optimiser step with this decay (torch.optim.swa_utils); 0: off.
    ema_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"train.loss = {self.loss!r}: expected one of {list(LOSSES)}")
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type == "str":
                continue  # checked by name above
            if f.type == "bool":
                if not isinstance(v, bool):
                    raise ConfigError(f"train.{f.name} = {v!r}: expected true or false")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ConfigError(f"train.{f.name} = {v!r}: expected a (finite) number")
        for name in ("epochs", "batch_size", "seq_chunks", "patience"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"train.{name} = {getattr(self, name)!r}: expected a positive int")
        for name in ("burn_in_chunks", "max_steps", "nll_warmup_epochs"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"train.{name} = {getattr(self, name)!r}: expected an int >= 0")
        if self.burn_in_chunks >= self.seq_chunks:
            raise ConfigError(f"train.burn_in_chunks = {self.burn_in_chunks!r}: expected fewer than "
                              f"train.seq_chunks = {self.seq_chunks} (no chunk of a window would be trained on)")
        for name in ("nll_warmup_epochs", "nll_beta"):
            if getattr(self, name) and self.loss != "nll":
                raise ConfigError(f"train.{name} = {getattr(self, name)!r}: applies to train.loss nll only "
                                  f"(train.loss is {self.loss!r})")
        if not 0 <= self.nll_beta <= 1:
            raise ConfigError(f"train.nll_beta = {self.nll_beta!r}: expected a number in [0, 1]")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"train.val_fraction = {self.val_fraction!r}: expected a number in (0, 1)")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise ConfigError(f"train.seed = {self.seed!r}: expected an int in [0, 2^31)")
        if self.grad_clip <= 0:
            raise ConfigError(f"train.grad_clip = {self.grad_clip!r}: expected a positive gradient norm "
                              "(a negative one would reverse every gradient)")
        if self.lr <= 0:
            raise ConfigError(f"train.lr = {self.lr!r}: expected a positive number")
        if self.weight_decay < 0:
            raise ConfigError(f"train.weight_decay = {self.weight_decay!r}: expected a number >= 0")
        if self.augment_bias_std < 0:
            raise ConfigError(f"train.augment_bias_std = {self.augment_bias_std!r}: expected a number >= 0 (0: off)")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"train.ema_decay = {self.ema_decay!r}: expected a number in [0, 1) (0: off)")
        if not 0 <= self.augment_rotation_deg <= 180:
            raise ConfigError(f"train.augment_rotation_deg = {self.augment_rotation_deg!r}: expected degrees "
                              "in [0, 180] (0: off)")


def _folders(value: Any) -> tuple[str, ...]:
    """``msg_paths`` as given in a config: a folder or a list of them."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ConfigError(f"msg_paths = {value!r}: expected a folder or a list of folders of .msg files")


@dataclass(frozen=True)
class TrainConfig:
    inputs: tuple[StreamSpec, ...]
    outputs: tuple[StreamSpec, ...]
    input_rate_hz: float
    output_rate_hz: float
    model: dict[str, Any]  # model config without input_dim / output_dim / chunk (filled in from the data)
    train: TrainSettings = field(default_factory=TrainSettings)
    max_gap_s: float = 0.5
    filter: FilterConfig | None = None
    # Each input's measured rate must be within this fraction of its expected one (the stream's
    # rate_hz, else input_rate_hz); allow_rate_mismatch: warn instead of refusing to train.
    rate_tolerance: float = 0.1
    allow_rate_mismatch: bool = False
    msg_paths: tuple[str, ...] = ()  # folders of custom .msg definitions (hiss-train --msg-path)
    # A gravity-free velocity feature from the IMU's gyro and accelerometer (hiss_ros.pipeline.strapdown):
    # {gyro: '/imu/data:angular_velocity', accel: '/imu/data:linear_acceleration', taus: [1.0, 3.0]}
    # (or 3 channel indices each); 3 more model inputs. None: off.
    strapdown: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        PipelineConfig.check_rates(self.input_rate_hz, self.output_rate_hz, self.max_gap_s)
        object.__setattr__(self, "filter", FilterConfig.parse(self.filter))
        tol = self.rate_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise ConfigError(f"rate_tolerance = {tol!r}: expected a fraction in (0, 1), e.g. 0.1 for 10 %")
        if not isinstance(self.allow_rate_mismatch, bool):
            raise ConfigError(f"allow_rate_mismatch = {self.allow_rate_mismatch!r}: expected true or false")
        if isinstance(self.msg_paths, str) or not all(isinstance(m, str) for m in self.msg_paths):
            raise ConfigError(f"msg_paths = {self.msg_paths!r}: expected a list of folders")
        if self.train.augment_rotation_deg:  # every channel part of a 3-vector, no world-frame target
            vector_offsets(self.inputs, "input")
            vector_offsets(self.outputs, "output")
        self.strapdown_config()  # refused here, naming the key, rather than at the first bag
        # the model section too (a typo'd key), rather than after every bag is read: placeholder
        # dims, as the data's are not known yet
        model_config_from_dict({**self.model, "input_dim": 1, "output_dim": 1,
                                "chunk": max(1, round(self.input_rate_hz / self.output_rate_hz))})
        if self.train.loss == "nll" and self.model.get("variance") is not True:
            raise ConfigError("train.loss = 'nll' needs the variance head: set model.variance: true "
                              f"(model.variance is {self.model.get('variance', False)!r})")

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        reject_unknown(data, cls, source)
        for key in ("inputs", "outputs", "input_rate_hz", "output_rate_hz", "model"):
            if key not in data:
                raise ConfigError(f"{source}: missing key {key!r}")
        for key in ("inputs", "outputs"):
            if not isinstance(data[key], list) or not data[key]:
                raise ConfigError(f"{source}: {key} must be a non-empty list of streams")
        if not isinstance(data["model"], dict):
            raise ConfigError(f"{source}: model must be a mapping such as {{kind: hiss, low: ..., high: ...}}")
        train = data.get("train") or {}
        if not isinstance(train, dict):
            raise ConfigError(f"{source}: train must be a mapping such as {{epochs: 50, lr: 5.52e-3}}")
        reject_unknown(train, TrainSettings, f"{source}: train")
        try:
            settings = TrainSettings(**train)
        except TypeError as exc:
            raise ConfigError(f"{source}: train: {exc}") from None
        filt = data.get("filter")
        return cls(
            inputs=tuple(StreamSpec.from_dict(s) for s in data["inputs"]),
            outputs=tuple(StreamSpec.from_dict(s) for s in data["outputs"]),
            input_rate_hz=data["input_rate_hz"],
            output_rate_hz=data["output_rate_hz"],
            model=dict(data["model"]),
            train=settings,
            max_gap_s=data.get("max_gap_s", 0.5),
            filter=FilterConfig.parse(filt),
            rate_tolerance=data.get("rate_tolerance", 0.1),
            allow_rate_mismatch=data.get("allow_rate_mismatch", False),
            msg_paths=_folders(data.get("msg_paths")),
            strapdown=data.get("strapdown"),
        )

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], model: dict[str, Any]) -> TrainConfig:
        """The config a checkpoint was trained with, from its data spec and model config."""
        # input_dims are the data's, validation the trained model's: neither is part of the config
        measured = ("input_dims", "validation", "variance_scale", "input_stamps", "input_rates_hz", "novelty",
                    "whole_val_bags")
        spec = {k: v for k, v in data.items() if k not in measured}
        return cls.from_dict({**spec, "model": model}, source="checkpoint data spec")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """The config at ``path``; its msg_paths are relative to the file's folder."""
        data = read_yaml(path)
        if isinstance(data, dict) and data.get("msg_paths"):
            data["msg_paths"] = [str(Path(path).parent / m) for m in _folders(data["msg_paths"])]
        return cls.from_dict(data, source=str(path))

    def strapdown_config(self) -> StrapdownConfig | None:
        """``strapdown`` resolved against the inputs' channels (ConfigError naming what is wrong)."""
        if self.strapdown is None:
            return None
        names = [f"{s.topic}:{f}" for s in self.inputs for f in s.channel_names]
        return StrapdownConfig.from_dict(self.strapdown, names)

    def pipeline_config(self, input_dims: tuple[int, ...]) -> PipelineConfig:
        return PipelineConfig(input_dims, self.input_rate_hz, self.output_rate_hz, self.max_gap_s, self.filter,
                              self.strapdown_config())

    def serving_spec(self, input_dims: tuple[int, ...], normalization: Normalization,
                     validation_mse: list[float] | None = None,
                     variance_scale: list[float] | None = None, input_stamps: tuple[str, ...] | None = None,
                     input_rates_hz: tuple[float, ...] | None = None, novelty: Novelty | None = None) -> ServingSpec:
        """What the live node needs besides the model: streams, rates, gap limit, filter, normalisation,
        novelty statistics (and, once fitted, the validation error and the variance head's calibration)."""
        return ServingSpec(self.inputs, self.outputs, self.pipeline_config(input_dims), normalization,
                           None if validation_mse is None else tuple(validation_mse),
                           None if variance_scale is None else tuple(variance_scale), input_stamps, input_rates_hz,
                           novelty)

    def checkpoint_extra(self, whole_val_bags: bool = False) -> dict[str, Any]:
        """Stored beside the serving spec: the settings, so hiss-eval can rebuild the same validation
        split; ``whole_val_bags``: validation was every segment of independent bags (--val-bag), whole,
        not the last val_fraction of each."""
        return {"train": asdict(self.train), **({"whole_val_bags": True} if whole_val_bags else {})}
