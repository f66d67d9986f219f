#!/usr/bin/env python
"""Merge a sharded training checkpoint into one safetensors file for inference (plus its config as YAML).

    python tools/export_checkpoint.py --checkpoint runs/x/checkpoints/step-00012000 --out echomotion.safetensors [--dtype bf16] [--ema] [--data DIR]
    python tools/export_checkpoint.py --checkpoint ... --out video.safetensors --wan-layout original   # video expert only, Wan keys
    python tools/export_checkpoint.py --checkpoint ... --out wan-diffusers/ --wan-layout diffusers      # diffusers folder

The checkpoint may come from any layout (one process, DDP, FSDP2, TP/SP): DCP stores global tensor metadata and reshards
on load. Sampling loads the merged file on one device (`python -m echomotion.sample --checkpoint FILE ...`). The config
goes next to an export as `<stem>.yaml`. The export carries the dataset's motion stats, null text, codec and
text-encoder identity (--data, or the run's data.path when that folder is here), so t2vm/t2m sample from it alone. --out is checked before the checkpoint is read; a bad flag or folder prints
`export_checkpoint: <what to change>` and exits 2.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from echomotion.cli import user_errors  # noqa: E402
from echomotion.export import DTYPES, export_checkpoint, load_checkpoint  # noqa: E402
from echomotion.models.wan_io import check_wan_path, save_wan  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a complete checkpoint folder (runs/<run>/checkpoints/step-N)")
    p.add_argument("--out", required=True, help="output .safetensors (or a folder for --wan-layout diffusers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (train.ema_decay > 0)")
    p.add_argument("--wan-layout", choices=["original", "diffusers"],
                   help="write only the video expert, with Wan's original keys or as a diffusers folder")
    p.add_argument("--data", help="dataset folder (with dataset.json) whose files go into the export; default: the run's "
                                  "data.path or its parent")
    a = p.parse_args(argv)
    out = Path(a.out)
    # ValueError: the project's refusals (--out, --ema, a DeepSpeed checkpoint); FileNotFoundError: not a step-N folder.
    with user_errors("export_checkpoint", ValueError, FileNotFoundError):
        if a.wan_layout is None:
            written = export_checkpoint(a.checkpoint, out, a.dtype, a.ema, a.data)
        else:
            check_wan_path(out, a.wan_layout)  # before the slow load
            model, _, _ = load_checkpoint(a.checkpoint, a.ema)  # straight from the checkpoint: no merged file on disk
            written = save_wan(model, out, layout=a.wan_layout, dtype=DTYPES[a.dtype])
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
