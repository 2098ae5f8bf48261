#!/usr/bin/env bash
# Our decoding loop (rlhfkit/sampling.py) against several transformers releases, each in a scratch venv:
# tests/test_sampling.py (greedy == model.generate, the cache really used, a forward that drops it fails loudly).
#
#   scripts/check_transformers_versions.sh                 # the floor pyproject accepts (5.0.0) and 5.24.0
#   scripts/check_transformers_versions.sh 5.0.0 5.23.0    # any list
#
# Why: transformers 5.24 renamed the forward's `past_key_values` to `cache` (the old name deprecated until 5.40);
# a name the forward does not declare is swallowed by its **kwargs without an error, so the loop must pick the
# declared one (rlhfkit.sampling.cache_keywords) on every version pyproject allows (transformers>=5.0,<6).
# The venvs live under ${WORK:-/tmp}/rlhfkit-tf-<version> and are reused; torch is pinned like the Makefile's.
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY=${PY:-python3}
WORK=${WORK:-/tmp}
TORCH_PIN=${TORCH_PIN:-torch==2.13.0}
versions=("$@")
(( ${#versions[@]} )) || versions=(5.0.0 5.24.0)
failed=0
for version in "${versions[@]}"; do
    venv="$WORK/rlhfkit-tf-$version"
    if [[ ! -x "$venv/bin/python" ]]; then
        "$PY" -m venv "$venv"
        "$venv/bin/pip" install -q "$TORCH_PIN" "transformers==$version" tokenizers safetensors peft pyyaml pytest
    fi
    echo "== transformers $version"
    if ! (cd "$REPO_ROOT" && RLHFKIT_CACHE="$venv/rlhfkit-cache" PYTHONPATH="$REPO_ROOT" \
            "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_sampling.py); then
        echo "error: tests/test_sampling.py fails under transformers $version" >&2
        failed=1
    fi
done
exit $failed
