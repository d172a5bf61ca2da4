"""pytest plugin (`-p pytest_offline`, tooling/ on PYTHONPATH) for upstream PEFT's test files, offline, on the patched and
the pristine tree: Hub offline mode, `testing_utils.hub_online_once` neutralised (it would switch offline mode off and
burn ~46 s in retries per test), and the tests of `upstream-known-failures.txt` (they fail on the pristine tree here,
each with its reason) marked as non-strict xfail, so that a run fails only on something new.
"""

import contextlib
import os
import sys
from pathlib import Path

import pytest


os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

KNOWN_FAILURES = Path(__file__).with_name("upstream-known-failures.txt")


def known_failures():
    known = {}
    for line in KNOWN_FAILURES.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            nodeid, _, reason = line.partition(" | ")
            known[normalise_id(nodeid.strip())] = reason.strip() or "fails on pristine upstream in this environment"
    return known


@contextlib.contextmanager
def _offline_once(model_id):
    yield


def _neutralise_hub_online_once():
    for module in list(sys.modules.values()):
        original = getattr(module, "hub_online_once", None)
        if callable(original) and getattr(original, "__module__", "").endswith("testing_utils"):
            module.hub_online_once = _offline_once


def normalise_id(nodeid):
    """Node ids relative to the rootdir (the tree's root), kept from `tests/` on.

    Parametrized ids keep their position suffix (`config_kwargs12`) even though it shifts for every upstream case after
    one we insert: case names are not unique without it, and a renumbered id is simply absent from the pristine run,
    which the regression rule counts against the patched tree (strict, never masking).
    """
    return nodeid[nodeid.find("tests/") :] if "tests/" in nodeid else nodeid


def pytest_collection_modifyitems(session, config, items):
    _neutralise_hub_online_once()
    if os.environ.get("PEFT_NO_KNOWN_FAILURES"):
        return
    known = known_failures()
    for item in items:
        reason = known.get(normalise_id(item.nodeid))
        if reason is None:
            continue
        if reason.startswith("[setup-error]"):
            # xfail does not cover a failing fixture: such tests cannot run here at all
            item.add_marker(pytest.mark.skip(reason=f"upstream, cannot run here: {reason}"))
        else:
            item.add_marker(pytest.mark.xfail(reason=f"upstream: {reason}", strict=False))
