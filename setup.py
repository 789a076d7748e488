"""Compile the BPF object when the package is built (wheel or sdist install).

Metadata lives in pyproject.toml; this file only hooks `build_py` so that
mace_tools/kernel/mace.bpf.o is built by clang (`make build`) before it is packaged.
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildWithBpf(build_py):
    def run(self) -> None:
        subprocess.run(["make", "-C", str(Path(__file__).parent), "build"], check=True)
        super().run()


setup(cmdclass={"build_py": BuildWithBpf})
