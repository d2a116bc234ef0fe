"""``g2d reproduce TABLE``: every cell of a paper table (or the JSRT benchmark), N seeds, reusing
finished cells; writes ``OUT/TABLE.md``, ``OUT/TABLE.csv`` and a fraction plot where the table sweeps
label fractions. See docs/reproduce.md."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from g2d.reproduce import list_experiments, list_scales

    p = sub.add_parser("reproduce", help="run a paper table's cells and print it beside the paper's",
                       description=__doc__)
    p.add_argument("table", choices=list_experiments())
    p.add_argument("--scale", default="small", choices=list_scales(),
                   help="small: synthetic data on CPU; shared: covid-notes + JSRT; paper: real sets; "
                        "validity: the validity experiment's longer synthetic pre-training; "
                        "validity-one-head: the same with one attention head and 480 steps")
    p.add_argument("--out", required=True, help="results store and tables (reused when rerun)")
    p.add_argument("--data-root", help="folder holding the public sets (scale paper)")
    p.add_argument("--shared", help="folder holding jsrt/ and covid-notes/ (scale shared)")
    p.add_argument("--seeds", type=int, help="seeds per cell (default: the scale's, else the table's)")
    p.add_argument("--columns", metavar="REGEX",
                   help="run only the columns whose name matches (e.g. 'lungs'); the table still "
                        "shows the others' finished cells")
    p.add_argument("--baselines", metavar="YAML",
                   help="peers' checkpoints for the table's baseline rows: a YAML mapping of row name to "
                        "KIND:PATH, or to {model: KIND:PATH, text_model: NAME|DIR} for the zero-shot tables "
                        "(docs/peers.md); rows without one show 'not given'")
    p.add_argument("--trust-pickle", action="store_true",
                   help="let a baseline checkpoint that needs pickled classes load (GLoRIA); trusted files only")
    p.add_argument("--collect-only", action="store_true",
                   help="run nothing: write the table from the cells finished so far")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import platform

    from g2d.downstream.results import run_info
    from g2d.reproduce import Runner, load_experiment, load_scale, prepare_jsrt

    exp = load_experiment(args.table)
    out = Path(args.out)
    jsrt_tables = None
    if args.shared and any(c.data.startswith("jsrt-") for c in exp.columns):
        jsrt_tables = out / "jsrt-tables"
        prepare_jsrt(args.shared, jsrt_tables)
    scale = load_scale(args.scale, args.data_root, args.shared, jsrt_tables)
    baselines: dict[str, str | dict[str, str]] = {}
    if args.baselines:
        import yaml

        try:
            with open(args.baselines, encoding="utf-8") as f:
                baselines = yaml.safe_load(f) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{args.baselines}: not YAML ({' '.join(str(err).split())})") from None
        if not isinstance(baselines, dict):
            raise ValueError(f"{args.baselines}: expected a mapping of row name to KIND:PATH or to "
                             "{model: KIND:PATH, text_model: NAME|DIR}")
        for row, v in baselines.items():
            ok = isinstance(v, str) or (isinstance(v, dict) and isinstance(v.get("model"), str)
                                        and set(v) <= {"model", "text_model"}
                                        and isinstance(v.get("text_model", ""), str))
            if not ok:
                raise ValueError(f"{args.baselines}: row {row!r}: expected KIND:PATH or {{model: KIND:PATH, "
                                 f"text_model: NAME|DIR}}, got {v!r}")
    if args.trust_pickle:
        scale.eval_args["*"] = {**scale.eval_args.get("*", {}), "trust-pickle": True}
    runner = Runner(exp, scale, out, seeds=args.seeds, device=args.device, progress=not args.no_progress,
                    columns=args.columns, collect_only=args.collect_only, baselines=baselines)
    results = runner.run()
    info = run_info()
    stand_ins = runner.stand_ins()
    paths = runner.write(results, {
        "scale": args.scale, "seeds": runner.seeds, "commit": info["commit"],
        "machine": f"{platform.machine()} {info['gpu'] or 'CPU'}",
        **({"data read as stand-ins (not the named sets)": "; ".join(f"{n} = {s}" for n, s in stand_ins.items())}
           if stand_ins else {})})
    print(paths["markdown"].read_text(encoding="utf-8"))
    failed = sum(1 for r in results if r.errors)  # cells not run (--columns, --collect-only) are not failures
    return 1 if failed else 0
