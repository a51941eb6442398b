"""The convolutional kind (model.kind=conv): its autoencoder, its stack, its keys and shape checks,
a finished conv run read back, and its pictures, on real MNIST slices."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from helpers import QUICK, compose_cfg, folder_state, run_cli

import saelab
from saelab.api import execute
from saelab.config.rules import validate
from saelab.errors import ConfigError
from saelab.experiment.fingerprints import fingerprinted
from saelab.nn.evaluation import in_chunks
from saelab.nn.networks import ACTIVATIONS, ConvAutoEncoder, StackedNet
from saelab.report.build import build_report
from saelab.report.export import main as encode_main
from saelab.report.robustness import main as robustness
from saelab.runs.folder import RunFolder

# Two small convolutional layers: 4 maps of 14 x 14 (5 x 5 filters, pooled by 2), then 6 maps of
# 7 x 7 (3 x 3, pooled by 2).
CONV = ["model.kind=conv", "model.conv.channels=[4,6]", "model.conv.kernels=[5,3]",
        "model.conv.pools=[2,2]"]
SMALL = [*QUICK, "semisup.epochs=1"]  # and model.sizes, which a conv stack does not read


@pytest.fixture(scope="module")
def conv_run(tmp_path_factory):
    """A finished two-layer conv run with every stage (scratch, semi-supervised), no figures."""
    run_dir = tmp_path_factory.mktemp("conv") / "run"
    return execute(saelab.compose([*SMALL, *CONV]), run_dir)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("shape, pool", [((1, 28, 28), 2), ((3, 14, 14), 1), ((3, 14, 14), 7)])
def test_the_conv_autoencoder_reconstructs_its_own_inputs_shape(tied, shape, pool):
    ae = ConvAutoEncoder(shape, 5, 3, pool, tied=tied)
    x = torch.randn(4, int(np.prod(shape)))
    side = shape[1] // pool
    assert ae.shapes == (shape, (5, side, side))
    assert ae.encode(x).shape == (4, 5 * side * side)
    assert ae(x).shape == x.shape
    # tied: the decoder's filters are the encoder's own tensor, no copy
    assert (ae.decoder_weight is ae.encoder.weight) == tied


def test_pooling_before_the_activation_is_the_usual_conv_activation_pool():
    ae = ConvAutoEncoder((1, 28, 28), 4, 5, 2, "tanh")
    x = torch.randn(3, 784)
    usual = torch.nn.functional.max_pool2d(torch.tanh(ae.encoder.maps(x)), 2).flatten(1)
    torch.testing.assert_close(ae.encode(x), usual)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("pool", [1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_the_conv_contraction_equals_autograds_jacobian(activation, pool, tied):
    torch.manual_seed(0)
    ae = ConvAutoEncoder((2, 8, 8), 3, 3, pool, activation, tied).double()
    x = torch.randn(5, 128, dtype=torch.double)
    jacobians = torch.func.vmap(torch.func.jacrev(lambda v: ae.encode(v[None])[0]))(x)
    closed = ae.contraction(x, ae.encode(x))
    torch.testing.assert_close(closed, jacobians.pow(2).sum((1, 2)).mean())


def test_the_stacked_cnn_computes_each_greedy_layers_codes(conv_run):
    data, aes = conv_run.data, conv_run.autoencoders
    x = data.test_x[:200]
    stack = StackedNet.from_autoencoders(aes, None)
    greedy = x
    for k, ae in enumerate(aes, start=1):
        greedy = ae.encode(greedy)
        torch.testing.assert_close(stack.codes(x, k), greedy, rtol=0, atol=0)
    assert [ae.shapes[1] for ae in aes] == [(4, 14, 14), (6, 7, 7)]
    # every stage of the plan ran, and the report records each layer's shape
    m = conv_run.metrics
    assert [m[f"pretrain_layer{k}"]["shape"] for k in (1, 2)] == [[4, 14, 14], [6, 7, 7]]
    assert {"baseline", "probe_layer1", "probe", "finetune", "scratch", "semisup"} <= m.keys()


def test_a_finished_conv_run_loads_read_only_and_encodes_what_the_run_computed(conv_run,
                                                                               tmp_path):
    before = folder_state(conv_run.dir)
    run = saelab.load_run(conv_run.dir)
    data = conv_run.data
    for k in (1, 2):  # the codes the probes computed, in the recipe's chunks
        stack = StackedNet.from_autoencoders(conv_run.autoencoders[:k], None)
        assert torch.equal(run.encode(data.test_x, k, scaled=True),
                           in_chunks(stack.codes, data.test_x))
    maps = run.encode(data.test_x[:7], scaled=True, maps=True)
    assert maps.shape == (7, *run.shape()) == (7, 6, 7, 7)
    accuracy = float((run.predict(data.test_x, scaled=True) == data.test_y).float().mean())
    assert accuracy == conv_run.metrics["finetune"]["test_acc"]
    out = tmp_path / "codes.npz"
    encode_main([str(conv_run.dir), "--layer", "1", "--splits", "test", "--out", str(out)])
    with np.load(out) as arrays:
        assert arrays["codes_test"].shape == (len(data.test_y), 4, 14, 14)
    assert folder_state(conv_run.dir) == before


def test_the_robustness_study_reads_a_conv_run(conv_run, tmp_path):
    robustness([str(conv_run.dir), "--out", str(tmp_path)])
    rows = list(csv.DictReader((tmp_path / "robustness.csv").open()))
    clean = {r["model"]: float(r["test_acc"]) for r in rows
             if r["noise"] == "gaussian" and float(r["level"]) == 0}
    assert clean["stacked conv AE"] == pytest.approx(conv_run.metrics["finetune"]["test_acc"])


def test_each_conv_key_is_in_the_fingerprints_of_the_layers_it_shapes():
    checksums = {"file": "0"}

    def prints(*overrides):
        cfg = compose_cfg(*CONV, *overrides)
        validate(cfg, files=False)
        return {name: p.fingerprint for name, p in fingerprinted(cfg, checksums).items()}

    base = prints()
    assert base["pretrain_layer1"] != prints("model.kind=dense", "model.sizes=[784,784,294]")[
        "pretrain_layer1"]
    for key, value in [("channels", "[5,6]"), ("kernels", "[3,3]"), ("pools", "[1,2]")]:
        changed = prints(f"model.conv.{key}={value}")
        assert changed["pretrain_layer1"] != base["pretrain_layer1"], key
        assert changed["finetune"] != base["finetune"], key
    # a layer's fingerprint reads nothing of the layers above it
    above = prints("model.conv.channels=[4,8]", "model.conv.kernels=[5,5]")
    assert above["pretrain_layer1"] == base["pretrain_layer1"]
    assert above["pretrain_layer2"] != base["pretrain_layer2"]
    assert above["baseline"] == base["baseline"]


@pytest.mark.parametrize("overrides, key", [
    (["model.conv.pools=[2,3]"], "model.conv.pools.1=3: must divide the side of the maps it "
                                 "pools, 14"),
    (["model.conv.kernels=[4,3]"], "model.conv.kernels.0=4: must be odd"),
    (["model.conv.kernels=[5]"], "model.conv.kernels=[5]: must list 2 values"),
    (["model.conv.channels=[4,0]"], "model.conv.channels=[4, 0]"),
    (["pretrain.noise.levels=[0.1]"], "pretrain.noise.levels=[0.1]: must be null or a list of "
                                      "2 levels"),
])
def test_bad_conv_shapes_are_refused_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as refused:
        validate(compose_cfg(*CONV, *overrides), files=False)
    assert str(refused.value).startswith(key)


@pytest.mark.slow
def test_a_shape_that_does_not_fit_is_one_line_at_the_command_line(tmp_path):
    done = run_cli(tmp_path / "run", *CONV, "model.conv.pools=[4,2]")
    assert done.returncode == 2
    assert done.stderr.strip() == ("saelab: error: model.conv.pools.1=2: must divide the side of "
                                   "the maps it pools, 7 (layer 2: 28 x 28 pooled by the layers "
                                   "below)")
    assert not (tmp_path / "run").exists()


def test_every_figure_of_a_conv_run_renders_with_its_caption(conv_run):
    conv_run.cfg.visualize.actmax.steps = 5  # the pictures, not a good maximiser
    build_report(conv_run, RunFolder(conv_run.dir))
    figures = {p.name for p in (conv_run.dir / "figures").glob("*.png")}
    expected = {"filters_layer1.png", "layer1_reconstruction.png", "layer2_reconstruction.png",
                "stack_reconstruction.png", "features_layer1.png", "features_layer2.png",
                "features_layer2_actmax.png", "features_layer2_finetuned_actmax.png",
                "codes_2d.png", "confusion_matrix.png", "curves.png"}
    assert expected <= figures
    report = (conv_run.dir / "report.md").read_text()
    for name in figures:
        assert f"figures/{name}" in report
    assert "Layer 1 filters" in report
    assert "Layer 2 channels decoded to pixels (biases removed)" in report
    assert "1×28×28 → 4×14×14 → 6×7×7" in report
