"""Inception Score: exp(E_x KL(p(y|x) || p(y))), averaged over splits of the samples.

As the ADM evaluator: the class probabilities are the softmax of the unbiased logits of the
FID Inception (`InceptionV3(...)["logits"]`, 1008 classes), the samples are cut into
consecutive splits (10 splits; for 50,000 samples these are ADM's splits of 5,000) and the
score is the mean over splits. Here the softmax and logs are taken in float64 from the logits
(log_softmax), so a probability that underflows cannot turn the score into NaN.
"""
from __future__ import annotations

import numpy as np
from scipy.special import log_softmax, logsumexp


def inception_score(logits, num_splits: int = 10) -> float:
    """logits: [N, classes] -> the mean over `num_splits` splits of exp(E KL(p(y|x) || p(y)))."""
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or len(logits) < num_splits:
        raise ValueError(f"inception_score needs logits [N, classes] with N >= num_splits="
                         f"{num_splits}, got shape {logits.shape}")
    scores = []
    for part in np.array_split(log_softmax(logits, axis=1), num_splits):
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))  # log mean_x p(y|x)
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores))
