"""Command line: `saelab [overrides]` composes the Hydra config and runs the experiment."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from saelab.config import validate, visualize_settings
from saelab.errors import ConfigError, NonFiniteLossError

log = logging.getLogger("saelab")


def load_run_config(run_dir: str, key: str) -> tuple[DictConfig, Path]:
    """The saved config and resolved folder of an existing run; `key` names the setting that
    pointed there, for the error message."""
    path = Path(run_dir).expanduser().resolve()
    saved = path / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError(key, run_dir, "must be a run folder holding .hydra/config.yaml")
    return OmegaConf.load(saved), path


def resolve_resume(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The config and folder of the run to continue, or of a new run."""
    if not cfg.resume:
        return cfg, Path(HydraConfig.get().runtime.output_dir)
    saved, run_dir = load_run_config(cfg.resume, "resume")
    log.info("resuming %s with its saved config", run_dir)
    return saved, run_dir


def summary_table(metrics: dict, out_dir: Path) -> str:
    """Baseline / probe / fine-tuned accuracies and where the outputs are."""
    data = metrics["data"]
    lines = [f"saelab: {data['name']} classes {data['classes']} "
             f"({data['n_train']} train / {data['n_val']} val / {data['n_test']} test, "
             f"source {data['source']})",
             f"{'stage':<12}{'test acc':>10}{'val acc':>10}{'time':>9}"]
    for stage in ("baseline", "probe", "finetune"):
        m = metrics[stage]
        val = f"{m['val_acc']:.2%}" if "val_acc" in m else "-"
        lines.append(f"{stage:<12}{m['test_acc']:>10.2%}{val:>10}{m['seconds']:>8.1f}s")
    lines.append(f"total {metrics['timings']['total_s']:.1f}s; outputs in {out_dir}")
    return "\n".join(lines)


def in_multirun() -> bool:
    """True inside a job of a sweep (`-m`), where one failing job must not end the sweep."""
    return HydraConfig.get().mode == RunMode.MULTIRUN


def fail(exc: Exception, what: str, code: int) -> None:
    """A failed run: one line and exit `code`. In a multirun the sweep goes on: the error is
    recorded in the job's metrics.json (a row of the sweep summary) and the job returns None,
    which the Optuna sweeper records as a failed trial (NaN would crash optuna 2's `tell`)."""
    print(f"saelab: {what}: {exc}", file=sys.stderr)
    if not in_multirun():
        sys.exit(code)
    from saelab.pipeline import record_error

    record_error(Path(HydraConfig.get().runtime.output_dir), f"{type(exc).__name__}: {exc}")


def check_launch(cfg: DictConfig) -> None:
    """Lightning's ddp starts ranks > 0 by re-running this command line, which a multirun (-m)
    would turn into a second sweep: ddp is for single runs."""
    if in_multirun() and cfg.trainer.strategy == "ddp":
        raise ConfigError("trainer.strategy", "ddp",
                          "runs in single runs only, not in a multirun (-m): Lightning re-launches "
                          "the command line for every rank")


@hydra.main(version_base="1.3", config_path="pkg://saelab.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run one experiment and return the fine-tuned validation accuracy (a sweep's objective;
    None without a validation split)."""
    from saelab.pipeline import run_experiment  # heavy imports after argument parsing
    from saelab.report import build_report

    try:
        cfg, out_dir = resolve_resume(cfg)
        validate(cfg)
        check_launch(cfg)
        run = run_experiment(cfg, out_dir)
        if run.is_main and visualize_settings(cfg).enabled:
            build_report(run)
    except ConfigError as exc:
        return fail(exc, "error", 2)
    except NonFiniteLossError as exc:
        return fail(exc, "stopped", 1)
    except Exception as exc:
        if not in_multirun():
            raise
        log.exception("job failed")
        return fail(exc, "failed", 1)
    if run.is_main:
        print(summary_table(run.metrics, out_dir))
    return run.metrics["finetune"].get("val_acc")


def main() -> None:
    hydra_main()
