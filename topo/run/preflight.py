"""Every check of a run's settings against the data and the machine, before any work."""
from __future__ import annotations

from builders.spec import NetworkSpec
from topo.common.devices import check_device
from topo.common.errors import DataError, UserError
from topo.construct.budget import check_budget, check_window, module_maps
from topo.data import DataBundle
from topo.run.config import RunConfig, data_name


def check_training_data(config: RunConfig, bundle: DataBundle) -> None:
    """One-line errors, before any work, for a one-class data set and a batch the training split cannot fill."""
    if bundle.num_classes < 2:
        raise DataError(f"{data_name(config)} has {bundle.num_classes} class ({', '.join(bundle.class_names)}); "
                        "a classifier needs at least 2: add a class (a folder per class)")
    images = len(bundle.train)
    if config.train.batch_size > images:
        raise UserError(f"batch size {config.train.batch_size} (--batch-size) is larger than the {images} training "
                        f"images of {data_name(config)}: no batch could be filled; use --batch-size {images} or less")


def preflight(config: RunConfig, bundle: DataBundle, reference: NetworkSpec | None) -> None:
    """Every check of the settings against the data and the machine, before any work (``reference``: with a
    construction)."""
    check_device(config.train.device)
    check_training_data(config, bundle)
    if reference is None:
        return
    hw = tuple(bundle.image_size)
    maps = module_maps(config.construct, reference, hw)
    if config.construct.window is not None:  # a window asked for must fit a map; the default fits each
        check_window(config.construct.window, maps)
    check_budget(config.construct, reference, hw, maps)
