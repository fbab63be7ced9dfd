"""Task-incremental metrics of an accuracy matrix R, where R[i][j] is the test accuracy on task j
after learning task i (j <= i): average accuracy, backward transfer and forgetting, plain and
weighted by test-set size."""

from __future__ import annotations

from collections.abc import Sequence


def _check(matrix: Sequence[Sequence[float]]) -> int:
    t = len(matrix)
    if t == 0 or any(len(row) < i + 1 for i, row in enumerate(matrix)):
        raise ValueError("the accuracy matrix needs rows 0..T-1 with row i holding tasks 0..i")
    return t


def _mean(values: Sequence[float], weights: Sequence[float] | None) -> float:
    if not values:
        return 0.0
    w = weights or [1.0] * len(values)
    return sum(v * x for v, x in zip(values, w, strict=True)) / sum(w)


def average_accuracy(
    matrix: Sequence[Sequence[float]], weights: Sequence[float] | None = None
) -> float:
    """ACC = mean over j of R[T-1][j].

    Args:
        matrix: the accuracy matrix R, row i holding the accuracies on tasks 0..i after task i.
        weights: one weight per task, e.g. its test-set size (None: equal weights).

    Returns:
        The average accuracy after the last task.

    Raises:
        ValueError: ``matrix`` is empty or a row i holds fewer than i + 1 accuracies, or
            ``weights`` does not hold T values.
    """
    t = _check(matrix)
    return _mean([matrix[t - 1][j] for j in range(t)], weights)


def backward_transfer(
    matrix: Sequence[Sequence[float]], weights: Sequence[float] | None = None
) -> float:
    """BWT = mean over j < T-1 of R[T-1][j] - R[j][j] (negative: forgetting); 0 for a
    single task.

    Args:
        matrix: the accuracy matrix R, row i holding the accuracies on tasks 0..i after task i.
        weights: one weight per task, e.g. its test-set size; the first T-1 are used (None:
            equal weights).

    Returns:
        The backward transfer.

    Raises:
        ValueError: ``matrix`` is empty or a row i holds fewer than i + 1 accuracies, or
            ``weights`` holds fewer than T-1 values.
    """
    t = _check(matrix)
    w = weights[: t - 1] if weights else None
    return _mean([matrix[t - 1][j] - matrix[j][j] for j in range(t - 1)], w)


def forgetting(matrix: Sequence[Sequence[float]], weights: Sequence[float] | None = None) -> float:
    """F = mean over j < T-1 of (max over j <= i < T-1 of R[i][j]) - R[T-1][j]; 0 for a
    single task.

    Args:
        matrix: the accuracy matrix R, row i holding the accuracies on tasks 0..i after task i.
        weights: one weight per task, e.g. its test-set size; the first T-1 are used (None:
            equal weights).

    Returns:
        The forgetting (negative only when a task's last accuracy beats all its earlier ones).

    Raises:
        ValueError: ``matrix`` is empty or a row i holds fewer than i + 1 accuracies, or
            ``weights`` holds fewer than T-1 values.
    """
    t = _check(matrix)
    w = weights[: t - 1] if weights else None
    return _mean(
        [max(matrix[i][j] for i in range(j, t - 1)) - matrix[t - 1][j] for j in range(t - 1)], w
    )


def summary(matrix: Sequence[Sequence[float]], test_sizes: Sequence[int]) -> dict[str, float]:
    """All metrics, plain and weighted by each task's test-set size."""
    sizes = [float(n) for n in test_sizes]
    return {
        "acc": average_accuracy(matrix),
        "bwt": backward_transfer(matrix),
        "forgetting": forgetting(matrix),
        "acc_weighted": average_accuracy(matrix, sizes),
        "bwt_weighted": backward_transfer(matrix, sizes),
        "forgetting_weighted": forgetting(matrix, sizes),
    }
