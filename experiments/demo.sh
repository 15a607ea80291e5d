#!/usr/bin/env bash
# make demo: synthetic FLAME2-like data, checked and split, then the headline command --
# `mlflow run . -e distill -P teacher=resnet-152` -- at a small image size and few epochs on CPU.
# A ResNet-152 teacher is trained first (its own run), then the student is distilled from it.
set -euo pipefail
out=${1:-data/demo}; frames=${2:-400}; size=${3:-32}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///mlflow.db}

echo "== 1/3 synthetic FLAME2-like data ($frames frames) in $out"
flame-kd data synth "$out" --frames "$frames" --image-size "$size" --seed 42
flame-kd data check "$out/flame2.csv"
flame-kd data split "$out/flame2.csv" --seed 42 --out "$out/split_manifest.csv"

echo "== 2/3 mlflow run . -e distill -P teacher=resnet-152 (teacher trained first, then the student)"
mlflow run . -e distill --env-manager local --experiment-name flame-kd \
  -P teacher=resnet-152 -P loss=kl_bce -P data="$out/flame2.csv" -P image_size="$size" \
  -P batch_size=32 -P teacher_epochs=${DEMO_TEACHER_EPOCHS:-2} -P student_epochs=${DEMO_STUDENT_EPOCHS:-5} \
  -P pretrained=false -P device=cpu

echo "== 3/3 done. Browse every run, metric, plot and model with:"
echo "   .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI   # then open http://127.0.0.1:5000"
