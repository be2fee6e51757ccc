"""Downstream tasks: a head, a loss, a metric and an evaluation loop each (imports models/ and data/ only)."""

from vlp.tasks.retrieval import (
    RetrievalScores,
    chance_recall,
    compute_retrieval_scores,
    evaluate_retrieval,
    hard_negative_accuracy,
    recall_at_k,
    retrieval_examples,
    retrieval_metrics,
    retrieval_ranks,
)

__all__ = [
    "RetrievalScores",
    "chance_recall",
    "compute_retrieval_scores",
    "evaluate_retrieval",
    "hard_negative_accuracy",
    "recall_at_k",
    "retrieval_examples",
    "retrieval_metrics",
    "retrieval_ranks",
]
