"""Which real cases a synthetic case depends on, and whether it may be used when some cases are held out.

A synthetic case carries information about every real case that shaped it: the cases its generator was trained
on, the case whose label map was the target, every donor case of a pasted region, the cases whose maps placed a
paste (datasets without a host class), and the case whose slice seeded the noise (Paired Diffusion §2.5; the target
slice). The manifest records them in two places so that it stays small for large datasets: each case entry lists its own
``source_cases`` (target, donors, noise-seeding reference), and the record of the fold it was made for lists the
``generator_training_cases`` once (one generator makes all of a fold's cases; the generate step refuses to mix two).
``case_dependencies`` joins them.

Cross-validation stays honest when a synthetic case is used for a fold only if none of those cases is one of the
fold's validation cases: ``may_use`` is the one rule every consumer (trainer, export, scoring, evaluation) applies.
"""
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

SOURCE_CASES = "source_cases"
GENERATOR_TRAINING_CASES = "generator_training_cases"


def label_map_source_cases(map_provenance: dict) -> List[str]:
    """The real cases a new label map (and its image) was built from: its target, the donor of every paste and,
    for datasets without a host class, the cases whose maps told where a paste may land (``placement``).
    Noise seeding starts from the target's own slice, so its reference is the target case."""
    cases = {map_provenance["target"]["case_id"]}
    for paste in map_provenance.get("pastes", []):
        cases.add(paste["donor"]["case_id"])
        cases.update((paste.get("placement") or {}).get("prior_case_ids") or [])
    return sorted(cases)


def case_dependencies(entry: dict, fold_records: Dict[str, dict]) -> Optional[set]:
    """Every real case id the synthetic case of manifest ``entry`` depends on, or None if it is not recorded."""
    record = fold_records.get(str(entry.get("fold")), {})
    if SOURCE_CASES not in entry or GENERATOR_TRAINING_CASES not in record:
        return None
    return set(entry[SOURCE_CASES]) | set(record[GENERATOR_TRAINING_CASES])


def may_use(entry: dict, fold_records: Dict[str, dict], held_out_cases: Iterable[str]) -> bool:
    """True when the synthetic case of ``entry`` depends on none of ``held_out_cases``.

    A case whose dependencies are not recorded may never be used: its origin cannot be checked.
    """
    dependencies = case_dependencies(entry, fold_records)
    return dependencies is not None and not dependencies & set(held_out_cases)


@dataclass
class FoldSelection:
    """The synthetic cases one fold may use, and those it may not (with the reason)."""
    allowed: List[str] = field(default_factory=list)
    leaking: List[str] = field(default_factory=list)            # depend on a held-out case (or unknown origin)
    other_store: List[str] = field(default_factory=list)        # fold "all": cases made for the numbered folds

    def counts(self) -> dict:
        return {"allowed": len(self.allowed), "dropped_for_leakage": len(self.leaking),
                "not_made_for_fold_all": len(self.other_store)}


def select_for_fold(manifest: dict, case_ids: Iterable[str], fold, held_out_cases: Iterable[str]) -> FoldSelection:
    """Split ``case_ids`` of ``manifest`` (synthetic.json) into the cases fold ``fold`` may use and the others.

    A numbered fold may use every case that depends on none of its validation cases (``held_out_cases``).
    Fold "all" (nnU-Net trains on every case; its validation is not independent) uses the cases made for "all"
    (``nnsynth_generate D --fold all``), so a final model gets the generator trained on every case.
    """
    held_out = set(held_out_cases)
    entries, fold_records = manifest["cases"], manifest.get("folds", {})
    selection = FoldSelection()
    for case_id in sorted(case_ids):
        entry = entries[case_id]
        if str(fold) == "all" and str(entry.get("fold")) != "all":
            selection.other_store.append(case_id)
        elif may_use(entry, fold_records, held_out):
            selection.allowed.append(case_id)
        else:
            selection.leaking.append(case_id)
    return selection
