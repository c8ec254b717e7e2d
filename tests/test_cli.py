"""The napari-retina command line: help, argument forms, one-line errors with exit code 2."""

import subprocess
import sys

import pytest
from PIL import Image

from conftest import fundus_rgb
from napari_retina import cli


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "napari_retina.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_help_lists_the_subcommands():
    r = run_cli("--help")
    assert r.returncode == 0
    assert "open" in r.stdout and "napari-retina" in r.stdout


def test_bare_path_means_open_and_no_argument_opens_the_sample():
    assert cli._normalise_argv(["eye.jpg"]) == ["open", "eye.jpg"]
    assert cli._normalise_argv([]) == ["open"]
    assert cli._normalise_argv(["open", "x"]) == ["open", "x"]
    args = cli.build_parser().parse_args(cli._normalise_argv([]))
    assert args.command == "open" and args.path is None


@pytest.mark.parametrize("make, expect", [
    (lambda d: d / "missing.jpg", "no such file"),
    (lambda d: (d / "notes.txt").write_text("x") and d / "notes.txt", "not a fundus image"),
    (lambda d: (d / "bad.jpg").write_bytes(b"garbage") and d / "bad.jpg", "bad.jpg"),
    (lambda d: d, "no fundus images"),
])
def test_bad_paths_fail_with_one_line_and_exit_code_2(tmp_path, make, expect):
    target = make(tmp_path)
    r = run_cli(str(target))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0] and "Traceback" not in r.stderr


def test_truncated_jpeg_fails_before_napari_starts(tmp_path):
    p = tmp_path / "eye.jpg"
    Image.fromarray(fundus_rgb()).save(p, quality=95)
    p.write_bytes(p.read_bytes()[:200])
    r = run_cli("open", str(p))
    assert r.returncode == 2 and "eye.jpg" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unknown_subcommand_option_is_a_usage_error():
    r = run_cli("open", "--no-such-option")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
