"""`RunConfig`: one `topo-build` run's settings (data, reference, seed, and the construction's, control's
and training's), and what follows from them: the data, the reference network sized for it.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import builders
from builders.spec import NetworkSpec, read_spec
from topo.common.errors import SettingError, SpecError, UserError
from topo.common.processes import check_processes
from topo.common.reading import read_config
from topo.construct.config import ConstructConfig
from topo.controls.control import ControlConfig
from topo.data import DataBundle, load
from topo.run.rundir import RunDir
from topo.train.config import RESUMABLE_CHANGES, TrainConfig

log = logging.getLogger(__name__)


REFERENCES = ("auto", "googlenet-small", "googlenet-paper", "googlenet-torchvision")


AUX_POLICIES = ("none", "reference")


SMALL_IMAGES = 64  # at or below this size the small-input GoogLeNet is the reference


@dataclass
class RunConfig:
    """Everything one `topo-build` run needs; saved as the run's config.json.

    ``aux_heads``: the one auxiliary-head policy of every trained network: ``"none"``,
    or ``"reference"`` (each network gets the reference's heads where it has the
    layers they attach to); see `with_aux_policy`. ``data_dir`` is held as an
    absolute path (`absolute_data_dir`), so that a run is resumed or evaluated
    from any working directory.
    """

    data: str = "patches"
    data_dir: str | None = None
    image_size: int | None = None
    strict: bool = False
    verify: bool = True
    reference: str = "auto"
    width_mult: float | None = None
    aux_heads: str = "none"
    seed: int = 0
    controls: bool = True
    jobs: int | str = "auto"
    fresh_init: bool = False
    construct: ConstructConfig = field(default_factory=ConstructConfig)
    control: ControlConfig = field(default_factory=ControlConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["construct"] = dataclasses.asdict(self.construct)
        out["control"] = dataclasses.asdict(self.control)
        out["train"] = self.train.to_dict()
        return out

    def __post_init__(self) -> None:
        self.data_dir = absolute_data_dir(self.data_dir)
        self.jobs = check_processes(self.jobs)
        if self.aux_heads not in AUX_POLICIES:
            raise SettingError("aux_heads", f"auxiliary-head policy {self.aux_heads!r} is unknown: use "
                                            f"{' or '.join(AUX_POLICIES)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        data = dict(data)
        data["construct"] = ConstructConfig(**data["construct"])
        control = dict(data.get("control", {}))
        control["kinds"] = tuple(control.get("kinds", ControlConfig().kinds))
        data["control"] = ControlConfig(**control)
        data["train"] = TrainConfig.from_dict(data["train"])
        return cls(**data)

    @classmethod
    def of_run(cls, run: RunDir) -> RunConfig:
        """The configuration saved in a run directory (a one-line error naming a damaged config.json); a
        relative ``data_dir`` (saved before paths were stored whole) is found by `located_data_dir`."""
        def parse(data: dict[str, Any]) -> RunConfig:
            return cls.from_dict({**data, "data_dir": located_data_dir(data.get("data_dir"), run.root)})
        return read_config(run.config_path, parse=parse)


def absolute_data_dir(data_dir: str | os.PathLike | None) -> str | None:
    """``data_dir`` as an absolute path (``~`` expanded; symbolic links kept, as given), None as None. A
    relative path is taken from the working directory now, the one the run is started in."""
    return None if data_dir is None else os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def located_data_dir(saved: str | None, run_root: Path) -> str | None:
    """The absolute ``data_dir`` of a run's saved setting. Runs made before paths were stored whole saved it as
    typed, relative to the folder the run was started in, which is not recorded: it is looked for from the
    working directory, then from each folder above the run's (runs usually sit below that folder), the first
    that exists taken; where none does, from the working directory (the loader then names the missing path)."""
    if not isinstance(saved, str) or os.path.isabs(os.path.expanduser(saved)):
        return saved
    starts = [Path.cwd(), *Path(os.path.abspath(run_root)).parents]
    found = next((start / saved for start in starts if (start / saved).exists()), None)
    if found is None:
        log.warning("%s was made with the relative --data-dir %s, found neither from here nor from a folder above "
                    "the run: run from the folder the run was started in, or give --data-dir with its full path",
                    run_root, saved)
    return absolute_data_dir(found or saved)


def same_data_dir(saved: str | None, given: str | None) -> bool:
    """Whether two ``data_dir`` settings name the same place (the same path, or paths that resolve to it)."""
    if saved is None or given is None:
        return saved == given
    return saved == given or Path(saved).resolve() == Path(given).resolve()


def load_data(config: RunConfig) -> DataBundle:
    return load(config.data, config.data_dir, image_size=config.image_size, strict=config.strict,
                verify=config.verify, seed=config.seed)


#: Width multiplier of the reference on the embedded data sets (CPU-sized); 1 elsewhere.
EMBEDDED_WIDTHS = {"digits": 0.25, "patches": 0.125}


def default_width(data: str) -> float:
    """Width multiplier of the reference when none is given (`EMBEDDED_WIDTHS`, else 1)."""
    return EMBEDDED_WIDTHS.get(data, 1.0)


def reference_spec(config: RunConfig, bundle: DataBundle) -> NetworkSpec:
    """The hand-designed network the discovered one is compared with, sized for the data."""
    size = min(bundle.image_size)
    choice = config.reference
    if choice.endswith(".json") or Path(choice).is_file():
        return read_spec(choice)
    if choice not in REFERENCES:
        raise UserError(
            f"reference {choice!r} is unknown: use one of {', '.join(REFERENCES)} or a NetworkSpec .json file"
        )
    if choice == "auto":
        choice = "googlenet-small" if size <= SMALL_IMAGES else "googlenet-torchvision"
    variant = choice.split("-", 1)[1]
    width = config.width_mult if config.width_mult is not None else default_width(config.data)
    return sized_googlenet(variant, bundle, num_classes=bundle.num_classes, aux_logits=None, width_mult=width,
                           named=f"reference {choice}", data=data_name(config),
                           fix="use larger images (--image-size) or another --reference")


def sized_googlenet(variant: str, bundle: DataBundle, *, num_classes: int, aux_logits: bool | None,
                    width_mult: float, named: str, data: str, fix: str) -> NetworkSpec:
    """GoogLeNet ``variant`` for the images and channels of ``bundle``; where it does not fit them, a one-line
    error naming it (``named``), the images and ``data``, and ``fix``."""
    try:
        return builders.googlenet_spec(variant, num_classes=num_classes, aux_logits=aux_logits, width_mult=width_mult,
                                       in_channels=bundle.in_channels, input_size=min(bundle.image_size))
    except SpecError as e:
        h, w = bundle.image_size
        raise SpecError(f"{named} does not fit the {h}x{w} images of {data} ({e}); {fix}") from None


def with_aux_policy(spec: NetworkSpec, reference: NetworkSpec, policy: str) -> NetworkSpec:
    """``spec`` with the auxiliary heads ``policy`` gives every trained network: none, or the reference's."""
    return dataclasses.replace(spec, aux_heads=reference.aux_heads if policy == "reference" else ())


def data_name(config: RunConfig) -> str:
    return f"{config.data} data" + (f" in {config.data_dir}" if config.data_dir else "")


#: Run settings outside its sections that a continued run (or study) may change: how it computes, not what.
RUN_RESUMABLE_CHANGES = frozenset({"jobs"})
#: Every setting a continued run may change, by field name (the training's and the run's own).
RESUMABLE = RESUMABLE_CHANGES | RUN_RESUMABLE_CHANGES


def with_resumable_changes(saved: RunConfig, given: RunConfig, fields: set[str]) -> RunConfig:
    """``saved`` with ``given``'s value of each setting among ``fields`` that a continued run may change."""
    train = {name: getattr(given.train, name) for name in RESUMABLE_CHANGES & fields}
    top = {name: getattr(given, name) for name in RUN_RESUMABLE_CHANGES & fields}
    return dataclasses.replace(saved, **top, train=dataclasses.replace(saved.train, **train))


def what_it_computes(config: RunConfig) -> dict[str, Any]:
    """``config.to_dict()`` without the settings a continued run may change: two runs with equal results are
    the same experiment."""
    data = config.to_dict()
    data["train"] = {k: v for k, v in data["train"].items() if k not in RESUMABLE_CHANGES}
    return {k: v for k, v in data.items() if k not in RUN_RESUMABLE_CHANGES}
