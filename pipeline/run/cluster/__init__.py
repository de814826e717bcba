"""``runner: ray``: the run's stages on a Ray cluster. The run's process (the driver) keeps
what needs one owner, as a local run does: the plan, the ledger, the sink, the dead letters,
the lock. Ray Data reads the source, Ray tasks chunk it, an actor pool embeds."""
