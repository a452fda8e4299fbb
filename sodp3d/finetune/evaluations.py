"""What a fine-tuning run of one task records, whatever its method: the evaluations
(initial, periodic, final; at each DDIM eta of ``eval.etas``; ``sodp3d eval``'s protocol on
the same reset seeds every time, so the points of a curve are paired) and the task's
summary, which ``results.json`` holds and ``sodp3d report`` reads.

It also holds the etas both methods evaluate with (``eval_etas``).

``state`` is the run's resumable record: {"env_steps", "history", "evals", "pretrained_eval"}.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from sodp3d.errors import UserError


def new_state() -> dict[str, Any]:
    return {"env_steps": 0, "history": [], "evals": [], "pretrained_eval": None}


def eval_value(state: dict[str, Any], tag: str, eta: float, key: str = "success_rate") -> float | None:
    return next((e[key] for e in state["evals"] if e["tag"] == tag and e.get("eta", 0.0) == eta), None)


def task_summary(state: dict[str, Any], task: str, reg: str, init: str, etas: list[float], updates: int,
                 final: float | None, **extra: Any) -> dict[str, Any]:
    """A task's row of the results record: success and return before and after fine-tuning
    at each eta, its curve and its evaluations."""
    return {"task": task, "reg": reg, "init": init, "env_steps": state["env_steps"],
            "pretrained_success": state["pretrained_eval"], "finetuned_success": final,
            "pretrained_return": eval_value(state, "initial", etas[0], "mean_return"),
            "finetuned_return": eval_value(state, "final", etas[0], "mean_return"),
            "by_eta": [{"eta": e, "pretrained_success": eval_value(state, "initial", e),
                        "finetuned_success": eval_value(state, "final", e),
                        "pretrained_return": eval_value(state, "initial", e, "mean_return"),
                        "finetuned_return": eval_value(state, "final", e, "mean_return")}
                       for e in etas],
            "updates": updates, "history": state["history"], "evals": state["evals"], **extra}


def record_evaluation(state: dict[str, Any], policy, task: str, cfg: DictConfig, etas: list[float], samplers: list,
                      vec, logger, tag: str) -> float:
    """``sodp3d eval``'s protocol on the run's own environments at each eval eta, appended to
    ``state['evals']`` and logged; returns the success rate at the first eta (the headline).
    ``policy`` acts through ``predict_action`` (a planner, or a planner steered by a noise
    policy); its generator is seeded by ``cfg.seed`` at each eta, as every method does."""
    from sodp3d.evaluate import evaluate_task

    rates = []
    for eta, sampler in zip(etas, samplers):
        gen = torch.Generator(device=policy.device).manual_seed(int(cfg.seed))
        r = evaluate_task(policy, task, int(cfg.eval.episodes), int(cfg.seed), vec.num_envs, generator=gen, vec=vec,
                          sampler=sampler)
        rate, ret = float(np.mean(r["success"])), float(np.mean(r["return"]))
        state["evals"].append({"tag": tag, "eta": eta, "env_steps": state["env_steps"], "success_rate": rate,
                               "mean_return": ret})
        suffix = "" if eta == etas[0] else f"_eta{eta:g}"
        logger.log({f"eval/success_rate{suffix}": rate, f"eval/mean_return{suffix}": ret}, state["env_steps"])
        rates.append(rate)
    return rates[0]


def eval_etas(cfg: DictConfig) -> list[float]:
    """The DDIM etas fine-tuning evaluates with (``eval.etas``); the first is the headline."""
    etas = cfg.eval.get("etas", [0.0])
    etas = [etas] if isinstance(etas, (int, float)) else list(etas)
    if not etas or any(not isinstance(e, (int, float)) or not 0 <= e <= 1 for e in etas):
        raise UserError(f"eval.etas must list DDIM etas in [0, 1] (0: deterministic, 1: as fine-tuning samples), got {etas}")
    return [float(e) for e in etas]
