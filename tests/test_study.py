"""The fair study's guarantees, on a micro run of real MNIST: every layer probed on the right
codes; one head rule for every deep network; every arm tuned with the same budget; the
semi-supervised stage blind to every label outside the labelled subset; model selection blind to
the test set."""

from __future__ import annotations

import pytest
import torch

import saelab
from saelab.api import execute
from saelab.config.job import compose
from saelab.data.splits import load_splits
from saelab.experiment import recipe
from saelab.runs.checkpoints import read_checkpoint

ARMS = ("finetune", "scratch", "semisup")
# Two hidden layers, five labels per class, every arm on, two trials each from a small space.
MICRO = ["debug=quick", "model.sizes=[784,16,8]", "data.labels_per_class=5", "semisup.epochs=2",
         "semisup.unlabelled_batch_size=32", "semisup.threshold=0.3",
         *(f"{arm}.{k}={v}" for arm in ("finetune",) for k, v in (
             ("steps_per_epoch", 3), ("sample_with_replacement", "true"), ("epochs", 2))),
         "finetune.augment.shift=1", "tune.trials=2",
         'tune.space=["lr=tag(log,interval(1e-3,3e-2))","dropout.hidden=choice(0,0.2)",'
         '"encoder_lr_scale=choice(0.3,1)","threshold=choice(0.3,0.5)"]']


def weights(run_dir) -> dict[str, dict]:
    return {p.stem: read_checkpoint(p)["state_dict"] for p in (run_dir / "checkpoints").iterdir()}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return execute(compose(MICRO), tmp_path_factory.mktemp("micro") / "run")


def test_every_layer_is_probed_on_the_codes_the_stack_computes(micro):
    run = saelab.load_run(micro.dir)
    data = micro.data
    for k, name in ((1, "probe_layer1"), (2, "probe")):
        head = run.networks[name].head
        codes = run.encode(data.test_x, layer=k, scaled=True)
        predicted = head(codes).argmax(1)
        assert torch.equal(predicted, run.predict(data.test_x, name, scaled=True))
        accuracy = float((predicted == data.test_y).float().mean())
        assert accuracy == pytest.approx(micro.metrics[name]["test_acc"], abs=1e-6)
    assert micro.metrics["probe_layer1"]["fingerprint"] != micro.metrics["probe"]["fingerprint"]


def test_every_arm_is_tuned_with_the_same_trials_and_shares_the_keys_it_has(micro):
    trials = {arm: micro.metrics[arm]["trials"] for arm in ARMS}
    assert all(len(t) == 2 for t in trials.values())  # the budget, each arm
    for t in range(2):
        drawn = {arm: trials[arm][t]["settings"] for arm in ARMS}
        assert drawn["finetune"]["lr"] == drawn["scratch"]["lr"] == drawn["semisup"]["lr"]
        assert drawn["finetune"]["dropout.hidden"] == drawn["scratch"]["dropout.hidden"]
        assert "encoder_lr_scale" not in drawn["scratch"]  # only pretrained encoders have it
        assert "threshold" in drawn["semisup"] and "threshold" not in drawn["finetune"]
    for arm in ARMS:  # the kept trial is the best on the labelled validation images
        kept = max(trials[arm], key=lambda trial: trial["kept"]["val_acc"])
        assert micro.metrics[arm]["val_acc"] == pytest.approx(kept["kept"]["val_acc"])
        assert micro.metrics[arm]["beside"]["val_acc"] == max(
            trial["beside"]["val_acc"] for trial in trials[arm])


@pytest.mark.parametrize("rule", ["zero", "random", "probe"])
def test_both_arms_start_their_head_by_the_same_rule(tmp_path, rule):
    """With a vanishing learning rate each network ends where it started."""
    run = execute(compose(["debug=quick", f"model.head={rule}", "finetune.lr=1e-12"]),
                  tmp_path / "run")
    tuned, scratch = run.networks["finetune"].head, run.networks["scratch"].head
    if rule == "zero":
        for head in (tuned, scratch):
            assert float(head.weight.detach().abs().max()) < 1e-6
            assert float(head.bias.detach().abs().max()) < 1e-6
    elif rule == "random":  # the probe's initial head, for both
        torch.testing.assert_close(tuned.weight, scratch.weight, rtol=0, atol=1e-9)
    else:  # each from a head fitted on its own frozen stack
        torch.testing.assert_close(tuned.weight, run.networks["probe"].head.weight, rtol=0,
                                   atol=1e-9)
        assert "probe_scratch" in run.metrics and not torch.allclose(tuned.weight,
                                                                     scratch.weight)


def relabelled(change: str):
    """load_splits, then every label `change` names moved to another class."""
    def load(cfg, seed, device="cpu"):
        data = load_splits(cfg, seed, device)
        k = len(data.classes)
        if change == "unlabelled":
            keep = torch.zeros(len(data.train_y), dtype=torch.bool)
            keep[data.labelled_train] = True
            data.train_y = torch.where(keep, data.train_y, (data.train_y + 1) % k)
        else:
            data.test_y = (data.test_y + 1) % k
        return data
    return load


@pytest.mark.slow
@pytest.mark.parametrize("change", ["unlabelled", "test"])
def test_what_a_stage_must_not_see_changes_nothing_it_learns(micro, tmp_path, monkeypatch,
                                                              change):
    """Relabelling every unlabelled training image, or permuting the test labels, leaves every
    weight (the semi-supervised stage's among them) and every selected trial bit-identical."""
    monkeypatch.setattr(recipe, "load_splits", relabelled(change))
    other = execute(compose(MICRO), tmp_path / "run")
    before, after = weights(micro.dir), weights(other.dir)
    assert before.keys() == after.keys()
    for name in before:
        for key, value in before[name].items():
            assert torch.equal(after[name][key], value), (name, key)
    for arm in ARMS:
        assert [t["kept"] for t in other.metrics[arm]["trials"]] == [
            t["kept"] for t in micro.metrics[arm]["trials"]]
    if change == "test":  # what the test set says did change
        assert other.metrics["finetune"]["test_acc"] != micro.metrics["finetune"]["test_acc"]


def test_a_trial_draws_what_the_space_writes():
    from saelab.config.space import trial_settings

    space = ["epochs=range(1,3)", "lr=tag(log, interval(1e-4, 1e-2))", "optimizer=choice(adam,sgd)"]
    drawn = trial_settings(space, {"epochs", "lr", "optimizer"}, seed=0, trials=60)
    assert {d["epochs"] for d in drawn} == {1, 2}  # a range leaves its end out
    assert all(1e-4 <= d["lr"] <= 1e-2 for d in drawn)
    assert sum(d["lr"] < 1e-3 for d in drawn) > 15  # log-uniform: half the draws below 1e-3
    assert {d["optimizer"] for d in drawn} == {"adam", "sgd"}
    assert trial_settings(space, {"lr"}, 0, 60) == [{"lr": d["lr"]} for d in drawn]  # shared
