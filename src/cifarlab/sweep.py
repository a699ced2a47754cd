"""Sweeps: one training run (or ``--runs N`` set) per combination of the values given to some
options, as Hydra's multirun does (``cifarlab train --sweep lr=0.001,0.0005 --sweep
batch_size=64,128``), and one table of their results.

The sweep folder holds ``sweep.yaml`` (the values swept and each point's name), ``configs/``
(each point's resolved config, so that ``--resume`` trains the points not yet trained as they
would have been), one folder per point (a run folder, or a ``--runs N`` folder) and
``sweep_summary.json``. Points are ranked by their validation accuracy, not their test accuracy:
choosing settings by test accuracy tunes them to the test images, and the test figure of the
chosen point then overstates what new images would give.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .config import Config, load_run_config, options_to_overrides, resolve_config, save_config
from .errors import ConfigError
from .fsutil import new_run_folder, read_json, undo_on_failure, write_json, write_text

SWEEP_FILE = "sweep.yaml"
SUMMARY_FILE = "sweep_summary.json"
CONFIGS = "configs"  # the folder of each point's resolved config
# data settings that only choose among the loaded images or scale them: points that differ in
# these alone share one loaded data set (a setting added later is taken to change the load)
_AFTER_LOAD = {"val_split", "subset", "normalize"}


def parse_axes(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["lr=0.001,0.0005", "batch-size=64,128"]`` as ``{"lr": ["0.001", "0.0005"],
    "batch_size": ["64", "128"]}``: each option once, each value once. Values stay text until
    the config checks them against their keys' types. A value holding commas is quoted
    (``class-weight=balanced,'cat=2,dog=1'``) or bracketed (``[1,2]``), as in Hydra's sweeps."""
    axes: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip().replace("-", "_")
        values = _split_values(spec, text)
        if not sep or not key or not all(values):
            raise ConfigError(f"--sweep {spec!r} is not valid; expected OPTION=VALUE,VALUE,... such as "
                              "lr=0.001,0.0005 (an option of cifarlab train, a config key such as optim.rho, or recipe; "
                              "quote a value that holds commas: class-weight=balanced,'cat=2,dog=1')")
        if key in axes:
            raise ConfigError(f"--sweep {key} is given twice; give all its values in one --sweep")
        if len(set(values)) != len(values):
            raise ConfigError(f"--sweep {spec!r} gives a value twice")
        axes[key] = values
    return axes


_CLOSING = {"[": "]", "(": ")", "{": "}"}


def _split_values(spec: str, text: str) -> list[str]:
    """``text`` split at the commas outside quotes and brackets; a value wholly in quotes loses
    them. An unclosed quote or bracket is refused, naming ``spec``."""
    values, part, quote, nest = [], [], None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in _CLOSING:
            nest.append(ch)
        elif nest and ch == _CLOSING[nest[-1]]:
            nest.pop()
        elif ch == "," and not nest:
            values.append("".join(part))
            part = []
            continue
        part.append(ch)
    if quote or nest:
        what = f"quote {quote}" if quote else f"bracket {nest[-1]}"
        raise ConfigError(f"--sweep {spec!r} has an unclosed {what}; close it with {quote or _CLOSING[nest[-1]]}")
    values.append("".join(part))
    values = [v.strip() for v in values]
    return [v[1:-1] if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"" else v for v in values]


def _flow_value(key: str, value: Any) -> Any:
    """A bracketed or braced text value (``[0.5,0.75]``, ``{cat: 2}``) as the list or mapping a
    config file's YAML would give; any other value as it is."""
    if not (isinstance(value, str) and value[:1] in "[{"):
        return value
    import yaml

    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--sweep {key}={value}: not a list or mapping as YAML writes one inline "
                          f"({str(e).splitlines()[0]}); such as [0.5, 0.75] or {{cat: 2, dog: 1}}") from None


def _point_overrides(point: dict[str, str]) -> dict[str, dict[str, Any]]:
    """A point's values as config overrides (``section.key`` as given, other names as the
    options of ``cifarlab train``; bracketed values as lists, braced ones as mappings);
    ``recipe`` is left to the caller."""
    out: dict[str, dict[str, Any]] = {}
    flat = {}
    for key, value in point.items():
        if key == "recipe":
            continue
        value = _flow_value(key, value)
        if "." in key:
            sec, _, name = key.partition(".")
            out.setdefault(sec, {})[name] = value
        else:
            flat[key] = value
    for sec, values in options_to_overrides(flat).items():
        out.setdefault(sec, {}).update(values)
    return out


def point_name(point: dict[str, Any]) -> str:
    """A point's folder name, ``lr=0.001,batch_size=64``, with characters a file name should not
    hold replaced by ``_``."""
    return ",".join(re.sub(r"[^A-Za-z0-9._=+-]", "_", f"{k}={v}") for k, v in point.items())


def _check_distinct_keys(axes: dict[str, list[Any]]) -> None:
    """Refuse two axes that set one config key (``lr`` and ``optim.lr``): the later would win at
    every point, and points named by different values would train the same config."""
    from .config import option_keys

    names = option_keys()
    seen: dict[str, str] = {}
    for axis in axes:
        target = ".".join(names[axis]) if axis in names else axis  # section.key as given; unknown ones fail later
        if target in seen:
            raise ConfigError(f"--sweep {seen[target]} and --sweep {axis} both set {target}; give all its values in "
                              "one --sweep")
        seen[target] = axis


def plan(axes: dict[str, list[Any]], recipe: str | None, file: str | Path | None,
         overrides: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, str], Config]]:
    """Every point of the grid as (name, values, config), each config resolved and checked as
    ``cifarlab train`` would (the recipe, the file, the flags, then the point's values), before
    anything trains: a bad value is named with its point."""
    _check_distinct_keys(axes)
    points = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo))
        merged = copy.deepcopy(overrides)
        for sec, values in _point_overrides(point).items():
            merged.setdefault(sec, {}).update(values)
        name = point_name(point)
        try:
            cfg = resolve_config(point.get("recipe", recipe), file, merged, origin=f"--sweep point {name}")
        except ConfigError as e:  # checks across keys name no origin: name the point here
            raise (e if str(e).startswith("--sweep point") else ConfigError(f"--sweep point {name}: {e}")) from None
        points.append((name, point, cfg))
    names = [n for n, _, _ in points]
    if len(set(names)) != len(names):
        raise ConfigError(f"--sweep values make two points with one folder name ({', '.join(names)}); give values "
                          "that differ in letters or digits")
    return points


def run_sweep(axes: dict[str, Sequence[Any]], recipe: str | None = None, file: str | Path | None = None, *,
              out: str | Path | None = None, overwrite: bool = False, log: Callable[[str], None] = print,
              **options: Any) -> dict[str, Any]:
    """Train every combination of ``axes``' values (``{"lr": [1e-3, 5e-4], "batch_size": [64,
    128]}``; keys as :func:`cifarlab.make_config` takes them, config keys such as
    ``"optim.rho"``, or ``"recipe"``) on top of ``recipe``, ``file`` and ``options`` (as
    :func:`cifarlab.make_config` takes them), each point into its own folder of ``out``
    (default ``runs/sweep-<time>``); returns the summary (see :func:`summarise`)."""
    if not isinstance(axes, dict) or not axes or not all(isinstance(v, (list, tuple)) and v for v in axes.values()):
        raise ConfigError(f"sweep axes {axes!r} are not valid; give a dict of option names to lists of values, such "
                          "as {'lr': [0.001, 0.0005]}")
    for key, values in axes.items():
        if len({str(v) for v in values}) != len(values):
            raise ConfigError(f"sweep axis {key!r} gives a value twice: {list(values)}")
    return sweep_with_overrides({k.replace("-", "_"): list(v) for k, v in axes.items()}, recipe, file,
                                options_to_overrides(options), out, overwrite, log)


def sweep_with_overrides(axes: dict[str, list[Any]], recipe: str | None, file: str | Path | None,
                         overrides: dict[str, dict[str, Any]], out: str | Path | None, overwrite: bool = False,
                         log: Callable[[str], None] = print) -> dict[str, Any]:
    """:func:`run_sweep` with the options as nested config overrides, as ``cifarlab train``'s
    flags give them."""
    points = plan(axes, recipe, file, overrides)
    base, before = new_run_folder(out, overwrite, "sweep", "choose another --out, or --resume it")
    with undo_on_failure(base, before):
        for name, _, cfg in points:
            cfg.train.out, cfg.train.overwrite = str(base / name), overwrite
            save_config(cfg, base / CONFIGS / f"{name}.yaml")
        write_text(base / SWEEP_FILE, _sweep_yaml(axes, points))
    return _train_points(base, points, log, fresh=True)


def resume_sweep(base: str | Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Finish the sweep folder ``base``: finished points are kept, stopped ones resume, the
    others are trained from their saved configs; then the summary is written again."""
    import yaml

    base = Path(base)
    try:
        meta = yaml.safe_load((base / SWEEP_FILE).read_text())
        named = [(p["name"], p["values"]) for p in meta["points"]]
    except (OSError, yaml.YAMLError, TypeError, KeyError) as e:
        raise ConfigError(f"{base / SWEEP_FILE} is not a sweep's record of its points ({e!r}); start the sweep "
                          "again") from None
    points = [(name, values, load_run_config(base / CONFIGS / f"{name}.yaml")) for name, values in named]
    return _train_points(base, points, log)


def is_sweep(folder: str | Path) -> bool:
    """Whether ``folder`` is a sweep folder (it holds ``sweep.yaml``)."""
    return (Path(folder) / SWEEP_FILE).is_file()


def _sweep_yaml(axes: dict[str, list[str]], points: list[tuple[str, dict[str, str], Config]]) -> str:
    import yaml

    return yaml.safe_dump({"sweep": axes, "points": [{"name": n, "values": p} for n, p, _ in points]},
                          sort_keys=False)


def _train_points(base: Path, points: list[tuple[str, dict[str, str], Config]], log: Callable[[str], None],
                  fresh: bool = False) -> dict[str, Any]:
    """Train the points (``fresh``: every one anew, as a new sweep does, over any files its
    folder held with ``--overwrite``; else each as far as it has not been), then summarise them."""
    from .train import fit, load_data_for, resume_runs

    shared = {tuple((k, v) for k, v in sorted(dataclasses.asdict(c.data).items()) if k not in _AFTER_LOAD)
              for _, _, c in points}
    dataset = None  # loaded once where every point reads the same data (the first that trains loads it)
    for k, (name, _, cfg) in enumerate(points, 1):
        folder = base / name
        state = "new" if fresh else _state(folder, cfg)
        log(f"=== point {k}/{len(points)}: {name} ({state}) ===")
        if state == "finished":
            continue
        if dataset is None and len(shared) == 1:
            # its notes are logged here, once, not again by every point it is handed to
            dataset = dataclasses.replace(load_data_for(cfg, log), notes=[])
        data = dataset if len(shared) == 1 else None
        if state == "new":
            fit(cfg, dataset=data, log=log)
        elif cfg.train.runs > 1:
            resume_runs(folder, dataset=data, log=log)
        else:
            fit(resume=folder, dataset=data, log=log)
    return summarise(base, points, log)


def _state(folder: Path, cfg: Config) -> str:
    """'finished', 'started' (a checkpoint, or a --runs folder begun) or 'new' (absent or empty)."""
    from .export import finished_metrics

    if not folder.is_dir() or not any(folder.iterdir()):
        return "new"
    if cfg.train.runs > 1:
        done = (folder / "runs_summary.json").is_file() and all(finished_metrics(r, cfg.train.epochs)
                                                                for r in _runs(folder, cfg))
        return "finished" if done else "started"
    if finished_metrics(folder, cfg.train.epochs) is not None:
        return "finished"
    if (folder / "checkpoint.pt").is_file():
        return "started"
    raise ConfigError(f"'{folder}' holds files but neither a checkpoint nor a finished run's metrics; move it away "
                      "and resume the sweep again to train that point anew")


def _runs(folder: Path, cfg: Config) -> list[Path]:
    """The run folders of a point: itself, or the run-K folders of its --runs N set."""
    return [folder / f"run-{k}" for k in range(cfg.train.runs)] if cfg.train.runs > 1 else [folder]


def _kept_val_accuracy(run: Path, metrics: dict[str, Any]) -> float | None:
    """The validation accuracy of the epoch whose weights the run kept (the last, or with early
    stopping the best, which its ``metrics`` name); None without validation images."""
    history = read_json(run / "history.json", expect=list)
    best = (metrics.get("early_stopping") or {}).get("best_epoch")
    row = next((h for h in history if h["epoch"] == best), history[-1]) if history else {}
    return row.get("val_accuracy")


def summarise(base: Path, points: list[tuple[str, dict[str, str], Config]],
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """``sweep_summary.json``: each point's values, runs, and validation accuracy, test accuracy,
    test loss and training time as mean, std, min and max over its runs; the points ranked by
    mean validation accuracy where every point has validation images."""
    from .evaluate import describe

    rows = []
    for name, values, cfg in points:
        runs = _runs(base / name, cfg)
        metrics = [read_json(r / "metrics.json") for r in runs]
        val = [_kept_val_accuracy(r, m) for r, m in zip(runs, metrics)]
        rows.append({"name": name, "values": values, "runs": len(runs),
                     "val_accuracy": describe(val) if None not in val else None,
                     "test_accuracy": describe([m["test_accuracy"] for m in metrics]),
                     "test_loss": describe([m["test_loss"] for m in metrics]),
                     "train_time_s": describe([m["train_time_s"] for m in metrics])})
    ranked = all(r["val_accuracy"] for r in rows)
    order = sorted(rows, key=lambda r: -r["val_accuracy"]["mean"]) if ranked else rows
    summary = {"sweep": str(base), "ranked_by": "val_accuracy" if ranked else None, "points": order}
    write_json(base / SUMMARY_FILE, summary)
    log(format_summary(summary))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a table, best point first where the points are ranked."""
    width = max(len(r["name"]) for r in summary["points"])
    lines = [f"{'point':<{width}}  {'runs':>4}  {'val acc mean':>12}  {'test acc mean (min, max)':>26}  "
             f"{'train s':>8}"]
    for r in summary["points"]:
        v, t = r["val_accuracy"], r["test_accuracy"]
        val = "n/a" if v is None else f"{v['mean']:.4f}"
        test = f"{t['mean']:.4f} ({t['min']:.4f}, {t['max']:.4f})"
        lines.append(f"{r['name']:<{width}}  {r['runs']:>4}  {val:>12}  {test:>26}  {r['train_time_s']['mean']:>8.1f}")
    if summary["ranked_by"]:
        lines.append("ranked by validation accuracy; choose by it, as the test accuracy of the point chosen by test "
                     "accuracy overstates what new images would give")
    else:
        lines.append("not ranked: some points have no validation images (--val-split 0); choosing a point by its test "
                     "accuracy tunes it to the test images")
    lines.append(f"summary in {Path(summary['sweep']) / SUMMARY_FILE}")
    return "\n".join(lines)
