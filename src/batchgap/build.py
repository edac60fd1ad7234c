"""A study's materials from its config: the data set (with its seeded subsets), the model, and x0."""
from __future__ import annotations

import torch

from . import devices, distributed
from .config import StudyConfig, config_hash
from .data import check_augment, load_dataset
from .data.base import Dataset
from .models import init_model
from .plan import model_tag
from .rundir import Output


def prepare_data(cfg: StudyConfig, data_dir=None, download: bool = False) -> Dataset:
    """Load the study's data set and cut the seeded subsets it asks for (indices recorded in info)."""
    ds = load_dataset(cfg.data.name, data_dir=data_dir, download=download)
    subset = {}
    for split, k in (("train", cfg.data.train_subset), ("test", cfg.data.test_subset)):
        part = getattr(ds, split)
        if k and k < len(part):
            gen = torch.Generator().manual_seed(cfg.data.subset_seed + (0 if split == "train" else 1))
            idx = torch.randperm(len(part), generator=gen)[:k].sort().values
            setattr(ds, split, part.subset(idx))
            subset[split] = {"n": k, "of": len(part), "seed": cfg.data.subset_seed, "indices_sha": config_hash(idx.tolist())}
    if subset:
        ds.info = {**ds.info, "subset": subset}
    check_augment(cfg.data.augment, ds.input_shape)
    return ds


def model(cfg: StudyConfig, ds: Dataset, state: dict | None = None) -> torch.nn.Module:
    """The study's model on the device of its data, holding ``state`` when given."""
    net = init_model(cfg.model.name, ds.input_shape, ds.num_classes, 0, bn=cfg.model.bn, **cfg.model.options)
    net = devices.fast_layout(net.to(devices.of(ds)))
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
    state = init_model(cfg.model.name, ds.input_shape, ds.num_classes, seed, bn=cfg.model.bn,
                       **cfg.model.options).state_dict()
    if distributed.is_main():
        out.save_x0(tag, seed, state)
    return state
