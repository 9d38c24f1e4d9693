#!/usr/bin/env bash
# Accuracy after 50 rounds, plain FedAvg vs CKKS aggregation, side by side (both runs at once, same machine):
# Fashion-MNIST, cnn, 100 clients, Dirichlet(0.5), 10 per round, float32 updates, no DP (configs/fmnist_dirichlet.yaml).
# Resumable: run it again after an interruption and each run continues from its last checkpoint. The run folders live in
# benchmarks/work/he_accuracy/ (ignored); config.yaml, history.csv and summary.json are copied to
# benchmarks/results/he/accuracy_<method>/ after every call (history.csv grows round by round).
#     nice -n 15 bash benchmarks/he_accuracy.sh
set -uo pipefail
cd "$(dirname "$0")/.."
work=benchmarks/work/he_accuracy
mkdir -p "$work"
run() {  # method, extra --set flags...
  local method=$1; shift
  local out=$work/$method resume=()
  [ -f "$out/config.yaml" ] && resume=(--resume)
  python3 -m fl_server simulate --config configs/fmnist_dirichlet.yaml --output "$out" "${resume[@]}" --no-progress \
    --set num_rounds=50 --set evaluation_frequency=10 --set compression=false --set differential_privacy=false "$@" \
    > "$work/$method.log" 2>&1
}
run plain --set secure_aggregation=false &
run ckks --set secure_aggregation=true --set secure_aggregation_method=ckks &
wait
for method in plain ckks; do
  mkdir -p "benchmarks/results/he/accuracy_$method"
  for f in config.yaml history.csv summary.json; do
    [ -f "$work/$method/$f" ] && cp "$work/$method/$f" "benchmarks/results/he/accuracy_$method/"
  done
done
