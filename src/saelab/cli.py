"""The command line: `saelab [overrides] [-m]`.

Before Hydra starts anything (a folder, a log, a job), the front door composes the config of every
job through Hydra's Compose API (a basic sweep expanded into its jobs; for an Optuna search each
choice and both ends of each interval or range, as the sweeper reads them), checks it, and
resolves `resume=RUN_DIR`. A bad value, an unknown key or preset, a missing plugin: one line
naming the key, the value and what is allowed, exit 2, nothing left behind. Only then does Hydra
run the jobs, in `hydra_main`. Nothing here imports torch before a job starts, so `--help`,
`--cfg job` and shell completion answer at once.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import pkgutil
import sys
import time
import warnings
from contextlib import nullcontext
from importlib.resources import files
from importlib.util import find_spec
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from saelab import __version__
from saelab.config import schema
from saelab.config.compose import (
    CONFIG_MODULE,
    PLUGINS,
    VERSION_BASE,
    compose_raw,
    config_groups,
    without_hydra,
)
from saelab.config.costs import warn
from saelab.config.job import job_config
from saelab.config.rules import check_folder, check_paths, validate
from saelab.config.schema import Logger, Strategy, register
from saelab.errors import ConfigError, Interrupted, NonFiniteLossError
from saelab.report.sweep import SweepSummary
from saelab.runs.folder import RunFolder
from saelab.signals import STOP, install, sweep_handled

log = logging.getLogger("saelab")
STARTED = time.perf_counter()  # about when the command started: the table's start-up row

# Third-party chatter a run would print, silenced narrowly (by message and category/logger).
QUIET_WARNINGS = [(r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
                  # Lightning, on any machine with SLURM's commands, outside a SLURM job
                  (r"The `srun` command is available on your system but is not used", UserWarning)]
QUIET_LOGGERS = ("pytorch_lightning.trainer.connectors.signal_connector",
                 "alembic.runtime.plugins",  # alembic >= 1.18's "setup plugin" lines
                 "mlflow.store.db.utils")  # "Creating initial MLflow database tables..."


def quiet() -> None:
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# The front door


def is_data_parallel_child() -> bool:
    """A data-parallel rank above 0, which Lightning starts by re-running this command line: the
    parent has checked it, and it writes nothing."""
    return any(os.environ.get(v, "0") != "0" for v in ("LOCAL_RANK", "RANK"))


def is_optuna(cfg: DictConfig) -> bool:
    """Whether the config's sweeper is the Optuna search (not the basic one)."""
    return "optuna" in str(cfg.hydra.sweeper.get("_target_", "")).lower()


def sweep_jobs(cfg: DictConfig, overrides: list[str]) -> list[list[str]]:
    """The overrides of every job of a sweep to check: a basic sweep's jobs; for the Optuna
    sweeper, each choice and both ends of each distribution, one parameter at a time. The
    distributions are the sweeper's own reading of the search space (a range's end is not in
    it), so the values checked are the bounds of those it samples. Raises ConfigError for a
    parameter the sweeper cannot read (an empty range, a zero step)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    if not is_optuna(cfg):
        return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    params = {k: str(v) for k, v in (cfg.hydra.sweeper.get("params") or {}).items()}
    # as the sweeper reads them: the command line's sweeps join the space, its fixed values
    # take their key out of it
    params |= {o.key_or_group: o.input_line.split("=", 1)[1] for o in parsed
               if o.is_sweep_override() or o.key_or_group in params}
    jobs = [fixed]
    for key, spec in params.items():
        (o,) = parser.parse_overrides([f"{key}={spec}"])
        if not o.is_sweep_override():
            jobs.append([*fixed, o.input_line])
            continue
        try:
            distribution = create_optuna_distribution_from_override(o)
        except ValueError as exc:
            raise ConfigError(key, spec, str(exc)) from None
        # a choice's options (as override text, the sweeper's encoding) or the two ends
        values = getattr(distribution, "choices", None) or (distribution.low, distribution.high)
        jobs += [[*fixed, f"{key}={v}"] for v in values]
    return jobs


# The configs the front door composed and checked, by their job's overrides (Hydra's own aside):
# a job that Hydra runs in this process takes its config from here instead of composing and
# checking it again (a job in another process, or an Optuna trial, composes its own).
CHECKED: dict[tuple[str, ...], tuple[DictConfig, list[str]]] = {}


def task(overrides: list[str]) -> tuple[str, ...]:
    """A job's overrides as Hydra lists them for the task (without Hydra's own)."""
    return tuple(o for o in overrides if not o.lstrip("+~").startswith("hydra"))


def front_door(multirun: bool, overrides: list[str]) -> tuple[list[str], bool]:
    """Check every job's config (and keep it in CHECKED); return the overrides to hand Hydra (a
    resumed run's folder pinned with `hydra.run.dir`) and whether it is a sweep. Raises
    ConfigError."""
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:  # noqa: BLE001 - Hydra's grammar errors, made one line
        raise ConfigError("overrides", " ".join(overrides), str(exc).splitlines()[0]) from None
    sweeps = [o for o in parsed if o.is_sweep_override()]
    cfg = compose_raw([o.input_line for o in parsed if not o.is_sweep_override()], hydra=True)
    if not (multirun or cfg.hydra.mode == RunMode.MULTIRUN):
        if sweeps:
            raise ConfigError(sweeps[0].key_or_group, sweeps[0].input_line.split("=", 1)[1],
                              "a sweep needs -m (a list is written [a,b])")
        job, hydra_node = without_hydra(cfg)
        job, recorded = job_config(overrides, job)
        prepare([job])
        CHECKED[task(overrides)] = job, list(task(recorded))  # the folder records the task's
        if job.resume is not None:
            return [*overrides, f"hydra.run.dir={Path(job.resume).expanduser().resolve()}"], False
        check_folder("hydra.run.dir", hydra_node.run.dir)
        return overrides, False
    if cfg.resume is not None:
        raise ConfigError("resume", cfg.resume, "continues one run: not in a multirun (-m)")
    if is_optuna(cfg) and cfg.hydra.sweeper.n_trials < 1:
        raise ConfigError("hydra.sweeper.n_trials", cfg.hydra.sweeper.n_trials, "must be > 0")
    jobs = {task(job): compose_raw(job) for job in sweep_jobs(cfg, overrides)}
    for job in jobs.values():
        validate(job)
        if is_optuna(cfg) and job.data.val_size == 0:
            raise ConfigError("data.val_size", 0, "must be > 0 with an Optuna search: it "
                              "maximises the fine-tuned validation accuracy")
        if job.trainer.strategy == Strategy.ddp:
            # Lightning starts ranks > 0 by re-running the command line, which would be a sweep.
            raise ConfigError("trainer.strategy", "ddp", "runs in single runs only, not in a "
                              "multirun (-m): Lightning re-launches the command line per rank")
    prepare(list(jobs.values()))
    check_folder("hydra.sweep.dir", cfg.hydra.sweep.dir)
    if not is_optuna(cfg):  # the very jobs Hydra will run (an Optuna search's are drawn as it goes)
        CHECKED.update({key: (job, list(key)) for key, job in jobs.items()})
    # Hydra 1.4 reads the mode from the primary config and the command line only: the MULTIRUN
    # of a preset (hparams_search=optuna) goes on the command line
    if multirun or any(o.key_or_group == "hydra.mode" for o in parsed):
        return overrides, True
    return [*overrides, "hydra.mode=MULTIRUN"], True


def prepare(jobs: list[DictConfig]) -> None:
    """What the jobs share must exist before they start: the folders they write outside their
    own, an MLflow store and experiment."""
    for job in jobs:
        check_paths(job)
    warn(jobs)
    stores = {(j.logger.tracking_uri, j.logger.experiment): j for j in jobs
              if j.logger.kind == Logger.mlflow}
    if stores:
        from saelab.experiment.loggers import prepare_mlflow

        for job in stores.values():
            try:
                prepare_mlflow(job)
            except Exception as exc:  # noqa: BLE001 - MLflow's many ways to refuse a store
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
                raise ConfigError("logger.tracking_uri", job.logger.tracking_uri,
                                  f"cannot open the MLflow store ({reason})") from None


def help_text(group: str | None = None) -> str:
    """saelab's help: the template in conf/config.yaml (`hydra.help`) with the config groups and
    their options listed from the files, the launchers and sweepers, and every key from the
    schema; with `group`, that group's keys and presets only. Rendered here rather than by Hydra,
    whose `--help` composes every option of every group first (about a second)."""
    groups = config_groups()
    if group is not None:
        sections = schema.sections()
        if group not in sections and group not in groups:
            raise ConfigError("--help", group, "no such group; the groups: "
                              f"{', '.join(sorted(sections.keys() | groups.keys()))}")
        presets = f"presets: {group}={'|'.join(groups[group])}" if group in groups else ""
        return "\n".join(filter(None, (schema.text(group) if group in sections else "",
                                        presets)))
    template = OmegaConf.load(files(CONFIG_MODULE) / "config.yaml").hydra.help.template
    listing = "\n".join(f"{name}: {', '.join(options)}" for name, options in groups.items())
    return (template.replace("$APP_CONFIG_GROUPS", listing)
            .replace("$APP_PLUGINS", plugins_text()).replace("$APP_KEYS", schema.text()))


def plugins_text() -> str:
    """The launchers and sweepers installed: Hydra's basic ones, the Hydra plugins (registered by
    importing their config modules, which import neither torch nor the library they drive) and
    saelab's presets in conf/hydra/launcher whose plugin is there; then the missing ones, with
    the extra that installs them."""
    from hydra.core.config_store import ConfigStore

    namespace = find_spec("hydra_plugins")  # there once any Hydra plugin is installed
    for plugin in pkgutil.iter_modules(namespace.submodule_search_locations if namespace else []):
        if find_spec(f"hydra_plugins.{plugin.name}.config") is not None:
            importlib.import_module(f"hydra_plugins.{plugin.name}.config")
    found = {}
    for kind in ("launcher", "sweeper"):
        try:
            stored = ConfigStore.instance().list(f"hydra/{kind}")
        except OSError:  # no such group in the store: no plugin of this kind is installed
            stored = []
        names = {"basic"} | {n.removesuffix(".yaml") for n in stored if n.endswith(".yaml")}
        presets = files(CONFIG_MODULE) / "hydra" / kind
        for preset in presets.iterdir() if presets.is_dir() else ():
            needs = OmegaConf.load(preset).get("defaults", [])
            if {str(d) for d in needs} - {"_self_"} <= names:
                names.add(preset.name.removesuffix(".yaml"))
        found[f"hydra/{kind}"] = sorted(names)
    lines = [f"  {group}={'|'.join(names)}" for group, names in found.items()]
    missing = []
    for plugin, extra in PLUGINS.items():
        group, _, name = plugin.rpartition("/")
        if name not in found[group]:
            missing.append(f"{group}={name} (pip install -e '.[{extra}]')")
    return "\n".join(lines + ([f"  not installed: {', '.join(missing)}"] if missing else []))


def help_group(argv: list[str]) -> str | None:
    """The GROUP of `saelab --help GROUP` (the word after --help or -h), if any."""
    at = max(argv.index(a) for a in ("--help", "-h") if a in argv) + 1
    word = argv[at] if at < len(argv) else ""
    return word if word and not word.startswith("-") and "=" not in word else None


def main(argv: list[str] | None = None) -> None:
    """`saelab`: check at the front door, then run through Hydra."""
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--version" in argv:
        print(f"saelab {__version__}")
        return
    sweep = False
    try:
        if "--help" in argv or "-h" in argv:
            print(help_text(help_group(argv)))
            return
        register()
        args = get_args_parser().parse_args(argv)
        modes = [flag for flag, on in (("--run", args.run), ("--multirun", args.multirun),
                                       ("--cfg", args.cfg),
                                       ("--info", args.info),
                                       ("--shell-completion", args.shell_completion)) if on]
        if len(modes) > 1:  # Hydra would raise (a traceback): one line instead
            raise ConfigError("command line", " ".join(modes), "one of these at a time")
        if not (args.hydra_help or args.shell_completion or args.info
                or is_data_parallel_child()):
            checked, sweep = front_door(args.multirun, args.overrides)
            argv = [a for a in argv if a not in args.overrides] + checked
    except ConfigError as exc:
        print(f"saelab: error: {exc}", file=sys.stderr)
        sys.exit(2)
    quiet()
    sys.argv = [sys.argv[0], *argv]
    with sweep_handled() if sweep else nullcontext():
        hydra_main()
    if STOP.signum is not None:  # a sweep stopped by a signal: its summary is written
        sys.exit(128 + STOP.signum)
    # A sweep's exit status is its jobs': 1 if any was stopped (a SLURM job cancelled, say) or
    # failed, each named, the stopped ones with the command that continues them.
    for job, signum, folder in SweepSummary.stopped:
        print(f"saelab: job {job} stopped by signal {signum}: finished stages kept; continue "
              f"it with: saelab resume={folder}", file=sys.stderr)
    failed = SweepSummary.failed
    if failed:
        print(f"saelab: {len(failed)} of {SweepSummary.jobs} jobs failed: {', '.join(failed)} "
              "(their errors: summary.md)", file=sys.stderr)
    if failed or SweepSummary.stopped:
        sys.exit(1)


# ---------------------------------------------------------------------------------------------
# A job


def in_multirun() -> bool:
    """True inside a job of a sweep (`-m`), where one failing job must not end the sweep."""
    return HydraConfig.get().mode == RunMode.MULTIRUN


# Hydra 1.4 warns (1.5 refuses) when it instantiates a target from the config (here the sweep's
# summary callback) without a whitelist from the code: saelab trusts its own classes. Hydra 1.3,
# the final release the core installs, has no whitelist.
TRUSTED = ({"execution_whitelist": ["saelab.*"]}
           if "execution_whitelist" in inspect.signature(hydra.main).parameters else {})


@hydra.main(config_path="pkg://saelab.conf", config_name="config", **TRUSTED, **VERSION_BASE)
def hydra_main(cfg: DictConfig) -> float | None:
    """Run one job and return the fine-tuned validation accuracy (a sweep's objective; None
    without a validation split or when the job failed)."""
    start = STARTED if not in_multirun() else time.perf_counter()
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    if in_multirun():  # a stop request between jobs must not kill a launcher's worker
        install()
    if STOP.signum is not None:  # a sweep after a stop request: the remaining jobs do not run
        RunFolder(run_dir).discard()  # the folder Hydra made for it, with its empty log
        return None
    try:
        cfg, overrides = CHECKED.pop(tuple(hc.overrides.task), None) or job_config(
            list(hc.overrides.task), cfg)
        log.info("saelab %s: starting in %s (loading PyTorch)", __version__, run_dir)
        from saelab.api import execute  # heavy imports, once the config is known to be good

        metrics = execute(cfg, run_dir, overrides, start).metrics
    except ConfigError as exc:
        return fail(exc, "error", 2)
    except NonFiniteLossError as exc:
        return fail(exc, "stopped", 1)
    except OSError as exc:  # a full disk, a folder gone: the finished stages are kept
        log.error("job failed: %s", exc)
        return fail(ConfigError(exc.filename or "file", exc.strerror or type(exc).__name__,
                                f"finished stages kept in {run_dir}; fix it, then: saelab "
                                f"resume={run_dir}"), "failed", 1)
    except Interrupted as exc:
        print(f"saelab: stopped by signal {exc.signum}: finished stages kept in {run_dir}; "
              f"continue with: saelab resume={run_dir}", file=sys.stderr)
        if not in_multirun():
            sys.exit(exc.exit_code)
        return None
    except Exception as exc:
        if not in_multirun():
            raise
        log.exception("job failed")
        return fail(exc, "failed", 1)
    return metrics["finetune"].get("val_acc")


def fail(exc: Exception, what: str, code: int) -> None:
    """A failed job: one line and exit `code`. In a multirun the sweep goes on (the error is in
    the job's metrics.json, a row of the sweep summary) and the job returns None, which the
    Optuna sweeper records as a failed trial."""
    print(f"saelab: {what}: {exc}", file=sys.stderr)
    if not in_multirun():
        sys.exit(code)
