"""The documents that pass between the system's parts, as typed models: one module per family, every one read and
written through :mod:`unexrl.contracts.base` (atomic write, schema version, sha256), its file names in
:mod:`unexrl.contracts.files`.

- :mod:`~unexrl.contracts.logs`: a log directory's manifest and the feature tables' manifest;
- :mod:`~unexrl.contracts.artifact`: a policy artifact's manifest and the directory check before loading;
- :mod:`~unexrl.contracts.actors`: the trained actors' manifest (feature schema, training data, curve, selection);
- :mod:`~unexrl.contracts.training`: a training run's summary (curve.json) and checkpoint progress;
- :mod:`~unexrl.contracts.diagnostics`: the critic diagnostics that curve.json and results.json carry;
- :mod:`~unexrl.contracts.experiment`: the record of one experiment run, beside its outcomes;
- :mod:`~unexrl.contracts.evaluation`: the release evaluation's summary and the gate's decision;
- :mod:`~unexrl.contracts.release`: the packaged bento and the registry's release record.
"""
