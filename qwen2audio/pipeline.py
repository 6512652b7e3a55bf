"""`qwen2audio.load()`: a model folder or Hub repo id -> a ready pipeline (model, config, tokenizer, processor)."""

from pathlib import Path

import torch

from .config import GenerationConfig, Qwen2AudioConfig
from .errors import WeightsError
from .model import Qwen2AudioForConditionalGeneration
from .quantize import quantize_int8
from .weights import MODEL_FILES, load_weights


def resolve_model_path(path_or_repo_id: str | Path, quiet: bool = False) -> Path:
    """A local folder as it is; otherwise a Hub repo id, fetched (only the files the model needs) into the HF cache."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise WeightsError(f"model {name!r} is neither a folder nor a Hub repo id like 'Qwen/Qwen2-Audio-7B-Instruct'")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    except ImportError:  # pragma: no cover - a runtime dependency
        raise WeightsError("downloading from the Hub needs huggingface_hub: pip install huggingface_hub") from None
    try:
        if quiet:
            disable_progress_bars()
        return Path(snapshot_download(name, allow_patterns=MODEL_FILES))
    except Exception as e:
        raise WeightsError(f"could not fetch {name!r} from the Hugging Face Hub ({type(e).__name__}: {e}). Without "
                           "network, download the repo elsewhere and pass its local folder as the model path") from None
    finally:
        if quiet:
            enable_progress_bars()


class Qwen2Audio:
    """A loaded model with everything needed to talk to it."""

    def __init__(self, model: Qwen2AudioForConditionalGeneration, config: Qwen2AudioConfig, path: Path,
                 generation_config: GenerationConfig | None) -> None:
        self.model = model
        self.config = config
        self.path = path
        self.generation_config = generation_config or GenerationConfig()

    @property
    def device(self) -> torch.device:
        return self.model.language_model.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.model.embed_tokens.weight.dtype


def load(path: str | Path, dtype: str | torch.dtype | None = None, device: str | torch.device = "cpu",
         quantize: str | None = None, quiet: bool = False) -> Qwen2Audio:
    """Load a Qwen2-Audio checkpoint folder (or Hub repo id). dtype=None keeps the checkpoint's dtype.

    quantize="int8" swaps the decoder's linear layers for weight-only int8 after loading.
    """
    if quantize not in (None, "int8"):
        raise WeightsError(f"quantize must be None or 'int8', got {quantize!r}")
    folder = resolve_model_path(path, quiet=quiet)
    config = Qwen2AudioConfig.from_file(folder)
    model = load_weights(folder, config, dtype=dtype, device=device)
    if quantize == "int8":
        quantize_int8(model)
    return Qwen2Audio(model, config, folder, GenerationConfig.from_file(folder))
