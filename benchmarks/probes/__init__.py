"""Probe training (issue #9): the pipeline that writes models/probes/<model>.json, which the
service reads at run time (service/decision/probes.py). One module per step, each importing only the
steps before it:

- `features`: the probe prompt, one prefill reading hidden states, the feature cache;
- `fit`: logistic heads, cross-validation by profile, Platt scaling, thresholds, item heads;
- `guard`: the out-of-distribution guard (`guard`, `guard-report`, `ids`);
- `train` and `report`: the probe file, and its figures on the reporting part and held-out sets;
- `sanity`: hand-written actions through the in-process service, probe on and off;
- `reads`: a study of which hidden state reads the decision (`python -m benchmarks.probes.reads`);
- `__main__`: the CLI, `python -m benchmarks.probes <command>`."""
