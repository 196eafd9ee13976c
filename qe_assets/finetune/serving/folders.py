"""Served folders: what a model server loads under a stable name, made of links, no copies.

Each adapter is served as `model_rag_qa_vNNN` (the seed's name; NNN is its dataset version), the
base model it was trained on as `model_rag_qa_base`. For the `transformers` engine a served name
is a folder in `<data>/served/` the server runs in: the base model's files (config, weights,
generation config) and the adapter's (adapter config and weights, the tokenizer and chat
template it was trained with) linked side by side. transformers loads such a folder as the base
model with its adapter applied (`from_pretrained` finds `adapter_config.json` next to a complete
model), so `transformers serve` serves a PEFT adapter without merging or copying weights.

A folder is built beside its final place and renamed into it, so a server never sees half of
one; building it again for the same adapter gives the same links.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.request
import uuid
from pathlib import Path

SERVED_PREFIX = "model_rag_qa_"
BASE_NAME = f"{SERVED_PREFIX}base"
_VERSION = re.compile(r"^v(\d{3,})$")
# Files of a base model folder the served folder takes; the adapter's own files win over them
# (its tokenizer and chat template are the ones it was trained with).
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


class ServingError(RuntimeError):
    """A model cannot be served (a missing folder, a name outside the scheme)."""


def served_name(dataset_version: str) -> str:
    """`v001` → `model_rag_qa_v001`: the name the gate, `qe models` and `choose_model` use."""
    if not _VERSION.match(dataset_version):
        raise ServingError(f"dataset version {dataset_version!r} is not vNNN")
    return f"{SERVED_PREFIX}{dataset_version}"


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def link_folder(target: Path, sources: list[Path]) -> Path:
    """`target` made of links to the files of `sources`, the earlier source winning a name."""
    chosen: dict[str, Path] = {}
    for source in sources:
        if not source.is_dir():
            raise ServingError(f"{source} is not a model folder")
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in chosen:
                chosen[path.name] = path.resolve()
    if current_links(target) == chosen:
        return target  # already served as it is: nothing to redo
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    temp.mkdir(parents=True)
    for name, path in chosen.items():
        (temp / name).symlink_to(path)
    old = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.old")
    if target.exists():
        os.replace(target, old)
    os.replace(temp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def current_links(folder: Path) -> dict[str, Path] | None:
    if not folder.is_dir():
        return None
    return {p.name: p.resolve() for p in folder.iterdir() if p.is_symlink()}


def serve_adapter(served_dir: Path, name: str, adapter: str | Path, base: str | Path) -> Path:
    """The served folder of `adapter` on `base` (a local folder) under `name`."""
    adapter, base = Path(adapter), Path(base)
    if not is_adapter(adapter):
        raise ServingError(f"{adapter} holds no adapter_config.json: not a PEFT adapter")
    return link_folder(served_dir / name, [adapter, base])


def serve_base(served_dir: Path, base: str | Path) -> Path:
    """The base model's served folder (`model_rag_qa_base`)."""
    return link_folder(served_dir / BASE_NAME, [Path(base)])


def load_lora_adapter(base_url: str, name: str, path: str, timeout: float) -> None:
    """Ask a vLLM-style server (`.../v1`) to load the adapter at `path` under `name` (its runtime
    LoRA loading route). Raises urllib's HTTPError / URLError for the caller to word: the
    managed vLLM and an external server answer a refusal differently."""
    request = urllib.request.Request(
        f"{base_url.rstrip('/')}/load_lora_adapter",
        data=json.dumps({"lora_name": name, "lora_path": path}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()
