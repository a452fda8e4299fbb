"""``sodp3d report runs=[...]``: several runs (seeds, regularisers, encoders, tasks) in one table.

Each run directory holds a ``results.json`` written by ``sodp3d finetune``, ``sodp3d
demo`` or ``sodp3d eval`` (a directory without one is searched for them). Runs are
grouped into *variants*: fine-tuned runs by (regulariser, init, encoder, U-Net), and the
pre-trained model each started from as its own variant, so a table shows pre-trained
and fine-tuned side by side. A cell is the mean and standard deviation across seeds of
the success rate; the average row averages the tasks within each seed first. A second
table gives the mean return of the same evaluations where the runs recorded it (no
average: tasks' rewards are on different scales). With ``control=<variant>``, a third
table pairs every other fine-tuned variant with the control seed by seed (the success
averaged over the tasks, variant minus control), since seeds share their pre-trained
model and evaluation resets. ``curves.png`` draws, per task and variant, the evaluation
success and mean return along fine-tuning (the same reset seeds at every point, so the
points of a curve are paired) and the training rollouts' success, mean ± std across seeds.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from sodp3d.errors import UserError
from sodp3d.files import write_text_atomic


# The paper's success rates (%) where it reports them per task (SODP, ICML 2025), with
# DP3's as the paper quotes them; its averages over a whole task set, and its transfer
# table (Table 3), shown only when the report holds exactly that task set.
PAPER: dict[str, dict[str, float]] = {
    "paper: SODP": {"adroit-hammer": 67.0, "adroit-door": 96.0, "adroit-pen": 59.0},
    "paper: pre-trained only": {"adroit-hammer": 20.0, "adroit-door": 55.0, "adroit-pen": 28.0},
    "paper: fine-tuned without BC": {"adroit-hammer": 38.0, "adroit-door": 63.0, "adroit-pen": 30.0},
    "paper: DP3": {"adroit-hammer": 100.0, "adroit-door": 62.0, "adroit-pen": 43.0},
}
PAPER_AVERAGES: dict[str, list[tuple[str, float]]] = {  # task set -> (column, average)
    "mt10": [("paper: SODP", 47.5), ("paper: DP3", 32.6)],
    "adroit": [("paper: SODP", 73.9), ("paper: pre-trained only", 34.3), ("paper: fine-tuned without BC", 43.7),
               ("paper: DP3", 68.3)],
}
TRANSFER_TARGETS = ("drawer-open-v3", "plate-slide-side-v3", "handle-pull-side-v3")  # the paper's v2 tasks
PAPER_TRANSFER: dict[str, dict[str, float]] = {
    "paper: MT10 pre-trained, unseen task": dict(zip(TRANSFER_TARGETS, (34.7, 55.3, 71.3))),
    "paper: single-task pre-trained, unseen task": dict.fromkeys(TRANSFER_TARGETS, 0.0),
}


def _paper_columns(tasks: list[str]) -> dict[str, dict[str, float]]:
    """The paper's numbers for these tasks: per task where it has them, its average where
    the tasks are exactly one of its task sets, its transfer table where they are exactly
    its three unseen targets."""
    from sodp3d.envs import task_sets

    if sorted(tasks) == sorted(TRANSFER_TARGETS):
        return {name: dict(rates) for name, rates in PAPER_TRANSFER.items()}
    columns = {name: dict(rates) for name, rates in PAPER.items() if any(t in rates for t in tasks)}
    for set_name, averages in PAPER_AVERAGES.items():
        if sorted(tasks) == sorted(task_sets()[set_name]):
            for name, value in averages:
                columns.setdefault(name, {})["average"] = value
    return columns


# Records of commands that evaluate nothing: skipped when a directory is searched.
NOT_REPORTED = ("pretrain", "collect", "viz", "report")


def _kind(f: Path) -> Any:
    try:
        rec = json.loads(f.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # load_entries says what is wrong with it
    return rec.get("kind") if isinstance(rec, dict) else None


def find_results(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in paths:
        d = Path(p)
        if d.is_file() and d.name == "results.json":
            found.append(d)
        elif (d / "results.json").is_file():
            found.append(d / "results.json")
        elif d.is_dir():
            nested = [f for f in sorted(d.rglob("results.json")) if _kind(f) not in NOT_REPORTED]
            if not nested:
                raise UserError(f"{d} holds no results.json (runs of sodp3d finetune, demo or eval)")
            # A demo writes one at its top and one under finetune/: keep the outermost.
            keep = [f for f in nested if not any(o.parent in f.parents for o in nested if o != f)]
            found.extend(keep)
        else:
            raise UserError(f"no run at {d}")
    if not found:
        raise UserError("no runs given; pass runs=[dir,...]")
    return list(dict.fromkeys(found))


def _pretrained_label(rec: dict[str, Any], task: str) -> str:
    nets = f"({rec.get('encoder') or '?'}, {rec.get('unet') or '?'})"
    if rec.get("variant") and rec.get("ckpt"):  # a sweep's run: pretrain/<mixture>-s<seed> names the data
        mixture = re.sub(r"-s[0-9]+$", "", Path(str(rec["ckpt"])).name)
        return f"pre-trained on {'its own task' if mixture == task else mixture} {nets}"
    return f"pre-trained {nets}"


def _finetuned_label(rec: dict[str, Any]) -> str:
    if rec.get("variant"):
        return f"fine-tuned: {rec['variant']}"
    if rec.get("method", "ppo") != "ppo":
        return f"fine-tuned method={rec['method']} ({rec.get('encoder') or '?'}, {rec.get('unet') or '?'})"
    return f"fine-tuned reg={rec['reg']} init={rec['init']} ({rec.get('encoder') or '?'}, {rec.get('unet') or '?'})"


def load_entries(files: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """Flat entries {variant, seed, task, success, history, source} and the metrics seen."""
    entries: dict[tuple, dict[str, Any]] = {}
    metrics: list[str] = []
    for f in files:
        try:
            rec = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{f} is not a readable results file ({type(e).__name__})") from None
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind not in ("finetune", "eval"):
            raise UserError(f"{f} is not a results file of sodp3d finetune, demo or eval (kind={kind!r}); "
                            "results written before this version lack 'kind': re-run the command")
        try:
            _add_record(rec, f, entries, metrics)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise UserError(f"{f} is a damaged {kind} results file ({type(e).__name__}: {e})") from None
    return list(entries.values()), list(dict.fromkeys(metrics))


def _add_record(rec: dict[str, Any], f: Path, entries: dict[tuple, dict[str, Any]], metrics: list[str]) -> None:
    if rec["kind"] == "finetune":
        metrics.append(rec["metric"])
        seed = int(rec["seed"])
        for t in rec["tasks"]:
            if t.get("pretrained_success") is not None and rec["init"] == "pretrained":
                key = (_pretrained_label(rec, t["task"]), rec.get("ckpt"), seed, t["task"])
                entries.setdefault(key, {"variant": key[0], "seed": seed, "task": t["task"],
                                         "success": float(t["pretrained_success"]), "return": t.get("pretrained_return"),
                                         "history": None, "source": str(f)})
            if t.get("finetuned_success") is not None:
                key = (_finetuned_label(rec), str(f), seed, t["task"])
                start = t.get("pretrained_success")  # the same run's evaluation before its first update
                eta = (rec.get("eval_etas") or [0.0])[0]
                entries[key] = {"variant": key[0], "seed": seed, "task": t["task"],
                                "success": float(t["finetuned_success"]), "return": t.get("finetuned_return"),
                                "start": None if start is None else float(start),
                                "history": t.get("history"), "evals": t.get("evals"),
                                "auc": area_under(t.get("evals") or [], eta), "eta": eta, "source": str(f)}
    else:
        metrics.append(rec["metric"])
        label = f"evaluated ({rec.get('encoder') or '?'}, {rec.get('unet') or '?'})"
        for t in rec["tasks"]:
            returns = t.get("per_seed_mean_return") or [None] * len(rec["seeds"])
            for seed, rate, ret in zip(rec["seeds"], t["per_seed_success_rate"], returns):
                key = (label, rec.get("checkpoint"), int(seed), t["task"])
                entries[key] = {"variant": label, "seed": int(seed), "task": t["task"], "success": float(rate),
                                "return": ret, "history": None, "source": str(f)}


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), (float(statistics.stdev(values)) if len(values) > 1 else 0.0)


def summarise(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant and task: mean, std (sample, across seeds) and n of the success rate
    (``cells``) and of the mean return (``return_cells``, where the runs recorded it);
    plus the average row."""
    order = {"pre-trained": 0, "evaluated": 1, "fine-tuned": 2}
    variants = sorted(dict.fromkeys(e["variant"] for e in entries), key=lambda v: (order.get(v.split(" ")[0], 3), v))
    tasks = list(dict.fromkeys(e["task"] for e in entries))
    return {"variants": variants, "tasks": tasks, "cells": _cells(entries, variants, tasks, "success"),
            "return_cells": _cells(entries, variants, tasks, "return")}


def _cells(entries: list[dict[str, Any]], variants: list[str], tasks: list[str],
           key: str) -> dict[str, dict[str, dict[str, Any]]]:
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for v in variants:
        cells[v] = {}
        by_seed: dict[int, dict[str, float]] = {}
        for e in entries:
            if e["variant"] == v and e.get(key) is not None:
                by_seed.setdefault(e["seed"], {})[e["task"]] = float(e[key])
        for t in tasks:
            vals = [s[t] for s in by_seed.values() if t in s]
            if vals:
                cells[v][t] = _cell(vals)
        complete = [float(np.mean([s[t] for t in tasks])) for s in by_seed.values() if all(t in s for t in tasks)]
        if complete:
            cells[v]["average"] = _cell(complete)
    return cells


def _cell(vals: list[float]) -> dict[str, Any]:
    """Mean, std and n of one cell's per-seed values, and how many are above zero."""
    m, sd = _mean_std(vals)
    return {"mean": m, "std": sd, "n": len(vals), "positive": sum(x > 0 for x in vals)}


def markdown(summary: dict[str, Any], metrics: list[str], files: list[Path],
             failed: list[dict[str, Any]] | None = None) -> str:
    variants, tasks, cells = summary["variants"], summary["tasks"], summary["cells"]
    paper = _paper_columns(tasks)

    def cell(v: str, t: str) -> str:
        c = cells[v].get(t)
        if c is None:
            return "-"
        return f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f} (n={c['n']})"

    lines = ["# Report", "", "Success rate in %, mean ± standard deviation across seeds (n = seeds). "
             "The average row averages the tasks within each seed first (seeds that ran every task).", ""]
    lines += ["Metric" + ("s" if len(metrics) > 1 else "") + ":"] + [f"- {m}" for m in metrics] + [""]
    lines.append("| task | " + " | ".join([*variants, *paper]) + " |")
    lines.append("|---|" + "---:|" * (len(variants) + len(paper)))
    for t in tasks + ["average"]:
        name = f"**{t}**" if t == "average" else t
        ours = [cell(v, t) for v in variants]
        theirs = [f"{rates[t]:.1f}" if t in rates else "-" for rates in paper.values()]
        lines.append(f"| {name} | " + " | ".join(ours + theirs) + " |")
    if paper:
        lines += ["", "The paper columns are its published success rates (1M fine-tuning steps per task, "
                  "50 episodes x 3 seeds; averages over its whole task set; DP3's as the paper quotes them); "
                  "its Meta-World tasks are v2."]
    returns = summary.get("return_cells") or {}
    if any(returns.get(v) for v in variants):
        def ret(v: str, t: str) -> str:
            c = returns.get(v, {}).get(t)
            return "-" if c is None else f"{c['mean']:.1f} ± {c['std']:.1f} (n={c['n']})"

        lines += ["", "Mean return per episode (the same evaluations), mean ± standard deviation across seeds:", "",
                  "| task | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
        lines += [f"| {t} | " + " | ".join(ret(v, t) for v in variants) + " |"
                  for t in tasks]  # no average: tasks' rewards are on different scales
    if failed:
        lines += ["", f"Failed runs ({len(failed)}), not in the table:"]
        lines += [f"- `{f['id']}`: {f['error']}" for f in failed]
    lines += ["", "Runs:"] + [f"- `{f}`" for f in files]
    return "\n".join(lines)


def _band(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Runs' curves on their common env-step range: (grid, mean, std across runs or None)."""
    end = min(x[-1] for x in xs)
    grid = np.unique(np.concatenate([x[x <= end] for x in xs]))
    stack = np.stack([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    return grid, stack.mean(0), (stack.std(axis=0, ddof=1) if len(xs) > 1 else None)


def eval_curve(evals: list[dict[str, Any]], eta: float, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(env steps, values) of one run's evaluations at ``eta``, one point per env step count
    (the final evaluation replaces a periodic one at the same count)."""
    points: dict[int, float] = {}
    for e in evals:
        if float(e.get("eta", 0.0)) == eta and e.get(key) is not None:
            points[int(e["env_steps"])] = float(e[key])
    steps = sorted(points)
    return np.array(steps, float), np.array([points[x] for x in steps], float)


def area_under(evals: list[dict[str, Any]], eta: float) -> float | None:
    """The area under a run's evaluation success curve (before, periodic and final
    evaluations; trapezoids over env steps), divided by its env-step span: the success
    averaged along fine-tuning, in [0, 1]. None with fewer than two evaluations."""
    x, y = eval_curve(evals, eta, "success_rate")
    if len(x) < 2 or x[-1] <= x[0]:
        return None
    return float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)) / (x[-1] - x[0]))


def budgets(entries: list[dict[str, Any]], tasks: list[str], points: int = 6) -> dict[str, dict[int, dict[str, Any]]]:
    """Per fine-tuned variant, at ``points`` env-step counts evenly spread from 0 to the
    shortest run's last evaluation (the same counts for every variant; each run's curve
    interpolated linearly between its evaluations): the success averaged over the tasks
    within each seed, as a cell (mean ± std across seeds)."""
    runs = [e for e in entries if e["variant"].startswith("fine-tuned") and e.get("evals")]
    curves = {id(e): eval_curve(e["evals"], float(e.get("eta", 0.0)), "success_rate") for e in runs}
    curves = {k: c for k, c in curves.items() if len(c[0]) >= 2}
    if not curves:
        return {}
    end = min(x[-1] for x, _ in curves.values())
    grid = np.unique(np.linspace(0, end, points).round().astype(int))
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for v in dict.fromkeys(e["variant"] for e in runs):
        at = {(e["seed"], e["task"]): np.interp(grid, *curves[id(e)]) for e in runs
              if e["variant"] == v and id(e) in curves}
        seeds = sorted({s for s, _ in at})
        per_seed = [np.mean([at[(s, t)] for t in tasks], axis=0) for s in seeds if all((s, t) in at for t in tasks)]
        if per_seed:
            out[v] = {int(x): _cell([float(p[i]) for p in per_seed]) for i, x in enumerate(grid)}
    return out


def budgets_markdown(b: dict[str, dict[int, dict[str, Any]]], auc: dict[str, dict[str, Any]]) -> list[str]:
    steps = sorted({x for v in b.values() for x in v})
    lines = ["", "Success along fine-tuning, averaged over the tasks within each seed, in %, mean ± std "
             "across seeds, at env-step counts spread evenly up to the shortest run (each run's evaluations "
             "interpolated linearly); and the area under the success curve (the success averaged along "
             "fine-tuning, each run over its own evaluations):", "",
             "| variant | " + " | ".join(f"{x / 1000:g}k" for x in steps) + " | area under the curve |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for v, cells in b.items():
        row = [f"{100 * cells[x]['mean']:.1f} ± {100 * cells[x]['std']:.1f}" if x in cells else "-" for x in steps]
        a = auc.get(v, {}).get("average")
        row.append("-" if a is None else f"{100 * a['mean']:.1f} ± {100 * a['std']:.1f} (n={a['n']})")
        lines.append(f"| {v} | " + " | ".join(row) + " |")
    return lines


CURVE_ROWS = ("evaluation success", "evaluation return", "training success rate")


def _curves(entries: list[dict[str, Any]], tasks: list[str]) -> dict[tuple[str, str], list]:
    """Per task and variant, mean ± std across seeds against env steps: the evaluation
    success and return (headline eta) and the training rollouts' success."""
    curves: dict[tuple[str, str], list] = {}
    for t in tasks:
        by_variant: dict[str, list[dict]] = {}
        for e in entries:
            if e["task"] == t and e["history"]:
                by_variant.setdefault(e["variant"], []).append(e)
        for v, es in by_variant.items():
            label = f"{v} (n={len(es)})"
            for row, key in (("evaluation success", "success_rate"), ("evaluation return", "mean_return")):
                runs = [eval_curve(e.get("evals") or [], float(e.get("eta", 0.0)), key) for e in es]
                if all(len(x) >= 2 for x, _ in runs):
                    curves.setdefault((row, t), []).append((label, *_band([x for x, _ in runs], [y for _, y in runs])))
            xs = [np.array([h["env_steps"] for h in e["history"]], float) for e in es]
            ys = [np.array([h["success_rate"] for h in e["history"]], float) for e in es]
            curves.setdefault(("training success rate", t), []).append((label, *_band(xs, ys)))
    return curves


def paired(entries: list[dict[str, Any]], tasks: list[str], control: str, key: str = "success") -> dict[str, Any]:
    """Per fine-tuned variant other than ``control`` (a variant name): ``key`` (the final
    success, or "auc", the area under the success curve) averaged over the tasks minus the
    control's, seed by seed (seeds that ran every task in both)."""
    label = f"fine-tuned: {control}"
    by: dict[str, dict[int, dict[str, float]]] = {}
    for e in entries:
        if e["variant"].startswith("fine-tuned") and e.get(key) is not None:
            by.setdefault(e["variant"], {}).setdefault(e["seed"], {})[e["task"]] = float(e[key])
    if label not in by:
        raise UserError(f"control={control} names no fine-tuned variant of these runs; valid: "
                        f"{', '.join(v.removeprefix('fine-tuned: ') for v in by) or 'none'}")
    ctrl = {s: float(np.mean([r[t] for t in tasks])) for s, r in by[label].items() if all(t in r for t in tasks)}
    out: dict[str, Any] = {}
    for v, seeds in by.items():
        if v == label:
            continue
        diffs = {s: float(np.mean([r[t] for t in tasks])) - ctrl[s] for s, r in seeds.items()
                 if s in ctrl and all(t in r for t in tasks)}
        if diffs:
            m, sd = _mean_std(list(diffs.values()))
            out[v] = {"per_seed": {str(s): d for s, d in sorted(diffs.items())}, "mean": m, "std": sd, "n": len(diffs)}
    return {"control": label, "variants": out, "key": key}


def gains(entries: list[dict[str, Any]], tasks: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per fine-tuned variant and task: what fine-tuning changed, the run's final success
    minus its own evaluation before the first update (same model, same reset seeds), as
    ``_cells`` gives it (mean ± std across seeds, the average over tasks within each seed)."""
    changed = [{**e, "gain": e["success"] - e["start"]} for e in entries
               if e["variant"].startswith("fine-tuned") and e.get("start") is not None]
    variants = list(dict.fromkeys(e["variant"] for e in changed))
    return _cells(changed, variants, tasks, "gain") if changed else {}


def gains_markdown(g: dict[str, dict[str, dict[str, Any]]], tasks: list[str]) -> list[str]:
    variants = list(g)
    lines = ["", "Fine-tuning's gain in points: each run's final success minus its own evaluation before "
             "the first update (same model, same reset seeds), mean ± std across seeds (n); "
             "in brackets, the seeds that gained:", "",
             "| task | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for t in [*tasks, "average"]:
        cells = []
        for v in variants:
            c = g[v].get(t)
            cells.append("-" if c is None else
                         f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f} (n={c['n']}) [{c['positive']}/{c['n']}]")
        lines.append(f"| {'**average**' if t == 'average' else t} | " + " | ".join(cells) + " |")
    return lines


def paired_markdown(p: dict[str, Any]) -> list[str]:
    seeds = sorted({s for v in p["variants"].values() for s in v["per_seed"]}, key=int)
    what = "the area under the success curve" if p.get("key") == "auc" else "the final success"
    lines = ["", f"Paired differences against {p['control']}, {what} averaged over the tasks, in points "
             "(variant minus control, same seed):", "",
             "| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std (n) |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for v, d in p["variants"].items():
        cells = [f"{100 * d['per_seed'][s]:+.1f}" if s in d["per_seed"] else "-" for s in seeds]
        lines.append(f"| {v} | " + " | ".join(cells) + f" | {100 * d['mean']:+.1f} ± {100 * d['std']:.1f} (n={d['n']}) |")
    return lines


def run(cfg, appendix: str = "") -> dict[str, Any]:
    """Gathers the runs into report.md / report.json and plots; returns the record.
    ``appendix``: markdown the caller adds at the end of report.md (a sweep's wall-clock)."""
    from omegaconf import OmegaConf

    from sodp3d.plots import RATE, bars, curve_grid

    runs = cfg.get("runs")
    if runs is None or runs == "???":
        raise UserError("no runs given; pass runs=[dir,...] (run dirs of finetune, demo or eval)")
    runs = [str(r) for r in (OmegaConf.to_container(runs) if not isinstance(runs, str) else [runs])]
    files = find_results(runs)
    entries, metrics = load_entries(files)
    if not entries:
        raise UserError("the runs hold no evaluated tasks")
    summary = summarise(entries)
    out = Path(str(cfg.out)) if cfg.get("out") else Path("runs") / "report"
    out.mkdir(parents=True, exist_ok=True)
    failed = OmegaConf.to_container(cfg.failed) if cfg.get("failed") else []
    text = markdown(summary, metrics, files, failed)
    gain = gains(entries, summary["tasks"])
    if gain:
        text += "\n" + "\n".join(gains_markdown(gain, summary["tasks"]))
    along = budgets(entries, summary["tasks"])
    ft_variants = [v for v in summary["variants"] if v.startswith("fine-tuned")]
    auc = _cells([e for e in entries if e.get("auc") is not None], ft_variants, summary["tasks"], "auc")
    if along:
        text += "\n" + "\n".join(budgets_markdown(along, auc))
    pairs = paired(entries, summary["tasks"], str(cfg.control)) if cfg.get("control") else None
    pairs_auc = paired(entries, summary["tasks"], str(cfg.control), "auc") if cfg.get("control") else None
    for p in (pairs, pairs_auc):
        if p and p["variants"]:
            text += "\n" + "\n".join(paired_markdown(p))
    if appendix:
        text += "\n" + appendix
    written = [str(write_text_atomic(out / "report.md", text + "\n")),
               str(write_text_atomic(out / "report.json", json.dumps(
                   {"metrics": metrics, "runs": [str(f) for f in files], "failed": failed, "gains": gain, "paired": pairs,
                    "paired_auc": pairs_auc, "along": {v: {str(x): c for x, c in b.items()} for v, b in along.items()},
                    "auc": auc, **summary},
                   indent=2)))]
    groups = summary["tasks"] + ["average"]
    series = {}
    for v in summary["variants"]:
        c = summary["cells"][v]
        series[v] = (np.array([100 * c[g]["mean"] if g in c else np.nan for g in groups]),
                     np.array([100 * c[g]["std"] if g in c else 0.0 for g in groups]))
    written.append(str(bars(groups, series, out / "success.png", "success rate [%] (mean ± std across seeds)")))
    curves = _curves(entries, summary["tasks"])
    if curves:
        rows = [r for r in CURVE_ROWS if any(key[0] == r for key in curves)]
        written.append(str(curve_grid([t for t in summary["tasks"] if ("training success rate", t) in curves],
                                      rows, curves, out / "curves.png",
                                      ylims={**RATE, "evaluation success": RATE["success rate"]})))
    return {"kind": "report", "text": text, "files": written, "summary": summary}


def render(record: dict[str, Any]) -> str:
    return record["text"] + "\n\nwrote " + ", ".join(record["files"])
