"""herd plan: the memory and step-time model of herd's 4D layouts, and the planner that searches them.

Floor: above engine/ (it reads engine's config schema, FLOP count and pipeline rules; nothing below imports it).
Modules: hardware (profiles in configs/hardware/), calibrate (efficiencies parsed from our own benchmark results),
layout (a 4D layout, its exact per-rank parameter / gradient / optimizer bytes and its config overrides), memory
(peak memory per GPU), steptime (compute, exposed communication, bubble, optimizer), search (enumerate, filter,
rank), report (tables and the config it writes), validation (predicted against measured and published numbers).
Formulas and their sources: docs/scale.md.
"""
