#!/usr/bin/env bash
# Installs the project and runs its tests on both ends of the transformers range pyproject.toml allows:
#   1. the whole suite on the newest transformers release (an explicit upgrade, so an older copy already on the
#      machine cannot hide a break), with the other fast-moving Hugging Face libraries upgraded too;
#   2. the model, generation (captured decode too), remote-code, training and transformers-conformance tests on the
#      oldest release, in a second virtual environment (.venv-oldest): it sees this environment's packages (a .pth
#      file adds its site-packages, which works whether this one is a virtual environment or not) and holds only
#      transformers (and what that release pins) itself.
# torch is pinned to 2.13.0, the release these tests were checked with (its CPU build). From PyPI that line alone
# resolves to the CUDA build on Linux (several GB); without a GPU, install the CPU build first, which it keeps:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}

"$PYTHON" -m pip install torch==2.13.0
"$PYTHON" -m pip install -e ".[dev]"
"$PYTHON" -m pip install --upgrade "transformers<6" accelerate datasets tokenizers huggingface_hub safetensors
echo "== newest: transformers $("$PYTHON" -c 'import transformers; print(transformers.__version__)')"
"$PYTHON" -m pytest -q tests

OLDEST=$(sed -n 's/.*"transformers>=\([0-9.]*\).*/\1/p' pyproject.toml)
PARENT_SITE=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PYTHON" -m venv .venv-oldest
OLDEST_SITE=$(.venv-oldest/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "import site; site.addsitedir('$PARENT_SITE')" > "$OLDEST_SITE/_parent_environment.pth"
.venv-oldest/bin/python -m pip install -q "transformers==$OLDEST"
echo "== oldest: transformers $(.venv-oldest/bin/python -c 'import transformers; print(transformers.__version__)')"
.venv-oldest/bin/python -m pytest -q tests/test_model.py tests/test_generation.py tests/test_static_cache.py \
    tests/test_remote_code.py \
    tests/test_train.py tests/test_transformers_versions.py tests/test_bad_input.py tests/test_transformers_common.py
