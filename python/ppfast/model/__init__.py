"""Model tools that cut a model into stages: ``split`` (balanced by parameters, by measured
time or uniformly) and the tied weights that stages share."""
