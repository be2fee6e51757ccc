"""The method contract (`vlp.methods.base`), checked for EVERY registered method: a new method gets these
tests by adding its line to `vlp.methods.METHODS`.

Each method runs at a tiny size (its demo config, shrunk: `contract_config`) on a 32 px world. Checked:
the forward's loss and parts; backward reaches every trainable parameter except those the method declares
in `unused_parameters()`; 10 steps + resume + 10 equal 20 steps bit for bit; `encode_pair` shapes
against `pair_dims`; retrieval by the declared protocols; a save / load round trip of every tensor; the
declared capabilities are consistent; and (slow) the parts the method declares rank-independent agree
between 2 gloo processes and 1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vlp.build import method_class_of, world_class_words
from vlp.config import RunConfig, build_config, load_config
from vlp.data.datasets import PairDataset, RetrievalSet, collate, distinct_images
from vlp.evaluate import evaluate_method
from vlp.methods import METHODS, PretrainMethod, build_method
from vlp.methods.base import BATCH_INPUTS, RETRIEVAL_PROTOCOLS
from vlp.models.model import VLModel
from vlp.train.checkpoint import load_model_weights, save_model_weights
from vlp.train.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = sorted(METHODS)
WORKER = Path(__file__).with_name("contract_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"


def shrink(depth: int) -> int:
    return min(depth, 1)


def contract_config(name: str, image_size: int = 32, **train) -> RunConfig:
    """Method `name`'s demo config at the contract-test size (1 layer per tower, width 32, 32 px)."""
    base = load_config(METHODS[name].demo_config).model_dump(mode="json")
    model = base["model"]
    model.update(embed_dim=16)
    model["vision"].update(image_size=image_size, patch_size=8, width=32, depth=1, heads=2)
    model["text"].update(width=32, heads=2, depth=shrink(model["text"]["depth"]))
    model["fusion"].update(heads=2, depth=shrink(model["fusion"]["depth"]))
    base["data"].update(num_workers=0, budget=None)
    base["train"].update({"steps": 2, "batch_size": 8, "warmup_steps": 1, "log_every": 1, "ckpt_every": 0,
                          "device": "cpu", "progress": False, "tensorboard": False, **train})
    base["eval"].update(num_images=4, k_rerank=2, batch_size=16)
    if "image_vocab_size" in base["method"]:  # a visual tokenizer: 40 tiny images hold few distinct patches
        base["method"].update(image_vocab_size=16, tokenizer_images=40)
    return build_config(base, source=f"contract:{name}")


def build(name: str, tok, seed: int = 0, world=None, **train) -> tuple[RunConfig, PretrainMethod]:
    """The method at the contract size; with `world`, prepared as the Trainer would before step 0
    (`images_to_prepare` / `prepare`), for tests that call the method directly."""
    cfg = contract_config(name, **train)
    torch.manual_seed(seed)
    model = VLModel(cfg.model, vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    method = build_method(cfg, model, tok, class_words=world_class_words())
    if world is not None and method.images_to_prepare():
        method.prepare(distinct_images(PairDataset(world.split("train"), tok, 40, max_words=40),
                                       method.images_to_prepare()))
    return cfg, method


def batch_of(world, tok, rows: int = 8):
    data = PairDataset(world.split("train"), tok, 40, max_words=40)
    per = data.captions_per_image  # one caption of `rows` different images
    batch = collate([data[i * per + i % per] for i in range(rows)])
    batch.sample_keys = torch.arange(rows)
    return batch


@pytest.mark.parametrize("name", NAMES)
def test_declared_capabilities_are_consistent(name):
    cls = METHODS[name]
    assert cls.name == name and issubclass(cls, PretrainMethod)
    assert cls.config_class.model_fields["name"].default == name
    assert cls.retrieval_protocols and set(cls.retrieval_protocols) <= set(RETRIEVAL_PROTOCOLS)
    assert set(cls.inputs) <= BATCH_INPUTS and ("images" in cls.inputs or "region_feats" in cls.inputs)
    assert cls.demo_config is not None and load_config(cls.demo_config).method.name == name
    cfg = load_config(cls.demo_config)
    assert method_class_of(cfg) is cls
    # the retrieval fine-tuning overrides are valid keys of the method's own section
    build_config(cfg.model_dump(mode="json"), list(cls.retrieval_finetune_overrides))
    if cls.figure is not None:
        __import__(cls.figure)
    assert set(cls.rank_independent_parts) and all(isinstance(p, str) for p in cls.rank_independent_parts)


@pytest.mark.parametrize("name", NAMES)
def test_forward_loss_parts_and_gradients(name, world, tok):
    cfg, method = build(name, tok, world=world)
    method.train()
    batch = batch_of(world, tok)
    out = method(batch)
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
        if key != "loss":
            assert not value.requires_grad, f"part {key} must be detached"
    assert set(method.rank_independent_parts) <= set(out) | {"grad_norm"}
    out["loss"].backward()
    declared = method.unused_parameters()
    names = {n for n, _ in method.named_parameters()}
    assert declared <= names, f"declared unused parameters that do not exist: {sorted(declared - names)[:5]}"
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None and n not in declared]
    assert not missing, f"{name}: backward does not reach {missing[:8]} and the method does not declare them"
    # with several steps every trainable parameter is reached by some step (ratio-mixing methods run one task a step)
    reached = {n for n, p in method.named_parameters() if p.grad is not None}
    for step in range(8):
        method.on_step_end()
        method.zero_grad(set_to_none=True)
        batch.sample_keys = torch.arange(8) + 8 * (step + 1)
        method(batch)["loss"].backward()
        reached |= {n for n, p in method.named_parameters() if p.grad is not None}
    never = {n for n, p in method.named_parameters() if p.requires_grad} - reached
    always_unused = never - declared
    assert not always_unused, f"{name}: trainable parameters never reached: {sorted(always_unused)[:8]}"


def train_or_crash(name: str, tok, data, out: Path, steps: int, resume: bool = False,
                   crash_at_step: int = 0) -> tuple[list[dict], PretrainMethod]:
    """`steps` steps of method `name` on `data` into `out` (checkpoint every steps // 2), resumed from `out`
    with `resume`; with `crash_at_step` the process "dies" in that step (RuntimeError "simulated crash")."""
    cfg, method = build(name, tok, steps=steps, ckpt_every=steps // 2)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / "tok.json")
    if crash_at_step:
        forward, calls = method.forward, []

        def dying(batch):
            calls.append(1)
            if len(calls) == crash_at_step:
                raise RuntimeError("simulated crash")
            return forward(batch)

        method.forward = dying
    trainer = Trainer(cfg, method, data, collate, out, tokenizer_json=out / "tok.json")
    return trainer.fit(resume=out if resume else None), method


def assert_resume_is_exact(name: str, tok, data, tmp_path: Path, steps: int) -> None:
    """`steps` straight equal steps // 2, a crash in the next step, and a resume: the same losses after the
    checkpoint and bit-identical final weights; the training moved."""
    half = steps // 2
    straight, a = train_or_crash(name, tok, data, tmp_path / "straight", steps)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_or_crash(name, tok, data, tmp_path / "resumed", steps, crash_at_step=half + 1)
    second, b = train_or_crash(name, tok, data, tmp_path / "resumed", steps, resume=True)
    assert [r["step"] for r in second] == list(range(half + 1, steps + 1))
    for x, y in zip(straight[half:], second):
        assert x["loss"] == y["loss"], (x["step"], x["loss"], y["loss"])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:5]
    assert straight[-1]["loss"] != straight[0]["loss"]  # training moved


@pytest.mark.parametrize("name", NAMES)
def test_ten_steps_resume_ten_equal_twenty(name, world, tok, tmp_path):
    assert_resume_is_exact(name, tok, PairDataset(world.split("train"), tok, 40, max_words=40), tmp_path, 20)


@pytest.mark.parametrize("name", NAMES)
def test_encode_pair_shapes(name, world, tok):
    cfg, method = build(name, tok, world=world)
    method.eval()
    batch = batch_of(world, tok, rows=4)
    dim, region_dim = method.pair_dims
    with torch.no_grad():
        out = method.encode_pair(batch.images, batch.input_ids, batch.attention_mask)
        assert out.cls.shape == (4, dim)
        boxes = batch.region_boxes[:, :3]
        with_boxes = method.encode_pair(batch.images, batch.input_ids, batch.attention_mask, boxes,
                                        batch.region_mask[:, :3])
    assert with_boxes.cls.shape == (4, dim)
    assert with_boxes.regions.shape == (4, 3, region_dim) and with_boxes.region_mask.shape == (4, 3)


@pytest.mark.parametrize("name", NAMES)
def test_retrieval_by_the_declared_protocols(name, world, tok):
    cfg, method = build(name, tok, world=world)
    rset = RetrievalSet.build(world.split("test"), tok, 40, 4, max_words=40)
    itm_all = build_config(cfg.model_dump(mode="json"), ["eval.itm_all=true"])
    metrics = evaluate_method(method, rset, itm_all, torch.device("cpu"))
    prefixes = {"itc": "itc/", "itc_itm": "itm/", "itm_all": "itm_all/", "itc_rerank": "itm/"}
    for protocol in method.retrieval_protocols_for(True):
        assert 0.0 <= metrics[f"{prefixes[protocol]}r_mean"] <= 100.0, protocol
    assert metrics["num_images"] == 4 and method.training  # evaluation restored train mode


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip(name, world, tok, tmp_path):
    cfg, method = build(name, tok, seed=0, world=world)
    method.train()
    for step in range(2):  # move every kind of state (weights, EMA copies, queues, counters)
        batch = batch_of(world, tok)
        batch.sample_keys = torch.arange(8) + 8 * step
        method(batch)["loss"].backward()
        with torch.no_grad():
            for p in method.parameters():
                if p.grad is not None:
                    p.sub_(0.01 * p.grad)
        method.zero_grad(set_to_none=True)
        method.on_step_end()
    save_model_weights(method, tmp_path / "model.safetensors")
    _, fresh = build(name, tok, seed=1)  # unprepared: the load must bring the prepared state too
    load_model_weights(tmp_path / "model.safetensors", fresh)
    saved, loaded = method.state_dict(), fresh.state_dict()
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)


def _launch_worker(out: Path, names: list[str], nproc: int) -> dict[str, dict]:
    """One launch (1 process, or torchrun with `nproc`) of contract_worker.py for every method in `names`
    -> rank 0's step record of each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SRC), str(WORKER.parent), env.get("PYTHONPATH")) if p)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, *launcher, str(WORKER), str(out), *names], env=env, cwd=out,
                          capture_output=True, text=True, timeout=240 + 60 * len(names))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {name: json.loads((out / name / "rank0.json").read_text()) for name in names}


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory) -> tuple[dict[str, dict], dict[str, dict]]:
    """Step 1 of every method, alone and split over 2 gloo processes (two launches for all methods)."""
    root = tmp_path_factory.mktemp("rank_parts")
    return _launch_worker(root / "one", NAMES, 1), _launch_worker(root / "two", NAMES, 2)


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
@pytest.mark.parametrize("name", NAMES)
def test_rank_independent_parts_agree_between_two_processes_and_one(name, one_and_two_processes):
    """Step 1 (identical weights) of the same global batch: the parts the method declares rank-independent
    are equal (float tolerance) whether the batch is split over 2 gloo processes or not."""
    one, two = (runs[name] for runs in one_and_two_processes)
    for key in METHODS[name].rank_independent_parts:
        assert key in one, f"{name} declares {key} rank-independent but does not log it"
        assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), (key, two[key], one[key])
