"""The CR schedule of a retrofit: a linear ramp, and where it starts after a resume changed the target.

Plain arithmetic on the run's settings (`asdict(RetrofitConfig)`, as saved in retrofit.json), with no imports,
so that model cards and reports can read a run's schedule without the trainer.
"""


def ramp_length(settings: dict, start_step: int = 0) -> int:
    """Steps the CR ramp takes: --ramp-steps, else 80% of the steps left after the ramp's start."""
    return max(1, settings.get("ramp_steps") or int(0.8 * (settings["steps"] - start_step)))


def ramped_cr(step: int, settings: dict, origin: tuple[float, int] = (1.0, 0)) -> float:
    """CR target after `step` completed steps of a run with these settings (`asdict(RetrofitConfig)`):
    linear from origin = (CR, step), reaching target_cr after `ramp_length` more. Extending a finished
    run: resume with more --steps and the same ramp; raising the target: see `ramp_origin`."""
    start_cr, start_step = origin
    done = min(1.0, (step + 1 - start_step) / ramp_length(settings, start_step))
    return start_cr + (settings["target_cr"] - start_cr) * done


def stages_with_origins(settings: dict) -> list[tuple[dict, tuple[float, int]]]:
    """Each stretch of a run (its `phases`, then the current settings, each with `until_step`) and the
    (CR, step) its ramp starts from: (1, 0), or, after a resume that changed --target-cr, the CR reached
    by then (a ramp cut short by --stop-at included)."""
    stages = [*settings.get("phases", []), {**settings, "until_step": settings["steps"]}]
    out, origin = [], (1.0, 0)
    for i, stage in enumerate(stages):
        before = stages[i - 1] if i else stage
        if before["target_cr"] != stage["target_cr"]:
            origin = (ramped_cr(before["until_step"] - 1, before, origin), before["until_step"])
        out.append((stage, origin))
    return out


def ramp_origin(settings: dict) -> tuple[float, int]:
    """(CR, step) the current ramp starts from (see `stages_with_origins`)."""
    return stages_with_origins(settings)[-1][1]
