"""Run a study: several training runs of one engine at an equal time budget, evaluated alike.

    python launch/study.py --config configs/studies/fashion_mnist.yaml
    python launch/study.py --config configs/studies/fashion_mnist.yaml --only vae,bidvl_offset
    python launch/study.py --config configs/studies/fashion_mnist.yaml --report-only

For every entry of `runs` it trains BASE with COMMON... OVERRIDES... (as `launch/train.py --config
BASE ...` would) in OUT/NAME until `budget_minutes` of training time (train.time_budget_min, clock
`budget_clock`) are used, then evaluates the export as `launch/evaluate.py` would (FID-style score
on `eval.num_samples` samples against `eval.fid_ref`, test RMSE, OOD AUROC against uniform noise
and the `eval.ood` shards folders) and draws sample and reconstruction grids as `launch/sample.py`
would. A finished run leaves OUT/NAME/study_result.json and is skipped by later invocations; an
interrupted one resumes from its last checkpoint with the budget it had used
(checkpoint.resume=auto). Changing a run's settings needs a new name or deleting its folder.

Each of a run's three stages (train, evaluate, grids) runs the library (bidvl.engine,
bidvl.evaluation) in a fresh Python process, `python -m bidvl.study STAGE ...`, with its output
in OUT/NAME/study.log:
- training must: the `process` budget clock is the CPU time of the whole process, runs go side by
  side (`parallel`), and each run starts from a clean state (RNG, Accelerate, thread pools);
- evaluation and grids could run in this process, but there they would share its thread pools
  and device with the other runs (`threads` is set per process, through OMP_NUM_THREADS, before
  torch starts), and their output would mix with the other runs' instead of going to the run's
  log. In their own process they get the run's thread count and the device launch/evaluate.py
  and launch/sample.py would pick, so their figures and images are those of the commands.
The processes run in the folder the study was started from (the repository root in a clone),
from where the relative paths of the study files (base, shards folders, out) are read; `base` may
also name a shipped config (`fashion_mnist`).

At the end it writes the report (`report`, Markdown) with the table, the grids, loss and
evaluation curves (PNG, matplotlib, from the runs' TensorBoard logs), steps and time per run, and
the machine. Text after the line `<!-- end of generated part -->` of an existing report is kept.

Compute scaling (`budgets: [10, 30, 90]` instead of budget_minutes): each run trains to the
first budget, is evaluated, then resumes in the same folder to the next budget (checkpoint.resume
exact: the data order, RNG and optimizer state carry on), and so on. Its point at 30 min is thus
the run a 30-minute budget would give, and the three cost 90 minutes, not 130. Each budget leaves
OUT/NAME/study_result_<B>min.json and samples_<B>min.png / reconstructions_<B>min.png. A run may
list its own `budgets` (e.g. extra seeds at the first budget only) and a `method` (runs of one
method, e.g. several seeds, are one line in the plot and one mean +- sd in the table). The report
plots the FID-style score, RMSE and noise AUROC against training minutes, and for each method
against `vae` (when there is one), the gap per budget and where a straight line in log-minutes
through the gaps would reach zero.

Fair budgets on a shared machine: with budget_clock `process` and one thread per run (`threads`,
data.num_workers=0 in `common`), each run gets the same CPU time whatever else the machine does,
and `parallel` runs can go side by side. Wall-clock time is reported too.

Study file keys: base (config file), out, report, budget_minutes or budgets, budget_clock, threads,
parallel, common (list of overrides), eval {num_samples, features, fid_ref, ood (list of shards
folders), batch_size, auto_build_ood (map folder -> [dataset, resolution])}, runs (list of {name,
label, overrides, budgets, method}).

The package: config.py (the study file, typed: Study, StudyRun, StudyEval; load_study), runner.py
(the runs and their stages' processes), stages.py and __main__.py (the stages, each in its own
process), report.py (the report of a study with `budget_minutes`, and what every report shares),
scaling.py (the report of a study with `budgets`).
"""

from bidvl.study.config import Study, StudyError, load_study, study_file
from bidvl.study.report import machine
from bidvl.study.runner import run_study

__all__ = ["StudyError", "Study", "load_study", "study_file", "run_study", "machine"]
