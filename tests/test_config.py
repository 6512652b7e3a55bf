"""config.json as the Hub ships it (transformers-4.38 fields) and in the transformers-5 form."""

import json

import pytest
from helpers import tiny_hf_config

from qwen2audio.config import GenerationConfig, Qwen2AudioConfig
from qwen2audio.errors import ConfigError

# The Instruct repo's config.json (facts file, section 7.2): the decoder's width, depth and heads are absent.
HUB_CONFIG = {
    "architectures": ["Qwen2AudioForConditionalGeneration"], "audio_token_index": 151646, "ignore_index": -100,
    "model_type": "qwen2_audio", "transformers_version": "4.38.1", "vocab_size": 156032,
    "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 128, "encoder_layers": 32,
                     "encoder_attention_heads": 20, "encoder_ffn_dim": 5120, "d_model": 1280,
                     "activation_function": "gelu", "scale_embedding": False, "max_source_positions": 1500},
    "text_config": {"bos_token_id": 151643, "eos_token_id": 151645, "intermediate_size": 11008,
                    "max_position_embeddings": 8192, "model_type": "qwen2", "rope_theta": 10000, "rms_norm_eps": 1e-05,
                    "sliding_window": 32768, "torch_dtype": "bfloat16", "use_mrope": False, "vocab_size": 156032},
}


def test_hub_config_resolves_like_transformers():
    from transformers import Qwen2AudioConfig as HFConfig

    ours = Qwen2AudioConfig.from_dict(HUB_CONFIG)
    ref = HFConfig(**HUB_CONFIG).text_config
    t = ours.text_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (
        ref.hidden_size, ref.num_hidden_layers, ref.num_attention_heads, ref.num_key_value_heads, 128)
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads) == (4096, 32, 32, 32)
    assert t.rope_theta == ref.rope_parameters["rope_theta"] == 10000
    assert t.rms_norm_eps == 1e-5 and t.vocab_size == 156032 and t.intermediate_size == 11008
    assert ours.audio_config.head_dim == 64 and ours.audio_token_index == 151646 and ours.torch_dtype == "bfloat16"


def test_transformers5_form(tmp_path):
    cfg = tiny_hf_config(gqa=True, rope_theta=5e5)
    cfg.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw["text_config"]  # the 5.x form really is what we read here
    ours = Qwen2AudioConfig.from_file(tmp_path)
    assert ours.text_config.rope_theta == 5e5 and ours.text_config.num_key_value_heads == 2


@pytest.mark.parametrize("text,message", [
    ({"hidden_size": 100, "num_attention_heads": 3}, "not divisible"),
    ({"num_attention_heads": 32, "num_key_value_heads": 5}, "not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_impossible_values_are_errors(text, message):
    raw = dict(HUB_CONFIG, text_config=dict(HUB_CONFIG["text_config"], **text))
    with pytest.raises(ConfigError, match=message):
        Qwen2AudioConfig.from_dict(raw)


def test_unknown_keys_are_ignored_and_wrong_model_type_is_an_error():
    raw = dict(HUB_CONFIG, something_new=1, text_config=dict(HUB_CONFIG["text_config"], another=2))
    assert Qwen2AudioConfig.from_dict(raw).text_config.hidden_size == 4096
    with pytest.raises(ConfigError, match="model_type"):
        Qwen2AudioConfig.from_dict(dict(HUB_CONFIG, model_type="llama"))


def test_generation_config_reads_eos_list():
    g = GenerationConfig.from_dict({"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.5,
                                    "repetition_penalty": 1.1, "eos_token_id": [151643, 151645], "unknown": 3})
    assert g.eos_token_id == (151643, 151645) and g.top_k == 20 and g.do_sample
