"""Which dense matmul path is faster, per weight shape and row count — measured on this
machine, never assumed.

For each (K, N) dense weight shape and each row count of ``ROW_LADDER``, the packed kernel
and XLA's dot on the (K, N) layout are timed on the same bf16 operands (median of five runs
after a warm-up); "wins" below means at least 10 % faster (``XLA_MARGIN``: run-to-run noise
must not flip a tie). If XLA wins at every row count the shape is left unpacked (XLA
everywhere); otherwise it is packed, and at the row counts where XLA won, XLA's dot on the
*packed* layout is timed too and takes the row count only if it still wins over the kernel (a
packed weight has no (K, N) copy to hand XLA). A matmul of M rows then takes the choice of the
smallest measured row count ≥ M. On an AMD Zen 4/5 machine the kernel wins every shape; on an
Intel Xeon with AMX XLA's oneDNN dot was measured 2–6× faster than the old kernel — the same
code picks the winner on each.

Choices are kept per machine in a JSON file (``$BROWNOUT_JAX_CACHE_DIR`` or
``~/.cache/brownout-jax``, ``matmul_choice.json``), keyed by the CPU model, the kernel copies
it runs, the library build and jax's version, so only the first start on a machine pays for
the timing (seconds at Qwen1.5-MoE dims; milliseconds for the demo). ``BROWNOUT_JAX_DENSE_PATH``
= ``kernel`` or ``xla`` forces one path (no timing), ``measure`` (default) measures.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

from brownout_jax.cpu_kernels.packing import MatmulPath, pack, packed_linear_xla
from brownout_jax.model.packed_params import (
    KERNEL_EVERYWHERE,
    DenseChoice,
    Shape,
    ShapeChoice,
    dense_weight_shapes,
    pack_dense_weights,
    pack_expert_weights,
    packing_available,
)
from brownout_jax.model.params import ModelParams

ROW_LADDER = (1, 8, 32, 128, 512)
# XLA takes a row count only when it is this much faster: timings on a busy 2-core machine
# vary by several percent between runs, and a tie is not worth a path change.
XLA_MARGIN = 0.9
ENV_PATH = "BROWNOUT_JAX_DENSE_PATH"
ENV_CACHE = "BROWNOUT_JAX_CACHE_DIR"
CACHE_FILE = "matmul_choice.json"


def median_ms(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _kernel_fn():
    from brownout_jax.cpu_kernels import packed_linear

    return jax.jit(lambda x, w: packed_linear(x, w))


def _xla_fn():
    return jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32))


def choose_shape(shape: Shape, rows=ROW_LADDER, repeats: int = 5) -> ShapeChoice:
    """Times one shape's paths and returns its choice (``bench linear`` prints timings)."""
    k, n = shape
    w = jnp.full((k, n), 0.01, jnp.bfloat16)
    packed = pack(w)
    kernel, xla, xla_packed = _kernel_fn(), _xla_fn(), jax.jit(packed_linear_xla)
    wins = {}
    for m in rows:
        x = jnp.full((m, k), 0.5, jnp.bfloat16)
        t_kernel = median_ms(kernel, (x, packed), repeats)
        t_xla = median_ms(xla, (x, w), repeats)
        wins[m] = (t_kernel, t_xla)
    if all(t_xla < XLA_MARGIN * t_kernel for t_kernel, t_xla in wins.values()):
        return ShapeChoice(packed=False)
    del w
    paths = []
    for m, (t_kernel, t_xla) in wins.items():
        path = MatmulPath.KERNEL
        if t_xla < XLA_MARGIN * t_kernel:
            x = jnp.full((m, k), 0.5, jnp.bfloat16)
            t_packed = median_ms(xla_packed, (x, packed), repeats)
            if t_packed < XLA_MARGIN * t_kernel:
                path = MatmulPath.XLA
        paths.append((m, path))
    if all(path is MatmulPath.KERNEL for _, path in paths):
        paths = []  # the kernel everywhere: the plain packed weight
    return ShapeChoice(packed=True, paths=tuple(paths))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_key() -> str:
    """What a measured choice depends on: the CPU, the copies it runs, the build, jax."""
    from brownout_jax.cpu_kernels import Isa, load_library

    library = load_library()
    copies = ",".join(
        str(library.packed_isa_name(Isa.AUTO, True, rows)) for rows in (1, max(ROW_LADDER))
    )
    build = ""
    if library.path is not None and library.path.exists():
        stat = library.path.stat()
        build = f"{stat.st_size}:{int(stat.st_mtime)}"
    return f"{_cpu_model()}|{os.cpu_count()} cpus|{copies}|{build}|jax {jax.__version__}"


def cache_path() -> Path:
    root = os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "brownout-jax"
    return Path(root) / CACHE_FILE


def _to_json(choice: ShapeChoice) -> dict:
    return {"packed": choice.packed, "paths": [[m, p.value] for m, p in choice.paths]}


def _from_json(entry: dict) -> ShapeChoice:
    paths = tuple((int(m), MatmulPath(p)) for m, p in entry["paths"])
    return ShapeChoice(packed=bool(entry["packed"]), paths=paths)


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, data: dict) -> None:
    """Atomically (an interrupted run leaves the old file)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as f:
            json.dump(data, f, indent=1)
        os.replace(f.name, path)
    except OSError:
        pass  # a read-only home: measure again next time


@functools.cache
def dense_choice(shapes: tuple[Shape, ...], progress: bool = False) -> DenseChoice:
    """The choice for these shapes on this machine: forced by the environment, read from the
    cache, or measured now (and cached)."""
    forced = os.environ.get(ENV_PATH, "measure").strip().lower()
    if forced == "kernel":
        return DenseChoice(default=KERNEL_EVERYWHERE)
    if forced == "xla":
        return DenseChoice(default=ShapeChoice(packed=False))
    if forced != "measure":
        raise ValueError(f"{ENV_PATH}={forced!r}: expected kernel, xla or measure")
    path, key = cache_path(), machine_key()
    data = _read_cache(path)
    known = data.get(key, {})
    chosen = {}
    missing = [s for s in shapes if f"{s[0]}x{s[1]}" not in known]
    for shape in tqdm(missing, desc="timing dense matmuls", disable=not progress or not missing):
        known[f"{shape[0]}x{shape[1]}"] = _to_json(choose_shape(shape))
    if missing:
        data[key] = known
        _write_cache(path, data)
    for shape in shapes:
        chosen[shape] = _from_json(known[f"{shape[0]}x{shape[1]}"])
    return DenseChoice(shapes=tuple(sorted(chosen.items())))


def pack_for_inference(
    params: ModelParams, progress: bool = False, consume: bool = False, experts: bool = True
) -> ModelParams:
    """``params`` with its bf16 dense weights packed as this machine's measured choice says,
    and (``experts``) its bf16 expert stacks packed — on arrays, or on ShapeDtypeStructs (the
    same tree either way). Unchanged off CPU or without the kernel library. ``consume``: see
    ``pack_dense_weights``."""
    if not packing_available():
        return params
    shapes = dense_weight_shapes(params)
    choice = dense_choice(shapes, progress) if shapes else DenseChoice()

    def pack_all(p: ModelParams, consume: bool = False) -> ModelParams:
        p = pack_dense_weights(p, choice, consume)
        return pack_expert_weights(p, consume) if experts else p

    if isinstance(jax.tree_util.tree_leaves(params)[0], jax.ShapeDtypeStruct):
        return jax.eval_shape(pack_all, params)
    return pack_all(params, consume)
