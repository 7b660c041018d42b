#!/usr/bin/env bash
# What the tests need beyond Rust: a Slurm to submit to (tests/slurm.rs starts its own munged,
# slurmctld and slurmd in a temporary folder and stops them). Installs Debian's slurm-wlm when
# its programs are missing (needs root, or sudo, and apt).
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
   && command -v sbatch >/dev/null; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends slurm-wlm munge
