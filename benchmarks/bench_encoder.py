"""Audio encoder time, ours vs transformers, side by side in one process, on the real encoder width.

    python benchmarks/bench_encoder.py [--layers 4] [--dtype bfloat16] [--checkpoint DIR]

Both encode the same log-mel batch of one clip and return the projected, trimmed audio rows. transformers always
encodes 3000 frames (30 s); ours encodes the clip's valid frames (+ the look-ahead frames of the convolutions).
"""

import argparse
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import best_time, build_checkpoint, machine, print_table, signal  # noqa: E402

import qwen2audio  # noqa: E402
from qwen2audio.features import extract_features  # noqa: E402


def hf_encode(hf, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' audio path of Qwen2AudioModel.forward: key mask, tower, projector, trim."""
    from transformers.masking_utils import create_bidirectional_mask

    inner = hf.model
    conv_lengths, token_lengths = inner.audio_tower._get_feat_extract_output_lengths(mask.sum(-1))
    mask_2d = (torch.arange(1500, device=mask.device)[None, :] < conv_lengths[:, None]).long()
    dummy = torch.zeros(feats.shape[0], 1500, 1, dtype=inner.multi_modal_projector.linear.weight.dtype,
                        device=mask.device)
    attn = create_bidirectional_mask(config=inner.audio_tower.config, inputs_embeds=dummy, attention_mask=mask_2d)
    rows = inner.multi_modal_projector(inner.audio_tower(feats, attention_mask=attn).last_hidden_state)
    return rows[torch.arange(rows.shape[1], device=mask.device)[None, :] < token_lengths[:, None]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--checkpoint", type=Path, default=None, help="where to build (or reuse) the checkpoint")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from transformers import Qwen2AudioForConditionalGeneration

    dtype = getattr(torch, args.dtype)
    folder = args.checkpoint or Path(tempfile.mkdtemp(prefix="q2a-bench-enc-"))
    build_checkpoint(folder, text_layers=1, audio_layers=args.layers, dtype=dtype, small_text=True)
    ours = qwen2audio.load(folder).model
    hf = Qwen2AudioForConditionalGeneration.from_pretrained(folder, dtype=dtype).eval()
    rows = []
    with torch.inference_mode():
        for seconds in (2, 10, 30):
            feats, mask = extract_features([signal(seconds)])
            diff = (ours.encode_audio(feats, mask).float() - hf_encode(hf, feats, mask).float()).abs().max().item()
            t_ours = best_time(lambda: ours.encode_audio(feats, mask), args.repeat)
            t_ref = best_time(lambda: hf_encode(hf, feats, mask), args.repeat)
            rows.append([f"{seconds} s", f"{t_ref * 1e3:.0f}", f"{t_ours * 1e3:.0f}", f"{t_ref / t_ours:.2f}x",
                         f"{diff:.1e}"])
    print_table(f"Encoder ({args.layers} layers, d_model 1280, 20 heads, FFN 5120, {args.dtype}), {date.today()}, "
                f"{machine()}", ["clip", "transformers ms", "ours ms", "speed-up", "max |diff|"], rows)


if __name__ == "__main__":
    main()
