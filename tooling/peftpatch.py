#!/usr/bin/env python3
"""Build a patched `peft` from the pinned upstream sdist, our topic patch series and our new files.

The change to upstream is an ordered series of topic patches (`patches/series`, one `git format-patch` commit each).
The development tree build/peft/ is a git repository: the pristine sdist (tag `upstream-<version>`) plus one commit per
topic, with our new files symlinked in (git ignores them there). Each topic's commit message ends with DEP-3 style
fields: `Forwarded:` and `Files:`, the globs of our new files that the topic introduces.

Subcommands (run from the repository root; the Makefile wraps them):

    tree         materialise build/peft (never discards commits or edits that are not in patches/)
    reset-tree   throw build/peft away and materialise it again
    patches      regenerate patches/ from the commits of build/peft (`git format-patch`)
    check        the series applies to the checksum-verified sdist, build/peft is in sync, every new file has a topic
    release DIR  a self-contained patched source tree (copies, no symlinks), as `pip install .` builds it
    pristine DIR the unpatched sdist (for the regression comparison)
    pr           the upstream pull request in dist/pr/: each topic's commit with its new files; with PEFT_REPO=...,
                 also applied to a peft checkout together with patches/pr-only/ (files the sdist lacks)
"""

import argparse
import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
PATCHES = ROOT / "patches"
PR_ONLY = PATCHES / "pr-only"
TREE = BUILD / "peft"
# Trees whose files are new files at their upstream path (never a copy of an upstream file).
UPSTREAM_TREES = ("src", "tests", "docs", "examples", "method_comparison")
# Files that get the local version stamp; the stamp is a build step, never part of a patch or of the PR.
STAMPED = {"src/peft/__init__.py": '__version__ = "{v}"', "setup.py": 'VERSION = "{v}"'}
# Stable `git format-patch` output: no commit ids, no git version, no "n/m" numbering that shifts with the series.
FORMAT_PATCH = [
    "format-patch",
    "--always",
    "--zero-commit",
    "--no-signature",
    "--no-numbered",
    "--full-index",
    "--no-binary",
]
FIELDS = ("Forwarded", "Files")
BUILT_REF = "refs/peftpatch/built"
GIT_ID = ["-c", "user.name=peftpatch", "-c", "user.email=peftpatch@localhost", "-c", "commit.gpgsign=false"]


class BuildError(SystemExit):
    def __init__(self, msg):
        super().__init__(f"peftpatch: error: {msg}")


def log(msg):
    print(f"peftpatch: {msg}", file=sys.stderr)


def run(cmd, cwd=None, check=True, **kwargs):
    res = subprocess.run(cmd, cwd=cwd, text=True, capture_output=True, check=False, **kwargs)
    if check and res.returncode != 0:
        raise BuildError(f"`{' '.join(map(str, cmd))}` failed in {cwd or os.getcwd()}:\n{res.stdout}{res.stderr}")
    return res


def git(repo, *args, check=True):
    # a repository under build/ lies inside ours: stop git from discovering ours above it
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(repo).resolve().parent)}
    return run(["git", *GIT_ID, *args], cwd=repo, check=check, env=env)


def pin():
    values = {}
    for line in (ROOT / "UPSTREAM").read_text().splitlines():
        key, _, value = line.strip().partition("=")
        if key and not key.startswith("#"):
            values[key.strip()] = value.strip()
    missing = {"PEFT_VERSION", "PEFT_SHA256", "LOCAL_VERSION"} - values.keys()
    if missing:
        raise BuildError(f"UPSTREAM lacks {sorted(missing)}")
    values["FULL_VERSION"] = f"{values['PEFT_VERSION']}+{values['LOCAL_VERSION']}"
    values["TAG"] = f"upstream-{values['PEFT_VERSION']}"
    return values


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch():
    """The pinned sdist, checksum-verified: the file PEFT_SDIST names (or the one in the folder it names), else
    build/upstream/'s copy, else `pip download` (it follows pip.conf and PIP_INDEX_URL / PIP_EXTRA_INDEX_URL / ...)."""
    p = pin()
    name = f"peft-{p['PEFT_VERSION']}.tar.gz"
    path = BUILD / "upstream" / name
    if os.environ.get("PEFT_SDIST"):
        path = Path(os.environ["PEFT_SDIST"]).expanduser().absolute()
        path = path / name if path.is_dir() else path
        if not path.is_file():
            raise BuildError(f"PEFT_SDIST={os.environ['PEFT_SDIST']}: there is no file {path}")
    elif not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading the peft=={p['PEFT_VERSION']} sdist")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(path.parent)]
        res = run(cmd + [f"peft=={p['PEFT_VERSION']}"], check=False)
        if res.returncode != 0 or not path.exists():
            # pip names its indexes only when they are not just PyPI
            tried = re.findall(r"(?m)^Looking in (?:indexes|links): (.*)$", res.stdout) or ["https://pypi.org/simple"]
            raise BuildError(
                f"could not download the peft=={p['PEFT_VERSION']} sdist (pip looked in {'; '.join(tried)}):\n"
                f"{res.stderr[-2000:]}\nPoint pip at another index with PIP_INDEX_URL or pip.conf (the --index-url "
                f"of a `pip install` command line does not reach this build step), or set PEFT_SDIST to a downloaded "
                f"{name} or the folder that holds it."
            )
    digest = sha256(path)
    if digest != p["PEFT_SHA256"]:
        fix = "point PEFT_SDIST at the sdist" if os.environ.get("PEFT_SDIST") else "delete it to download it again"
        raise BuildError(
            f"checksum mismatch for {path}: got sha256 {digest}, UPSTREAM pins {p['PEFT_SHA256']}. It is not the "
            f"pinned sdist: {fix}; if upstream really changed, update UPSTREAM."
        )
    return path


def extract(dest):
    """Extract the verified sdist to `dest` (its top folder stripped). Returns the set of upstream paths."""
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = set()
    with tarfile.open(fetch()) as tar:
        for member in tar.getmembers():
            _, _, rel = member.name.partition("/")
            if not rel:
                continue
            member.name = rel
            if member.isfile():
                files.add(rel)
            # the `data` filter (no absolute paths, no links out of the tree) exists from Python 3.10.12 / 3.11.4 on
            tar.extract(member, dest, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return files


def our_files():
    """Our new files at upstream paths: tracked plus untracked-but-not-ignored files in the upstream trees."""
    if (ROOT / ".git").exists():
        res = run(["git", "ls-files", "-co", "--exclude-standard", "--", *UPSTREAM_TREES], cwd=ROOT)
        return sorted(p for p in res.stdout.splitlines() if (ROOT / p).is_file())
    found = (p for tree in UPSTREAM_TREES for p in (ROOT / tree).rglob("*") if p.is_file())
    return sorted(str(p.relative_to(ROOT)) for p in found if "__pycache__" not in p.parts)


def check_shadowing(upstream):
    clash = [f for f in our_files() if f in upstream]
    if clash:
        raise BuildError(
            "these files of ours also exist in the pinned sdist; an upstream file may only change through a topic "
            "patch:\n  " + "\n  ".join(clash)
        )


# --- the series --------------------------------------------------------------------------------------------------


def series(directory=PATCHES):
    """The patch files of `directory`/series, in order."""
    order = directory / "series"
    names = [line.strip() for line in order.read_text().splitlines()] if order.exists() else []
    patches = [directory / n for n in names if n and not n.startswith("#")]
    for patch in patches:
        if not patch.is_file():
            raise BuildError(f"{order.relative_to(ROOT)} lists {patch.name}, which does not exist")
    return patches


def message_fields(message):
    """The DEP-3 style fields (`Forwarded:`, `Files:`) that end a topic's commit message or patch header."""
    fields = {}
    for line in message.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in FIELDS:
            fields[key] = value.strip()
    return fields


def strip_fields(message):
    return "\n".join(line for line in message.splitlines() if line.partition(": ")[0] not in FIELDS).rstrip() + "\n"


def topic_files(files_field, ours):
    return [f for f in ours if any(fnmatch.fnmatch(f, glob) for glob in files_field.split())]


def apply_series(tree):
    """`git apply` each topic patch in order (no repository needed): the release tree and `make check` use this."""
    for patch in series():
        if "\ndiff --git " not in patch.read_text():
            continue  # a topic that adds only new files of ours
        res = git(tree, "apply", "--whitespace=nowarn", str(patch), check=False)
        if res.returncode != 0:
            raise BuildError(
                f"{patch.relative_to(ROOT)} no longer applies to peft {pin()['PEFT_VERSION']}:\n{res.stderr}\n"
                "Refresh it: `make tree` stops at the failing patch in build/peft; fix it there, then `make patches`."
            )


def stamp_text(path, text):
    p = pin()
    old, new = STAMPED[path].format(v=p["PEFT_VERSION"]), STAMPED[path].format(v=p["FULL_VERSION"])
    if text.count(new) == 1:
        return text
    if text.count(old) != 1:
        raise BuildError(f"cannot stamp the local version into {path}: expected `{old}` exactly once")
    return text.replace(old, new)


def stamp(tree):
    for path in STAMPED:
        f = Path(tree) / path
        f.write_text(stamp_text(path, f.read_text()))


def overlay(tree, link):
    for rel in our_files():
        dst = Path(tree) / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.is_symlink() or dst.exists():
            dst.unlink()
        if link:
            dst.symlink_to(os.path.relpath(ROOT / rel, dst.parent))
        else:
            shutil.copy2(ROOT / rel, dst)


def reference_tree(dest):
    """Pristine sdist + the series + the version stamp + copies of our new files: what the patched package holds."""
    upstream = extract(dest)
    check_shadowing(upstream)
    apply_series(dest)
    stamp(dest)
    overlay(dest, link=False)


# --- the development tree ----------------------------------------------------------------------------------------


def init_repo(path, upstream_version):
    """A git repository of the extracted sdist at `path`, committed and tagged `upstream-<version>`."""
    git(path, "init", "-q")
    git(path, "config", "core.autocrlf", "false")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", f"peft {upstream_version} (pristine sdist)")
    git(path, "tag", f"upstream-{upstream_version}")


def git_am(repo, patches):
    # --empty=keep: a topic may add only new files of ours (its upstream diff is then empty)
    res = git(repo, "am", "-q", "--empty=keep", *map(str, patches), check=False)
    if res.returncode != 0:
        failing = git(repo, "am", "--show-current-patch=raw", check=False).stdout.split("\n", 4)[:4]
        raise BuildError(
            f"the series stopped applying in {repo}:\n{res.stdout}{res.stderr}\n{''.join(failing)[:300]}\nFix it "
            "there (`git am --show-current-patch`, edit, `git add`, `git am --continue`), then `make patches`."
        )


def tree_series():
    """The series as build/peft's commits would write it: {file name: text}."""
    with tempfile.TemporaryDirectory() as tmp:
        git(TREE, *FORMAT_PATCH, "-o", tmp, f"{pin()['TAG']}..HEAD")
        return {p.name: p.read_text() for p in sorted(Path(tmp).iterdir())}


def tree_dirty():
    """Uncommitted changes to upstream files in build/peft (the version stamp is hidden by a clean filter)."""
    return git(TREE, "status", "--porcelain", "--untracked-files=no").stdout.strip()


def link_our_files():
    ours = our_files()
    for path in TREE.rglob("*"):
        if path.is_symlink() and str(path.relative_to(TREE)) not in ours:
            target = (path.parent / os.readlink(path)).resolve()
            if ROOT in target.parents and BUILD not in target.parents:
                path.unlink()
    overlay(TREE, link=True)
    exclude = ["__pycache__/", "*.egg-info/", ".pytest_cache/", "/build/", "/dist/"] + [f"/{f}" for f in ours]
    (TREE / ".git" / "info" / "exclude").write_text("\n".join(exclude) + "\n")
    stamp(TREE)
    # the clean filter hands git the unstamped text: refreshing the index makes `git status` see no change
    git(TREE, "add", "--", *STAMPED)


def cmd_tree(_args=None):
    """Create build/peft, or bring it in line with patches/ unless it holds work that is not in patches/."""
    p = pin()
    patches = series()
    if (TREE / ".git").exists() and git(TREE, "tag", "-l", p["TAG"]).stdout.strip():
        in_sync = not tree_dirty() and list(tree_series().values()) == [q.read_text() for q in patches]
        if in_sync:
            link_our_files()
            log(f"build/peft is peft {p['FULL_VERSION']}: {len(patches)} topics, {len(our_files())} new files")
            return
        head = git(TREE, "rev-parse", "HEAD").stdout.strip()
        built = git(TREE, "rev-parse", "-q", "--verify", BUILT_REF, check=False).stdout.strip()
        if tree_dirty() or head != built:
            raise BuildError(
                "build/peft holds commits or edits that are not in patches/: `make patches` writes them to "
                "patches/ (commit edits to their topic first), `make reset-tree` throws them away"
            )
        # untouched since it was built, and patches/ changed (a pull, say): rebuild it from the series
        git(TREE, "reset", "-q", "--hard", p["TAG"])
    else:
        if TREE.exists():
            shutil.rmtree(TREE)
        check_shadowing(extract(TREE))
        init_repo(TREE, p["PEFT_VERSION"])
        # the version stamp is invisible to git, so the commits hold the series and nothing else
        stamped = p["FULL_VERSION"].replace(".", r"\.")  # a BRE: `+` is literal
        git(TREE, "config", "filter.peftstamp.clean", f"sed -e 's/{stamped}/{p['PEFT_VERSION']}/'")
        (TREE / ".git" / "info" / "attributes").write_text("".join(f"/{f} filter=peftstamp\n" for f in STAMPED))
    git_am(TREE, patches)
    git(TREE, "update-ref", BUILT_REF, "HEAD")
    link_our_files()
    log(f"build/peft is peft {p['FULL_VERSION']}: {len(patches)} topics, {len(our_files())} new files")


def cmd_patches(_args=None):
    if not (TREE / ".git").exists():
        raise BuildError("build/peft does not exist yet: run `make tree` first")
    if tree_dirty():
        raise BuildError(
            "build/peft has uncommitted edits; commit them to their topic first, e.g.\n  cd build/peft && git commit "
            f"-a --fixup=<topic commit> && git rebase -q -i --autosquash {pin()['TAG']}\n"
            "(`git log --oneline` lists the topics)"
        )
    new = tree_series()
    PATCHES.mkdir(exist_ok=True)
    for old in series():
        old.unlink()
    for name, text in new.items():
        (PATCHES / name).write_text(text)
    (PATCHES / "series").write_text("".join(f"{name}\n" for name in new))
    git(TREE, "update-ref", BUILT_REF, "HEAD")
    log(f"wrote {len(new)} topic patches to patches/ (order: patches/series)")


def cmd_check(_args=None):
    problems = []
    p = pin()
    with tempfile.TemporaryDirectory() as tmp:
        check_shadowing(extract(Path(tmp) / "peft"))
        apply_series(Path(tmp) / "peft")  # fails on any patch that does not apply to the verified sdist
    ours, claimed = our_files(), {}
    for patch in series() + series(PR_ONLY):
        header = patch.read_text().split("\n---\n", 1)[0]
        fields = message_fields(header)
        body = header.split("\n\n", 1)[1] if "\n\n" in header else ""
        if not strip_fields(body).strip():
            problems.append(f"{patch.relative_to(ROOT)}: its header must say what the change does and why")
        if not re.match(r"(no|not-needed|yes|https?://\S+)\b", fields.get("Forwarded", "")):
            problems.append(f"{patch.relative_to(ROOT)}: needs `Forwarded: no | not-needed | <url>`")
        for glob in fields.get("Files", "").split():
            matched = topic_files(glob, ours)
            if not matched:
                problems.append(f"{patch.relative_to(ROOT)}: `Files: {glob}` matches none of our files")
            for f in matched:
                claimed.setdefault(f, []).append(patch.name)
    for f in ours:
        if len(claimed.get(f, [])) != 1:
            where = ", ".join(claimed.get(f, [])) or "no topic"
            problems.append(f"{f} must belong to exactly one topic's `Files:` (it is in {where})")
    if (TREE / ".git").exists():
        if tree_dirty():
            problems.append("build/peft has uncommitted edits: commit them to their topic, then `make patches`")
        elif list(tree_series().values()) != [q.read_text() for q in series()]:
            problems.append("patches/ is out of sync with build/peft's commits: `make patches` (or `make tree`)")
        stray = git(TREE, "ls-files", "--others", "--exclude-standard", "--", *UPSTREAM_TREES).stdout.split()
        for rel in stray:
            problems.append(f"build/peft/{rel} is a new file there: create it in this repository at {rel} instead")
    if problems:
        raise BuildError("check failed:\n  " + "\n  ".join(problems))
    log(f"check passed: {len(series())} topic patches apply to peft {p['PEFT_VERSION']}, every new file has a topic")


# --- the upstream pull request -----------------------------------------------------------------------------------


def cmd_pr(args):
    """Replay the series on a pristine repository, adding each topic's new files to its commit, then format-patch."""
    p = pin()
    out, work = ROOT / "dist" / "pr", BUILD / "pr-repo"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    extract(work)
    init_repo(work, p["PEFT_VERSION"])
    ours = our_files()
    for patch in series():
        git_am(work, [patch])
        message = git(work, "log", "-1", "--format=%B").stdout
        for rel in topic_files(message_fields(message).get("Files", ""), ours):
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, work / rel)
        git(work, "add", "-A")
        git(work, "commit", "-q", "--amend", "--no-verify", "-m", strip_fields(message))
    git(work, *FORMAT_PATCH, "-o", str(out), f"{p['TAG']}..HEAD")
    shutil.copy2(ROOT / "tooling" / "pr-description.md", out / "PR_DESCRIPTION.md")
    written = sorted(out.glob("*.patch"))
    log(f"wrote {len(written)} commits against peft {p['PEFT_VERSION']} to dist/pr/ (and PR_DESCRIPTION.md)")

    repo = os.environ.get("PEFT_REPO")
    if not repo:
        return
    repo = Path(repo).resolve()
    if not (repo / ".git").exists():
        raise BuildError(f"PEFT_REPO={repo} is not a git checkout")
    if git(repo, "status", "--porcelain", "--untracked-files=no").stdout:
        raise BuildError(f"PEFT_REPO={repo} has uncommitted changes; commit or stash them first")
    if git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{args.branch}", check=False).returncode == 0:
        raise BuildError(f"PEFT_REPO={repo} already has a branch {args.branch}; pass PR_BRANCH=<another name>")
    git(repo, "checkout", "-q", "-b", args.branch)
    # the pr-only patches change upstream files that the sdist lacks (the docs toctree, the MetaMathQA runner)
    res = git(repo, "am", "-3", *map(str, written + series(PR_ONLY)), check=False)
    if res.returncode != 0:
        conflicts = git(repo, "diff", "--name-only", "--diff-filter=U", check=False).stdout
        raise BuildError(
            f"the series does not apply to {repo} (branch {args.branch}); `git am` stopped with:\n{res.stdout}"
            f"{res.stderr}\nconflicted files:\n{conflicts or '  (none listed)'}\nResolve and `git am --continue` "
            "there, or `git am --abort`."
        )
    log(f"applied the series to {repo} on branch {args.branch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch").set_defaults(fn=lambda a: log(f"verified {fetch()}"))
    sub.add_parser("tree").set_defaults(fn=cmd_tree)
    sub.add_parser("reset-tree").set_defaults(fn=lambda a: (shutil.rmtree(TREE, ignore_errors=True), cmd_tree()))
    sub.add_parser("patches").set_defaults(fn=cmd_patches)
    sub.add_parser("check").set_defaults(fn=cmd_check)
    sub.add_parser("version").set_defaults(fn=lambda a: print(pin()["FULL_VERSION"]))
    for name, fn in (("release", reference_tree), ("pristine", extract)):
        p = sub.add_parser(name)
        p.add_argument("dest")
        p.set_defaults(fn=lambda a, fn=fn: (fn(Path(a.dest)), log(f"wrote {a.dest}")))
    pr = sub.add_parser("pr")
    pr.add_argument("--branch", default="disel-lora-variant")
    pr.set_defaults(fn=cmd_pr)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
