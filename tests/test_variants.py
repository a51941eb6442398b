"""The autoencoder variants (denoising, sparsity, the contractive penalty, tied weights,
activations) and the reproduction presets, on real MNIST slices."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import TINY, compose_cfg, layers, run_cli
from torch.nn import functional as F

from saelab.config.job import compose
from saelab.data.splits import load_splits
from saelab.data.transforms import corrupt
from saelab.errors import ConfigError
from saelab.nn.modules import AutoencoderModule, kl_sparsity, make_optimizer
from saelab.nn.networks import ACTIVATIONS, AutoEncoder

PRESETS = ["sae3_mnist", "sda3_mnist", "fashion_default", "fashion_sda3"]


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """2,000 real training digits in [-1, 1]."""
    cfg = compose_cfg(*TINY, "data.train_limit=2000")
    return load_splits(cfg.data, seed=0).train_x


def pretrain_stage(ae: AutoEncoder, *overrides: str) -> AutoencoderModule:
    return AutoencoderModule(ae, compose_cfg(*overrides).pretrain, "pretrain layer 1", "layer1")


@pytest.mark.parametrize("level", [0.1, 0.25, 0.5])
def test_masking_sets_the_requested_fraction_to_background(digits, level):
    torch.manual_seed(0)
    noisy = corrupt(digits, "masking", level, background=-1.0)
    ink = digits != -1.0  # background pixels stay background whether hit or not
    hit = ink & (noisy == -1.0)
    assert abs(hit.sum() / ink.sum() - level) < 0.01
    assert torch.equal(noisy[~hit], digits[~hit])


def test_gaussian_and_salt_pepper_corruption(digits):
    torch.manual_seed(0)
    assert abs(float((corrupt(digits, "gaussian", 0.3, -1.0) - digits).std()) - 0.3) < 0.01
    noisy = corrupt(digits, "salt_pepper", 0.2, -1.0)
    changed = noisy != digits
    assert set(noisy[changed].unique().tolist()) <= {-1.0, 1.0}
    # a hit pixel changes unless it already holds the drawn extreme: most MNIST pixels are -1
    assert 0.08 < float(changed.float().mean()) < 0.2


def test_denoising_loss_reconstructs_the_clean_input(digits):
    torch.manual_seed(0)
    stage = pretrain_stage(AutoEncoder(784, 64), "pretrain.noise.kind=masking",
                           "pretrain.noise.level=0.5")
    x = digits[:256]
    torch.manual_seed(1)
    loss = stage.loss(x)
    torch.manual_seed(1)
    out = stage.model(corrupt(x, "masking", 0.5, -1.0))
    assert torch.equal(loss, F.mse_loss(out, x))
    assert not torch.allclose(loss, F.mse_loss(out, corrupt(x, "masking", 0.5, -1.0)))


def test_per_layer_noise_levels_replace_the_level():
    stage = AutoencoderModule(AutoEncoder(784, 64), compose_cfg().pretrain, "l2", "l2",
                             noise_level=0.2)
    assert stage.noise_level == 0.2
    with pytest.raises(ConfigError) as err:
        compose(["pretrain.noise.levels=[0.1,0.2]"])
    assert err.value.key == "pretrain.noise.levels" and "list of 4 levels" in str(err.value)
    with pytest.raises(ConfigError) as err:
        compose(["pretrain.noise.levels=[0.1,0.2,1.5,0.3]"])
    assert err.value.key == "pretrain.noise.levels.2" and "<= 1" in str(err.value)


@pytest.mark.parametrize("low", [-1.0, 0.0])
def test_kl_penalty_is_zero_at_target_and_positive_elsewhere(low):
    target = 0.05
    at_target = torch.full((32, 16), low + target * (1 - low))  # mean activation == target
    assert float(kl_sparsity(at_target, target, low)) == pytest.approx(0.0, abs=1e-6)
    for rho in (0.01, 0.2, 0.9):
        codes = torch.full((32, 16), low + rho * (1 - low))
        assert float(kl_sparsity(codes, target, low)) > 0.01


def test_sparsity_penalties_add_to_the_reconstruction_loss(digits):
    torch.manual_seed(0)
    ae, x = AutoEncoder(784, 64), digits[:256]
    plain = pretrain_stage(ae).loss(x)
    codes = ae.encode(x)
    l1 = pretrain_stage(ae, "pretrain.sparsity.kind=l1", "pretrain.sparsity.weight=0.5").loss(x)
    assert torch.allclose(l1 - plain, 0.5 * codes.abs().mean())
    kl = pretrain_stage(ae, "pretrain.sparsity.kind=kl", "pretrain.sparsity.weight=0.1").loss(x)
    assert torch.allclose(kl - plain, 0.1 * kl_sparsity(codes, 0.05, -1.0))


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))  # each needs its slope in SLOPES
def test_contraction_is_the_squared_norm_of_the_encoders_jacobian(digits, activation, tied):
    torch.manual_seed(0)
    ae, x = AutoEncoder(784, 32, activation, tied), digits[:8]
    jacobians = torch.func.vmap(torch.func.jacrev(ae.encode))(x)  # (8, 32, 784)
    assert jacobians.pow(2).sum((1, 2)).mean() > 0
    assert torch.allclose(ae.contraction(x, ae.encode(x)), jacobians.pow(2).sum((1, 2)).mean(),
                          rtol=1e-5)


def test_contractive_penalty_adds_to_the_loss_and_contracts_the_encoder(digits):
    torch.manual_seed(0)
    ae, x = AutoEncoder(784, 64), digits[:256]
    plain = pretrain_stage(ae).loss(x)
    penalised = pretrain_stage(ae, "pretrain.contractive.weight=0.3").loss(x)
    assert torch.allclose(penalised - plain, 0.3 * ae.contraction(x, ae.encode(x)))
    # The same start and minibatches with and without the penalty: the penalised encoder's
    # Jacobian is smaller on images it did not train on, and its codes still say more about them
    # than nothing (a reconstruction better than the mean training image).
    train, held_out = digits[:1500], digits[1500:]
    trained = {}
    for weight in (0.0, 0.003):
        torch.manual_seed(1)
        ae = AutoEncoder(784, 64)
        stage = pretrain_stage(ae, f"pretrain.contractive.weight={weight}")
        opt = make_optimizer([{"params": list(ae.parameters())}], stage.cfg)
        for batch in train.split(100) * 4:
            opt.zero_grad()
            stage.loss(batch).backward()
            opt.step()
        with torch.no_grad():
            trained[weight] = (float(ae.contraction(held_out, ae.encode(held_out))),
                               float(F.mse_loss(ae(held_out), held_out)))
    assert trained[0.003][0] < 0.5 * trained[0.0][0]  # measured: 1.75 against 5.28
    mean_image = float(F.mse_loss(train.mean(0).expand_as(held_out), held_out))
    assert trained[0.003][1] < mean_image - 0.01  # measured: 0.249 against 0.265


def test_tied_weights_share_storage_and_train(digits):
    torch.manual_seed(0)
    ae = AutoEncoder(784, 64, tied=True)
    assert ae.decoder_weight.data_ptr() == ae.encoder.weight.data_ptr()
    assert sum(p.numel() for p in ae.parameters()) == 784 * 64 + 64 + 784
    stage = pretrain_stage(ae, "pretrain.optimizer=adam", "pretrain.lr=1e-3")
    opt = make_optimizer([{"params": list(ae.parameters())}], stage.cfg)
    before = ae.encoder.weight.detach().clone()
    losses = []
    for batch in digits.split(100) * 3:
        opt.zero_grad()
        loss = stage.loss(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])
    assert not torch.equal(ae.encoder.weight, before)
    assert ae.decoder_weight.data_ptr() == ae.encoder.weight.data_ptr()
    assert torch.equal(ae.decoder_weight, ae.encoder.weight.t())


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", "relu"])
def test_activation_choice_sets_the_code_range(digits, activation):
    with torch.no_grad():
        codes = AutoEncoder(784, 64, activation).encode(digits[:256])
    ranges = {"tanh": (-1.0, 1.0), "sigmoid": (0.0, 1.0), "relu": (0.0, float("inf"))}
    low, high = ranges[activation]
    assert low <= float(codes.min()) and float(codes.max()) <= high
    assert (float(codes.min()) < 0) == (activation == "tanh")
    assert bool((codes == 0).any()) == (activation == "relu")


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_use_the_papers_split_and_networks(preset):
    cfg = compose([f"experiment={preset}"])
    assert cfg.data.val_size == 10_000 and cfg.data.train_limit is None
    assert cfg.data.name == ("fashion_mnist" if preset.startswith("fashion") else "mnist")
    sizes = [784, 196, 49, 25, 9] if preset == "fashion_default" else [784, 1000, 1000, 1000]
    assert list(cfg.model.sizes) == sizes
    denoising = preset in ("sda3_mnist", "fashion_sda3")
    assert (cfg.pretrain.noise.kind, cfg.pretrain.noise.level) == (
        ("masking", 0.25) if denoising else ("none", 0.0))


def test_cae2_preset_is_the_papers_contractive_network():
    cfg = compose(["experiment=cae2_mnist"])
    assert cfg.data.val_size == 10_000 and cfg.data.train_limit is None
    assert list(cfg.model.sizes) == [784, 1000, 1000] and cfg.model.tied
    assert (cfg.model.activation, cfg.data.pixels, cfg.pretrain.loss) == (
        "sigmoid", "zero_one", "bce")
    assert cfg.pretrain.contractive.weight > 0 and cfg.pretrain.noise.kind == "none"


@pytest.mark.slow
def test_sda3_preset_runs_tiny_with_per_layer_noise(tmp_path):
    epochs = [f"{stage}.epochs=1" for stage in ("baseline", "pretrain", "probe", "finetune")]
    proc = run_cli(tmp_path / "run", "experiment=sda3_mnist", "pretrain.noise.levels=[0.1,0.2,0.3]",
                   "data.train_limit=2000", "data.val_size=500", "data.test_limit=1000",
                   "trainer.accelerator=cpu", "visualize.enabled=false", "scratch.epochs=0",
                   *epochs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [(p["in"], p["out"], p["noise_level"]) for p in layers(m)] == [
        (784, 1000, 0.1), (1000, 1000, 0.2), (1000, 1000, 0.3)]
    assert m["finetune"]["test_acc"] > 0.8
