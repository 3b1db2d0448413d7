"""Atomic writes of results, plots and checkpoints: write a temporary file beside the target,
then os.replace it, so an interrupted run never leaves a truncated file behind."""

import json
import os
from collections.abc import Callable
from pathlib import Path


def _replace_via_tmp(path: Path, write: Callable[[Path], None]) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    """obj as indented JSON at path."""
    _replace_via_tmp(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2)))


def save_figure(fig, path: Path, **savefig_kwargs) -> None:
    """A matplotlib figure at path, in the format its suffix names."""
    fmt = Path(path).suffix.lstrip(".")
    _replace_via_tmp(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))


def save_tensors(tensors: dict, path: Path) -> None:
    """A dict of tensors as a safetensors file at path."""
    from safetensors.torch import save_file

    _replace_via_tmp(path, lambda tmp: save_file(tensors, str(tmp)))
