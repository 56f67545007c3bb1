"""Where offloaded weights come from: pinned CPU state dicts, a sepweight directory, or any `i -> state_dict`.

A source maps a module's position (0, 1, ... in the order given to `offload`) to that module's state dict,
with the module's own names (`self_attn.q_proj.weight` ...). Besides `load`, a source may say:
- `reads_into`: `load(i, into=buffer)` reads the layer into a host buffer we give it (a reused pinned
  staging buffer on CUDA, a reused RAM buffer on CPU), returning views into it;
- `zero_copy`: `load(i)` returns tensors without copying them (a memory map, or tensors already in RAM);
- `layer_nbytes(i)`, `__len__`, `hint(i)` (start reading layer i in the background, no wait).

Files are read in byte ranges (`LayerRead`): a sepweight layer is one range of its `mid.NNNNN.safetensors`,
a layer of a Hugging Face checkpoint the ranges its tensors cover in the shards (usually one: a layer's
tensors lie back to back), so an HF directory streams from its own shards, without converting. With
`direct=True` the ranges are read with O_DIRECT (bypassing the page cache, which a model larger than RAM
would only churn through) into 4 KiB-aligned places of the reused buffer.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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


DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length on this boundary


@dataclass(frozen=True)
class FileRange:
    """Bytes [start, stop) of `path`, placed at `offset` of a layer's buffer: for O_DIRECT reads
    `offset % 4096 == start % 4096`, so that a read of the aligned range around it lands in place; otherwise
    on a 4 KiB boundary, so that the first tensor is as aligned as an allocation (see `LayerRead`)."""

    path: Path
    start: int
    stop: int
    offset: int


class LayerRead:
    """How one layer is read: the file ranges its tensors cover, where each lands in the buffer, and the
    tensors as (dtype, shape, begin, end) byte ranges of that buffer.

    Without O_DIRECT a range starts on a 4 KiB boundary of the buffer whatever its place in the file: an HF
    shard's data often starts 8 bytes past a boundary, and some CPU kernels (MKL's gemv) sum in another
    order on misaligned weights, so the layer would compute other low bits than the same layer loaded."""

    def __init__(
        self, pieces: Sequence[tuple[Path, int, int, str, torch.dtype, tuple[int, ...]]], *, direct: bool
    ) -> None:
        # pieces: (file, absolute start, absolute stop, name, dtype, shape), any order
        by_file: dict[Path, list[tuple[int, int, str, torch.dtype, tuple[int, ...]]]] = {}
        for path, start, stop, name, dtype, shape in pieces:
            by_file.setdefault(path, []).append((start, stop, name, dtype, shape))
        self.ranges: list[FileRange] = []
        self.tensors: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        offset = 0
        for path, items in by_file.items():
            items.sort(key=lambda t: t[0])
            i = 0
            while i < len(items):
                j = i + 1
                while j < len(items) and items[j][0] == items[j - 1][1]:  # back to back: one read
                    j += 1
                start, stop = items[i][0], items[j - 1][1]
                place = _round_up(offset, DIRECT_ALIGN) + (start % DIRECT_ALIGN if direct else 0)
                self.ranges.append(FileRange(path, start, stop, place))
                for b, e, name, dtype, shape in items[i:j]:
                    self.tensors[name] = (dtype, shape, place + b - start, place + e - start)
                offset = _round_up(place + stop - start, DIRECT_ALIGN) + DIRECT_ALIGN
                i = j
        self.buffer_bytes = offset + DIRECT_ALIGN  # and slack to align the buffer's own start
        self.data_bytes = sum(e - b for _, _, b, e in self.tensors.values())

    @property
    def read_bytes(self) -> int:
        return sum(r.stop - r.start for r in self.ranges)

    def views(self, data: torch.Tensor, base: int) -> dict[str, torch.Tensor]:
        out = {}
        for name, (dtype, shape, begin, end) in self.tensors.items():
            raw = data[base + begin : base + end]
            if (data.data_ptr() + base + begin) % dtype.itemsize:
                raw = raw.clone()
            out[name] = raw.view(dtype).view(shape)
        return out


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def _pread_into(fd: int, out: memoryview, offset: int) -> int:
    """One `preadv` (releases the GIL); the test suite replaces it to inject read errors."""
    return os.preadv(fd, [out], offset)


def read_range(r: FileRange, buf: memoryview, *, direct: bool, drop_cache: bool, layer: str) -> int:
    """Read one range into `buf` (whose address is 4 KiB-aligned) at `r.offset`; bytes read from the disk.

    O_DIRECT where the file system allows it (not tmpfs), else buffered reads followed by
    POSIX_FADV_DONTNEED when `drop_cache`. Errors name the file, the byte range and `layer`."""
    lo = r.start - r.start % DIRECT_ALIGN if direct else r.start
    hi = _round_up(r.stop, DIRECT_ALIGN) if direct else r.stop
    at = r.offset - (r.start - lo)
    fd = -1
    try:
        try:
            fd = os.open(r.path, os.O_RDONLY | (getattr(os, "O_DIRECT", 0) if direct else 0))
        except OSError as e:
            if not direct or e.errno != errno.EINVAL:
                raise
            return read_range(r, buf, direct=False, drop_cache=True, layer=layer)
        size = os.fstat(fd).st_size
        if size < r.stop:
            raise ValueError(f"{r.path}: truncated, {r.stop - size} bytes missing at the end ({layer})")
        done, want = 0, min(hi, _round_up(size, DIRECT_ALIGN) if direct else size) - lo
        need = r.stop - lo
        while done < need:
            try:
                n = _pread_into(fd, buf[at + done : at + want], lo + done)
            except OSError as e:
                if direct and e.errno == errno.EINVAL and done == 0:  # O_DIRECT refused at read time
                    os.close(fd)
                    fd = -1
                    return read_range(r, buf, direct=False, drop_cache=True, layer=layer)
                raise OSError(
                    e.errno, f"{r.path}: read of bytes {lo + done}-{hi} failed ({layer}): {e.strerror or e}"
                ) from e
            if n == 0:
                raise ValueError(f"{r.path}: truncated, {need - done} bytes missing at the end ({layer})")
            done += n
        if drop_cache and not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
        return done
    finally:
        if fd >= 0:
            os.close(fd)


def aligned(buf: torch.Tensor) -> int:
    """Bytes to skip from the start of `buf` to reach a 4 KiB boundary."""
    return -buf.data_ptr() % DIRECT_ALIGN


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
    """Layers of a sepweight directory (`mid.NNNNN.safetensors` files), or of a Hugging Face checkpoint
    directory straight from its safetensors shards, read by our reader threads.

    `layers` picks the directory's layers that the offloaded modules are, in order (default: all of them;
    `range(12, 24)` for a part holding layers 12..23). With `mmap=True` (the default) the layers of a
    sepweight directory are memory-mapped and used in place (zero-copy: file pages in the page cache, not
    anonymous memory), pre-faulted by the reader thread; with `mmap=False`, on CUDA, or for an HF
    directory, they are read into reused host buffers. `direct=True` reads with O_DIRECT, bypassing the
    page cache (for a model larger than RAM, which the page cache can only churn through); where the file
    system refuses O_DIRECT (tmpfs) it reads normally and drops the pages it read (POSIX_FADV_DONTNEED).
    `dtype` casts on the reader thread; leave it None to compute in the stored dtype, or to let the modules'
    own dtype decide (a bf16 file feeding fp32 modules is upcast as each layer arrives).
    An HF directory whose weights are not safetensors is read through `llm_sepweight.Checkpoint`.
    """

    reads_into = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        layers: Iterable[int] | None = None,
        mmap: bool = True,
        direct: bool = False,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.direct = direct
        self._mmap = mmap and not direct
        self._checkpoint: Any = None
        self._hf = False
        if not self.path.is_dir():
            raise FileNotFoundError(f"SepweightSource: {self.path} is not a directory")
        if fmt.is_sepweight_dir(self.path):
            num_layers = int(fmt.read_manifest(self.path)["num_layers"])  # validated (ManifestError)
        else:
            self._checkpoint = _open_checkpoint(self.path)
            num_layers = int(self._checkpoint.num_layers)
            self._hf = all(f.endswith(".safetensors") for f in self._checkpoint.files("b e"))
            if not self._hf:
                self.reads_into = False
        self.num_layers = num_layers
        self.layers = list(range(num_layers)) if layers is None else [int(i) for i in layers]
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"SepweightSource: {self.path} has layers 0..{num_layers - 1}, not {bad}")
        self._headers: dict[int, SafetensorsHeader] = {}
        self._reads: dict[int, LayerRead] = {}
        self._file_headers: dict[Path, Header] = {}
        self.bytes_read = 0  # from the files, by `load` (all threads), since creation or `reset_bytes_read`

    @property
    def zero_copy(self) -> bool:
        return self._mmap and self._checkpoint is None and self.dtype is None

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return f"SepweightSource({str(self.path)!r})"

    def file(self, index: int) -> Path:
        """The (first) file holding layer `index`."""
        if self._checkpoint is not None:
            return self.path / self._checkpoint.files(f"{self._layer(index)}-{self._layer(index) + 1}")[0]
        return self.path / fmt.mid_file(self._layer(index))

    def _layer(self, index: int) -> int:
        if not 0 <= index < len(self.layers):
            raise IndexError(f"{self!r} serves {len(self.layers)} layers, no layer {index}")
        return self.layers[index]

    def _what(self, index: int) -> str:
        return f"layer {self._layer(index)} of {self.path}"

    def header(self, index: int) -> SafetensorsHeader:
        header = self._headers.get(index)
        if header is None:
            path = self.file(index)
            if not path.exists():
                raise FileNotFoundError(f"{path}: missing ({self._what(index)})")
            header = self._headers[index] = SafetensorsHeader(path)
        return header

    def keys(self, index: int) -> Iterable[str]:
        """The tensor names of layer `index` (read from the headers only)."""
        return self.plan(index).tensors.keys()

    def plan(self, index: int) -> LayerRead:
        """The byte ranges layer `index` is read from (headers read once, then cached)."""
        read = self._reads.get(index)
        if read is not None:
            return read
        if self._checkpoint is None:
            h = self.header(index)
            path = self.file(index)
            pieces = [
                (path, h.data_start + b, h.data_start + e, name, dtype, shape)
                for name, (dtype, shape, b, e) in h.tensors.items()
            ]
        elif self._hf:
            pieces = self._hf_pieces(self._layer(index))
        else:
            raise TypeError(f"{self.path}: not safetensors; layers are read through llm_sepweight.Checkpoint")
        read = self._reads[index] = LayerRead(pieces, direct=self.direct)
        return read

    def _hf_pieces(self, layer: int) -> list[tuple[Path, int, int, str, torch.dtype, tuple[int, ...]]]:
        from llm_sepweight.names import split_names

        pieces = []
        for file in self._checkpoint.files(f"{layer}-{layer + 1}"):
            path = self.path / file
            header = self._file_headers.get(path)
            if header is None:
                if not path.is_file():
                    raise FileNotFoundError(f"{path}: missing (layer {layer} of {self.path})")
                header = self._file_headers[path] = Header.read(path)
            where = split_names(self._checkpoint.architecture, header.tensors, self.num_layers)
            for key, loc in where.items():
                if loc.section == "mid" and loc.layer == layer:
                    t = header.tensors[key]
                    pieces.append((path, t.start, t.stop, loc.name, t.dtype, tuple(t.shape)))
        if not pieces:
            raise KeyError(f"{self.path}: no tensors for layer {layer} in its shards")
        return pieces

    def layer_nbytes(self, index: int) -> int | None:
        if self._checkpoint is not None and not self._hf:
            return None
        if self._checkpoint is None and not self.direct:
            return self.header(index).data_bytes
        return self.plan(index).buffer_bytes

    def hint(self, index: int) -> None:
        """Ask the kernel to start reading layer `index` into the page cache, without waiting (not with
        `direct=True`: those reads bypass the page cache)."""
        if self.direct or (self._checkpoint is not None and not self._hf) or not hasattr(os, "posix_fadvise"):
            return
        for r in self.plan(index).ranges:
            fd = os.open(r.path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, r.start, r.stop - r.start, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def reset_bytes_read(self) -> int:
        n, self.bytes_read = self.bytes_read, 0
        return n

    def load(self, index: int, into: torch.Tensor | None = None) -> StateDict:
        if self._checkpoint is not None and not self._hf:
            return self._checkpoint.layer_state_dict(self._layer(index), device="cpu", dtype=self.dtype)
        if self._checkpoint is None and not self.direct:
            out = self._load_sepweight(index, into)
        else:
            read = self.plan(index)
            if into is None or into.numel() < read.buffer_bytes:
                into = torch.empty(read.buffer_bytes, dtype=torch.uint8)
            base = aligned(into)
            buf = _bytes_of(into)[base:]
            what = self._what(index)
            for r in read.ranges:
                n = read_range(r, buf, direct=self.direct, drop_cache=self.direct, layer=what)
                self.bytes_read += n  # not `+= read_range(...)`: that reads the counter before the read
            out = read.views(into, base)
        if self.dtype is not None:
            out = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in out.items()}
        return out

    def _load_sepweight(self, index: int, into: torch.Tensor | None) -> dict[str, torch.Tensor]:
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
        self.bytes_read += header.data_bytes
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
