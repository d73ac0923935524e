"""The file names the parts agree on, in one place."""

MANIFEST = "manifest.json"
"""every artifact's (policies, logs, feature tables) list of files and hashes"""
SUMMARY = "summary.json"
"""the release evaluation's summary (unexrl.contracts.evaluation.EvaluationSummary)"""
REPORT = "report.md"
"""the release evaluation as Markdown, for the Kubeflow UI"""
EVALUATION_PLOT = "evaluation.png"
CURVE = "curve.json"
"""a training run's validation curve and timings"""
BENTO = "bento.json"
"""what package built (unexrl.contracts.release.BentoRecord)"""

USERS = "users.parquet"
ITEMS = "items.parquet"
TRANSITIONS = "transitions.parquet"
LOG_TABLES = (USERS, ITEMS, TRANSITIONS)
"""the tables of a log directory (unexrl/data/schema.py), each listed in its manifest"""
