#!/usr/bin/env bash
# System packages the tests and the real-data builders use (Debian): headless Chromium for the
# report check, the openclipart-png and fashion-mnist datasets, shellcheck for the Slurm scripts.
set -euo pipefail
pkgs=(chromium openclipart-png dataset-fashion-mnist shellcheck)
missing=()
for p in "${pkgs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${missing[@]}"
fi
