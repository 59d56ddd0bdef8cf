"""Build entry point of mdm_fast.

``pip install -e .`` always installs the Python package. When nvcc is found (or
``MDM_FAST_BUILD_CUDA=1``), it also builds ``mdm_fast._C`` from ``csrc/``: every ``.cu`` file is
compiled by nvcc *without torch headers* (seconds per file) and linked, with the pybind11
bindings in ``csrc/*.cpp``, against the static CUDA runtime. ``MDM_FAST_BUILD_CUDA=0`` skips it.

Environment:
  CUDA_HOME            the CUDA root (default: asked from ``nvcc`` itself, since the nvcc on
                       the PATH may be a wrapper script outside the CUDA tree)
  MDM_FAST_CUDA_ARCHS  semicolon-separated SM versions, default "80;90"
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def cuda_home() -> str | None:
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    # `nvcc --dryrun` prints the real install root ("#$ TOP=/usr/local/cuda-13.0/bin/..").
    out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull], capture_output=True, text=True)
    m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    return str(Path(m.group(1)).resolve()) if m else str(Path(nvcc).resolve().parent.parent)


def want_cuda() -> bool:
    flag = os.environ.get("MDM_FAST_BUILD_CUDA")
    if flag is not None:
        return flag == "1"
    return shutil.which("nvcc") is not None or bool(os.environ.get("CUDA_HOME"))


class BuildWithNvcc(build_ext):
    """Compile csrc/*.cu with nvcc to objects, then link them into the pybind11 module."""

    def build_extension(self, ext: Extension) -> None:
        home = cuda_home()
        if home is None:
            raise RuntimeError("MDM_FAST_BUILD_CUDA=1 but neither CUDA_HOME nor nvcc was found")
        nvcc = str(Path(home) / "bin" / "nvcc")
        if not Path(nvcc).exists():
            nvcc = shutil.which("nvcc") or nvcc
        archs = os.environ.get("MDM_FAST_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        obj_dir = Path(self.build_temp) / "cu"
        obj_dir.mkdir(parents=True, exist_ok=True)
        objects = []
        for cu in sorted(CSRC.glob("*.cu")):
            obj = obj_dir / (cu.stem + ".o")
            cmd = [nvcc, "-c", str(cu), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                   "--expt-relaxed-constexpr", "-lineinfo", f"-I{CSRC}", *gencode]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            objects.append(str(obj))
        ext.extra_objects = objects
        ext.include_dirs += [str(CSRC), str(Path(home) / "include")]
        ext.library_dirs += [str(Path(home) / "lib64"), str(Path(home) / "lib")]
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)


def extensions() -> list:
    if not want_cuda() or not any(CSRC.glob("*.cpp")):
        return []
    import pybind11

    return [Extension(
        "mdm_fast._C",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cpp"))],
        include_dirs=[pybind11.get_include()],
        extra_compile_args=["-O3", "-std=c++17"],
        language="c++",
    )]


setup(
    name="mdm_fast",
    version="0.1.0",
    description="A performance-engineered engine for Matryoshka Diffusion Models",
    packages=find_packages(include=["mdm_fast", "mdm_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "numpy", "pyyaml", "pillow", "tqdm"],
    extras_require={"triton": ["triton"], "text": ["transformers"]},
    entry_points={"console_scripts": ["mdm-fast = mdm_fast.cli.main:main"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildWithNvcc},
    zip_safe=False,
)
