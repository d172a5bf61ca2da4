"""Data for the demo, all generated or found offline.

- Target task: seeded two-step arithmetic word problems with 2-digit numbers. The model is trained to write the two
  steps, then "The answer is N."; it is scored by exact match of N (greedy decoding).
- Retention (evaluation): perplexity on Python's own documentation (`pydoc_data.topics`, stdlib), the licence texts in
  /usr/share/common-licenses, and plain English (New York Times editorial snippets from the VADER data set), plus
  zero-shot sentiment accuracy on movie review snippets with clear human polarity (VADER data set).
- Retention (validation, for tuning only, never reported as a result): Amazon review snippets and a disjoint set of
  pydoc topics, so that nothing is tuned on the reported evaluation sets.

The VADER data come from the `vadersentiment==3.3.2` sdist (MIT): additional_resources/hutto_ICWSM_2014.tar.gz. They
are extracted once under build/demo/data/.
"""

import hashlib
import io
import json
import random
import re
import subprocess
import sys
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path


VADER_SPEC = "vadersentiment==3.3.2"
VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
VADER_INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
VADER_FILES = {
    "movie": "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt",
    "nyt": "hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt",
    "amazon": "hutto_ICWSM_2014/amazonReviewSnippets_GroundTruth.txt",
    "tweets": "hutto_ICWSM_2014/tweets_GroundTruth.txt",
}
LICENSE_DIR = Path("/usr/share/common-licenses")


class DataError(RuntimeError):
    """A failure with a message meant for the user."""


# --- the target task ---------------------------------------------------------------------------------------------

NAMES = ["Tom", "Anna", "Ravi", "Mia", "Leo", "Sara", "Omar", "Lucy", "Ben", "Nina", "Ivan", "Zoe", "Kofi", "Emma"]
ITEMS = ["apples", "stickers", "marbles", "books", "coins", "cards", "pencils", "shells", "stamps", "cookies"]


@dataclass
class Problem:
    question: str
    answer: int
    steps: str  # the worked solution, e.g. "37 + 25 = 62, 62 - 18 = 44."


def _solve(a, op1, b, op2, c) -> tuple[int, str]:
    """`(a op1 b) op2 c` with its worked steps."""
    first = a + b if op1 == "+" else a - b
    result = first + c if op2 == "+" else first - c
    return result, f"{a} {op1} {b} = {first}, {first} {op2} {c} = {result}."


def _problem(rng: random.Random) -> Problem:
    name, friend = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    kind = rng.randrange(6)
    if kind == 0:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        c = rng.randint(10, min(99, a + b))
        q = f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to {friend}. How many {item} does {name} have now?"
        return Problem(q, *_solve(a, "+", b, "-", c))
    if kind == 1:
        a = rng.randint(20, 99)
        b, c = rng.randint(10, a), rng.randint(10, 99)
        q = f"{name} had {a} {item}, lost {b} of them, and then found {c} more. How many {item} does {name} have now?"
        return Problem(q, *_solve(a, "-", b, "+", c))
    if kind == 2:
        a, b, c = rng.randint(10, 99), rng.randint(10, 99), rng.randint(10, 99)
        q = f"{name} has {a} {item}, {friend} has {b} {item}, and their teacher has {c} {item}. How many {item} do they have together?"
        return Problem(q, *_solve(a, "+", b, "+", c))
    if kind == 3:
        a, b, c = rng.randint(10, 99), rng.randint(10, 60), rng.randint(10, 60)
        a = max(a, b + c)
        q = f"A book has {a} pages. {name} reads {b} pages on Monday and {c} pages on Tuesday. How many pages are left to read?"
        return Problem(q, *_solve(a, "-", b, "-", c))
    if kind == 4:
        b, c = rng.randint(10, 50), rng.randint(10, 49)
        a = rng.randint(b + c, 99)
        q = f"{name} had {a} {item} and gave {b} to {friend} and {c} to a neighbour. How many {item} are left?"
        return Problem(q, *_solve(a, "-", b, "-", c))
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = rng.randint(10, min(99, a + b))
    q = f"{name} collects {a} {item} in the morning and {b} in the afternoon. {friend} collects {c}. How many more {item} does {name} have than {friend}?"
    return Problem(q, *_solve(a, "+", b, "-", c))


def make_problems(n: int, seed: int) -> list[Problem]:
    """`n` distinct seeded word problems; different seeds give (almost surely) disjoint sets."""
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        p = _problem(rng)
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def split_problems(n_train: int, n_val: int, n_test: int, seed: int):
    """Train, validation (training distribution, for tuning) and held-out test problems, mutually disjoint."""
    test = make_problems(n_test, seed + 1_000_003)
    val = make_problems(n_val, seed + 2_000_003)
    held = {p.question for p in test + val}
    train = [p for p in make_problems(n_train + len(held), seed) if p.question not in held][:n_train]
    return train, val, test


def prompt(question: str) -> str:
    """The prompt format used for training and evaluation of the target task (zero-shot, no chat template)."""
    return f"Question: {question}\nAnswer:"


def target(problem: Problem) -> str:
    """The training target after the prompt: the worked steps, then the answer as a number."""
    return f" {problem.steps} The answer is {problem.answer}."


# --- the VADER data set ------------------------------------------------------------------------------------------


def fetch_vader(downloads: Path, log=print) -> Path:
    """The vadersentiment sdist under `downloads`, fetched with pip once if it is not there yet."""
    downloads = Path(downloads)
    sdist = downloads / VADER_SDIST
    if sdist.exists():
        return sdist
    downloads.mkdir(parents=True, exist_ok=True)
    log(f"fetching the {VADER_SPEC} sdist (for its labelled sentiment data) into {downloads} ...")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        VADER_SPEC,
        "-d",
        str(downloads),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0 or not sdist.exists():
        raise DataError(
            f"Could not download the {VADER_SPEC} sdist (needed for the sentiment and plain English sets):\n"
            f"{res.stdout[-2000:]}{res.stderr[-2000:]}\nRun `{' '.join(cmd)}` by hand, or put {VADER_SDIST} into "
            f"{downloads}."
        )
    return sdist


def extract_vader(downloads: Path, data_dir: Path, log=print) -> dict[str, Path]:
    """Extract the three ground-truth files from the sdist once; return {name: path}."""
    data_dir = Path(data_dir)
    out = {key: data_dir / Path(member).name for key, member in VADER_FILES.items()}
    if all(p.exists() for p in out.values()):
        return out
    sdist = fetch_vader(downloads, log=log)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tarfile.open(sdist) as outer:
            inner_bytes = outer.extractfile(VADER_INNER).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
            for key, member in VADER_FILES.items():
                data = inner.extractfile(member).read()
                tmp = out[key].with_suffix(".tmp")
                tmp.write_bytes(data)
                tmp.rename(out[key])
    except (tarfile.TarError, KeyError, AttributeError) as e:
        raise DataError(f"{sdist} is not the expected {VADER_SPEC} sdist ({e}); delete it and run again.") from e
    return out


def read_vader(path: Path) -> list[tuple[float, str]]:
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split("\t")
        if len(parts) >= 3:
            try:
                rows.append((float(parts[1]), parts[2].replace("''", '"').strip()))
            except ValueError:
                continue
    return rows


@dataclass
class SentimentExample:
    text: str
    label: str  # "positive" or "negative"


def sentiment_set(path: Path, n: int, seed: int, threshold: float = 2.0) -> list[SentimentExample]:
    """`n` snippets with clear polarity (|mean human rating| >= threshold), balanced, seeded."""
    rows = [(s, t) for s, t in read_vader(path) if abs(s) >= threshold and 20 <= len(t) <= 300]
    pos = [SentimentExample(t, "positive") for s, t in rows if s > 0]
    neg = [SentimentExample(t, "negative") for s, t in rows if s < 0]
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    out = pos[: n // 2] + neg[: n - n // 2]
    rng.shuffle(out)
    return out


def _hash_split(key: str, salt: str) -> float:
    return int(hashlib.sha1(f"{salt}:{key}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def pydoc_texts(split: str) -> str:
    """Python's documentation topics; `split` "eval" or "val" are disjoint (by a hash of the topic name)."""
    from pydoc_data.topics import topics

    keep = []
    for name in sorted(topics):
        is_val = _hash_split(name, "pydoc") < 0.3
        if (split == "val") == is_val:
            keep.append(topics[name].strip())
    return "\n\n".join(keep)


def licence_texts() -> str:
    files = ["Apache-2.0", "BSD", "MPL-2.0", "GPL-3", "LGPL-2.1", "Artistic"]
    found = [LICENSE_DIR / f for f in files if (LICENSE_DIR / f).is_file()]
    if not found:
        found = sorted(p for p in LICENSE_DIR.glob("*") if p.is_file())
    if not found:
        raise DataError(f"No licence texts found in {LICENSE_DIR} (Debian's base-files package puts them there).")
    return "\n\n".join(re.sub(r"[ \t]+", " ", p.read_text(errors="replace")) for p in found)


def snippets_text(path: Path, seed: int) -> str:
    """The sentences of a VADER file in a seeded order, as one plain English text."""
    rows = [t for _, t in read_vader(path) if len(t) >= 30]
    random.Random(seed).shuffle(rows)
    return "\n".join(rows)


@dataclass
class DemoData:
    train: list
    val: list
    test: list
    retention_eval: dict  # name -> text
    retention_val: dict  # name -> text
    sentiment: list
    sentiment_val: list

    def summary(self) -> dict:
        return {
            "train_problems": len(self.train),
            "val_problems": len(self.val),
            "test_problems": len(self.test),
            "sentiment_examples": len(self.sentiment),
            "sentiment_val_examples": len(self.sentiment_val),
            "retention_eval_sets": sorted(self.retention_eval),
            "retention_val_sets": sorted(self.retention_val),
            "example_problem": asdict(self.test[0]),
        }


def build_data(
    data_dir: Path, downloads: Path, n_train: int, n_val: int, n_test: int, n_sentiment: int, data_seed: int, log=print
):
    """Every data set of the demo, drawn with `data_seed` only: the training seed of a run changes its adapter init and
    the order of the training problems, never what it is evaluated on."""
    seed = data_seed
    train, val, test = split_problems(n_train, n_val, n_test, seed)
    vader = extract_vader(downloads, data_dir, log=log)
    retention_eval = {
        "pydoc": pydoc_texts("eval"),
        "licences": licence_texts(),
        "english": snippets_text(vader["nyt"], seed),
    }
    retention_val = {"amazon": snippets_text(vader["amazon"], seed), "pydoc_val": pydoc_texts("val")}
    sentiment = sentiment_set(vader["movie"], n_sentiment, seed)
    sentiment_val = sentiment_set(vader["tweets"], n_sentiment, seed)
    data = DemoData(train, val, test, retention_eval, retention_val, sentiment, sentiment_val)
    (Path(data_dir) / "summary.json").write_text(json.dumps(data.summary(), indent=2))
    return data
