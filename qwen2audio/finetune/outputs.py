"""What a finished run leaves in --out (rank 0 writes):

    training_args.json   the options (defaults resolved), the number of processes, the versions
    adapter/             LoRA: the adapter in PEFT's layout (qwen2audio.load(base, adapter=...), or peft)
    model/               --full: the whole model in the Hub layout, with the base's tokenizer and config files
    merged/              --merge: the adapter folded into the base weights, in the Hub layout (qwen2audio chat
                         --model OUT/merged, or transformers' from_pretrained)
    log.jsonl, summary.json, checkpoints/ (with --save-every)
"""

import json
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from ..adapters import save_adapter
from ..convert import save
from ..lora import unload_lora
from ..weights import meta_model


def _training_args(session) -> dict:
    from importlib.metadata import version

    return {**session.options.to_json(), "processes": session.ranks.world,
            "global_batch": session.plan.global_batch, "total_steps": session.plan.total_steps,
            "good_examples": len(session.records), "torch": torch.__version__, "qwen2audio": version("qwen2audio")}


def _full_model(session) -> torch.nn.Module:
    """The trained model as one plain module on rank 0 (FSDP2: the shards gathered into a model built on meta)."""
    if session.ranks.world == 1:
        return session.model
    state = get_model_state_dict(session.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not session.ranks.is_main:
        return None
    model = meta_model(session.model.cfg)
    model.load_state_dict(state, assign=True, strict=True)
    return model


def write_outputs(session) -> dict[str, str]:
    """Write the outputs (every rank calls it: FSDP2 gathers the weights); returns {name: path}."""
    out, options, base = session.out, session.options, Path(session.info["base"])
    full = _full_model(session) if options.full else None
    if not session.ranks.is_main:
        return {}
    outputs = {"training_args": out / "training_args.json", "log": out / "log.jsonl"}
    outputs["training_args"].write_text(json.dumps(_training_args(session), indent=1) + "\n")
    if options.full:
        outputs["model"] = save(full, out / "model", config=base, force=True)
    else:
        outputs["adapter"] = save_adapter(session.model, out / "adapter", base_model=options.model)
        if options.merge:
            unload_lora(session.model, merge=True)
            outputs["merged"] = save(session.model, out / "merged", config=base, force=True)
    return {k: str(v) for k, v in outputs.items()}
