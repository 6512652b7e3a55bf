"""The plan of a conversion: every output tensor of the source folder, where it is read from and what becomes of
it (kept, cast, int8-quantized, or dequantized from an int8 folder), known before anything is written so that the
bytes needed can be checked against the disk first."""

from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .checkpoint import TensorEntry, checkpoint_shards, read_header, read_tensor
from .config import Qwen2AudioConfig
from .errors import WeightsError
from .quantize import int8_module_names, quantize_weight
from .weights import is_int8_checkpoint, meta_model


def read_source_tensor(path: Path, entry: TensorEntry) -> Tensor:
    with open(path, "rb") as f:  # plain reads: nothing of the source stays resident once the tensor is written
        return read_tensor(f, entry, path)


class Job(NamedTuple):
    """One output tensor: `key` from `entry` of the shard at `path`, converted to `dtype`; `quantize` adds its int8
    codes and scales; `scales` (an int8 source dequantized) names the scales to multiply the codes by."""
    key: str
    path: Path
    entry: TensorEntry
    dtype: torch.dtype
    quantize: bool = False
    scales: tuple[Path, TensorEntry] | None = None

    def nbytes(self) -> int:
        elements = int(torch.Size(self.entry.shape).numel())
        if self.quantize:
            return elements + self.entry.shape[0] * self.dtype.itemsize  # int8 codes + one scale a row
        return elements * self.dtype.itemsize

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        tensor = read_source_tensor(self.path, self.entry)
        if self.scales is not None:  # parity: what Int8Linear computes with, made a plain weight
            scales = read_source_tensor(*self.scales).to(torch.float32)
            tensor = tensor.to(torch.float32) * scales[:, None]
        tensor = tensor.to(self.dtype)
        if not self.quantize:
            yield self.key, tensor
            return
        q, scales = quantize_weight(tensor)  # the cast weight, as load(dtype=..., quantize="int8") does
        yield self.key, q
        yield self.key.removesuffix("weight") + "scales", scales.to(self.dtype)


def plan_jobs(src: Path, config: Qwen2AudioConfig, target: torch.dtype | None, quantize: str | None
              ) -> list[Job]:
    """Every output tensor of converting src, in the source's order (reading is sequential through each file),
    every header checked before anything is written."""
    shards = checkpoint_shards(src)
    headers = {path: read_header(path) for path in shards}
    entries: dict[str, tuple[Path, TensorEntry]] = {}
    for path, keys in sorted(shards.items()):
        for key in keys:
            if key not in headers[path]:
                raise WeightsError(f"{path.name} lacks {key}, which the index places there")
            entries[key] = (path, headers[path][key])
    int8_keys = {f"{n}.weight" for n in int8_module_names(meta_model(config))} if quantize == "int8" else set()
    head, embed = "language_model.lm_head.weight", "language_model.model.embed_tokens.weight"
    if int8_keys and config.text_config.tie_word_embeddings and head not in entries and embed in entries:
        entries[head] = entries[embed]  # an int8 lm_head is stored on its own (int8 + scales), quantized from it
    dequantize = is_int8_checkpoint(src, ours=False) and target is not None and quantize is None
    jobs = []
    for key, (path, entry) in entries.items():
        if dequantize and key.endswith(".scales") and \
                entries.get(key.removesuffix("scales") + "weight", (path, entry))[1].dtype == torch.int8:
            continue  # folded into its weight
        scales = entries.get(key.removesuffix("weight") + "scales") if dequantize and entry.dtype == torch.int8 \
            else None
        if dequantize and entry.dtype == torch.int8 and scales is None:
            raise WeightsError(f"{path.name}: the int8 tensor {key} has no {key.removesuffix('weight')}scales, so it "
                               "cannot be dequantized; the int8 folder is incomplete")
        dtype = target if target is not None and (entry.dtype.is_floating_point or scales) else entry.dtype
        jobs.append(Job(key, path, entry, dtype, key in int8_keys and entry.dtype.is_floating_point, scales))
    return jobs
