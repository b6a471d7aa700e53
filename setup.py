"""Build of lyra_pl and its C++/CUDA ops.

Install torch first, then: pip install -e . --no-build-isolation

Environment switches (the chosen values are printed):
  LYRA_CUDA=auto|0|1      build the CUDA extension: auto = when torch has CUDA and a toolkit is found
  LYRA_CUDA_ARCHS="9.0"   CUDA archs (TORCH_CUDA_ARCH_LIST syntax), default 8.0;9.0+PTX
  LYRA_DEBUG=0|1          -O0 -g (and -lineinfo for CUDA) instead of -O3
  LYRA_ASAN=0|1           build the CPU extension with AddressSanitizer (run with LD_PRELOAD=libasan)
  MAX_JOBS=N              parallel compile jobs (honoured by torch's ninja build)

The CUDA toolkit (a folder with bin/nvcc and include/cuda_runtime.h), first found of:
  CUDA_HOME, else CUDA_PATH   taken as given, and checked: a folder without the header stops a
                              LYRA_CUDA=1 build with one line (auto: CPU extension only)
  the nvcc on PATH            through symlinks and wrapper scripts (asked with `nvcc --dryrun`)
  /usr/local/cuda, /usr/local/cuda-*, /opt/cuda*   newest version first
The chosen folder and why are printed, and CUDA_HOME is set to it before torch's build helpers
(torch.utils.cpp_extension) are imported: they read it once, at import.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
CSRC = "csrc"
CUDA_HEADER = Path("include", "cuda_runtime.h")


def say(message):
    print(f"[lyra_pl setup] {message}")


def fail(message):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(1)


def flag(name, default):
    value = os.environ.get(name, default)
    say(f"{name}={value}")
    return value


# ------------------------------------------------------------------------- CUDA toolkit


def is_toolkit(folder):
    return (Path(folder) / CUDA_HEADER).is_file()


def toolkit_version(folder):
    """'13.0' from the toolkit's CUDART_VERSION (13000), or None."""
    try:
        text = (Path(folder) / "include" / "cuda_runtime_api.h").read_text(errors="replace")
    except OSError:
        return None
    m = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", text)
    return f"{int(m[1]) // 1000}.{int(m[1]) % 1000 // 10}" if m else None


def _is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _nvcc_binaries_behind(wrapper):
    """Real nvcc binaries a wrapper script runs: where `nvcc --dryrun` says it runs from
    (its _HERE_ line), then absolute .../bin/nvcc paths written in the script."""
    found = []
    try:
        proc = subprocess.run([wrapper, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                              capture_output=True, text=True, timeout=30)
        m = re.search(r"^#\$ _HERE_=(\S+)", proc.stdout + proc.stderr, re.MULTILINE)
        if m:
            found.append(os.path.join(m[1], "nvcc"))
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        text = Path(wrapper).read_text(errors="replace")[:65536]
        found += re.findall(r"(/[^\s'\"`;|&<>()$]+/bin/nvcc)\b", text)
    except OSError:
        pass
    return [os.path.realpath(b) for b in found if _is_elf(os.path.realpath(b))]


def toolkit_of_path_nvcc():
    """(folder, why) of the toolkit whose nvcc is on PATH, or (None, what was seen)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None, "no nvcc on PATH"
    real = os.path.realpath(nvcc)
    if _is_elf(real):
        binaries = [real]
        via = nvcc if real == nvcc else f"{nvcc} -> {real}"
    else:
        binaries = _nvcc_binaries_behind(real)
        if not binaries:
            return None, f"the nvcc on PATH ({nvcc}) is a script that names no nvcc binary"
        via = f"{nvcc} is a wrapper script for {binaries[0]}"
    for binary in binaries:
        folder = str(Path(binary).parent.parent)
        if is_toolkit(folder):
            return folder, f"from the nvcc on PATH: {via}"
    return None, f"the nvcc on PATH ({via}) has no {CUDA_HEADER} two folders up"


def _version_key(path):
    return tuple(int(n) for n in re.findall(r"\d+", path.name)) or (0,)


def usual_toolkits():
    local = sorted(Path("/usr/local").glob("cuda-*"), key=_version_key, reverse=True)
    opt = sorted(Path("/opt").glob("cuda*"), key=_version_key, reverse=True)
    return [Path("/usr/local/cuda"), *local, *opt]


def find_cuda_home(required):
    """The toolkit folder to build with, or None (CPU extension only). Prints one line saying
    which and why; exits with one line when LYRA_CUDA=1 and there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        given = os.environ.get(var)
        if given:
            if is_toolkit(given):
                say(f"CUDA toolkit: {given} (CUDA {toolkit_version(given)}; from {var})")
                return given
            message = (f"{var}={given} has no {CUDA_HEADER}; point it at the CUDA toolkit folder "
                       f"(the one with bin/nvcc and include/)")
            if required:
                fail(message)
            say(f"note: {message}; building the CPU extension only")
            return None
    folder, why = toolkit_of_path_nvcc()
    if folder is None:
        usual = next((str(p) for p in usual_toolkits() if is_toolkit(p)), None)
        if usual is not None:
            folder, why = usual, f"found at a usual location; {why}"
    if folder is None:
        message = (f"no CUDA toolkit found ({why}; none of /usr/local/cuda, /usr/local/cuda-*, "
                   f"/opt/cuda* has {CUDA_HEADER}); set CUDA_HOME to the toolkit folder")
        if required:
            fail(f"LYRA_CUDA=1 but {message}")
        say(f"CUDA toolkit: none: {message}")
        return None
    say(f"CUDA toolkit: {folder} (CUDA {toolkit_version(folder)}; {why})")
    return folder


# ------------------------------------------------------------------------- switches

cuda_choice = flag("LYRA_CUDA", "auto")
if cuda_choice not in ("auto", "0", "1"):
    fail(f"LYRA_CUDA={cuda_choice}: use auto, 0 or 1")
cuda_home = find_cuda_home(required=cuda_choice == "1") if cuda_choice != "0" else None
if cuda_home is not None:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at its import

import torch  # noqa: E402  (after CUDA_HOME is settled)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    if cuda_choice == "0":
        say("CUDA extension: no (LYRA_CUDA=0)")
        return False
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU build")
    if cuda_home is None:
        problems.append("no CUDA toolkit")
    else:
        found = toolkit_version(cuda_home)
        if torch.version.cuda and found and found.split(".")[0] != torch.version.cuda.split(".")[0]:
            problems.append(f"the toolkit is CUDA {found} but torch was built with CUDA "
                            f"{torch.version.cuda} (the major versions must match)")
    if problems and cuda_choice == "1":
        fail("LYRA_CUDA=1 but the CUDA extension cannot be built: " + "; ".join(problems))
    build = not problems
    say(f"CUDA extension: {'yes' if build else 'no'} (torch CUDA {torch.version.cuda}, "
        f"CUDA_HOME {cuda_home}{'' if build else '; ' + '; '.join(problems)})")
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
    os.environ["TORCH_CUDA_ARCH_LIST"] = flag("LYRA_CUDA_ARCHS", "8.0;9.0+PTX")
    ext_modules.append(
        CUDAExtension(
            "lyra_pl._C_cuda",
            [f"{CSRC}/cuda_module.cpp", *op_glue,
             f"{CSRC}/prune/prune_tc_cuda.cu",
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
