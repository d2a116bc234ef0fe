import dataclasses
import json
from pathlib import Path

import pytest

from g2d.data.labelled.specs import open_dataset
from g2d.reproduce import (
    PRETRAIN_METRICS,
    CellResult,
    Column,
    Difference,
    Experiment,
    Gate,
    Row,
    Runner,
    Scale,
    format_csv,
    format_differences,
    format_fraction_tables,
    format_gates,
    format_markdown,
    list_experiments,
    load_experiment,
    load_scale,
    plot_fractions,
    prepare_jsrt,
    pretrain_metrics,
)
from g2d.reproduce.spec import _LazyFill

DATA = Path(__file__).parent / "data"


def _toy() -> Experiment:
    cols = [Column("Seg 1%", "segmentation", "siim", "dice", 0.01), Column("Det 1%", "detection", "rsna", "map", 0.01)]
    rows = [Row("Random", model="random", paper=[9.0, "<1"]),
            Row("Ours", pretrain={}, skip=["detection"], paper=["65.6±1.7", None])]
    return Experiment("toy", "Toy table", cols, rows, seeds=3)


def test_markdown_matches_hand_written_table():
    results = [CellResult("Random", "Seg 1%", [8.0, 10.0, 12.0], []),
               CellResult("Random", "Det 1%", [1.5], ["seed 1: boom"]),
               CellResult("Ours", "Seg 1%", [60.0, 60.0], []),
               CellResult("Ours", "Det 1%", [], [])]
    md = format_markdown(_toy(), results, {"scale": "small", "commit": "abc1234"})
    assert md == (DATA / "expected_table.md").read_text()
    no_paper = _toy()
    for r in no_paper.rows:
        r.paper = None
    assert format_markdown(no_paper, results, {}).splitlines()[2:5] == [
        "| method | Seg 1% | Det 1% |", "|---|---|---|", "| Random | 10.0 ± 2.0 (n=3) | 1.5 (n=1) |"]
    lines = format_csv(_toy(), results).splitlines()
    assert lines[1].split(",")[:9] == ["Random", "Seg 1%", "segmentation", "siim", "0.01", "dice", "10.0000",
                                       "2.0000", "3"]


def test_the_one_head_validity_scale_differs_from_validity_by_heads_and_steps_only():
    from g2d.reproduce import list_scales

    base, one = load_scale("validity"), load_scale("validity-one-head")
    assert {"small", "shared", "paper", "validity", "validity-one-head"} <= set(list_scales())
    assert one.pretrain == {**base.pretrain, "model.pool.heads": 1, "train.max_steps": 480}
    assert (one.preset, one.seeds, one.eval_args) == (base.preset, base.seeds, base.eval_args)
    assert dict(one.data) == dict(base.data)


def test_every_shipped_experiment_loads_and_fits_its_scales(tmp_path):
    names = list_experiments()
    assert {"table1", "table4", "table5a", "table5f", "table8", "jsrt"} <= set(names)
    small = load_scale("small")
    shared = load_scale("shared", shared=tmp_path, jsrt_tables=tmp_path)
    paper = load_scale("paper", data_root=tmp_path)
    validity = load_scale("validity")
    own = {"jsrt": shared, "decoder-transfer": shared, "validity": validity}  # tables of one scale
    for name in names:
        exp = load_experiment(name)
        scale = own.get(name, paper)
        for c in exp.columns:
            if c.task == "pretrain":  # reads the pre-training run, no data set
                continue
            assert scale.data.spec(c.data)
            if name not in own:
                assert small.data.spec(c.data).startswith("synthetic")
            for sc in [scale, small] if name not in own else [scale]:
                # every cell's numbers are numbers (PyYAML reads `lr: 2e-3` as a string; the
                # validity experiment's segmentation cells all failed on it)
                args = Runner(exp, sc, tmp_path).cell_args(exp.rows[0], c, "random", 0)
                for f in dataclasses.fields(args):
                    if str(f.type).split(" |")[0] in ("int", "float") and getattr(args, f.name) is not None:
                        assert isinstance(getattr(args, f.name), (int, float)), (name, c.name, f.name)
        for r in exp.rows:  # every pre-training variant is a valid config at every scale
            if r.pretrain is not None:
                Runner(exp, small, tmp_path).pretrain_config(r)
    with pytest.raises(ValueError, match="--data-root"):
        load_scale("paper").data.spec("siim")


def test_prepare_jsrt_tables(jsrt_dir, tmp_path, monkeypatch):
    """Image and mask paths are absolute, also for a relative --shared (the documented
    `--shared ../shared/data`): a relative path would be read from the table's own folder."""
    monkeypatch.chdir(jsrt_dir.parent.parent)
    tables = prepare_jsrt(Path(jsrt_dir.parent.name), tmp_path)
    assert len(open_dataset(f"csv:{tables['jsrt-heart']}", "test")) == 37
    rows = tables["jsrt-lungs"].read_text().splitlines()
    assert rows[0] == "image,mask,split" and len(rows) == 248
    assert sum(r.endswith(",train") for r in rows) == 173
    first = rows[1].split(",")
    assert Path(first[0]).is_file() and all(Path(m).is_file() for m in first[1].split(";"))


def _mini_scale(tiny_text_dir) -> Scale:
    return Scale("test", "tiny", {
        "model.text.model": str(tiny_text_dir), "model.text.freeze_layers": 1, "model.image_size": 64,
        "model.pool.width": 48, "data.resize": 64, "data.synthetic_samples": 16, "train.batch_size": 8,
        "train.warmup_steps": 1, "train.max_steps": 3, "train.epochs": 10},
        _LazyFill({"syn": "synthetic:16"}, lambda v: v),
        {"*": {"num-workers": 0}, "segmentation": {"epochs": 1, "image-size": 64, "batch-size": 8}}, seeds=2)


@pytest.mark.slow
def test_runner_runs_two_cells_and_resumes_a_half_done_table(tiny_text_dir, tmp_path):
    from g2d.downstream import protocol
    from g2d.reproduce.runner import _pretrain

    exp = Experiment("mini", "Mini", [Column("enc", "segmentation", "syn", "dice", 0.5, {"transfer": "encoder"}),
                                      Column("enc-dec", "segmentation", "syn", "dice", 0.5,
                                             {"transfer": "encoder-decoder"})],
                     [Row("G2D", pretrain={})], seeds=2)
    calls = {"task": 0, "pretrain": 0}

    def task(name, args):
        calls["task"] += 1
        return protocol.run(name, args)

    def pre(cfg, d):
        calls["pretrain"] += 1
        return _pretrain(cfg, d, "cpu", False)

    runner = Runner(exp, _mini_scale(tiny_text_dir), tmp_path, device="cpu", progress=False,
                    run_task=task, run_pretrain=pre)
    results = runner.run()
    assert calls == {"task": 4, "pretrain": 1}
    assert all(len(r.values) == 2 and not r.errors for r in results)
    assert all(0.0 <= v <= 100.0 for r in results for v in r.values)
    paths = runner.write(results)
    assert "| G2D |" in paths["markdown"].read_text()

    # half-done: lose one seed of one cell; only that cell reruns, pre-training is reused
    cells = sorted((tmp_path / "cells").glob("*/metrics.json"))
    assert len(cells) == 4
    lost = cells[0]
    before = json.loads(lost.read_text())
    lost.unlink()
    again = Runner(exp, _mini_scale(tiny_text_dir), tmp_path, device="cpu", progress=False,
                   run_task=task, run_pretrain=pre).run()
    assert calls == {"task": 5, "pretrain": 1}
    assert json.loads(lost.read_text())["dice"] == pytest.approx(before["dice"])  # deterministic
    assert [r.values for r in again] == [r.values for r in results]


def test_runner_goes_seed_by_seed_and_reports_a_failed_pretraining(tmp_path):
    """Fake tasks: the order of runs, the reuse of pre-training, and a failed variant's cells."""
    exp = _toy()
    exp.rows.append(Row("Broken", pretrain={"model.pool.heads": 2}))
    order = []

    def task(name, args):
        order.append((args.model, name, args.seed))
        out = Path(args.out)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"dice": 0.5, "map": 0.25}))
        return {}

    def pre(cfg, d):
        if cfg.model.pool.heads == 2:
            raise RuntimeError("out of memory")
        return d / "export"

    small = load_scale("small")
    results = Runner(exp, small, tmp_path, seeds=2, run_task=task, run_pretrain=pre).run()
    seeds = [s for _, _, s in order]
    assert seeds == sorted(seeds) and len(order) == 2 * 3  # random: 2 cells, ours: 1 (detection skipped)
    by = {(r.row, r.column): r for r in results}
    assert by["Ours", "Seg 1%"].values == [50.0, 50.0] and by["Random", "Det 1%"].values == [25.0, 25.0]
    assert by["Ours", "Det 1%"].values == [] and not by["Ours", "Det 1%"].errors  # skipped
    for col in ("Seg 1%", "Det 1%"):
        assert by["Broken", col].errors == ["pretrain (seed 0): out of memory"]


def test_columns_filter_and_collect_only_run_nothing_else(tmp_path):
    """--columns runs the matching columns only; --collect-only runs nothing (no pre-training either)
    and the table shows finished cells, '/' for skipped ones and 'not run' for the rest."""
    exp = _toy()
    ran, pretrained = [], []

    def task(name, args):
        ran.append((name, args.seed))
        out = Path(args.out)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"dice": 0.5, "map": 0.25}))
        return {}

    def pre(cfg, d):
        pretrained.append(d)
        (d / "export").mkdir(parents=True)
        (d / "export" / "model.safetensors").write_bytes(b"")
        return d / "export"

    small = load_scale("small")
    Runner(exp, small, tmp_path, seeds=1, run_task=task, run_pretrain=pre, columns="^Seg").run()
    assert sorted(ran) == [("segmentation", 0), ("segmentation", 0)] and len(pretrained) == 1

    def fail(*a):
        pytest.fail("collect_only ran something")

    results = Runner(exp, small, tmp_path, seeds=2, run_task=fail, run_pretrain=fail, collect_only=True,
                     progress=False).run()  # --no-progress does not change the cells' keys
    by = {(r.row, r.column): r for r in results}
    assert by["Ours", "Seg 1%"].values == [50.0] and by["Random", "Seg 1%"].values == [50.0]  # seed 1 not run
    assert by["Random", "Det 1%"].values == [] and not any(r.errors for r in results)
    table = format_markdown(exp, results, {})
    assert "| Random | 50.0 (n=1) | 9.0 | not run | <1 |" in table
    assert "| Ours | 50.0 (n=1) | 65.6±1.7 | / |  |" in table


def test_fraction_plot_leaves_out_panels_without_results(tmp_path):
    cols = [Column(f"{t} {f}", "segmentation", "syn", "dice", f, {"transfer": t})
            for t in ("encoder", "encoder-decoder") for f in (0.1, 1.0)]
    exp = Experiment("sweep", "Sweep", cols, [Row("A", pretrain={}), Row("B", model="random")], seeds=1)
    empty = [CellResult(r.name, c.name, [], []) for r in exp.rows for c in cols]
    assert plot_fractions(exp, empty, tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()
    part = [CellResult(r.name, c.name, [50.0, 60.0] if c.args["transfer"] == "encoder" else [], [])
            for r in exp.rows for c in cols]
    png = plot_fractions(exp, part, tmp_path / "part.png")
    from PIL import Image

    with Image.open(png) as im:  # one panel (4.5 in wide at 90 dpi), not two
        assert im.size[0] == round(4.5 * 90)


def test_fraction_tables_put_fractions_in_columns():
    cols = [Column(f"{t} {f}", "segmentation", "syn", "dice", f, {"transfer": t})
            for t in ("encoder", "encoder-decoder") for f in (0.02, 1.0)]
    cols.append(Column("det", "detection", "syn", "map", 0.1))  # not a sweep: left out
    b = Row("B", model="random", skip=["encoder-decoder 0.02", "encoder-decoder 1.0"])
    exp = Experiment("sweep", "Sweep", cols, [Row("A", pretrain={}), b], seeds=2)
    values = {("A", "encoder 0.02"): [50.0, 60.0], ("A", "encoder 1.0"): [90.0], ("B", "encoder 0.02"): [40.0]}
    results = [CellResult(r.name, c.name, values.get((r.name, c.name), []), []) for r in exp.rows for c in cols]
    assert format_fraction_tables(exp, results) == (
        "# Sweep: by label fraction\n\n"
        "## segmentation on syn (dice)\n\n"
        "| method | arguments | 2 % | 100 % |\n"
        "|---|---|---|---|\n"
        "| A | transfer=encoder | 55.0 ± 7.1 (n=2) | 90.0 (n=1) |\n"
        "| A | transfer=encoder-decoder | not run | not run |\n"
        "| B | transfer=encoder | 40.0 (n=1) | not run |\n\n"
        "Mean ± sample std over seeds (n = finished seeds); 'not run' = no finished seed yet.\n")
    assert format_fraction_tables(_toy(), []) is None


def test_a_cell_whose_model_changed_runs_again(tmp_path):
    """A finished cell is reused only while its data and model files are the ones it ran on."""
    exp = Experiment("mini", "Mini", [Column("enc", "linear", "syn", "auc", 0.5, {})],
                     [Row("mine", model=str(tmp_path / "model.pt"))], seeds=1)
    (tmp_path / "model.pt").write_bytes(b"v1")
    calls = []

    def task(name, args):
        calls.append(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps({"auc": 0.5 + 0.1 * len(calls)}))

    scale = Scale("s", "tiny", {}, _LazyFill({"syn": "synthetic:16"}, lambda v: v), {}, 1)
    first = Runner(exp, scale, tmp_path / "out", progress=False, run_task=task).run()
    again = Runner(exp, scale, tmp_path / "out", progress=False, run_task=task).run()
    assert len(calls) == 1 and again[0].values == first[0].values
    import os

    st = (tmp_path / "model.pt").stat()
    (tmp_path / "model.pt").write_bytes(b"v2")  # retrained in place
    os.utime(tmp_path / "model.pt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    stale = Runner(exp, scale, tmp_path / "out", progress=False, run_task=task, collect_only=True).run()
    assert stale[0].errors and "other images or weights" in stale[0].errors[0]
    third = Runner(exp, scale, tmp_path / "out", progress=False, run_task=task).run()
    assert len(calls) == 2 and third[0].values != first[0].values


def test_pretrain_metrics_average_the_last_tenth_against_ln_b():
    history = [{"step": 10 * i, "vla": v} for i, v in enumerate([3.5, 3.0, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0,
                                                                  0.8, 1.2, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])]
    m = pretrain_metrics(history, batch_size=32)
    assert m["contrastive_end"] == pytest.approx(1.0)  # the last 2 of 20 entries
    assert m["ln_batch"] == pytest.approx(3.4657, abs=1e-4)
    assert m["contrastive_over_ln_b"] == pytest.approx(1.0 / 3.4657, abs=1e-4)
    assert (m["steps"], m["from_step"]) == (190, 180)
    with pytest.raises(ValueError):
        pretrain_metrics([], 32)


def test_gate_checks_bounds_and_other_columns():
    g = Gate("pointing >= prior + 0.2", "pointing", min=0.6, than="prior", plus=0.2)
    assert g.check({"pointing": 0.7, "prior": 0.4}) is True
    assert g.check({"pointing": 0.7, "prior": 0.6}) is False  # not 0.2 above the prior
    assert g.check({"pointing": 0.5, "prior": 0.1}) is False  # below the floor
    assert g.check({"pointing": 0.7}) is None and g.check({"prior": 0.1}) is None
    assert Gate("iou", "iou", than="prior", times=2.0).check({"iou": 0.2, "prior": 0.1}) is True
    assert Gate("loss", "loss", max=0.5).check({"loss": 0.51}) is False


def test_pretrain_seeds_train_once_per_seed_and_gates_judge_each_seed(tmp_path):
    """pretrain_seeds: one pre-training per (variant, seed); the 'pretrain' column reads each run's
    pretrain_metrics.json; the gates table marks the seed that fails and the verdict says so."""
    cols = [Column("loss/lnB", "pretrain", "-", "contrastive_over_ln_b", scale=1, digits=3),
            Column("Seg", "segmentation", "siim", "dice")]
    rows = [Row("Ours", pretrain={}), Row("Random", model="random", skip=["pretrain"])]
    exp = Experiment("v", "V", cols, rows, seeds=2, pretrain_seeds=True,
                     gates=[Gate("loss <= 0.5 ln B", "loss/lnB", max=0.5)])
    seeds_trained = []

    def pre(cfg, d):
        seeds_trained.append(cfg.train.seed)
        (d / "export").mkdir(parents=True)
        (d / "export" / "model.safetensors").write_bytes(str(cfg.train.seed).encode())
        ratio = 0.4 if cfg.train.seed == 0 else 0.7  # seed 1 stays near chance
        (d / PRETRAIN_METRICS).write_text(json.dumps({"contrastive_over_ln_b": ratio}))
        return d / "export"

    def task(name, args):
        out = Path(args.out)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps({"dice": 0.5}))
        return {}

    runner = Runner(exp, load_scale("small"), tmp_path, run_task=task, run_pretrain=pre)
    results = runner.run()
    assert seeds_trained == [0, 1] and runner.pretrain_dir(rows[0], 0) != runner.pretrain_dir(rows[0], 1)
    by = {(r.row, r.column): r for r in results}
    assert by["Ours", "loss/lnB"].values == [0.4, 0.7] and by["Ours", "loss/lnB"].seeds == [0, 1]
    assert by["Random", "Seg"].values == [50.0, 50.0]
    gates = format_gates(exp, results)
    assert "| Ours | 0 | pass (0.400) |" in gates and "| Ours | 1 | FAIL (0.700) |" in gates and "Random" not in gates
    assert "NOT every pre-trained seed passes" in gates
    # nothing finished, or a seed short: "missing", never a valid verdict
    empty = format_gates(exp, [CellResult(r.name, c.name, [], []) for r in rows for c in cols])
    assert "| Ours | 0 | missing |" in empty and "| Ours | 1 | missing |" in empty
    assert "NOT every" in empty
    assert "| Ours | 2 | missing |" in format_gates(exp, results, seeds=3)
    paths = runner.write(results)
    assert "| Ours | 0.550 ± 0.212 (n=2) |" in paths["markdown"].read_text()
    assert "## Validity gates" in paths["markdown"].read_text()
    assert format_gates(_toy(), results) is None


def test_gates_show_what_they_compared():
    """A times gate shows the ratio, a plus gate the margin, a bound the value (validity.yaml's kinds)."""
    values = {"iou": 0.157, "iou prior": 0.085, "pointing": 0.9, "pointing prior": 0.35, "loss": 0.36}
    ratio = Gate("IoU >= 2x prior", "iou", than="iou prior", times=2.0)
    margin = Gate("pointing >= prior + 0.2", "pointing", than="pointing prior", plus=0.2)
    bound = Gate("loss <= 0.5", "loss", max=0.5)
    assert (ratio.check(values), ratio.measured(values)) == (False, "1.85x")
    assert (margin.check(values), margin.measured(values)) == (True, "+0.550")
    assert (bound.check(values), bound.measured(values)) == (True, "0.360")
    assert ratio.measured({"iou": 0.1}) == "" and ratio.check({"iou": 0.1}) is None


def _spelling_probe(exp, scale, out, calls):
    """A Runner over ``out`` whose fake pre-training and tasks count their calls."""
    def pre(cfg, d):
        calls.append("pretrain")
        (d / "export").mkdir(parents=True)
        (d / "export" / "model.safetensors").write_bytes(b"w")
        return d / "export"

    def task(name, args):
        calls.append(name)
        Path(args.out).mkdir(parents=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps({"dice": 0.5}))
        return {}

    return Runner(exp, scale, out, seeds=1, run_task=task, run_pretrain=pre)


def test_a_store_is_found_however_its_paths_are_spelled(tmp_path, monkeypatch):
    """--out runs/x from the parent folder and --out /abs/runs/x (and data specs likewise) key the
    same pre-training and cells; a store written before keys were made absolute is still found when
    the command spells its paths as it did then (g2d.fingerprint.absolute_paths)."""
    import g2d.reproduce.runner as rp

    (tmp_path / "sets").mkdir()
    (tmp_path / "sets" / "labels.csv").write_text("image,label\n")
    exp = Experiment("s", "S", [Column("Seg", "segmentation", "own", "dice")], [Row("Ours", pretrain={})])
    scale = Scale("t", "tiny", {"data.spec": "csv:sets/labels.csv"}, _LazyFill({"own": "csv:sets/labels.csv?x=1"},
                                                                               lambda v: v), {}, 1)
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []
    first = _spelling_probe(exp, scale, "store", calls).run()
    assert calls == ["pretrain", "segmentation"] and first[0].values == [50.0]
    absolute = Scale("t", "tiny", {"data.spec": f"csv:{tmp_path}/sets/labels.csv"},
                     _LazyFill({"own": f"csv:{tmp_path}/sets/labels.csv?x=1"}, lambda v: v), {}, 1)
    again = _spelling_probe(exp, absolute, tmp_path / "store", calls).run()
    assert calls == ["pretrain", "segmentation"] and again[0].values == [50.0]  # nothing ran again

    # an old store (keys of the paths as spelled) is found by the same spelling
    monkeypatch.setattr(rp, "absolute_paths", lambda key: key)
    _spelling_probe(exp, scale, "old", calls).run()
    assert calls == ["pretrain", "segmentation"] * 2
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    _spelling_probe(exp, scale, "old", calls).run()
    assert calls == ["pretrain", "segmentation"] * 2
    # a stale result under the old key is reported as stale, not as "not run"
    inputs = next((tmp_path / "old" / "cells").glob("*/inputs.json"))
    inputs.write_text(json.dumps({"data_id": "other", "model_id": "other"}))
    stale = _spelling_probe(exp, scale, "old", calls)
    stale.collect_only = True
    assert "computed from other images" in stale.run()[0].errors[0]


def test_a_store_survives_fields_added_since_it_ran(tmp_path, monkeypatch):
    """A config field or protocol flag added after a store was written (at its default: the old
    behaviour) changes the keys; the pre-training run is found by its config.yaml and the cell by its
    key.json, each read with the new field at its default. A changed value still reruns."""
    from g2d.config import G2DConfig, save_config
    from g2d.downstream import protocol

    exp = Experiment("s", "S", [Column("Seg", "segmentation", "siim", "dice")], [Row("Ours", pretrain={})])
    calls: list[str] = []

    def probe(scale):
        runner = _spelling_probe(exp, scale, tmp_path, calls)
        trained = runner.run_pretrain
        runner.run_pretrain = lambda cfg, d: (save_config(cfg, d / "config.yaml"), trained(cfg, d))[1]
        return runner

    scale = load_scale("small")
    with monkeypatch.context() as m:  # the code before model.pool.key_position and a protocol flag existed
        to_dict, key_fields = G2DConfig.to_dict, protocol.key_fields

        def old_dict(cfg):
            d = to_dict(cfg)
            del d["model"]["pool"]["key_position"]
            return d

        m.setattr(G2DConfig, "to_dict", old_dict)
        m.setattr(protocol, "key_fields", lambda a: {k: v for k, v in key_fields(a).items() if k != "update_bn"})
        assert probe(scale).run()[0].values == [50.0] and calls == ["pretrain", "segmentation"]
    assert "key_position" not in (next((tmp_path / "pretrain").iterdir()) / "config.yaml").read_text()
    again = probe(scale).run()
    assert calls == ["pretrain", "segmentation"] and again[0].values == [50.0]  # nothing ran again
    # a value that differs is another run
    other = Scale(scale.name, scale.preset, {**scale.pretrain, "model.pool.key_position": False}, scale.data,
                  scale.eval_args, scale.seeds)
    probe(other).run()
    assert calls == ["pretrain", "segmentation"] * 2


def test_gates_must_name_columns_of_their_table(tmp_path):
    import yaml

    doc = {"columns": [{"name": "a", "task": "segmentation", "data": "siim", "metric": "dice"}],
           "rows": [{"name": "r", "model": "random"}], "gates": [{"name": "g", "column": "b", "max": 1}]}
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="gate 'g' names columns \\['b'\\]"):
        load_experiment(path)


def test_a_cell_reruns_when_its_prompt_file_changes(tmp_path):
    """The prompt file's text is part of a zero-shot cell's inputs, like its data and model files."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("*\tthere is {finding}\tno {finding}\n")
    exp = Experiment("zs", "ZS", [Column("auc", "zeroshot", "syn", "auc", 1.0, {"prompts": str(prompts)})],
                     [Row("mine", model="random")], seeds=1)
    calls = []

    def task(name, args):
        calls.append(args.prompts)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps({"auc": 0.5 + 0.1 * len(calls)}))

    scale = Scale("s", "tiny", {}, _LazyFill({"syn": "synthetic:16"}, lambda v: v), {}, 1)
    Runner(exp, scale, tmp_path / "out", progress=False, run_task=task).run()
    Runner(exp, scale, tmp_path / "out", progress=False, run_task=task).run()
    assert len(calls) == 1
    prompts.write_text("*\tthere is a {finding}\tthere is no {finding}\n")
    again = Runner(exp, scale, tmp_path / "out", progress=False, run_task=task).run()
    assert len(calls) == 2 and again[0].values == [70.0]


def test_shipped_synthetic_prompts_name_every_location_the_reports_use():
    from g2d.data.synthetic import FINDING_LOCATIONS, FINDINGS
    from g2d.inference.zeroshot import class_prompts, load_prompts

    table = class_prompts(list(FINDINGS), load_prompts("synthetic"))  # also checks every pair's polarity
    for finding in ("opacity", "nodule", "effusion", "pneumothorax"):
        named = {loc for loc in FINDING_LOCATIONS[finding] for pos, _ in table[finding] if loc in pos}
        assert named == set(FINDING_LOCATIONS[finding]), finding


def test_baseline_rows_run_a_given_peer_and_say_not_given_otherwise(tmp_path):
    """table1/table4 carry the paper's peer rows; --baselines (row -> KIND:PATH) fills them; a row
    without a checkpoint is shown as 'not given' and runs nothing."""
    exp = load_experiment("table1")
    peers = [r.name for r in exp.rows if r.baseline]
    assert {"ConVIRT", "GLoRIA", "MGCA", "M-FLAG", "MedKLIP (frozen encoder)"} <= set(peers)
    assert load_experiment("table4").rows[2].baseline
    exp = Experiment("t", "T", [Column("Seg", "segmentation", "siim", "dice", 0.01)],
                     [Row("MGCA", baseline=True, paper=[49.7]), Row("GLoRIA", baseline=True, paper=[35.8])], seeds=1)
    ran = []

    def task(name, args):
        ran.append(args.model)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps({"dice": 0.5}))

    runner = Runner(exp, load_scale("small"), tmp_path, seeds=1, run_task=task,
                    baselines={"MGCA": "mgca:/w/resnet_50.ckpt"})
    results = runner.run()
    assert ran == ["mgca:/w/resnet_50.ckpt"]
    table = format_markdown(exp, results, {})
    assert "| MGCA | 50.0 (n=1) | 49.7 |" in table and "| GLoRIA | not given | 35.8 |" in table
    with pytest.raises(ValueError, match="no baseline row"):
        Runner(exp, load_scale("small"), tmp_path, baselines={"CLIP": "x"})


def test_zero_shot_tables_take_a_peer_with_its_text_model(tmp_path):
    """table2a/2b carry the paper's peer rows; a {model, text_model} entry passes the text model to the
    zero-shot and grounding cells only."""
    assert {"GLoRIA", "BioViL", "MedKLIP"} <= {r.name for r in load_experiment("table2a").rows if r.baseline}
    assert {"ConVIRT", "BioViL", "KAD"} <= {r.name for r in load_experiment("table2b").rows if r.baseline}
    exp = Experiment("t", "T", [Column("ZS", "zeroshot", "rsna", "auc"), Column("Lin", "linear", "rsna", "auc")],
                     [Row("BioViL", baseline=True, paper=[82.8, None])], seeds=1)
    seen = []

    def task(name, args):
        seen.append((name, args.model, getattr(args, "text_model", "n/a")))
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps({"auc": 0.8}))

    Runner(exp, load_scale("small"), tmp_path, seeds=1, run_task=task,
           baselines={"BioViL": {"model": "biovil:/w/img.pt", "text_model": "/w/cxr-bert"}}).run()
    assert seen == [("zeroshot", "biovil:/w/img.pt", "/w/cxr-bert"), ("linear", "biovil:/w/img.pt", "n/a")]


def test_baselines_are_checked_row_by_row(tmp_path):
    exp = load_experiment("table1")
    with pytest.raises(ValueError, match=r"row 'MGCA': '/w/resnet_50.ckpt' is not KIND:PATH"):
        Runner(exp, load_scale("small"), tmp_path, baselines={"MGCA": "/w/resnet_50.ckpt"})
    with pytest.raises(ValueError, match="text_model is for zero-shot and grounding cells"):
        Runner(exp, load_scale("small"), tmp_path, baselines={"MGCA": {"model": "mgca:/w.ckpt", "text_model": "x"}})


def test_baselines_file_errors_are_one_line(tmp_path, capsys):
    from g2d.cli import main

    bad = tmp_path / "b.yaml"
    for text, words in (("MGCA: [unclosed", "not YAML"), ("MGCA: {model: 'mgca:/w', text-model: x}", "row 'MGCA'"),
                        ("BioViL: {model: 'biovil:/w', text_model: [a, b]}", "row 'BioViL'")):
        bad.write_text(text)
        assert main(["reproduce", "table2b", "--scale", "small", "--out", str(tmp_path / "o"), "--collect-only",
                     "--baselines", str(bad)]) == 2
        assert words in capsys.readouterr().err


# ------------------------------------------------------------------ label subsets and paired differences


def test_subsets_run_paired_cells_and_differences_give_intervals(tmp_path):
    """A column with ``subsets: 3`` runs --subset 0, 1, 2 per seed; a difference between rows pairs
    the cells by (seed, subset) and reads their per-image scores; one between columns compares within
    each row. Hand-made scores: row A is 0.1 above row B on every image, so the difference is +10
    with an interval of exactly [+10, +10]; columns that differ by noise only are 'not resolved'."""
    cols = [Column("Seg 10%", "segmentation", "siim", "dice", 0.1, subsets=3),
            Column("Seg 10% other", "segmentation", "siim", "dice", 0.1, subsets=3, args={"lr": 1.0})]
    rows = [Row("A", model="random"), Row("B", model="imagenet")]
    exp = Experiment("d", "D", cols, rows, seeds=2, differences=[
        Difference("A", "B"), Difference("Seg 10%", "Seg 10% other", between="columns", rows=["A"])])
    calls = []

    def task(name, args):
        calls.append((args.model, args.seed, args.subset, args.lr))
        import numpy as np

        rng = np.random.default_rng([args.seed, args.subset, int(args.lr * 1000)])
        base = np.linspace(0.2, 0.8, 12) + 0.05 * rng.standard_normal(12) * (args.lr == 1.0)
        scores = base + (0.1 if args.model == "random" else 0.0)
        Path(args.out).mkdir(parents=True)
        (Path(args.out) / "metrics.json").write_text(json.dumps(
            {"dice": float(scores.mean()), "per_image": {"dice": scores.tolist(), "ids_digest": "same"}}))
        return {}

    runner = Runner(exp, load_scale("small"), tmp_path, seeds=2, run_task=task)
    results = runner.run()
    assert sorted({(s, k) for _, s, k, _ in calls}) == [(s, k) for s in (0, 1) for k in (0, 1, 2)]
    by = {(r.row, r.column): r for r in results}
    assert len(by["A", "Seg 10%"].values) == 6 and sorted(by["A", "Seg 10%"].per_image) == \
        [(s, k) for s in (0, 1) for k in (0, 1, 2)]
    table = format_differences(exp, results, n_boot=2000)
    assert "| A - B | Seg 10% | 6 | 12 | +10.0 | [+10.0, +10.0] | a > b |" in table
    line = next(x for x in table.splitlines() if x.startswith("| Seg 10% - Seg 10% other | A |"))
    assert line.endswith("| not resolved |")
    assert "| Seg 10% - Seg 10% other | B |" not in table  # rows: [A]
    assert "## Paired differences" in runner.write(results)["markdown"].read_text()
    # units scored on other test images are never paired
    by["B", "Seg 10%"].per_image = {u: (v, "other") for u, (v, _) in by["B", "Seg 10%"].per_image.items()}
    assert "| A - B | Seg 10% |" not in format_differences(exp, results)


def test_a_gate_binds_only_its_rows():
    """Issue 28: the pseudo-mask IoU gate binds the G2D rows only; another row shows its value as
    'not bound' and does not fail the verdict."""
    cols = [Column("iou", "attention", "probe", "iou", scale=1), Column("prior", "attention", "probe", "iou_prior",
                                                                       scale=1)]
    rows = [Row("G2D", pretrain={}), Row("none", pretrain={"model.decoder.mode": "none"})]
    exp = Experiment("g", "G", cols, rows, seeds=1, gates=[Gate("IoU >= 2x prior", "iou", than="prior", times=2.0,
                                                                 rows=["G2D"])])
    results = [CellResult("G2D", "iou", [0.3], [], [0]), CellResult("G2D", "prior", [0.1], [], [0]),
               CellResult("none", "iou", [0.15], [], [0]), CellResult("none", "prior", [0.1], [], [0])]
    gates = format_gates(exp, results)
    assert "| G2D | 0 | pass (3.00x) |" in gates and "| none | 0 | not bound (1.50x) |" in gates
    assert "the comparison is valid" in gates


def test_experiment_files_check_subsets_gates_and_differences(tmp_path):
    base = {"name": "x", "columns": [{"name": "a", "task": "segmentation", "data": "siim", "metric": "dice",
                                      "subsets": 5}],
            "rows": [{"name": "r", "model": "random"}]}
    for extra, message in (({"gates": [{"name": "g", "column": "a", "min": 1}]}, "several label subsets"),
                           ({"differences": [{"a": "r", "b": "s"}]}, "rows the table does not have"),
                           ({"differences": [{"a": "a", "b": "a", "between": "cells"}]}, "rows or columns")):
        path = tmp_path / "x.yaml"
        path.write_text(json.dumps({**base, **extra}))
        with pytest.raises(ValueError, match=message):
            load_experiment(path)


def test_paired_bootstrap_intervals_by_hand():
    import numpy as np

    from g2d.metrics import paired_bootstrap

    a = np.linspace(0, 1, 30).reshape(3, 10)
    assert paired_bootstrap(a, a) == {"mean": 0.0, "low": 0.0, "high": 0.0, "units": 3, "images": 10}
    r = paired_bootstrap(a + 0.25, a)
    assert (r["mean"], r["low"], r["high"]) == pytest.approx((0.25, 0.25, 0.25))
    # one unit: the image level alone, whose 95 % half-width is about 1.96 sd / sqrt(N)
    d = np.random.default_rng(0).standard_normal((1, 400))
    r = paired_bootstrap(d, np.zeros_like(d))
    assert (r["high"] - r["low"]) / 2 == pytest.approx(1.96 * d.std() / 20, rel=0.1)
    # units that disagree widen the interval beyond the image level
    spread = np.vstack([d[0, :100] + s for s in (-1.0, 0.0, 1.0, 2.0)])
    wide = paired_bootstrap(spread, np.zeros_like(spread))
    narrow = paired_bootstrap(spread - spread.mean(1, keepdims=True), np.zeros_like(spread))
    assert wide["high"] - wide["low"] > 3 * (narrow["high"] - narrow["low"])
    with pytest.raises(ValueError, match="one shape"):
        paired_bootstrap(a, a[:, :5])


def test_grounding_tables_beyond_the_paper_cite_their_published_values(tmp_path):
    """Issue 32: the MS-CXR and CheXlocalize tables list peers' published values under 'published' with
    their sources; our rows stay 'not run' until a user supplies the data."""
    exp = load_experiment("ms-cxr")
    assert exp.reference == "published" and [c.metric for c in exp.columns] == ["cnr", "miou"]
    biovil = next(r for r in exp.rows if r.name == "BioViL")
    assert biovil.paper == [1.07, 0.229] and "microsoft/BiomedVLP-BioViL-T" in biovil.source
    results = Runner(exp, load_scale("small"), tmp_path, seeds=1, collect_only=True).run()
    table = format_markdown(exp, results, {})
    assert "| method | CNR | published | mIoU | published |" in table
    assert "| Ours | not run |  | not run |  |" in table
    assert "| BioViL | not given | 1.07 | not given | 0.229 |" in table
    assert "Values in 'published':" in table and "- BioViL-T: Bannur et al., CVPR 2023" in table
    assert "thresholds 0.1 ... 0.5" in table
    chex = load_experiment("chexlocalize")
    assert [c.metric for c in chex.columns] == ["macro_iou", "macro_hit"] and not any(r.paper for r in chex.rows)
    assert "could not be read from a public source" in chex.notes


def test_a_table_says_which_sets_its_scale_reads_as_stand_ins(tmp_path, capsys):
    """At the small scale MS-CXR is synthetic data: the table says so rather than pass it off as MS-CXR."""
    from g2d.cli import main

    assert Runner(load_experiment("ms-cxr"), load_scale("small"), tmp_path).stand_ins() == {"ms-cxr": "synthetic:48"}
    assert Runner(load_experiment("jsrt"), load_scale("shared", shared=tmp_path), tmp_path).stand_ins() == {}
    assert main(["reproduce", "ms-cxr", "--scale", "small", "--out", str(tmp_path / "o"), "--collect-only"]) == 0
    assert "data read as stand-ins (not the named sets) ms-cxr = synthetic:48" in capsys.readouterr().out
