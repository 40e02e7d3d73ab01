#!/bin/bash
# usage: run.sh NAME CONFIG [extra fg-cli options...]  -> trains 5 epochs in /tmp/exp/NAME, tests, prints test acc
name=$1; cfg=$2; shift 2
mkdir -p /tmp/exp/$name && cd /tmp/exp/$name
common="--data.dataset fashion_mnist --data.download false --data.root /usr/share/datasets/fashion-mnist --trainer.max_epochs ${EPOCHS:-5} --model.lr_scheduler.init_args.T_max ${EPOCHS:-5}"
OMP_NUM_THREADS=1 fg-cli fit --config $cfg $common "$@" --trainer.enable_progress_bar false > fit.log 2>&1
ck=$(ls tb_logs/*/version_0/checkpoints/epoch=$((${EPOCHS:-5}-1))-*.ckpt)
OMP_NUM_THREADS=1 fg-cli test --config $cfg $common "$@" --trainer.enable_progress_bar false --ckpt_path $ck > test.log 2>&1
echo "$name $(grep -o "test/acc.*" test.log | head -1)" >> /tmp/exp/results.txt
