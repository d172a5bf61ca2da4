#!/usr/bin/env python3
"""Run the project's tests offline on the patched tree, and compare upstream's test files with the pristine sdist.

test     [pytest args]  `make test`: our tests and the upstream test files we run on the patched tree, the same
                        upstream files on the pristine sdist; the patched tree may fail nothing that pristine passes
patched  [pytest args]  the patched tree only, upstream's known failures (upstream-known-failures.txt) xfailed
prs      [pytest args]  each pull request of dist/pr/ applied with `git am` to the pristine sdist after the ones it
                        depends on: peft imports, upstream's quality checks pass on its files, and the test files it
                        adds or changes pass
pr-quality              the same without the tests (`make quality`)
known-failures          rewrite tooling/upstream-known-failures.txt from a pristine run
"""

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import peftpatch
from pytest_offline import known_failures, normalise_id


ROOT = Path(__file__).resolve().parent.parent
TREE = ROOT / "build" / "peft"
PRISTINE = ROOT / "build" / "pristine"
PY = ROOT / ".venv" / "bin" / "python"
# Upstream test files that run in full on both trees: every test file we patch, plus the LoRA files our code touches.
UPSTREAM_FILES = ["tests/test_custom_models.py", "tests/test_lora_variants.py", "tests/test_config.py"]
UPSTREAM_FILES += ["tests/test_initialization.py", "tests/test_arrow.py"]


def our_test_files():
    """Our test files: new files at upstream paths (they only exist in the patched tree), the demo's smoke test, and
    the integration tests of integration/ (TRL, DDP/FSDP2 launches; lm-eval's is skipped unless DISEL_LM_EVAL=1)."""
    return (
        sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py"))
        + sorted(str(p) for p in (ROOT / "demo").glob("test_*.py"))
        + sorted(str(p) for p in (ROOT / "integration").glob("test_*.py"))
    )


def pytest(tree, files, junit, extra, pythonpath, known=True):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*pythonpath, str(ROOT / "tooling")]), "OMP_NUM_THREADS": "1"}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if not known:
        env["PEFT_NO_KNOWN_FAILURES"] = "1"
    workers = os.environ.get("PYTEST_WORKERS", "2")
    # the tree's own pytest configuration and rootdir, also when test files outside it (ours) are passed: node ids
    # stay `tests/...` on both trees, which the regression rule compares
    cmd = [str(PY), "-m", "pytest", "-p", "pytest_offline", "--import-mode=importlib", "-o", "addopts="]
    cmd += ["-p", "no:cacheprovider", "-q", "-rfE", "--tb=line", f"--junitxml={junit}", "--timeout=900"]
    cmd += ["-c", "pyproject.toml", "--rootdir", "."]
    if workers != "0":
        cmd += ["-n", workers]
    print("+", " ".join(cmd[1:] + files + extra), f"(in {tree.relative_to(ROOT)})", flush=True)
    return subprocess.run(cmd + files + extra, cwd=tree, env=env, check=False).returncode


def outcomes(junit):
    res = {}
    for tc in ET.parse(junit).iter("testcase"):
        parts = tc.get("classname").split(".")
        nodeid = normalise_id("/".join(parts[:2]) + ".py::" + "::".join(parts[2:] + [tc.get("name")]))
        if res.get(nodeid) == "failed":
            continue  # files outside the tree (ours) carry no module in their ids: a same-named pass must not hide it
        if tc.find("failure") is not None or tc.find("error") is not None:
            res[nodeid] = "failed"
        elif tc.find("skipped") is not None:
            res[nodeid] = "xfailed" if "xfail" in (tc.find("skipped").get("type") or "") else "skipped"
        else:
            res[nodeid] = "passed"
    return res


def prepare_pristine():
    peftpatch.extract(PRISTINE)


def main():
    mode, extra = (sys.argv[1] if len(sys.argv) > 1 else "test"), sys.argv[2:]
    out = ROOT / "build" / "test-results"
    out.mkdir(parents=True, exist_ok=True)
    if mode == "patched":
        # development run: known upstream failures are xfailed/skipped, so any failure is new
        sys.exit(pytest(TREE, our_test_files() + UPSTREAM_FILES, out / "patched.xml", extra, []))
    if mode == "known-failures":
        prepare_pristine()
        pytest(PRISTINE, UPSTREAM_FILES, out / "pristine.xml", extra, [str(PRISTINE / "src")], known=False)
        write_known_failures(out / "pristine.xml")
        return
    if mode == "prs":
        sys.exit(check_pull_requests(extra))
    if mode == "pr-quality":
        sys.exit(check_pull_requests(extra, run_tests=False))
    if mode != "test":
        sys.exit(__doc__)
    # `make test`: everything on the patched tree and upstream's files on the pristine tree, raw outcomes both times
    prepare_pristine()
    pytest(TREE, our_test_files() + UPSTREAM_FILES, out / "patched.xml", extra, [], known=False)
    pytest(PRISTINE, UPSTREAM_FILES, out / "pristine.xml", extra, [str(PRISTINE / "src")], known=False)
    sys.exit(regression_rule(outcomes(out / "patched.xml"), outcomes(out / "pristine.xml")))


def pull_request_trees():
    """Each pull request of dist/pr/ (`make pr`) applied with `git am` to the pristine sdist after the pull requests it
    depends on (the `Depends:` fields of the topics), in build/pr-test/<n>-<topic>/. Yields (name, tree, whether it
    applied, the files it adds or changes)."""
    folders = {p.name.split("-", 1)[1]: p for p in (ROOT / "dist" / "pr").iterdir()}
    stacks = peftpatch.stacks()
    for topic, folder in sorted(folders.items(), key=lambda item: int(item[1].name.split("-")[0])):
        below = stacks[topic][1]
        patches = [p for t in below + [topic] for p in sorted(folders[t].glob("0*.patch"))]
        tree = ROOT / "build" / "pr-test" / folder.name
        peftpatch.extract(tree)
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost", "-C", str(tree)]
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "pristine"]):
            subprocess.run(git + args, check=True)
        applied = subprocess.run([*git, "am", "-q", "-3", *map(str, patches)], check=False).returncode == 0
        own = sorted(folders[topic].glob("0*.patch"))
        files = {
            line.split(" b/")[-1] for p in own for line in p.read_text().splitlines() if line.startswith("diff --")
        }
        yield folder.name, tree, applied, sorted(files)


def quality(tree, files):
    """Upstream's `make quality` (ruff check, ruff format --check, doc-builder style) on the files a pull request adds
    or changes, with the tree's own configuration. Returns the names of the checks that failed."""
    py = [f for f in files if f.endswith(".py")]
    styled = [f for f in files if f.endswith(".py") and f.startswith(("src/peft/", "tests/"))]
    bin_dir = PY.parent
    checks = {
        "ruff check": (py, [bin_dir / "ruff", "check", "-q"]),
        "ruff format": (py, [bin_dir / "ruff", "format", "--check", "-q"]),
        "doc-builder style": (styled, [bin_dir / "doc-builder", "style", "--max_len", "119", "--check_only"]),
    }
    failed = []
    for name, (paths, cmd) in checks.items():
        if paths and subprocess.run(list(map(str, cmd + paths)), cwd=tree, check=False).returncode != 0:
            failed.append(name)
    return failed


def check_pull_requests(extra, run_tests=True):
    """`make test-prs` (run_tests=True) and `make quality`: each pull request applies, imports, passes upstream's
    quality checks on its files and (`make test-prs`) the test files it adds or changes."""
    failed = 0
    for name, tree, applied, files in pull_request_trees():
        env = {**os.environ, "PYTHONPATH": str(tree / "src")}
        run = subprocess.run([str(PY), "-c", "import peft"], env=env, cwd=tree, check=False) if applied else None
        imports = run is not None and run.returncode == 0
        bad = quality(tree, files) if applied else ["not applied"]
        counts, rc, start = {}, 0, time.time()
        if run_tests:
            tests = sorted({f for f in files if f.startswith("tests/test_") and f != "tests/test_gpu_examples.py"})
            junit = tree / "results.xml"
            rc = pytest(tree, tests, junit, extra, [str(tree / "src")]) if imports else 1
            seen = list(outcomes(junit).values()) if imports else []
            counts = {o: seen.count(o) for o in ("passed", "failed", "skipped", "xfailed")}
        print(
            f"PR {name}: applies {applied}, imports {imports}, quality {'failed: ' + ', '.join(bad) if bad else 'ok'}"
            + (f", tests {counts}, {time.time() - start:.0f} s" if run_tests else ""),
            flush=True,
        )
        failed += rc != 0 or bool(bad) or not imports
    return 1 if failed else 0


def regression_rule(patched, pristine):
    """The patched tree may fail nothing that the pristine tree passes; our own tests (absent there) may fail nothing."""
    regressions = sorted(t for t, o in patched.items() if o == "failed" and pristine.get(t) != "failed")
    upstream_failures = sorted(t for t, o in patched.items() if o == "failed" and pristine.get(t) == "failed")
    known = set(known_failures())
    unlisted = sorted(set(upstream_failures) - known)
    stale = sorted(t for t in known if pristine.get(t) == "passed")
    ours = sum(1 for t in patched if t not in pristine)
    print(f"\npristine upstream: {sum(o == 'failed' for o in pristine.values())} of {len(pristine)} tests failed")
    print(
        f"patched tree: {len(patched)} tests, {len(patched) - ours} of them compared id for id with the pristine run "
        f"({sum(t not in patched for t in pristine)} pristine ids missing); {ours} ids are ours (DISeL entries and "
        f"files; any failure among them counts); {len(upstream_failures)} failed that also fail on pristine upstream"
    )
    for t in unlisted:
        print(f"note: fails on pristine too but is not in upstream-known-failures.txt: {t}")
    for t in stale:
        print(f"note: listed in upstream-known-failures.txt but passes on pristine: {t}")
    for t in regressions:
        print(f"REGRESSION (fails on the patched tree, not on pristine upstream): {t}")
    print("regression rule (failures that pristine upstream shares are not counted):")
    print(f"{sum(o == 'passed' for o in patched.values())} passed, {len(regressions)} failed")
    return 1 if regressions else 0


def write_known_failures(junit):
    path = ROOT / "tooling" / "upstream-known-failures.txt"
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    lines = []
    for tc in ET.parse(junit).iter("testcase"):
        for tag in ("failure", "error"):
            e = tc.find(tag)
            if e is None:
                continue
            msg = e.get("message") or ""
            parts = tc.get("classname").split(".")
            nodeid = normalise_id("/".join(parts[:2]) + ".py::" + "::".join(parts[2:] + [tc.get("name")]))
            reason = (msg.splitlines() or ["fails on pristine"])[0][:150]
            if any(s in msg for s in ("adapter_config.json", "offline", "LocalEntryNotFound", "huggingface.co")):
                reason = "needs the Hugging Face Hub (tests run offline)"
            lines.append(f"{nodeid} | {'[setup-error] ' if tag == 'error' else ''}{reason}")
    path.write_text("\n".join(header) + "\n" + "\n".join(sorted(set(lines))) + "\n")
    print(f"wrote {len(set(lines))} known failures to {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
