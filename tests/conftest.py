import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import save_tiny_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random fp32 tiny Qwen2-Audio saved by transformers (single safetensors file)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_gqa_checkpoint(tmp_path_factory) -> Path:
    """Grouped-query attention, a rope_theta and rms_norm_eps unlike the 7B's, sharded into several files."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gqa"), seed=1, gqa=True, rope_theta=123456.0,
                                rms_norm_eps=3e-6, max_shard_size="1MB")
