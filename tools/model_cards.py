"""Model cards (``models/README.md``) from the results of ``tools/build_shipped_models.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hiss_ros.models import MODEL_CHOICES

INTRO = """\
# Shipped models

Trained by hiss_ros's own trainer with `tools/build_shipped_models.py` (which regenerates the data,
trains, evaluates and rewrites this file). Each checkpoint is one `.safetensors` file with
everything the estimator node needs (model config, streams, rates, normalisation, validation error);
`<name>.metrics.json` holds its metrics on the shipped sample bag, which `test/test_shipped.py`
reproduces on every CI run.

| model | inputs | outputs | file |
|---|---|---|---|
| [`contact`](#contact) | IMU + magnetic tactile skin | wrench, body twist | `contact.safetensors` (default) |
| [`broad_velocity`](#broad_velocity) | IMU | body linear velocity | `broad_velocity.safetensors` |
{contact_uncertainty}
{broad_velocity_uncertainty}

The `*_uncertainty` models have the variance head (`docs/UNCERTAINTY.md`): every estimate comes
with its own predicted variance, calibrated on validation data and raised on input unlike the
training data. The twist then goes out as `TwistWithCovarianceStamped` (the per-estimate variances
on the diagonal, what robot_localization fuses: `ros2 launch hiss_ros ekf_velocity.launch.py` uses
`broad_velocity_uncertainty`), the wrench's variances on `hiss_estimator/wrench_variance`.
""".format(
    contact_uncertainty="| [`contact_uncertainty`](#contact_uncertainty) | as `contact` | as `contact`, each with its "
                        "variance | `contact_uncertainty.safetensors` |",
    broad_velocity_uncertainty="| [`broad_velocity_uncertainty`](#broad_velocity_uncertainty) | IMU | body linear "
                               "velocity with its covariance | `broad_velocity_uncertainty.safetensors` |",
)

TEXT = {
    "contact": {
        "title": "contact",
        "what": (
            "Tactile skin (5 magnetometers x 3 axes, `/tactile`, `std_msgs/Float32MultiArray`, 100 Hz) + IMU "
            "(`/imu/data`, 400 Hz: the input clock) -> contact wrench (`hiss_estimator/wrench`, force and torque "
            "in the tool frame) and end-effector body twist (`hiss_estimator/twist`), 40 estimates per second (chunks "
            "of 10 IMU samples)."
        ),
        "data": (
            "Simulated with `hiss-sim` (see [docs/SIMULATOR.md](../docs/SIMULATOR.md)): training recordings with "
            "seeds 1-4, 150 s each (600 s; the last 20% of each validates); held-out test recordings with seeds "
            "5-6, 60 s each; the sample bag `data/sample/contact_sim` is seed 0, 60 s. Seeds change the motion, "
            "the surface, the noise and the temperature; the skin is the same device in all of them."
        ),
        "limits": (
            "Trained on simulated data only: on a real skin it needs retraining (`hiss-train` with your own "
            "bags and `{config}`). Topics and rates are those of `hiss-sim`'s defaults."
        ),
        "validation": ("Validation is the last 20% of each training recording, so it is not independent of "
                       "training: read the held-out column."),
        "config": "config/train_contact.yaml",
        "train_cmd": (
            "for s in 1 2 3 4; do hiss-sim --out out/shipped/contact_train_$s --seconds 150 --seed $s --zstd; done\n"
            "hiss-train --config config/train_contact.yaml --bag out/shipped/contact_train_{1,2,3,4} \\\n"
            "    --out out/shipped/contact --compare hiss,flat-mamba,flat-s4d,flat-lstm,flat-transformer"
        ),
        "recipe": (" The learning rate and weight decay (the trainer's defaults) are the candidate an equal tuning "
                   "budget (`--tune 3`) chose for HiSS and for flat-lstm on this task; the other flat models were "
                   "not tuned on it (docs/ACCURACY.md)."),
        "attribution": "",
    },
    "broad_velocity": {
        "title": "broad_velocity",
        "what": (
            "IMU (`/imu/data`, 285.7 Hz) -> body-frame linear velocity (`hiss_estimator/twist`, `TwistStamped`, "
            "`twist.linear`), 28.6 estimates per second (chunks of 10 samples). Real data. Inputs: the six IMU "
            "channels and three the pipeline derives from them (`strapdown:` in the config, a gravity-free "
            "body-frame velocity from the gyro and accelerometer; docs/ACCURACY.md), for every model below."
        ),
        "data": (
            "BROAD (real IMU with optical motion capture), imported with `hiss-import broad` (frames checked, see "
            "[docs/DATASETS.md](../docs/DATASETS.md)); target: the importer's `/mocap/twist` (Savitzky-Golay "
            "derivative of the mocap position, rotated into the IMU frame). Split as protocol W of "
            "[docs/ACCURACY.md](../docs/ACCURACY.md): training trials 04 06 08 14 15 18 24, **independent** "
            "validation trials 01 and 10 (early stopping and the best epoch; the last 20% of a training trial ends "
            "at rest, too easy to choose by), held-out test trials 02 07 09 11 16 21 25 (one of "
            "each trial group, and the only combined rotation + translation trial). The sample bag "
            "`data/sample/broad_excerpt` is 20 s of held-out trial 21 (from 34 s)."
        ),
        "limits": (
            "Velocity from an IMU alone is only observable through the motion patterns the model has seen "
            "(BROAD's hand-held rotations and translations of one IMU); expect it not to transfer to a robot "
            "without retraining on the robot's own data."
        ),
        "config": "config/train_broad_velocity.yaml",
        "validation": ("Validation is on the independent trials 01 and 10 (early stopping and the best epoch), "
                       "not the training recordings: read the held-out column all the same."),
        "train_cmd": (
            "hiss-import broad ../shared/data/broad --trials 01,02,04,06,07,08,09,10,11,14,15,16,18,21,24,25 "
            "--out out/shipped/broad --zstd --no-mag\n"
            "hiss-train --config config/train_broad_velocity.yaml --bag out/shipped/broad/04_* ... (trials 04 06 "
            "08 14 15 18 24) \\\n    --val-bag out/shipped/broad/01_* --val-bag out/shipped/broad/10_* \\\n"
            "    --out out/shipped/broad_velocity --compare hiss,flat-mamba,flat-s4d,flat-lstm,flat-transformer"
        ),
        "recipe": (
            " The learning rate and weight decay are the candidate an equal tuning budget (`--tune 3`) chose for "
            "HiSS and for flat-mamba on these trials; flat-lstm chose another (docs/ACCURACY.md, \"Equal tuning "
            "budget\")."
        ),
        "attribution": (
            "Data: BROAD, D. Laidig, M. Caruso, A. Cereatti, T. Seel, \"BROAD - A Benchmark for Robust Inertial "
            "Orientation Estimation\", Data 6(7), 2021, doi:10.3390/data6070072, CC BY 4.0. This model and the "
            "sample excerpt are derived from it and shared under the same license terms (attribution)."
        ),
    },
}
TEXT["contact_uncertainty"] = {
    **TEXT["contact"], "title": "contact_uncertainty", "config": "config/train_contact_nll.yaml",
    "what": TEXT["contact"]["what"] + " Each estimate with its predicted variance: the twist as "
    "`TwistWithCovarianceStamped`, the wrench's variances on `hiss_estimator/wrench_variance`.",
    "train_cmd": (
        "for s in 1 2 3 4; do hiss-sim --out out/shipped/contact_train_$s --seconds 150 --seed $s --zstd; done\n"
        "hiss-train --config config/train_contact_nll.yaml --bag out/shipped/contact_train_{1,2,3,4} \\\n"
        "    --out out/shipped/contact_uncertainty --compare hiss"
    ),
    "against": "contact",
}
TEXT["broad_velocity_uncertainty"] = {
    **TEXT["broad_velocity"], "title": "broad_velocity_uncertainty", "config": "config/train_broad_velocity_nll.yaml",
    "what": (
        "IMU (`/imu/data`, 285.7 Hz) -> body-frame linear velocity with its covariance (`hiss_estimator/twist`, "
        "`TwistWithCovarianceStamped`: the predicted variance of each estimate on the diagonal, 1e6 where not "
        "estimated), 28.6 estimates per second. Real data, the same inputs as `broad_velocity` (the IMU and "
        "the pipeline's strapdown velocity). The model of `ekf_velocity.launch.py`."
    ),
    "data": (
        "BROAD, imported and split as for `broad_velocity` (protocol W of "
        "[docs/ACCURACY.md](../docs/ACCURACY.md)): training trials 04 06 08 14 15 18 24, **independent** "
        "validation trials 01 and 10 (early stopping, and where the variance is calibrated: the last 20% of "
        "a training trial, at rest, would make it far too confident), held-out test trials 02 07 09 11 16 21 25."
    ),
    "train_cmd": (
        "hiss-import broad ../shared/data/broad --out out/shipped/broad --zstd --no-mag\n"
        "hiss-train --config config/train_broad_velocity_nll.yaml --bag out/shipped/broad/04_* ... (trials 04 06 "
        "08 14 15 18 24) \\\n    --val-bag out/shipped/broad/01_* --val-bag out/shipped/broad/10_* \\\n"
        "    --out out/shipped/broad_velocity_uncertainty --compare hiss"
    ),
    "against": "broad_velocity",
}


def _fmt(x: float) -> str:
    return f"{x:.4g}"


UNCERTAINTY_LIMITS = (" The variance is raised on novel input by a heuristic (`docs/UNCERTAINTY.md`, \"Novelty "
                      "inflation\"), not derived; errors are heavier-tailed than a Gaussian (3-sigma coverage below "
                      "99.7 %).")


def _facts(name: str, r: dict[str, Any], about_config: str, more_limits: str = "") -> str:
    """The card's list: file, data, config, training (with its command), limits."""
    t, tr = TEXT[name], r["train"]
    command = "\n".join("  " + line for line in t["train_cmd"].splitlines())
    return f"""- **File**: `models/{name}.safetensors`, {r['size_mb']:.2f} MB, {tr['parameters']:,} parameters.
- **Data**: {t['data']}
- **Config**: [`{t['config']}`](../{t['config']}) ({about_config}).
- **Training**: {tr['epochs_run']} epochs (best: epoch {tr['best_epoch'] + 1}), {tr['seconds']:.0f} s on a 2-core
  CPU, {tr['train_chunks']} training and {tr['val_chunks']} validation chunks. Command (from the repository root,
  tools in `.venv/bin/`):

  ```bash
{command}
  ```
- **Limits**: {t['limits'].format(config=t['config'])}{more_limits}
"""


def uncertainty_card(name: str, r: dict[str, Any]) -> str:
    """A model with the variance head: its accuracy, and its calibration on the held-out data."""
    t = TEXT[name]
    hiss = r["rows"][0]
    cal = r["calibration"]
    cover = "\n".join(
        f"| `{c}` | {cal['within_1_sigma'][c]:.3f} | {cal['within_2_sigma'][c]:.3f} | {cal['within_3_sigma'][c]:.3f} "
        f"| {cal['mean_z2'][c]:.2f} | {_fmt(hiss['test_rmse'][c])} |" for c in cal["within_2_sigma"])
    lo, hi = min(cal["within_2_sigma"].values()), max(cal["within_2_sigma"].values())
    nov = r["novelty"]
    return f"""
## {t['title']}

{t['what']}

{_facts(name, r, f"the `{t['against']}` model with the variance head, beta-NLL", UNCERTAINTY_LIMITS)}
### Calibration on the held-out test data

Held-out normalised MSE of the mean {_fmt(hiss['test_mse'])} (predicting the training mean:
{_fmt(r['mean_baseline_test_mse'])}; the MSE-trained `{t['against']}`: see its card, and
`docs/UNCERTAINTY.md` for the multi-seed comparison). Fraction of the errors within 1, 2, 3 predicted
standard deviations (ideal 0.683 / 0.954 / 0.997), mean z^2 (1 when calibrated), RMSE in physical units;
2-sigma coverage {lo:.3f} - {hi:.3f} over the channels. Mean NLL (normalised units, per channel)
{cal['nll_mean']:.3f}. Input novelty on the test data: median {nov['median']:.2f}, 99th percentile
{nov['p99']:.1f} (warn level {nov['warn_level']:.1f}, exceeded by {100 * nov['fraction_above_warn_level']:.1f} % of
the chunks).

| channel | within 1 sigma | within 2 sigma | within 3 sigma | mean z^2 | RMSE |
|---|---|---|---|---|---|
{cover}

On the sample bag: normalised MSE {_fmt(r['sample']['mse_normalised'])} over {r['sample']['chunks']} estimates
(`models/{name}.metrics.json`, reproduced by `test/test_shipped.py`).
{chr(10) + t['attribution'] + chr(10) if t['attribution'] else ''}"""


def card(name: str, r: dict[str, Any]) -> str:
    t = TEXT[name]
    if r.get("calibration"):
        return uncertainty_card(name, r)
    rows = sorted(r["rows"], key=lambda row: row["test_mse"])
    hiss = next(row for row in r["rows"] if row["name"] == "hiss")
    best = rows[0]
    rank = [row["name"] for row in rows].index("hiss") + 1
    if best["name"] == "hiss":
        verdict = (f"HiSS has the lowest held-out test MSE, {_fmt(hiss['test_mse'])} against "
                   f"{_fmt(rows[1]['test_mse'])} for the best flat baseline ({rows[1]['name']}).")
    else:
        verdict = (f"HiSS does **not** win here: it ranks {rank} of {len(rows)} on held-out test MSE "
                   f"({_fmt(hiss['test_mse'])}; best: {best['name']}, {_fmt(best['test_mse'])}).")
    verdict += (" All models had the same data, training recipe (the config's epochs, optimiser, learning rate and "
                "weight decay) and parameter budget (within 10%); no per-model tuning in this build.")
    verdict += t.get("recipe", "")
    table = ["| model | parameters | validation MSE | held-out test MSE | streaming cost per estimate (ms) | "
             "training time (s) |", "|---|---|---|---|---|---|"]
    for row in rows:
        table.append(f"| {row['name']} | {row['parameters']:,} | {_fmt(row['val_mse'])} | {_fmt(row['test_mse'])} | "
                     f"{row['step_ms']:.2f} | {row['train_seconds']:.0f} |")
    table.append(f"| (no model: the training mean) | 0 | | {_fmt(r['mean_baseline_test_mse'])} | | |")
    left_out = [m for m in MODEL_CHOICES if m not in r["compare"]]
    if left_out:
        verdict += f" Not compared in this build: {', '.join(left_out)}."
    verdict += (" One seed per model: [docs/ACCURACY.md](../docs/ACCURACY.md) repeats the comparisons over three "
                "seeds, where the seed-to-seed spread is as large as most of these gaps; read its verdicts before "
                "these rankings.")
    rmse = "\n".join(f"| `{c}` | {_fmt(v)} | {_fmt(r['sample']['rmse'][c])} |" for c, v in hiss["test_rmse"].items())
    return f"""
## {t['title']}

{t['what']}

{_facts(name, r, "HiSS: S4D low level, Mamba high level")}
### HiSS against flat baselines at the same parameter budget (`hiss-train --compare`)

MSE in normalised units (each output channel scaled by its training standard deviation), so the
channels weigh equally and predicting the training mean scores about 1; held-out test data never
seen in training or validation. {t['validation']} Streaming cost: median wall time of one `step_chunk` (batch 1, one CPU
thread), all models measured one after the other in one process on this 2-core machine after
training; see `docs/BENCHMARKS.md` for the benchmark of the paper-size model. Training time is
wall time while other builds shared the CPU: indicative only.

{chr(10).join(table)}

{verdict}

Per-channel RMSE of the shipped HiSS model, physical units (N, N m, m/s, rad/s):

| channel | held-out test | sample bag `{r['sample']['bag']}` |
|---|---|---|
{rmse}

On the sample bag: normalised MSE {_fmt(r['sample']['mse_normalised'])} over {r['sample']['chunks']} estimates
(predicting the training mean: {_fmt(r['sample']['mean_baseline_mse'])}; `models/{name}.metrics.json`, reproduced by
`test/test_shipped.py`).
{chr(10) + t['attribution'] + chr(10) if t['attribution'] else ''}"""


def write_cards(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Rewrite ``path``: a new card for each model in ``results``; the others keep the card they
    have there (a build with ``--only`` rewrites only its models')."""
    old = path.read_text() if path.exists() else ""
    kept = {}
    for section in old.split("\n## ")[1:]:
        kept[section.split("\n", 1)[0].strip()] = "\n## " + section.rstrip("\n") + "\n"
    cards = [card(n, results[n]) if n in results else kept.get(n, "") for n in TEXT]
    path.write_text(INTRO + "".join(cards))
    print(f"wrote {path}")
