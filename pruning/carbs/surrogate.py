"""Surrogate models of the target: output, cost and success probability as functions of the basic input.

Three Gaussian processes, all from scikit-learn:

* output: GP regression on the output after a quantile-to-normal transform
  (so a few extreme runs, e.g. diverged losses, cannot dominate the fit), signed
  so that larger is always better;
* cost: GP regression on log cost (costs span orders of magnitude);
* success: a GP regression on +-1 success labels read through a probit,
  fitted only when both successes and failures exist (see `SuccessClassifier`).

Each regression standardises its targets itself and learns its noise with a
``WhiteKernel``; predictions are of the *latent* function (the learned noise
removed), so the expected improvement of re-running an observed point is not
inflated by observation noise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.special import erfcx, log_ndtr, ndtr, ndtri
from sklearn.exceptions import ConvergenceWarning
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import ConstantKernel, Kernel, Matern, WhiteKernel

__all__ = [
    "GaussianProcess",
    "QuantileNormalTransform",
    "SuccessClassifier",
    "SurrogateModel",
    "SurrogatePrediction",
    "log_expected_improvement",
]

# Length scales may shrink to a tenth of the search radius (wigglier would be fitting noise)
# and grow to ~100 radii (the target is flat along that parameter).
_LENGTH_SCALE_RANGE = (0.1, 300.0)
_NOISE_BOUNDS = (1e-6, 1.0)  # in units of the standardised target's variance
_JITTER = 1e-8  # added to the training covariance's diagonal for a stable Cholesky


def _fit_quietly(model: GaussianProcessRegressor, X: np.ndarray, y: np.ndarray) -> None:
    # L-BFGS hitting a hyperparameter bound is expected with ~10 points; the warning is noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X, y)


def _matern(num_dims: int, length_scale: float) -> Kernel:
    lo, hi = _LENGTH_SCALE_RANGE
    # Matern-3/2 as in the original: rougher than RBF, which suits response surfaces with kinks.
    return ConstantKernel(1.0, (1e-2, 1e2)) * Matern(
        length_scale=np.full(num_dims, length_scale),
        length_scale_bounds=(lo * length_scale, hi * length_scale),
        nu=1.5,
    )


class QuantileNormalTransform:
    """Monotone map of values to standard-normal scores by their empirical quantile.

    Observed values get the scores ``ndtri((rank + 0.5) / n)`` (ties share the
    mean probability); values in between are interpolated in probability, and
    values outside the observed range are clamped. Unlike scikit-learn's
    ``QuantileTransformer`` the extremes map to finite, moderate scores
    (about +-2.1 for 30 points) rather than +-5.2.
    """

    def __init__(self) -> None:
        self._knots = np.zeros(1)
        self._probs = np.full(1, 0.5)

    def fit(self, values: np.ndarray) -> QuantileNormalTransform:
        values = np.sort(np.asarray(values, dtype=float))
        n = len(values)
        if n == 0:
            raise ValueError("QuantileNormalTransform: cannot fit on no values")
        probs = (np.arange(n) + 0.5) / n
        knots, inverse = np.unique(values, return_inverse=True)
        self._knots = knots
        self._probs = np.bincount(inverse, weights=probs) / np.bincount(inverse)
        return self

    def transform(self, values: np.ndarray) -> np.ndarray:
        return ndtri(np.interp(values, self._knots, self._probs))

    def inverse_transform(self, scores: np.ndarray) -> np.ndarray:
        return np.interp(ndtr(scores), self._probs, self._knots)


class GaussianProcess:
    """GP regression with standardised targets and learned noise, predicting the noiseless function.

    Given `kernel`, the hyperparameters are kept fixed (used to refit with
    imputed pending points without re-optimising); otherwise a
    Matern kernel with one length scale per dimension, initialised at
    `length_scale`, is fitted by maximum marginal likelihood.
    """

    def __init__(
        self,
        X: np.ndarray,  # (n, d)
        y: np.ndarray,  # (n,)
        length_scale: float = 1.0,
        kernel: Kernel | None = None,
        normalization: tuple[float, float] | None = None,
    ) -> None:
        if normalization is None:
            std = float(np.std(y))
            normalization = (float(np.mean(y)), std if std > 1e-12 else 1.0)
        self.y_mean, self.y_std = normalization
        if kernel is None:
            kernel = _matern(X.shape[1], length_scale) + WhiteKernel(1e-2, _NOISE_BOUNDS)
            optimizer: str | None = "fmin_l_bfgs_b"
        else:
            optimizer = None
        # random_state is only used for optimizer restarts (none here); fixing it keeps sklearn away
        # from numpy's global generator.
        self._gp = GaussianProcessRegressor(
            kernel=kernel, alpha=_JITTER, optimizer=optimizer, normalize_y=False, random_state=0
        )
        _fit_quietly(self._gp, X, (y - self.y_mean) / self.y_std)
        self.kernel: Kernel = self._gp.kernel_
        self.noise_level = float(self.kernel.k2.noise_level)  # kernel = (constant * matern) + white
        self.X = X
        self.y = y

    def predict(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean and variance of the noiseless function at X, in target units. (n,), (n,)"""
        mean, std = self._gp.predict(X, return_std=True)
        latent_var = np.maximum(std**2 - self.noise_level, 1e-12)  # the white kernel adds noise on the diagonal
        return mean * self.y_std + self.y_mean, latent_var * self.y_std**2

    def sample(self, X: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One joint draw of the noiseless function at the rows of X (Thompson sampling). (n,)"""
        mean, cov = self._gp.predict(X, return_cov=True)
        cov = cov - self.noise_level * np.eye(len(X))
        # eigh + clipping is robust to the slightly indefinite covariances that nearby points give
        eigvals, eigvecs = np.linalg.eigh(cov)
        draw = mean + eigvecs @ (np.sqrt(np.clip(eigvals, 0.0, None)) * rng.standard_normal(len(X)))
        return draw * self.y_std + self.y_mean

    def refit_with(self, X_extra: np.ndarray, y_extra: np.ndarray) -> GaussianProcess:
        """The same GP (hyperparameters and normalisation) conditioned on extra points too."""
        return GaussianProcess(
            np.concatenate([self.X, X_extra]),
            np.concatenate([self.y, y_extra]),
            kernel=self.kernel,
            normalization=(self.y_mean, self.y_std),
        )


class SuccessClassifier:
    """P(run succeeds | basic input): a GP regression on +-1 labels, read through a probit.

    The label GP's latent value g(x) (+1 where runs succeeded, -1 where they
    failed) gets ``P(success) = Phi(mean_g / std_g)``, the posterior probability
    that g(x) > 0, as in the original library. Next to a cluster of failures
    this is tiny (the posterior is sure g < 0), so the acquisition stops
    proposing that region; far from all data it stays moderate. A Laplace GP
    classifier (sklearn's ``GaussianProcessClassifier``) was tried first: its
    probabilities stayed near 0.1 inside a cluster of 17 failures, too weak to
    outweigh the expected improvement of unexplored ground, and the search kept
    walking into the failing region.
    """

    def __init__(self, X: np.ndarray, is_success: np.ndarray, length_scale: float) -> None:
        labels = np.where(is_success, 1.0, -1.0)
        # fixed normalisation so that 0 stays the decision boundary whatever the success ratio
        self._gp = GaussianProcess(X, labels, length_scale, normalization=(0.0, 1.0))

    def log_predict(self, X: np.ndarray) -> np.ndarray:
        """log P(success) at the rows of X, (n,); stays finite deep in failing regions."""
        mean, var = self._gp.predict(X)
        return log_ndtr(mean / np.sqrt(var))


def _log_h(z: np.ndarray) -> np.ndarray:
    """log(phi(z) + z * Phi(z)), the expected improvement of a unit normal, accurate for very negative z."""
    z = np.asarray(z, dtype=float)
    out = np.empty_like(z)
    log_phi = -0.5 * z**2 - 0.5 * math.log(2 * math.pi)
    pos = z >= 0
    out[pos] = np.log(np.exp(log_phi[pos]) + z[pos] * ndtr(z[pos]))
    # For z < 0, phi + z Phi = phi * (1 + z Phi/phi) and Phi/phi = sqrt(pi/2) erfcx(-z/sqrt2): no underflow.
    mid = (z < 0) & (z > -30)
    bracket = 1 + z[mid] * math.sqrt(math.pi / 2) * erfcx(-z[mid] / math.sqrt(2))
    out[mid] = log_phi[mid] + np.log(np.maximum(bracket, 1e-300))
    # Far tail: the bracket cancels catastrophically; use its asymptotic series 1/z^2 (1 - 3/z^2 + 15/z^4).
    far = z <= -30
    zf = z[far]
    out[far] = log_phi[far] - 2 * np.log(-zf) + np.log1p(-3 / zf**2 + 15 / zf**4)
    return out


def log_expected_improvement(
    mean: np.ndarray, variance: np.ndarray, reference: np.ndarray, exploration_bias: float
) -> np.ndarray:
    """log E[max(f - reference - exploration_bias, 0)] for f ~ N(mean, variance), larger-is-better.

    Computed in logs so that candidates far below the reference still rank by
    their (tiny) improvement instead of all tying at zero.
    """
    sigma = np.sqrt(variance)
    z = (mean - reference - exploration_bias) / sigma
    return np.log(sigma) + _log_h(z)


@dataclass
class SurrogatePrediction:
    """The surrogate's view of a batch of candidates (all arrays (n,))."""

    output_mean: np.ndarray
    """Mean of the output in surrogate units (normal scores, larger is better)."""
    output_var: np.ndarray
    log_cost_mean: np.ndarray
    log_success_probability: np.ndarray


class SurrogateModel:
    """Output, cost and success models fitted to one snapshot of the observations."""

    def __init__(self, length_scale: float, better_direction_sign: int) -> None:
        self.length_scale = length_scale
        self.better_direction_sign = better_direction_sign
        self.output_transform = QuantileNormalTransform()
        self.output_model: GaussianProcess | None = None
        self.cost_model: GaussianProcess | None = None
        self.success_model: SuccessClassifier | None = None

    def target_to_surrogate(self, outputs: np.ndarray) -> np.ndarray:
        """Raw outputs to normal scores where larger is better."""
        return self.output_transform.transform(np.asarray(outputs, dtype=float) * self.better_direction_sign)

    def surrogate_to_target(self, scores: np.ndarray) -> np.ndarray:
        return self.output_transform.inverse_transform(np.asarray(scores, dtype=float)) * self.better_direction_sign

    def fit_observations(self, X: np.ndarray, outputs: np.ndarray, costs: np.ndarray) -> None:
        """Fit output and cost models to successful observations. X: (n, d)."""
        self.output_transform.fit(outputs * self.better_direction_sign)
        self.output_model = GaussianProcess(X, self.target_to_surrogate(outputs), self.length_scale)
        self.cost_model = GaussianProcess(X, np.log(costs), self.length_scale)

    def fit_suggestions(
        self, X_pending: np.ndarray, rng: np.random.Generator, estimator: Literal["THOMPSON", "MEAN"]
    ) -> None:
        """Pretend the pending suggestions were observed with imputed outputs.

        The output model then has little uncertainty left at those points, so the
        next suggestion goes elsewhere; a Thompson draw (rather than the mean)
        also lets a pending point look bad, which spreads parallel workers out.
        """
        if len(X_pending) == 0:
            return
        assert self.output_model is not None, "fit_observations before fit_suggestions"
        if estimator == "THOMPSON":
            imputed = self.output_model.sample(X_pending, rng)
        else:
            imputed = self.output_model.predict(X_pending)[0]
        self.output_model = self.output_model.refit_with(X_pending, imputed)

    def fit_failures(self, X_success: np.ndarray, X_failure: np.ndarray) -> None:
        """Fit the success classifier; without both outcomes every point is assumed to succeed."""
        if len(X_success) == 0 or len(X_failure) == 0:
            self.success_model = None
            return
        X = np.concatenate([X_success, X_failure])
        is_success = np.concatenate([np.ones(len(X_success)), np.zeros(len(X_failure))])
        self.success_model = SuccessClassifier(X, is_success, self.length_scale)

    def predict(self, X: np.ndarray) -> SurrogatePrediction:
        assert self.output_model is not None and self.cost_model is not None, "fit_observations first"
        output_mean, output_var = self.output_model.predict(X)
        log_cost_mean, _ = self.cost_model.predict(X)
        if self.success_model is None:
            log_success = np.zeros(len(X))
        else:
            log_success = self.success_model.log_predict(X)
        return SurrogatePrediction(output_mean, output_var, log_cost_mean, log_success)
