"""A tiny run's figures, TensorBoard images and hparams, report.md, and `saelab-report`."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from helpers import TINY
from matplotlib.image import imread
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

import saelab
from saelab.config.job import compose
from saelab.errors import ConfigError
from saelab.report import figures as vis
from saelab.report.build import main, pictures

pytestmark = pytest.mark.slow  # every test here reads the command line's tiny run

SIZES = [784, 196, 49, 25, 9]  # the tiny run's model.sizes
LAYERS = len(SIZES) - 1


def expected_figures() -> set[str]:
    per_layer = {f"{name}.png" for k in range(1, LAYERS + 1) for name in (
        f"layer{k}_reconstruction", f"features_layer{k}", f"features_layer{k}_actmax",
        f"features_layer{k}_finetuned_actmax")}
    return per_layer | {"stack_reconstruction.png", "confusion_matrix.png", "codes_2d.png",
                        "curves.png"}


def report_events(run_dir: Path) -> EventAccumulator:
    """The report's own event file (images, hparams, final scalars), fully loaded."""
    (path,) = (run_dir / "tensorboard").glob("events.out.tfevents.*.report")
    return EventAccumulator(str(path), size_guidance={"images": 0, "scalars": 0}).Reload()


def hparams_tags(events: EventAccumulator) -> set[str]:
    try:
        return set(events.PluginTagToContent("hparams"))
    except KeyError:  # no hparams summary in this file
        return set()


def test_tiny_run_leaves_every_figure(tiny_run):
    pngs = {p.name for p in (tiny_run / "figures").glob("*.png")}
    assert pngs == expected_figures()
    panel = imread(tiny_run / "figures" / "layer1_reconstruction.png")
    assert panel.shape[0] > 500 and panel.shape[2] in (3, 4)  # ten digits, one a row


def test_every_figure_of_a_tiny_run_says_what_it_shows(tiny_run):
    """Each figure renders with a title; what it draws is labelled: units numbered from 0 in
    the unit grids and along the code strips, samples, classes, axes and the kept epochs."""
    run = saelab.load_run(tiny_run)
    figures = {p.file: p.figure for p in pictures(run, run.cfg.visualize)}
    assert set(figures) == expected_figures()
    for name, fig in figures.items():
        vis.render(fig)
        assert fig.get_suptitle() or all(ax.get_title() for ax in fig.axes if ax.images), name
    for k in range(1, LAYERS + 1):
        for name in (f"features_layer{k}", f"features_layer{k}_actmax",
                     f"features_layer{k}_finetuned_actmax"):
            fig = figures[f"{name}.png"]
            numbers = sorted(int(t.get_text()) for t in fig.axes[0].texts)
            assert numbers == list(range(SIZES[k])), name
            assert vis.UNIT_NUMBERING in fig.get_supxlabel().replace("\n", " ").lower()
        through = ("through decoder 1," if k == 1
                   else f"through decoders {', '.join(map(str, range(k, 0, -1)))},")
        assert through in figures[f"features_layer{k}.png"].get_supxlabel().replace("\n", " ")
        assert "pixel noise" in figures[f"features_layer{k}_actmax.png"].get_supxlabel()
        panel = figures[f"layer{k}_reconstruction.png"].axes[0]
        headers = [t.get_text() for t in panel.texts]  # test image, input, code, output
        assert len(headers) == (3 if k == 1 else 4) and all(headers)
        strips = [t.get_text() for t in panel.get_xticklabels()].count("0")  # units from 0
        assert strips == (1 if k == 1 else 3) and panel.get_xlabel().startswith("unit")
        assert len(panel.get_yticklabels()) == 10  # a labelled row per test image
    curves = figures["curves.png"]
    for ax in curves.axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel()
        assert all(float(t).is_integer() for t in ax.get_xticks())
        assert [line for line in ax.lines if line.get_marker() == "*"]  # kept epochs
    legend = figures["codes_2d.png"].legends[0]
    assert [t.get_text() for t in legend.texts] == [str(c) for c in range(10)]
    confusion = figures["confusion_matrix.png"].axes[0]
    assert (confusion.get_xlabel(), confusion.get_ylabel()) == ("predicted", "true")


def test_tensorboard_holds_the_images_and_an_hparams_entry_with_the_metrics(tiny_run):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    events = report_events(tiny_run)
    tags = set(events.Tags()["images"])
    assert {f"pretrain/layer{k}/{kind}" for k in range(1, LAYERS + 1)
            for kind in ("reconstruction", "features", "actmax")} <= tags
    assert {f"finetune/layer{k}/actmax" for k in range(1, LAYERS + 1)} <= tags
    assert {"stack/reconstruction", "finetune/confusion_matrix", "codes/pca",
            "summary/curves"} <= tags
    assert len(tags) == len(expected_figures())

    # the run's logger holds the HPARAMS entry with the final metrics (any logger gets them);
    # the report's own file holds the images only
    assert not hparams_tags(events)
    (run,) = [e for e in (EventAccumulator(str(p), size_guidance={"scalars": 0}).Reload()
                          for p in (tiny_run / "tensorboard").glob("events.out.tfevents.*[0-9]"))
              if hparams_tags(e)]
    assert hparams_tags(run) == {"_hparams_/experiment", "_hparams_/session_start_info",
                                 "_hparams_/session_end_info"}
    assert "hp_metric" not in run.Tags()["scalars"]
    content = run.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/experiment"]).experiment
    metric_tags = {m.name.tag for m in experiment.metric_infos}
    assert {"final/baseline_test_acc", "final/probe_test_acc", "final/finetune_test_acc",
            "final/finetune_val_acc", "final/pretrain_layer4_test_recon_mse"} <= metric_tags
    hparams = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info.hparams
    assert hparams["pretrain.epochs"].number_value == metrics["config"]["pretrain"]["epochs"]
    assert hparams["model.sizes"].string_value == "[784, 196, 49, 25, 9]"
    for stage in ("baseline", "probe", "finetune"):
        (value,) = run.Scalars(f"final/{stage}_test_acc")
        assert value.value == pytest.approx(metrics[stage]["test_acc"], abs=1e-6)
    (mse,) = run.Scalars("final/pretrain_layer2_val_recon_mse")
    assert mse.value == pytest.approx(metrics["pretrain_layer2"]["val_recon_mse"], rel=1e-6)
    (contraction,) = run.Scalars("final/pretrain_layer2_val_contraction")
    assert contraction.value == pytest.approx(metrics["pretrain_layer2"]["val_contraction"],
                                              rel=1e-6)
    assert contraction.value > 0
    assert list((tiny_run / "tensorboard").glob("*/codes%2ffinetuned/sprite.png"))


def test_report_md_embeds_every_figure_and_states_the_overrides(tiny_run):
    text = (tiny_run / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {Path(p).name for p in linked} == expected_figures()
    assert all((tiny_run / p).is_file() for p in linked)
    for override in TINY:
        assert override in text
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert f"{metrics['finetune']['test_acc']:.2%}" in text
    assert f"| {metrics['pretrain_layer1']['val_contraction']:.3g} |" in text


def test_saelab_report_rebuilds_a_finished_run_without_training(tiny_run, tmp_path, caplog):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    shutil.rmtree(run_dir / "figures")
    (run_dir / "report.md").unlink()
    kept = [run_dir / "metrics.json", *(run_dir / "checkpoints").iterdir()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept}
    with caplog.at_level(logging.INFO, logger="saelab"):
        main([str(run_dir)])
    assert {p.name for p in (run_dir / "figures").glob("*.png")} == expected_figures()
    assert (run_dir / "report.md").is_file()
    assert len(list((run_dir / "tensorboard").glob("*.report"))) == 1  # replaced, not added
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in kept} == before
    assert not any("epoch" in r.message for r in caplog.records)  # nothing trained


def test_saelab_report_refuses_a_folder_that_is_not_a_finished_run(tiny_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("saelab-report: error: RUN_DIR=")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(tiny_run, unfinished)
    (unfinished / "checkpoints" / "finetune.pt").unlink()
    with pytest.raises(SystemExit) as exit_:
        main([str(unfinished)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "not a finished run: missing checkpoints/finetune.pt" in err


@pytest.mark.parametrize("override, key", [
    ("visualize.samples=[]", "visualize.samples"), ("visualize.samples=4", "visualize.samples"),
    ("visualize.samples=[3,-1]", "visualize.samples"),
    ("visualize.actmax.norm=0", "visualize.actmax.norm"),
    ("visualize.actmax.steps=1.5", "visualize.actmax.steps"),
    ("visualize.embedding_points=-1", "visualize.embedding_points"),
    ("visualize.enabled=maybe", "visualize.enabled")])
def test_bad_visualize_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}"):
        compose([override])
