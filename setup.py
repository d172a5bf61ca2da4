"""`pip install .` of this repository: the patched peft, assembled from the pinned sdist, patches/ and our files.

The package metadata is upstream's own (its setup.py is run with `setup()` intercepted); only the version gets the
local segment from UPSTREAM, and the sources come from the assembled tree in build/release/. pip runs this in an
isolated build environment with what pyproject.toml declares (setuptools, and pip, which fetches the pinned sdist; or
PEFT_SDIST names a local copy, see `peftpatch.fetch`).
"""

import os
import runpy
import sys
from pathlib import Path

import setuptools


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "tooling"))
import peftpatch  # noqa: E402


RELEASE = HERE / "build" / "release"
if not (RELEASE / "setup.py").exists() or os.environ.get("PEFT_REBUILD_RELEASE", "1") == "1":
    peftpatch.reference_tree(RELEASE)

captured = {}
cwd = os.getcwd()
real_setup = setuptools.setup
setuptools.setup = lambda **kwargs: captured.update(kwargs)
try:
    os.chdir(RELEASE)
    runpy.run_path(str(RELEASE / "setup.py"), run_name="__main__")
finally:
    os.chdir(cwd)
    setuptools.setup = real_setup

src = os.path.relpath(RELEASE / "src", HERE)
captured.update(
    version=peftpatch.pin()["FULL_VERSION"],
    package_dir={"": src},
    packages=setuptools.find_packages(src),
    license_files=["LICENSE"],  # the same Apache-2.0 text as upstream's
)
real_setup(**captured)
