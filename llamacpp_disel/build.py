"""llama-cpp-python from its pinned sdist (PIN) with this project's llama.cpp patches (patches/): DISeL adapters in GGUF.

    python llamacpp_disel/build.py tree     # build/llamacpp/src: the verified sdist; vendor/llama.cpp is a git repository
                                            # with the pristine source (tag `pristine`) and one commit per patch;
                                            # build/llamacpp/pristine: the unpatched converters
    python llamacpp_disel/build.py patches  # write vendor/llama.cpp's commits since `pristine` back to patches/
    python llamacpp_disel/build.py wheel    # tree, then build/llamacpp/dist/llama_cpp_python-*.whl for this CPU family
    python llamacpp_disel/build.py pr       # dist/pr-llamacpp/: the patches and the notes for the pull request

Run with Python 3.10+; `tree` and `wheel` need git, cmake and a C++ compiler; `tree` downloads the sdist once (pip).
"""

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path


HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = ROOT / "build" / "llamacpp"
SRC = WORK / "src"
LLAMA = SRC / "vendor" / "llama.cpp"
PATCHES = HERE / "patches"
PRISTINE = WORK / "pristine"  # the unpatched converters
PRISTINE_FILES = ["convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py"]
# ggml's native build (-march=native) segfaults in its AMX kernels on this project's machines and ties the wheel to the
# build machine: name the instruction sets instead, AVX2/FMA/F16C, which every x86-64 CPU of the last decade has (AVX-512
# would stop with an illegal instruction on a CPU without it); LLAMACPP_CMAKE_ARGS overrides them
CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
GIT_ID = {
    "GIT_AUTHOR_NAME": "pristine",
    "GIT_AUTHOR_EMAIL": "pristine@localhost",
    "GIT_COMMITTER_NAME": "llamacpp_disel",
    "GIT_COMMITTER_EMAIL": "llamacpp_disel@localhost",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z",
}


def pin() -> tuple[str, str, str]:
    """(name, version, sha256) of the pinned sdist."""
    lines = [line.split() for line in (HERE / "PIN").read_text().splitlines() if line.strip() and line[0] != "#"]
    ((name, version, sha256),) = lines
    return name, version, sha256


def git(*args: str, cwd: Path = LLAMA, capture: bool = False) -> str:
    env = {**os.environ, **GIT_ID}
    out = subprocess.run(["git", *args], cwd=cwd, env=env, check=True, text=True, capture_output=capture)
    return out.stdout if capture else ""


def sdist() -> Path:
    """The pinned sdist, downloaded once with pip into build/llamacpp/downloads/, its sha256 checked."""
    name, version, sha256 = pin()
    downloads = WORK / "downloads"
    path = downloads / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", f"{name}=={version}"]
        subprocess.run([*cmd, "-d", str(downloads)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha256:
        sys.exit(f"{path}: sha256 {digest}, but llamacpp_disel/PIN expects {sha256}. Delete the file and run again.")
    return path


def tree() -> None:
    """Unpack the verified sdist into build/llamacpp/src and apply patches/ with `git am`."""
    if LLAMA.is_dir() and (LLAMA / ".git").is_dir() and git("status", "--porcelain", capture=True).strip():
        sys.exit(f"{LLAMA} has uncommitted changes: commit them and run `build.py patches`, or delete {SRC}.")
    path = sdist()
    shutil.rmtree(SRC, ignore_errors=True)
    unpacked = WORK / "unpack"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(path) as tar:
        tar.extractall(unpacked, filter="data")
    (top,) = unpacked.iterdir()
    top.rename(SRC)
    unpacked.rmdir()
    # the sdist ships vendor/llama.cpp/.git as a link to a submodule store; start a repository of its own instead
    (LLAMA / ".git").unlink(missing_ok=True)
    git("init", "-q")
    git("add", "-A", "-f")
    git("commit", "-q", "--no-verify", "-m", "llama.cpp as vendored in llama-cpp-python " + pin()[1])
    git("tag", "pristine")
    # the pristine converter, for the tests that compare with it
    shutil.rmtree(PRISTINE, ignore_errors=True)
    archive = subprocess.run(
        ["git", "archive", "pristine", *PRISTINE_FILES], cwd=LLAMA, check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(PRISTINE, filter="data")
    patches = sorted(PATCHES.glob("*.patch"))
    if patches:
        git("am", "-q", "--keep-cr", *map(str, patches))
    print(f"{SRC}: {pin()[0]} {pin()[1]} with {len(patches)} patch(es) applied to vendor/llama.cpp")


def patches() -> None:
    """Write the commits of vendor/llama.cpp since `pristine` to patches/ (replacing the files there)."""
    if git("status", "--porcelain", capture=True).strip():
        sys.exit(f"{LLAMA} has uncommitted changes: commit them first.")
    for old in PATCHES.glob("*.patch"):
        old.unlink()
    git("format-patch", "-q", "--no-signature", "--zero-commit", "--no-stat", "-o", str(PATCHES), "pristine..HEAD")
    print("\n".join(sorted(p.name for p in PATCHES.glob("*.patch"))))


def wheel() -> None:
    """Build the wheel from the patched tree (cmake's build directory is kept for incremental rebuilds)."""
    tree()
    dist = WORK / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("LLAMACPP_CMAKE_ARGS", CMAKE_ARGS)}
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(dist), f"-Cbuild-dir={WORK / 'cmake'}"]
    subprocess.run([*cmd, str(SRC)], check=True, env=env)
    print(*dist.glob("*.whl"))


def pr() -> None:
    """dist/pr-llamacpp/: the patches (they apply to llama.cpp at the commit that PIN names) and PR-NOTES.md."""
    out = ROOT / "dist" / "pr-llamacpp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for patch in sorted(PATCHES.glob("*.patch")):
        shutil.copy(patch, out)
    shutil.copy(HERE / "PR-NOTES.md", out / "README.md")
    print(f"{out}: {len(list(out.glob('*.patch')))} patches and README.md (notes for the pull request)")


if __name__ == "__main__":
    commands = {"tree": tree, "patches": patches, "wheel": wheel, "pr": pr}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=commands)
    commands[parser.parse_args().command]()
