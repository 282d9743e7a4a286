"""The search: which students to distil, and which to recommend per latency budget.

``space`` (architectures and their names), ``controller`` (LSTM, random, evolution), ``reward``
(the KD-NAS reward and budgets), ``loop`` (the resumable episode loop over an evaluator, the
leaderboard and the recommendations), ``signals`` (a candidate's quality signals on held-out
texts, zero-cost or after the proxy run), ``screen`` (many candidates scored zero-cost, the best
few distilled), ``candidates`` (the real evaluator: proxy distillation and latency, with its
on-disk record), ``runner`` (one config's search in its folder), ``reports`` (its tables and
plots) and ``synthetic`` (a known-optimum problem for testing controllers).
"""
