"""Phrase grounding on the data we have (issue 32, item 5): the synthetic set's report sentences and JSRT's
organ masks named by anatomical phrases, for the README demo's models, the covid-notes pre-training (G2D and
decoder none) and random init (the same configs, untrained), with paired differences G2D - decoder none.

    python benchmarks/phrase_grounding_runs.py --demo OUT_OF_G2D_DEMO --covid runs/jsrt/pretrain \\
        --shared ../shared/data --out runs/phrase_grounding

``--demo``: the folder ``g2d demo`` wrote (``g2d/export``, ``no_decoder/export``). ``--covid``: the ``shared``
scale's pre-training folder of ``g2d reproduce jsrt`` (each variant's ``variant.txt`` names it; seed 0).
Writes ``OUT/phrase_grounding.md`` (and each run's ``metrics.json`` under ``OUT/<set>/<model>``).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from g2d.checkpoint import export_model
from g2d.config import config_from_dict, load_config_file
from g2d.downstream import protocol
from g2d.downstream.phrase_grounding import PIPELINES
from g2d.factory import create_model
from g2d.metrics import bootstrap_interval
from g2d.reproduce import prepare_jsrt

METRICS = ("cnr", "miou", "iou", "dice", "hit")


def covid_variants(folder: Path) -> dict[str, Path]:
    """{"G2D": export, "decoder none": export} of seed 0 from a reproduce pre-training folder."""
    found = {}
    for d in sorted(folder.iterdir()):
        text = (d / "variant.txt").read_text().splitlines() if (d / "variant.txt").is_file() else []
        if text[1:2] == ["seed 0"] and (d / "export").is_dir():
            name = {"G2D (pseudo masks)": "G2D", "decoder none": "decoder none"}.get(text[0])
            if name:
                found[name] = d / "export"
    missing = {"G2D", "decoder none"} - set(found)
    if missing:
        raise SystemExit(f"{folder}: no seed-0 export of {sorted(missing)}")
    return found


def random_init(config: Path, out: Path) -> Path:
    """The model of ``config`` untrained (seed 0), exported."""
    cfg = config_from_dict(load_config_file(config))
    torch.manual_seed(0)
    return Path(export_model(create_model(cfg).eval(), cfg.to_dict(), out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--demo", type=Path, required=True)
    p.add_argument("--covid", type=Path, required=True)
    p.add_argument("--shared", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--synthetic", type=int, default=512, help="synthetic:N (test split: N/4 images)")
    a = p.parse_args()
    covid = covid_variants(a.covid)
    models = {
        "demo G2D": a.demo / "g2d" / "export",
        "demo decoder none": a.demo / "no_decoder" / "export",
        "demo random init": random_init(a.demo / "g2d" / "config.yaml", a.out / "models" / "demo-random"),
        "covid-notes G2D": covid["G2D"],
        "covid-notes decoder none": covid["decoder none"],
        "covid-notes random init": random_init(covid["G2D"].parent / "config.yaml", a.out / "models" / "covid-random"),
    }
    tables = prepare_jsrt(a.shared, a.out / "jsrt-tables")
    sets = {"synthetic": f"synthetic:{a.synthetic}", "jsrt": f"csv:{tables['jsrt-phrases']}"}
    results: dict[tuple[str, str, str], dict] = {}
    image_ids: dict[tuple[str, str, str], list[str]] = {}
    for pipeline in PIPELINES:
        for set_name, spec in sets.items():
            for name, path in models.items():
                out = a.out / pipeline / set_name / name.replace(" ", "-")
                if not (out / "metrics.json").is_file():
                    args = protocol.make("phrase-grounding", data=spec, model=str(path), out=str(out), split="test",
                                         pipeline=pipeline, num_workers=0, no_progress=True, figures=4)
                    protocol.run("phrase-grounding", args)
                results[pipeline, set_name, name] = json.loads((out / "metrics.json").read_text())
                with open(out / "per_pair.csv", newline="", encoding="utf-8") as fh:
                    image_ids[pipeline, set_name, name] = [row["image_id"] for row in csv.DictReader(fh)]
    lines = ["| pipeline | set | model | pairs | CNR | mIoU | IoU (Otsu) | Dice (Otsu) | hit rate |", "|" + "---|" * 9]
    for (pipeline, set_name, name), m in results.items():
        cells = [f"{m['intervals'][k]['mean']:.3f} [{m['intervals'][k]['low']:.3f}, {m['intervals'][k]['high']:.3f}]"
                 for k in METRICS]
        lines.append(f"| {pipeline} | {set_name} | {name} | {m['pairs']} | " + " | ".join(cells) + " |")
    lines += ["", "| pipeline | set | pre-training | metric | G2D - decoder none | 95% interval | reading |",
              "|" + "---|" * 7]
    for pipeline, set_name in ((pl, sn) for pl in PIPELINES for sn in sets):
        for pre in ("demo", "covid-notes"):
            ga, gb = results[pipeline, set_name, f"{pre} G2D"], results[pipeline, set_name, f"{pre} decoder none"]
            for k in METRICS:
                if k not in ga["per_image"] or k not in gb["per_image"]:
                    continue
                if ga["per_image"]["ids_digest"] != gb["per_image"]["ids_digest"]:
                    raise SystemExit(f"{pipeline} {set_name} {pre}: the two models scored different pairs")
                # the pairs of one image resampled together, as each run's own intervals
                d = np.array(ga["per_image"][k]) - np.array(gb["per_image"][k])
                r = bootstrap_interval(d, image_ids[pipeline, set_name, f"{pre} G2D"], 10_000)
                reading = "G2D higher" if r["low"] > 0 else "G2D lower" if r["high"] < 0 else "not resolved"
                lines.append(f"| {pipeline} | {set_name} | {pre} | {k} | {r['mean']:+.3f} | "
                             f"[{r['low']:+.3f}, {r['high']:+.3f}] | {reading} |")
    phrases = sorted(results["biovil", "jsrt", "covid-notes G2D"]["per_finding"])
    per_finding = ["", "Per phrase (JSRT, biovil pipeline, mean hit rate / mIoU):", "",
                   "| model | " + " | ".join(phrases) + " |", "|" + "---|" * (1 + len(phrases))]
    for name in models:
        pf = results["biovil", "jsrt", name]["per_finding"]
        per_finding.append(f"| {name} | " + " | ".join(f"{pf[f]['hit']['mean']:.2f} / {pf[f]['miou']['mean']:.3f}"
                                                         for f in sorted(pf)) + " |")
    text = "\n".join(lines + per_finding) + "\n"
    (a.out / "phrase_grounding.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
