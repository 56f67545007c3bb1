"""Where offloaded weights come from: pinned CPU state dicts, a sepweight directory, or any `i -> state_dict`.

A source maps a module's position (0, 1, ... in the order given to `offload`) to that module's state dict,
with the module's own names (`self_attn.q_proj.weight` ...). Besides `load`, a source may say:
- `reads_into`: `load(i, into=buffer)` reads the layer into a host buffer we give it (a reused pinned
  staging buffer on CUDA, a reused RAM buffer on CPU), returning views into it;
- `zero_copy`: `load(i)` returns tensors without copying them (a memory map, or tensors already in RAM);
- `layer_nbytes(i)`, `__len__`, `hint(i)` (start reading layer i in the background, no wait).
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from llm_sepweight import format as fmt
from llm_sepweight.safetensors_file import Header

log = logging.getLogger(__name__)

StateDict = Mapping[str, torch.Tensor]
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux >= 5.14: map a file's pages, read-only


@runtime_checkable
class Source(Protocol):
    def load(self, index: int, into: torch.Tensor | None = None) -> StateDict: ...


class CallableSource:
    """Any function `i -> state_dict` (tensors anywhere; they are copied to the device as needed)."""

    reads_into = False
    zero_copy = False

    def __init__(self, fn: Callable[[int], StateDict]) -> None:
        self.fn = fn

    def load(self, index: int, into: torch.Tensor | None = None) -> StateDict:
        return self.fn(index)

    def __repr__(self) -> str:
        return f"CallableSource({getattr(self.fn, '__name__', self.fn)!r})"


class CpuSource:
    """State dicts held in CPU memory, pinned when CUDA is available so that copies run asynchronously."""

    reads_into = False
    zero_copy = True

    def __init__(self, state_dicts: Iterable[StateDict], *, pin: bool | None = None) -> None:
        if pin is None:
            pin = torch.cuda.is_available()
        self.pinned = pin
        self._layers: list[dict[str, torch.Tensor]] = []
        for i, sd in enumerate(state_dicts):
            layer = {}
            for name, t in sd.items():
                if not isinstance(t, torch.Tensor):
                    raise TypeError(
                        f"CpuSource: layer {i} tensor {name!r} is a {type(t).__name__}, not a Tensor"
                    )
                # contiguous: a strided host tensor would be staged through pageable memory on every copy
                t = t.detach().to("cpu").contiguous()
                layer[name] = t.pin_memory() if pin and not t.is_pinned() else t
            self._layers.append(layer)

    @classmethod
    def from_modules(cls, modules: Iterable[nn.Module], *, pin: bool | None = None) -> CpuSource:
        """The current weights of `modules` (call before `offload`, which releases them)."""
        return cls((m.state_dict() for m in modules), pin=pin)

    def __len__(self) -> int:
        return len(self._layers)

    def layer_nbytes(self, index: int) -> int:
        return sum(t.nbytes for t in self._layers[index].values())

    def load(self, index: int, into: torch.Tensor | None = None) -> StateDict:
        if not 0 <= index < len(self._layers):
            raise IndexError(f"CpuSource holds {len(self._layers)} layers, no layer {index}")
        return self._layers[index]

    def __repr__(self) -> str:
        return f"CpuSource({len(self._layers)} layers, pinned={self.pinned})"


def as_source(source: Any) -> Any:
    """A Source from a Source, a callable `i -> state_dict`, or a sequence of state dicts."""
    if isinstance(source, Source):
        return source
    if callable(source):
        return CallableSource(source)
    if isinstance(source, Sequence) and all(isinstance(sd, Mapping) for sd in source):
        return CpuSource(source)
    raise TypeError(
        f"source must be a Source (CpuSource, SepweightSource), a callable i -> state_dict, or a list of "
        f"state dicts; got {type(source).__name__}"
    )


# -- safetensors files, read directly -------------------------------------------------------------------------


class SafetensorsHeader:
    """The validated header of a safetensors file, read by llm_sepweight's one safetensors reader
    (`llm_sepweight.safetensors_file.Header`: offsets tiling the data, shapes matching bytes, bounded size
    and nesting; a bad file is a `SafetensorsError`, a `ValueError` naming the file and the tensor), with
    byte ranges relative to the data buffer that follows it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header = Header.read(path)
        self.data_start = header.data_start
        self.data_bytes = header.file_size - header.data_start
        # name -> (dtype, shape, begin, end), begin/end relative to data_start
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {
            name: (t.dtype, t.shape, t.start - header.data_start, t.stop - header.data_start)
            for name, t in header.tensors.items()
        }

    def views(self, data: torch.Tensor, base: int) -> dict[str, torch.Tensor]:
        """Tensors as views into `data` (uint8), whose byte `base` is the first byte of the tensor data."""
        out = {}
        for name, (dtype, shape, begin, end) in self.tensors.items():
            raw = data[base + begin : base + end]
            if (data.data_ptr() + base + begin) % dtype.itemsize:
                raw = raw.clone()  # misaligned for its dtype: copy rather than fail
            out[name] = raw.view(dtype).view(shape)
        return out


def _read_exactly(path: Path, offset: int, out: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        done = 0
        while done < len(out):
            n = f.readinto(out[done:])
            if not n:
                raise ValueError(f"{path}: truncated, {len(out) - done} bytes missing at the end")
            done += n


class SepweightSource:
    """Layers of a sepweight directory (`mid.NNNNN.safetensors` files), read by our reader threads.

    `layers` picks the directory's layers that the offloaded modules are, in order (default: all of them;
    `range(12, 24)` for a part holding layers 12..23). With `mmap=True` (the default) layers are memory-mapped
    and used in place (zero-copy: file pages in the page cache, not anonymous memory), pre-faulted by the
    reader thread; with `mmap=False`, or on CUDA, they are read into reused host buffers. A directory that
    is not a sepweight directory (an HF checkpoint) is read through `llm_sepweight.Checkpoint`.
    """

    reads_into = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layers: Iterable[int] | None = None,
        mmap: bool = True,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self._mmap = mmap
        self._checkpoint: Any = None
        if not self.path.is_dir():
            raise FileNotFoundError(f"SepweightSource: {self.path} is not a directory")
        if fmt.is_sepweight_dir(self.path):
            num_layers = int(fmt.read_manifest(self.path)["num_layers"])  # validated (ManifestError)
        else:
            self._checkpoint = _open_checkpoint(self.path)
            num_layers = int(self._checkpoint.num_layers)
            self.reads_into = False
        self.num_layers = num_layers
        self.layers = list(range(num_layers)) if layers is None else [int(i) for i in layers]
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"SepweightSource: {self.path} has layers 0..{num_layers - 1}, not {bad}")
        self._headers: dict[int, SafetensorsHeader] = {}

    @property
    def zero_copy(self) -> bool:
        return self._mmap and self._checkpoint is None and self.dtype is None

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"SepweightSource({str(self.path)!r})"

    def file(self, index: int) -> Path:
        return self.path / fmt.mid_file(self._layer(index))

    def _layer(self, index: int) -> int:
        if not 0 <= index < len(self.layers):
            raise IndexError(f"{self!r} serves {len(self.layers)} layers, no layer {index}")
        return self.layers[index]

    def header(self, index: int) -> SafetensorsHeader:
        header = self._headers.get(index)
        if header is None:
            path = self.file(index)
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing (layer {self._layer(index)} of {self.path})")
            header = self._headers[index] = SafetensorsHeader(path)
        return header

    def layer_nbytes(self, index: int) -> int | None:
        if self._checkpoint is not None:
            return None
        return self.header(index).data_bytes

    def hint(self, index: int) -> None:
        """Ask the kernel to start reading layer `index` into the page cache, without waiting."""
        if self._checkpoint is not None or not hasattr(os, "posix_fadvise"):
            return
        header = self.header(index)
        fd = os.open(self.file(index), os.O_RDONLY)
        try:
            os.posix_fadvise(fd, header.data_start, header.data_bytes, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)

    def load(self, index: int, into: torch.Tensor | None = None) -> StateDict:
        if self._checkpoint is not None:
            return self._checkpoint.layer_state_dict(self._layer(index), device="cpu", dtype=self.dtype)
        header = self.header(index)
        path = self.file(index)
        if into is not None:
            if into.numel() < header.data_bytes:
                raise ValueError(f"{path}: {header.data_bytes} bytes do not fit a buffer of {into.numel()}")
            _read_exactly(path, header.data_start, _bytes_of(into)[: header.data_bytes])
            out = header.views(into, 0)
        elif self._mmap:
            out = header.views(_map(path, header.data_start + header.data_bytes), header.data_start)
        else:
            data = torch.empty(header.data_bytes, dtype=torch.uint8)
            _read_exactly(path, header.data_start, _bytes_of(data))
            out = header.views(data, 0)
        if self.dtype is not None:
            out = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in out.items()}
        return out


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a CPU uint8 tensor (to `readinto` it)."""
    array: Any = t.numpy()
    return memoryview(array)


def _map(path: Path, size: int) -> torch.Tensor:
    """The file as a uint8 tensor over a private memory map, its pages mapped in by this (reader) thread."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < size:  # a view past the end of a mapping would crash the process (SIGBUS)
            raise ValueError(f"{path}: truncated, {size - os.fstat(fd).st_size} bytes missing at the end")
        # Private + writable so torch accepts the buffer; pages are only read, so they stay file-backed.
        mm = mmap.mmap(fd, 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)
    # Submit the whole file's reads at once (a no-op when it is in the page cache), then map its pages in
    # now, on this thread, rather than by page faults during the layer's compute.
    mm.madvise(mmap.MADV_WILLNEED)
    try:
        mm.madvise(MADV_POPULATE_READ)
    except OSError:
        mm.madvise(mmap.MADV_WILLNEED)
    return torch.frombuffer(mm, dtype=torch.uint8)


def _open_checkpoint(path: Path) -> Any:
    from llm_sepweight import Checkpoint

    return Checkpoint(path)
