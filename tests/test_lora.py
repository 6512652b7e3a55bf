"""LoRA (lora.py) and adapters in PEFT's layout (adapters.py): against the base model, against itself merged, and
against `peft` on transformers' model in both directions (fp32, random tiny checkpoint)."""

import json
import warnings

import pytest
import torch
from helpers import audio_prompt_ids, load_hf, test_signal
from safetensors.torch import load_file, save_file

import qwen2audio
from qwen2audio.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from qwen2audio.errors import InputError, WeightsError
from qwen2audio.features import audio_token_count, extract_features
from qwen2audio.lora import LoraConfig, LoRALinear, apply_lora, lora_targets, merge_lora, unload_lora, unmerge_lora

pytestmark = pytest.mark.usefixtures("one_thread")

EVERYWHERE = lora_targets(attention=True, mlp=True, encoder=True, projector=True)


def inputs():
    feats, mask = extract_features([test_signal(1.5, seed=4)])
    ids = torch.tensor([audio_prompt_ids([audio_token_count(int(mask.sum()))], [[11, 22, 33], [44, 55, 66, 77]])])
    return dict(input_ids=ids, input_features=feats, feature_attention_mask=mask)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs())


def hf_logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def train_a_little(model, steps: int = 3) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = inputs()
    for _ in range(steps):
        optimizer.zero_grad()
        model(**batch, labels=batch["input_ids"]).backward()
        optimizer.step()


def test_zero_init_training_merge_unmerge(tiny_checkpoint):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    base = logits(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoraConfig(r=4, lora_alpha=8, target_modules=EVERYWHERE))
    assert len(names) == 2 * 7 + 2 * 6 + 1  # decoder q k v o gate up down, encoder q k v out fc1 fc2, projector
    assert torch.equal(logits(model), base)  # B = 0: exactly the base model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    train_a_little(model)
    tuned = logits(model)
    assert (tuned - base).abs().max() > 1e-2
    for name, layer in model.named_modules():  # the base weights are bit-identical after training
        if isinstance(layer, LoRALinear):
            assert torch.equal(layer.base_layer.weight, before[f"{name}.weight"]), name
    merge_lora(model)
    assert (logits(model) - tuned).abs().max() < 1e-5
    unmerge_lora(model)
    assert (logits(model) - tuned).abs().max() < 1e-5
    unload_lora(model, merge=False)  # back to the plain model
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(before) and (logits(model) - base).abs().max() < 1e-5


def test_adapter_saved_here_loads_in_peft(tiny_checkpoint, tmp_path):
    from peft import PeftModel

    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    apply_lora(model, LoraConfig(r=4, lora_alpha=16, target_modules=EVERYWHERE))
    train_a_little(model)
    save_adapter(model, tmp_path / "adapter", base_model=str(tiny_checkpoint))
    keys = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.audio_tower.layers.1.fc2.lora_B.weight" in keys
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(missing|unexpected).*adapter keys")  # every key must land
        peft_model = PeftModel.from_pretrained(load_hf(tiny_checkpoint), tmp_path / "adapter")
    assert len([n for n, _ in peft_model.named_parameters() if "lora_A" in n]) == len(keys) // 2
    assert (hf_logits(peft_model) - logits(model)).abs().max() < 1e-4


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
def test_adapter_trained_with_peft_loads_here(tiny_checkpoint, tmp_path, layout):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    torch.manual_seed(0)
    config = PeftLoraConfig(r=4, lora_alpha=16, use_rslora=True, alpha_pattern={"gate_proj": 3.0},
                            target_modules=["q_proj", "v_proj", "fc1", "gate_proj", "linear"])
    peft_model = get_peft_model(load_hf(tiny_checkpoint), config)
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # stands for training
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = hf_logits(peft_model)
    if layout == "transformers4":  # the Hub's names, which adapters trained on transformers 4 carry
        path = tmp_path / "adapter" / ADAPTER_WEIGHTS
        renamed = {k.replace("base_model.model.model.language_model.", "base_model.model.language_model.model.")
                   .replace("base_model.model.model.", "base_model.model."): v for k, v in load_file(path).items()}
        save_file(renamed, path)
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    names = load_adapter(model, tmp_path / "adapter")
    assert len(names) == 2 * 3 + 2 * 3 + 1  # decoder q v gate, encoder q v fc1, projector
    assert "audio_tower.layers.0.fc1" in names and "multi_modal_projector.linear" in names
    assert (logits(model) - expected).abs().max() < 1e-4
    assert (logits(model) - hf_logits(load_hf(tiny_checkpoint))).abs().max() > 1e-2  # the adapter does something


def test_merged_model_saves_and_loads_in_transformers(tiny_checkpoint, tmp_path):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    apply_lora(model, LoraConfig(r=4, lora_alpha=8))
    train_a_little(model)
    tuned = logits(model)
    unload_lora(model)  # merged into plain nn.Linear modules: the Hub's keys again
    qwen2audio.save(model, tmp_path / "merged", config=tiny_checkpoint)
    assert (hf_logits(load_hf(tmp_path / "merged")) - tuned).abs().max() < 1e-4


def test_bad_adapters_and_targets_are_named(tiny_checkpoint, tmp_path):
    model = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    with pytest.raises(InputError, match="selects no linear layer"):
        apply_lora(model, LoraConfig(target_modules=("qkv",)))
    with pytest.raises(InputError, match="no LoRA layers"):
        save_adapter(model, tmp_path / "none")
    apply_lora(model, LoraConfig(target_modules=("o_proj",)))
    with pytest.raises(InputError, match="already has a LoRA adapter"):
        apply_lora(model, LoraConfig(target_modules=("o_proj",)))
    folder = save_adapter(model, tmp_path / "adapter")
    config = json.loads((folder / ADAPTER_CONFIG).read_text())
    (folder / ADAPTER_CONFIG).write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(WeightsError, match="use_dora"):
        load_adapter(qwen2audio.load_model(tiny_checkpoint, quiet=True), folder)
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config))
    weights = load_file(folder / ADAPTER_WEIGHTS)
    save_file({**weights, "base_model.model.model.language_model.norm.weight": torch.ones(64)},
              folder / ADAPTER_WEIGHTS)
    with pytest.raises(WeightsError, match="unexpected key base_model.model.model.language_model.norm.weight"):
        load_adapter(qwen2audio.load_model(tiny_checkpoint, quiet=True), folder)
    with pytest.raises(WeightsError, match="no adapter_config.json"):
        load_adapter(model, tmp_path)
    key = "base_model.model.model.language_model.layers.1.self_attn.o_proj.lora_A.weight"
    save_file({**weights, key: torch.zeros(8, 63)}, folder / ADAPTER_WEIGHTS)
    fresh = qwen2audio.load_model(tiny_checkpoint, quiet=True)
    with pytest.raises(WeightsError, match=r"lora_A \(8, 63\).*needs \(8, 64\)"):
        load_adapter(fresh, folder)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # checked before anything changed
    save_file(weights, folder / ADAPTER_WEIGHTS)
    load_adapter(fresh, folder)
    with pytest.raises(InputError, match="already has a LoRA adapter"):
        load_adapter(fresh, folder)
