"""Worker of tests/test_method_contract.py: one training step of a registered method at the contract size.

`python contract_worker.py OUT_DIR NAME [NAME ...]` (alone, or under torchrun with 2 processes) trains each
method NAME for one step on the same global batch (8 rows of a 32 px world) and writes rank 0's logged step
record to OUT_DIR/NAME/rank0.json (one launch for every method: process start-up is most of the cost).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from test_method_contract import build  # noqa: E402  (the contract test's own builder)
from vlp.data.datasets import PairDataset, collate
from vlp.data.tokenizer import TextTokenizer
from vlp.data.world import World
from vlp.train.distributed import rank
from vlp.train.launch import distributed_session
from vlp.train.loop import Trainer


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    world = World(seed=1, image_size=32, sizes={"train": 40, "val": 8, "test": 8})
    tok = TextTokenizer.train_on_world(world, vocab_size=500, num_scenes=30)
    with distributed_session(device="cpu"):
        for name in names:
            cfg, method = build(name, tok, steps=1)
            data = PairDataset(world.split("train"), tok, 40, max_words=40)
            records = Trainer(cfg, method, data, collate, out / name / "run").fit()
            if rank() == 0:
                (out / name / "rank0.json").write_text(json.dumps(records[0]))


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.13 + gloo: skip interpreter teardown (see tests/ddp_worker.py)
