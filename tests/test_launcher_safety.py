"""`unimm train` as a launcher: mistakes refused before launch, one writer per run folder,
no worker outliving its launch (docs/reliability.md, "Launcher and conversion").

Everything but the two tests marked slow runs in this process without torchrun: the launch
itself (`launch.run_torchrun`) and, where the data does not matter, the data checks
(`launch.preflight`) are replaced, so that a check that wrongly lets a command line through
fails the test instead of starting a run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import small_run_options
from unimm.cli import main as unimm_main
from unimm.errors import ConfigError
from unimm.titan import config_checks, launch, run_lock
from unimm.titan.run_lock import LOCK_NAME, RunLock, RunLockedError

ROOT = Path(__file__).parent.parent
LINUX = sys.platform.startswith("linux") and Path("/proc/self/cmdline").exists()


class Launched(Exception):
    """Raised by the stand-in for torchrun where a test expects no launch."""


@pytest.fixture
def no_launch(monkeypatch):
    """No data checks, and torchrun must not be reached."""

    def refuse(command, env):
        raise Launched(" ".join(command))

    monkeypatch.setattr(launch, "preflight", lambda config: None)
    monkeypatch.setattr(launch, "run_torchrun", refuse)


@pytest.fixture
def fake_launch(monkeypatch):
    """torchrun replaced by a stand-in that records the launch and writes a checkpoint
    (DCP's `.metadata`) at the run's last step, as a finished run would."""
    calls: list[dict] = []

    def fake(command, env):
        out = Path(command[command.index("--dump_folder") + 1])
        steps = int(command[command.index("--training.steps") + 1]) if "--training.steps" in command else 1
        call = {"command": command, "env": env, "out": out}
        # the launcher holds the folder's lock for the whole run, under its own pid
        with pytest.raises(RunLockedError) as refused:
            RunLock(out).acquire()
        call["refusal"] = str(refused.value)
        call["holder"] = json.loads((out / LOCK_NAME).read_text())
        calls.append(call)
        (out / "checkpoint" / f"step-{steps}").mkdir(parents=True)
        (out / "checkpoint" / f"step-{steps}" / ".metadata").write_bytes(b"")
        return 0

    monkeypatch.setattr(launch, "preflight", lambda config: None)
    monkeypatch.setattr(launch, "run_torchrun", fake)
    return calls


def train(out: Path, *extra: str, recipe: str = "debug_cpu") -> list[str]:
    return ["train", "--recipe", recipe, "--out", str(out), *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("unimm: error:")]
    assert len(errors) == 1 and err.count("unimm: error:") == 1, err
    return errors[0]


# ---------------------------------------------------------------- command-line mistakes

BAD_COMMAND_LINES = {
    "negative steps": (["--steps", "-5"], ["--steps -5", "positive number of training steps"]),
    "zero steps": (["--steps", "0"], ["--steps 0", "positive"]),
    "zero steps, torchtitan spelling": (["--training.steps", "0"], ["--training.steps=0", "positive"]),
    "zero processes": (["--nproc", "0"], ["--nproc 0", "at least 1 process"]),
    "negative processes": (["--nproc", "-2"], ["--nproc -2", "at least 1 process"]),
    "batch of 0 rows": (["--training.local_batch_size", "0"], ["--training.local_batch_size=0", "positive"]),
    "global batch not a multiple": (
        ["--training.global_batch_size", "6"], ["--training.global_batch_size=6", "multiple of", "= 8"],
    ),
    "negative lr": (["--lr", "-0.001"], ["--lr -0.001", "non-negative learning rate"]),
    "negative lr, torchtitan spelling": (
        ["--optimizer.param-groups.0.optimizer-kwargs.lr", "-0.001"],
        ["--optimizer.param-groups.0.optimizer-kwargs.lr=-0.001", "non-negative learning rate"],
    ),
    "lr given twice": (
        ["--lr", "1e-3", "--optimizer.param-groups.0.optimizer-kwargs.lr", "2e-3"], ["--lr and", "give one"],
    ),
    "README's old lr option": (["--optimizer.lr", "3e-4"], ["--optimizer.lr is not an option", "--lr 3e-4"]),
    "negative source weight": (
        ["--dataloader.source_weights.text", "-1"], ["--dataloader.source_weights: source 'text' has weight -1", "non-negative weight"],
    ),
    "all source weights 0": (
        ["--dataloader.source_weights.text", "0", "--dataloader.source_weights.video", "0",
         "--dataloader.source_weights.image_text", "0", "--dataloader.source_weights.action", "0"],
        ["--dataloader.source_weights", "every weight is 0"],
    ),
    "streams not divisible by the data-parallel degree": (
        ["--nproc", "2", "--dataloader.num_streams", "3"],
        ["--dataloader.num_streams=3", "multiple of the data-parallel degree 2"],
    ),
    "bad fraction above 1": (["--dataloader.max_bad_fraction", "1.5"], ["--dataloader.max_bad_fraction=1.5", "[0, 1)"]),
    "bad fraction of 1": (["--dataloader.max_bad_fraction", "1"], ["--dataloader.max_bad_fraction=1", "[0, 1)"]),
    "negative bad fraction": (["--dataloader.max_bad_fraction", "-0.1"], ["--dataloader.max_bad_fraction=-0.1"]),
    "LM capacity above 1": (["--dataloader.lm_capacity", "1.5"], ["--dataloader.lm_capacity=1.5", "(0, 1]"]),
    "flow capacity of 0": (["--dataloader.flow_capacity", "0"], ["--dataloader.flow_capacity=0", "(0, 1]"]),
    "zero cross-entropy chunk": (["--loss.lm_chunk_rows", "0"], ["--loss.lm_chunk_rows=0", "positive number of rows"]),
    "parallel layout larger than the processes": (
        ["--parallelism.tensor_parallel_degree", "2"], ["--parallelism", "tensor 2", "--nproc"],
    ),
    "dump folder besides --out": (["--dump_folder", "elsewhere"], ["--dump_folder", "--out"]),
}


@pytest.mark.parametrize("extra, fragments", BAD_COMMAND_LINES.values(), ids=BAD_COMMAND_LINES.keys())
def test_bad_command_line_is_one_line_before_launch(tmp_path, capsys, no_launch, extra, fragments):
    out = tmp_path / "run"
    assert unimm_main(train(out, *extra)) == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    assert not out.exists()  # nothing created, nothing launched


def test_out_naming_a_file(tmp_path, capsys, no_launch):
    file = tmp_path / "notes.txt"
    file.write_text("")
    for out, fragment in [(file, f"--out {file} is a file"), (file / "run", f"{file} is a file")]:
        assert unimm_main(train(out)) == 2
        assert fragment in error_line(capsys)


def test_every_mistake_is_named_at_once(tmp_path, capsys, no_launch):
    assert unimm_main(train(tmp_path / "run", "--steps", "-1", "--nproc", "0", "--lr", "-1.0")) == 2
    line = error_line(capsys)
    assert all(fragment in line for fragment in ("--steps -1", "--nproc 0", "--lr -1.0")), line


# ---------------------------------------------------------------- processes against devices


def test_more_processes_than_gpus_is_an_error(tmp_path, capsys, monkeypatch, no_launch):
    monkeypatch.setattr(config_checks, "devices", lambda: ("GPU", 1))
    assert unimm_main(train(tmp_path / "run", "--nproc", "2")) == 2
    assert "--nproc 2 is more than the 1 visible GPUs" in error_line(capsys)


def test_more_processes_than_cores_is_a_warning(tmp_path, capsys, monkeypatch, fake_launch):
    monkeypatch.setattr(config_checks, "devices", lambda: ("CPU core", 1))
    assert unimm_main(train(tmp_path / "run", "--nproc", "2", "--steps", "3")) == 0
    err = capsys.readouterr().err
    assert "unimm: warning: --nproc 2 is more than the 1 CPU cores" in err, err
    assert len(fake_launch) == 1 and "--nproc-per-node=2" in fake_launch[0]["command"]


# ---------------------------------------------------------------- --lr


def test_lr_becomes_torchtitans_option(tmp_path, capsys, fake_launch):
    assert unimm_main(train(tmp_path / "run", "--lr", "3e-4", "--steps", "3")) == 0
    command = fake_launch[0]["command"]
    option = command.index("--optimizer.param-groups.0.optimizer-kwargs.lr")
    assert float(command[option + 1]) == 3e-4
    # the spelling is the one torchtitan's parser takes
    overrides = command[command.index("--config") + 2:]
    config = launch.load_recipe("debug_cpu", overrides)
    assert [g.optimizer_kwargs["lr"] for g in config.optimizer.param_groups] == [3e-4]


def test_lr_zero_is_a_warning(tmp_path, capsys, fake_launch):
    assert unimm_main(train(tmp_path / "run", "--lr", "0", "--steps", "3")) == 0
    assert "unimm: warning: learning rate 0" in capsys.readouterr().err


# ---------------------------------------------------------------- run.json: resuming


def test_launch_holds_the_lock_and_records_the_run(tmp_path, capsys, fake_launch):
    out = tmp_path / "run"
    assert unimm_main(train(out, "--steps", "3")) == 0
    call = fake_launch[0]
    assert call["holder"]["pid"] == os.getpid() and call["holder"]["host"] == socket.gethostname()
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in call["refusal"]
    assert call["env"][run_lock.LAUNCHER_ENV] == f"{os.getpid()}:{out.absolute() / LOCK_NAME}"
    assert call["command"][1:4] == ["-m", "unimm.titan.lifeline", "torch.distributed.run"]
    RunLock(out).acquire().release()  # released when torchrun has returned
    record = json.loads((out / "run.json").read_text())
    assert record["settings"]["recipe"] == "debug_cpu"
    assert record["settings"]["training.global_batch_size"] == 8
    assert record["settings"]["model.dim"] == 128 and len(record["launches"]) == 1


@pytest.fixture
def resumable(tmp_path, fake_launch) -> Path:
    """A debug_cpu run folder with run.json and a checkpoint at step 3 (of 3)."""
    out = tmp_path / "run"
    assert unimm_main(train(out, "--steps", "3")) == 0
    return out


RESUME_MISTAKES = {
    "another recipe": (
        "debug_cpu_moe", [], ["--recipe debug_cpu_moe", "a 'debug_cpu' run", "resume it with --recipe debug_cpu"],
    ),
    "another batch size": (
        "debug_cpu", ["--training.local_batch_size", "4"],
        ["training.global_batch_size is 4 but", "was started with 8", "--allow-config-change", "--out"],
    ),
    "another sequence length": (
        "debug_cpu", ["--training.seq_len", "128"], ["training.seq_len is 128", "started with 256"],
    ),
    "another stream count": (
        "debug_cpu", ["--dataloader.num_streams", "2"], ["dataloader.num_streams is 2", "--dataloader.num_streams 1"],
    ),
}


@pytest.mark.parametrize("recipe, extra, fragments", RESUME_MISTAKES.values(), ids=RESUME_MISTAKES.keys())
def test_resume_with_other_settings_is_refused(resumable, capsys, recipe, extra, fragments):
    capsys.readouterr()
    assert unimm_main(train(resumable, "--steps", "6", *extra, recipe=recipe)) == 2
    line = error_line(capsys)
    for fragment in fragments:
        assert fragment in line, (fragment, line)


def test_another_model_shape_is_refused_after_the_data_checks(tmp_path, capsys, fake_launch):
    # debug_sweep is resizable (--model_size.*): same recipe, another model
    out = tmp_path / "run"
    assert unimm_main(train(out, "--steps", "3", recipe="debug_sweep")) == 0
    assert unimm_main(train(out, "--steps", "6", "--model_size.n_layers", "1", recipe="debug_sweep")) == 2
    line = error_line(capsys)
    assert "model.n_layers is 1" in line and "cannot load into another model shape" in line, line


def test_allowed_change_resumes_with_a_warning(resumable, capsys, fake_launch):
    capsys.readouterr()
    assert unimm_main(train(resumable, "--steps", "6", "--training.local_batch_size", "4", "--allow-config-change")) == 0
    assert "continuing with the new value (--allow-config-change)" in capsys.readouterr().err
    record = json.loads((resumable / "run.json").read_text())
    assert record["settings"]["training.global_batch_size"] == 4 and len(record["launches"]) == 2
    # the steps and the LR may change without it
    assert unimm_main(train(resumable, "--steps", "9", "--training.local_batch_size", "4", "--lr", "1e-3")) == 0


def test_a_folder_without_run_json_is_adopted(tmp_path, capsys, fake_launch):
    out = tmp_path / "from_hf"
    (out / "checkpoint" / "step-0").mkdir(parents=True)
    (out / "checkpoint" / "step-0" / ".metadata").write_bytes(b"")
    assert unimm_main(train(out, "--steps", "2")) == 0
    assert json.loads((out / "run.json").read_text())["settings"]["recipe"] == "debug_cpu"


# ---------------------------------------------------------------- the run lock

HOLDER = textwrap.dedent("""
    import sys, time
    from unimm.titan.run_lock import RunLock
    RunLock(sys.argv[1], role="test holder").acquire()
    print("locked", flush=True)
    time.sleep(600)
""")


def test_second_writer_is_refused_and_a_dead_holders_lock_is_not(tmp_path, capsys, fake_launch):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert unimm_main(train(out, "--steps", "3")) == 2
        line = error_line(capsys)
        for fragment in [f"{out} is in use by pid {holder.pid} on host {socket.gethostname()}", "(test holder)",
                         f"kill {holder.pid} on", "another --out"]:
            assert fragment in line, (fragment, line)
        assert not fake_launch
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: its details stay in the file, the lock does not.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    assert unimm_main(train(out, "--steps", "3")) == 0
    assert len(fake_launch) == 1 and fake_launch[0]["holder"]["pid"] == os.getpid()


def test_rank0_started_by_hand_takes_the_lock(tmp_path, monkeypatch):
    from unimm.titan import train as entry

    out = tmp_path / "run"
    argv = ["--module", "unimm.recipes", "--config", "debug_cpu", "--dump_folder", str(out)]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(run_lock.LAUNCHER_ENV, raising=False)
    with RunLock(out, role="unimm train") as held:
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            entry._guard_run_folder(argv)
        # under unimm train the launcher holds it for rank 0
        monkeypatch.setenv(run_lock.LAUNCHER_ENV, f"{os.getpid()}:{held.path}")
        entry._guard_run_folder(argv)
        assert entry._run_lock is None
    monkeypatch.delenv(run_lock.LAUNCHER_ENV)
    try:
        entry._guard_run_folder(argv)  # free: rank 0 takes it for its life
        assert entry._run_lock.held
        with pytest.raises(RunLockedError, match="unimm.titan.train rank 0"):
            RunLock(out).acquire()
        # and checks the config as unimm train would
        with pytest.raises(ConfigError, match="--training.local_batch_size=0"):
            entry._guard_run_folder([*argv, "--dump_folder", str(tmp_path / "other"), "--training.local_batch_size", "0"])
    finally:
        entry._run_lock.release()
        entry._run_lock = None


# ---------------------------------------------------------------- processes die with their parent


def live_processes(fragment: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process whose command line holds ``fragment``, zombies excepted."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if fragment in cmdline and state not in ("Z", "X"):
            found.append((int(entry), cmdline))
    return found


def wait_until_gone(fragment: str, seconds: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + seconds
    while (alive := live_processes(fragment)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


SLEEPER = textwrap.dedent("""
    import os, sys, time
    from unimm.titan import lifeline
    if "--no-prctl" in sys.argv:
        lifeline._prctl_pdeathsig = lambda sig: False
    print(lifeline.die_with_parent(expected=lifeline.expected_parent()), flush=True)
    time.sleep(600)
""")


SPAWNER = textwrap.dedent("""
    import subprocess, sys
    # as torchrun's agent starts a worker: in a session of its own
    subprocess.Popen([sys.executable, "-m", "sleeper_mod", *sys.argv[1:]], start_new_session=True).wait()
""")


def spawn_chain(tmp_path: Path, tag: str, *, via_agent: bool, no_prctl: bool = False) -> subprocess.Popen:
    """A parent (as unimm train) starting either the sleeper directly, or an agent through
    the lifeline bootstrap (as unimm train starts torchrun) that starts the sleeper in a new
    session (as torchrun starts a worker). Every process has ``tag`` on its command line; the
    parent's stdout says how the sleeper tied itself."""
    (tmp_path / "sleeper_mod.py").write_text(SLEEPER)
    (tmp_path / "spawner_mod.py").write_text(SPAWNER)
    child = [sys.executable, "-m", *(["unimm.titan.lifeline", "spawner_mod"] if via_agent else ["sleeper_mod"]), tag]
    child += ["--no-prctl"] if no_prctl else []
    parent = textwrap.dedent(f"""
        import os, subprocess, sys, time
        from unimm.titan.lifeline import PARENT_ENV
        env = {{**os.environ, PARENT_ENV: str(os.getpid()), "PYTHONPATH": {str(tmp_path)!r} + os.pathsep + {str(ROOT)!r}}}
        subprocess.Popen({child!r}, env=env)
        time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", parent, tag], stdout=subprocess.PIPE, text=True,
                            start_new_session=True, cwd=ROOT)


@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("via_agent, no_prctl", [(False, False), (True, False), (False, True)],
                         ids=["prctl", "through an agent", "watchdog"])
def test_a_tied_process_dies_with_its_parent(tmp_path, via_agent, no_prctl):
    tag = f"lifeline-test-{tmp_path.name}"
    parent = spawn_chain(tmp_path, tag, via_agent=via_agent, no_prctl=no_prctl)
    try:
        how = parent.stdout.readline().strip()
        assert how == ("watchdog" if no_prctl else "prctl")
        assert len(live_processes(tag)) == (3 if via_agent else 2), live_processes(tag)
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone, not its group
        parent.wait()
        assert wait_until_gone(tag, seconds=5) == []
    finally:
        for pid, _ in live_processes(tag):
            os.kill(pid, signal.SIGKILL)


def test_a_child_whose_parent_is_already_gone_dies_at_once(tmp_path):
    (tmp_path / "sleeper_mod.py").write_text(SLEEPER)
    env = {**os.environ, "UNIMM_PARENT_PID": "999999999", "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    result = subprocess.run([sys.executable, "-m", "sleeper_mod"], env=env, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL


def test_sigterm_is_passed_on_to_torchrun(tmp_path):
    # a stand-in for torchrun that stops cleanly on SIGTERM
    ready, stopped = tmp_path / "ready", tmp_path / "stopped"
    child = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        def stop(signum, frame):
            pathlib.Path({str(stopped)!r}).write_text(str(signum))
            sys.exit(0)
        signal.signal(signal.SIGTERM, stop)
        pathlib.Path({str(ready)!r}).write_text("")
        time.sleep(120)
    """)

    def signal_us():
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    import threading

    threading.Thread(target=signal_us, daemon=True).start()
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(launch.Interrupted) as stop:
        launch.run_torchrun([sys.executable, "-c", child], dict(os.environ))
    assert stop.value.signum == signal.SIGTERM
    assert stopped.read_text() == str(int(signal.SIGTERM))  # it got SIGTERM, and exited by itself
    assert signal.getsignal(signal.SIGTERM) is before


# ---------------------------------------------------------------- the real thing: unimm train + torchrun


@pytest.mark.slow
@pytest.mark.skipif(not LINUX, reason="reads /proc")
@pytest.mark.parametrize("kill", ["process group", "launcher only"])
def test_sigkill_of_unimm_train_leaves_no_worker(tmp_path, data_cache, capsys, kill):
    out = tmp_path / "run"
    options = [*small_run_options(data_cache), "--checkpoint.interval", "100000"]
    log = (tmp_path / "train.log").open("w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "unimm.cli", *train(out, "--steps", "100000", *options)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 480
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert launcher.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "train.log").read_text()[-3000:]
            time.sleep(0.5)
        running = live_processes(str(out))
        agents = [pid for pid, cmd in running if "-m unimm.titan.lifeline torch.distributed.run" in cmd]
        workers = [pid for pid, cmd in running if "-m unimm.titan.train" in cmd and pid not in agents]
        assert len(workers) == 1 and len(agents) == 1, running

        if kill == "process group":
            # a second launch on the folder is refused, naming the live one
            assert unimm_main(train(out, "--steps", "100000", *options)) == 2
            assert f"is in use by pid {launcher.pid} on host {socket.gethostname()}" in error_line(capsys)
            os.killpg(launcher.pid, signal.SIGKILL)  # the agent is in it, the worker is not
        else:
            os.kill(launcher.pid, signal.SIGKILL)  # the agent dies with it, the worker with the agent
        launcher.wait()
        assert wait_until_gone(str(out), seconds=10) == []
        RunLock(out).acquire().release()  # and the folder is free again
    finally:
        for pid, _ in live_processes(str(out)):
            os.kill(pid, signal.SIGKILL)
        log.close()
