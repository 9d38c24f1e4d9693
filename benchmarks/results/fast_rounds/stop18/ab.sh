#!/bin/bash
# usage: ab.sh DEST NAME:TREE:RUN ...   (alternating trees in one hold of the lock: each item runs TREE's
# benchmarks/fast_rounds.py --only RUN --rounds 6 --force and copies its JSON to DEST/NAME_n.json; logs under /tmp/p12)
DEST=$1; shift
mkdir -p $DEST
n=0
for item in "$@"; do
  n=$((n+1))
  IFS=: read name tree run <<< "$item"
  echo "== $name $n ($run, $tree) start $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $DEST/log.txt
  (cd $tree && PYTHONPATH=$tree python benchmarks/fast_rounds.py --only $run --rounds 6 --force $(grep -q keep-logs benchmarks/fast_rounds.py && echo --keep-logs /tmp/p12/logs_${name}_$n) > /tmp/p12/out_${name}_$n.txt 2>&1)
  cp $tree/benchmarks/results/fast_rounds/$run.json $DEST/${name}_$n.json
  echo "== $name $n end $(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)" >> $DEST/log.txt
done
