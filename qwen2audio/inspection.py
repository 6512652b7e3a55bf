"""Look inside a forward pass: per-layer hidden states and attention maps, read with forward hooks.

    with capture(model, decoder_attention=[0, 5], encoder_attention=[3]) as seen:
        model(**inputs)
    seen.decoder_hidden_states[3], seen.decoder_attentions[5], seen.encoder_hidden_states[-1]

Nothing here changes the model's code path: outside a `capture` block no hook is registered and every attention
module runs SDPA. Inside it, forward hooks copy out the layers' inputs and outputs, and the attention modules of
the chosen layers run their eager path (`module.eager = True`, attention.py) so that their probabilities pass
through `module.probs`, where a hook reads them. The hidden states follow transformers 5.24's `hidden_states`
(checked by running it): num_layers + 1 entries, the embeddings first, then each layer's output, except that the
last entry is the final norm's output (the last layer's own output is not listed). The encoder's last entry is its
pooled and normed output (n_audio, positions // 2, d_model); its other entries cover the positions the encoder
computed: up to the longest clip of the batch, or all 1500 with `model.encoder_mode = "reference"`.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from .errors import InputError


@dataclass
class Captured:
    """What the last forward pass inside a `capture` block computed. Attention maps by layer index: decoder
    (B, heads, T, T); encoder (n_audio, heads, S, S). Tensors stay in the autograd graph."""
    encoder_hidden_states: list[Tensor] = field(default_factory=list)
    decoder_hidden_states: list[Tensor] = field(default_factory=list)
    encoder_attentions: dict[int, Tensor] = field(default_factory=dict)
    decoder_attentions: dict[int, Tensor] = field(default_factory=dict)


def _record_layers(layers: nn.ModuleList, final_norm: nn.Module, states: list[Tensor]) -> list:
    """Hooks that fill `states` as transformers' hidden_states: input of layer 0, outputs of layers 0..N-2, and the
    final norm's output. Entries are replaced, not appended, so a layer run again (checkpointing) keeps one entry."""
    n = len(layers)
    states[:] = [None] * (n + 1)

    def store(index: int):
        def hook(module, args, output):
            states[index] = output
        return hook

    handles = [layers[0].register_forward_pre_hook(lambda module, args: states.__setitem__(0, args[0]))]
    handles += [layers[i].register_forward_hook(store(i + 1)) for i in range(n - 1)]
    handles.append(final_norm.register_forward_hook(store(n)))
    return handles


def _record_attention(layers: nn.ModuleList, chosen: Sequence[int], maps: dict[int, Tensor]) -> list:
    """Hook the probabilities of the chosen layers' attention into `maps`, by layer index."""
    return [layers[i].self_attn.probs.register_forward_hook(
        lambda module, args, output, i=i % len(layers): maps.__setitem__(i, output)) for i in chosen]


def _check_layers(layers: nn.ModuleList, chosen: Sequence[int], part: str) -> None:
    for index in chosen:
        if not -len(layers) <= index < len(layers):
            raise InputError(f"{part} attention layer {index} does not exist: the {part} has {len(layers)} layers")


@contextmanager
def capture(model: nn.Module, hidden_states: bool = True, decoder_attention: Sequence[int] = (),
            encoder_attention: Sequence[int] = ()) -> Iterator[Captured]:
    """Record hidden states (hidden_states=True) and the attention probabilities of the decoder and encoder layers
    listed, during the forward passes in the block. The chosen layers use the eager softmax only inside the block."""
    decoder, encoder = model.language_model.model, model.audio_tower
    _check_layers(decoder.layers, decoder_attention, "decoder")
    _check_layers(encoder.layers, encoder_attention, "encoder")
    seen = Captured()
    switched = [decoder.layers[i].self_attn for i in decoder_attention] + \
        [encoder.layers[i].self_attn for i in encoder_attention]
    before = [attn.eager for attn in switched]
    handles = []
    try:
        if hidden_states:
            handles += _record_layers(decoder.layers, decoder.norm, seen.decoder_hidden_states)
            handles += _record_layers(encoder.layers, encoder.layer_norm, seen.encoder_hidden_states)
        handles += _record_attention(decoder.layers, decoder_attention, seen.decoder_attentions)
        handles += _record_attention(encoder.layers, encoder_attention, seen.encoder_attentions)
        for attn in switched:
            attn.eager = True
        yield seen
    finally:
        for handle in handles:
            handle.remove()
        for attn, eager in zip(switched, before):
            attn.eager = eager
        for states in (seen.encoder_hidden_states, seen.decoder_hidden_states):
            if any(s is None for s in states):  # the block never ran that part (no audio, say): nothing to show
                states.clear()
