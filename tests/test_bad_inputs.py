"""A hundred bad inputs across run, sample, eval, compare, export and teacher train: each one is refused with
one line on stderr and exit code 2, no traceback, before anything heavy is built, and nothing on disk is
written or changed. The CLI runs in-process through ``main(argv)``; a few cases run as a user would (subprocess)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scoredistill.cli import main

TINY = ["--preset", "toy2d", "--set", "train.steps=4", "--set", "train.fake_score_warmup_steps=0", "--set", "train.batch_size=32",
        "--set", "pairs.num_pairs=64", "--set", "eval.num_samples=64", "--set", "train.sample_every=null", "--quiet"]
BIG = str(2**70)
PYTAG = 'x=!!python/object/apply:os.system ["touch pwned"]'

# (argv with {RUN} = a finished toy2d run, {EMPTY} = an empty folder, {FULL} = a folder with a file, {FILE} = a file,
#  {BADCFG} = a run folder whose config.yaml is not UTF-8, {NOGEN} = a run folder without generator weights,
#  {TMP} = the scratch folder), and a piece of the expected line
RUN = [
    (["run", "nosuch", "--preset", "toy2d"], "unknown method 'nosuch'"),
    (["run", "dmd", "--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["run", "dmd", "--preset", "toy2d", "--ablate", "nosuch"], "unknown ablation 'nosuch'"),
    (["run", "dmd", "--preset", "toy2d", "--ablate", "regression", "--ablate", "distribution_matching"], "no generator loss"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.steps=true"], "expected a number, not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.steps=1e30"], "expected an integer"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.steps=2.5"], "expected an integer"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.steps=-1"], "train.steps"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.steps=abc"], "train.steps"),
    (["run", "dmd", "--preset", "toy2d", "--set", f"train.steps={BIG}"], "train.steps"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.batch_size=1000000000000"], "train.batch_size"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.batch_size=0"], "train.batch_size"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.batch_size=false"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.pair_batch_size=0"], "train.pair_batch_size"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.generator_lr=0"], "train.generator_lr"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.generator_lr=true"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.fake_score_lr=-1e-3"], "train.fake_score_lr"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.adam_betas=[0.9]"], "train.adam_betas"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.lr_schedule=linear"], "train.lr_schedule"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.ema_decay=1.0"], "train.ema_decay"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.on_nonfinite=ignore"], "train.on_nonfinite"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.optimizer=sgd"], "train.optimizer"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.checkpoint_every=0"], "train.checkpoint_every"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.keep_checkpoints=0"], "train.keep_checkpoints"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.log_every=0"], "train.log_every"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.sample_count=0"], "train.sample_count"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.fake_updates_per_step=0"], "train.fake_updates_per_step"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.grad_clip=-1"], "train.grad_clip"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.weight_decay=-0.1"], "train.weight_decay"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.fake_score_warmup_steps=1e30"], "expected an integer"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.module_lr.generator=1.0"], "module_lr"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.nosuch=1"], "unknown config key 'train.nosuch'"),
    (["run", "dmd", "--preset", "toy2d", "--set", "nosuch.key=1"], "unknown config key 'nosuch'"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.device=nosuch"], "not a torch device"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.mixed_precision=fp8"], "runtime.mixed_precision"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.num_threads=0"], "runtime.num_threads"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.num_threads=true"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.distributed=horovod"], "runtime.distributed"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.compile_mode=fast"], "runtime.compile_mode"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.cast_weights=always"], "runtime.cast_weights"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.progress=maybe"], "runtime.progress"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.fsdp_min_params=0"], "runtime.fsdp_min_params"),
    (["run", "dmd", "--preset", "toy2d", "--set", "runtime.fsdp_sharding=no_shard"], "runtime.fsdp_sharding"),  # FSDP2 has none: DDP
    (["run", "dmd", "--preset", "toy2d", "--set", "eval.num_samples=0"], "eval.num_samples"),
    (["run", "dmd", "--preset", "toy2d", "--set", "eval.num_samples=1000000000000"], "eval.num_samples"),
    (["run", "dmd", "--preset", "toy2d", "--set", "eval.seed=-1"], "eval.seed"),
    (["run", "dmd", "--preset", "toy2d", "--set", f"eval.seed={BIG}"], "eval.seed"),
    (["run", "dmd", "--preset", "toy2d", "--set", "seed=true"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "seed=1.5"], "expected an integer"),
    (["run", "dmd", "--preset", "toy2d", "--set", f"seed={BIG}"], "seed"),
    (["run", "dmd", "--preset", "toy2d", "--set", "method=sds"], "the method is chosen on the command line"),
    (["run", "dmd", "--preset", "toy2d", "--set", "preset=digits"], "the preset is chosen on the command line"),
    (["run", "dmd", "--preset", "toy2d", "--set", "ablations=[regression]"], "chosen on the command line with --ablate"),
    (["run", "dmd", "--preset", "toy2d", "--set", "losses.regresion.weight=0.5"], "no loss term 'regresion'; its terms: distribution_matching, regression"),
    (["run", "dmd", "--preset", "toy2d", "--set", "losses.regression.weight=abc"], "losses.regression.weight"),
    (["run", "dmd", "--preset", "toy2d", "--set", "losses.regression.weight=true"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "losses.regression.component=nosuch"], "unknown"),
    (["run", "dmd", "--preset", "toy2d", "--set", "teacher.component=nosuch"], "unknown"),
    (["run", "dmd", "--preset", "toy2d", "--set", "generator.component=nosuch"], "unknown"),
    (["run", "dmd", "--preset", "toy2d", "--set", "generator.width=true"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "generator.width=1.5"], "expected an integer"),
    (["run", "dmd", "--preset", "toy2d", "--set", "generator.nosuch=1"], "unknown config key 'generator.nosuch'"),
    (["run", "dmd", "--preset", "toy2d", "--set", "pairs.num_pairs=0"], "pairs.num_pairs"),
    (["run", "dmd", "--preset", "toy2d", "--set", "pairs.num_pairs=true"], "not a boolean"),
    (["run", "dmd", "--preset", "toy2d", "--set", "fake_score=null"], "fake_score"),
    (["run", "dmd", "--preset", "toy2d", "--set", PYTAG], "cannot parse --set"),
    (["run", "dmd", "--preset", "toy2d", "--set", "trainsteps"], "--set expects key=value"),
    (["run", "dmd", "--preset", "toy2d", "--set", "=5"], "--set expects key=value"),
    (["run", "dmd", "--preset", "toy2d", "--set", "train.steps=[1"], "cannot parse --set"),
    (["run"], "METHOD"),
    (["run", "dmd", "--resume", "{RUN}"], "not both"),
    (["run", "--resume", "{TMP}/nosuch"], "not a run folder"),
    (["run", "--resume", "{EMPTY}"], "is empty: its run stopped before writing anything, so there is nothing to resume"),
    (["run", "--resume", "{RUN}"], "already finished"),
    (["run", "--resume", "{RUN}", "--set", "train.batch_size=16"], "cannot change on --resume"),
    (["run", "--resume", "{RUN}", "--set", "train.steps=true"], "not a boolean"),
    (["run", "--resume", "{RUN}", "--out", "{TMP}/x"], "--out cannot be used with --resume"),
    (["run", "--resume", "{BADCFG}"], "not UTF-8"),
    (["run", "--resume", "{NOGEN}/checkpoint-step-00000007.safetensors"], "no checkpoint"),
    (["run", "dmd", "--out", "{RUN}", *TINY], "already exists and is not empty"),
    (["run", "dmd", "--out", "{FILE}", *TINY], "is an existing file"),
    (["run", "dmd", "--out", "{FILE}/sub/run", *TINY], "is a file, not a folder"),
    (["run", "dmd", "--bogus"], "unrecognized arguments"),
]
SAMPLE = [
    (["sample", "{TMP}/nosuch", "--num", "5", "--out", "{TMP}/a.npy"], "not a run folder"),
    (["sample", "{EMPTY}", "--num", "5", "--out", "{TMP}/a.npy"], "not a run folder"),
    (["sample", "{NOGEN}", "--num", "5", "--out", "{TMP}/a.npy"], "did the run finish"),
    (["sample", "{RUN}", "--num", "0", "--out", "{TMP}/a.npy"], "--num must be"),
    (["sample", "{RUN}", "--num", "-3", "--out", "{TMP}/a.npy"], "--num must be"),
    (["sample", "{RUN}", "--num", "1000000000000", "--out", "{TMP}/a.npy"], "--num must be"),
    (["sample", "{RUN}", "--num", "abc", "--out", "{TMP}/a.npy"], "invalid int value"),
    (["sample", "{RUN}", "--num", "5", "--out", "{TMP}/a.txt"], "must be a .npy file"),
    (["sample", "{RUN}", "--num", "5", "--out", "{DIRNPY}"], "is an existing folder"),
    (["sample", "{RUN}", "--num", "5", "--out", "{FILE}/a.npy"], "is a file, not a folder"),
    (["sample", "{RUN}", "--num", "5", "--out", "{TMP}/a.npy", "--seed", BIG], "--seed must be"),
    (["sample", "{RUN}", "--num", "5", "--out", "{TMP}/a.npy", "--seed", "-1"], "--seed must be"),
    (["sample", "{RUN}", "--num", "5", "--out", "{TMP}/a.npy", "--online"], "drop --online"),
    (["sample", "{RUN}", "--out", "{TMP}/a.npy"], "--num"),
]
EXPORT = [
    (["export", "{TMP}/nosuch", "{TMP}/e"], "not a run folder"),
    (["export", "{NOGEN}", "{TMP}/e"], "did the run finish"),
    (["export", "{RUN}", "{FULL}"], "already exists and is not empty"),
    (["export", "{RUN}", "{FILE}"], "is an existing file"),
    (["export", "{RUN}", "{FILE}/e"], "is a file, not a folder"),
    (["export", "{RUN}", "{TMP}/e", "--online"], "drop --online"),
    (["export", "{RUN}"], "arguments are required: out"),
]
EVAL = [
    (["eval", "{RUN}"], "evaluates image runs"),
    (["eval", "{TMP}/nosuch"], "not a run folder"),
    (["eval", "{RUN}", "--num", "1"], "--num must be"),
    (["eval", "{RUN}", "--num", "1000000000000"], "--num must be"),
    (["eval", "{RUN}", "--seed", BIG], "--seed must be"),
    (["eval", "{RUN}", "--inception", "maybe"], "invalid choice"),
    (["eval", "{RUN}", "--out", "{FULL}"], "is an existing folder"),
]
COMPARE = [
    (["compare", "nosuch", "--preset", "toy2d", "--out", "{TMP}/c"], "unknown method 'nosuch'"),
    (["compare", "dmd:nosuch", "--preset", "toy2d", "--out", "{TMP}/c"], "unknown ablation 'nosuch'"),
    (["compare", ":x", "--preset", "toy2d", "--out", "{TMP}/c"], "bad spec"),
    (["compare", "dmd", "--preset", "toy2d", "--seeds", "0", "--out", "{TMP}/c"], "--seeds must be"),
    (["compare", "dmd", "--preset", "toy2d", "--seeds", "1000000", "--out", "{TMP}/c"], "--seeds must be"),
    (["compare", "dmd", "--preset", "toy2d", "--set", "train.steps=true", "--out", "{TMP}/c"], "not a boolean"),
    (["compare", "dmd", "--preset", "toy2d", "--set", "method=sds", "--out", "{TMP}/c"], "chosen on the command line"),
    (["compare", "dmd", "--preset", "nosuch", "--out", "{TMP}/c"], "unknown preset 'nosuch'"),
    (["compare", "dmd", "--preset", "toy2d", "--out", "{FILE}"], "is an existing file"),
    (["compare", "dmd", "sds", "--preset", "toy2d", "--set", "runtime.device=nosuch", "--out", "{TMP}/c"], "not a torch device"),
]
TEACHER = [
    (["teacher", "train", "--threads", "0", "--out", "{TMP}/t"], "--threads must be"),
    (["teacher", "train", "--threads", "-2", "--out", "{TMP}/t"], "--threads must be"),
    (["teacher", "train", "--out", "{FILE}"], "is an existing file"),
    (["teacher", "train", "--out", "{FILE}/t"], "is a file, not a folder"),
    (["teacher", "train", "--out", "{FULL}"], "holds something else than a trained teacher"),
    (["teacher", "train", "--preset", "toy2d", "--out", "{TMP}/t"], "trains digits_unet teachers only"),
    (["teacher", "train", "--preset", "nosuch", "--out", "{TMP}/t"], "unknown preset"),
    (["teacher", "train", "--set", "train.steps=5", "--out", "{TMP}/t"], "teacher.KEY=VALUE overrides only"),
    (["teacher", "train", "--set", "teacher.train_steps=true", "--out", "{TMP}/t"], "not a boolean"),
    (["teacher", "train", "--set", "teacher.train_steps=1e30", "--out", "{TMP}/t"], "expected an integer"),
    (["teacher", "train", "--set", "teacher.train_steps=0", "--out", "{TMP}/t"], "teacher.train_steps"),
    (["teacher", "train", "--set", "teacher.nosuch=1", "--out", "{TMP}/t"], "teacher.nosuch"),
    (["teacher", "train", "--set", PYTAG, "--out", "{TMP}/t"], "cannot parse --set"),
    (["teacher"], "ACTION"),
]
OTHER = [
    ([], "COMMAND"),
    (["nosuchcommand"], "invalid choice"),
    (["-p", "nosuch_plugin_module", "list"], "nosuch_plugin_module"),
]
CASES = RUN + SAMPLE + EXPORT + EVAL + COMPARE + TEACHER + OTHER


def test_there_are_at_least_a_hundred_cases_over_every_command():
    assert len(CASES) >= 100
    assert {argv[0] for argv, _ in CASES if argv} >= {"run", "sample", "eval", "compare", "export", "teacher"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad-inputs")
    run = root / "run"
    assert main(["run", "dmd", "--out", str(run), *TINY, "--set", "train.checkpoint_every=2"]) == 0
    (root / "empty").mkdir()
    (root / "full").mkdir()
    (root / "full" / "notes.txt").write_text("mine\n")
    (root / "file.txt").write_text("a file\n")
    (root / "dir.npy").mkdir()
    badcfg = root / "badcfg"
    badcfg.mkdir()
    (badcfg / "config.yaml").write_bytes(b"method: dmd\npreset: toy2d\n# caf\xe9 \xff\xfe\n")
    nogen = root / "nogen"
    nogen.mkdir()
    (nogen / "config.yaml").write_bytes((run / "config.yaml").read_bytes())
    return {"RUN": str(run), "EMPTY": str(root / "empty"), "FULL": str(root / "full"), "FILE": str(root / "file.txt"),
            "DIRNPY": str(root / "dir.npy"), "BADCFG": str(badcfg), "NOGEN": str(nogen), "TMP": str(root)}


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under ``folder``: its content's hash, mode and modification time."""
    out = {}
    for p in sorted(folder.rglob("*")):
        st = p.stat()
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(folder))] = f"{digest} {st.st_mode:o} {st.st_mtime_ns}"
    return out


def _fill(argv: list[str], world: dict[str, str]) -> list[str]:
    return [a.format(**world) if "{" in a and not a.startswith("x=") else a for a in argv]


@pytest.mark.parametrize("argv, expected", CASES, ids=[" ".join(a)[:80] for a, _ in CASES])
def test_a_bad_input_is_one_line_exit_2_and_changes_nothing(world, argv, expected, capsys, monkeypatch):
    root = Path(world["TMP"])
    monkeypatch.chdir(root)  # a default --out (runs/...) would land here, and be seen
    before = snapshot(root)
    try:
        code = main(_fill(argv, world))
    except SystemExit as exc:  # argparse's own errors (one line, see cli._Parser)
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    assert out == ""
    assert snapshot(root) == before
    assert not (root / "pwned").exists()


@pytest.mark.parametrize("argv", [["sample", "{RUN}", "--num", "5", "--out", "{TMP}/a.npy", "--seed", BIG],
                                  ["run", "dmd", "--preset", "toy2d", "--set", PYTAG, "--out", "{TMP}/r"],
                                  ["teacher", "train", "--threads", "0", "--out", "{TMP}/t"]])
def test_as_a_user_runs_it(world, argv, tmp_path):
    before = snapshot(Path(world["TMP"]))
    proc = subprocess.run([sys.executable, "-m", "scoredistill.cli", *_fill(argv, world)], capture_output=True, text=True,
                          cwd=tmp_path, env=os.environ)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(Path(world["TMP"])) == before and not list(tmp_path.iterdir())


def test_under_torchrun_a_user_error_is_printed_once_by_rank_0(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "scoredistill.cli",
           "run", "dmd", "--preset", "toy2d", "--set", "train.steps=true", "--out", str(tmp_path / "r")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    ours = [line for line in proc.stderr.splitlines() if line.startswith("scoredistill: ")]
    assert proc.returncode != 0 and len(ours) == 1 and "expected a number, not a boolean" in ours[0], proc.stderr
    # torchrun's own summary (its traceback cannot be turned off from the processes): ranks exited with 2 (the
    # other one may already have been stopped by torchrun)
    assert "exitcode  : 2" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_the_resume_command_suggested_after_an_interruption_repeats_the_launcher(monkeypatch):
    from scoredistill.cli import _launcher

    for key in ("WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert _launcher() == "scoredistill"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert _launcher() == "torchrun --nproc_per_node 4 -m scoredistill.cli"
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
    assert _launcher() == "torchrun --nnodes 2 --nproc_per_node 4 -m scoredistill.cli"
