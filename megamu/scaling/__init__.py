"""μScaling: μP hyper-parameter sweep, coordinate check, loss-curve fitting and prediction."""
from megamu.scaling.fit import FitError, PowerLawFit, fit_power_law
from megamu.scaling.points import LossPoint, read_points_csv
from megamu.scaling.predict import format_report, predict
from megamu.scaling.runs import read_run_point
from megamu.scaling.two_var import TwoVarFit, fit_two_var

__all__ = [
    "FitError",
    "LossPoint",
    "PowerLawFit",
    "TwoVarFit",
    "fit_power_law",
    "fit_two_var",
    "format_report",
    "predict",
    "read_points_csv",
    "read_run_point",
]
