"""Tests never see a developer's pyiceberg configuration (~/.pyiceberg.yaml, PYICEBERG_* variables),
nor do the workers they start: conftest imports this before pyiceberg, which reads it once, at import."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

for _key in [k for k in os.environ if k.startswith("PYICEBERG_")]:
    del os.environ[_key]

# pyiceberg takes the first .pyiceberg.yaml of PYICEBERG_HOME, ~ and the working directory: this
# one, which names no catalog.
PYICEBERG_HOME = tempfile.mkdtemp(prefix="streamapp-tests-pyiceberg-")
with open(os.path.join(PYICEBERG_HOME, ".pyiceberg.yaml"), "w") as f:
    f.write("default-catalog: none\n")
os.environ["PYICEBERG_HOME"] = PYICEBERG_HOME
atexit.register(shutil.rmtree, PYICEBERG_HOME, True)
