"""Runs: turning what a user asks for into configured jobs and carrying them out.

:mod:`.assemble` (a recipe + overrides + student + data spec + teacher source spec -> a configured run;
without a recipe for ``kd-detr train``),
:mod:`.compare` (recipes x seeds side by side), :mod:`.quickstart` (the whole flow on generated data),
:mod:`.inference` (eval / predict from checkpoints) and :mod:`.export` (the student alone, in the
ecosystem's formats). The CLI calls these; they call the engine, the teacher layer and the models.
"""
