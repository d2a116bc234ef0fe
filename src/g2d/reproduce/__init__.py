"""``g2d reproduce TABLE``: the paper's tables (and the project's own experiments) run cell by cell,
stored, and written beside the paper's numbers. One job per module: the experiment files
(:mod:`~g2d.reproduce.spec`), the runner and its result store (:mod:`~g2d.reproduce.runner`), the
tables, gates and paired differences (:mod:`~g2d.reproduce.report`), the figure
(:mod:`~g2d.reproduce.plots`) and the JSRT tables (:mod:`~g2d.reproduce.jsrt`)."""

from g2d.reproduce.jsrt import prepare_jsrt
from g2d.reproduce.plots import plot_fractions
from g2d.reproduce.report import (
    CellResult,
    format_csv,
    format_differences,
    format_fraction_tables,
    format_gates,
    format_markdown,
)
from g2d.reproduce.runner import PRETRAIN_METRICS, Runner, pretrain_metrics
from g2d.reproduce.spec import (
    Column,
    Difference,
    Experiment,
    Gate,
    Row,
    Scale,
    list_experiments,
    list_scales,
    load_experiment,
    load_scale,
)

__all__ = ["Column", "Row", "Gate", "Difference", "Experiment", "Scale", "load_experiment", "load_scale",
           "list_scales", "list_experiments", "Runner", "CellResult", "format_markdown", "format_gates",
           "format_csv", "format_fraction_tables", "format_differences", "plot_fractions", "pretrain_metrics",
           "PRETRAIN_METRICS", "prepare_jsrt"]
