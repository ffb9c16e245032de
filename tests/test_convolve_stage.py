"""The convolve stage against numpy.convolve: modes, lengths, kernels, blocks, dtypes, errors."""
import numpy as np
import pytest

import ferry
from ferry.errors import InputError, InvalidParamsError
from ferry.stages.convolve import DIRECT_MAX_TAPS, StreamConvolver, geometry, halo_sizes

MODES = ["full", "same", "valid"]
LENGTHS = [1, 2, 3, 4, 5, 7, 63, 64, 65, 999, 1000, 1001, 4097, 100_000]
TAPS = [1, 2, 3, 4, 5, 64, 1000]


def rel_err(got, want):
    scale = np.max(np.abs(want)) if want.size else 1.0
    return float(np.max(np.abs(got - want)) / max(scale, np.finfo(float).tiny)) if want.size else 0.0


def series(rng, n, complex_=True):
    x = rng.standard_normal(n)
    return x + 1j * rng.standard_normal(n) if complex_ else x


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("taps", TAPS)
def test_whole_series_equals_numpy(mode, taps):
    rng = np.random.default_rng(taps)
    k = series(rng, taps)
    for n in LENGTHS:
        for complex_ in (True, False):
            x = series(rng, n, complex_)
            want = np.convolve(x, k if complex_ else k.real, mode)
            got = ferry.convolve(x, k if complex_ else k.real, mode)
            assert got.shape == want.shape and got.dtype == want.dtype, (n, taps, mode)
            assert rel_err(got, want) < 1e-12, (n, taps, mode, complex_)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("taps", TAPS)
@pytest.mark.parametrize("block", [1, 2, 3, 17, 64, 1000, 4096])
def test_blocks_of_any_size_equal_whole_series(mode, taps, block):
    rng = np.random.default_rng(1000 * taps + block)
    k = series(rng, taps)
    for n in LENGTHS:
        if n // block > 5000:
            continue  # block size 1 over 10^5 samples adds nothing but minutes
        x = series(rng, n)
        want = np.convolve(x, k, mode)
        got = ferry.convolve(x, k, mode, block_size=block)
        assert got.shape == want.shape
        assert rel_err(got, want) < 1e-12, (n, taps, mode, block)


@pytest.mark.parametrize("seed", range(40))
def test_random_blocks_segments_and_halos(seed):
    """A series cut at random into runs fed out of order, each between its halos, as Spark does."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    taps = int(rng.choice(TAPS))
    mode = MODES[seed % 3]
    x, k = series(rng, n), series(rng, taps)
    want = np.convolve(x, k, mode)
    cuts = np.unique(np.concatenate(([0, n], rng.integers(0, n, size=int(rng.integers(0, 12))))))
    runs = list(zip(cuts[:-1], cuts[1:]))
    rng.shuffle(runs)
    hl, hr = halo_sizes(n, taps, mode)
    got = np.full(want.shape, np.nan + 0j)
    conv = StreamConvolver(k, mode, n)  # one stream carrying every run, like one Spark partition
    for a, b in runs:
        ids = np.arange(max(0, a - hl), min(n, b + hr))
        halo = (ids < a) | (ids >= b)
        pos = 0
        while pos < ids.size:  # random batch sizes within the run
            step = int(rng.integers(1, 700))
            out_ids, y = conv.feed(ids[pos:pos + step], x[ids[pos:pos + step]], halo[pos:pos + step])
            assert np.all(np.isnan(got[out_ids])), "an output was emitted twice"
            got[out_ids] = y
            pos += step
    conv.finish()
    assert not np.isnan(got).any(), "an output was never emitted"
    assert rel_err(got, want) < 1e-12


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12), (np.complex128, 1e-12),
                                       (np.complex64, 1e-5)])
@pytest.mark.parametrize("taps", [5, 1000])
def test_dtypes_follow_numpy(dtype, tol, taps):
    rng = np.random.default_rng(7)
    x = series(rng, 5000).astype(dtype) if np.dtype(dtype).kind == "c" else rng.standard_normal(5000).astype(dtype)
    k = rng.standard_normal(taps).astype(dtype)
    want = np.convolve(x, k, "same")
    got = ferry.convolve(x, k, "same", block_size=777)
    assert got.dtype == want.dtype
    assert rel_err(got.astype(np.complex128), want.astype(np.complex128)) < tol


def test_integers_are_exact():
    x = np.arange(-50, 50)
    k = np.array([3, -1, 2, 7])
    got = ferry.convolve(x, k, "full", block_size=9)
    assert got.dtype == np.convolve(x, k).dtype
    np.testing.assert_array_equal(got, np.convolve(x, k, "full"))


@pytest.mark.parametrize("taps", [5, DIRECT_MAX_TAPS + 1, 1000])
def test_nan_and_inf_propagate_as_numpy(taps):
    rng = np.random.default_rng(3)
    x = series(rng, 4000)
    x[100], x[2500] = np.nan, np.inf
    k = series(rng, taps)
    want = np.convolve(x, k, "same")
    got = ferry.convolve(x, k, "same", block_size=333)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    assert rel_err(got[finite], want[finite]) < 1e-12


def test_fft_path_is_used_for_long_kernels_and_stays_exact():
    rng = np.random.default_rng(11)
    x, k = series(rng, 200_000), series(rng, 1000)
    assert k.size > DIRECT_MAX_TAPS
    assert rel_err(ferry.convolve(x, k, "valid", block_size=65536), np.convolve(x, k, "valid")) < 1e-12


def test_geometry_matches_numpy_lengths():
    for n in [1, 2, 5, 64, 100]:
        for taps in [1, 2, 5, 64, 100]:
            for mode in MODES:
                assert geometry(n, taps, mode)[1] == np.convolve(np.ones(n), np.ones(taps), mode).size


@pytest.mark.parametrize("x,k,mode,match", [
    ([], [1.0], "same", "x cannot be empty"),
    ([1.0], [], "same", "kernel cannot be empty"),
    ([1.0], [1.0], "middle", "mode must be one of full, same, valid"),
    ([[1.0]], [1.0], "same", "x must be 1-D"),
    ([1.0], [[1.0]], "same", "kernel must be 1-D"),
])
def test_bad_arguments_raise_clear_errors(x, k, mode, match):
    with pytest.raises(ValueError, match=match):
        ferry.convolve(x, k, mode)


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        ferry.convolve([1.0, 2.0], [1.0], block_size=0)


def test_stream_errors_name_the_missing_samples():
    conv = StreamConvolver(np.ones(5), "same", 100)
    with pytest.raises(InputError, match="needs samples from id 8, but its block starts at id 10"):
        conv.feed(np.arange(10, 20), np.ones(10))  # no left halo
    conv = StreamConvolver(np.ones(5), "same", 100)
    conv.feed(np.arange(0, 20), np.ones(20))
    with pytest.raises(InputError, match=r"Outputs 18\.\.19 need samples up to id 21"):
        conv.feed(np.arange(50, 60), np.ones(10))  # jumped without a right halo
    conv = StreamConvolver(np.ones(5), "same", 100)
    conv.feed(np.arange(0, 20), np.ones(20))
    with pytest.raises(InputError, match="the stream ended"):
        conv.finish()
    with pytest.raises(InputError, match="outside the series 0..99"):
        StreamConvolver(np.ones(5), "same", 100).feed(np.array([100]), np.ones(1))
    with pytest.raises(InvalidParamsError, match="length must be the number of samples"):
        StreamConvolver(np.ones(5), "same", 0)


@pytest.mark.parametrize("taps", [DIRECT_MAX_TAPS + 1, 255, 256, 1000, 1024, 5000])
def test_overlap_save_frames_and_groups_equal_numpy(taps):
    # Lengths around whole frames and whole FFT groups (the frame is 4 kernels long, at least
    # 1024 points; groups hold 65,536 samples), real and complex, float64 and float32.
    rng = np.random.default_rng(taps)
    for n in [m for m in (taps + 1, 1023, 1024, 4096 - taps + 1, 65536 + 7, 200_003) if m > 0]:
        for cplx in (True, False):
            x = series(rng, n) if cplx else rng.standard_normal(n)
            k = series(rng, taps) if cplx else rng.standard_normal(taps)
            for dtype_x, tol in ((x, 1e-12), (x.astype(np.complex64 if cplx else np.float32), 1e-5)):
                kk = k.astype(dtype_x.dtype)
                want = np.convolve(dtype_x.astype(np.complex128 if cplx else np.float64), kk, "full")
                got = ferry.convolve(dtype_x, kk, "full")
                assert got.dtype == np.convolve(dtype_x, kk).dtype
                assert rel_err(got, want) < tol, (n, taps, cplx, dtype_x.dtype)
