#!/usr/bin/env python3
"""Build a patched `peft` from the pinned upstream sdist, our new files and our patch series.

Subcommands (all run from the repository root; the Makefile wraps them):

    fetch        download the pinned sdist into build/upstream/ and verify its sha256
    tree         materialise build/peft/: pristine sdist as a git repo, patches applied, our new files symlinked
    patches      regenerate patches/ from edits made to upstream files inside build/peft/
    check        apply the series to a fresh extraction; fail on rejects, on a tree out of sync, on shadowed files
    release DIR  write a self-contained patched source tree (copies, no symlinks) to DIR
    pristine DIR extract the unpatched sdist to DIR (for the regression comparison)
    pr           write the upstream pull request as a `git format-patch` series to dist/pr/

Nothing here is specific to DISeL: the series in patches/ and the files under the upstream trees decide what the
patched package contains.
"""

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tomllib


ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "build"
PATCHES = ROOT / "patches"
TREE = BUILD / "peft"
# Trees whose files are new files at their upstream path (never a copy of an upstream file).
UPSTREAM_TREES = ("src", "tests", "docs", "examples", "method_comparison")
# Files that get the local version stamp; the stamp is a build step, never part of a patch or of the PR.
STAMPED = {"src/peft/__init__.py": '__version__ = "{v}"', "setup.py": 'VERSION = "{v}"'}
PATCH_HEADER_TEMPLATE = """Description: TODO say what this change to {path} does and why.
Forwarded: with the DISeL pull request (`make pr`)
---
"""


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


def pin():
    values = {}
    for line in (ROOT / "UPSTREAM").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    missing = {"PEFT_VERSION", "PEFT_SHA256", "LOCAL_VERSION"} - values.keys()
    if missing:
        raise BuildError(f"UPSTREAM lacks {sorted(missing)}")
    values["FULL_VERSION"] = f"{values['PEFT_VERSION']}+{values['LOCAL_VERSION']}"
    return values


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sdist_path():
    return BUILD / "upstream" / f"peft-{pin()['PEFT_VERSION']}.tar.gz"


def fetch():
    p = pin()
    path = sdist_path()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"downloading the peft=={p['PEFT_VERSION']} sdist")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        res = run(cmd + ["-d", str(path.parent), f"peft=={p['PEFT_VERSION']}"], check=False)
        if res.returncode != 0 or not path.exists():
            raise BuildError(f"could not download the peft=={p['PEFT_VERSION']} sdist:\n{res.stderr[-2000:]}")
    digest = sha256(path)
    if digest != p["PEFT_SHA256"]:
        raise BuildError(
            f"checksum mismatch for {path.relative_to(ROOT)}: got sha256 {digest}, UPSTREAM pins "
            f"{p['PEFT_SHA256']}. Delete the file to download it again; if upstream really changed, update UPSTREAM."
        )
    return path


def extract(dest):
    """Extract the verified sdist to `dest` (its top folder stripped). Returns the set of upstream paths."""
    src = fetch()
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    files = set()
    with tarfile.open(src) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) < 2 or not parts[1]:
                continue
            member.name = parts[1]
            if member.isfile():
                files.add(member.name)
            tar.extract(member, dest, filter="data")
    return files


def upstream_files():
    with tarfile.open(fetch()) as tar:
        return {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}


def our_files():
    """Our new files at upstream paths: tracked plus untracked-but-not-ignored files in the upstream trees."""
    if (ROOT / ".git").exists():
        res = run(["git", "ls-files", "-co", "--exclude-standard", "--", *UPSTREAM_TREES], cwd=ROOT)
        return sorted(p for p in res.stdout.splitlines() if (ROOT / p).is_file())
    found = []
    for tree in UPSTREAM_TREES:
        for path in (ROOT / tree).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                found.append(str(path.relative_to(ROOT)))
    return sorted(found)


def patch_files():
    """Map upstream path -> patch file, for every patch in the series."""
    return {str(p.relative_to(PATCHES))[: -len(".patch")]: p for p in sorted(PATCHES.rglob("*.patch"))}


def check_shadowing(upstream=None):
    upstream = upstream if upstream is not None else upstream_files()
    clash = [f for f in our_files() if f in upstream]
    if clash:
        raise BuildError(
            "these files of ours also exist in the pinned sdist; an upstream file may only change through "
            "patches/ (move the change into a patch):\n  " + "\n  ".join(clash)
        )


def git_apply(tree, patch, *extra):
    # `git apply` inside another repository's work tree (build/ lies in ours) silently skips the paths it thinks are
    # outside the current folder: keep git from discovering any repository above the tree
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(Path(tree).resolve().parent)}
    return run(["git", "apply", *extra, "--whitespace=nowarn", str(patch)], cwd=tree, check=False, env=env)


def apply_series(tree):
    for path, patch in patch_files().items():
        target = Path(tree) / path
        if not target.exists():
            raise BuildError(f"{patch.relative_to(ROOT)} patches {path}, which the pinned sdist does not have")
        before = target.read_bytes()
        res = git_apply(tree, patch, "--check")
        if res.returncode == 0:
            res = git_apply(tree, patch)
        if res.returncode != 0 or target.read_bytes() == before:
            raise BuildError(
                f"{patch.relative_to(ROOT)} no longer applies to peft {pin()['PEFT_VERSION']}:\n"
                f"{res.stderr or 'it changed nothing'}\nRefresh it: fix the file in build/peft/ by hand, then "
                "`make patches`."
            )


def stamp_text(path, text, unstamp=False):
    if path not in STAMPED:
        return text
    p = pin()
    old, new = STAMPED[path].format(v=p["PEFT_VERSION"]), STAMPED[path].format(v=p["FULL_VERSION"])
    if unstamp:
        old, new = new, old
    if text.count(old) != 1:
        if unstamp and text.count(new) == 1:
            return text
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


def reference_tree(dest, with_new_files=True, link=False):
    """Pristine sdist + patches + version stamp (+ our new files): the content the patched package must have."""
    upstream = extract(dest)
    check_shadowing(upstream)
    apply_series(dest)
    stamp(dest)
    if with_new_files:
        overlay(dest, link=link)
    return upstream


# --- the materialised development tree -------------------------------------------------------------------------


def git_tree(*args, check=True):
    return run(["git", *args], cwd=TREE, check=check)


def state_file():
    return TREE / ".git" / "peftpatch-state.json"


def cmd_tree(_args=None):
    """Create build/peft, or bring it in line with the series without losing edits made in it."""
    p = pin()
    ref = BUILD / ".ref"
    upstream = reference_tree(ref, with_new_files=False)
    fresh = not (TREE / ".git").exists() or git_tree("tag", "-l", f"upstream-{p['PEFT_VERSION']}").stdout == ""
    if fresh:
        if TREE.exists():
            shutil.rmtree(TREE)
        extract(TREE)
        git_tree("init", "-q")
        git_tree("config", "user.name", "peftpatch")
        git_tree("config", "user.email", "peftpatch@localhost")
        git_tree("config", "core.autocrlf", "false")
        # the version stamp is invisible to git, so `git diff upstream` shows exactly the patch series
        stamped = p["FULL_VERSION"].replace(".", r"\.")  # a BRE: `+` is literal
        git_tree("config", "filter.peftstamp.clean", f"sed -e 's/{stamped}/{p['PEFT_VERSION']}/'")
        (TREE / ".git" / "info").mkdir(exist_ok=True)
        (TREE / ".git" / "info" / "attributes").write_text("".join(f"/{f} filter=peftstamp\n" for f in STAMPED))
        (TREE / ".git" / "info" / "exclude").write_text("__pycache__/\n*.egg-info/\n.pytest_cache/\nbuild/\ndist/\n")
        git_tree("add", "-A")
        git_tree("commit", "-q", "-m", f"peft {p['PEFT_VERSION']} (pristine sdist)")
        git_tree("tag", f"upstream-{p['PEFT_VERSION']}")
        state = {}
        stamp(TREE)
        # re-add the stamped files: the clean filter stores them unchanged, and `git status` stops listing them
        git_tree("add", "--", *STAMPED)
    else:
        state = json.loads(state_file().read_text()) if state_file().exists() else {}

    conflicts = []
    for rel in sorted(upstream):
        cur_path, want = TREE / rel, (ref / rel).read_bytes()
        cur = cur_path.read_bytes() if cur_path.exists() else None
        if cur == want:
            state[rel] = hashlib.sha256(want).hexdigest()
            continue
        pristine_stamped = git_tree("show", f"upstream-{p['PEFT_VERSION']}:{rel}").stdout
        pristine_stamped = stamp_text(rel, pristine_stamped).encode()
        last = state.get(rel)
        if cur is None or cur == pristine_stamped or (last and hashlib.sha256(cur).hexdigest() == last):
            cur_path.write_bytes(want)
            state[rel] = hashlib.sha256(want).hexdigest()
        else:
            conflicts.append(rel)
    state_file().write_text(json.dumps(state, indent=0, sort_keys=True))

    # our new files: symlinks into this repository, so edits in either place are the same edit
    ours = set(our_files())
    for path in TREE.rglob("*"):
        if path.is_symlink() and str(path.relative_to(TREE)) not in ours:
            target = (path.parent / os.readlink(path)).resolve()
            if ROOT in target.parents and BUILD not in target.parents:
                path.unlink()
    overlay(TREE, link=True)
    shutil.rmtree(ref)
    if conflicts:
        raise BuildError(
            "build/peft has edits that are not in patches/ and differ from the series; keep them with "
            "`make patches`, or discard them with `make reset-tree`:\n  " + "\n  ".join(conflicts)
        )
    log(f"build/peft is peft {p['FULL_VERSION']}: {len(patch_files())} patches, {len(ours)} new files")


def tree_diffs():
    """Per-file git diffs of build/peft against the pristine sdist (version stamp removed by the clean filter)."""
    p = pin()
    out = git_tree("diff", "--no-color", "--no-ext-diff", "--full-index", f"upstream-{p['PEFT_VERSION']}").stdout
    diffs = {}
    for chunk in re.split(r"(?m)^(?=diff --git )", out):
        if chunk.startswith("diff --git "):
            path = re.match(r"diff --git a/(\S+) b/", chunk).group(1)
            # drop the `index` line: blob ids change with every edit and only add noise to review
            diffs[path] = re.sub(r"(?m)^index [0-9a-f]+\.\.[0-9a-f]+( \d+)?\n", "", chunk, count=1)
    return diffs


def patch_body(patch):
    text = patch.read_text()
    idx = text.find("diff --git ")
    return text[:idx], text[idx:]


def stray_files():
    """Regular files created inside build/peft's upstream trees that are neither upstream nor ours."""
    res = git_tree("ls-files", "--others", "--exclude-standard", "--", *UPSTREAM_TREES)
    return [p for p in res.stdout.splitlines() if not (TREE / p).is_symlink()]


def cmd_patches(_args=None):
    if not (TREE / ".git").exists():
        raise BuildError("build/peft does not exist yet: run `make tree` first")
    for rel in stray_files():
        # a file created inside build/peft becomes one of ours: move it here and link it back
        (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(TREE / rel, ROOT / rel)
        (TREE / rel).symlink_to(os.path.relpath(ROOT / rel, (TREE / rel).parent))
        log(f"adopted new file {rel}")
    diffs = tree_diffs()
    existing = patch_files()
    for rel, body in diffs.items():
        target = PATCHES / f"{rel}.patch"
        header = patch_body(target)[0] if target.exists() else PATCH_HEADER_TEMPLATE.format(path=rel)
        if not target.exists() or patch_body(target)[1] != body:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(header + body)
            log(f"wrote {target.relative_to(ROOT)}")
    for rel, patch in existing.items():
        if rel not in diffs:
            patch.unlink()
            log(f"removed {patch.relative_to(ROOT)} (build/peft/{rel} is pristine again)")
    for d in sorted(PATCHES.rglob("*"), reverse=True):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def cmd_check(_args=None):
    problems = []
    upstream = upstream_files()
    check_shadowing(upstream)
    with tempfile.TemporaryDirectory() as tmp:
        reference_tree(Path(tmp) / "peft")  # fails on any patch that does not apply
    for rel, patch in patch_files().items():
        header, body = patch_body(patch)
        if "Description:" not in header or "TODO" in header:
            problems.append(f"{patch.relative_to(ROOT)}: its header must say what the change does and why")
        if not body:
            problems.append(f"{patch.relative_to(ROOT)}: holds no diff")
    if (TREE / ".git").exists():
        diffs, series = tree_diffs(), patch_files()
        for rel in sorted(set(diffs) | set(series)):
            if rel not in series:
                problems.append(f"build/peft/{rel} is edited but has no patch: run `make patches`")
            elif rel not in diffs or patch_body(series[rel])[1] != diffs[rel]:
                problems.append(f"{series[rel].relative_to(ROOT)} is out of sync with build/peft: `make patches`")
        for rel in stray_files():
            problems.append(f"build/peft/{rel} is a new file outside this repository: `make patches` adopts it")
    if problems:
        raise BuildError("check failed:\n  " + "\n  ".join(problems))
    log(f"check passed: {len(patch_files())} patches apply to peft {pin()['PEFT_VERSION']}, no shadowed files")


def cmd_release(args):
    reference_tree(Path(args.dest))
    log(f"wrote the patched source tree to {args.dest}")


def cmd_pristine(args):
    extract(Path(args.dest))
    log(f"extracted the pristine peft {pin()['PEFT_VERSION']} sdist to {args.dest}")


# --- the upstream pull request -----------------------------------------------------------------------------------


def cmd_pr(args):
    p = pin()
    series = tomllib.loads((ROOT / "tooling" / "pr-series.toml").read_text())
    out = ROOT / "dist" / "pr"
    work = BUILD / "pr-repo"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    extract(work)
    git = lambda *a, **kw: run(["git", *a], cwd=work, **kw)  # noqa: E731
    git("init", "-q")
    git("config", "user.name", series["author"]["name"])
    git("config", "user.email", series["author"]["email"])
    git("add", "-A")
    git("commit", "-q", "-m", f"peft {p['PEFT_VERSION']}")
    base = git("rev-parse", "HEAD").stdout.strip()

    changed = dict.fromkeys(patch_files(), "patch") | dict.fromkeys(our_files(), "new")
    # files at upstream paths that serve this repository only (e.g. the demo's smoke test) stay out of the PR
    excluded = series.get("exclude", [])
    changed = {rel: c for rel, c in changed.items() if not any(fnmatch.fnmatch(rel, g) for g in excluded)}
    assigned = {}
    for i, commit in enumerate(series["commit"]):
        for rel in changed:
            if rel not in assigned and any(fnmatch.fnmatch(rel, g) for g in commit["paths"]):
                assigned[rel] = i
    unassigned = sorted(set(changed) - set(assigned))
    if unassigned:
        raise BuildError(
            "tooling/pr-series.toml assigns these changed files to no commit:\n  " + "\n  ".join(unassigned)
        )
    for i, commit in enumerate(series["commit"]):
        files = sorted(rel for rel, c in assigned.items() if c == i)
        if not files:
            continue
        for rel in files:
            if changed[rel] == "patch":
                res = git_apply(work, PATCHES / f"{rel}.patch")
                if res.returncode != 0:
                    raise BuildError(f"patches/{rel}.patch does not apply for the PR:\n{res.stderr}")
            else:
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, work / rel)
        git("add", "-A")
        git("commit", "-q", "-m", commit["subject"] + "\n\n" + commit["body"].strip() + "\n")
    res = git("format-patch", "-o", str(out), f"{base}..HEAD")
    (out / "PR_DESCRIPTION.md").write_text((ROOT / "tooling" / "pr-description.md").read_text())
    written = res.stdout.split()
    log(f"wrote {len(written)} patches against peft {p['PEFT_VERSION']} to dist/pr/")

    repo = os.environ.get("PEFT_REPO")
    if repo:
        repo = Path(repo).resolve()
        if not (repo / ".git").exists():
            raise BuildError(f"PEFT_REPO={repo} is not a git checkout")
        branch = args.branch
        dirty = run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo).stdout
        if dirty:
            raise BuildError(f"PEFT_REPO={repo} has uncommitted changes; commit or stash them first")
        if run(["git", "rev-parse", "--verify", "-q", f"refs/heads/{branch}"], cwd=repo, check=False).returncode == 0:
            raise BuildError(f"PEFT_REPO={repo} already has a branch {branch}; pass PR_BRANCH=<another name>")
        run(["git", "checkout", "-q", "-b", branch], cwd=repo)
        res = run(["git", "am", "-3", *written], cwd=repo, check=False)
        if res.returncode != 0:
            conflicts = run(["git", "diff", "--name-only", "--diff-filter=U"], cwd=repo, check=False).stdout
            current = run(["git", "am", "--show-current-patch=diff"], cwd=repo, check=False).stdout[:300]
            raise BuildError(
                f"the series does not apply to {repo} (branch {branch}); `git am` stopped with:\n{res.stdout}"
                f"{res.stderr}\nconflicted files:\n{conflicts or '  (none listed)'}\nstart of the failing patch:\n"
                f"{current}\nResolve and `git am --continue` there, or `git am --abort`."
            )
        log(f"applied the series to {repo} on branch {branch}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch").set_defaults(fn=lambda a: log(f"verified {fetch().relative_to(ROOT)}"))
    sub.add_parser("tree").set_defaults(fn=cmd_tree)
    sub.add_parser("reset-tree").set_defaults(fn=lambda a: (shutil.rmtree(TREE, ignore_errors=True), cmd_tree()))
    sub.add_parser("patches").set_defaults(fn=cmd_patches)
    sub.add_parser("check").set_defaults(fn=cmd_check)
    sub.add_parser("version").set_defaults(fn=lambda a: print(pin()["FULL_VERSION"]))
    rel = sub.add_parser("release")
    rel.add_argument("dest")
    rel.set_defaults(fn=cmd_release)
    pri = sub.add_parser("pristine")
    pri.add_argument("dest")
    pri.set_defaults(fn=cmd_pristine)
    pr = sub.add_parser("pr")
    pr.add_argument("--branch", default="disel-lora-variant")
    pr.set_defaults(fn=cmd_pr)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
