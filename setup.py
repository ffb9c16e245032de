"""Generates the Python protobuf and gRPC modules from proto/ at build time.

The .proto files are the single contract; the generated ferry/v1/*_pb2*.py files are build
outputs (git-ignored), written next to the package sources so editable installs see them too.
"""
import pathlib

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = pathlib.Path(__file__).resolve().parent


def generate_protos() -> None:
    from grpc_tools import protoc
    import grpc_tools

    protos = sorted(str(p.relative_to(ROOT / "proto")) for p in (ROOT / "proto").rglob("*.proto"))
    include = str(pathlib.Path(grpc_tools.__file__).parent / "_proto")
    out = str(ROOT / "python")
    args = ["protoc", f"-I{ROOT / 'proto'}", f"-I{include}", f"--python_out={out}",
            f"--pyi_out={out}", f"--grpc_python_out={out}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")


class BuildPyWithProtos(build_py):
    def run(self):
        generate_protos()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProtos})
