"""Training-window augmentation: rotation (the sensor mounted turned) and bias (its offsets).

``train.augment_rotation_deg: A`` (0 = off) turns every training window by its own random rotation
R (a uniformly random axis, an angle uniform in [-A, A] degrees), applied alike to every 3-vector
of the inputs (angular velocity, linear acceleration, ...) and of the targets (a body-frame
velocity, a force, ...): v -> R v, in physical units, before normalisation. That is what the same
motion measured by a sensor mounted rotated by R^T would give, so the augmented windows are
physically consistent, provided every input and every target is a vector in the sensor's own
frame. The config is checked for what can be checked: every input and output channel must be
part of a 3-vector (fields ``<path>.x``, ``<path>.y``, ``<path>.z`` in that order, or a derived
``body_velocity``); a world-frame target (``derive: world_velocity``), a scalar or an array channel
is refused, naming it. That the vectors share one frame is the user's claim (for IMU -> body
velocity it holds; for ``hiss-import broad`` bags the targets are in the IMU frame).

Rotations are drawn from torch's generator after the epoch's shuffle (seeded per epoch), one per
window of the whole batch on every process, so runs are reproducible, resumable, and N processes
under torchrun take the same steps as one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hiss_ros.data.streams import StreamSpec
from hiss_ros.errors import ConfigError
from hiss_ros.pipeline import Normalization

AXES = ("x", "y", "z")


def vector_offsets(specs: Sequence[StreamSpec], side: str) -> list[int]:
    """The channel offset of each 3-vector of ``specs`` (their channels in order); ConfigError
    naming the first channel that is not part of one, or a world-frame target."""
    offsets, names, at = [], [], 0
    for spec in specs:
        if spec.derive == "world_velocity":
            raise ConfigError(f"train.augment_rotation_deg: {side} {spec.topic} is a world-frame velocity "
                              "(derive: world_velocity), which a rotation of the sensor does not turn; "
                              "use derive: body_velocity, or turn augmentation off")
        names += [(spec.topic, n) for n in spec.channel_names]
    while at < len(names):
        trio = names[at:at + 3]
        stems = {n.rsplit(".", 1)[0] for _, n in trio}
        if (len(trio) == 3 and len(stems) == 1 and len({t for t, _ in trio}) == 1
                and tuple(n.rsplit(".", 1)[-1] for _, n in trio) == AXES):
            offsets.append(at)
            at += 3
            continue
        topic, name = names[at]
        raise ConfigError(f"train.augment_rotation_deg: {side} channel {topic} {name!r} is not part of a 3-vector "
                          f"(fields <path>.x, <path>.y, <path>.z in that order), so a rotation of the sensor "
                          "cannot be applied to it consistently; turn augmentation off for this config")
    return offsets


def random_rotations(n: int, max_deg: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """(n, 3, 3) rotation matrices: a uniformly random axis, an angle uniform in [-max_deg, max_deg]."""
    axis = torch.randn(n, 3, generator=generator, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True).clamp_min(1e-12)
    angle = (torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1) * math.radians(max_deg)
    k = torch.zeros(n, 3, 3, dtype=torch.float64)  # the cross-product matrix of the axis
    k[:, 0, 1], k[:, 0, 2], k[:, 1, 2] = -axis[:, 2], axis[:, 1], -axis[:, 0]
    k = k - k.transpose(1, 2)
    s, c = torch.sin(angle)[:, None, None], torch.cos(angle)[:, None, None]
    return torch.eye(3, dtype=torch.float64) + s * k + (1 - c) * (k @ k)  # Rodrigues


class RotationAugment:
    """Turns normalised training windows x (b, L, C) and targets y (b, K, O) by one rotation each."""

    def __init__(self, inputs: Sequence[StreamSpec], outputs: Sequence[StreamSpec], norm: Normalization,
                 max_deg: float, derived_vectors: int = 0) -> None:
        """``derived_vectors``: body-frame 3-vectors the pipeline appends after the inputs' channels
        (the strapdown feature: computed from the turned gyro and accelerometer, it turns with them)."""
        self.max_deg = max_deg
        self._sides = []
        for side in ("input", "output"):
            offsets = vector_offsets(inputs if side == "input" else outputs, side)
            if side == "input":
                offsets += [offsets[-1] + 3 * (k + 1) for k in range(derived_vectors)]
            mean, std = (torch.tensor(getattr(norm, f"{side}_{k}"), dtype=torch.float64) for k in ("mean", "std"))
            if offsets[-1] + 3 != mean.numel():
                raise ConfigError(f"train.augment_rotation_deg: the {side} streams have {mean.numel()} channels, "
                                  f"not the {offsets[-1] + 3} their fields name (an array field?)")
            self._sides.append((offsets, mean, std))

    def draw(self, n: int) -> torch.Tensor:
        """One rotation per window of a batch of ``n``, from torch's global generator."""
        return random_rotations(n, self.max_deg)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, rotations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._turn(x, rotations, 0), self._turn(y, rotations, 1)

    def _turn(self, v: torch.Tensor, rotations: torch.Tensor, side: int) -> torch.Tensor:
        offsets, mean, std = self._sides[side]
        physical = v.double() * std + mean  # (b, T, C)
        for o in offsets:
            physical[..., o:o + 3] = torch.einsum("bij,btj->bti", rotations, physical[..., o:o + 3])
        return ((physical - mean) / std).to(v.dtype)


class BiasAugment:
    """``train.augment_bias_std: s`` (0 = off): every input channel of a training window offset by its
    own constant, drawn N(0, s^2) in normalised units (s standard deviations of that channel), as a
    sensor whose bias differs from recording to recording would give; targets unchanged. Drawn like
    the rotations (global generator, whole batch, every process)."""

    def __init__(self, std: float, channels: int) -> None:
        self.std, self.channels = std, channels

    def draw(self, n: int) -> torch.Tensor:
        return torch.randn(n, 1, self.channels) * self.std

    def __call__(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + bias.to(x.dtype), y
