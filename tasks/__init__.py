"""Thin Prefect tasks around kdnas_core calls (teacher states, proxy distillation, latency
profiling, final distillation, evaluation, tracking). They return small serialisable results,
never models or tensors.
"""
