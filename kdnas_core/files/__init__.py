"""Files kdnas writes: ``atomic`` (never half-written, recognisably kdnas's own), ``lock`` (one
writer per folder) and ``checkpoint`` (training state without pickle)."""
