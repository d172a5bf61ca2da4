#!/usr/bin/env python3
"""Build a patched `peft` from the pinned upstream sdist and our topic series, and emit the upstream pull requests.

Each topic of `patches/series` is one commit of build/peft/ (a git repository of the pristine sdist, tagged
`upstream-<version>`). Here a topic is the files it adds, at their upstream paths as that commit has them, and a
`git format-patch` file of everything else it changes, whose header ends with the fields `Topic:`, `Depends:` (the
topics its pull request needs), `Forwarded:` (`no`, or `not-needed` for a fork-only topic) and `Files:` (what it adds).

    tree | reset-tree   materialise build/peft (`tree` never discards commits that are not in patches/)
    patches             write build/peft's commits back to patches/ and to our files
    check               the series and each pull request apply to the verified sdist, build/peft is in sync
    release DIR         the patched source tree that `pip install .` builds; pristine DIR: the unpatched sdist
    pr                  dist/pr/<n>-<topic>/ for each upstream-bound topic; with PEFT_REPO=..., a branch for each
"""

import argparse
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
# Files that get the local version stamp; the stamp is a build step, never part of a patch or of a pull request.
STAMPED = {"src/peft/__init__.py": '__version__ = "{v}"', "setup.py": 'VERSION = "{v}"'}
# Stable `git format-patch` output: no commit ids, no git version, no "n/m" numbering that shifts with the series.
FORMAT_PATCH = ["format-patch", "--always", "--zero-commit", "--no-signature", "--no-numbered", "--full-index"]
FIELDS = ("Topic", "Depends", "Forwarded", "Files")
BUILT_REF = "refs/peftpatch/built"
# The pages as the whole series leaves them (src/, docs/ and examples/ hold the first topic's copy of each new file,
# which the later topics change): copies for the readers of this repository, written by `patches`, checked by `check`.
ASSEMBLED = {
    "docs/source/package_reference/lora_variant_disel.md": "docs-fork/lora_variant_disel.md",
    "examples/disel_finetuning/README.md": "docs-fork/disel_finetuning.md",
}
ASSEMBLED_NOTE = (
    "<!-- Written by `make patches` from build/peft/{src}: the page as the whole patch series leaves it. -->\n"
)
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
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != p["PEFT_SHA256"]:
        fix = "point PEFT_SDIST at the sdist" if os.environ.get("PEFT_SDIST") else "delete it to download it again"
        raise BuildError(
            f"checksum mismatch for {path}: got sha256 {digest}, UPSTREAM pins {p['PEFT_SHA256']}. It is not the "
            f"pinned sdist: {fix}; if upstream really changed, update UPSTREAM."
        )
    return path


def extract(dest):
    """Extract the verified sdist to `dest` (its top folder stripped). Returns the set of upstream paths."""
    shutil.rmtree(dest, ignore_errors=True)
    Path(dest).mkdir(parents=True)
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
    res = run(["git", "ls-files", "-co", "--exclude-standard", "--", *UPSTREAM_TREES], cwd=ROOT)
    return sorted(p for p in res.stdout.splitlines() if (ROOT / p).is_file())


def series(directory=PATCHES):
    """The patch files of `directory`/series, in order."""
    order = directory / "series"
    names = [line.strip() for line in order.read_text().splitlines()] if order.exists() else []
    patches = [directory / n for n in names if n and not n.startswith("#")]
    for patch in patches:
        if not patch.is_file():
            raise BuildError(f"{order.relative_to(ROOT)} lists {patch.name}, which does not exist")
    return patches


def fields(text):
    """The fields (`Topic:`, `Depends:`, `Forwarded:`, `Files:`) of a commit message or a patch header."""
    header = text.split("\n---\n", 1)[0]
    found = {}
    for line in header.splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in FIELDS:
            found[key] = value.strip()
    return found


def with_files_field(header, files):
    """`header` (a patch header or a commit message) with its `Files:` field set to `files` (dropped if none)."""
    lines = [line for line in header.rstrip("\n").split("\n") if line.partition(": ")[0] != "Files"]
    return "\n".join(lines + ([f"Files: {' '.join(files)}"] if files else [])) + "\n"


def topics():
    """[(patch, its fields)] in series order, with the fields checked."""
    result, names = [], set()
    for patch in series():
        f = fields(patch.read_text())
        name = f.get("Topic", "")
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name) or name in names:
            raise BuildError(f"{patch.name}: needs a unique `Topic: <lowercase-name>` field, got {name!r}")
        missing = set(f.get("Depends", "").split()) - names
        if missing:
            raise BuildError(f"{patch.name}: `Depends:` names {sorted(missing)}, which is not an earlier topic")
        names.add(name)
        result.append((patch, f))
    return result


def stamp(tree):
    p = pin()
    for path, pattern in STAMPED.items():  # the release's version, whatever local version the file had
        f, stamped = Path(tree) / path, pattern.format(v=p["FULL_VERSION"])
        old = re.escape(pattern).replace(r"\{v\}", re.escape(p["PEFT_VERSION"]) + r'(\+[^"]*)?')
        text, n = re.subn(old, stamped.replace("\\", "\\\\"), f.read_text())
        if n != 1:
            raise BuildError(f"cannot stamp the local version into {path}: expected `{stamped}` exactly once")
        f.write_text(text)


def reference_tree(dest):
    """Pristine sdist + the series + the version stamp: what the patched package holds."""
    build_repo(Path(dest))
    stamp(dest)


def build_repo(path):
    """A git repository of the pristine sdist at `path` (tag `upstream-<version>`), one commit per topic."""
    p = pin()
    upstream = extract(path)
    git(path, "init", "-q")
    git(path, "config", "core.autocrlf", "false")
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", f"peft {p['PEFT_VERSION']} (pristine sdist)")
    git(path, "tag", p["TAG"])
    for patch, f in topics():
        # --empty=keep: a topic may change nothing but the files it adds
        res = git(path, "am", "-q", "--empty=keep", str(patch), check=False)
        if res.returncode != 0:
            raise BuildError(
                f"{patch.name} stopped applying in {path}:\n{res.stdout}{res.stderr}\nFix it there (`git am "
                "--show-current-patch`, edit, `git add`, `git am --continue`, then the rest), then `make patches`."
            )
        if f.get("Files"):  # the files it adds, folded into its commit
            for rel in f["Files"].split():
                if rel in upstream or not (ROOT / rel).is_file():
                    raise BuildError(f"{patch.name} adds {rel}: an upstream file, or one this repository lacks")
                (path / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, path / rel)
            git(path, "add", "--", *f["Files"].split())
            git(path, "commit", "-q", "--amend", "--no-edit", "--allow-empty")


def export(repo):
    """build/peft's commits as this repository stores them: ({patch name: text}, {file: bytes})."""
    commits = git(repo, "rev-list", "--reverse", f"{pin()['TAG']}..HEAD").stdout.split()
    patches, files = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for n, commit in enumerate(commits, 1):
            added = git(repo, "diff-tree", "-r", "--no-commit-id", "--name-only", "--diff-filter=A", commit).stdout
            added = sorted(added.split())
            for rel in added:
                files[rel] = subprocess.run(
                    ["git", "show", f"{commit}:{rel}"], cwd=repo, capture_output=True, check=True
                ).stdout
            out = Path(tmp) / str(n)
            exclude = [f":(exclude){rel}" for rel in added]
            # a range, not `-1 <commit>`: with paths, that would walk back to the last commit that touches them
            git(repo, *FORMAT_PATCH, f"--start-number={n}", "-o", out, f"{commit}^..{commit}", "--", ".", *exclude)
            written = sorted(out.glob("*.patch"))
            if not written:  # the topic changes nothing but the files it adds: its header alone
                git(repo, *FORMAT_PATCH, f"--start-number={n}", "-o", out, f"{commit}^..{commit}")
                written = sorted(out.glob("*.patch"))
                written[0].write_text(written[0].read_text().split("\n---\n", 1)[0] + "\n")
            header, sep, diff = written[0].read_text().partition("\n---\n")
            patches[written[0].name] = with_files_field(header, added) + (sep[1:] + diff if sep else "")
    return patches, files


def in_sync():
    """Whether build/peft's commits are what patches/ and our files describe."""
    patches, files = export(TREE)
    same_files = set(files) == set(our_files()) and all((ROOT / f).read_bytes() == files[f] for f in files)
    return same_files and patches == {q.name: q.read_text() for q in series()}


def tree_dirty():
    """Uncommitted changes to tracked files in build/peft (the version stamp is hidden by a clean filter)."""
    return git(TREE, "status", "--porcelain", "--untracked-files=no").stdout.strip()


def finish_tree():
    stamped = pin()["FULL_VERSION"].replace(".", r"\.")  # a BRE: `+` is literal
    git(TREE, "config", "filter.peftstamp.clean", f"sed -e 's/{stamped}/{pin()['PEFT_VERSION']}/'")
    (TREE / ".git" / "info" / "attributes").write_text("".join(f"/{f} filter=peftstamp\n" for f in STAMPED))
    (TREE / ".git" / "info" / "exclude").write_text("__pycache__/\n*.egg-info/\n.pytest_cache/\n/build/\n/dist/\n")
    stamp(TREE)
    git(TREE, "add", "--", *STAMPED)  # the clean filter hands git the unstamped text: `git status` sees no change


def cmd_tree(_args=None):
    """Create build/peft, or bring it in line with this repository unless it holds work that is not here."""
    p = pin()
    if (TREE / ".git").exists() and git(TREE, "tag", "-l", p["TAG"]).stdout.strip():
        head = git(TREE, "rev-parse", "HEAD").stdout.strip()
        built = git(TREE, "rev-parse", "-q", "--verify", BUILT_REF, check=False).stdout.strip()
        if head == built and in_sync():
            if tree_dirty():
                log("build/peft has uncommitted edits (tested as they are; commit them to their topic)")
            finish_tree()  # the version stamp follows UPSTREAM
            return log(f"build/peft is peft {p['FULL_VERSION']}: {len(series())} topics")
        if tree_dirty() or head != built:
            raise BuildError(
                "build/peft holds commits or edits that are not in patches/: `make patches` writes them here "
                "(commit edits to their topic first), `make reset-tree` throws them away"
            )
    # new, or untouched since it was built while this repository changed (a pull, say): build it from the series
    shutil.rmtree(TREE, ignore_errors=True)
    build_repo(TREE)
    git(TREE, "update-ref", BUILT_REF, "HEAD")
    finish_tree()
    log(f"build/peft is peft {p['FULL_VERSION']}: {len(series())} topics, {len(our_files())} files of ours")


def cmd_patches(_args=None):
    if not (TREE / ".git").exists():
        raise BuildError("build/peft does not exist yet: run `make tree` first")
    if tree_dirty():
        raise BuildError(
            "build/peft has uncommitted edits; commit them to their topic first, e.g.\n  cd build/peft && git commit "
            f"-a --fixup=<topic commit> && git rebase -q -i --autosquash {pin()['TAG']}"
        )
    patches, files = export(TREE)
    for old in series():
        old.unlink()
    for name, text in patches.items():
        (PATCHES / name).write_text(text)
    (PATCHES / "series").write_text("".join(f"{name}\n" for name in patches))
    for rel in set(our_files()) - set(files):
        (ROOT / rel).unlink()  # no topic adds it any more
    for rel, data in files.items():
        (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / rel).write_bytes(data)
    topics()
    git(TREE, "update-ref", BUILT_REF, "HEAD")
    for src, dst in ASSEMBLED.items():
        (ROOT / dst).parent.mkdir(parents=True, exist_ok=True)
        (ROOT / dst).write_text(ASSEMBLED_NOTE.format(src=src) + (TREE / src).read_text())
    log(f"wrote {len(patches)} topic patches to patches/ and {len(files)} files of ours")


def stacks():
    """{topic: (its fields, the topics its pull request applies first: those it depends on and theirs, in series
    order)} for every topic of the series."""
    known = {}
    for _, f in topics():
        below = []
        for dep in f.get("Depends", "").split():
            below += [t for t in known[dep][1] + [dep] if t not in below]
        known[f["Topic"]] = (f, sorted(below, key=list(known).index))
    return known


def pull_requests(repo):
    """One branch `pr/<topic>` of `repo` per upstream-bound topic: the pristine sdist, the topics it depends on (and
    theirs), and the topic itself, cherry-picked. Returns [(number, topic, its fields, the topics below it)]."""
    commits = git(repo, "rev-list", "--reverse", f"{pin()['TAG']}..HEAD").stdout.split()
    known, fork_only, prs = {}, set(), []
    for commit, (patch, _), (topic, (f, below)) in zip(commits, topics(), stacks().items(), strict=True):
        known[topic] = (commit, below)
        if f.get("Forwarded") == "not-needed":
            fork_only.add(f["Topic"])
            continue
        if fork_only & set(below):
            raise BuildError(f"{patch.name}: an upstream pull request cannot depend on fork-only topics")
        git(repo, "checkout", "-q", "-B", f"pr/{f['Topic']}", pin()["TAG"])
        for topic in below + [f["Topic"]]:
            res = git(repo, "cherry-pick", "--allow-empty", "--keep-redundant-commits", known[topic][0], check=False)
            if res.returncode != 0:
                git(repo, "cherry-pick", "--abort", check=False)
                raise BuildError(
                    f"topic {f['Topic']} does not apply to the pristine sdist plus {below}: {topic} conflicts\n"
                    f"{res.stdout}{res.stderr}\nName the topic it needs in `Depends:`, or keep the two apart."
                )
        # the fields are this repository's bookkeeping, not upstream's
        message = fields_free(git(repo, "log", "-1", "--format=%B").stdout)
        git(repo, "commit", "-q", "--amend", "--allow-empty", "-m", message)
        prs.append((len(prs) + 1, f["Topic"], f, below))
    git(repo, "checkout", "-q", commits[-1])
    return prs


def cmd_check(_args=None):
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        build_repo(Path(tmp) / "peft")  # the series applies to the verified sdist
        prs = pull_requests(Path(tmp) / "peft")  # each pull request applies to the sdist plus its dependencies
        upstream = set(git(Path(tmp) / "peft", "ls-tree", "-r", "--name-only", pin()["TAG"]).stdout.split())
    claimed = {}
    for patch, f in topics():
        body = fields_free(patch.read_text().split("\n---\n", 1)[0].split("\n\n", 1)[-1])
        if not body.strip():
            problems.append(f"{patch.name}: its header must say what the change does and why")
        if not re.match(r"(no|not-needed|yes|https?://\S+)\b", f.get("Forwarded", "")):
            problems.append(f"{patch.name}: needs `Forwarded: no | not-needed | <url>`")
        for rel in f.get("Files", "").split():
            claimed.setdefault(rel, []).append(patch.name)
    names = {t for _, t, _, _ in prs}
    for patch in series(PR_ONLY):
        if fields(patch.read_text()).get("Topic") not in names:
            problems.append(f"{patch.relative_to(ROOT)}: needs `Topic:` naming the pull request it belongs to")
    for rel in our_files():
        if rel in upstream:
            problems.append(f"{rel} is an upstream file: change it through a topic patch")
        elif len(claimed.get(rel, [])) != 1:
            problems.append(f"{rel} must be added by exactly one topic (it is by {claimed.get(rel) or 'none'})")
    if (TREE / ".git").exists():
        if tree_dirty():
            problems.append("build/peft has uncommitted edits: commit them to their topic, then `make patches`")
        elif not in_sync():
            problems.append("patches/ or our files are out of sync with build/peft: `make patches` (or `make tree`)")
        for src, dst in ASSEMBLED.items():
            page = ASSEMBLED_NOTE.format(src=src) + (TREE / src).read_text()
            if not (ROOT / dst).is_file() or (ROOT / dst).read_text() != page:
                problems.append(f"{dst} is not build/peft's {src}: `make patches`")
    if problems:
        raise BuildError("check failed:\n  " + "\n  ".join(problems))
    log(f"check passed: {len(series())} topics apply to peft {pin()['PEFT_VERSION']}; {len(prs)} pull requests apply")


def fields_free(message):
    return "\n".join(line for line in message.splitlines() if line.partition(": ")[0] not in FIELDS)


def cmd_pr(args):
    """dist/pr/<n>-<topic>/: the topic's commit (with the files it adds) and PR_DESCRIPTION.md."""
    out, work = ROOT / "dist" / "pr", BUILD / "pr-repo"
    shutil.rmtree(out, ignore_errors=True)
    build_repo(work)
    prs = pull_requests(work)
    folder = {topic: out / f"{n}-{topic}" for n, topic, _, _ in prs}
    pr_only = {}
    for patch in series(PR_ONLY):
        pr_only.setdefault(fields(patch.read_text()).get("Topic"), []).append(patch)
    for n, topic, f, below in prs:
        git(work, *FORMAT_PATCH, "-o", folder[topic], "-1", f"pr/{topic}")
        subject, _, body = git(work, "log", "-1", "--format=%B", f"pr/{topic}").stdout.partition("\n")
        needs = ", ".join(folder[t].name for t in below) or "nothing: it applies to upstream as it is"
        extra = [p.name for p in pr_only.get(topic, [])]
        for patch in pr_only.get(topic, []):
            shutil.copy2(patch, folder[topic] / f"pr-only-{patch.name}")
        description = f"# {subject}\n{body.rstrip()}\n\nDepends on: {needs}.\n"
        description += f"Also changes files the sdist lacks: {', '.join(extra)}.\n" if extra else ""
        (folder[topic] / "PR_DESCRIPTION.md").write_text(description)
    log(f"wrote {len(prs)} pull requests against peft {pin()['PEFT_VERSION']} to dist/pr/")

    repo = os.environ.get("PEFT_REPO")
    if not repo:
        return
    repo = Path(repo).resolve()
    if not (repo / ".git").exists() or git(repo, "status", "--porcelain", "--untracked-files=no").stdout:
        raise BuildError(f"PEFT_REPO={repo} must be a git checkout without uncommitted changes")
    base = git(repo, "rev-parse", "HEAD").stdout.strip()
    for n, topic, f, below in prs:
        branch = f"{args.branch}-{topic}"
        if git(repo, "rev-parse", "--verify", "-q", f"refs/heads/{branch}", check=False).returncode == 0:
            raise BuildError(f"PEFT_REPO={repo} already has a branch {branch}; pass PR_BRANCH=<another prefix>")
        git(repo, "checkout", "-q", "-b", branch, base)
        mails = [p for t in below + [topic] for p in sorted(folder[t].glob("*.patch"))]
        res = git(repo, "am", "-3", *map(str, mails), check=False)
        if res.returncode != 0:
            raise BuildError(
                f"pull request {n} ({topic}) does not apply to {repo} (branch {branch}); `git am` stopped with:\n"
                f"{res.stdout}{res.stderr}\nResolve and `git am --continue` there, or `git am --abort`."
            )
        log(f"{repo}: branch {branch} holds pull request {n} ({topic}) on top of {len(below)} it depends on")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    reset = lambda a: (shutil.rmtree(TREE, ignore_errors=True), cmd_tree())  # noqa: E731
    commands = {"fetch": lambda a: log(f"verified {fetch()}"), "tree": cmd_tree, "reset-tree": reset}
    for name, fn in {**commands, "patches": cmd_patches, "check": cmd_check}.items():
        sub.add_parser(name).set_defaults(fn=fn)
    for name, fn in (("release", reference_tree), ("pristine", extract)):
        p = sub.add_parser(name)
        p.add_argument("dest")
        p.set_defaults(fn=lambda a, fn=fn: (fn(Path(a.dest)), log(f"wrote {a.dest}")))
    pr = sub.add_parser("pr")
    pr.add_argument("--branch", default="disel")
    pr.set_defaults(fn=cmd_pr)
    args = parser.parse_args()
    args.fn(args)


if __name__ == "__main__":
    main()
