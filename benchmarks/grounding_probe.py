"""Does a region single-stream checkpoint read the image to fill in a masked object word? (grounding probe)

For VLMixer (issue 13) and the paired single-stream methods beside it (UNITER, CMAL). No fine-tuning: the
pre-trained encoder and MLM head as they are. On `--pairs` test pairs of the world (one caption per image),
each caption gets ONE grounded word (a word of CMAL's concept lexicon, the words CMC replaces) masked, at a
keyed position, and the encoder reads [caption ; regions] in the downstream layout (regions in region
slots with their boxes, `RegionSingleStream.encode_joint_pair`) with:

  * own:      the caption's own image's regions;
  * shuffled: another test image's regions (rolled by one row of the batch, so a different scene);
  * none:     no region (every region slot masked out): the text-only floor.

Reported per checkpoint: concept accuracy of the masked word under each input, and the gap own - shuffled in
points. The world names a concept by several words (synonyms, plurals: "box" for a square), so the MLM's
probabilities are summed over each concept's words (the lexicon's (C, V) table) and the top concept is
scored against the masked word's (chance 1 / C). A model that grounds words in regions scores own > shuffled; one that fills the word from the text
alone scores own = shuffled. World captions name objects that the text does not predict (any shape can be
any colour and at any place), so the text-only floor sits near 1 / (shapes named in captions).

    python benchmarks/grounding_probe.py RUN_DIR [RUN_DIR ...] [--pairs 500]

RUN_DIR: a pre-training run directory (or checkpoint) of a region single-stream method.
"""

from __future__ import annotations

import argparse
import sys

import torch

from vlp.build import build_world, class_words_for, load_checkpoint_method
from vlp.data.datasets import PairDataset, collate
from vlp.methods.vlmixer import grounded_concepts
from vlp.models.anchors import build_lexicon, sample_uniform_index
from vlp.models.rng import sample_uniforms

SALT_PROBE = 0x47504B  # "GPK": which grounded word is masked


@torch.no_grad()
def probe(run_dir: str, pairs: int = 500, batch_size: int = 50) -> dict[str, float]:
    """{own, shuffled, none, gap, words, chance}: masked-object-word concept accuracy (%) of one checkpoint (module
    docstring), over the test pairs whose caption grounds at least one word."""
    cfg, tok, method = load_checkpoint_method(run_dir)
    method.eval()
    if not hasattr(method, "encode_joint_pair"):
        raise SystemExit(f"{run_dir}: {cfg.method.name} is not a region single-stream method (no encode_joint_pair)")
    world = build_world(cfg)
    table = build_lexicon(class_words_for(cfg), tok)
    concept_words = table.class_token.float()  # (C, V): the words naming each concept
    data = PairDataset(world.split("test"), tok, cfg.data.max_text_len, max_words=cfg.data.max_text_len)
    per = data.captions_per_image
    rows = list(range(min(pairs, len(data) // per)))
    hits = {"own": 0, "shuffled": 0, "none": 0}
    words = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        batch = collate([data[i * per + i % per] for i in chunk])
        keys = torch.tensor(chunk)
        ids, attn = batch.input_ids, batch.attention_mask
        concepts = grounded_concepts(ids, attn, table)  # (b, T) concept id, -1 none
        grounded = concepts >= 0
        pick = sample_uniform_index(grounded, sample_uniforms(keys, len(chunk), (1,), SALT_PROBE, ids.device)[:, 0])
        has = pick >= 0  # rows with a grounded word
        if not has.any():
            continue
        rows_idx = torch.arange(len(chunk))[has]
        pos = pick[has]
        target_concept = concepts[rows_idx, pos]
        masked = ids.clone()
        masked[rows_idx, pos] = tok.mask_id
        regions = method.regions(batch)
        vecs = method.region_vectors(regions)
        words_in = method.word_vectors(masked, attn)
        shuffle = torch.roll(torch.arange(len(chunk)), 1)
        inputs = {
            "own": (vecs, regions.boxes, regions.mask),
            "shuffled": (vecs[shuffle], regions.boxes[shuffle], regions.mask[shuffle]),
            "none": (vecs, regions.boxes, torch.zeros_like(regions.mask)),
        }
        for name, (v, b, m) in inputs.items():
            text_h, _ = method.encode_joint_pair(words_in, v, b, attn, m)
            probs = method.model.mlm_logits(text_h[rows_idx, pos]).softmax(-1)  # (n, V)
            per_concept = probs @ concept_words.T  # (n, C)
            hits[name] += int((per_concept.argmax(-1) == target_concept).sum())
        words += int(has.sum())
    out = {k: 100.0 * v / max(words, 1) for k, v in hits.items()}
    out["gap"] = out["own"] - out["shuffled"]
    out["words"] = float(words)
    out["chance"] = 100.0 / table.num_classes
    return out


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--pairs", type=int, default=500)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| run | own | shuffled | none | own - shuffled | words | chance |")
    print("|-----|----:|---------:|-----:|---------------:|------:|-------:|")
    for run in args.runs:
        r = probe(run, args.pairs)
        print(f"| {run} | {r['own']:.1f} | {r['shuffled']:.1f} | {r['none']:.1f} | {r['gap']:+.1f} | {r['words']:.0f} | {r['chance']:.1f} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
