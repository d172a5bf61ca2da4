"""`make gpu-check`'s test runner: tooling/run_tests.py's pytest (build/peft's configuration and rootdir, offline, the
known upstream failures xfailed) with the Python that runs this file, on the given test files.

    python bench/gpu_pytest.py JUNIT_XML FILE...    # FILE relative to build/peft (tests/...) or absolute
"""

import os
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tooling"))

import run_tests


if __name__ == "__main__":
    run_tests.PY = Path(sys.executable)  # this Python (PYTHON=... bash bench/gpu_check.sh), not necessarily .venv's
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.exit(run_tests.pytest(run_tests.TREE, sys.argv[2:], sys.argv[1], [], pythonpath))
