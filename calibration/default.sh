#!/bin/sh
# The default calibration of the bundled model: 128 windows x 512 tokens of the calibration split
# (State of the Union addresses 1790-1999), ARM off and on, published Llama preset on layer 0.
# Writes calibration_report.json, figures and calibration.safetensors/.json into the checkpoint.
set -e
CKPT=${1:-ckpt/smollm2}
[ -d "$CKPT" ] || armquant convert smollm2-135m "$CKPT"
armquant calibrate "$CKPT" --data sotu:calibration --window 512 --max-windows 128 --table --overwrite
