#!/usr/bin/env bash
# The README's reproduction table on one GPU, in three phases:
#   1. the four presets (sae3_mnist, sda3_mnist, fashion_default, fashion_sda3) side by side: these
#      nets are small enough that one GPU keeps up with four processes;
#   2. for the 3x1000 presets, fine-tuning again at the learning rates in FT_LRS from the same
#      pretrained stages, taken from the shared store $RUNS/store (only fine-tuning and scratch
#      train); summary.json selects on validation;
#   3. the robustness study of SAE-3 against SdA-3.
# Expected on an H100: about 4-6 minutes (see the README's reproductions section).
#
#   SAELAB_MIRROR=../shared/data benchmarks/reproduce.sh [overrides for every run]
#
# Environment: OUT (bundle folder, default outputs/reproduce), RUNS (run folders, default
# outputs/reproduce_runs), TRAINER (trainer preset, default gpu: CUDA graphs, TF32; `default`
# for plain eager steps), FT_LRS (default "1e-4 1e-3"; empty: skip phase 2).
# $OUT receives summary.json (per run: test error, validation accuracy, epochs, seconds; the
# run selected on validation per preset), robustness.csv, robustness.png and runs.tar.gz (each
# run's metrics.json, config and log; no checkpoints). A run folder that already exists is
# continued (finished stages with the run's fingerprints are loaded, not retrained).
set -uo pipefail

OUT=${OUT:-outputs/reproduce}
RUNS=${RUNS:-outputs/reproduce_runs}
TRAINER=${TRAINER:-gpu}
FT_LRS=${FT_LRS-1e-4 1e-3}
PRESETS=(sae3_mnist sda3_mnist fashion_default fashion_sda3)
SWEPT=(sae3_mnist sda3_mnist fashion_sda3)

if [[ ! -d "${SAELAB_MIRROR:-}/MNIST" || ! -d "${SAELAB_MIRROR:-}/FashionMNIST" ]]; then
    echo "reproduce.sh: SAELAB_MIRROR=${SAELAB_MIRROR:-} must hold MNIST/ and FashionMNIST/" >&2
    exit 2
fi
mkdir -p "$OUT" "$RUNS"
start=$(date +%s)

# run SECONDS NAME OVERRIDES...: one saelab run in the background, into $RUNS/NAME.
# No figures: activation maximisation of 3,000 units would double a run's time.
run() {
    local limit=$1 name=$2
    shift 2
    timeout "$limit" saelab "trainer=$TRAINER" visualize.enabled=false "store=$RUNS/store" \
        "$@" "hydra.run.dir=$RUNS/$name" > "$RUNS/$name.log" 2>&1 &
}
wait_all() {
    local failed=0
    for job in $(jobs -p); do wait "$job" || failed=$((failed + 1)); done
    echo "reproduce.sh: $1 done after $(( $(date +%s) - start )) s, $failed run(s) failed"
}

for preset in "${PRESETS[@]}"; do
    run 270 "$preset" "experiment=$preset" "$@"
done
wait_all "presets"

for preset in "${SWEPT[@]}"; do
    for lr in $FT_LRS; do
        # baseline, pretraining and probe come from the store: only fine-tuning (and scratch,
        # which follows fine-tuning's learning rate) train again
        run 150 "${preset}_ftlr$lr" "experiment=$preset" "finetune.lr=$lr" "$@"
    done
done
wait_all "fine-tuning learning rates"

timeout 90 saelab-robustness "$RUNS/sae3_mnist" "$RUNS/sda3_mnist" --out "$RUNS/robustness" \
    > "$RUNS/robustness.log" 2>&1 \
    || echo "reproduce.sh: robustness study failed; see $RUNS/robustness.log" >&2
cp "$RUNS"/robustness/robustness.{csv,png} "$OUT"/ 2>/dev/null

python - "$RUNS" "$OUT/summary.json" "${PRESETS[@]}" <<'EOF'
"""Per run: data source, split, per stage test error / validation accuracy / epochs / seconds;
per preset: the run (learning rate) with the best fine-tuned validation accuracy."""
import json
import sys
from pathlib import Path

runs, out, presets = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
summary = {"runs": {}, "selected_on_validation": {}}
for path in sorted(runs.glob("*/metrics.json")):
    m = json.loads(path.read_text())
    entry = {"source": m["data"]["source"],
             "split": [m["data"][k] for k in ("n_train", "n_val", "n_test")],
             "finetune_lr": m["config"]["finetune"]["lr"],
             "pretrain_epochs": [len(layer["history"]) for layer in m.get("pretrain", [])],
             "timings": {k: round(v, 1) for k, v in m["timings"].items()}}
    for stage in ("baseline", "probe", "finetune", "scratch"):
        if stage in m:
            history = m[stage]["history"]
            best = max(history, key=lambda h: h.get("val_acc", 0))["epoch"] if history else None
            entry[stage] = {"test_error_pct": round(100 * (1 - m[stage]["test_acc"]), 2),
                            "val_acc": m[stage].get("val_acc"), "epochs_run": len(history),
                            "best_epoch": best, "seconds": round(m[stage]["seconds"], 1)}
    summary["runs"][path.parent.name] = entry
for preset in presets:
    tried = {name: e for name, e in summary["runs"].items()
             if (name == preset or name.startswith(f"{preset}_ftlr")) and "finetune" in e}
    if tried:
        name = max(tried, key=lambda n: tried[n]["finetune"]["val_acc"])
        summary["selected_on_validation"][preset] = {
            "run": name, "finetune_lr": tried[name]["finetune_lr"],
            "val_acc": tried[name]["finetune"]["val_acc"],
            "test_error_pct": tried[name]["finetune"]["test_error_pct"]}
out.write_text(json.dumps(summary, indent=2))
print(json.dumps(summary["selected_on_validation"], indent=2))
EOF

tar czf "$OUT/runs.tar.gz" --exclude=checkpoints --exclude=tensorboard -C "$RUNS" .
echo "reproduce.sh: done in $(( $(date +%s) - start )) s; outputs in $OUT"
