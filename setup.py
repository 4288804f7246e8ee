"""Builds eagle3_ops/_C.so by driving CMakeLists.txt (the single build definition).

    pip install --no-build-isolation -e .

Environment: EAGLE3_WITH_CUDA (AUTO/ON/OFF), EAGLE3_CUDA_ARCH_LIST (default "8.0;9.0a"),
CUDA_HOME or CUDA_TOOLKIT_ROOT_DIR (found from nvcc when unset), MAX_JOBS (build parallelism),
EAGLE3_BUILD_DIR (CMake build folder, default build/py3X).
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        # A build folder that persists between installs, so rebuilds are incremental.
        tag = f"py{sys.version_info[0]}{sys.version_info[1]}"
        build_dir = Path(os.environ.get("EAGLE3_BUILD_DIR", ROOT / "build" / tag)).resolve()
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
        if cmake is None:
            raise RuntimeError("eagle3_ops: cmake not found; pip install cmake ninja")
        args = [
            cmake, "-S", str(ROOT), "-B", str(build_dir),
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('CMAKE_BUILD_TYPE', 'Release')}",
        ]
        # Always passed, so a value cached by an earlier configure never lingers.
        args.append(f"-DEAGLE3_WITH_CUDA={os.environ.get('EAGLE3_WITH_CUDA') or 'AUTO'}")
        args.append(f"-DEAGLE3_CUDA_ARCH_LIST={os.environ.get('EAGLE3_CUDA_ARCH_LIST') or '8.0;9.0a'}")
        if os.environ.get("CUDA_TOOLKIT_ROOT_DIR"):
            args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={os.environ['CUDA_TOOLKIT_ROOT_DIR']}")
        if shutil.which("ninja", path=str(Path(sys.executable).parent)) or shutil.which("ninja"):
            args += ["-G", "Ninja"]
        subprocess.check_call(args)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.check_call([cmake, "--build", str(build_dir), "-j", jobs])
        built = build_dir / "_C.so"
        dest = Path(self.get_ext_fullpath(ext.name))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, dest)


setup(
    ext_modules=[CMakeExtension("eagle3_ops._C")],
    cmdclass={"build_ext": CMakeBuild},
)
