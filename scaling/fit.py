"""The fits of an IsoFLOP sweep (Llama 3 paper, section 3.2.1), on plain arrays so they can be tested on losses
drawn from a known law.

1. Per budget C: validation loss against log10 N is fitted by a parabola; its vertex is the compute-optimal size
   N*(C), and D*(C) = C / (6 N*(C)).
2. The optimal tokens as a power law of compute, D*(C) = A C^alpha (the paper's N*(C) = A C^alpha, whose symbol N
   there counts training tokens; Llama 3: alpha = 0.53, A = 0.29), by least squares of log10 D* on log10 C. The
   parameter count follows: N*(C) = C / (6 D*(C)) = C^(1 - alpha) / (6 A).
3. Uncertainty of a prediction: from the power-law fit's covariance (the least-squares parameter covariance
   scaled by the residual variance, numpy.polyfit cov=True), propagated to log10 D* at the target (delta method):
   D* x/÷ 10^(t sigma), t the 97.5% quantile of Student's t with (budgets - 2) degrees of freedom (few budgets:
   the residual variance is itself uncertain). It needs at least 3 budgets; the scatter of each parabola's vertex
   enters only through the residuals.
4. Downstream, in two steps: the compute-optimal models' normalized NLL of the correct answer is linear in
   log10 C; accuracy is a sigmoid of that NLL between chance (1 / choices) and 1, fitted by scipy's curve_fit.
"""

import math
from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np

@dataclass
class Parabola:
    """loss = a x^2 + b x + c in x = log10 N, and its vertex."""

    a: float
    b: float
    c: float
    log10_n_opt: float  # the vertex: -b / 2a
    loss_opt: float  # the fitted loss there
    interior: bool  # the vertex lies inside the sizes trained (an extrapolated minimum is less trustworthy)

    @property
    def n_opt(self) -> float:
        return 10.0 ** self.log10_n_opt


def fit_parabola(params: Sequence[float], losses: Sequence[float]) -> Parabola:
    """Least-squares parabola of the losses in log10 N. A curve opening downward has no minimum, and a non-finite
    loss or size gives no curve: ValueError."""
    x = np.log10(np.asarray(params, dtype=float))
    y = np.asarray(losses, dtype=float)
    if len(x) < 3:
        raise ValueError(f"a parabola needs at least 3 sizes, got {len(x)}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):  # one nan makes every coefficient nan, and
        raise ValueError("a loss or size is not finite (a diverged run)")  # `a <= 0` is false for nan
    with np.errstate(over="ignore", invalid="ignore"):  # absurd losses (1e308) overflow: the caller checks
        a, b, c = np.polyfit(x, y, 2)
        if a <= 0:
            raise ValueError("the losses do not curve upward around a minimum (the fitted parabola opens downward): "
                             "widen the size grid around the optimum")
        vertex = -b / (2 * a)
        return Parabola(float(a), float(b), float(c), float(vertex), float(c - b * b / (4 * a)),
                        bool(x.min() <= vertex <= x.max()))


@dataclass
class PowerLaw:
    """D*(C) = A C^alpha, fitted as log10 D* = alpha log10 C + log10 A."""

    alpha: float
    A: float
    alpha_stderr: float  # nan with fewer than 3 points
    log10_A_stderr: float
    covariance: List[List[float]]  # of (alpha, log10 A)
    points: int

    def tokens(self, compute: float) -> float:
        return self.A * compute ** self.alpha

    def params(self, compute: float) -> float:
        """N*(C) = C / (6 D*(C))."""
        return compute / (6.0 * self.tokens(compute))

    def log10_tokens_stderr(self, compute: float) -> float:
        """Standard error of log10 D* at `compute` from the fit's covariance (delta method)."""
        gradient = np.array([math.log10(compute), 1.0])
        return float(math.sqrt(max(0.0, gradient @ np.asarray(self.covariance) @ gradient)))

    def t95(self) -> float:
        """Two-sided 95% quantile of Student's t with points - 2 degrees of freedom (nan below 3 points)."""
        from scipy.stats import t
        return float(t.ppf(0.975, self.points - 2)) if self.points >= 3 else math.nan

    def predict(self, compute: float) -> Dict[str, float]:
        """The compute-optimal tokens and parameters at `compute`, with 95% intervals (log-normal in D*)."""
        tokens, spread = self.tokens(compute), 10.0 ** (self.t95() * self.log10_tokens_stderr(compute))
        return {"compute": compute, "tokens": tokens, "params": self.params(compute),
                "tokens_95": [tokens / spread, tokens * spread],
                "params_95": [self.params(compute) / spread, self.params(compute) * spread],  # N* = C / 6D*
                "log10_tokens_stderr": self.log10_tokens_stderr(compute)}


def fit_power_law(computes: Sequence[float], tokens: Sequence[float]) -> PowerLaw:
    """log-linear least squares of the optimal tokens on compute (at least 2 budgets; 3 for an uncertainty)."""
    x = np.log10(np.asarray(computes, dtype=float))
    y = np.log10(np.asarray(tokens, dtype=float))
    if len(x) < 2:
        raise ValueError(f"a power law needs at least 2 budgets, got {len(x)}")
    if len(x) >= 3:
        (alpha, log_a), cov = np.polyfit(x, y, 1, cov=True)
    else:
        alpha, log_a = np.polyfit(x, y, 1)
        cov = np.full((2, 2), np.nan)
    return PowerLaw(float(alpha), float(10.0 ** log_a), float(math.sqrt(cov[0][0])), float(math.sqrt(cov[1][1])),
                    np.asarray(cov, dtype=float).tolist(), len(x))


@dataclass
class Line:
    """y = slope x + intercept (step 1 of the downstream prediction: NLL against log10 C)."""

    slope: float
    intercept: float

    def __call__(self, x: float) -> float:
        return self.slope * x + self.intercept


def fit_line(x: Sequence[float], y: Sequence[float]) -> Line:
    slope, intercept = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return Line(float(slope), float(intercept))


def sigmoid_accuracy(nll: np.ndarray, midpoint: float, scale: float, chance: float) -> np.ndarray:
    """Accuracy as a function of the normalized NLL of the correct answer: chance when the NLL is high, 1 when it
    is low; the midpoint is the NLL at half-way, the scale its width (nats)."""
    return chance + (1.0 - chance) / (1.0 + np.exp((np.asarray(nll, dtype=float) - midpoint) / scale))


@dataclass
class Sigmoid:
    midpoint: float
    scale: float
    chance: float
    midpoint_stderr: float
    scale_stderr: float

    def __call__(self, nll):
        return sigmoid_accuracy(nll, self.midpoint, self.scale, self.chance)


def fit_sigmoid(nll: Sequence[float], accuracy: Sequence[float], chance: float) -> Sigmoid:
    """Least-squares sigmoid (step 2 of the downstream prediction), with chance fixed at 1 / choices."""
    from scipy.optimize import curve_fit
    x, y = np.asarray(nll, dtype=float), np.asarray(accuracy, dtype=float)
    if len(x) < 3:
        raise ValueError(f"a sigmoid fit needs at least 3 models, got {len(x)}")
    start = (float(np.median(x)), max(1e-3, float(np.std(x)) or 0.1))
    (midpoint, scale), cov = curve_fit(lambda v, m, s: sigmoid_accuracy(v, m, s, chance), x, y, p0=start,
                                       bounds=([-np.inf, 1e-4], [np.inf, np.inf]), maxfev=20000)
    errors = np.sqrt(np.clip(np.diag(cov), 0, None)) if np.all(np.isfinite(cov)) else (math.nan, math.nan)
    return Sigmoid(float(midpoint), float(scale), chance, float(errors[0]), float(errors[1]))
