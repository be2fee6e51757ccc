"""vlp: data-efficient vision-language pre-training.

    import vlp
    model = vlp.load("runs/albef")           # a trained run, for inference (vlp.inference)
"""

from typing import Any


def __getattr__(name: str) -> Any:
    """`vlp.load` (`vlp.inference.load`), imported on first use: every `vlp.*` import imports this package,
    the CLI's argument parsing included, and that must not pull in torch and the run layer (PEP 562)."""
    if name == "load":
        from vlp.inference import load

        return load
    raise AttributeError(f"module 'vlp' has no attribute {name!r}")


__all__ = ["load"]
