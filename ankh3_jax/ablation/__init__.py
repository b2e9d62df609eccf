"""Pre-training ablation: multi-task (Ankh3) vs single-objective pre-training at small
scale, probed on the shipped downstream data (`ankh3-ablation`, docs/ablation.md).

Modules: `tokens` (counts the tokens a run trains on), `pretrain` (runs and reads one
experiment's training), `probes` (frozen-feature probes), `stats` (means, spreads, noise and
verdicts), `report` (tables, sentences, plots, markdown), `run` (the command).
"""
# The gin experiments under gin_configs/experiments/, in the order they are reported.
EXPERIMENTS = ("mlm15_only", "mlm_multi", "completion_only", "ankh3")
# Probe tasks (see `probes`) and the short names of their metrics.
TASKS = ("ss3", "ss8", "contacts", "burial")
# Residues each side of the one-hot window reference (the fair context-free baseline).
WINDOW_RADIUS = 7
METRIC_NAMES = {"ss3": "Q3", "ss8": "Q8", "contacts": "P@L/5", "burial": "burial rho"}
# The experiments that pre-train on one objective, and the eval tasks (pre-training's
# held-out clusters) with their titles on the page.
SINGLE_OBJECTIVE = ("mlm15_only", "mlm_multi", "completion_only")
EVAL_TASK_TITLES = {"ankh3_mlm_p15": "MLM 15 %", "ankh3_mlm_p20": "MLM 20 %",
                    "ankh3_mlm_p30": "MLM 30 %", "ankh3_completion": "completion"}
