"""A base-model directory with a configuration's shapes and random weights (seed 0), for a GPU machine the default base's
98 MB package does not travel to: scripts/gpu/prepare.sh carries its configuration and tokenizer (.smol).

    python3 scripts/gpu/random_base.py .smol /tmp/smol
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def random_base(config_dir: str, out: str) -> str:
    """config_dir's config.json as a float32 model with random weights (seed 0), saved to out beside config_dir's
    tokenizer and other JSON / Jinja files; returns out."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32).save_pretrained(out)
    for f in Path(config_dir).iterdir():
        if f.suffix in (".json", ".jinja") and f.name != "config.json":
            shutil.copy(f, Path(out) / f.name)
    return out


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 scripts/gpu/random_base.py CONFIG_DIR OUT_DIR")
    random_base(sys.argv[1], sys.argv[2])
