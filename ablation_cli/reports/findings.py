"""The findings paragraph at the top of results.md (and the same facts in results.json): plain
sentences with the numbers, built from results.json's ``statistics``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ablation_cli.reports.tables import cells_by_name, first_best, row_key, swept_layer_configs


def _p(rec: Mapping[str, Any], key: str = "p_holm") -> str:
    """The Holm-adjusted p of a comparison; one from a bootstrap p at its floor is only a bound."""
    p = rec.get(key)
    if p is None:
        return "adjusted p n/a"
    if rec.get("p_bound"):
        return f"adjusted p <= {p:.2g}"
    return f"adjusted p = {p:.3f}" if p >= 1e-3 else "adjusted p < 0.001"


def _list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def build(results: Mapping[str, Any]) -> Mapping[str, Any]:
    """``text`` (the paragraph) and the facts behind it, keyed for scripts."""
    stats = results.get("statistics") or {}
    ids = {c["cell"]: c for c in cells_by_name(results).values() if "cell" in c}
    rows = {cid: row_key(c) for cid, c in ids.items()}
    settings = stats.get("settings") or {}
    alpha = settings.get("alpha", 0.05)
    facts: dict[str, Any] = {"best": {}, "tied": {}, "worse": {}, "better": {}, "layer_effects": [],
                             "not_above_chance": [], "comparisons_corrected": stats.get("comparisons_corrected", 0),
                             "without_predictions": list(stats.get("without_predictions") or [])}
    sentences: list[str] = []
    if not stats.get("cells"):
        if ids:
            sentences.append("No findings: no cell has stored test predictions (cells made before ablate stored "
                             "them, or imported); retrain them (`ablate reset`, then `ablate run`) for paired "
                             "statistics.")
        facts["sentences"], facts["text"] = sentences, " ".join(sentences)
        return facts
    test = settings.get("paired_test", "paired bootstrap")
    swept = swept_layer_configs(results)
    for lc, block in (stats.get("vs_best") or {}).items():
        boot = stats["cells"].get(block["best"])
        facts["best"][lc] = block["best_row"]
        if lc in swept:  # one sentence for the whole sweep below, not one per generated layer config
            continue
        ci = (f", 95% CI {boot['test_acc_ci95_rows_runs'][0]:.3f} to {boot['test_acc_ci95_rows_runs'][1]:.3f} "
              "over test rows and runs" if boot else "; no stored predictions, so nothing is compared with it")
        sentence = (f"On {lc}, the best cell on validation accuracy is {block['best_row']} (validation "
                    f"{block['best_val_acc']:.3f}; test {block['best_test_acc']:.3f}{ci}).")
        by_verdict: dict[str, list[str]] = {"tied": [], "worse": [], "better": []}
        for rec in block["comparisons"]:
            if rec["verdict"] in by_verdict:
                by_verdict[rec["verdict"]].append(f"{rows.get(rec['cell'], rec['cell'])} "
                                                  f"({rec['diff']:+.3f}, {_p(rec)})")
                facts[rec["verdict"]].setdefault(lc, []).append(rows.get(rec["cell"], rec["cell"]))
        if by_verdict["tied"]:
            sentence += (f" Statistically tied with it ({test}, Holm-adjusted p >= {alpha:g}): "
                         f"{_list(by_verdict['tied'])}.")
        elif block["comparisons"]:
            sentence += " No other cell is statistically tied with it."
        if by_verdict["worse"]:
            sentence += f" Worse: {_list(by_verdict['worse'])}."
        if by_verdict["better"]:
            sentence += (f" Better on test although not on validation: {_list(by_verdict['better'])} (the choice "
                         "on validation stands; the test set disagrees).")
        if block.get("not_compared"):
            sentence += (f" Not compared (no stored predictions, or other test rows): "
                         f"{_list([rows.get(c, c) for c in block['not_compared']])}.")
        sentences.append(sentence)
    if swept:
        sentences.extend(_sweep_sentences(results, ids, rows, swept, stats, facts))
    for lc, d in (results.get("derived_layer_configs") or {}).items():
        sentences.append(f"{lc} drops the {len(d['dropped'])} layer(s) of the top {d['drop_top']} layer configs "
                         f"ranked by {d['ranked_rep']} on validation accuracy (never test) in {d['ranked_by']}: "
                         f"{_list(d['dropped'])}.")
        facts.setdefault("derived_layer_configs", {})[lc] = list(d["dropped"])
    in_sweep: list[tuple[str, int]] = []  # (pair, significant rows) of the pairs with a layer sweep's config
    for effect in stats.get("layer_effects") or []:
        recs = effect["rows"]
        if not recs:
            continue
        significant = [r for r in recs if r["p_holm"] is not None and r["p_holm"] < alpha]
        facts["layer_effects"].append({"from": effect["from"], "to": effect["to"],
                                       "significant": [r["row"] for r in significant],
                                       "diffs": {r["row"]: r["diff"] for r in recs}})
        if effect["from"] in swept or effect["to"] in swept:  # one sentence for them all, below
            in_sweep.append((f"{effect['from']} minus {effect['to']}", len(significant)))
            continue
        parts = [f"{r['row']} {r['diff']:+.3f} (95% CI {r['ci95'][0]:+.3f} to {r['ci95'][1]:+.3f}, "
                 f"{_p(r)})" if r["ci95"] else f"{r['row']} {r['diff']:+.3f}" for r in recs]
        sentences.append(f"{effect['from']} minus {effect['to']}, paired per representation ({test}, Holm over "
                         f"{len(recs)}): {_list(parts)}; the difference is significant for {len(significant)} "
                         f"of {len(recs)}.")
    if in_sweep:
        differ = sum(1 for _, n in in_sweep if n)
        sentences.append(f"Of the {len(in_sweep)} pairs with a layer sweep's configs ({in_sweep[0][0]}, ...; "
                         f"{test}, Holm within each), {differ} differ significantly for at least one row; "
                         "results.md tables each.")
    chance = stats.get("chance") or {}
    below = [f"{rows.get(cid, cid)} ({ids[cid]['layer_config']})" if cid in ids else cid
             for cid, c in chance.items() if not c["above"]]
    if len(below) > 10:  # a layer sweep's many cells: the first ten, and how many more
        below = [*below[:10], f"{len(below) - 10} more"]
    facts["not_above_chance"] = [cid for cid, c in chance.items() if not c["above"]]
    rates = sorted({round(c["majority_rate"], 3) for c in chance.values()})
    rate = f"{rates[0]:.3f}" if len(rates) == 1 else f"{rates[0]:.3f} to {rates[-1]:.3f}"
    sentences.append(f"Chance (the test set's majority-class rate) is {rate}; " +
                     (f"not above it (one-sided bootstrap, Holm over {len(chance)} cells): {_list(below)}."
                      if below else f"every cell is above it (one-sided bootstrap, Holm over {len(chance)} cells)."))
    sizes = stats.get("split_sizes") or {}
    sentences.append(f"{facts['comparisons_corrected']} comparisons in all, Holm-corrected within each family "
                     f"(against the best of each layer config, each pair of layer configs, chance); "
                     f"{results.get('num_runs')} runs per cell, {sizes.get('test', '?')} test rows"
                     f"{' resampled per run' if settings.get('split') == 'resampled per run' else ''}.")
    bounded = [r for block in (stats.get("vs_best") or {}).values() for r in block["comparisons"]] + \
        [r for effect in stats.get("layer_effects") or [] for r in effect["rows"]]
    if any(r.get("p_bound") for r in bounded):
        sentences.append(f"A p shown as <= is a bound: the bootstrap's resolution (1/B = "
                         f"{1 / settings['bootstrap_resamples']:.2g} before Holm's correction), not a measured value.")
    if facts["without_predictions"]:
        sentences.append(f"Left out (no stored test predictions): {_list(facts['without_predictions'])}.")
    facts["sentences"], facts["text"] = sentences, " ".join(sentences)
    return facts


def _sweep_sentences(results: Mapping[str, Any], ids: Mapping[str, Mapping[str, Any]], rows: Mapping[str, str],
                     swept: list[str], stats: Mapping[str, Any], facts: dict[str, Any]) -> list[str]:
    """Per row (representation, classifier): the layer sweep's best layer config, chosen on validation."""
    sweep = results["config"]["layer_sweep"]
    chosen = set(swept)
    cells = [c for c in ids.values() if c.get("layer_config") in chosen and c.get("val_acc_mean") is not None]
    out = []
    for row in dict.fromkeys(rows[c["cell"]] for c in cells):
        mine = [c for c in cells if rows[c["cell"]] == row]
        best = first_best(mine)
        assert best is not None  # every cell here has a validation accuracy
        boot = (stats.get("cells") or {}).get(best["cell"])
        test = boot["test_acc"] if boot else best.get("test_acc_mean", float("nan"))
        ci = (f", 95% CI {boot['test_acc_ci95_rows_runs'][0]:.3f} to {boot['test_acc_ci95_rows_runs'][1]:.3f}"
              if boot else "")
        out.append(f"Layer sweep by {sweep.get('by')} ({sweep.get('mode')}, {len(swept)} layer configs): for {row}, "
                   f"the best on validation accuracy is {best['layer_config']} (validation "
                   f"{float(best['val_acc_mean']):.3f}; test {float(test):.3f}{ci}).")
        facts.setdefault("best_in_layer_sweep", {})[row] = best["layer_config"]
    return out
