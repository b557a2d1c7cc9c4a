"""Directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from brownout_jax.checkpoints.errors import CheckpointError


@contextlib.contextmanager
def atomic_directory(out_dir: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``out_dir`` to fill; renames it to ``out_dir`` on success
    and removes it on any error or interrupt, so a half-written output never exists."""
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: output directory exists (pass --overwrite to replace it)")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
