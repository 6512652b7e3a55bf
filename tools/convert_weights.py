"""Cast, reshard or int8-quantize a Qwen2-Audio checkpoint folder into the Hugging Face Hub layout.

    python tools/convert_weights.py Qwen2-Audio-7B-Instruct out-bf16 --dtype bfloat16 --max-shard-size 4GB
    python tools/convert_weights.py Qwen2-Audio-7B-Instruct out-int8 --quantize int8

The output holds safetensors shards (model.safetensors, or model-0000i-of-0000n.safetensors plus
model.safetensors.index.json), config.json with the new dtype, and the tokenizer, processor and generation files.
A cast or resharded folder loads in transformers (Qwen2AudioForConditionalGeneration.from_pretrained) and in
qwen2audio.load. An --quantize int8 folder is NOT loadable by transformers, only by qwen2audio.load:
transformers does not know its format, warns "Unknown quantization type", skips the scales and would run the
int8 codes as if they were weights (a broken model).
Tensors stream one at a time; memory stays near one output shard plus the largest tensor.
An int8 folder converted with --dtype (and no --quantize) is dequantized to that dtype.
SRC and DST must be different folders, neither inside the other. The output appears under DST only when complete
(an existing DST is swapped for it in one step); a conversion killed midway leaves DST as it was, and the next run
into DST removes what was left and says so.
"""

import argparse
import sys
import warnings

from qwen2audio.convert import convert
from qwen2audio.errors import Qwen2AudioError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 2)[2])
    parser.add_argument("src", help="a checkpoint folder (config.json + safetensors)")
    parser.add_argument("dst", help="the folder to write; must not exist or be empty unless --force")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"],
                        help="cast the floating tensors (default: keep the source dtype)")
    parser.add_argument("--quantize", choices=["int8"],
                        help="weight-only int8 for the decoder's linear layers and lm_head (per output channel); "
                             "the result loads with qwen2audio.load only, NOT with transformers (see below)")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest shard, e.g. 500MB, 2GB, 1.5GiB or bytes (default: %(default)s)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing model folder at DST (all of it, once the new one is complete)")
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as notes:
            warnings.simplefilter("always")
            dst = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize,
                          max_shard_size=args.max_shard_size, force=args.force)
    except Qwen2AudioError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        for note in notes:  # what a killed earlier run left, and what became of it
            print(f"note: {note.message}", file=sys.stderr)
    shards = sorted(dst.glob("*.safetensors"))
    size = sum(p.stat().st_size for p in shards)
    print(f"wrote {dst}: {len(shards)} safetensors file(s), {size / 1e9:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
