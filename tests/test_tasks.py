"""The long-range task runner, report and CLI, and the context path's initial scale."""

import json

import pytest
import torch

from blockstate import build_model
from blockstate.checkpoint import CheckpointError
from blockstate.cli import main
from blockstate.evaluate import block_ranges
from blockstate.loading import load_model, load_with_checkpoint
from blockstate.registry import count_parameters
from blockstate.tasks import Run, Settings, run_all, write_report
from blockstate.tasks.runner import PARAM_TOLERANCE, SUITE_SIZE, model_overrides


def test_distance_bins_double_from_one_block():
    # the bins the runner scores distances 0..70 in
    assert block_ranges(16, 70 + 1) == [(0, 16), (16, 32), (32, 64), (64, 128)]
    assert block_ranges(16, 0 + 1) == [(0, 16)]


@pytest.mark.parametrize("model", ["slide", "bst-mf-s4", "bst-mh-s4", "transformer", "samba"])
def test_presets_are_matched_to_the_reference_budget(model):
    run = Run("copying", (("lag", 8),), model, 0)
    target = count_parameters("bst-sh-s4", SUITE_SIZE, **model_overrides(
        Run("copying", (("lag", 8),), "bst-sh-s4", 0), 10, 24))
    count = count_parameters(model, SUITE_SIZE, **model_overrides(run, 10, 24))
    assert abs(count - target) <= PARAM_TOLERANCE * target


def test_bst_variants_keep_their_own_mlp():
    run = Run("copying", (("lag", 8),), "bst-mf-s4", 0, (("num_context_states", 16),
                                                         ("ssm_state_size", 64)))
    assert "d_ff" not in model_overrides(run, 10, 24)


def test_run_all_writes_records_and_resumes(tmp_path, monkeypatch):
    settings = Settings(steps=2, batch_size=4, eval_sequences=8)
    runs = [Run("copying", (("lag", 20),), m, 0) for m in ("bst-sh-s4", "slide")]
    records = run_all(runs, settings, tmp_path, eval_params=[{"lag": 40}], log=lambda _: None)
    assert [r["label"] for r in records] == ["bst-sh-s4", "slide"]
    record = json.loads(runs[0].path(tmp_path).read_text())
    main_eval, longer = record["evaluations"]
    assert main_eval["bins"][0]["low"] == 16 and main_eval["count"] == 8 * 8  # d = 28: [16, 32)
    assert longer["params"] == {"lag": 40} and longer["bins"][0]["low"] == 32
    assert 0.0 <= main_eval["accuracy"] <= 1.0 and main_eval["chance"] == 0.125

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("blockstate.tasks.runner.train_run", fail)
    assert run_all(runs, settings, tmp_path, log=lambda _: None) == records
    with pytest.raises(ValueError, match="different settings"):
        run_all(runs, Settings(steps=3, batch_size=4, eval_sequences=8), tmp_path)


def test_kept_models_reload_to_the_recorded_accuracy(tmp_path):
    from blockstate.tasks import make_task
    from blockstate.tasks.runner import evaluate

    settings = Settings(steps=3, batch_size=4, eval_sequences=8)
    run = Run("copying", (("lag", 20),), "bst-recommended", 0)
    [record] = run_all([run], settings, tmp_path, log=lambda _: None,
                       keep_models=tmp_path / "models")
    model, checkpoint = load_model(tmp_path / "models" / run.task_key / "bst-recommended-seed0")
    assert checkpoint.step == 3 and checkpoint.train_state["settings"] == settings.record()
    assert model.config.to_dict() == record["model_config"]
    again = evaluate(model, make_task("copying", lag=20), 8, 4, model.config.block_size)
    assert again["accuracy"] == record["evaluations"][0]["accuracy"]


def _interrupt_after_checkpoint(monkeypatch, step=None):
    """Make the task runner raise KeyboardInterrupt right after it saves the checkpoint of `step`
    (None: its first one); returns the real `save_checkpoint`, to put back."""
    import blockstate.tasks.runner as runner

    real = runner.save_checkpoint

    def save_then_die(directory, saved, *args, **kwargs):
        real(directory, saved, *args, **kwargs)
        if step is None or saved == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    return real


def test_an_interrupted_run_continues_to_the_uninterrupted_result(tmp_path, monkeypatch):
    import blockstate.tasks.runner as runner

    settings = Settings(steps=12, batch_size=4, eval_sequences=8, warmup_steps=2)
    run = Run("copying", (("lag", 20),), "bst-sh-s4", 0)
    whole = runner.train_run(run, settings, log=lambda _: None)
    real = _interrupt_after_checkpoint(monkeypatch, 8)
    with pytest.raises(KeyboardInterrupt):
        run_all([run], settings, tmp_path, log=lambda _: None, checkpoint_every=4)
    assert run.partial_path(tmp_path).is_dir() and not run.path(tmp_path).exists()
    # the checkpoint of a task run (synthetic tokens, no tokenizer) loads as a model for probes
    model, checkpoint = load_model(run.partial_path(tmp_path), max_seq_len=512)
    assert checkpoint.step == 8 and model.config.max_seq_len == 512 and not model.training
    again, same = load_model(checkpoint, max_seq_len=512)  # a Checkpoint already loaded
    pairs = zip(model.state_dict().values(), again.state_dict().values(), strict=True)
    assert same is checkpoint and all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(CheckpointError, match="carries no tokenizer; .*load_model"):
        load_with_checkpoint(run.partial_path(tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        run_all([run], Settings(steps=12, batch_size=4, eval_sequences=8, lr=1e-3), tmp_path,
                log=lambda _: None, checkpoint_every=4)
    monkeypatch.setattr(runner, "save_checkpoint", real)
    messages = []
    [record] = run_all([run], settings, tmp_path, log=messages.append, checkpoint_every=4)
    assert any("continuing from step 8" in m for m in messages)
    assert record["losses"] == whole["losses"] and record["evaluations"] == whole["evaluations"]
    assert not run.partial_path(tmp_path).exists()


def test_a_curriculum_trains_its_stages_first_under_one_schedule(tmp_path, monkeypatch):
    import blockstate.tasks.runner as runner

    run = Run("copying", (("lag", 20),), "bst-sh-s4", 0)
    # a stage that changes nothing is the same run, step for step
    plain = runner.train_run(run, Settings(steps=6, batch_size=4, eval_sequences=8),
                             log=lambda _: None)
    same = runner.train_run(run, Settings(steps=6, batch_size=4, eval_sequences=8,
                                          curriculum=((3, (("lag", 20),)),)), log=lambda _: None)
    assert same["losses"] == plain["losses"] and same["evaluations"] == plain["evaluations"]
    assert "curriculum" not in plain["settings"]  # records without one read as before it existed
    assert same["settings"]["curriculum"] == [[3, [["lag", 20]]]]
    # stages in order, each for its steps, then the task; the model covers the longest stage
    seen = []
    real_make = runner.make_task

    def recording_make(name, **params):
        task = real_make(name, **params)
        sample = task.sample
        object.__setattr__(task, "sample", lambda b, seed: (seen.append(task.seq_len), sample(b, seed))[1])
        return task

    monkeypatch.setattr(runner, "make_task", recording_make)
    settings = Settings(steps=7, batch_size=4, eval_sequences=4,
                        curriculum=((2, (("lag", 60),)), (3, (("lag", 4),))))
    record = runner.train_run(run, settings, log=lambda _: None)
    assert seen[:7] == [76, 76, 20, 20, 20, 36, 36]  # 2 * 8 + lag
    assert record["model_config"]["max_seq_len"] == 80 and record["evaluations"][0]["seq_len"] == 36
    monkeypatch.setattr(runner, "make_task", real_make)
    # interrupted inside a stage, it continues to the uninterrupted result
    real_save = _interrupt_after_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run_all([run], settings, tmp_path, log=lambda _: None, checkpoint_every=1)
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    with pytest.raises(ValueError, match="other settings"):  # the same run without its curriculum
        run_all([run], Settings(steps=7, batch_size=4, eval_sequences=4), tmp_path,
                log=lambda _: None)
    [again] = run_all([run], settings, tmp_path, log=lambda _: None, checkpoint_every=1)
    assert again["losses"] == record["losses"] and again["evaluations"] == record["evaluations"]


def test_a_filler_stage_trains_the_last_steps_skipping_and_keeps_the_model_skipping(
        tmp_path, monkeypatch):
    import blockstate.tasks.runner as runner

    run = Run("passkey", (("seq_len", 32),), "bst-recommended", 0)
    settings = Settings(steps=6, batch_size=4, eval_sequences=4, filler_stage=(2, 2.0))
    calibrations, real_skip = [], runner.skip_filler

    def recording_skip(model, calibration, factor):
        calibrations.append((tuple(calibration.shape), factor))
        return real_skip(model, calibration, factor)

    monkeypatch.setattr(runner, "skip_filler", recording_skip)
    messages = []
    record = runner.train_run(run, settings, log=messages.append, keep=tmp_path / "kept")
    monkeypatch.setattr(runner, "skip_filler", real_skip)
    assert calibrations == [((4, 32), 2.0)]  # once, on eval_sequences sequences at the length
    assert any("from step 4 filler skipped in" in m for m in messages)
    stage = record["filler_stage"]
    assert (stage["steps"], stage["factor"], stage["from_step"]) == (2, 2.0, 4)
    assert record["settings"]["filler_stage"] == [2, 2.0]
    assert [h["skipping"] > 0 for h in stage["heads"]] == [True, True]
    plain = runner.train_run(run, Settings(steps=6, batch_size=4, eval_sequences=4),
                             log=lambda _: None)
    assert "filler_stage" not in plain["settings"] and "filler_stage" not in plain
    assert plain["losses"][0] == record["losses"][0] and plain["losses"] != record["losses"]
    # the kept model skips as it trained, and scores as recorded
    model, checkpoint = load_model(tmp_path / "kept")
    assert all(m.skip_below is not None for n, m in model.named_modules()
               if type(m).__name__ == "SelectiveSSM")
    assert runner.evaluate_all(model, run, settings, None) == record["evaluations"]
    # interrupted inside the stage, it continues to the uninterrupted result
    real_save = _interrupt_after_checkpoint(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_all([run], settings, tmp_path / "out", log=lambda _: None, checkpoint_every=1)
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    messages = []
    [again] = run_all([run], settings, tmp_path / "out", log=messages.append, checkpoint_every=1)
    assert any("continuing from step 5" in m for m in messages)
    assert again["losses"] == record["losses"] and again["evaluations"] == record["evaluations"]
    assert again["filler_stage"] == stage
    with pytest.raises(ValueError, match="scored skipping already"):
        run_all([run], settings, tmp_path / "out", log=lambda _: None, skip_factor=2.0)


def test_a_recalibrated_filler_stage_calibrates_every_so_many_steps_and_resumes_exactly(
        tmp_path, monkeypatch):
    import blockstate.tasks.runner as runner

    run = Run("passkey", (("seq_len", 32),), "bst-recommended", 0)
    settings = Settings(steps=8, batch_size=4, eval_sequences=4, filler_stage=(4, 2.0, 2))
    assert [s for s in range(8) if settings.calibrates_at(s)] == [4, 6]
    assert [s for s in range(8) if Settings(steps=8, filler_stage=(4, 2.0)).calibrates_at(s)] == [4]
    messages = []
    record = runner.train_run(run, settings, log=messages.append, keep=tmp_path / "kept")
    assert [m.split("from step ")[1].split()[0] for m in messages if "filler skipped" in m] == [
        "4", "6"]
    assert record["settings"]["filler_stage"] == [4, 2.0, 2]
    assert record["filler_stage"]["recalibrate_every"] == 2
    once = runner.train_run(run, Settings(steps=8, batch_size=4, eval_sequences=4,
                                          filler_stage=(4, 2.0)), log=lambda _: None)
    assert "recalibrate_every" not in once["filler_stage"]
    assert once["losses"][:1] == record["losses"][:1]
    # the kept model carries the last calibration's thresholds and scores as recorded
    model, _ = load_model(tmp_path / "kept")
    assert runner.evaluate_all(model, run, settings, None) == record["evaluations"]
    # interrupted between two calibrations, it continues to the uninterrupted result
    real_save = _interrupt_after_checkpoint(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        run_all([run], settings, tmp_path / "out", log=lambda _: None, checkpoint_every=1)
    monkeypatch.setattr(runner, "save_checkpoint", real_save)
    [again] = run_all([run], settings, tmp_path / "out", log=lambda _: None, checkpoint_every=1)
    assert again["losses"] == record["losses"] and again["evaluations"] == record["evaluations"]
    with pytest.raises(ValueError, match="recalibrated every 0 steps"):
        Settings(steps=8, filler_stage=(4, 2.0, 0))


def test_a_filler_stage_leaves_a_model_without_a_selective_ssm_as_it_was():
    import blockstate.tasks.runner as runner

    run = Run("passkey", (("seq_len", 32),), "bst-sh-s4", 0)
    plain = runner.train_run(run, Settings(steps=4, batch_size=4, eval_sequences=4),
                             log=lambda _: None)
    staged = runner.train_run(run, Settings(steps=4, batch_size=4, eval_sequences=4,
                                            filler_stage=(2, 2.0)), log=lambda _: None)
    assert staged["losses"] == plain["losses"] and staged["evaluations"] == plain["evaluations"]
    assert staged["filler_stage"]["heads"] == []


def test_a_filler_stage_needs_steps_of_its_own_after_the_curriculum():
    with pytest.raises(ValueError, match="filler stage of 5 steps"):
        Settings(steps=5, filler_stage=(5, 2.0))
    with pytest.raises(ValueError, match="a factor > 0"):
        Settings(steps=5, filler_stage=(2, 0.0))
    with pytest.raises(ValueError, match="and after the curriculum"):
        Settings(steps=5, curriculum=((4, (("lag", 4),)),), filler_stage=(2, 2.0))
    Settings(steps=5, curriculum=((3, (("lag", 4),)),), filler_stage=(2, 2.0))


def test_a_curriculum_leaves_the_task_steps_and_keeps_its_vocabulary():
    with pytest.raises(ValueError, match="fewer than steps=5"):
        Settings(steps=5, curriculum=((3, (("lag", 4),)), (2, (("lag", 8),))))
    with pytest.raises(ValueError, match="each needs >= 1 step"):
        Settings(steps=5, curriculum=((0, (("lag", 4),)),))
    from blockstate.tasks.runner import curriculum_tasks

    with pytest.raises(ValueError, match="vocabulary of 6, the task 10: a stage must keep"):
        curriculum_tasks(Run("copying", (), "slide", 0),
                         Settings(steps=5, curriculum=((2, (("num_symbols", 4),)),)))


def test_ssm_learning_rate_scale_applies_to_kernel_parameters_only():
    model = build_model("bst-sh-s4", SUITE_SIZE)
    from blockstate.optim import scaled_parameter_groups

    groups = scaled_parameter_groups(model, 0.0, ssm_lr_scale=0.25)
    kernel = {id(p) for n, p in model.named_parameters() if ".kernel." in n}
    assert kernel and {id(p) for p in groups[-1]["params"]} == kernel
    assert groups[-1]["lr_scale"] == 0.25 and all(g["lr_scale"] == 1.0 for g in groups[:-1])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_report_tables_every_model_and_bin(tmp_path):
    settings = Settings(steps=1, batch_size=2, eval_sequences=4)
    runs = [Run("mqar", (("gap", 40), ("num_pairs", 2), ("seq_len", 64)), m, s)
            for m in ("bst-sh-s4", "slide") for s in (0, 1)]
    run_all(runs, settings, tmp_path, log=lambda _: None)
    text = write_report(tmp_path, command="blockstate tasks run --seeds 1").read_text()
    assert text.startswith("Last command: `blockstate tasks run --seeds 1`")
    assert "### mqar-gap40-num_pairs2-seq_len64" in text
    assert "| bst-sh-s4 |" in text and "| slide |" in text and "±" in text
    summary = json.loads((tmp_path / "report.json").read_text())
    entry = summary["mqar-gap40-num_pairs2-seq_len64"]
    assert entry["models"]["slide"]["seeds"] == [0, 1]
    assert entry["bins"] and set(entry["models"]["slide"]["bins"]) <= set(entry["bins"])


def test_report_keeps_rows_whose_run_records_are_gone(tmp_path):
    """A fresh clone holds report.json but not the run records (they may not have been kept):
    a new run must add its row without dropping the others, which are marked as carried; a row
    whose records cover only some of its seeds is kept whole, with a warning."""
    settings = Settings(steps=1, batch_size=2, eval_sequences=4)
    task = ("mqar", (("gap", 40), ("num_pairs", 2), ("seq_len", 64)))
    run_all([Run(*task, m, s) for m in ("bst-sh-s4", "slide") for s in (0, 1)], settings, tmp_path,
            log=lambda _: None)
    write_report(tmp_path)
    before = json.loads((tmp_path / "report.json").read_text())["mqar-gap40-num_pairs2-seq_len64"]
    for path in (tmp_path / "runs").glob("*/*.json"):   # records lost; the report remains
        if not path.name.startswith("bst-sh-s4-seed1"):
            path.unlink()
    run_all([Run(*task, "transformer", 0)], settings, tmp_path, log=lambda _: None)
    warnings = []
    text = write_report(tmp_path, log=warnings.append).read_text()
    entry = json.loads((tmp_path / "report.json").read_text())["mqar-gap40-num_pairs2-seq_len64"]
    assert list(entry["models"]) == ["bst-sh-s4", "slide", "transformer"]
    for label in ("bst-sh-s4", "slide"):  # both seeds, as before, though one record is left at most
        assert entry["models"][label]["carried"]
        assert entry["models"][label]["accuracy"] == before["models"][label]["accuracy"]
    assert "carried" not in entry["models"]["transformer"]
    assert "| slide † |" in text and "| transformer |" in text and "† from an earlier" in text
    assert len(warnings) == 1 and "bst-sh-s4" in warnings[0] and "seeds [1]" in warnings[0]
    for path in (tmp_path / "runs").glob("*/*.json"):   # no records at all: the report stays
        path.unlink()
    write_report(tmp_path, log=lambda _: None)
    assert json.loads((tmp_path / "report.json").read_text())["mqar-gap40-num_pairs2-seq_len64"][
        "models"].keys() == entry["models"].keys()
    (tmp_path / "runs" / "mqar-gap40-num_pairs2-seq_len64" / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="broken.json is not a task run record"):
        write_report(tmp_path, log=lambda _: None)  # a corrupt record is not hidden by the merge


def test_cli_run_and_report(tmp_path, capsys):
    out = tmp_path / "suite"
    assert main(["tasks", "run", "--task", "copying", "--param", "lag=4,20", "--models", "bst-sh-s4d",
                 "--seeds", "0", "--steps", "2", "--batch-size", "2", "--eval-sequences", "4",
                 "--set", "context.norm=rms", "--device", "cpu", "--out", str(out)]) == 0
    files = sorted(p.name for p in (out / "runs").glob("*/*.json"))
    assert files == ["bst-sh-s4d[context.norm=rms]-seed0.json"] * 2
    record = json.loads(next((out / "runs").glob("copying-lag4/*.json")).read_text())
    assert record["model_config"]["context"]["norm"] == "rms" and record["device"] == "cpu"
    assert (out / "report.md").exists()
    assert main(["tasks", "report", "--out", str(out)]) == 0


def test_cli_passkey_trains_at_one_length_and_reports_the_depth_by_length_grid(tmp_path):
    """The whole passkey pipeline on tiny settings (it need not learn): trained at L = 32 with the
    key anywhere, evaluated at 5 depths and at L, 4L and 16L; the report has a grid per model,
    passkey.json and the heat map passkey.png."""
    out = tmp_path / "passkey"
    assert main(["tasks", "run", "--task", "passkey", "--param", "seq_len=32", "--models",
                 "bst-recommended,samba", "--seeds", "0", "--steps", "2", "--batch-size", "2",
                 "--eval-sequences", "2", "--eval-param", "depth=0,25,50,75,100",
                 "--eval-param", "seq_len=32,128,512", "--out", str(out)]) == 0
    grids = json.loads((out / "passkey.json").read_text())
    assert list(grids) == ["passkey-seq_len32 bst-recommended", "passkey-seq_len32 samba"]
    for grid in grids.values():
        assert grid["train_len"] == 32 and grid["seeds"] == [0]
        assert grid["depths"] == [0, 25, 50, 75, 100] and grid["lengths"] == [32, 128, 512]
        assert all(0.0 <= v <= 1.0 for row in grid["exact"] for v in row)
    text = (out / "report.md").read_text()
    assert "### passkey grid: passkey-seq_len32 samba" in text
    assert "| depth | L = 32 (1x) | L = 128 (4x) | L = 512 (16x) |" in text and "| 50% |" in text
    assert (out / "passkey.png").stat().st_size > 0
    record = json.loads(next((out / "runs").glob("*/samba-seed0.json")).read_text())
    assert len(record["evaluations"]) == 1 + 5 * 3 and "exact" in record["evaluations"][0]


def test_cli_scores_kept_models_with_filler_skipped_afterwards(tmp_path, capsys):
    """`--skip-filler` on finished runs scores their kept models again with filler skipped: a grid
    of its own for the selective model; a model without a selective SSM scores as before."""
    out, kept = tmp_path / "passkey", tmp_path / "kept"
    argv = ["tasks", "run", "--task", "passkey", "--param", "seq_len=32", "--models",
            "bst-recommended,bst-sh-s4", "--seeds", "0", "--steps", "2", "--batch-size", "2",
            "--eval-sequences", "2", "--eval-param", "depth=0,100", "--eval-param",
            "seq_len=32,128", "--out", str(out)]
    assert main(argv + ["--keep-models", str(kept)]) == 0
    assert main(argv + ["--skip-filler", "2"]) == 2
    assert "is finished but was not kept" in capsys.readouterr().err
    assert main(argv + ["--keep-models", str(kept), "--skip-filler", "2"]) == 0
    records = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*/*.json")}
    selective, plain = records["bst-recommended-seed0"], records["bst-sh-s4-seed0"]
    assert selective["filler_skipped"]["factor"] == 2.0
    assert [h["skipping"] > 0 for h in selective["filler_skipped"]["heads"]] == [True, True]
    assert plain["filler_skipped"]["heads"] == []
    assert plain["filler_skipped"]["evaluations"] == plain["evaluations"]
    grids = json.loads((out / "passkey.json").read_text())
    assert "passkey-seq_len32 bst-recommended [filler skipped x2]" in grids
    assert len(grids) == 4
    staged = tmp_path / "staged"
    assert main(argv[:-1] + [str(staged), "--skip-filler-stage", "1:2"]) == 0
    grids = json.loads((staged / "passkey.json").read_text())
    assert sorted(grids) == ["passkey-seq_len32 bst-recommended [trained skipping x2 from step 1]",
                             "passkey-seq_len32 bst-sh-s4 [trained skipping x2 from step 1]"]


@pytest.mark.parametrize("argv, message", [
    (["--task", "nope"], "unknown task 'nope'"),
    (["--models", "bst-xx"], "unknown model"),
    (["--param", "lag"], "expected NAME=VALUE"),
    (["--param", "lag=x"], "must be integers"),
    (["--param", "lagg=3"], "lagg"),
    (["--param", "lag=-3"], "lag"),
    (["--set", "ssm.state_size=7"], "ssm.state_size=7 must be even"),
    (["--set", "ssm.bc_norm=true"], "ssm kind 's4' has no field 'bc_norm'"),
    (["--eval-param", "length=0"], "length"),
    (["--device", "tpu"], "--device='tpu' is not a device"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--skip-filler", "0"], "--skip-filler must be > 0"),
    (["--skip-filler-stage", "300"], "--skip-filler-stage '300': expected STEPS:FACTOR"),
    (["--skip-filler-stage", "300:0"], "expected STEPS:FACTOR[:EVERY] with STEPS >= 1, FACTOR > 0"),
    (["--skip-filler-stage", "300:2:0"], "and EVERY >= 1"),
    (["--skip-filler-stage", "300:2:1:1"], "expected STEPS:FACTOR"),
    (["--skip-filler-stage", "600:2"], "filler stage of 600 steps"),
    (["--skip-filler-stage", "300:2", "--skip-filler", "2"], "give one of them"),
    (["--curriculum", "300"], "--curriculum '300': expected STEPS:NAME=V"),
    (["--curriculum", "300:lag=x"], "--curriculum '300:lag=x': expected"),
    (["--curriculum", "600:lag=4"], "together fewer than steps=600"),
    (["--curriculum", "300:lagg=4"], "unknown parameter 'lagg'"),
    (["--curriculum", "300:num_symbols=4"], "a stage must keep the vocabulary"),
])
def test_cli_rejects_bad_input_in_one_line(tmp_path, capsys, argv, message):
    assert main(["tasks", "run", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("d_model", [64, 256, 1024])
@pytest.mark.parametrize("variant", ["sh", "mh", "mf"])
def test_normalized_context_values_start_at_the_scale_of_self_attention(d_model, variant):
    """With context.norm="rms" the cross-attention values start within 2x of the self-attention
    values at every width; without it they start 5-100x smaller (the chained 0.02-std maps)."""
    def ratio(norm: str) -> float:
        torch.manual_seed(0)
        model = build_model("bst-sh-s4", "tiny", d_model=d_model, n_heads=max(2, d_model // 64),
                            context={"kind": variant, "norm": norm}, block_size=32,
                            max_seq_len=128, bst_layers=(0,), n_layers=1)
        layer = model.layers[0]
        h = layer.attn_norm(torch.randn(2, 128, d_model))
        with torch.no_grad():
            v_self = layer.self_attn.qkv(h).chunk(3, dim=-1)[2]
            _, v_context = layer.context(h)
        return float(v_context.pow(2).mean().sqrt() / v_self.pow(2).mean().sqrt())

    assert 0.5 < ratio("rms") < 2.0
    assert ratio("none") < 0.25
