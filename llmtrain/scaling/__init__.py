"""Scaling laws: fit Kaplan / Chinchilla laws to runs, plan compute-optimal budgets.

laws.py (formulas), data.py (run dirs / CSV), fit.py (Huber + L-BFGS, bootstrap, approaches
1-3), plot.py, budget.py (plan, IsoFLOP sweeps), cli.py (`llmtrain scaling fit|plan|sweep`).
"""
