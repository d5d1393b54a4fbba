"""Annotation: an LVLM (or a teacher endpoint) rewrites every image's alt-text into the four formulas.

`schema` (format and prompts), `parse` (repairing model output), `run` (the annotation pass over the
store), `quality` (comparison with the built-in data's truth), `backends` (transformers, openai, vllm).
Kept import-light: heavy libraries are imported by the modules that use them.
"""
