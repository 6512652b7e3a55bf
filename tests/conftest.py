import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/helpers.py

from helpers import save_tiny_checkpoint  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n N: N processes share the cores, one thread each
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"  # and the processes the tests start (the CLI, torchrun ranks, servers)


@pytest.fixture
def one_thread():
    """Run a test on one thread: the tiny models' small products cost more in thread synchronisation than they
    gain, above all when other processes share the cores (27 training steps of the tiny model: 6 s on one thread,
    61 s on two, on this 2-core machine under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_on_one_thread():
    """A whole test module on one torch thread (`pytestmark = pytest.mark.usefixtures("module_on_one_thread")`):
    for modules whose tests compare a server or a subprocess with the pipeline, so that both sides sum their floats
    in the same order, and a tiny model runs fastest on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random fp32 tiny Qwen2-Audio saved by transformers (single safetensors file)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_gqa_checkpoint(tmp_path_factory) -> Path:
    """Grouped-query attention, a rope_theta and rms_norm_eps unlike the 7B's, sharded into several files."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny_gqa"), seed=1, gqa=True, rope_theta=123456.0,
                                rms_norm_eps=3e-6, max_shard_size="1MB")


@pytest.fixture(scope="session")
def decoder_heavy_checkpoint(tmp_path_factory) -> Path:
    """~300 MB fp32 in 100 MB shards whose decoder layers dominate (small vocabulary, 16 wide layers)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("heavy"), vocab_size=8192, hidden_size=512,
                                intermediate_size=2048, num_hidden_layers=16, num_attention_heads=8,
                                num_key_value_heads=8, bos_token_id=None, eos_token_id=None, max_shard_size="100MB")


@pytest.fixture(scope="session")
def finetune_model(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny checkpoint with the real tokenizer files: a folder `finetune` (and `chat`) can load."""
    from finetune_helpers import model_folder

    return model_folder(tiny_checkpoint, tmp_path_factory.mktemp("finetune_model"))


@pytest.fixture(scope="session")
def finetune_data(tmp_path_factory) -> Path:
    """train.jsonl: 8 lines (conversations and base-model examples) over 0.5-0.7 s test-signal clips."""
    from finetune_helpers import write_data

    return write_data(tmp_path_factory.mktemp("finetune_data"), 8)
