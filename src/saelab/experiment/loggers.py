"""The experiment logger (`logger=tensorboard|csv|mlflow`), through Lightning's logger API.

Per-epoch scalars reach any logger from `modules.EpochRecord` (`log_metrics`); the config and, at
the end of every finished run, its final metrics go through `log_hyperparams` (TensorBoard's
HPARAMS row); figures are images in TensorBoard and artifacts in MLflow (the CSV logger keeps
scalars only; the PNGs are in `figures/` either way).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger

from saelab.config.schema import Logger as Kind
from saelab.experiment.stages import plan

TENSORBOARD = "tensorboard"  # the folder of each, inside the run folder
CSV = "csv"
# The report's own TensorBoard event file, replaced when the report is rebuilt.
REPORT_SUFFIX = ".report"


def make_logger(cfg: DictConfig, run_dir: Path, report: bool = False,
                mlflow_run_id: str | None = None) -> Logger:
    """The run's logger; `report`: the one the report writes figures and final metrics with."""
    kind = cfg.logger.kind
    if kind == Kind.tensorboard:
        extra = {"filename_suffix": REPORT_SUFFIX} if report else {}
        return TensorBoardLogger(str(run_dir), name=TENSORBOARD, version="",
                                 default_hp_metric=False, **extra)
    if kind == Kind.csv:
        return CSVLogger(str(run_dir), name=CSV, version="report" if report else "")
    # One MLflow run per saelab run: the report adds to the run that training opened.
    return MLFlowLogger(experiment_name=cfg.logger.experiment,
                        tracking_uri=cfg.logger.tracking_uri, run_name=run_dir.name,
                        run_id=mlflow_run_id, tags={"run_dir": str(run_dir)},
                        artifact_location=artifact_location(cfg))


def artifact_location(cfg: DictConfig) -> str:
    return Path(cfg.logger.artifacts).expanduser().resolve().as_uri()


def prepare_mlflow(cfg: DictConfig) -> None:
    """Create the MLflow store and experiment before any job starts: jobs of a parallel sweep
    that find neither would all create them at once, and some would fail."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.logger.tracking_uri)
    if client.get_experiment_by_name(cfg.logger.experiment) is None:
        client.create_experiment(cfg.logger.experiment, artifact_location=artifact_location(cfg))


def flat_config(cfg: DictConfig) -> dict[str, int | float | str | bool]:
    """The resolved config as dotted keys; lists and nulls as JSON text (hparams take scalars)."""
    out: dict[str, int | float | str | bool] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            out[prefix[:-1]] = node if isinstance(node, int | float | str) else json.dumps(node)

    walk("", OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    return out


def mlflow_run_id(logger: Logger) -> str | None:
    """The MLflow run a logger writes to (None for the other loggers)."""
    return logger.run_id if isinstance(logger, MLFlowLogger) else None


def final_metrics(cfg: DictConfig, metrics: dict) -> dict[str, float]:
    """The numbers the jobs of a sweep are compared on: the accuracies of every classifier stage
    and the reconstruction MSE and contraction of every layer, under tags of their own (not the
    per-epoch curves), and the time spent training."""
    out, train_s = {}, 0.0
    for stage in plan(cfg):
        section = metrics.get(stage.name, {})
        for key in ("test_acc", "val_acc", "val_recon_mse", "test_recon_mse", "val_contraction"):
            if key in section:
                out[f"final/{stage.name}_{key}"] = section[key]
        train_s += section.get("seconds", 0.0)
    out["final/train_s"] = train_s
    return out


def log_final(logger: Logger, cfg: DictConfig, metrics: dict[str, float]) -> None:
    """The config with the run's real final metrics: TensorBoard's HPARAMS row (no placeholder
    `hp_metric`), the CSV's hparams.yaml and metrics, MLflow's params and metrics."""
    params = flat_config(cfg)
    if isinstance(logger, TensorBoardLogger):
        logger.log_hyperparams(params, metrics)
    else:
        logger.log_hyperparams(params)
        logger.log_metrics(metrics, step=0)
    logger.save()


def log_figure(logger: Logger, tag: str, rgb: np.ndarray, png: Path) -> None:
    """One figure: an image in TensorBoard, an artifact in MLflow."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(tag, rgb, 0, dataformats="HWC")
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, str(png), artifact_path="figures")
