#!/usr/bin/env bash
# Draws a run's log (OUT/log.jsonl: {"step","loss",...} and {"step","val_loss"} lines) as PNG
# curves of training and validation loss with gnuplot. Usage: train/plot.sh LOG.jsonl OUT.png
set -euo pipefail
log=${1:?usage: plot.sh LOG.jsonl OUT.png}
png=${2:-${log%.jsonl}.png}
[ -f "$log" ] || { echo "error: $log not found: train first (make train) or pass RUN=DIR to make plot" >&2; exit 1; }
command -v gnuplot >/dev/null || { echo "error: gnuplot not found: apt-get install gnuplot-nox (or run make deps as root)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# pull "step" and one field out of each JSON line (the log is flat: no nested objects)
extract() { grep "\"$1\":" "$log" | sed -E "s/.*\"step\":([0-9]+).*/\1/;t;d" > "$tmp/s" || true
            grep "\"$1\":" "$log" | sed -E "s/.*\"$1\":([-0-9.eE+]+).*/\1/" > "$tmp/v" || true
            paste "$tmp/s" "$tmp/v"; }
extract loss > "$tmp/train.dat"
extract val_loss > "$tmp/val.dat"
[ -s "$tmp/train.dat" ] || { echo "error: no training steps in $log" >&2; exit 1; }
plots="'$tmp/train.dat' using 1:2 with lines lw 1.5 title 'train loss'"
[ -s "$tmp/val.dat" ] && plots="$plots, '$tmp/val.dat' using 1:2 with linespoints lw 2 pt 7 title 'val loss'"
gnuplot <<GP
set terminal pngcairo size 1000,600 font ",11"
set output '$png'
set title "$(basename "$(dirname "$log")")"
set xlabel 'step'
set ylabel 'loss (nats/token)'
set grid
set key top right
plot $plots
GP
echo "wrote $png"
