"""Built-in planner policies: `load` (reactive, with hysteresis) and `sla` (predictive)."""
