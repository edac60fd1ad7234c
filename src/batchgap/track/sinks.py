"""Where :func:`batchgap.track`'s records go besides the JSONL file: TensorBoard and Weights & Biases.

Each sink takes every record (``write(record)``) and is closed with the tracker (``close()``); any object with
those two methods is a sink too. A sink's package is imported only when the sink is made; a missing one is one
:class:`MissingExtra` naming the extra to install. Scalars are written as ``batchgap/<measure>`` at the
record's ``step`` (the headline value of each measure; the whole protocol stays in the JSONL file).
"""
from __future__ import annotations

from pathlib import Path


class MissingExtra(ImportError, ValueError):
    """A sink or callback whose optional package is not installed; the message names ``pip install batchgap[...]``."""


def need(module: str, extra: str, what: str):
    """``import module`` or :class:`MissingExtra` saying ``pip install batchgap[extra]``."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingExtra(f"{what} needs the {extra} package, which is not installed: pip install "
                           f"batchgap[{extra}]") from None


def scalars(record: dict) -> dict[str, float]:
    """``{"batchgap/<measure>": value}`` of a record's measures with a number as value."""
    return {f"batchgap/{name}": float(m["value"]) for name, m in record.get("measures", {}).items()
            if isinstance(m.get("value"), (int, float)) and not isinstance(m.get("value"), bool)}


class TensorBoardSink:
    """Scalars into a TensorBoard event file (``torch.utils.tensorboard.SummaryWriter(log_dir)``)."""

    def __init__(self, log_dir: str | Path):
        need("tensorboard", "tensorboard", "the tensorboard sink")
        tb = need("torch.utils.tensorboard", "tensorboard", "the tensorboard sink")
        self.log_dir = Path(log_dir)
        self.writer = tb.SummaryWriter(log_dir=str(self.log_dir))

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Scalars into a Weights & Biases run: the active one (``wandb.run``), else one started with ``init``'s
    keyword arguments (``project``, ``dir``, ``mode``: ``WANDB_MODE=offline`` works offline) and finished on
    close."""

    def __init__(self, **init):
        self.wandb = need("wandb", "wandb", "the wandb sink")
        self.own = self.wandb.run is None
        self.run = self.wandb.init(**init) if self.own else self.wandb.run

    def write(self, record: dict) -> None:
        values = scalars(record)
        if values:
            self.run.log(values, step=record["step"])

    def close(self) -> None:
        if self.own:
            self.run.finish()


SINKS = ("jsonl", "tensorboard", "wandb")


def make_sinks(sinks, out: Path | None) -> list:
    """The sink objects of ``sinks``: names from :data:`SINKS` (``"tensorboard"`` logs beside ``out`` into
    ``<out stem>-tensorboard/``; ``"wandb"`` uses the active run or starts one) or objects with ``write``/``close``.
    ``"jsonl"`` is the ``out`` file itself and adds nothing here."""
    made = []
    try:
        for s in sinks or ():
            _add(made, s, out)
    except BaseException:
        for s in made:
            s.close()
        raise
    return made


def _add(made: list, s, out: Path | None) -> None:
    """Append the sink ``s`` names (or is) to ``made``."""
    if isinstance(s, str):
        if s not in SINKS:
            raise ValueError(f"sinks: unknown sink {s!r}; allowed: {', '.join(SINKS)}, or an object with "
                             "write(record) and close()")
        if s == "jsonl":
            if out is None:
                raise ValueError("the jsonl sink is the out= file: pass out='track.jsonl'")
            return
        if s == "tensorboard":
            base = Path("batchgap-track") if out is None else out.with_suffix("")
            made.append(TensorBoardSink(base.parent / f"{base.name}-tensorboard"))
        else:
            made.append(WandbSink(**({} if out is None else {"dir": str(out.parent)})))
    elif callable(getattr(s, "write", None)) and callable(getattr(s, "close", None)):
        made.append(s)
    else:
        raise TypeError(f"sinks: {type(s).__name__} is no sink: pass a name ({', '.join(SINKS)}) or an object "
                        "with write(record) and close()")
