"""Progress: a bar redrawn in place on a terminal; readable timed lines in a log file (SLURM, nohup, CI)."""
import io
import re

import dinoprobe.progress
from dinoprobe.progress import progress_bar

from conftest import features_cmd, make_folder, make_synthetic_cache, run_cli


class Terminal(io.StringIO):
    def isatty(self):
        return True


def draw(stream, updates=50):
    bar = progress_bar(updates, "work", "item", stream=stream)
    for _ in range(updates):
        bar.set_postfix(loss="0.5", refresh=False)
        bar.update(1)
    bar.close()
    return stream.getvalue()


def test_a_terminal_gets_a_bar_redrawn_in_place():
    out = draw(Terminal())
    assert out.count("\r") >= 2 and out.count("\n") <= 1  # tqdm's carriage-return redraws, one line in the end


def test_a_log_file_gets_one_line_per_redraw_at_most_every_interval():
    out = draw(io.StringIO())  # far less than LOG_INTERVAL_S: only the first and the final state
    assert "\r" not in out
    assert out.splitlines() == [line for line in out.splitlines() if line.startswith("work: ")]
    assert len(out.splitlines()) == 2, out
    assert re.fullmatch(r"work: 100% 50/50 \[.*item/s, loss=0.5\]", out.splitlines()[-1]), out


def test_a_log_file_line_is_written_whenever_the_interval_has_passed(monkeypatch):
    monkeypatch.setattr(dinoprobe.progress, "LOG_INTERVAL_S", 0.0)
    lines = draw(io.StringIO(), updates=5).splitlines()
    assert [line.split(" [")[0] for line in lines] == ["work:   0% 0/5", "work:  20% 1/5", "work:  40% 2/5",
                                                       "work:  60% 3/5", "work:  80% 4/5", "work: 100% 5/5"]


def test_disabled_writes_nothing():
    stream = io.StringIO()
    bar = progress_bar(3, "work", "item", enabled=False, stream=stream)
    bar.update(3)
    bar.close()
    assert stream.getvalue() == ""


def test_probe_and_logreg_logs_hold_lines_not_carriage_returns(tmp_path):
    cache = make_synthetic_cache(tmp_path / "cache", n=(120, 40, 40), dim=8, num_classes=3)
    probe = run_cli("probe", "--cache", cache, "--out", tmp_path / "run", "--epochs", "40", "--head", "linear",
                    check=True)
    assert "\r" not in probe.stderr
    assert re.search(r"^probe: 100% 40/40 \[.*epoch/s, loss=[0-9.]+, val_acc=[0-9.]+, best=[0-9.]+\]$",
                     probe.stderr, re.M), probe.stderr
    assert len(probe.stderr.splitlines()) < 10, probe.stderr  # not a line per epoch
    logreg = run_cli("logreg", "--cache", cache, "--out", tmp_path / "logreg", check=True)
    assert "\r" not in logreg.stderr
    assert re.search(r"^logreg: 45 C values: .*running=0/45 C\]$", logreg.stderr, re.M), logreg.stderr
    assert len(logreg.stderr.splitlines()) < 12, logreg.stderr  # not a line per L-BFGS iteration

def test_knn_shows_one_bar_per_search_of_a_split(tmp_path, monkeypatch):
    """k-NN searches the train features once for the val split (choosing k; its metrics at that k, and a
    multi-label head's thresholds, come from the neighbours found) and once for the test split, each scored a block
    of rows at a time: one bar per split's search, named, counting its images — not a bar per block."""
    from dinoprobe import settings

    monkeypatch.setattr(settings, "SCORING_ROWS_PER_BLOCK", 16)  # 40 rows: three blocks a split
    cache = make_synthetic_cache(tmp_path / "cache", n=(120, 40, 40), dim=8, num_classes=3)
    knn = run_cli("knn", "--cache", cache, "--out", tmp_path / "knn", "--k", "5,10", check=True)
    assert "\r" not in knn.stderr
    bars = [line for line in knn.stderr.splitlines() if line.startswith("k-NN")]
    names = [re.match(r"^(k-NN[^%]*): +\d+% ", line).group(1) for line in bars]
    assert list(dict.fromkeys(names)) == ["k-NN: val", "k-NN: test"], knn.stderr
    for name in dict.fromkeys(names):
        assert re.search(rf"^{re.escape(name)}: 100% 40/40 \[.*img/s\]$", knn.stderr, re.M), knn.stderr
    assert all(not re.search(r" 16/16 ", line) for line in bars), knn.stderr
    # multi-label: the thresholds are tuned on val at the chosen k, from fit's neighbours (was two more searches)
    tagged = make_synthetic_cache(tmp_path / "tagged", n=(120, 40, 40), dim=8, num_classes=3, multilabel=True)
    knn = run_cli("knn", "--cache", tagged, "--out", tmp_path / "knn-tagged", "--k", "5", check=True)
    names = [re.match(r"^(k-NN[^%]*): +\d+% ", line).group(1) for line in knn.stderr.splitlines()
             if line.startswith("k-NN")]
    assert list(dict.fromkeys(names)) == ["k-NN: val", "k-NN: test"], knn.stderr


def test_features_log_holds_one_line_per_split_state(tmp_path):
    root = make_folder(tmp_path / "data", per_class=3)
    proc = run_cli(*features_cmd(root, tmp_path / "cache")[3:], check=True)
    assert "\r" not in proc.stderr
    assert re.search(r"^features train: 100% 6/6 \[.*img/s\]$", proc.stderr, re.M), proc.stderr
    assert re.search(r"^features val: 100% 6/6 \[.*img/s\]$", proc.stderr, re.M), proc.stderr


class Full(io.StringIO):
    """`2> log` on a full disk."""

    def write(self, text):
        raise OSError(28, "No space left on device")


def test_progress_never_stops_the_work_it_reports_on():
    for stream in (Full(), Terminal()):
        if isinstance(stream, Terminal):
            stream.write = Full().write  # a terminal that went away
        bar = progress_bar(3, "work", "item", stream=stream)
        bar.update(3)
        bar.close()


def test_commands_run_to_the_end_with_stderr_closed_or_on_a_full_disk(tmp_path):
    """The results (run directory, cache, stdout) do not depend on stderr, which only carries notes and progress."""
    import processes

    cache = make_synthetic_cache(tmp_path / "cache", n=(60, 30, 30), dim=8, num_classes=3)
    root = make_folder(tmp_path / "data", per_class=3)
    probe = ["-m", "dinoprobe", "probe", "--cache", cache, "--out", tmp_path / "run", "--epochs", 3]
    features = features_cmd(root, tmp_path / "features")[1:]
    stdout = []  # each command once with each: `2>&-` (closed), `2>/dev/full`
    for command, stderr in ((probe, None), (features, "/dev/full")):
        proc = processes.run(command, stderr=stderr)
        assert proc.returncode == 0, (command, stderr, proc.stdout)
        stdout.append(proc.stdout)
    assert "run saved to" in stdout[0] and (tmp_path / "run" / "head.pt").is_file()
    assert "12 computed" in stdout[1] and (tmp_path / "features" / "manifest.json").is_file()


def test_a_reader_that_closes_stdout_early_ends_the_command_quietly(tmp_path):
    """`dinoprobe knn ... | head -1`: exit 141 as Unix tools do on SIGPIPE, with nothing on stderr but the progress
    (no 'Error: Broken pipe; check free disk space...'), and the run directory, written before the table is printed, whole."""
    import subprocess
    import sys

    from conftest import REPO

    cache = make_synthetic_cache(tmp_path / "cache", n=(60, 30, 30), dim=8, num_classes=3)
    # `| true`: the reader is gone before the first line (`head -1` may close only after the last one)
    command = f"{sys.executable} -m dinoprobe knn --cache {cache} --out {tmp_path / 'run'} --k 1 | true"
    proc = subprocess.run(["bash", "-c", f"{command}; echo ${{PIPESTATUS[0]}} >&2"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert [line for line in proc.stderr.splitlines() if not line.startswith("k-NN")] == ["141"], proc.stderr
    assert (tmp_path / "run" / "metrics.json").is_file()
