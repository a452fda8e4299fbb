"""sodp3d report: runs of several seeds and regularisers in one table (mean and std), plots, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from sodp3d.cli import main

# Fine-tuned success per (reg, seed, task); the pre-trained model scores 0.1 / 0.3 for every seed.
FT = {
    ("bc", 0): {"reach-v3": 0.2, "push-v3": 0.5},
    ("bc", 1): {"reach-v3": 0.4, "push-v3": 0.5},
    ("bc", 2): {"reach-v3": 0.6, "push-v3": 0.8},
    ("none", 0): {"reach-v3": 0.0, "push-v3": 0.1},
    ("none", 1): {"reach-v3": 0.1, "push-v3": 0.1},
}
PRE = {"reach-v3": 0.1, "push-v3": 0.3}


def write_run(root: Path, reg: str, seed: int) -> Path:
    run = root / f"{reg}-s{seed}"
    run.mkdir(parents=True)
    tasks = []
    for task, rate in FT[(reg, seed)].items():
        history = [{"env_steps": s, "success_rate": rate * s / 200, "mean_chunk_reward": 1.0} for s in (100, 200)]
        tasks.append({"task": task, "reg": reg, "init": "pretrained", "env_steps": 200, "pretrained_success": PRE[task],
                      "finetuned_success": rate, "updates": 2, "history": history, "evals": []})
    record = {"kind": "finetune", "metric": "final evaluation, success rate over 10 episodes (DDIM eta = 0), "
              "before and after fine-tuning", "eval_episodes": 10, "seed": seed, "reg": reg, "init": "pretrained",
              "encoder": "dp3", "unet": "tiny", "ckpt": "pre", "env_steps": 200, "tasks": tasks}
    (run / "results.json").write_text(json.dumps(record))
    return run


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [write_run(tmp_path / "runs", reg, seed) for reg, seed in FT]


def test_table_is_mean_and_std_across_seeds(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", f"runs=[{','.join(str(r) for r in runs)}]", f"out={out}"]) == 0
    text = (out / "report.md").read_text()
    assert text in capsys.readouterr().out
    assert "final evaluation" in text and "mean ± standard deviation across seeds" in text
    success_table = text[:text.index("Fine-tuning's gain")]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in success_table.splitlines() if line.startswith("| ") and "---" not in line}
    header = rows.pop("task")
    assert header == ["pre-trained (dp3, tiny)", "fine-tuned reg=bc init=pretrained (dp3, tiny)",
                      "fine-tuned reg=none init=pretrained (dp3, tiny)"]
    # bc on reach: 0.2, 0.4, 0.6 -> mean 40, sample std 20; none: 0.0, 0.1 -> 5.0 +- 7.1.
    assert rows["reach-v3"][1] == "40.0 ± 20.0 (n=3)"
    assert rows["reach-v3"][2] == "5.0 ± 7.1 (n=2)"
    # The pre-trained model is one variant, counted once per seed (not once per run).
    assert rows["reach-v3"][0] == "10.0 ± 0.0 (n=3)"
    # Average: within each seed first (bc: 0.35, 0.45, 0.7 -> 50.0 +- 18.0).
    assert rows["**average**"][1] == "50.0 ± 18.0 (n=3)"
    summary = json.loads((out / "report.json").read_text())
    assert summary["cells"]["fine-tuned reg=bc init=pretrained (dp3, tiny)"]["push-v3"]["n"] == 3
    for png in ("success.png", "curves.png"):
        assert Image.open(out / png).size[0] > 200


def test_the_gain_is_each_runs_final_success_minus_its_own_start(runs, tmp_path):
    """Fine-tuning's gain pairs every run with its own evaluation before the first update:
    bc on reach 0.2 / 0.4 / 0.6 from 0.1 -> +10 / +30 / +50 points; none 0.0 / 0.1 from 0.1."""
    out = tmp_path / "report"
    assert main(["report", f"runs=[{','.join(str(r) for r in runs)}]", f"out={out}"]) == 0
    text = (out / "report.md").read_text()
    section = text[text.index("Fine-tuning's gain"):]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in section.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["task"] == ["fine-tuned reg=bc init=pretrained (dp3, tiny)",
                            "fine-tuned reg=none init=pretrained (dp3, tiny)"]
    assert rows["reach-v3"] == ["+30.0 ± 20.0 (n=3) [3/3]", "-5.0 ± 7.1 (n=2) [0/2]"]
    assert rows["push-v3"][0] == "+30.0 ± 17.3 (n=3) [3/3]"
    # Average within each seed first: bc 0.15, 0.25, 0.5.
    assert rows["**average**"][0] == "+30.0 ± 18.0 (n=3) [3/3]"
    gains = json.loads((out / "report.json").read_text())["gains"]
    assert gains["fine-tuned reg=none init=pretrained (dp3, tiny)"]["push-v3"]["mean"] == pytest.approx(-0.2)


def test_a_parent_directory_is_searched_and_eval_runs_join(runs, tmp_path, capsys):
    ev = tmp_path / "runs" / "eval-pointnet"
    ev.mkdir()
    ev.joinpath("results.json").write_text(json.dumps({
        "kind": "eval", "metric": "final evaluation: success rate over 10 episodes per task and seed",
        "seeds": [0, 1], "checkpoint": "p", "encoder": "pointnet", "unet": "tiny",
        "tasks": [{"task": "reach-v3", "success_rate": 0.25, "success_rate_std": 0.05,
                   "per_seed_success_rate": [0.2, 0.3], "mean_return": 1.0, "mean_return_std": 0.0, "episodes": 10}]}))
    out = tmp_path / "r2"
    assert main(["report", f"runs=[{tmp_path / 'runs'}]", f"out={out}"]) == 0
    text = (out / "report.md").read_text()
    header = [c.strip() for c in next(ln for ln in text.splitlines() if ln.startswith("| task")).split("|")[2:-1]]
    assert header[:2] == ["pre-trained (dp3, tiny)", "evaluated (pointnet, tiny)"]
    line = next(ln for ln in text.splitlines() if ln.startswith("| reach-v3"))
    assert [c.strip() for c in line.split("|")[2:-1]][1] == "25.0 ± 7.1 (n=2)"  # its two seeds
    assert "Metrics:" in text and "per task and seed" in text and "before and after fine-tuning" in text


def test_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "results.json").write_text("[1, 2]")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "results.json").write_text("{not json")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "results.json").write_text(json.dumps({"kind": "finetune", "metric": "m", "seed": 0, "init": "pretrained",
                                                      "tasks": [{"task": "x", "finetuned_success": 0.5}]}))  # no 'reg'
    for args, words in [([], "no runs given"), ([f"runs=[{tmp_path / 'empty'}]"], "holds no results.json"),
                        ([f"runs=[{tmp_path / 'nowhere'}]"], "no run at"), ([f"runs=[{foreign}]"], "not a results file"),
                        ([f"runs=[{broken}]"], "not a readable results file"),
                        ([f"runs=[{damaged}]"], "damaged finetune results file")]:
        rc = main(["report", *args, f"out={tmp_path / 'out'}"])
        err = capsys.readouterr().err
        assert rc == 2 and "Traceback" not in err and words in err, (args, err)
        assert len([ln for ln in err.splitlines() if ln.startswith("sodp3d report: error:")]) == 1
    assert not (tmp_path / "out").exists()


def test_named_variants_and_the_papers_numbers_beside_ours(tmp_path):
    """A sweep's runs carry their variant's name; where the paper reports a task (Adroit
    door here), its number stands in a column of its own, and other tasks get none."""
    run = tmp_path / "door"
    run.mkdir()
    task = {"task": "adroit-door", "reg": "bc", "init": "pretrained", "env_steps": 10, "pretrained_success": 0.25,
            "finetuned_success": 0.5, "updates": 1, "history": [], "evals": []}
    (run / "results.json").write_text(json.dumps({
        "kind": "finetune", "metric": "m", "seed": 0, "reg": "bc", "init": "pretrained", "variant": "paper-bc",
        "encoder": "dp3", "unet": "simple", "ckpt": "pre", "env_steps": 10, "tasks": [task]}))
    out = tmp_path / "report"
    assert main(["report", f"runs=[{run}]", f"out={out}"]) == 0
    lines = (out / "report.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| task |"))
    assert "fine-tuned: paper-bc" in header and "paper: SODP" in header and "paper: pre-trained only" in header
    assert "pre-trained on pre (dp3, simple)" in header  # a sweep's run names what it was pre-trained on
    assert "unseen task" not in header  # no task of this report has that number
    door = next(line for line in lines if line.startswith("| adroit-door |"))
    assert door.split("|")[2:-1][-4:] == [" 96.0 ", " 55.0 ", " 63.0 ", " 62.0 "]


def test_the_papers_averages_stand_only_beside_its_whole_task_sets():
    from sodp3d.envs import task_sets
    from sodp3d.report import _paper_columns

    assert _paper_columns(task_sets()["mt10"]) == {"paper: SODP": {"average": 47.5}, "paper: DP3": {"average": 32.6}}
    assert _paper_columns(task_sets()["mt10"][:3]) == {}  # three of its tasks are not its MT10
    adroit = _paper_columns(task_sets()["adroit"])
    assert adroit["paper: SODP"]["average"] == 73.9 and adroit["paper: pre-trained only"]["adroit-door"] == 55.0
    # Table 3 stands beside its three unseen targets only, not beside drawer-open within MT10.
    transfer = _paper_columns(["handle-pull-side-v3", "drawer-open-v3", "plate-slide-side-v3"])
    assert transfer["paper: MT10 pre-trained, unseen task"] == {
        "drawer-open-v3": 34.7, "plate-slide-side-v3": 55.3, "handle-pull-side-v3": 71.3}
    assert set(transfer["paper: single-task pre-trained, unseen task"].values()) == {0.0}
    assert not any("unseen" in c for c in _paper_columns(["drawer-open-v3"]))


def test_paired_differences_and_evaluation_curves(tmp_path):
    """Variants named as a sweep names them, with periodic evaluations: the paired table is
    variant minus control seed by seed (tasks averaged first), and the curves get rows for
    the evaluation success and return."""
    from sodp3d.report import _curves, eval_curve, load_entries, paired

    root = tmp_path / "runs"
    rates = {("bc", 0): 0.6, ("bc", 1): 0.5, ("bc-only", 0): 0.4, ("bc-only", 1): 0.45, ("gae-bc", 0): 0.7}
    files = []
    for (variant, seed), rate in rates.items():
        run = root / f"{variant}-s{seed}"
        run.mkdir(parents=True)
        evals = [{"tag": "initial", "eta": 0.0, "env_steps": 0, "success_rate": 0.3, "mean_return": 10.0},
                 {"tag": "periodic", "eta": 0.0, "env_steps": 100, "success_rate": rate, "mean_return": 20.0},
                 {"tag": "final", "eta": 0.0, "env_steps": 100, "success_rate": rate, "mean_return": 20.0}]
        task = {"task": "reach-v3", "reg": "bc", "init": "pretrained", "env_steps": 100, "pretrained_success": 0.3,
                "finetuned_success": rate, "updates": 1, "evals": evals,
                "history": [{"env_steps": 50, "success_rate": 0.1}, {"env_steps": 100, "success_rate": 0.2}]}
        (run / "results.json").write_text(json.dumps({
            "kind": "finetune", "metric": "m", "seed": seed, "reg": "bc", "init": "pretrained", "variant": variant,
            "eval_etas": [0.0], "encoder": "dp3", "unet": "tiny", "ckpt": "pre", "env_steps": 100, "tasks": [task]}))
        files.append(run / "results.json")
    assert eval_curve(json.loads(files[0].read_text())["tasks"][0]["evals"], 0.0, "success_rate")[0].tolist() == [0, 100]
    entries, _ = load_entries(files)
    p = paired(entries, ["reach-v3"], "bc-only")
    assert p["variants"]["fine-tuned: bc"]["per_seed"] == pytest.approx({"0": 0.2, "1": 0.05})
    assert p["variants"]["fine-tuned: gae-bc"]["n"] == 1
    curves = _curves(entries, ["reach-v3"])
    (bc,) = [c for c in curves[("evaluation success", "reach-v3")] if c[0].startswith("fine-tuned: bc (")]
    assert bc[1].tolist() == [0, 100] and bc[2].tolist() == pytest.approx([0.3, 0.55])
    assert ("evaluation return", "reach-v3") in curves
    out = tmp_path / "report"
    assert main(["report", f"runs=[{root}]", f"out={out}", "control=bc-only"]) == 0
    text = (out / "report.md").read_text()
    assert "Paired differences against fine-tuned: bc-only" in text
    assert "| fine-tuned: bc | +20.0 | +5.0 | +12.5 ± 10.6 (n=2) |" in text
    assert main(["report", f"runs=[{root}]", f"out={out}", "control=nope"]) == 2


def test_the_area_under_the_success_curve_and_success_along_fine_tuning(tmp_path):
    """The area under a run's evaluation curve is its trapezoids over env steps divided by the
    span (closed form); the budget table averages the tasks within a seed at each common
    evaluation; the paired AUC table takes each variant minus the control, seed by seed."""
    from sodp3d.report import area_under, budgets, load_entries, paired

    evals = [{"tag": "initial", "eta": 0.0, "env_steps": 0, "success_rate": 0.2},
             {"tag": "periodic", "eta": 0.0, "env_steps": 50, "success_rate": 0.6},
             {"tag": "final", "eta": 0.0, "env_steps": 100, "success_rate": 1.0}]
    assert area_under(evals, 0.0) == pytest.approx((0.4 * 50 + 0.8 * 50) / 100)
    assert area_under(evals[:1], 0.0) is None

    files = []
    for variant, seed, lift in (("bc", 0, 0.1), ("bc", 1, 0.3), ("bc-only", 0, 0.0), ("bc-only", 1, 0.0)):
        run = tmp_path / f"{variant}-s{seed}"
        run.mkdir()
        tasks = []
        for task, start in (("reach-v3", 0.2), ("push-v3", 0.4)):
            ev = [{"tag": t, "eta": 0.0, "env_steps": x, "success_rate": start + lift * x / 100}
                  for t, x in (("initial", 0), ("periodic", 50), ("final", 100))]
            tasks.append({"task": task, "pretrained_success": start, "finetuned_success": start + lift,
                          "history": [{"env_steps": 100, "success_rate": 0.5}], "evals": ev})
        record = {"kind": "finetune", "metric": "m", "seed": seed, "reg": "bc", "init": "pretrained",
                  "variant": variant, "ckpt": "pre", "tasks": tasks}
        (run / "results.json").write_text(json.dumps(record))
        files.append(run / "results.json")
    entries, _ = load_entries(files)
    b = budgets(entries, ["reach-v3", "push-v3"])
    assert sorted(b["fine-tuned: bc"]) == [0, 20, 40, 60, 80, 100]
    # bc at 40 steps: seed 0 averages 0.3 + 0.1 x 0.4, seed 1 0.3 + 0.3 x 0.4 -> 0.38 (n = 2)
    assert b["fine-tuned: bc"][40]["mean"] == pytest.approx(0.38) and b["fine-tuned: bc"][40]["n"] == 2
    p = paired(entries, ["reach-v3", "push-v3"], "bc-only", "auc")
    # the AUC of a linear rise by `lift` is start + lift / 2: bc minus bc-only = 0.05 and 0.15
    assert p["variants"]["fine-tuned: bc"]["per_seed"] == pytest.approx({"0": 0.05, "1": 0.15})
