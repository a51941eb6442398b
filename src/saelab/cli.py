"""Command line: `saelab [overrides]` composes the Hydra config and runs the experiment."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from saelab.config import validate
from saelab.errors import ConfigError, NonFiniteLossError

log = logging.getLogger("saelab")


def resolve_resume(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """The config and folder of the run to continue, or of a new run."""
    if not cfg.resume:
        return cfg, Path(HydraConfig.get().runtime.output_dir)
    run_dir = Path(cfg.resume).expanduser().resolve()
    saved = run_dir / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise ConfigError("resume", cfg.resume, "must be a run folder holding .hydra/config.yaml")
    log.info("resuming %s with its saved config", run_dir)
    return OmegaConf.load(saved), run_dir


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


@hydra.main(version_base="1.3", config_path="pkg://saelab.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float:
    from saelab.pipeline import run_experiment  # heavy imports after argument parsing

    try:
        cfg, out_dir = resolve_resume(cfg)
        validate(cfg)
        run = run_experiment(cfg, out_dir)
    except ConfigError as exc:
        print(f"saelab: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as exc:
        print(f"saelab: stopped: {exc}", file=sys.stderr)
        sys.exit(1)
    print(summary_table(run.metrics, out_dir))
    return run.metrics["finetune"].get("val_acc", float("nan"))


def main() -> None:
    hydra_main()
