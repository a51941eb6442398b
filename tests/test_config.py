"""The typed schema and the front door: every bad value, key, preset or sweep is one line naming
the key, the value and what is allowed (exit 2), before anything runs or any folder appears."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, installed, run_cli
from omegaconf import OmegaConf

from saelab.cli import main, sweep_jobs
from saelab.config import schema
from saelab.config.compose import compose_raw
from saelab.config.job import compose, load_saved
from saelab.config.rules import validate
from saelab.errors import ConfigError

LANDED = Path(__file__).parent / "data" / "config_saelab_0.1.yaml"  # saved by saelab 0.1.0

BAD_INPUT = [
    ("model.sizes=[100,50]", "model.sizes", "784"),
    ("model.sizes=[784]", "model.sizes", "at least 2"),
    ("model.sizes=[784,0,9]", "model.sizes", "> 0"),
    ("model.sizes=[784,true]", "model.sizes[1]", "integer"),
    ("data.classes=[0,12]", "data.classes", "<= 9"),
    ("data.classes=[3,3]", "data.classes", "2 distinct"),
    ("data.classes=[3]", "data.classes", "2 distinct"),
    ("data.classes=[true,false]", "data.classes[0]", "integer"),
    ("data.name=cifar", "data.name", "mnist, fashion_mnist"),
    ("data.val_size=70000", "data.val_size", "< 30000"),
    ("pretrain.lr=0", "pretrain.lr", "> 0"),
    ("finetune.lr=-1e-3", "finetune.lr", "> 0"),
    ("finetune.lr=abc", "finetune.lr", "a number"),
    ("data.batch_size=0", "data.batch_size", "> 0"),
    ("probe.batch_size=-5", "probe.batch_size", "> 0"),
    ("baseline.epochs=-1", "baseline.epochs", ">= 0"),
    ("seed=abc", "seed", "integer"),
    ("trainer.precision=abc", "trainer.precision", "32-true"),
    ("pretrain.optimizer=lbfgs", "pretrain.optimizer", "sgd, adam, adamw"),
    ("pretrain.lrr=1e-3", "pretrain.lrr", "no such key in pretrain (the keys: saelab --help "
     "pretrain)"),
    ("lrr=1e-3", "lrr", "no such key (the keys: saelab --help)"),
    ("experiment=nope", "experiment", "sda3_mnist"),
    ("data.mirror=/nonexistent/mirror", "data.mirror", "does not exist"),
    ("data.labelled_val_per_class=5", "data.labelled_val_per_class", "labels_per_class"),
    ("finetune.dropout.hidden=1", "finetune.dropout.hidden", "< 1"),
    ("progress=sometimes", "progress", "auto, bar, lines"),
    ("model.sizes=[784,100000000]", "model.sizes", "needs at least 2.0 TiB"),
]


@pytest.mark.parametrize("override, key, allowed", BAD_INPUT)
def test_bad_config_names_key_value_and_allowed(override, key, allowed):
    with pytest.raises(ConfigError) as err:
        compose([override])
    assert err.value.key == key
    assert allowed in str(err.value)
    assert str(err.value).count("\n") == 0


def test_a_network_larger_than_the_memory_is_refused_naming_the_estimate_and_the_limit(
        monkeypatch):
    """Up front, against the machine's memory or, training on a GPU, the GPU's: the estimate is
    a lower bound (weights, fine-tuning's gradients and Adam's moments, the images)."""
    from saelab.config import costs

    sizes = [784, 100_000, 10]
    cfg = compose_raw([f"model.sizes=[{','.join(map(str, sizes))}]"])
    autoencoders = (2 * 784 * 100_000 + 784 + 100_000) + (2 * 100_000 * 10 + 100_000 + 10)
    deep = (784 * 100_000 + 100_000) + (100_000 * 10 + 10) + (10 * 10 + 10)
    images = 55_000 + 5_000 + 10_000
    # every autoencoder, the probe's network, fine-tuning's with its gradients and 2 moments
    need = 4 * (autoencoders + deep + 4 * deep + images * 784)
    assert costs.peak_bytes(cfg) == need  # 2.3 GiB
    monkeypatch.setattr(costs, "host_bytes", lambda: need - 1)
    with pytest.raises(ConfigError, match=r"least 2\.3 GiB .*; this machine has 2\.3 GiB"):
        validate(cfg)
    monkeypatch.setattr(costs, "host_bytes", lambda: need)
    validate(cfg)
    monkeypatch.setattr("saelab.config.rules.cuda_devices", lambda: 1)
    monkeypatch.setattr(costs, "gpu_bytes", lambda: 2**30)
    with pytest.raises(ConfigError, match="the GPU has 1.0 GiB"):
        validate(compose_raw([f"model.sizes=[{','.join(map(str, sizes))}]", "trainer=gpu"]))
    validate(cfg, files=False)  # a finished run read back allocates no training state


def test_costs_known_up_front_are_warned_of_in_one_line_each(tmp_path):
    from saelab.config.costs import cautions

    assert cautions(compose(["debug=quick"])) == []
    lines = cautions(compose(["debug=quick", "finetune.batch_size=1000",
                              "pretrain.epochs=1000000000"]))
    assert lines == [
        "finetune.batch_size=1000 is larger than the 600 training images it draws from: each "
        "epoch is one step over all of them",
        "scratch.batch_size=1000 is larger than the 600 training images it draws from: each "
        "epoch is one step over all of them",
        "pretrain.epochs=1000000000: the run takes 1e+10 optimiser steps, over a day even at "
        "10 µs a step; it will not finish"]
    proc = run_cli(None, "debug=quick", "finetune.batch_size=1000", "--cfg", "job")
    assert proc.returncode == 0
    assert proc.stderr.count("saelab: warning: finetune.batch_size=1000") == 1


def test_samples_are_checked_against_the_test_set_before_anything_runs():
    with pytest.raises(ConfigError, match=r"visualize.samples=\[600\]: .* test-set size 500"):
        compose(["visualize.samples=[600]", "data.test_limit=500"])
    with pytest.raises(ConfigError, match="test-set size 1989"):  # 0 vs 9 has 1,989 test digits
        compose(["visualize.samples=[1989]", "data.classes=[0,9]"])
    compose(["visualize.samples=[1988]", "data.classes=[0,9]"])


@pytest.mark.parametrize("overrides, key", [
    (["trainer=ddp", "fastpath.steps_per_item=0"], "fastpath.steps_per_item"),
    (["trainer.devices=2"], "trainer.devices"),
    (["trainer.strategy=ddp_spawn"], "trainer.strategy"),
    (["pretrain.loss=bce"], "pretrain.loss"),
    (["pretrain.sparsity.kind=kl", "model.activation=relu"], "pretrain.sparsity.kind"),
    (["pretrain.noise.levels=[0.1,0.2]"], "pretrain.noise.levels"),
    (["pretrain.noise.levels=[0.1,0.2,1.5,0.3]"], "pretrain.noise.levels.2"),
])
def test_cross_key_rules(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert err.value.key == key
    compose(["pretrain.loss=bce", "model.activation=sigmoid", "data.pixels=zero_one"])
    compose(["pretrain.noise.kind=gaussian", "pretrain.noise.levels=[0.1,0.2,1.5,0.3]"])


@pytest.mark.slow
def test_every_preset_and_group_option_composes_and_validates(monkeypatch):
    monkeypatch.setattr("saelab.config.rules.cuda_devices", lambda: 1)  # trainer=gpu: a GPU machine
    for group in ("experiment", "trainer", "logger", "data"):
        for option in sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml")):
            if (group, option) == ("logger", "mlflow") and not installed("mlflow"):
                # composed, then refused before anything runs, naming the extra to install
                with pytest.raises(ConfigError, match=re.escape("pip install -e '.[mlflow]'")):
                    compose([f"{group}={option}"])
                continue
            cfg = compose([f"{group}={option}"])
            assert isinstance(cfg.pretrain.optimizer, schema.Optimizer)


def test_scratch_follows_finetune_unless_set():
    cfg = compose(["finetune.lr=3e-3", "finetune.epochs=7"])
    assert (cfg.scratch.lr, cfg.scratch.epochs, cfg.scratch.optimizer) == (3e-3, 7, "adam")
    assert compose(["finetune.lr=3e-3", "scratch.lr=1e-2"]).scratch.lr == 1e-2


def test_a_config_saved_by_the_landed_version_loads_onto_the_schema(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(LANDED.read_text())
    cfg = load_saved(tmp_path)
    validate(cfg, files=False)
    saved = OmegaConf.load(LANDED)
    # moved keys went to their new group, kept values are kept, new keys have their defaults
    assert (cfg.fastpath.cuda_graphs, cfg.fastpath.matmul_precision) == (True, "high")
    assert "cuda_graphs" not in cfg.trainer and cfg.trainer.accelerator == "gpu"
    assert list(cfg.pretrain.noise.levels) == list(saved.pretrain.noise.levels) == [0.1, 0.2, 0.3]
    assert (cfg.seed, cfg.data.train_limit, list(cfg.model.sizes)) == (3, 2000,
                                                                       [784, 1000, 1000, 1000])
    assert cfg.data.labels_per_class is None and cfg.scratch.lr == cfg.finetune.lr == 3e-4
    assert cfg.logger.kind == "tensorboard" and cfg.finetune.dropout.input == 0.0


def test_the_docs_table_of_keys_is_generated_from_the_schema():
    text = (REPO / "docs" / "configuration.md").read_text()
    assert text == schema.markdown(), (
        "regenerate: python -m saelab.config.schema > docs/configuration.md")
    for k in schema.leaves():
        assert f"`{k.path}`" in text


# Sweeps: every job checked before anything trains --------------------------------------------

def test_a_basic_sweep_is_expanded_into_its_jobs():
    cfg = compose_raw([], hydra=True)
    jobs = sweep_jobs(cfg, ["seed=0,1", "finetune.lr=1e-3,-1"])
    assert sorted(map(tuple, jobs)) == sorted(
        (f"seed={s}", f"finetune.lr={lr}") for s in (0, 1) for lr in ("0.001", "-1"))


@pytest.mark.slow
def test_an_optuna_search_is_checked_at_each_choice_and_both_ends_of_each_interval():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_raw(["hparams_search=optuna"], hydra=True)
    jobs = sweep_jobs(cfg, ["hparams_search=optuna"])
    varied = {job[-1] for job in jobs if len(job) > 1}
    assert {"model.sizes=[784,196,49,25,9]", "model.sizes=[784,256,64]",
            "pretrain.lr=0.0001", "pretrain.lr=0.01", "pretrain.epochs=5", "pretrain.epochs=20",
            "finetune.epochs=10", "finetune.epochs=30"} <= varied
    # range(5, 25, step=5) and range(10, 40, step=10): Hydra's ranges, their ends left out
    assert not {"pretrain.epochs=25", "finetune.epochs=40"} & varied
    for job in jobs:
        validate(compose_raw(job))


def test_the_command_line_changes_the_search_space_as_the_sweeper_reads_it():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    overrides = ["hparams_search=optuna", "pretrain.epochs=range(1,3)", "finetune.epochs=7",
                 "data.val_size=range(100,400,step=100)"]
    cfg = compose_raw(["hparams_search=optuna", "finetune.epochs=7"], hydra=True)
    varied = {job[-1] for job in sweep_jobs(cfg, overrides)[1:]}
    assert {"pretrain.epochs=1", "pretrain.epochs=2", "data.val_size=100",
            "data.val_size=300"} <= varied
    assert not {"pretrain.epochs=3", "data.val_size=400", "finetune.epochs=10",
                "finetune.epochs=30"} & varied


# The command line ----------------------------------------------------------------------------

@pytest.mark.parametrize("args, key", [
    (["model.sizes=[784,0,9]"], "model.sizes"),
    (["data.classes=[0,12]"], "data.classes"),
    (["pretrain.lrr=1e-3"], "pretrain.lrr"),
    (["experiment=nope"], "experiment"),
    (["--cfg", "job", "model.sizes=[100]"], "model.sizes"),
    (["-m", "seed=0,1", "finetune.lr=1e-3,-1"], "finetune.lr"),
    (["-m", "trainer=ddp", "seed=0,1"], "trainer.strategy"),
    (["resume=/nonexistent/run"], "resume"),
    (["seed=0,1"], "seed"),
    (["--cfg", "job", "-m", "seed=0,1"], "command line"),  # Hydra's own check: a traceback
    pytest.param(["hparams_search=optuna", "pretrain.epochs=range(5,5)"], "pretrain.epochs",
                 marks=pytest.mark.skipif(not installed("hydra_plugins.hydra_optuna_sweeper"),
                                          reason="needs the [sweep] extra")),
])
def test_the_front_door_refuses_in_one_line_exit_2_and_leaves_no_folder(tmp_path, monkeypatch,
                                                                       capsys, args, key):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main([*args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sw'}"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and not out
    assert err.count("\n") == 1 and err.startswith(f"saelab: error: {key}=")
    assert list(tmp_path.iterdir()) == []  # no run folder, no sweep folder, no outputs/


def test_the_installed_command_refuses_bad_input_the_same_way(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "saelab", "finetune.lr=-1"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and not proc.stdout
    assert proc.stderr == "saelab: error: finetune.lr=-1.0: must be > 0\n"
    assert list(tmp_path.iterdir()) == []


def test_resume_into_another_folder_is_refused(tmp_path):
    (tmp_path / "x" / ".hydra").mkdir(parents=True)
    (tmp_path / "x" / ".hydra" / "config.yaml").write_text(LANDED.read_text())
    proc = run_cli(tmp_path / "y", f"resume={tmp_path / 'x'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("saelab: error: hydra.run.dir=") and "stays" in proc.stderr


@pytest.mark.parametrize("message, override, extra", [
    # Hydra's words for an option of a group and for a config a preset's defaults name
    ("In 'hparams_search/optuna': Could not find 'hydra/sweeper/optuna'",
     "hparams_search=optuna", "sweep"),
    ("In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.",
     "hydra/launcher=slurm", "slurm"),
])
def test_a_missing_plugin_names_the_extra_to_install(tmp_path, monkeypatch, message, override,
                                                     extra):
    from saelab.config import compose as composition
    from saelab.config import job

    def missing(overrides, hydra=False):
        raise composition.missing_option(message, overrides)

    monkeypatch.setattr(job, "compose_raw", missing)
    with pytest.raises(ConfigError, match=re.escape(f"pip install -e '.[{extra}]'")) as err:
        job.compose([override])
    assert err.value.key == override.split("=")[0]


@pytest.mark.parametrize("args, shown", [(["--cfg", "job", "seed=5"], "seed: 5"),
                                         (["--help"], "pretrain.lr=0.001")])
def test_cfg_job_and_help_answer_without_importing_torch(args, shown):
    code = (f"import sys, runpy; sys.argv = ['saelab', *{args!r}];\n"
            "try:\n    runpy.run_module('saelab', run_name='__main__')\n"
            "finally:\n    print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert shown in proc.stdout and proc.stdout.strip().endswith("NO-TORCH")


def help_keys(text: str) -> list[str]:
    """The keys a help text lists (its `  key=default ...` entries)."""
    return re.findall(r"^  ([\w.]+)=", text, re.M)


def test_help_lists_every_key_with_its_type_default_and_meaning(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert help_keys(out) == [k.path for k in schema.leaves()]
    assert "\n  pretrain.lr=0.001  [float, > 0]  learning rate\n" in out
    assert "\n  pretrain.optimizer=adam  [sgd | adam | adamw]  optimiser\n" in out
    assert "\n  scratch.dropout.input=${finetune.dropout.input}  [float, >= 0, < 1]" in out
    assert "\npretrain: greedy layer-wise pretraining, one autoencoder per layer\n" in out


def test_help_lists_the_installed_launchers_and_sweepers(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    launchers = re.search(r"^  hydra/launcher=(\S+)$", out, re.M).group(1).split("|")
    sweepers = re.search(r"^  hydra/sweeper=(\S+)$", out, re.M).group(1).split("|")
    assert "basic" in launchers and "basic" in sweepers
    submitit = installed("hydra_plugins.hydra_submitit_launcher")
    assert ("slurm" in launchers) == ("submitit_slurm" in launchers) == submitit
    assert ("joblib" in launchers) == installed("hydra_plugins.hydra_joblib_launcher")
    assert ("optuna" in sweepers) == installed("hydra_plugins.hydra_optuna_sweeper")


def test_help_names_the_extra_of_each_plugin_that_is_not_installed(capsys, monkeypatch):
    from hydra.core.config_store import ConfigStore

    from saelab import cli

    monkeypatch.setattr(cli, "find_spec", lambda name: None)
    monkeypatch.setattr(ConfigStore, "list", lambda self, path: [])
    main(["--help"])
    out = capsys.readouterr().out
    assert "\n  hydra/launcher=basic\n  hydra/sweeper=basic\n" in out
    assert ("  not installed: hydra/sweeper=optuna (pip install -e '.[sweep]'), "
            "hydra/launcher=joblib (pip install -e '.[sweep]'), hydra/launcher=submitit_slurm "
            "(pip install -e '.[slurm]'), hydra/launcher=slurm (pip install -e '.[slurm]')\n"
            ) in out


@pytest.mark.parametrize("group, presets", [("pretrain", None),
                                            ("trainer", "trainer=cpu|ddp|default|gpu")])
def test_help_for_one_group_lists_only_its_keys_and_presets(capsys, group, presets):
    main(["--help", group])
    out = capsys.readouterr().out
    assert help_keys(out) == [k.path for k in schema.leaves() if k.path.startswith(f"{group}.")]
    assert out.startswith(f"{group}: {schema.sections()[group]}\n")
    assert ("presets: " in out) == (presets is not None)
    if presets:
        assert out.endswith(f"\npresets: {presets}\n")


def test_help_for_a_preset_group_lists_its_presets(capsys):
    main(["-h", "experiment"])
    assert capsys.readouterr().out == ("presets: experiment=" + "|".join(sorted(
        p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))) + "\n")


def test_help_for_an_unknown_group_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help", "pretrian"])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and not out
    assert err.startswith("saelab: error: --help='pretrian': no such group; the groups: ")
    assert err.count("\n") == 1 and "pretrain, probe" in err and "experiment" in err


def test_help_lists_the_presets_from_their_files_and_version_is_saelabs():
    from saelab import __version__

    proc = subprocess.run([sys.executable, "-m", "saelab", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0 and "powered by Hydra" not in proc.stdout
    for preset in (REPO / "conf" / "experiment").glob("*.yaml"):
        assert preset.stem in proc.stdout
    assert "saelab-report" in proc.stdout and "outputs/runs" in proc.stdout
    version = subprocess.run([sys.executable, "-m", "saelab", "--version"], capture_output=True,
                             text=True, cwd=REPO, timeout=60)
    assert version.stdout.strip() == f"saelab {__version__}"
