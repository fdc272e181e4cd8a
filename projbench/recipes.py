"""Recipe cards: every recipe value of a run (or of every cell of a table's sweep), what it
resolves to, and where it comes from.

    python -m projbench.recipes --experiment imagenet_table1 [OVERRIDES ...]   # one table's card
    python -m projbench.recipes                                              # every table's card
    python -m projbench.recipes --check README.md                            # README's cards up to date?
    python -m projbench.recipes --write README.md                            # regenerate them

Each run also writes its own card (`recipe.md`, `recipe.json`) into its run directory and logs it
at the start (projbench/__main__.py).

Where a value's source is found (the contract of conf/: README "Extending"): the nearest
`sources` mapping, next to the key (`optim.sources.lr`) or in an ancestor mirroring the relative
path (`task.sources.model.arch`); a source string documents the key it names and everything under
it (`sources.decay` covers `decay.value`). The file that writes a value writes its source, also
when the value is an interpolation into a recipe table (then the source is the same
interpolation into the table's `sources`), so the resolved config shows the right source beside
every value; tests/test_recipes.py lints conf/ for it. A value given on the command line is
sourced "command line"; one set by a sweep axis keeps its config source.
The card's rows are CORE_KEYS that the config has, the parameters of the chosen schedule, and
every other key with a source (task-specific values: augmentation, loss margins, ...); a key is
shown once, under the name the run reads (entries of recipe tables are shown through the keys
that interpolate them).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from omegaconf import DictConfig, OmegaConf

from projbench import decay as decay_rules
from projbench.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = ROOT / "conf" / "experiment"

# Recipe values every run has (those the config holds); order is the card's.
CORE_KEYS = (
    "task.model.arch", "task.data.batch_size",
    "optim._target_", "optim.lr", "optim.decay", "optim.momentum", "optim.dampening", "optim.nesterov",
    "optim.betas", "optim.eps", "optim.delta", "optim.wd_ratio", "optim.no_decay_bias_norm",
    "trainer.max_epochs", "trainer.max_steps", "trainer.schedule.name", "trainer.schedule.warmup_epochs",
    "trainer.schedule.step_size", "trainer.schedule.milestones", "trainer.schedule.gamma",
    "trainer.schedule.min_lr_ratio", "trainer.grad_clip", "trainer.precision",
)
# The schedule parameters that matter for each schedule (projbench/schedules.py).
SCHEDULE_PARAMS = {"constant": (), "step": ("step_size", "gamma"), "multistep": ("milestones", "gamma"),
                   "cosine": ("min_lr_ratio",)}
ROOTS = ("task", "optim", "trainer")   # where recipe values live
COMMAND_LINE = "command line"
NO_SOURCE = "NO SOURCE"
README_BLOCK = re.compile(r"(<!-- recipe-card: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /recipe-card -->)", re.S)
_INNER = re.compile(r"\$\{([^${}:]+)\}")
_MISSING = object()


@dataclass
class Entry:
    """One row of a card."""

    key: str
    value: Any          # resolved; for optim.decay the stated {value, convention}
    source: str
    origin: str         # config | command line | sweep
    defined_at: str     # the key that holds the literal value (the end of its interpolation chain)
    note: str = ""      # optim.decay: the optimizer argument and the per-step decay it gives

    @property
    def shown(self) -> str:
        text = _fmt(self.value)
        return f"{text} ({self.note})" if self.note else text


# -- reading a config ----------------------------------------------------------------------------
def _raw(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=False)


def get_path(tree: Any, path: str, default: Any = None) -> Any:
    node = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _split_first_argument(inner: str) -> tuple[str, str | None]:
    """A resolver's arguments `A,B...` -> (A, the rest), commas inside `${...}` left alone."""
    depth = 0
    for i, ch in enumerate(inner):
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            return inner[:i], inner[i + 1:]
    return inner, None


def _pure_interpolation(value: Any) -> str | None:
    """The key X of a value that is exactly `${X}` or `${oc.select:X,default}` (no other resolver,
    no surrounding text); for `${fixture:A,B}`, the key of B (the recipe's value: the card is
    about the real data)."""
    if not (isinstance(value, str) and value.startswith("${") and value.endswith("}")):
        return None
    if value.startswith("${oc.select:"):
        return _split_first_argument(value[len("${oc.select:"):-1])[0]
    if value.startswith("${fixture:"):
        otherwise = _split_first_argument(value[len("${fixture:"):-1])[1]
        return _pure_interpolation(otherwise.strip()) if otherwise else None
    depth = 0
    for i, ch in enumerate(value):
        if ch == "{" and i and value[i - 1] == "$":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0 and i != len(value) - 1:
                return None  # two interpolations side by side
        elif ch == ":" and depth == 1:
            return None      # ${resolver:...}
    return value[2:-1]


def _absolute(key: str, referrer: str) -> str:
    """A relative interpolation key (`.lr`, `..x`) made absolute from the key that holds it."""
    if not key.startswith("."):
        return key
    dots = len(key) - len(key.lstrip("."))
    parent = referrer.split(".")[:-dots]
    return ".".join(parent + [key[dots:]])


def _target(cfg: DictConfig, key: str, referrer: str) -> str:
    """The key path an interpolation `${key}` points to, its nested interpolations resolved."""
    previous = None
    while previous != key:
        previous = key
        key = _INNER.sub(lambda m: str(OmegaConf.select(cfg, _absolute(m.group(1), referrer))), key)
    return _absolute(key, referrer)


def _chain(cfg: DictConfig, raw: dict, key: str) -> list[str]:
    """`key` and the keys its value interpolates to, to the one that holds a literal."""
    chain = [key]
    while len(chain) < 20:
        inner = _pure_interpolation(get_path(raw, chain[-1]))
        if inner is None:
            break
        chain.append(_target(cfg, inner, chain[-1]))
    return chain


def nearest_source(get, key: str) -> Any:
    """The nearest `sources` entry for `key`, beside it or in an ancestor (see the module doc);
    `get(dotted_path)` reads a node (a DictConfig's resolved value, or a plain dict's raw one)."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        rel = parts[depth:]
        for i in range(1, len(rel) + 1):
            found = get(".".join(parts[:depth] + ["sources"] + rel[:i]))
            if isinstance(found, str):
                return found
            if not isinstance(found, (dict, DictConfig)):
                break
    return None


def _explicit_source(cfg: DictConfig, key: str) -> str | None:
    return nearest_source(lambda path: OmegaConf.select(cfg, path, default=None, throw_on_resolution_failure=False),
                          key)


def _override_keys(overrides: Iterable[str]) -> dict[str, str]:
    """Config keys set by value overrides (`a.b=1`, `+a=1`, `++a=1`) -> the override text;
    group choices (`optim=adamp`, `task/model=ssd`) are not values and are left out."""
    keys = {}
    for item in overrides:
        if "=" not in item:
            continue
        key = item.split("=", 1)[0].lstrip("+~")
        if "/" in key or "@" in key or key in ("task", "optim", "trainer", "logger", "paths", "experiment"):
            continue
        keys[key] = item
    return keys


# -- the card ------------------------------------------------------------------------------------
def _schedule_keys(cfg: DictConfig) -> set[str]:
    name = OmegaConf.select(cfg, "trainer.schedule.name")
    keep = {f"trainer.schedule.{p}" for p in SCHEDULE_PARAMS.get(str(name), ())}
    drop = {f"trainer.schedule.{p}" for params in SCHEDULE_PARAMS.values() for p in params} - keep
    if OmegaConf.select(cfg, "trainer.max_steps") is not None:
        drop.add("trainer.max_epochs")  # max_steps wins when set
    else:
        drop.add("trainer.max_steps")
    return drop


def _documented_keys(raw: dict) -> list[str]:
    """Every key some `sources` mapping documents, as a dotted path."""
    found = []

    def walk(node: Any, path: list[str]) -> None:
        if not isinstance(node, dict):
            return
        for name, value in node.items():
            if name == "sources" and isinstance(value, dict):
                def leaves(src: Any, rel: list[str]) -> None:
                    for k, v in src.items():
                        if isinstance(v, dict):
                            leaves(v, rel + [str(k)])
                        else:
                            found.append(".".join(path + rel + [str(k)]))
                leaves(value, [])
            else:
                walk(value, path + [str(name)])

    walk(raw, [])
    return found


def _references(cfg: DictConfig, raw: dict) -> tuple[dict[str, str], set[str]]:
    """(target key -> the key that interpolates it, prefixes of tables looked up by a nested
    interpolation such as task.recipes in `${task.recipes.${task.recipe}.lr}`)."""
    refs: dict[str, str] = {}
    tables: set[str] = set()

    def walk(node: Any, path: list[str]) -> None:
        if isinstance(node, dict):
            for name, value in node.items():
                walk(value, path + [str(name)])
            return
        key = ".".join(path)
        inner = _pure_interpolation(node)
        if inner is None or path[:1] == ["hydra"]:
            return
        if "${" in inner:
            tables.add(_absolute(inner[:inner.index("${")].rstrip("."), key))
        try:
            refs[_target(cfg, inner, key)] = key
        except Exception:  # noqa: BLE001 - an interpolation that does not resolve in this cell
            pass

    walk(raw, [])
    return refs, tables


def _row_key(key: str, refs: dict[str, str], tables: set[str]) -> str | None:
    """The card row of a documented key: itself, or None for an entry that another key
    interpolates (that key has the row, with its own copy of the source) or an entry of a lookup
    table; a key inside a recipe node (optim.decay.value) is that node's row."""
    if any(t == key or t.startswith(key + ".") for t in refs):
        return None
    if any(key == t or key.startswith(t + ".") for t in tables):
        return None
    return next((core for core in CORE_KEYS if key.startswith(core + ".")), key)


def card(cfg: DictConfig, overrides: Sequence[str] = (), sweep_keys: Sequence[str] = ()) -> list[Entry]:
    """The recipe card of one run: a row per recipe value (see the module doc)."""
    decay_rules.check(cfg.optim)  # a decay that cannot be converted: one ConfigError naming the key
    raw = _raw(cfg)
    refs, tables = _references(cfg, raw)
    keys = [k for k in CORE_KEYS if get_path(raw, k, _MISSING) is not _MISSING]
    documented = {_row_key(k, refs, tables) for k in _documented_keys(raw)}
    keys += sorted(k for k in documented - set(keys) - {None}
                   if k.split(".")[0] in ROOTS and get_path(raw, k, _MISSING) is not _MISSING)
    skip = _schedule_keys(cfg)
    given = _override_keys(overrides)
    entries = []
    for key in keys:
        if key in skip:
            continue
        node = get_path(raw, key)
        chain = _chain(cfg, raw, f"{key}.value" if isinstance(node, dict) and "value" in node else key)
        overridden = next((k for k in chain if k in given), None)
        if overridden is not None:
            origin = "sweep" if overridden in sweep_keys else COMMAND_LINE
        else:
            origin = "config"
        source = None if origin == COMMAND_LINE else _explicit_source(cfg, key)
        value = _value(cfg, key)
        if value is None and key.startswith("optim."):
            continue  # an optimizer argument set to null is not passed: not part of this recipe
        entries.append(Entry(key=key, value=value, source=source or (COMMAND_LINE if origin == COMMAND_LINE
                                                                     else NO_SOURCE),
                             origin=origin, defined_at=chain[-1], note=_decay_note(cfg) if key == "optim.decay" else ""))
    entries += _weight_decay_override(cfg, given)
    return entries


def _value(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _decay_note(cfg: DictConfig) -> str:
    """What optim.decay becomes: the optimizer's argument and the per-step decay it gives."""
    optim = cfg.optim
    ctx = decay_rules.Context.of(optim)
    argument = float(optim.weight_decay)
    per_step = decay_rules.decay_per_step(argument, ctx)
    if per_step is not None:
        step = f"per step {_fmt(per_step)} at the base lr"
    elif decay_rules.rule_of(ctx) is None:
        step = "no known decay rule for this optimizer"
    else:
        step = "coupled L2 under Adam: no per-step equivalent"
    return f"{ctx.target.rsplit('.', 1)[-1]} weight_decay={_fmt(argument)}; {step}"


def _weight_decay_override(cfg: DictConfig, given: dict[str, str]) -> list[Entry]:
    """optim.weight_decay given on the command line replaces the conversion of optim.decay."""
    if "optim.weight_decay" not in given:
        return []
    return [Entry(key="optim.weight_decay", value=cfg.optim.weight_decay, source=COMMAND_LINE, origin=COMMAND_LINE,
                  defined_at="optim.weight_decay", note="the optimizer's own argument; optim.decay is not used")]


def _fmt(value: Any) -> str:
    if isinstance(value, dict) and set(value) >= {"value", "convention"}:
        return f"{_fmt(value['value'])} {value['convention']}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v)}" for k, v in value.items()) or "none"
    if isinstance(value, bool) or value is None:
        return str(value).lower() if isinstance(value, bool) else "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# -- rendering -----------------------------------------------------------------------------------
def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_run(cfg: DictConfig, entries: list[Entry], overrides: Sequence[str] = ()) -> str:
    """One run's card as markdown."""
    title = f"Recipe card: task={cfg.task.name} optim={cfg.optim.name} seed={cfg.seed}"
    lines = [f"# {title}", ""]
    if overrides:
        lines += ["Overrides: " + " ".join(f"`{o}`" for o in overrides), ""]
    lines += ["| key | value | source |", "|---|---|---|"]
    lines += [f"| `{e.key}` | {_cell(e.shown)} | {_cell(e.source)} |" for e in entries]
    return "\n".join(lines) + "\n"


def render_log(entries: list[Entry]) -> list[str]:
    """One line per row, for the run's log."""
    return [f"recipe {e.key} = {e.shown}  [{e.source}]" for e in entries]


def _product(choices: Sequence[Sequence[str]]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = [()]
    for values in choices:
        out = [c + (v,) for c in out for v in values]
    return out


def _axes_text(cells: set[tuple[str, ...]], axes: list[tuple[str, list[str]]]) -> str:
    """Which cells a row holds in, as the overrides that select them: "all", or blocks such as
    `task.recipe=resnet18,resnet50 optim=sgd,sgdp` joined by "or": the cells grouped by one axis's
    value, values whose cells agree on the other axes merged into one block (recursively); each
    axis is tried first and the cover with the fewest blocks, then the shortest text, is shown,
    its largest block first."""
    values = [v for _, v in axes]
    if len(cells) == len(_product(values)):
        return "all"
    covers = []
    for first in range(len(axes)):
        order = [first, *(i for i in range(len(axes)) if i != first)]
        blocks = _factor_blocks({tuple(c[i] for i in order) for c in cells}, [values[i] for i in order])
        blocks = [tuple(block[order.index(i)] for i in range(len(axes))) for block in blocks]
        blocks.sort(key=lambda block: -len(_product(block)))  # the largest first
        text = " or ".join(" ".join(f"{name}={','.join(chosen)}" for (name, full), chosen in zip(axes, block)
                                    if len(chosen) != len(full)) for block in blocks)
        covers.append((len(blocks), len(text), text))
    return min(covers)[2]


def _factor_blocks(cells: set[tuple[str, ...]], values: list[list[str]]) -> list[tuple[tuple[str, ...], ...]]:
    """An exact cover of `cells` by products of value tuples: the first axis's values that share
    the same set of remaining labels form one block's first factor (linear in the cells, where
    trying every subset of a 21-optimizer axis would not end)."""
    if not values:
        return [()] if cells else []
    groups: dict[frozenset, list[str]] = {}
    for value in values[0]:
        tails = frozenset(c[1:] for c in cells if c[0] == value)
        if tails:
            groups.setdefault(tails, []).append(value)
    return [(tuple(first), *rest) for tails, first in groups.items() for rest in _factor_blocks(set(tails), values[1:])]


def table_rows(cells: list) -> tuple[list[tuple[str, str, str, str]], list[tuple[str, list[str]]]]:
    """Rows (key, value, source, cells) of a sweep's card: each distinct (value, source) of a key
    once, with the cells that have it."""
    axes_names = list(cells[0].axes) if cells else []
    axes = [(name, list(dict.fromkeys(c.axes[name] for c in cells))) for name in axes_names]
    axes = [(n, v) for n, v in axes if len(v) > 1]
    rows: dict[tuple[str, str, str], set[tuple[str, ...]]] = {}
    order: list[str] = []
    for cell in cells:
        label = tuple(cell.axes[name] for name, _ in axes)
        for entry in card(cell.cfg, cell.overrides, cell.sweep_keys):
            if entry.key not in order:
                order.append(entry.key)
            rows.setdefault((entry.key, entry.shown, entry.source), set()).add(label)
    rank = {key: CORE_KEYS.index(key) if key in CORE_KEYS else len(CORE_KEYS) + i
            for i, key in enumerate(sorted(order))}
    out = [(key, shown, source, _axes_text(labels, axes))
           for key in sorted(order, key=rank.get) for (k, shown, source), labels in rows.items() if k == key]
    return out, axes


def render_table(name: str, cells: list, table_notes: Sequence[tuple[str, str, str]] = ()) -> str:
    """A sweep's card as markdown: the sweep axes, then one row per distinct value of each key."""
    rows, axes = table_rows(cells)
    lines = [f"Recipe card of `+experiment={name}` ({len(cells)} cells"
             + (": " + " x ".join(f"`{n}` {','.join(v)}" for n, v in axes) if axes else "") + ")", "",
             "| key | value | source | cells |", "|---|---|---|---|"]
    lines += [f"| `{k}` | {_cell(v)} | {_cell(s)} | {_cell(c)} |" for k, v, s, c in rows]
    lines += [f"| {k} | {_cell(v)} | {_cell(s)} | all |" for k, v, s in table_notes]
    return "\n".join(lines) + "\n"


def table_notes(experiment: str, cells: Sequence = ()) -> list[tuple[str, str, str]]:
    """Rows of a table's card that are not run config: which paper version its numbers come
    from, the reported value (final / best) and the seeds (ours, and the paper's as its source;
    results/paper.yaml)."""
    from projbench.tables import load_spec

    seeds = sorted({int(c.cfg.seed) for c in cells})
    ours = f"{len(seeds)} per cell here (seed={','.join(map(str, seeds))}); the paper's:"
    notes = []
    for spec in load_spec().values():
        if spec.experiment != experiment:
            continue
        sources = spec.sources
        if spec.version:
            notes.append((f"{spec.name}: paper numbers", spec.version, sources.get("version", NO_SOURCE)))
        per_axis = [f"{axis.name}: {axis.value}" for axis in (*spec.rows, *spec.columns)
                    if axis.value and axis.value != spec.value]
        shown = f"{spec.value} {spec.metric}" + (f" ({'; '.join(per_axis)})" if per_axis else "")
        notes.append((f"{spec.name}: reported value", shown, sources.get("value", NO_SOURCE)))
        notes.append((f"{spec.name}: seeds", ours, sources.get("seeds", NO_SOURCE)))
    return notes


def experiments() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.yaml"))


def experiment_card(name: str, overrides: Sequence[str] = ()) -> str:
    from projbench.sweeps import compose_cells

    cells = compose_cells([f"+experiment={name}", *overrides])
    return render_table(name, cells, table_notes(name, cells))


# -- the run's card (projbench/__main__.py) ------------------------------------------------------
def write_run_card(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (),
                   sweep_keys: Sequence[str] = (), log=None) -> list[Entry]:
    """recipe.md and recipe.json in the run directory; each row logged with `log` (a logger's
    info) when given."""
    entries = card(cfg, overrides, sweep_keys)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "recipe.md").write_text(render_run(cfg, entries, overrides))
    payload = {"task": cfg.task.name, "optim": cfg.optim.name, "seed": cfg.seed, "overrides": list(overrides),
               "entries": [asdict(e) for e in entries]}
    (run_dir / "recipe.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if log is not None:
        for line in render_log(entries):
            log(line)
    return entries


# -- README --------------------------------------------------------------------------------------
def readme_blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in README_BLOCK.finditer(text)}


def sync_readme(path: Path, write: bool) -> list[str]:
    """The experiments whose card in README differs from the generated one (rewritten if `write`)."""
    text = path.read_text()
    stale = []

    def replace(match: re.Match) -> str:
        fresh = experiment_card(match["name"])
        if fresh != match["body"]:
            stale.append(match["name"])
        return match.group(1) + fresh + match.group(4)

    new = README_BLOCK.sub(replace, text)
    if write and new != text:
        path.write_text(new)
    return stale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m projbench.recipes",
                                description="Recipe cards: every recipe value of a table's sweep and its source.")
    p.add_argument("--experiment", action="append", metavar="NAME",
                   help=f"a conf/experiment sweep (default: all: {', '.join(experiments())})")
    p.add_argument("--check", metavar="README", help="exit 1 if the cards in this file are not the generated ones")
    p.add_argument("--write", metavar="README", help="regenerate the cards in this file")
    p.add_argument("overrides", nargs="*", help="extra overrides, as on the projbench command line")
    args = p.parse_args(argv)
    try:
        if args.check or args.write:
            path = Path(args.check or args.write)
            stale = sync_readme(path, write=bool(args.write))
            if stale and args.check:
                print(f"error: {path}: stale recipe cards: {', '.join(stale)} (run python -m projbench.recipes "
                      f"--write {path})", file=sys.stderr)
                return 1
            return 0
        for name in args.experiment or experiments():
            if name not in experiments():
                raise UserError(f"--experiment {name}: no conf/experiment/{name}.yaml; choose from "
                                f"{', '.join(experiments())}")
            print(experiment_card(name, args.overrides))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
