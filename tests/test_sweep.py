"""``sodp3d sweep``: the smoke grid (2 seeds x 2 variants of tiny runs) through a local Ray
instance; a killed sweep run again does not redo finished runs and resumes the killed
one; a run that raises is retried, then reported failed while the others finish; bad
input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sodp3d.cli import main

SMOKE = ["experiment=smoke", "device=cpu", "ray.num_cpus=2"]
STAGES = {"collect": 2, "pretrain": 2, "finetune": 4}


def sweep_state(root: Path) -> dict:
    return json.loads((root / "demo-smoke" / "sweep.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    assert main(["sweep", *SMOKE, f"root={root}"]) == 0
    return root


def test_the_smoke_grid_runs_every_run_and_reports(smoke):
    state = sweep_state(smoke)
    runs = state["runs"]
    assert {c: sum(r["command"] == c for r in runs) for c in STAGES} == STAGES
    assert all(r["state"] == "done" and r["attempts"] == 1 and r["seconds"] > 0 for r in runs), runs
    out = smoke / "demo-smoke"
    for seed in (0, 1):
        for variant in ("bc", "none"):
            rec = json.loads((out / "finetune" / variant / f"reach-v3-s{seed}" / "results.json").read_text())
            assert (rec["variant"], rec["seed"], rec["reg"]) == (variant, seed, variant)
            assert rec["ckpt"] == str(out / "pretrain" / f"all-s{seed}")
    # One store per task; each pre-training reads both.
    assert sorted(p.name for p in (out / "data").iterdir()) == ["button-press-topdown-v3.zarr", "reach-v3.zarr"]
    report = (out / "report" / "report.md").read_text()
    assert "fine-tuned: bc" in report and "fine-tuned: none" in report and "(n=2)" in report
    table = report[report.index("Wall-clock per stage"):]
    assert [line.split("|")[1:3] for line in table.splitlines() if line.startswith("| ") and "stage" not in line] \
        == [[f" {c} ", f" {n} "] for c, n in STAGES.items()]


def test_the_wall_clock_table_counts_the_done_runs_that_recorded_their_time():
    from sodp3d.sweep import Run, stage_times

    def run(command, seconds, state="done"):
        return Run(f"{command}/x", command, Path("x"), {}, state=state, seconds=seconds)

    text = stage_times([run("pretrain", 60.0), run("pretrain", 180.0), run("pretrain", 120.0),
                        run("pretrain", 6000.0, state="failed"), run("finetune", None), run("finetune", 30.0)])
    assert "| pretrain | 3 | 2.0 | 1.0 - 3.0 | 6.0 |" in text
    assert "| finetune | 1 | 0.5 | 0.5 - 0.5 | 0.5 |" in text


def test_a_finished_sweep_run_again_redoes_nothing(smoke, capsys):
    metrics = sorted((smoke / "demo-smoke").rglob("metrics.jsonl"))
    before = {m: m.read_text() for m in metrics}
    seconds = {r["id"]: r["seconds"] for r in sweep_state(smoke)["runs"]}
    assert main(["sweep", *SMOKE, f"root={smoke}"]) == 0
    assert "8 of 8 runs done (8 were done already)" in capsys.readouterr().out
    assert {m: m.read_text() for m in metrics} == before
    # The state file still says what each run took when it ran.
    assert {r["id"]: r["seconds"] for r in sweep_state(smoke)["runs"]} == seconds


def test_a_grid_run_without_its_control_still_reports(smoke, capsys):
    """A sweep whose control variant was left out ('~variants.<control>') reports the
    runs it has, unpaired, instead of failing after every run is done."""
    assert main(["sweep", *SMOKE, f"root={smoke}", "+control=bc", "~variants.bc"]) == 0
    out = capsys.readouterr().out
    assert "control=bc is not among this grid's variants (none); the report pairs no variant with it" in out
    report = (smoke / "demo-smoke" / "report" / "report.md").read_text()
    assert "fine-tuned: none" in report and "Paired differences" not in report


def _killed_run(root: Path) -> Path | None:
    """A fine-tuning run with a checkpoint and no results yet."""
    for d in (root / "demo-smoke" / "finetune").glob("*/*"):
        if (d / "checkpoints" / "latest.ckpt").exists() and not (d / "results.json").exists():
            return d
    return None


def test_a_killed_sweep_resumes_without_redoing_finished_runs(tmp_path):
    args = [*SMOKE, f"root={tmp_path}", "finetune.env_steps=480"]  # ten updates: time to be killed mid-run
    proc = subprocess.Popen([sys.executable, "-m", "sodp3d.cli", "sweep", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    killed = None
    try:
        while time.time() < deadline and proc.poll() is None:
            killed = _killed_run(tmp_path)
            if killed is not None:
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and its Ray instance
        proc.wait()
    assert killed is not None, "no fine-tuning run was caught mid-way"
    time.sleep(1.0)
    from sodp3d import sweep
    from sodp3d.config import compose

    runs = sweep.plan(compose("sweep", args))
    finished = [r for r in runs if sweep.is_done(r)]
    assert 4 <= len(finished) < len(runs)  # the data and the pre-training at least
    finished_metrics = {r.dir / "metrics.jsonl": (r.dir / "metrics.jsonl").read_text()
                        for r in finished if r.command != "collect"}
    partial = (killed / "metrics.jsonl").read_text()

    assert main(["sweep", *args]) == 0
    state = sweep_state(tmp_path)
    assert all(r["state"] == "done" for r in state["runs"])
    assert {p: p.read_text() for p in finished_metrics} == finished_metrics  # not redone
    resumed = (killed / "metrics.jsonl").read_text()
    assert resumed.startswith(partial) and len(resumed) > len(partial)  # continued, not restarted
    assert json.loads((killed / "results.json").read_text())["tasks"][0]["env_steps"] >= 480


def test_a_failing_run_is_retried_then_reported_while_the_others_finish(tmp_path, capsys):
    args = ["experiment=smoke", "device=cpu", "ray.num_cpus=2", f"root={tmp_path}", "seeds=[0]", "max_retries=1",
            "~variants.none", "+variants.broken={algo:{lr:-1.0}}"]
    assert main(["sweep", *args]) == 0
    out = capsys.readouterr().out
    state = {r["id"]: r for r in sweep_state(tmp_path)["runs"]}
    broken = state["finetune/broken/reach-v3-s0"]
    assert broken["state"] == "failed" and broken["attempts"] == 2
    assert "Invalid learning rate" in broken["error"]
    assert state["finetune/bc/reach-v3-s0"]["state"] == "done"
    assert "failed finetune/broken/reach-v3-s0" in out
    report = (tmp_path / "demo-smoke" / "report" / "report.md").read_text()
    assert "Failed runs (1)" in report and "finetune/broken/reach-v3-s0" in report


@pytest.mark.parametrize("args,words", [
    (["experiment=nope"], "unknown experiment 'nope'; valid:"),
    (["experiment=smoke", "task=[reach-v3,flying-v3]"], "flying-v3"),
    (["experiment=smoke", "variants.bc.reg=nope"], "unknown regulariser reg=nope; valid: bc, none, kl, pl"),
    (["experiment=smoke", "+variants.bc.nope=1"], "variant 'bc' sets 'nope', which sodp3d finetune does not have"),
    (["experiment=smoke", "ray.address=127.0.0.1:1"], "nothing answers at ray.address=127.0.0.1:1"),
    (["experiment=smoke", "max_retries=-1"], "max_retries must be a non-negative integer"),
    (["experiment=smoke", "device=tpu"], "unknown device 'tpu'; use auto, cpu or cuda"),
    (["experiment=smoke", "+variants.bc.mixture=other"], "variant 'bc' pre-trains on mixture 'other'; valid: all"),
    ([], "no experiment; pass experiment=<name>"),
], ids=["experiment", "task", "regulariser", "key", "address", "retries", "device", "mixture", "none"])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    rc = main(["sweep", f"root={tmp_path}", *args])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("sodp3d sweep: error: ") and words in err, err
    assert not any(tmp_path.iterdir())


def test_requests_beyond_the_cluster_are_capped_or_refused():
    """Eight environments on a 2-CPU instance get the 2 CPUs (asking for 8 would never be
    scheduled); a GPU that the cluster does not have is one line."""
    from sodp3d import sweep
    from sodp3d.errors import UserError

    class TwoCPUs:
        def cluster_resources(self):
            return {"CPU": 2.0}

        def shutdown(self):
            pass

    big = sweep.Run("finetune/bc/t-s0", "finetune", Path("x"), {}, cpus=8.0)
    small = sweep.Run("collect/t", "collect", Path("y"), {}, cpus=1.0)
    sweep._fit_requests(TwoCPUs(), [big, small])
    assert (big.cpus, small.cpus) == (2.0, 1.0)
    with pytest.raises(UserError, match="asks for 1 GPU"):
        sweep._fit_requests(TwoCPUs(), [sweep.Run("pretrain/all-s0", "pretrain", Path("z"), {}, gpus=1.0)])


def test_variants_naming_the_same_encoder_share_one_pre_training(tmp_path):
    """One pre-training per mixture, seed and distinct encoder: two variants with the same
    encoder setting fine-tune from the same run, and the experiment's own encoder is not
    pre-trained again for a variant that names it."""
    from sodp3d import sweep
    from sodp3d.config import compose

    cfg = compose("sweep", ["experiment=smoke", f"root={tmp_path}", "seeds=[0]"])
    cfg.variants = {"a": {"reg": "bc", "encoder": "state"}, "b": {"reg": "none", "encoder": "state"},
                    "c": {"reg": "bc", "encoder": "dp3"}}
    runs = sweep.plan(cfg)
    pre = sorted(r.id for r in runs if r.command == "pretrain")
    assert pre == ["pretrain/all-s0", "pretrain/all-state-s0"], pre
    ckpt = {r.id.split("/")[1]: Path(r.cfg["ckpt"]).name for r in runs if r.command == "finetune"}
    assert ckpt == {"a": "all-state-s0", "b": "all-state-s0", "c": "all-s0"}, ckpt


def test_the_paper_tables_at_cpu_scale_are_planned_as_the_paper_runs_them():
    """mt10-cpu: one planner per seed on all ten MT10 tasks, each task fine-tuned from it.
    transfer-cpu (the paper's Table 3): the three targets never enter pre-training; the
    multi-task mixture holds ten tasks (basketball among them), the single-task one
    basketball alone, scratch a fresh network; every variant fine-tunes every target."""
    from sodp3d.config import compose
    from sodp3d.envs.tasks import resolve_tasks
    from sodp3d.sweep import plan

    mt10 = resolve_tasks("mt10")
    runs = {r.id: r for r in plan(compose("sweep", ["experiment=mt10-cpu", "device=cpu"]))}
    pre = sorted(i for i, r in runs.items() if r.command == "pretrain")
    assert pre == ["pretrain/all-s0", "pretrain/all-s1", "pretrain/all-s2"]
    assert sorted(runs["pretrain/all-s0"].needs) == sorted(f"collect/{t}" for t in mt10)
    ft = [r for r in runs.values() if r.command == "finetune"]
    for variant in ("bc", "bc-only"):  # the paper's form and its control on every task
        mine = [r for r in ft if r.id.split("/")[1] == variant]
        assert sorted((r.cfg["task"], r.cfg["seed"]) for r in mine) == sorted((t, s) for t in mt10 for s in (0, 1, 2))
    hard = ["pick-place-v3", "peg-insert-side-v3", "push-v3"]  # noise-sac: the tasks PPO + BC left at 0-1%
    sac = [r for r in ft if r.id.split("/")[1] == "noise-sac"]
    assert sorted((r.cfg["task"], r.cfg["seed"]) for r in sac) == sorted((t, s) for t in hard for s in (0, 1, 2))
    assert all(r.cfg["method"] == "noise-sac" and r.cfg["noise_sac"]["gradient_steps"] == 40 for r in sac)
    assert all(r.needs == [f"pretrain/all-s{r.cfg['seed']}"] and r.cfg["eval"]["episodes"] == 50 for r in ft)

    targets = ["drawer-open-v3", "plate-slide-side-v3", "handle-pull-side-v3"]
    runs = {r.id: r for r in plan(compose("sweep", ["experiment=transfer-cpu", "device=cpu"]))}
    collected = {r.cfg["task"][0] for r in runs.values() if r.command == "collect"}
    assert len(collected) == 10 and not collected & set(targets) and "basketball-v3" in collected
    assert runs["pretrain/single-s1"].needs == ["collect/basketball-v3"]
    assert len(runs["pretrain/multi-s1"].needs) == 10
    ft = [r for r in runs.values() if r.command == "finetune"]
    assert len(ft) == 4 * 3 * 3
    for r in ft:
        variant = r.id.split("/")[1]
        mixture = {"multi-task": "multi", "single-task": "single", "scratch": "multi", "noise-sac": "multi"}[variant]
        assert r.cfg["task"] in targets and r.needs == [f"pretrain/{mixture}-s{r.cfg['seed']}"]
        assert r.cfg["init"] == ("scratch" if variant == "scratch" else "pretrained")


def test_relative_paths_are_planned_as_absolute(tmp_path, monkeypatch):
    """A relative root and a relative policy path name the same files from a Ray worker that
    starts elsewhere: every directory and path a run's config holds is absolute, under the
    directory the sweep started in."""
    from sodp3d.config import compose
    from sodp3d.sweep import plan

    monkeypatch.chdir(tmp_path)
    runs = plan(compose("sweep", ["experiment=adroit-cpu", "device=cpu", "root=runs", "seeds=[0]",
                                  "collect.expert.path=experts"]))
    assert runs and all(r.dir.is_absolute() and r.dir.is_relative_to(tmp_path / "runs") for r in runs)
    for r in runs:
        paths = [r.cfg.get(k) for k in ("out", "ckpt")] + str(r.cfg.get("data") or "").split(",")
        assert all(Path(p).is_absolute() for p in paths if p), (r.id, paths)
    assert {r.cfg["expert"]["path"] for r in runs if r.command == "collect"} == {str(tmp_path / "experts")}


def test_a_variant_may_fine_tune_some_of_the_tasks_only():
    """mt10-state: bc on all ten tasks; DPPO's variants on three; the control on those and
    pick-place, as noise-sac is; a variant naming a task the experiment does not fine-tune
    is one line."""
    from sodp3d.config import compose
    from sodp3d.envs.tasks import resolve_tasks
    from sodp3d.errors import UserError
    from sodp3d.sweep import plan

    cfg = compose("sweep", ["experiment=mt10-state", "device=cpu"])
    ft = [r for r in plan(cfg) if r.command == "finetune"]
    by = {}
    for r in ft:
        by.setdefault(r.id.split("/")[1], set()).add(r.cfg["task"])
    three = set(cfg.variants["gae-bc"].tasks)
    assert by["bc"] == set(resolve_tasks("mt10")) and len(three) == 3
    assert by["gae-bc"] == by["gae"] == three and by["bc-only"] == three | {"pick-place-v3"}
    assert by["noise-sac"] == {"push-v3", "pick-place-v3"} <= by["bc-only"]  # paired with the control on each
    assert all(r.cfg["env"]["metaworld"]["point_cloud"] is False and r.cfg["algo"]["update_epochs"] == 3 for r in ft)
    with pytest.raises(UserError, match="variant 'bc-only' names tasks \\['basketball-v3'\\]"):
        plan(compose("sweep", ["experiment=mt10-state", "device=cpu", "variants.bc-only.tasks=[basketball-v3]"]))
