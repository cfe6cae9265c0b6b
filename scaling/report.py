"""From finished runs to the sweep's results: the fits of scaling/fit.py over the runs' final validation losses
(and downstream scores), written as <sweep>/scaling.json, scaling.md and PNG plots."""

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from engine.errors import HerdError
from engine.files import write_atomic
from scaling.fit import (Parabola, PowerLaw, fit_line, fit_parabola, fit_power_law, fit_sigmoid)

LLAMA3 = {"alpha": 0.53, "A": 0.29}  # the paper's fit (section 3.2.1)
OUTPUTS = ("scaling.json", "scaling.md", "isoflop.png", "power_law.png", "downstream.png")


def fit_sweep(runs: List[dict], targets: List[float]) -> dict:
    """The IsoFLOP fits over runs carrying 'val_loss' (and 'downstream' when scored)."""
    budgets = sorted({r["budget"] for r in runs})
    per_budget, optimal = [], []
    for budget in budgets:
        group = sorted((r for r in runs if r["budget"] == budget), key=lambda r: r["params"])
        entry = {"budget": budget, "runs": [r["name"] for r in group]}
        try:
            parabola = fit_parabola([r["params"] for r in group], [r["val_loss"] for r in group])
        except ValueError as e:
            entry["error"] = str(e)
            per_budget.append(entry)
            continue
        values = (parabola.a, parabola.b, parabola.c, parabola.log10_n_opt, parabola.loss_opt)
        if not all(math.isfinite(v) for v in values) or abs(parabola.log10_n_opt) > 300:  # losses of 1e308, say
            entry["error"] = ("the fitted parabola is not finite, or its vertex beyond any model size (a final "
                              "validation loss far beyond any real one?)")
            per_budget.append(entry)
            continue
        entry.update(parabola=vars(parabola), n_opt=parabola.n_opt, tokens_opt=budget / (6 * parabola.n_opt))
        per_budget.append(entry)
        optimal.append((budget, entry["tokens_opt"], parabola))
    result = {"budgets": per_budget, "convention": {
        "params": "N: weights that multiply (blocks, final norm, output head); not the input embedding "
                  "(engine/flops.py include_embedding=False)",
        "compute": "C = 6 N D (the budget); 6 N D plus the attention term is recorded per run as "
                   "compute_with_attention",
        "power_law": "D*(C) = A C^alpha, least squares of log10 D* on log10 C; N*(C) = C / (6 D*(C))",
        "uncertainty": "95% intervals from the power-law fit's covariance (numpy.polyfit cov=True, scaled by the "
                       "residual variance), delta method on log10 D*, Student's t with budgets - 2 degrees of freedom; needs >= 3 "
                       "budgets"}, "llama3": LLAMA3}
    if len(optimal) >= 2:
        law = fit_power_law([c for c, _, _ in optimal], [d for _, d, _ in optimal])
        if not (math.isfinite(law.alpha) and math.isfinite(law.A)):
            raise HerdError(f"the power law D*(C) = A C^alpha over the budgets' optima gave alpha = {law.alpha}, "
                            f"A = {law.A}: no result; check the runs' final validation losses (scaling.json is not "
                            f"written)")
        result["power_law"] = _law_entry(law, optimal)
        result["predictions"] = [law.predict(t) for t in targets]
        result["_law"] = law
        interior = [o for o in optimal if o[2].interior]
        if 2 <= len(interior) < len(optimal):  # the same fit without the minima extrapolated beyond the grid
            result["power_law_interior_only"] = _law_entry(
                fit_power_law([c for c, _, _ in interior], [d for _, d, _ in interior]), interior)
    downstream = _downstream(runs, optimal)
    if downstream:
        result["downstream"] = downstream
        result["downstream_predictions"] = [_predict_accuracy(downstream, t) for t in targets] \
            if "sigmoid" in downstream else []
    return result


def _law_entry(law: PowerLaw, optimal: list) -> dict:
    return {"alpha": law.alpha, "A": law.A, "alpha_stderr": law.alpha_stderr, "log10_A_stderr": law.log10_A_stderr,
            "covariance": law.covariance, "budgets_fitted": law.points,
            "extrapolated_minima": sum(not p.interior for _, _, p in optimal)}


def _downstream(runs: List[dict], optimal: list) -> Optional[dict]:
    """Llama 3's two steps: (1) NLL of the correct answer of the compute-optimal models, linear in log10 C (the
    scored run nearest each budget's optimum in log N); (2) accuracy as a sigmoid of that NLL over every run."""
    scored = [r for r in runs if "downstream" in r]
    if len(scored) < 3 or len(optimal) < 2:
        return None
    chance = 1.0 / scored[0]["downstream"]["choices"]
    nearest = []
    for budget, _, parabola in optimal:
        group = [r for r in scored if r["budget"] == budget]
        if group:
            best = min(group, key=lambda r: abs(math.log10(r["params"]) - parabola.log10_n_opt))
            nearest.append((budget, best))
    out = {"chance": chance, "compute_optimal": [{"budget": b, "run": r["name"], **r["downstream"]}
                                                 for b, r in nearest]}
    if len(nearest) >= 2:
        line = fit_line([math.log10(b) for b, _ in nearest], [r["downstream"]["nll_correct"] for _, r in nearest])
        out["nll_vs_log10_compute"] = {"slope": line.slope, "intercept": line.intercept}
    try:
        sigmoid = fit_sigmoid([r["downstream"]["nll_correct"] for r in scored],
                              [r["downstream"]["accuracy"] for r in scored], chance)
        out["sigmoid"] = vars(sigmoid)
    except (ValueError, RuntimeError) as e:  # curve_fit's RuntimeError: no convergence
        out["sigmoid_error"] = str(e)
    return out


def _predict_accuracy(downstream: dict, compute: float) -> dict:
    from scaling.fit import sigmoid_accuracy
    if "nll_vs_log10_compute" not in downstream:
        return {}
    line, s = downstream["nll_vs_log10_compute"], downstream["sigmoid"]
    nll = line["slope"] * math.log10(compute) + line["intercept"]
    return {"compute": compute, "nll_correct": nll,
            "accuracy": float(sigmoid_accuracy(np.array([nll]), s["midpoint"], s["scale"], s["chance"])[0])}


def check_outputs(sweep: Path) -> None:
    """Each result file is absent or a regular file (an earlier fit's, replaced): a directory there cannot be
    written, and a FIFO would block the write until something reads it. One line naming it, before any work."""
    from scaling.runs import check_regular_file
    for name in OUTPUTS:
        check_regular_file(sweep / name, "a result file", "move it away (herd scaling writes its results there)")


def write_results(sweep: Path, runs: List[dict], fits: dict, command: str) -> List[Path]:
    """scaling.json (everything), scaling.md (a summary) and the plots; returns the paths written."""
    check_outputs(sweep)  # again: the fit may have run for hours since the command checked them
    law: Optional[PowerLaw] = fits.pop("_law", None)
    document = {"command": command, "runs": runs, **fits}
    paths = [sweep / "scaling.json", sweep / "scaling.md"]
    try:
        write_atomic(paths[0], json.dumps(_json_safe(document), indent=1, allow_nan=False) + "\n")
        write_atomic(paths[1], _markdown(document, command))
        from scaling.plots import plot_downstream, plot_isoflop, plot_power_law
        paths.append(plot_isoflop(sweep / "isoflop.png", runs, fits["budgets"]))
        if law is not None:
            paths.append(plot_power_law(sweep / "power_law.png", fits["budgets"], law, fits.get("predictions", [])))
        if "downstream" in fits and "sigmoid" in fits["downstream"]:
            paths.append(plot_downstream(sweep / "downstream.png", runs, fits["downstream"]))
    except OSError as e:  # a full disk, a file made read-only: one line naming the file
        raise HerdError(f"{e.filename or sweep}: cannot write the results ({e.strerror or e})") from None
    return paths


def _json_safe(value):
    """The document with every non-finite number as null: JSON has no nan or inf (a standard error of a two-budget
    fit is nan), and a bare NaN makes the file unreadable to strict parsers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _markdown(doc: dict, command: str) -> str:
    lines = ["# IsoFLOP sweep", "", f"Command: `{command}`", "", "| run | budget C | N | layers x dim | D | steps | "
             "val loss | next-line NLL/char | accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        d = r.get("downstream", {})
        lines.append(f"| {r['name']} | {r['budget']:.3g} | {r['params']:,} | {r['n_layers']} x {r['dim']} | "
                     f"{r['tokens']:,} | {r['steps']} | {r['val_loss']:.4f} | "
                     f"{d.get('nll_correct', float('nan')):.4f} | {d.get('accuracy', float('nan')):.3f} |")
    lines += ["", "Per budget, the parabola's minimum in log10 N:", ""]
    for b in doc["budgets"]:
        if "error" in b:
            lines.append(f"- C = {b['budget']:.3g}: no fit ({b['error']})")
        else:
            p = b["parabola"]
            lines.append(f"- C = {b['budget']:.3g}: N* = {b['n_opt']:,.0f}, D* = {b['tokens_opt']:,.0f}, loss "
                         f"{p['loss_opt']:.4f}" + ("" if p["interior"] else " (outside the sizes trained)"))
    if "power_law" in doc:
        law = doc["power_law"]
        lines += ["", f"Power law D*(C) = A C^alpha: **alpha = {law['alpha']:.3f} ± {law['alpha_stderr']:.3f}** "
                      f"(standard error, {law['budgets_fitted']} budgets), A = {law['A']:.3g} (Llama 3: alpha 0.53, "
                      f"A 0.29)"]
        if law["extrapolated_minima"]:
            lines.append(f"({law['extrapolated_minima']} of these minima lie outside the sizes trained.)")
        if "power_law_interior_only" in doc:
            only = doc["power_law_interior_only"]
            lines += ["", f"Without them ({only['budgets_fitted']} budgets, interior minima only): alpha = "
                          f"{only['alpha']:.3f}" + (f" ± {only['alpha_stderr']:.3f}" if only["budgets_fitted"] >= 3
                                                     else " (two points: no error estimate)") + f", A = {only['A']:.3g}"]
        lines.append("")
        for p in doc.get("predictions", []):
            lines.append(f"- C = {p['compute']:.3g}: N* = {p['params']:.3g} (95%: {p['params_95'][0]:.3g} to "
                         f"{p['params_95'][1]:.3g}), D* = {p['tokens']:.3g} tokens (95%: {p['tokens_95'][0]:.3g} to "
                         f"{p['tokens_95'][1]:.3g})")
    if "downstream" in doc:
        ds = doc["downstream"]
        if "nll_vs_log10_compute" in ds:
            lines += ["", f"Downstream step 1: NLL/char = {ds['nll_vs_log10_compute']['slope']:.4f} log10 C + "
                          f"{ds['nll_vs_log10_compute']['intercept']:.4f} (compute-optimal runs)"]
        if "sigmoid" in ds:
            s = ds["sigmoid"]
            lines += [f"Downstream step 2: accuracy = {s['chance']:.2f} + {1 - s['chance']:.2f} / "
                      f"(1 + exp((NLL - {s['midpoint']:.4f}) / {s['scale']:.4f})) (all runs)"]
        for p in doc.get("downstream_predictions", []):
            if p:
                lines.append(f"- C = {p['compute']:.3g}: NLL/char {p['nll_correct']:.4f} -> accuracy "
                             f"{p['accuracy']:.3f}")
    return "\n".join(lines) + "\n"


def as_parabola(entry: Dict) -> Parabola:
    return Parabola(**entry["parabola"])
