"""Teachers: ``loading`` resolves a teacher spec to a frozen encoder and its tokenizer; ``me5``
and ``charsmap`` build the offline multilingual teacher; ``vocab`` trims a student's vocabulary
to what its corpus uses."""
