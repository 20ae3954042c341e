"""Built-in planner connectors: `local` processes, a `ray` cluster, `kubernetes`."""
