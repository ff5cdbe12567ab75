"""Reading a distributed (sharded) checkpoint folder without running code stored in it.

torch.distributed.checkpoint unpickles a folder's ``.metadata`` with plain `pickle` and its non-tensor
values with ``torch.load(weights_only=False)``, so a folder from an untrusted source could run any code
when it is loaded. `SafeReader` unpickles ``.metadata`` allowing only the classes DCP writes there, and
`TensorsOnlyPlanner` refuses a pickled value where tensors are asked for; `check_distributed_checkpoint`
checks a whole folder (its non-tensor values with ``weights_only=True``) before Lightning, which uses
DCP's defaults, resumes from it.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

_METADATA = ".metadata"
_ALLOWED = {
    *(("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),  # storage_meta.checkpoint_id: the folder as Lightning gives it
    ("pathlib", "WindowsPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes on the allow-list (and torch dtypes); anything else is refused unbuilt."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "pathlib._local":  # where Python 3.13 (only) defines the pathlib classes; older ones lack it
            module = "pathlib"
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not a class a distributed checkpoint's metadata holds")


def read_metadata(folder: str | os.PathLike) -> Metadata:
    """The `Metadata` of a distributed checkpoint folder, unpickled with the allow-list; a ValueError naming
    the file when it holds anything else."""
    path = Path(folder) / _METADATA
    try:
        with path.open("rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is refused: it is no distributed-checkpoint metadata quietdepth reads without "
                         f"running code from it ({error})") from error
    if not isinstance(metadata, Metadata):
        raise ValueError(f"{path} is refused: it holds a {type(metadata).__name__}, not a distributed checkpoint's "
                         "Metadata")
    return metadata


class SafeReader(FileSystemReader):
    """`FileSystemReader` whose ``.metadata`` is read by `read_metadata` (the allow-list)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyPlanner(DefaultLoadPlanner):
    """`DefaultLoadPlanner` for a state dict of tensors: a value the checkpoint stores as pickled bytes (which
    DCP would read with ``weights_only=False``) is refused unread."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise ValueError(f"{read_item.dest_index.fqn} is stored as a pickled value, not a tensor: refused (reading it "
                         "could run code from the checkpoint)")


def check_distributed_checkpoint(folder: str | os.PathLike) -> None:
    """Refuse (ValueError) a distributed checkpoint folder whose metadata or non-tensor values could run code
    when DCP's default reader and planner load them, as Lightning's resume does. Tensors DCP reads with
    ``weights_only=True`` itself."""
    metadata = read_metadata(folder)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        with (Path(folder) / info.relative_path).open("rb") as f:
            f.seek(info.offset)
            value = io.BytesIO(f.read(info.length))
        try:
            torch.load(value, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise ValueError(f"{folder} is refused: the value of {index.fqn} would need arbitrary unpickling "
                             "(torch.load(weights_only=True) cannot read it)") from error
