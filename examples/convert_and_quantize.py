"""Convert a KSA checkpoint to MLX, quantize it, load it and generate.

    python examples/convert_and_quantize.py SRC WORKDIR

SRC is a local KSA checkpoint directory (official HF layout, PyTorch .bin/.pt
or Muse names, with its config.json) or a hub id such as OpenOneRec/KSA-4B-base.
Writes WORKDIR/bf16 (float) and WORKDIR/q4 (4-bit, group 64), replacing them.
"""

import sys
from pathlib import Path

from mlx_lm import generate

import mlx_ksa


def main(src, work):
    work = Path(work)
    mlx_ksa.convert(src, work / "bf16", dtype="bfloat16", overwrite=True)
    # Norms and the summary embedding rows stay bfloat16; linears and the text embedding go to 4 bits.
    mlx_ksa.convert(src, work / "q4", dtype="bfloat16", quantize=True, q_bits=4, q_group_size=64, overwrite=True)
    for name in ("bf16", "q4"):
        model, tokenizer = mlx_ksa.load(work / name)
        text = generate(model, tokenizer, "The summary of a chunk is", max_tokens=24)
        print(f"{name}: {text!r}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
