"""LOPQ inputs: .fvecs files, and the reference's text lines of pickled arrays (numpy only)."""
import base64
import os
import pickle
import struct

import numpy as np
import pytest

from ferry.errors import InputError
from ferry.lopq import (UnsafePickleError, format_code_line, parse_text_line, read_fvecs, read_text_vectors,
                        write_fvecs)
from ferry.stages.lopq.io import loads_vector
from tests.paths import LOPQ_DATA

OXFORD = os.path.join(LOPQ_DATA, "oxford_features.fvecs")


def test_oxford_fvecs_reads_as_texmex_says():
    X = read_fvecs(OXFORD)
    assert X.shape == (5063, 128) and X.dtype == np.float32
    with open(OXFORD, "rb") as f:
        head = f.read(4 + 4 * 128 * 2 + 4)
    # Record 0: int32 128 then 128 float32; record 1 starts with 128 again.
    assert struct.unpack("<i", head[:4])[0] == 128
    np.testing.assert_array_equal(X[0], np.frombuffer(head[4:4 + 512], "<f4"))
    assert struct.unpack("<i", head[516:520])[0] == 128
    assert read_fvecs(OXFORD, max_rows=7).shape == (7, 128)


def test_fvecs_round_trip_and_errors(tmp_path):
    X = np.random.default_rng(0).standard_normal((9, 6)).astype(np.float32)
    path = tmp_path / "x.fvecs"
    write_fvecs(path, X)
    np.testing.assert_array_equal(read_fvecs(path), X)
    data = path.read_bytes()
    (tmp_path / "cut.fvecs").write_bytes(data[:-5])
    with pytest.raises(InputError, match=r"not a whole number of 28-byte records.*truncated"):
        read_fvecs(tmp_path / "cut.fvecs")
    mixed = bytearray(data)
    mixed[28:32] = struct.pack("<i", 5)           # record 1 claims dimension 5
    (tmp_path / "mixed.fvecs").write_bytes(bytes(mixed))
    with pytest.raises(InputError, match=r"record 1 has dimension 5, the first has 6"):
        read_fvecs(tmp_path / "mixed.fvecs")


def line(key, obj, protocol=2):
    return f"{key}\t{base64.b64encode(pickle.dumps(obj, protocol=protocol)).decode()}"


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16])
def test_text_lines_of_pickled_arrays_read_through_the_numpy_only_unpickler(protocol, dtype):
    v = (np.arange(8) * 1.5).astype(dtype)
    key, got = parse_text_line(line("img-7", v, protocol))
    assert key == "img-7"
    np.testing.assert_array_equal(got, v.astype(np.float64))


def test_a_python2_style_pickle_reads():
    # What the reference's Python 2 jobs wrote: protocol 2, numpy.core, the array bytes as a
    # py2 str (SHORT_BINSTRING) that Python 3 reads as latin1 text.
    v = np.array([1.0, -2.5, 3.25])
    raw = v.tobytes()
    payload = (b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nq\x00cnumpy\nndarray\nq\x01K\x00\x85q\x02U\x01b"
               b"q\x03\x87q\x04Rq\x05(K\x01K\x03\x85q\x06cnumpy\ndtype\nq\x07U\x02f8q\x08K\x00K\x01\x87q\tRq\n"
               b"(K\x03U\x01<q\x0bNNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tq\x0cb\x89U\x18" + raw + b"q\rtq\x0eb.")
    np.testing.assert_array_equal(loads_vector(payload), v)


class _Shell:
    def __reduce__(self):
        return (os.system, ("echo pwned-by-pickle",))


class _Evalish:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("evil,named", [
    (_Shell(), r"names (posix|nt|os)\.system"),
    (_Evalish(), r"names (__builtin__|builtins)\.eval"),
    ({"a": 1}, r"holds a dict, not a numpy array"),
    (np.array([object(), 1], dtype=object), r"names (__builtin__|builtins)\.object"),
    (np.array([1, "a"], dtype=object), r"dtype object; only numeric arrays"),
])
def test_a_malicious_or_foreign_pickle_is_refused_and_nothing_runs(evil, named, capfd):
    with pytest.raises(UnsafePickleError, match=named):
        parse_text_line(line("x", evil))
    assert "pwned-by-pickle" not in capfd.readouterr().out


def test_codecs_encode_is_admitted_only_for_latin1():
    # A protocol-2 pickle calling _codecs.encode(text, "rot13") instead of latin1.
    payload = b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04."
    with pytest.raises(UnsafePickleError, match=r"_codecs.encode with 'rot13'"):
        loads_vector(payload)


def test_bad_lines():
    with pytest.raises(InputError, match=r"no tab"):
        parse_text_line("just-an-id")
    with pytest.raises(InputError, match=r"does not unpickle"):
        parse_text_line("x\t" + base64.b64encode(b"garbage").decode())


def test_read_text_vectors_and_format_code_lines(tmp_path):
    rng = np.random.default_rng(1)
    V = rng.standard_normal((4, 5))
    path = tmp_path / "vecs.txt"
    path.write_text("\n".join(line(i, v) for i, v in enumerate(V)) + "\n")
    ids, X = read_text_vectors(path)
    assert ids == ["0", "1", "2", "3"]
    np.testing.assert_array_equal(X, V)
    path.write_text(line(0, V[0]) + "\n" + line(1, V[1, :3]) + "\n")
    with pytest.raises(InputError, match=r"line 2 \(id '1'\) has dimension 3, the first line has 5"):
        read_text_vectors(path)
    assert format_code_line(33, [15, 13], np.array([0, 165, 1, 72])) == "33\t[[15, 13], [0, 165, 1, 72]]"
