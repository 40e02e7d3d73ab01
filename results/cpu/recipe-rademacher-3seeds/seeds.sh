#!/bin/bash
# The recipe's local_activity runs of this folder: the CNN (5 epochs) and the MLP (10 epochs), seeds 0, 1, 2, each by
# ../recipe-3seeds/run.sh (fg-cli fit, then fg-cli test on the last epoch's checkpoint), one thread each. CFG: a folder
# holding copies of configs/cnn_local_activity.yaml and configs/mlp_local_activity.yaml with `trainer:` made absolute.
cd "$(git rev-parse --show-toplevel)"
for s in 0 1 2; do
  bash results/cpu/recipe-3seeds/run.sh cnn-rad-s$s $CFG/cnn_local_activity.yaml --seed_everything $s \
    --model.network.init_args.seed $s --data.seed $s --model.estimator.init_args.seed $s
done
for s in 0 1 2; do
  EPOCHS=10 bash results/cpu/recipe-3seeds/run.sh mlp-rad-s$s $CFG/mlp_local_activity.yaml --seed_everything $s \
    --model.network.init_args.seed $s --data.seed $s --model.estimator.init_args.seed $s
done
