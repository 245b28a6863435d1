"""Fault classes through the command line, in bounded time: a flipped byte in every file a
command reads, a full disk at each writer, and a kill at each atomic rename.

Every case runs ``hetgraph`` in a child process (:mod:`faults`: forked from a server that
has imported torch once, so a case takes a second, not twenty) and accepts only two
endings: exit 0 with the results of an undamaged, uninterrupted run, or exit 2 with exactly
one ``error:`` line naming the file — never exit 1, a traceback or a signal — and no
temporary left behind once the command has run again.

Cases (all seeded): one flipped byte in each of the 35 files of a datastore, its index, a
trained adapter, an interrupted run's checkpoint and a corpus cache entry; 9 file-size
limits inside 5 commands' writers; and a kill before the first rename of each distinct
target of 5 commands (and after each command's last rename), 41 kills in all.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
from pathlib import Path

import pytest
from faults import Result, Runner, flip_byte, leftovers

from hetgraph.testing import write_cli_workspace

SEED = 11
DATASTORE = ["--context-length", "64", "--stride", "32", "--batch-size", "4"]
METHODS = ("base", "knn", "gnn", "gnn_knn")


# ------------------------------------------------------------------------------ workspace
class Workspace:
    r"""A tiny model, corpus and run config (shared, never written), and the commands."""

    def __init__(self, root: Path, run: Runner) -> None:
        self.root, self.run = root, run
        self.inputs = write_cli_workspace(root / "inputs")

    def common(self) -> list:
        w = self.inputs
        return ["--model", w / "model", "--corpus", w / "corpus", "--threads", "1"]

    def datastore_build(self, case: Path) -> list:
        return ["datastore", "build", *self.common(), "--out", case / "ds", *DATASTORE]

    def train(self, case: Path, out: str = "adapter") -> list:
        return [
            "train",
            *self.common(),
            "--datastore",
            case / "ds",
            "--out",
            case / out,
            "--config",
            self.inputs / "run.json",
        ]

    def eval(self, case: Path) -> list:
        return [
            "eval",
            *self.common(),
            "--datastore",
            case / "ds",
            "--adapter",
            case / "adapter",
            "--config",
            self.inputs / "run.json",
            "--json",
            case / "eval.json",
        ]

    def __call__(self, argv: list, case: Path, **kwargs) -> Result:
        """Run ``argv`` with ``case/cache`` as the cache (the command's own)."""
        self.run.env["HETGRAPH_CACHE"] = str(case / "cache")
        return self.run(*argv, **kwargs)


def ok(result: Result) -> Result:
    assert result.code == 0, result.err[-3000:]
    return result


def one_error_naming(result: Result, *names) -> str:
    r"""``result`` ended in exit 2 with exactly one ``error:`` line naming one of
    ``names`` (a file or its directory), and no traceback."""
    assert "Traceback" not in result.err, result.err
    lines = result.error_lines()
    assert result.code == 2 and len(lines) == 1, (result.code, result.err[-3000:])
    assert any(str(name) in lines[0] for name in names), (names, lines[0])
    return lines[0]


def eval_results(path: Path) -> dict:
    results = json.loads(path.read_text())
    return {method: results[method]["ppl"] for method in METHODS}


def adapter_tensors(directory: Path) -> dict:
    from safetensors.torch import load_file

    return {
        k: v.numpy().tobytes() for k, v in load_file(str(directory / "adapter.safetensors")).items()
    }


def datastore_bytes(directory: Path) -> dict[str, bytes]:
    r"""Every file of a datastore and its in-memory index but the lock and the λ/T record."""
    return {
        str(p.relative_to(directory)): p.read_bytes()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.name != "knn_tuning.json"
    }


def copy(source: Path, target: Path, *names: str) -> Path:
    for name in names:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, symlinks=True)
    return target


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    r"""``ref/``: a datastore with its index, a trained adapter (evaluated once, so its
    card and records exist), ``partial/`` (the same training killed right after its first
    checkpoint) and ``cache/`` (the corpus cache entry); the reference results."""
    root = tmp_path_factory.mktemp("fault-classes")
    ws = Workspace(root, Runner(root / "logs"))
    ref = root / "ref"
    ok(ws(ws.datastore_build(ref), ref))
    renames = root / "train.renames"
    ok(ws(ws.train(ref), ref, renames=renames))
    first_checkpoint = [Path(p).name for p in json.loads(renames.read_text())].index("checkpoint")
    killed = ws(ws.train(ref, "partial"), ref, kill_at=(first_checkpoint, "after"))
    assert killed.code == -signal.SIGKILL and not (ref / "partial" / "training.json").exists()
    ok(ws(ws.eval(ref), ref))
    ws.ref = ref
    ws.results = eval_results(ref / "eval.json")
    ws.weights = adapter_tensors(ref / "adapter")
    ws.datastore = datastore_bytes(ref / "ds")
    return ws


# ------------------------------------------------------------------- 1. flipped bytes
#: (directory, file) -> consumer. Every file a command reads in the datastore, its index,
#: a trained adapter, an interrupted run (its best adapter and checkpoint) and the corpus
#: cache entry; ``.hetgraph.lock`` files hold only their holder's pid for messages.
CACHE_FILES = [
    f"{split}.{kind}"
    for split in ("train", "valid", "test")
    for kind in ("tokens.npy", "doc_ids.npy", "docs.json")
] + ["corpus.json"]
FLIPS = (
    [
        ("ds", name, "eval")
        for name in (
            "doc_ids.npy",
            "doc_names.json",
            "keys.npy",
            "knn_tuning.json",
            "metadata.json",
            "next_tokens.npy",
            "positions.npy",
            "progress.json",
            "tokens.npy",
        )
    ]
    + [("ds/index", name, "eval") for name in ("index.faiss", "index.json")]
    + [
        ("adapter", name, "eval")
        for name in (
            "README.md",
            "adapter.safetensors",
            "adapter_config.json",
            "evaluation.json",
            "knn_tuning.json",
            "training.json",
        )
    ]
    + [
        ("partial", name, "train")
        for name in ("README.md", "adapter.safetensors", "adapter_config.json")
    ]
    + [
        ("partial/checkpoint", name, "train")
        for name in (
            "README.md",
            "adapter.safetensors",
            "adapter_config.json",
            "optimizer.safetensors",
            "trainer_state.json",
        )
    ]
    + [("cache", name, "eval") for name in CACHE_FILES]
)
#: Files outside every integrity record, with why: verify does not read them, and a
#: consumer reading a damaged one ends well (exit 0, same results).
NOT_VERIFIED = {
    "README.md": "the model card is documentation",
    "knn_tuning.json": "eval's tuned λ/T: written by eval, read by generate --knn",
    "evaluation.json": "the card's record of eval's results: rewritten by eval",
}


def test_every_file_a_command_reads_is_listed(ws):
    # A file added to these directories later must be added to FLIPS (or to the lock files).
    listed = {(where, name) for where, name, _ in FLIPS}
    entry = next((ws.ref / "cache" / "corpus").iterdir())
    found = {("cache", p.name) for p in entry.iterdir()}
    for where in ("ds", "ds/index", "adapter", "partial", "partial/checkpoint"):
        found |= {
            (where, p.name)
            for p in (ws.ref / where).iterdir()
            if p.is_file() and p.name != ".hetgraph.lock"
        }
    assert found == listed


@pytest.mark.parametrize("where, name, consumer", FLIPS, ids=[f"{w}/{n}" for w, n, _ in FLIPS])
def test_a_flipped_byte_is_found_or_harmless(ws, tmp_path, where, name, consumer):
    case = copy(ws.ref, tmp_path, "ds", "adapter", "partial", "cache")
    directory = case / where
    if where == "cache":
        directory = next((case / "cache" / "corpus").iterdir())
    target = directory / name
    flip_byte(target, SEED)

    report = ws(["verify", directory], case)
    assert "Traceback" not in report.err and report.code in (0, 2), report.err
    if name in NOT_VERIFIED:
        assert report.code == 0, report.out + report.err
    else:
        assert report.code == 2 and report.out.startswith(f"DAMAGED: {directory}"), report.out
        assert name in report.out, report.out

    if consumer == "eval":
        result = ws(ws.eval(case), case)
        if result.code == 0:
            assert eval_results(case / "eval.json") == ws.results
        else:
            one_error_naming(result, target, directory)
    else:
        result = ws(ws.train(case, "partial"), case)
        if result.code == 0:
            assert adapter_tensors(case / "partial") == ws.weights
        else:
            one_error_naming(result, target, directory)
    if name in NOT_VERIFIED or where == "cache" or name == "progress.json":
        # Documentation and records a command rewrites; a cache entry is rebuilt; a
        # completed datastore no longer reads its progress record.
        assert result.code == 0, result.err[-3000:]
    assert leftovers(case) == []


# ------------------------------------------------------------------ 2. full disk at writers
#: (command, file-size limit in bytes, what the limit trips in): sizes between the files
#: each command writes (cache arrays 17 KB, keys.npy 270 KB, index.faiss 540 KB, the
#: adapter 31 KB and its optimizer state 48 KB, eval.json 2.5 KB; on-disk blocks of 1,000
#: rows 130 KB and lists 570 KB).
FULL_DISKS = [
    ("datastore", 1_000, "the corpus cache"),
    ("datastore", 20_000, "keys.npy"),
    ("datastore", 300_000, "index.faiss"),
    ("index", 300_000, "index.faiss"),
    ("ondisk", 100_000, "a block of the on-disk index"),
    ("ondisk", 300_000, "the on-disk lists (index.ivfdata)"),
    ("train", 20_000, "the best adapter"),
    ("train", 40_000, "the checkpoint's optimizer state"),
    ("eval", 1_000, "eval.json"),
]


def command(ws: Workspace, kind: str, case: Path) -> list:
    if kind == "datastore":
        return ws.datastore_build(case)
    if kind in ("index", "ondisk"):
        extra = (
            ["--factory", "IVF8,Flat", "--on-disk", "--shard-rows", "1000"]
            if kind == "ondisk"
            else ["--factory", "Flat"]
        )
        return ["index", "build", "--datastore", case / "ds", "--threads", "1", *extra]
    if kind == "train":
        return ws.train(case)
    return ws.eval(case)


def inputs_for(ws: Workspace, kind: str, case: Path) -> Path:
    r"""A fresh case directory holding what ``kind`` reads (the cache too: a datastore
    build starts without one)."""
    case.mkdir(parents=True)
    names = {
        "datastore": (),
        "index": ("ds", "cache"),
        "ondisk": ("ds", "cache"),
        "train": ("ds", "cache"),
        "eval": ("ds", "adapter", "cache"),
    }[kind]
    return copy(ws.ref, case, *names)


def same_result(ws: Workspace, kind: str, case: Path, reference: Path | None = None) -> None:
    if kind == "datastore":
        assert datastore_bytes(case / "ds") == ws.datastore
    elif kind in ("index", "ondisk"):
        searched = search(case / "ds")
        expected = search(reference / "ds") if reference else search(ws.ref / "ds")
        for got, want in zip(searched, expected, strict=True):
            assert (got == want).all()
    elif kind == "train":
        assert adapter_tensors(case / "adapter") == ws.weights
    else:
        assert eval_results(case / "eval.json") == ws.results


def search(directory: Path):
    import numpy as np
    import torch

    from hetgraph.datastore import Datastore
    from hetgraph.index import DatastoreIndex

    store = Datastore.open(directory)
    index = DatastoreIndex.load(directory / "index", store)
    queries = torch.from_numpy(np.asarray(store.keys[::97], dtype=np.float32))
    return [np.asarray(t) for t in index.search(queries, 4)]


@pytest.fixture(scope="module")
def ondisk_reference(ws, tmp_path_factory):
    case = inputs_for(ws, "ondisk", tmp_path_factory.mktemp("ondisk") / "ref")
    ok(ws(command(ws, "ondisk", case), case))
    return case


@pytest.mark.parametrize(
    "kind, limit, where", FULL_DISKS, ids=[f"{k}-{n}" for k, n, _ in FULL_DISKS]
)
def test_a_full_disk_at_each_writer_is_one_line_and_resumes(
    ws, ondisk_reference, tmp_path, kind, limit, where
):
    case = inputs_for(ws, kind, tmp_path / "case")
    argv = command(ws, kind, case)
    line = one_error_naming(ws(argv, case, file_size=limit), case)
    assert re.search(rf"cannot write {re.escape(str(case))}/\S+: ", line), line
    assert leftovers(case) == []
    if kind == "train" and (case / "adapter" / "adapter_config.json").exists():
        ok(ws(["verify", case / "adapter"], case))  # the best adapter so far stays loadable
    ok(ws(argv, case))
    same_result(ws, kind, case, ondisk_reference if kind == "ondisk" else None)
    assert leftovers(case) == []


# ------------------------------------------------------------------ 3. a kill at each rename
KILLED = ("datastore", "index", "ondisk", "train", "eval")
_HEX = re.compile(r"\.\d+-[0-9a-f]{8}\.tmp|\.old-[0-9a-f]{8}")


def kill_points(renames: list[str]) -> list[tuple[int, str]]:
    r"""Before the first rename of each distinct target (temporary names without their
    pid and hex; the renames inside a temporary directory as one), and after the last.

    The state after rename n is the state before rename n + 1 (less what lies between),
    so these cover every kind of state a kill at a rename leaves."""
    seen: dict[str, int] = {}
    for n, target in enumerate(renames):
        key = _HEX.sub(".*", re.sub(r"(\.tmp)/.*", r"\1/*", target))
        seen.setdefault(key, n)
    return [(n, "before") for n in seen.values()] + [(len(renames) - 1, "after")]


@pytest.fixture(scope="module")
def renames(ws, tmp_path_factory):
    r"""Each command's renames, counted in an uninterrupted dry run."""
    root = tmp_path_factory.mktemp("renames")
    counted = {}
    for kind in KILLED:
        case = inputs_for(ws, kind, root / kind)
        log = root / f"{kind}.json"
        ok(ws(command(ws, kind, case), case, renames=log))
        counted[kind] = json.loads(log.read_text())
    return counted


def test_the_kill_points_cover_every_command(renames):
    points = {kind: kill_points(names) for kind, names in renames.items()}
    assert all(len(p) >= 3 for p in points.values()), points
    assert sum(map(len, points.values())) <= 45, points  # bounded: about 2 s each


@pytest.mark.parametrize("kind", KILLED)
def test_a_kill_at_each_rename_resumes_to_the_uninterrupted_result(
    ws, renames, ondisk_reference, tmp_path, kind
):
    problems = []
    for n, when in kill_points(renames[kind]):
        case = inputs_for(ws, kind, tmp_path / f"{n}-{when}")
        argv = command(ws, kind, case)
        killed = ws(argv, case, kill_at=(n, when))
        assert killed.code == -signal.SIGKILL, (n, when, killed.err[-3000:])
        ok(ws(argv, case))
        same_result(ws, kind, case, ondisk_reference if kind == "ondisk" else None)
        if leftovers(case):
            problems.append((when, renames[kind][n], leftovers(case)))
    assert problems == []
