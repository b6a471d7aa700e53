"""Build of lyra_pl and its C++/CUDA ops.

Install torch first, then: pip install -e . --no-build-isolation

Environment switches (the chosen values are printed):
  LYRA_CUDA=auto|0|1      build the CUDA extension: auto = when torch has CUDA and nvcc is found
  LYRA_CUDA_ARCHS="9.0"   CUDA archs (TORCH_CUDA_ARCH_LIST syntax), default 8.0;9.0
  LYRA_DEBUG=0|1          -O0 -g (and -lineinfo for CUDA) instead of -O3
  LYRA_ASAN=0|1           build the CPU extension with AddressSanitizer (run with LD_PRELOAD=libasan)
  MAX_JOBS=N              parallel compile jobs (honoured by torch's ninja build)
"""
import os
from pathlib import Path

from setuptools import find_packages, setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).parent
CSRC = "csrc"


def flag(name, default):
    value = os.environ.get(name, default)
    print(f"[lyra_pl setup] {name}={value}")
    return value


def want_cuda():
    choice = flag("LYRA_CUDA", "auto")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if choice == "1" and not available:
        raise RuntimeError(
            "LYRA_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    build = choice == "1" or (choice == "auto" and available)
    print(f"[lyra_pl setup] CUDA extension: {'yes' if build else 'no'} "
          f"(torch CUDA {torch.version.cuda}, CUDA_HOME {CUDA_HOME})")
    return build


debug = flag("LYRA_DEBUG", "0") == "1"
asan = flag("LYRA_ASAN", "0") == "1"
flag("MAX_JOBS", str(os.cpu_count()))
opt = ["-O0", "-g"] if debug else ["-O3"]
# No -std flag: torch picks the standard its headers need (C++17 or C++20).
cxx = ["-fopenmp", "-fno-trapping-math", *opt]
link = ["-fopenmp"]
if asan:
    cxx += ["-fsanitize=address", "-fno-omit-frame-pointer"]
    link += ["-fsanitize=address"]

op_glue = [f"{CSRC}/soft_dtw/soft_dtw_op.cpp", f"{CSRC}/prune/prune_op.cpp"]
ext_modules = [
    CppExtension(
        "lyra_pl._C",
        [f"{CSRC}/registration.cpp", *op_glue,
         f"{CSRC}/soft_dtw/soft_dtw_cpu.cpp", f"{CSRC}/prune/prune_cpu.cpp"],
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )
]
if want_cuda():
    os.environ["TORCH_CUDA_ARCH_LIST"] = flag("LYRA_CUDA_ARCHS", "8.0;9.0")
    ext_modules.append(
        CUDAExtension(
            "lyra_pl._C_cuda",
            [f"{CSRC}/cuda_module.cpp", *op_glue,
             f"{CSRC}/soft_dtw/soft_dtw_cuda.cu", f"{CSRC}/prune/prune_cuda.cu"],
            define_macros=[("LYRA_CUDA_BUILD", None)],
            extra_compile_args={
                "cxx": opt,
                "nvcc": [*opt, *(["-lineinfo"] if debug else [])],
            },
        )
    )

setup(
    name="lyra_pl",
    version="0.1.0",
    description="PyTorch Lightning training library for Lyra, with C++/CUDA kernels",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["lyra_pl", "lyra_pl.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "lightning>=2.6",
        "jsonargparse[signatures]>=4.27.7",  # LightningCLI
        "transformers>=5.17",
        "peft>=0.17",
        "torchmetrics>=1.8",
        "omegaconf>=2.3",
        "webdataset>=1.0",
        "mlflow>=3.0",
        "av>=14",  # PyAV: FFmpeg's decoders inside its wheels, for every audio/video format
        "fsspec>=2024.1",  # shard folders at s3://, gs://, ... URLs
    ],
    extras_require={
        "bench": ["matplotlib>=3.9", "pysdtw>=0.0.5", "tslearn>=0.10"],
        "test": ["pytest>=8", "hypothesis>=6"],
    },
    entry_points={"console_scripts": ["lyra-pl=lyra_pl.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
)
