"""A study's materials from its config: the data set (with its seeded subsets), the model, and x0."""
from __future__ import annotations

import torch

from . import devices, distributed, objectives, plugins
from .config import StudyConfig, config_hash
from .data import check_augment, load_dataset, make_augment as builtin_augment
from .data.base import Dataset, DictData
from .errors import UserError
from .models import bn_mode, init_model
from .plan import Run, model_tag, plan
from .rundir import Output


def prepare_data(cfg: StudyConfig, data_dir=None, download: bool = False) -> Dataset:
    """Load the study's data set (built-in, or the user's file or loader) and cut the seeded subsets it
    asks for (indices recorded in info)."""
    d = cfg.data
    if d.name in plugins.FILE_FORMATS or plugins.is_spec(d.name):
        ds = plugins.load_user_data(d.name, d.path, cfg.root, d.num_classes)
    else:
        ds = load_dataset(d.name, data_dir=data_dir, download=download)
    subset = {}
    for split, k in (("train", cfg.data.train_subset), ("test", cfg.data.test_subset)):
        part = getattr(ds, split)
        if k and k < len(part):
            gen = torch.Generator().manual_seed(cfg.data.subset_seed + (0 if split == "train" else 1))
            idx = torch.randperm(len(part), generator=gen)[:k].sort().values
            setattr(ds, split, part.subset(idx))
            subset[split] = {"n": k, "of": len(part), "seed": cfg.data.subset_seed,
                             "indices_sha": config_hash(idx.tolist())}
    if subset:
        ds.info = {**ds.info, "subset": subset}
    augment(cfg, cfg.data.augment, ds.input_shape)
    return ds


def augment(cfg: StudyConfig, name: str, input_shape=None):
    """A built-in augmentation (checked against the inputs' shape) or the user's ``MODULE:CALLABLE``."""
    if plugins.is_spec(name):
        return plugins.make_augment(name, cfg.root)
    if input_shape is not None:
        check_augment(name, input_shape)
    return builtin_augment(name)


def fresh(cfg: StudyConfig, ds: Dataset, seed: int) -> torch.nn.Module:
    """The study's model with the initial weights of ``seed`` (a built-in one, or the user's factory)."""
    m = cfg.model
    if not plugins.is_spec(m.name):
        return init_model(m.name, ds.input_shape, ds.num_classes, seed, bn=m.bn, **m.options)
    net = plugins.build_model(m.name, cfg.root, ds.input_shape, ds.num_classes, m.options, seed=seed)
    built = bn_mode(net)
    if m.bn != "auto" and m.bn != built:  # a user's model is measured as built; a contrary setting is refused
        raise UserError(f"model.bn = {m.bn!r} cannot be honoured: {m.name} builds BatchNorm that is {built!r} at "
                        "evaluation (a user's model is used as built); leave model.bn out or set it to that")
    return net


def objective(cfg: StudyConfig):
    """The study's :class:`~batchgap.landscape.objective.Objective`, or None for the default (cross-entropy on
    ``(x, y)`` pairs: today's code path)."""
    return objectives.make(cfg.objective, cfg.root)


def check_model(cfg: StudyConfig, ds: Dataset) -> None:
    """The model builds and maps one batch of inputs to logits of shape (batch, num_classes); under an objective,
    the objective gives a finite loss on a batch of two rows, and nothing asks for what it cannot do."""
    net, obj = fresh(cfg, ds, 0), objective(cfg)
    if obj is None:
        if isinstance(ds.train, DictData):
            raise UserError(f"data {cfg.data.name}: dict batches need an objective that reads them: set [objective] "
                            f"name = \"huggingface\", \"huggingface-causal-lm\" or your own MODULE:CALLABLE")
        plugins.check_output(net, ds.train.x[:2].cpu(), ds.num_classes, f"model {cfg.model.name}")
        return
    for r in cfg.regimes:
        t = r.train
        if t.remedy != "plain" or t.ghost_batch or t.augment or cfg.data.augment != "none" or t.batch_schedule:
            raise UserError(f"regimes.{r.name}: remedies, ghost batches, augmentation and batch schedules read (x, y) "
                            f"pairs; with [objective] name = {cfg.objective.name!r} leave them out")
    was = net.training
    net.eval()
    try:
        with torch.no_grad():
            out = plugins.call(obj, f"objective {cfg.objective.name} on model {cfg.model.name}", net,
                               ds.train.subset(slice(0, 2)).to("cpu").columns if isinstance(ds.train, DictData)
                               else (ds.train.x[:2].cpu(), ds.train.y[:2].cpu()))
    finally:
        net.train(was)
    if not torch.isfinite(out.mean):
        raise UserError(f"objective {cfg.objective.name}: the loss of the untrained model on two rows is {out.mean}")


def model(cfg: StudyConfig, ds: Dataset, state: dict | None = None) -> torch.nn.Module:
    """The study's model on the device of its data, holding ``state`` when given."""
    net = devices.fast_layout(fresh(cfg, ds, 0).to(devices.of(ds)))
    if state is not None:
        net.load_state_dict(state)
    return net


def start_point(out: Output, cfg: StudyConfig, ds: Dataset, seed: int) -> dict:
    """x0 for a seed: built once from the seed, saved, and shared by every regime of that seed.
    Data-parallel workers other than rank 0 build it in memory (DDP starts every worker from rank 0's)."""
    tag = model_tag(cfg)
    if distributed.is_main():
        state = out.load_x0(tag, seed)
        if state is not None:
            return state
    state = fresh(cfg, ds, seed).state_dict()
    if distributed.is_main():
        out.save_x0(tag, seed, state)
    return state


def check_study(cfg: StudyConfig, data_dir=None, download: bool = False, world_size: int = 1,
                device: torch.device | None = None) -> tuple[Dataset, list[Run]]:
    """Everything that can be wrong with the input, found before the output directory is touched:
    the data set and its runs."""
    ds = prepare_data(cfg, data_dir, download)
    check_model(cfg, ds)  # model name, options, input shape, logits (or the objective's loss) of a batch
    augments = [r.train.augment or cfg.data.augment for r in cfg.regimes]
    for name in augments:
        augment(cfg, name, ds.input_shape)
    user = plugins.identity(cfg.model.name, ds, augments, cfg.root)
    return ds, plan(cfg, len(ds.train), world_size, (device or torch.device("cpu")).type, user)
