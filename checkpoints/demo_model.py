"""Where the bundled demo model lives once installed (see ``demo/README.md``).

from brownout_jax.checkpoints import load_model
from brownout_jax.checkpoints.demo_model import demo_model_dir, demo_united_dir

model = load_model(demo_model_dir(), united=demo_united_dir("similarity"))
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

GROUPINGS = ("contiguous", "similarity")


def demo_model_dir() -> Path:
    """The demo checkpoint directory (HF ``Qwen2MoeForCausalLM`` layout, with tokenizer)."""
    path = Path(str(files("brownout_jax.checkpoints") / "demo"))
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: the demo model is not installed (no config.json)")
    return path


def demo_united_dir(grouping: str = "contiguous") -> Path:
    """The demo model's way-4 united experts, made with ``grouping`` (contiguous|similarity)."""
    if grouping not in GROUPINGS:
        raise ValueError(f"grouping must be one of {GROUPINGS}, got {grouping!r}")
    path = demo_model_dir() / f"united-way4-{grouping}"
    if not (path / "united_manifest.json").is_file():
        raise FileNotFoundError(f"{path}: united experts not installed (no united_manifest.json)")
    return path


def default_model(model: str | None, united: str | None) -> tuple[str, str | None]:
    """``--model`` or, when absent, the bundled demo model with its contiguous united experts."""
    if model is not None:
        return model, united
    try:
        demo = demo_model_dir()
    except FileNotFoundError as err:
        raise ValueError(f"no --model given and the bundled demo model is missing ({err})") from err
    if united is None:
        try:
            united = str(demo_united_dir("contiguous"))
        except FileNotFoundError:
            united = None
    return str(demo), united
