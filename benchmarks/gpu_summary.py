"""The GPU check's verdict: the figures and pass/fail checks pulled out of the phases' results,
the goals (GPU mode only), and the lines printed at the end. Standard library only."""
from __future__ import annotations

from typing import Any

GOAL_IMAGES_PER_S = 2500    # DenseNet121, 320 px, bf16, at the auto batch, on one H200
GOAL_SPEED_RATIO = 0.95     # our loader + loop against the bare loop on batches already on the GPU
FIGURES = ("batch", "ours_images_per_s", "bare_images_per_s", "speed_ratio",
           "control_ratio_min_max", "ours_peak_gib", "bare_peak_gib")


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d


def _figures(arm: Any) -> dict | None:
    return {k: arm.get(k) for k in FIGURES} if isinstance(arm, dict) and "batch" in arm else None


def checks(results: dict) -> dict[str, bool | None]:
    """True / False per check; None where its phase gave no answer (skipped, stopped)."""
    p = results["phases"]
    loaded = [v for ph in p.values() for k, v in ph.items() if k.endswith("loaded_mlflow_or_dvc")]
    tests = _get(p, "gpu-tests", "pytest") or {}
    return {"deterministic_weights_identical": _get(p, "determinism", "weights", "identical"),
            "torchrun_round": (_get(p, "torchrun", "status") == "ok") if "torchrun" in p else None,
            "torchrun_matches_plain_round": _get(p, "torchrun", "matches_plain_round", "identical"),
            "oom_fallback": _get(p, "oom", "fallback_ok"),
            "oom_floor_error": _get(p, "oom", "floor", "raised"),
            "gpu_tests": (_get(p, "gpu-tests", "status") == "ok" and not tests.get("failed"))
            if _get(p, "gpu-tests", "status") in ("ok", "failed", "timeout") else None,
            "no_mlflow_or_dvc_loaded": not any(loaded) if loaded else None}


def goals(results: dict, at_auto: dict | None, at_fixed: dict | None) -> dict[str, Any]:
    """Each goal met (True / False; None when not measured); judged in GPU mode only."""
    if results.get("mode") != "gpu":
        return {"evaluated": False, "why": "the CPU dry run checks that the script works, not speed"}
    ips = (at_auto or {}).get("ours_images_per_s")
    ratios = [a.get("speed_ratio") for a in (at_auto, at_fixed) if a]
    return {"evaluated": True, "met": {
        f"ours_images_per_s_at_auto_batch_>=_{GOAL_IMAGES_PER_S}":
            None if ips is None else ips >= GOAL_IMAGES_PER_S,
        f"speed_ratio_>=_{GOAL_SPEED_RATIO}_at_both_batches":
            None if not ratios or None in ratios else min(ratios) >= GOAL_SPEED_RATIO}}


def summary(results: dict) -> dict:
    p = results["phases"]
    m = _get(p, "setup", "machine") or {}
    tp = p.get("throughput", {})
    at_auto, at_fixed = _figures(tp.get("auto")), _figures(tp.get("fixed"))
    return {"device_name": m.get("device_name"), "torch": m.get("torch"), "cuda": m.get("cuda"),
            "cudnn": m.get("cudnn"), "arch": tp.get("arch"), "image_size": tp.get("image_size"),
            "precision": tp.get("precision"), "channels_last": tp.get("channels_last"),
            "auto_batch": tp.get("auto_batch"), "at_auto_batch": at_auto, "at_fixed_batch": at_fixed,
            "synthetic_images_per_s": _get(p, "setup", "synthetic", "images_per_s"),
            "store_fill_s": _get(p, "setup", "store", "seconds"),
            "checks": checks(results), "goals": goals(results, at_auto, at_fixed)}


def status(results: dict) -> str:
    states = [ph.get("status") for ph in results["phases"].values()]
    verdicts = list(results["summary"]["checks"].values())
    goal = results["summary"]["goals"]
    if any(s in ("failed", "timeout") for s in states) or False in verdicts:
        return "failed"
    if "skipped" in states or None in verdicts:
        return "incomplete"
    return "goals-missed" if False in goal.get("met", {}).values() else "ok"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}"
    if isinstance(v, list):
        return "-".join(_fmt(x) for x in v)
    return "n/a" if v is None else str(v)


def lines(results: dict) -> list[str]:
    s = results["summary"]
    out = [f"== gpu_check ({results['mode']}): {s['device_name']}, torch {s['torch']}, CUDA "
           f"{s['cuda']}, {s['arch']} at {s['image_size']} px, {s['precision']}, channels_last "
           f"{s['channels_last']}"]
    for label, arm in (("auto batch", s["at_auto_batch"]), ("fixed batch", s["at_fixed_batch"])):
        if arm:
            out.append(f"{label} {arm['batch']}: ours {_fmt(arm['ours_images_per_s'])} img/s, bare "
                       f"{_fmt(arm['bare_images_per_s'])} img/s, ratio {_fmt(arm['speed_ratio'])} "
                       f"(control {_fmt(arm['control_ratio_min_max'])}), peak GiB ours "
                       f"{_fmt(arm['ours_peak_gib'])} bare {_fmt(arm['bare_peak_gib'])}")
    out.append("checks: " + ", ".join(f"{k} {_fmt(v)}" for k, v in s["checks"].items()))
    goal = s["goals"]
    out.append("goals: " + (", ".join(f"{k} {_fmt(v)}" for k, v in goal["met"].items())
                            if goal["evaluated"] else f"not judged ({goal['why']})"))
    tests = _get(results["phases"], "gpu-tests", "pytest")
    if tests:
        out.append("gpu-marked tests: " + ", ".join(f"{n} {k}" for k, n in tests.items()))
    out.append("phases: " + ", ".join(f"{k} {v.get('status')} ({_fmt(v.get('seconds'))} s)"
                                      for k, v in results["phases"].items()))
    return out
