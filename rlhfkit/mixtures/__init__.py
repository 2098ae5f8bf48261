"""The RLHFlow preference-data mixtures behind `prepare_data.py`: the catalog of sources and mixtures, per-source
converters, loading (local or hub at pinned revisions), selection rules, decontamination and LMFlow files.
Imports the core, never another family."""
