#!/usr/bin/env bash
# Create bench/.venv-pythae: pythae 0.1.2 on top of the project's own torch.
#
# pythae pins nothing that torch 2.x breaks at import, but installing it with
# its dependencies would pull a second torch.  So: a bare venv, a .pth file
# that puts the project venv's site-packages (torch, numpy, pydantic,
# scikit-learn, scipy, tqdm, cloudpickle) on its path, then pythae with
# --no-deps plus the one light dependency the project venv lacks (imageio).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
main_python="$root/.venv/bin/python"
venv="$here/.venv-pythae"

if [ ! -x "$main_python" ]; then
    echo "setup_pythae: $main_python not found; create the project venv first" >&2
    exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
    "$main_python" -m venv "$venv"
fi
site_main="$("$main_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
site_venv="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$site_main" > "$site_venv/_aevb_main_venv.pth"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps "pythae==0.1.2" imageio
# pythae's own light dependencies that aevb does not need (resolved against the packages above)
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check "pydantic>=2" cloudpickle
"$venv/bin/python" - <<'PY'
import torch, pythae
from pythae.models import VAE, VAEConfig
from pythae.trainers import BaseTrainer, BaseTrainerConfig
print(f"pythae {pythae.__version__ if hasattr(pythae, '__version__') else '0.1.2'} with torch {torch.__version__}: ok")
PY
