"""Exact 1-D convolution with numpy.convolve semantics, computed block by block with halos.

A series split into blocks of any sizes (in any number of partitions, streams and batches)
gives the same samples as numpy.convolve over the whole series: every block is convolved
together with the neighbouring samples it needs (its halo), so no term that crosses a block
boundary is lost.

Geometry, for a series of N samples and a kernel of L taps, with m = min(N, L):
  output o is numpy's y[o] = sum_j k[j] * x[o + s - j]   (x = 0 outside 0..N-1)
  s = 0 (full), (m - 1) // 2 (same), m - 1 (valid)
  output length N+L-1 (full), max(N, L) (same), max(N, L) - m + 1 (valid)
so output o reads the inputs o+s-L+1 .. o+s. The input sample a "owns" output a, and the last
sample also owns the outputs past N; a block owning outputs [a, b) needs hl = L-1-s samples
before it and hr = s after it.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

from ferry.arrow import column_numpy, complex_from_columns
from ferry.errors import InputError, InvalidParamsError
from ferry.registry import Param, require_columns, stage

MODES = ("full", "same", "valid")

#: Above this many taps a block is convolved by FFT overlap-save (_full_convolve), up to it
#: directly (numpy.convolve). benchmarks/results/convolve_sweep.md: since the overlap-save, the
#: FFT path is faster than numpy.convolve for complex128 at every kernel length (1.2-1.6x at 2-16
#: taps, 14x at 1024), so this is a precision choice, not a speed one: up to 16 taps the direct
#: sums are numpy's own, bit for bit, and cost at most 1.6x the FFT's time.
DIRECT_MAX_TAPS = 16


def geometry(n: int, taps: int, mode: str) -> tuple[int, int]:
    """(s, output length) for a series of n samples and a kernel of taps taps."""
    m = min(n, taps)
    if mode == "full":
        return 0, n + taps - 1
    if mode == "same":
        return (m - 1) // 2, max(n, taps)
    if mode == "valid":
        return m - 1, max(n, taps) - m + 1
    raise InvalidParamsError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")


def halo_sizes(n: int, taps: int, mode: str) -> tuple[int, int]:
    """(samples needed before a block, samples needed after it)."""
    s, _ = geometry(n, taps, mode)
    return taps - 1 - s, s


def runs_of(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start offsets, end offsets) of the maximal runs of ids that rise by exactly one."""
    if ids.size == 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    return np.concatenate(([0], breaks)), np.concatenate((breaks, [ids.size]))


def _check_kernel(kernel) -> np.ndarray:
    kernel = np.asarray(kernel)
    if kernel.ndim != 1:
        raise ValueError(f"kernel must be 1-D, got an array of shape {kernel.shape}")
    if kernel.size == 0:
        raise ValueError("kernel cannot be empty: give at least one tap")
    return kernel


def _full_convolve(x: np.ndarray, kernel: np.ndarray, spectra: dict | None = None) -> np.ndarray:
    """numpy.convolve(x, kernel, 'full'), by FFT overlap-save when that is faster and exact enough.

    ``spectra`` caches the kernel's spectrum per FFT size and dtype across calls (a stream
    convolves one kernel with every batch)."""
    if (kernel.size > DIRECT_MAX_TAPS and x.size > DIRECT_MAX_TAPS
            and x.dtype.kind in "fc" and kernel.dtype.kind in "fc"
            and np.isfinite(x).all() and np.isfinite(kernel).all()):
        # FFT spreads a NaN or inf over its whole block; numpy confines it to the outputs that
        # read it, so non-finite blocks take the direct path below.
        return _overlap_save_full(x, kernel, {} if spectra is None else spectra)
    return np.convolve(x, kernel, mode="full")


#: FFT frames are about this many kernel lengths long: long enough that little of each frame is
#: lost to the kernel's overlap, short enough to stay in cache (for 1024 taps on 65,536-sample
#: batches, 4096-point frames; benchmarks/results/convolve_sweep.md: 1.3 ms a batch against
#: scipy.signal.oaconvolve's 2.0 ms, whose full mode recomputes the kernel's FFT every call).
_FRAME_KERNELS = 4
_MIN_FRAME = 1024
_GROUP_SAMPLES = 1 << 16


def _overlap_save_full(x: np.ndarray, kernel: np.ndarray, spectra: dict) -> np.ndarray:
    import scipy.fft  # deferred: import time that short kernels never need

    dtype = np.result_type(x, kernel)
    if dtype.kind == "f" and dtype.itemsize < 4:
        dtype = np.dtype(np.float32)
    real = dtype.kind == "f"
    taps = kernel.size
    n_out = x.size + taps - 1
    frame = max(_MIN_FRAME, 1 << (_FRAME_KERNELS * taps - 1).bit_length())
    if frame >= n_out:
        frame = scipy.fft.next_fast_len(n_out, real=real)
    step = frame - taps + 1
    frames = -(-n_out // step)
    key = (frame, dtype.str)
    spectrum = spectra.get(key)
    if spectrum is None:
        k = kernel.astype(dtype, copy=False)
        spectrum = scipy.fft.rfft(k, frame) if real else scipy.fft.fft(k, frame)
        spectra.clear()  # one kernel per stream: keep only the size in use
        spectra[key] = spectrum
    # The full convolution is the 'valid' part of x padded with taps - 1 zeros on both sides:
    # frame i reads padded[i * step : i * step + frame] and keeps its last `step` outputs.
    padded = np.zeros(frames * step + taps - 1, dtype=dtype)
    padded[taps - 1: taps - 1 + x.size] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded, frame)[::step]
    out = np.empty((frames, step), dtype=dtype)
    # Frames go through the FFT in groups of about _GROUP_SAMPLES samples, which stay in cache.
    group = max(1, _GROUP_SAMPLES // frame)
    for a in range(0, frames, group):
        w = windows[a:a + group]
        if real:
            y = scipy.fft.irfft(scipy.fft.rfft(w, axis=1) * spectrum, frame, axis=1)
        else:
            y = scipy.fft.ifft(scipy.fft.fft(w, axis=1) * spectrum, axis=1)
        out[a:a + group] = y[:, taps - 1:]
    return out.reshape(-1)[:n_out].astype(np.result_type(x, kernel), copy=False)


class StreamConvolver:
    """Convolves a series that arrives in blocks, possibly as several disjoint segments.

    ``feed(ids, x, halo)`` takes samples with their ids; ids must increase by one within a
    segment, and any other step starts a new segment. Rows flagged ``halo`` give context only.
    It returns the (ids, values) of every owned output that became computable, in ascending
    order. ``finish()`` checks that no owned output is left waiting for samples that never came.
    """

    def __init__(self, kernel, mode: str, length: int):
        self.kernel = _check_kernel(kernel)
        if length < 1:
            raise InvalidParamsError(
                f"length must be the number of samples in the whole series (>= 1), got {length}"
            )
        self.n = int(length)
        self.taps = self.kernel.size
        self.s, self.out_len = geometry(self.n, self.taps, mode)
        self.mode = mode
        self._ctx: np.ndarray | None = None  # samples of ids [_ctx_start, _ctx_start + len)
        self._ctx_start = 0
        self._next_out = 0   # next owned output to emit
        self._own_end = 0    # end of the owned outputs known so far
        self._owning = False
        self._anchor_end = 0  # one past the last owned input id
        self._dtype = None
        self._spectra: dict = {}  # the kernel's FFT, per frame size (see _full_convolve)

    @property
    def _ctx_end(self) -> int:
        return self._ctx_start + (0 if self._ctx is None else self._ctx.size)

    def feed(self, ids: np.ndarray, x: np.ndarray, halo: np.ndarray | None = None):
        ids = np.asarray(ids, dtype=np.int64)
        x = np.asarray(x)
        if ids.shape != x.shape or ids.ndim != 1:
            raise InputError(f"ids and samples must be 1-D of one length, got {ids.shape} and {x.shape}")
        if halo is not None and np.asarray(halo).shape != ids.shape:
            raise InputError(f"halo flags must have one per sample, got {np.asarray(halo).shape} for {ids.shape}")
        if self._dtype is None:
            self._dtype = np.result_type(x.dtype, self.kernel.dtype)
        outs = []
        if ids.size:
            bad = (ids < 0) | (ids >= self.n)
            if bad.any():
                raise InputError(
                    f"Sample id {int(ids[bad][0])} is outside the series 0..{self.n - 1} (length {self.n}); "
                    "ids must be the sample indices of one series"
                )
            # Each run of +1 ids is a segment; the first one continues the context only if it
            # follows it by one (checked in _feed_segment).
            for a, b in zip(*runs_of(ids)):
                part = self._feed_segment(int(ids[a]), x[a:b], None if halo is None else np.asarray(halo[a:b], bool))
                if part is not None:
                    outs.append(part)
        if not outs:
            return np.empty(0, np.int64), np.empty(0, self._dtype or self.kernel.dtype)
        return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])

    def finish(self) -> None:
        self._check_complete("the stream ended")

    def _check_complete(self, why: str) -> None:
        if self._owning and self._next_out < self._own_end:
            need_to = min(self._own_end - 1 + self.s, self.n - 1)
            raise InputError(
                f"Outputs {self._next_out}..{self._own_end - 1} need samples up to id {need_to}, but {why} "
                f"after id {self._ctx_end - 1}; send the {self.s} samples after each block as halo rows "
                f"(mode {self.mode!r}, {self.taps} taps)"
            )

    def _feed_segment(self, first_id: int, x: np.ndarray, halo: np.ndarray | None):
        if self._ctx is None or first_id != self._ctx_end:
            if self._ctx is not None:
                self._check_complete(f"a new segment started at id {first_id}")
            self._ctx, self._ctx_start = x[:0], first_id
            self._owning = False
        if halo is None:
            return self._feed_part(first_id, x, owned=True)
        # Owned rows and halo rows alternate at most a few times (a run's halos abut the next run's).
        flips = np.flatnonzero(np.diff(halo)) + 1
        outs = [self._feed_part(first_id + a, x[a:b], owned=not halo[a])
                for a, b in zip(np.concatenate(([0], flips)), np.concatenate((flips, [x.size])))]
        outs = [o for o in outs if o is not None]
        if len(outs) > 1:
            return np.concatenate([o[0] for o in outs]), np.concatenate([o[1] for o in outs])
        return outs[0] if outs else None

    def _feed_part(self, first_id: int, x: np.ndarray, owned: bool):
        if owned:
            self._own(first_id, first_id + x.size)
        self._ctx = np.concatenate((self._ctx, x)) if self._ctx.size else x
        return self._emit()

    def _own(self, a0: int, a1: int) -> None:
        hi = self.out_len if a1 == self.n else min(a1, self.out_len)
        if a0 >= hi:
            return
        if self._owning and a0 != self._anchor_end:
            # Owned rows resume after halo rows: everything owned before must be out already.
            self._check_complete(f"owned rows resumed at id {a0}")
            self._owning = False
        if not self._owning:
            self._owning, self._next_out = True, a0
        self._own_end, self._anchor_end = hi, a1

    def _emit(self):
        if not self._owning:
            self._trim(self._ctx_end)
            return None
        end = self._ctx_end
        hi = self._own_end if end == self.n else min(self._own_end, end - self.s)
        lo = self._next_out
        if hi <= lo:
            return None
        first_needed = max(lo + self.s - self.taps + 1, 0)
        if first_needed < self._ctx_start:
            raise InputError(
                f"Output {lo} needs samples from id {first_needed}, but its block starts at id {self._ctx_start}; "
                f"send the {self.taps - 1 - self.s} samples before each block as halo rows "
                f"(mode {self.mode!r}, {self.taps} taps)"
            )
        last_needed = min(hi - 1 + self.s, self.n - 1)
        window = self._ctx[first_needed - self._ctx_start: last_needed + 1 - self._ctx_start]
        full = _full_convolve(window, self.kernel, self._spectra)
        # full[t] is the window's full convolution at input position first_needed + t, i.e. output
        # first_needed + t - s: output lo sits at t = lo + s - first_needed.
        offset = lo + self.s - first_needed
        values = full[offset: offset + (hi - lo)]
        self._next_out = hi
        self._trim(hi + self.s - self.taps + 1)
        return np.arange(lo, hi, dtype=np.int64), values

    def _trim(self, keep_from: int) -> None:
        # Keep the samples future outputs can still read; ids before keep_from are never read again.
        cut = min(max(keep_from - self._ctx_start, 0), self._ctx.size)
        cut = min(cut, max(self._ctx.size - (self.taps - 1), 0)) if not self._owning else cut
        if cut:
            self._ctx = self._ctx[cut:].copy()
            self._ctx_start += cut


def convolve(x, kernel, mode: str = "same", *, block_size: int | None = None) -> np.ndarray:
    """Discrete linear convolution with exactly numpy.convolve's semantics.

    Parameters
    ----------
    x, kernel : array_like, 1-D
        The series and the kernel (complex128, float64, float32 or integer).
    mode : {"full", "same", "valid"}
        As in numpy.convolve; the output has the same length and dtype as numpy's.
    block_size : int, optional
        Convolve in blocks of this many samples with halos (what the distributed paths do);
        the result is the same as over the whole series. Default: one block.

    Examples
    --------
    >>> import numpy as np, ferry
    >>> x = np.arange(6.0)
    >>> bool(np.allclose(ferry.convolve(x, [1, 2, 3], block_size=2), np.convolve(x, [1, 2, 3], "same")))
    True
    """
    x = np.asarray(x)
    kernel = np.asarray(kernel)
    if x.ndim != 1:
        raise ValueError(f"x must be 1-D, got an array of shape {x.shape}")
    if x.size == 0:
        raise ValueError("x cannot be empty (numpy.convolve raises too): give at least one sample")
    kernel = _check_kernel(kernel)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if block_size is not None and (int(block_size) != block_size or block_size < 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
    conv = StreamConvolver(kernel, mode, x.size)
    step = x.size if block_size is None else int(block_size)
    ids = np.arange(x.size, dtype=np.int64)
    pieces = [conv.feed(ids[i:i + step], x[i:i + step])[1] for i in range(0, x.size, step)]
    conv.finish()
    return np.concatenate(pieces).astype(np.result_type(x, kernel), copy=False)


# --- The stage contract -----------------------------------------------------------------------

_OUTPUT = pa.schema([("id", pa.int64()), ("real", pa.float64()), ("imag", pa.float64())])
_INPUT_DOC = ("id int64 (sample index, 0..length-1), real float64, imag float64, "
              "and optionally halo bool (context rows that own no output)")


def _output_schema(input_schema: pa.Schema, params: dict) -> pa.Schema:
    require_columns("convolve", input_schema,
                    {"id": pa.int64(), "real": pa.float64(), "imag": pa.float64(), "halo": pa.bool_()},
                    optional=("halo",))
    _kernel(params)
    return _OUTPUT


def _kernel(params: dict) -> np.ndarray:
    real = params["kernel_real"]
    imag = params["kernel_imag"]
    if not real:
        raise InvalidParamsError("Stage 'convolve' param 'kernel_real' cannot be empty: give at least one tap")
    if imag and len(imag) != len(real):
        raise InvalidParamsError(
            f"Stage 'convolve': kernel_imag has {len(imag)} taps but kernel_real has {len(real)}; "
            "give both parts for every tap, or leave kernel_imag empty for a real kernel"
        )
    return complex_from_columns(np.asarray(real, np.float64), np.asarray(imag, np.float64) if imag else None)


@stage(
    "convolve",
    params=[
        Param("kernel_real", "float_list", "Real parts of the kernel taps (at least one)."),
        Param("kernel_imag", "float_list", "Imaginary parts of the taps; empty for a real kernel.", default=[]),
        Param("mode", "string", "numpy.convolve mode.", default="same", choices=MODES),
        Param("length", "int", "Samples in the whole series (ids 0..length-1); required to run.", default=-1),
    ],
    output_schema=_output_schema,
    input_doc=_INPUT_DOC,
)
class ConvolveStage:
    """Exact convolution with numpy.convolve semantics over a series sent in blocks with halos.

    Each input id a owns output a (the last id also owns the outputs past the series); halo rows
    give context only. Outputs are emitted as soon as their inputs have arrived.
    """

    def __init__(self, kernel_real, kernel_imag, mode, length):
        if length < 1:
            raise InvalidParamsError(
                f"Stage 'convolve' needs param 'length' = the number of samples in the whole series "
                f"(>= 1) to run, got {length}"
            )
        self._conv = StreamConvolver(_kernel({"kernel_real": kernel_real, "kernel_imag": kernel_imag}),
                                     mode, length)

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        ids = column_numpy(batch, "id", np.int64)
        x = complex_from_columns(column_numpy(batch, "real", np.float64), column_numpy(batch, "imag", np.float64))
        halo = column_numpy(batch, "halo", bool) if "halo" in batch.schema.names else None
        out_ids, y = self._conv.feed(ids, x, halo)
        return pa.RecordBatch.from_arrays(
            [pa.array(out_ids), pa.array(np.ascontiguousarray(y.real)), pa.array(np.ascontiguousarray(y.imag))],
            schema=_OUTPUT,
        )

    def finish(self):
        self._conv.finish()
        return None
