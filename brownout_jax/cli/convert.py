"""``brownout-jax convert``: HF safetensors → an orbax checkpoint."""

from __future__ import annotations

import resource
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("convert", help="convert a HF safetensors checkpoint to orbax")
    p.add_argument("--hf", required=True, help="HF checkpoint directory (safetensors)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--dtype", default="bfloat16", help="float32 or bfloat16 (default)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(run=run)


def run(args) -> int:
    from brownout_jax.checkpoints.hf_safetensors import load_hf_params
    from brownout_jax.checkpoints.loader import resolve_dtype
    from brownout_jax.checkpoints.orbax_store import save_converted
    from brownout_jax.model.config import ModelConfig

    config = ModelConfig.from_pretrained_dir(args.hf)
    start = time.perf_counter()
    params, fingerprint = load_hf_params(args.hf, config, resolve_dtype(args.dtype))
    out = save_converted(params, args.hf, args.out, fingerprint, overwrite=args.overwrite)
    size = sum(f.stat().st_size for f in Path(args.hf).glob("*.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        f"converted {args.hf} → {out} in {time.perf_counter() - start:.1f}s; "
        f"checkpoint {size / 2**20:.1f} MiB, peak host memory {peak / 2**20:.1f} MiB "
        f"({peak / max(size, 1):.2f}× the checkpoint)"
    )
    return 0
