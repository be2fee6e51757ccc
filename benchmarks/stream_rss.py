"""Peak memory of streaming WebDataset shards: RSS at 10 k, 30 k, 100 k, 300 k and 1 M streamed samples.

    python benchmarks/stream_rss.py --out runs/stream_rss                  # 20 k world images, 1 M samples
    python benchmarks/stream_rss.py --out runs/stream_rss --samples 100000 --workers 2

Writes the world's first `--images` train images x 5 captions as shards (`vlp.data.shards.write_shards`, once;
reused when `<out>/shards` holds them) and streams `--samples` samples through the trainer's data path: the
`ShardDataset.step_stream` of one rank, a DataLoader with `--workers` workers and batch `--batch`, collated by
`SkippingCollate(collate)` into `Batch`es; no model step. The 1 M samples are several epochs of the 100 k
distinct ones (the stream reshuffles every epoch; rendering a million distinct world images would take
~35 CPU-minutes). At each checkpoint it records the resident set (VmRSS) and its peak (VmHWM) of this process
plus its DataLoader workers, from /proc (Linux; with workers: the sum of the processes' RSS, which counts the
pages a forked worker still shares with the main process twice, and of their peaks, an upper bound). Prints a
table, writes `<out>/stream_rss.csv`, and the growth of the peak from the first checkpoint to the last (the
target: < 10 %).
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

from torch.utils.data import DataLoader

from vlp.data.datasets import collate
from vlp.data.shards import ShardDataset, brace_pattern, world_pairs, write_shards
from vlp.data.skips import SkippingCollate
from vlp.data.tokenizer import TextTokenizer
from vlp.data.workers import data_worker_init
from vlp.data.world import World
from vlp.viz import format_table

CHECKPOINTS = (10_000, 30_000, 100_000, 300_000, 1_000_000)


def _status_kib(pid: int, field: str) -> int:
    """A `/proc/<pid>/status` memory field (VmRSS, VmHWM) in KiB; 0 when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def memory_mib() -> tuple[float, float]:
    """(current RSS, peak RSS) in MiB of this process plus its children (the DataLoader workers)."""
    pids = [os.getpid(), *_children(os.getpid())]
    return (sum(_status_kib(p, "VmRSS") for p in pids) / 1024, sum(_status_kib(p, "VmHWM") for p in pids) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/stream_rss", help="folder for shards/ and stream_rss.csv")
    parser.add_argument("--images", type=int, default=20_000, help="world train images to shard (x 5 captions)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=5000, help="samples per shard")
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples to stream")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--default-malloc", action="store_true",
                        help="workers without vlp's worker init (glibc's dynamic mmap threshold: the heap grows)")
    args = parser.parse_args()
    out = Path(args.out)
    shard_dir = out / "shards"
    world = World(seed=0, image_size=args.image_size, sizes={"train": args.images})
    if not (shard_dir / "shards.json").is_file():
        started = time.perf_counter()
        summary = write_shards(world_pairs(world, args.images * 5), shard_dir, args.shard_size, source="world seed 0")
        print(f"wrote {summary.samples} samples in {len(summary.paths)} shards in {time.perf_counter() - started:.0f} s",
              flush=True)
        pattern = summary.pattern
    else:
        pattern = brace_pattern(shard_dir, len(list(shard_dir.glob("shard-*.tar"))))
    tokenizer = TextTokenizer.train_on_world(world, vocab_size=1000)
    dataset = ShardDataset(pattern, tokenizer, 40, args.image_size, seed=0, shuffle_buffer=1000)
    # a few batches beyond the last checkpoint: the workers are still alive (and counted) when it is taken
    steps = -(-args.samples // args.batch) + 4 * max(1, args.workers)
    loader = DataLoader(dataset.step_stream(0, steps, args.batch, 0, 1, args.workers), batch_size=args.batch,
                        collate_fn=SkippingCollate(collate), num_workers=args.workers,
                        worker_init_fn=None if args.default_malloc else data_worker_init)
    marks = [m for m in CHECKPOINTS if m <= args.samples] or [args.samples]
    rows: list[dict] = []
    seen, started = 0, time.perf_counter()
    rss0, peak0 = memory_mib()
    print(f"{len(dataset)} distinct samples in {len(dataset.paths)} shards; streaming {args.samples} "
          f"(batch {args.batch}, {args.workers} workers); before: RSS {rss0:.0f} MiB", flush=True)
    for batch in loader:
        seen += len(batch) + len(batch.skipped)
        while marks and seen >= marks[0]:
            rss, peak = memory_mib()
            rows.append({"samples": marks.pop(0), "epochs": round(seen / len(dataset), 2), "rss_mib": round(rss, 1),
                         "peak_rss_mib": round(peak, 1), "seconds": round(time.perf_counter() - started, 1),
                         "samples_per_s": round(seen / (time.perf_counter() - started), 1)})
            print(format_table([rows[-1]]), flush=True)
        if not marks:
            break
    del loader  # stops the workers
    print(format_table(rows))
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "stream_rss.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    growth = 100 * (rows[-1]["peak_rss_mib"] / rows[0]["peak_rss_mib"] - 1)
    print(f"peak RSS {rows[0]['peak_rss_mib']:.0f} MiB at {rows[0]['samples']} samples -> "
          f"{rows[-1]['peak_rss_mib']:.0f} MiB at {rows[-1]['samples']}: {growth:+.1f} % (target < 10 %); "
          f"wrote {out / 'stream_rss.csv'}")


if __name__ == "__main__":
    main()
