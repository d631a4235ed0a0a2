"""Test set-up shared by every test file.

- ``tests/`` is importable, so test modules can ``from helpers import ...``.
- Without CUDA, Triton's CPU interpreter is switched on (``TRITON_INTERPRET=1``, unless the caller
  set it) before anything imports triton: Triton decides when a kernel is decorated whether to
  interpret it, so every test file can run the Triton backends on the CPU.
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

if not torch.cuda.is_available():
    if "triton" in sys.modules and "TRITON_INTERPRET" not in os.environ:
        raise RuntimeError("triton was imported before tests/conftest.py could set TRITON_INTERPRET=1")
    os.environ.setdefault("TRITON_INTERPRET", "1")
