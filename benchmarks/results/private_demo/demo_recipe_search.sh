#!/bin/bash
# demo-equivalent simulation (10 clients x 600, IID, all per round, 5 rounds, DP sample eps 1)
cd /work/main
BASE="--set dataset=fashion_mnist --set num_clients=10 --set client_selection_ratio=1.0 --set samples_per_client=600 --set data_distribution=iid --set num_rounds=5 --set local_epochs=1 --set max_test_samples=2000 --set differential_privacy=true --set dp_mode=sample --set dp_epsilon=1.0 --set dp_delta=1e-5 --set secure_aggregation=false --set momentum=0.9 --set clip_grad_norm=1.0 --set workers=2"
run() { name=$1; shift; [ -f /tmp/demo_search/$name/summary.json ] && return; /usr/bin/time -f "$name %e s" nice -n 5 python3 -m fl_server simulate --output /tmp/demo_search/$name --no-progress $BASE "$@" > /tmp/demo_search/$name.log 2>&1; python3 -c "import json;s=json.load(open('/tmp/demo_search/$name/summary.json'));print('$name', s['final_accuracy'], s['privacy']['epsilon_spent'])" >> /tmp/demo_search/results.txt; }
run tanh_h128_B128_lr0.5_cos --set model_type=tanh_cnn --set hidden_size=128 --set batch_size=128 --set learning_rate=0.5 --set lr_schedule=cosine
run tanh_h128_B128_lr1_const --set model_type=tanh_cnn --set hidden_size=128 --set batch_size=128 --set learning_rate=1.0 --set lr_schedule=constant
run cnn_B128_lr0.3_const --set model_type=cnn --set batch_size=128 --set learning_rate=0.3 --set lr_schedule=constant
run cnn_B64_lr0.05_cos --set model_type=cnn --set batch_size=64 --set learning_rate=0.05 --set lr_schedule=cosine
